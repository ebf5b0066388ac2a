"""The library's exception tree.

Bad arguments keep Segment's exception types (AssertionError, TypeError,
ValueError, RuntimeError) so that code written for segment-analytics-python
behaves the same. Everything the library itself raises derives from
`OutboxAnalyticsError`:

    OutboxAnalyticsError
    ├── OutboxError          the outbox file cannot be opened or written
    │   ├── OutboxBusy       another connection holds the file's lock past our wait
    │   ├── OutboxDamaged    SQLite says the file is corrupt (it is moved aside by a writer)
    │   ├── OutboxUnavailable  I/O, permission, read-only, a bad path: nothing is moved
    │   ├── NotAnOutbox      the file is not an outbox: it is left exactly as it was
    │   └── OutboxMismatch   the file belongs to another write key or host
    ├── OutboxFull           max_queue_size events are pending
    └── DeliveryError        a batch was not delivered
        ├── RetryableError   network error, timeout, 5xx, 429...: may succeed later
        │   └── EndpointRejected  every event rejected alike: the host, path or key is wrong
        └── APIError         the server rejected the events (Segment's name and fields)
"""

from __future__ import annotations

from typing import TypeVar

__all__ = [
    "APIError",
    "DeliveryError",
    "EndpointRejected",
    "NotAnOutbox",
    "OutboxAnalyticsError",
    "OutboxBusy",
    "OutboxDamaged",
    "OutboxError",
    "OutboxMismatch",
    "OutboxUnavailable",
    "OutboxFull",
    "RetryableError",
    "without_frames",
]


class OutboxAnalyticsError(Exception):
    """Base class of the errors this library raises."""


class OutboxError(OutboxAnalyticsError):
    """The outbox file cannot be opened, is not an outbox, or a write failed."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{message}: {path}")
        self.path = path


class OutboxBusy(OutboxError):
    """Another connection (a process, a backup tool, the sqlite3 shell) kept the file locked.

    `reentered`: the call came from a signal handler (or a callback) whose
    thread was itself inside a call on the file, and had to write.
    """

    reentered = False


class OutboxDamaged(OutboxError):
    """SQLite reports the file as corrupt (SQLITE_CORRUPT or SQLITE_NOTADB)."""


class OutboxUnavailable(OutboxError):
    """The file cannot be used here: I/O error, permissions, read-only, full disk, bad path."""


class NotAnOutbox(OutboxError):
    """The file is not an outbox (not SQLite, or another program's database)."""


class OutboxMismatch(OutboxError):
    """The outbox was created for another write key or host: its events are not ours to send."""


class OutboxFull(OutboxAnalyticsError):
    """The outbox holds `max_queue_size` pending events; the new one was not stored."""


class DeliveryError(OutboxAnalyticsError):
    """A batch was not delivered. `status` is the HTTP status, None for network errors."""

    status: int | None = None
    body: str = ""


class RetryableError(DeliveryError):
    """The same batch may be accepted later: the events stay pending."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        body: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.body = body


class EndpointRejected(RetryableError):
    """Every event of a batch was rejected alike: the rejection is about the endpoint.

    A wrong host, path or write key answers 4xx to anything; dead-lettering the
    backlog for it would serve nobody. The events stay pending, the head backs
    off, and `on_error` receives this error, whose `status` and `body` are the
    server's answer.
    """


class APIError(DeliveryError):
    """The server rejected the events (a 4xx other than the retryable ones).

    Same constructor and fields as segment-analytics-python's APIError, plus
    the response body.
    """

    def __init__(self, status: int, code: str, message: str, body: str = "") -> None:
        super().__init__(f"[Segment] {message}: {code} ({status})")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


_E = TypeVar("_E", bound=BaseException)


def without_frames(exc: _E) -> _E:
    """`exc` with no traceback and no chained exception: how user code (on_error) gets it.

    Error trackers (Sentry by default, rich, better_exceptions) record each
    frame's local variables: the frames of a delivery hold the request's
    headers and body (the write key, a bearer token), the token request's
    signed client assertion. Its message already says what went wrong.
    """
    exc.__traceback__ = None
    exc.__cause__ = None
    exc.__context__ = None
    exc.__suppress_context__ = True
    return exc
