"""outbox-analytics: Segment's Python API, with every event on disk before the call returns.

Use it like segment-analytics-python::

    import outbox_analytics as analytics
    analytics.write_key = "..."
    analytics.track("user-1", "Signed Up", {"plan": "pro"})

Module settings are read once, when the default client is first needed.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

from . import client as _client_module
from . import process
from .client import DEFAULT_HOST, Client
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
from .store import PATH_ENV, OutboxStats, default_outbox_path
from .transport import MemoryTransport
from .utils import RateLimitedLog
from .version import VERSION

__version__ = VERSION

# typing's ParamSpec and Concatenate are new in Python 3.10. Defined at run
# time where they exist, so that typing.get_type_hints() reads the module
# functions' annotations as it reads Client's methods'.
if TYPE_CHECKING or sys.version_info >= (3, 10):
    from typing import Concatenate, ParamSpec

    P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "APIError",
    "Client",
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

# Settings, as in segment-analytics-python.
write_key = Client.DefaultConfig.write_key
host = Client.DefaultConfig.host
on_error = Client.DefaultConfig.on_error
debug = Client.DefaultConfig.debug
log_handler = Client.DefaultConfig.log_handler
send = Client.DefaultConfig.send
sync_mode = Client.DefaultConfig.sync_mode
max_queue_size = Client.DefaultConfig.max_queue_size
gzip = Client.DefaultConfig.gzip
timeout = Client.DefaultConfig.timeout
max_retries = Client.DefaultConfig.max_retries
oauth_client_id = Client.DefaultConfig.oauth_client_id
oauth_client_key = Client.DefaultConfig.oauth_client_key
oauth_key_id = Client.DefaultConfig.oauth_key_id
oauth_auth_server = Client.DefaultConfig.oauth_auth_server
oauth_scope = Client.DefaultConfig.oauth_scope
# Ours.
outbox_path = Client.DefaultConfig.outbox_path
fsync = Client.DefaultConfig.fsync
upload = Client.DefaultConfig.upload
# What a script leaves pending at exit goes to a detached sender (handoff.py).
hand_off_at_exit = True

default_client: Client | None = None
_default_client_lock = threading.Lock()


def _delegate(method: Callable[Concatenate[Client, P], R]) -> Callable[P, R]:
    """The module-level form of a `Client` method: the same signature, called on the default client.

    Generated rather than written out, so that the module API cannot drift
    from `Client`'s: type checkers see the method's own parameters and
    return type (ParamSpec), and `inspect.signature()` and `help()` show
    them too.
    """
    name = method.__name__

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if name in _EVENT_CALLS:
            client = _client_if_it_can_store()
            if client is None:  # the event is built (and checked), not stored
                built: R = getattr(_message_builder(), name)(*args, **kwargs)
                return cast(R, (False, built[1]))  # type: ignore[index]
            bound: Callable[P, R] = getattr(client, name)
        else:  # flush(), stats()...: on a client that stores nothing, when none can store
            bound = getattr(_client_if_it_can_store() or _message_builder(), name)
        return bound(*args, **kwargs)

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


_EVENT_CALLS = frozenset({"track", "identify", "group", "alias", "page", "screen"})
_RETRY_OPENING_AFTER = 30.0  # seconds between attempts at a default client that could not open
_failed_at: float | None = None
_cannot_store = RateLimitedLog()


def _client_if_it_can_store() -> Client | None:
    """The default client; None (with a warning) while its outbox cannot be opened anywhere.

    The module's calls never raise because of where the outbox lives:
    Segment's never do. `Client(outbox_path=...)` itself still fails fast.
    """
    global _failed_at
    if default_client is not None:
        return default_client
    if _failed_at is not None and time.monotonic() - _failed_at < _RETRY_OPENING_AFTER:
        return None
    try:
        return _client()
    except OutboxError as exc:
        _failed_at = time.monotonic()
        suppressed = _cannot_store.ready()
        if suppressed is not None:
            logging.getLogger("outbox_analytics").error(
                "outbox-analytics: events are not stored (%s): set outbox_path (or $%s) to a"
                " writable place (%d more since the last report)",
                exc, PATH_ENV, suppressed,
            )  # fmt: skip
        return None


def _message_builder() -> Client:
    """A client that builds and checks messages only (Segment's send=False)."""
    return Client(write_key, host=host, send=False)


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


# Turned off for good by the pytest plugin: a test session must never send,
# at its exit, what the application's real runs left in their outbox.
_deliver_at_exit = True


@atexit.register
def _deliver_what_workers_left() -> None:
    """A process that set up the module-level API delivers its outbox's pending events at exit.

    Its multiprocessing workers (fork, forkserver or spawn) may have tracked
    everything while it tracked nothing; their events are in the outbox and
    this is the last process of the job. Registered after the client
    module's exit hook, so it runs before it: the client built here is
    flushed within the same exit budget. Nothing is created: only an outbox
    file that exists is opened.
    """
    if not _deliver_at_exit or default_client is not None or not (write_key and send and upload):
        return
    try:
        path = outbox_path or default_outbox_path(write_key, (host or DEFAULT_HOST).rstrip("/"))
        if os.path.isfile(path):
            _client()
    except Exception:
        logging.getLogger("outbox_analytics").exception(
            "outbox-analytics: could not deliver what worker processes left pending"
        )


def _after_fork_in_child() -> None:
    global _default_client_lock
    # Held by another thread at fork() (building the default client), it
    # would stay held in the child for good.
    _default_client_lock = threading.Lock()


process.on_new_process(_after_fork_in_child)


def _client() -> Client:
    """Build the default client from the module settings on first use."""
    global default_client
    client = default_client
    if client is None:
        with _default_client_lock:
            if default_client is None:
                default_client = _build_default_client()
            client = default_client
    return client


def _build_default_client() -> Client:
    return Client(
        # Under a test capture the module-level API records without a key
        # (README, "Testing code that uses it"); an explicit Client() needs one.
        "" if write_key is None and _client_module._capture is not None else write_key,
        host=host,
        debug=debug,
        max_queue_size=max_queue_size,
        send=send,
        on_error=on_error,
        gzip=gzip,
        max_retries=max_retries,
        sync_mode=sync_mode,
        timeout=timeout,
        log_handler=log_handler,
        oauth_client_id=oauth_client_id,
        oauth_client_key=oauth_client_key,
        oauth_key_id=oauth_key_id,
        oauth_auth_server=oauth_auth_server,
        oauth_scope=oauth_scope,
        outbox_path=outbox_path,
        fsync=fsync,
        upload=upload,
        hand_off_at_exit=hand_off_at_exit,
    )
