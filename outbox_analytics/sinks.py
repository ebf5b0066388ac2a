"""Where a client's built messages go: chosen once, when the client is made.

- `OutboxSink`: committed to the outbox file, then the uploader is woken
  (or, in sync_mode, waited for);
- `Discard`: nowhere (send=False, or the kill switch $OUTBOX_ANALYTICS_DISABLED);
- `Capture`: recorded in a test's `MemoryTransport` (outbox_analytics.testing);
- `Stranded`: nowhere, with a warning: the client was made during a
  capture (so it opened no outbox) and is used after it ended.

A capture applies to every client, whenever it was made: starting or
ending one (`captures.switch`) re-points the clients it concerns, so a
call never asks which case it is in.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from . import process
from .errors import OutboxError, OutboxFull
from .transport import MemoryTransport
from .utils import RateLimitedLog

if TYPE_CHECKING:
    from .client import Client
    from .delivery import Uploader
    from .store import Outbox

__all__ = ["Capture", "Discard", "OutboxSink", "Sink", "Stranded", "captures"]

log = logging.getLogger("outbox_analytics")
Message = dict[str, Any]


class Sink(Protocol):
    def put(self, msg: Message, data: bytes) -> bool:
        """Take one built message (`data`: its stored form); whether it was kept."""

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """The messages put inside the block, kept all together or not at all."""


class Discard:
    """send=False and the kill switch: messages are built and checked, then dropped."""

    def put(self, msg: Message, data: bytes) -> bool:
        return True

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class Stranded:
    """A client made during a capture, used after it: it has no outbox, and says so."""

    def __init__(self) -> None:
        self._warning = RateLimitedLog()

    def put(self, msg: Message, data: bytes) -> bool:
        suppressed = self._warning.ready()
        if suppressed is not None:
            log.warning(
                "event neither stored nor sent: this client was built while a test capture"
                " was on, and has no outbox; build clients for live tests inside them"
                " (%d more since the last warning)",
                suppressed,
            )
        return False

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class Capture:
    """Recorded in a test's MemoryTransport; inside batch(), when the block ends without raising."""

    def __init__(self, events: MemoryTransport) -> None:
        self.events = events

    def put(self, msg: Message, data: bytes) -> bool:
        held: list[tuple[MemoryTransport, Message]] | None = getattr(_batches, "held", None)
        if held is None:
            self.events.record([msg])
        else:
            held.append((self.events, msg))
        return True

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return _captured_batch()


# Per thread, inside a batch() block under a capture: its messages and the
# capture each goes to, recorded when the block ends, none if it raises (as
# the outbox would store them).
_batches = threading.local()


@contextlib.contextmanager
def _captured_batch() -> Iterator[None]:
    if getattr(_batches, "held", None) is not None:
        yield  # nested: the outermost block decides
        return
    held: list[tuple[MemoryTransport, Message]] = []
    _batches.held = held
    try:
        yield
    finally:
        _batches.held = None
    for events, msg in held:  # only when the block did not raise
        events.record([msg])


class OutboxSink:
    """Committed to the outbox before put() returns; then the uploader is told."""

    def __init__(
        self, outbox: Outbox, uploader: Uploader | None, *, sync_mode: bool, timeout: float
    ) -> None:
        self.outbox = outbox
        self.uploader = uploader
        self.sync_mode = sync_mode
        self.timeout = timeout
        self._full_warning = RateLimitedLog()
        self._write_error_log = RateLimitedLog()

    def put(self, msg: Message, data: bytes) -> bool:
        try:
            row_id = self.outbox.append(data)
        except OutboxFull:
            self._warn_full()  # counted by the outbox, in the file when it can be
            return False
        except OutboxError as exc:
            if getattr(exc, "reentered", False) and not self.outbox.in_call_here():
                # A signal handler that interrupted this call used the outbox
                # and failed: its error, not ours, and never swallowed here.
                raise
            self._log_write_error(exc)  # counted by the outbox, too
            return False
        if self.uploader is not None:
            if not self.sync_mode:
                self.uploader.ensure_running()
            elif row_id is not None:
                # Raises if not delivered in time; the event stays in the outbox.
                self.uploader.deliver_now(row_id, self.timeout)
        return True

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return self.outbox.batch()

    def _warn_full(self) -> None:
        suppressed = self._full_warning.ready()
        if suppressed is not None:
            log.warning(
                "outbox is full (%d pending events, max_queue_size); event dropped"
                " (%d more dropped since the last warning): %s",
                self.outbox.max_pending, suppressed, self.outbox.path,
            )  # fmt: skip

    def _log_write_error(self, exc: OutboxError) -> None:
        suppressed = self._write_error_log.ready()
        if suppressed is not None:
            log.error("event not stored: %s (%d more since the last error)", exc, suppressed)


class _Captures:
    """This process's test captures: the one in force, and the clients it applies to.

    A client made with send=True, and not a test double of its own (a
    transport and a file of its own), is enrolled: while a capture is on,
    its sink is that capture; otherwise its own (`home`).
    """

    def __init__(self) -> None:
        self.current: MemoryTransport | None = None
        self._clients: weakref.WeakKeyDictionary[Client, Sink] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def enroll(self, client: Client, home: Sink) -> Sink:
        """Remember `client`'s own sink; the sink it uses now."""
        with self._lock:
            self._clients[client] = home
            return home if self.current is None else Capture(self.current)

    def switch(self, events: MemoryTransport | None) -> MemoryTransport | None:
        """Make `events` the capture in force (None: none); the one before."""
        with self._lock:
            previous, self.current = self.current, events
            for client, home in list(self._clients.items()):
                client.sink = home if events is None else Capture(events)
        return previous

    def _forget_the_parents_lock(self) -> None:
        self._lock = threading.Lock()  # held by a thread of the parent at fork(), for good


captures = _Captures()
process.on_new_process(captures._forget_the_parents_lock)
