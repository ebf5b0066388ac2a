"""outbox-analytics: Segment's Python API, with every event on disk before the call returns.

Use it like segment-analytics-python::

    import outbox_analytics as analytics
    analytics.write_key = "..."
    analytics.track("user-1", "Signed Up", {"plan": "pro"})

Module settings are read once, when the default client is first needed.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from . import exit_delivery, messages, process
from .client import Client
from .config import ClientConfig, client_host, option_names
from .delivery import FlushResult
from .errors import (
    APIError,
    DeliveryError,
    EndpointRejected,
    NotAnOutbox,
    OutboxAnalyticsError,
    OutboxBusy,
    OutboxDamaged,
    OutboxError,
    OutboxFull,
    OutboxMismatch,
    OutboxUnavailable,
    RetryableError,
)
from .sinks import captures
from .store import PATH_ENV, OutboxStats, default_outbox_path
from .transport import MemoryTransport
from .utils import RateLimitedLog
from .version import VERSION

__version__ = VERSION

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "APIError",
    "Client",
    "ClientConfig",
    "DeliveryError",
    "EndpointRejected",
    "FlushResult",
    "MemoryTransport",
    "NotAnOutbox",
    "RetryableError",
    "OutboxAnalyticsError",
    "OutboxBusy",
    "OutboxDamaged",
    "OutboxError",
    "OutboxFull",
    "OutboxMismatch",
    "OutboxUnavailable",
    "OutboxStats",
    "VERSION",
    "alias",
    "batch",
    "default_client",
    "default_outbox_path",
    "flush",
    "group",
    "identify",
    "join",
    "page",
    "screen",
    "shutdown",
    "stats",
    "track",
]

# No handler of ours, not even a NullHandler: an application that configured
# no logging then gets our warnings and errors on stderr (Python's last-resort
# handler, as Segment's users do), and one that configured logging gets
# exactly what it asked for. A NullHandler hid every failure of a script.

# Settings, as in segment-analytics-python: every option of Client (see
# ClientConfig), read when the default client is first needed.
write_key = ClientConfig.write_key
host = ClientConfig.host
debug = ClientConfig.debug
max_queue_size = ClientConfig.max_queue_size
send = ClientConfig.send
on_error = ClientConfig.on_error
gzip = ClientConfig.gzip
max_retries = ClientConfig.max_retries
sync_mode = ClientConfig.sync_mode
timeout = ClientConfig.timeout
proxies = ClientConfig.proxies
thread = ClientConfig.thread
upload_size = ClientConfig.upload_size
upload_interval = ClientConfig.upload_interval
log_handler = ClientConfig.log_handler
oauth_client_id = ClientConfig.oauth_client_id
oauth_client_key = ClientConfig.oauth_client_key
oauth_key_id = ClientConfig.oauth_key_id
oauth_auth_server = ClientConfig.oauth_auth_server
oauth_scope = ClientConfig.oauth_scope
max_total_backoff_duration = ClientConfig.max_total_backoff_duration
max_rate_limit_duration = ClientConfig.max_rate_limit_duration
outbox_path = ClientConfig.outbox_path
fsync = ClientConfig.fsync
upload = ClientConfig.upload
retry_wait = ClientConfig.retry_wait
before_send = ClientConfig.before_send
transport = ClientConfig.transport
# The one default that differs: what a script leaves pending at exit goes to
# a detached sender (handoff.py), so a CLI's events arrive after it exits.
hand_off_at_exit = True

default_client: Client | None = None


def _delegate(method: Callable[Concatenate[Client, P], R]) -> Callable[P, R]:
    """The module-level form of a `Client` method: the same signature, called on the default client.

    Generated rather than written out, so that the module API cannot drift
    from `Client`'s: type checkers see the method's own parameters and
    return type (ParamSpec), and `inspect.signature()` and `help()` show
    them too.
    """
    name = method.__name__

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        client = _default.client_if_it_can_store()
        if client is not None:
            bound: Callable[P, R] = getattr(client, name)
            return bound(*args, **kwargs)
        if name in messages.MESSAGE_TYPES:  # built (and checked), not stored
            built = getattr(messages, name)(*args, **kwargs)
            return cast(R, (False, built))
        # flush(), stats()...: on a client that stores nothing
        return getattr(Client(write_key, host=host, send=False), name)(*args, **kwargs)  # type: ignore[no-any-return]

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`Client.{name}()` on the default client (built from the module settings)."
    if method.__doc__:
        call.__doc__ += "\n\n" + inspect.cleandoc(method.__doc__)
    # What introspection reads (inspect.signature, typing.get_type_hints): the
    # method's, without self; __wrapped__ lends get_type_hints its module.
    call.__wrapped__ = method  # type: ignore[attr-defined]
    call.__annotations__ = {k: v for k, v in method.__annotations__.items() if k != "self"}
    parameters = list(inspect.signature(method).parameters.values())[1:]
    call.__signature__ = inspect.signature(method).replace(parameters=parameters)  # type: ignore[attr-defined]
    return call


class _DefaultClient:
    """Making the default client from the module settings: once, and never raising for the file.

    The module's calls never raise because of where the outbox lives:
    Segment's never do. `Client(outbox_path=...)` itself still fails fast.
    """

    RETRY_AFTER = 30.0  # seconds between attempts at a default client that could not open

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failed_at: float | None = None
        self.cannot_store = RateLimitedLog()

    def client_if_it_can_store(self) -> Client | None:
        """The default client; None (with a warning) while its outbox cannot be opened anywhere."""
        if default_client is not None:
            return default_client
        if self.failed_at is not None and time.monotonic() - self.failed_at < self.RETRY_AFTER:
            return None
        try:
            return self.client()
        except OutboxError as exc:
            self.failed_at = time.monotonic()
            suppressed = self.cannot_store.ready()
            if suppressed is not None:
                logging.getLogger("outbox_analytics").error(
                    "outbox-analytics: events are not stored (%s): set outbox_path (or $%s) to a"
                    " writable place (%d more since the last report)",
                    exc, PATH_ENV, suppressed,
                )  # fmt: skip
            return None

    def client(self) -> Client:
        """Build the default client from the module settings on first use."""
        global default_client
        client = default_client
        if client is None:
            with self.lock:
                if default_client is None:
                    default_client = Client(**_settings())
                client = default_client
        return client

    def forget_the_parents_lock(self) -> None:
        # Held by another thread at fork() (building the default client), it
        # would stay held in the child for good.
        self.lock = threading.Lock()


def _settings() -> dict[str, Any]:
    """The module settings, by the names of Client's options."""
    settings = {name: globals()[name] for name in option_names()}
    if settings["write_key"] is None and captures.current is not None:
        # Under a test capture the module-level API records without a key
        # (README, "Testing code that uses it"); an explicit Client() needs one.
        settings["write_key"] = ""
    return settings


_default = _DefaultClient()
process.on_new_process(_default.forget_the_parents_lock)

track = _delegate(Client.track)
identify = _delegate(Client.identify)
group = _delegate(Client.group)
alias = _delegate(Client.alias)
page = _delegate(Client.page)
screen = _delegate(Client.screen)
batch = _delegate(Client.batch)
stats = _delegate(Client.stats)
flush = _delegate(Client.flush)
join = _delegate(Client.join)
shutdown = _delegate(Client.shutdown)


@exit_delivery.before_exit
def _deliver_what_workers_left() -> None:
    """A process that set up the module-level API delivers its outbox's pending events at exit.

    Its multiprocessing workers (fork, forkserver or spawn) may have tracked
    everything while it tracked nothing; their events are in the outbox and
    this is the last process of the job. Runs before the clients deliver,
    so the client built here is flushed within the same exit budget.
    Nothing is created: only an outbox file that exists is opened.
    """
    if default_client is not None or not (write_key and send and upload):
        return
    path = outbox_path or default_outbox_path(write_key, client_host(host))
    if os.path.isfile(path):
        _default.client()
