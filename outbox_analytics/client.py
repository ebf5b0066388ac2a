"""The Client: Segment's API, with every event committed to the outbox before return.

A client is its options (`config.ClientConfig`), a message builder for each
of the six calls (`messages`), and the sink its messages go to, chosen when
it is made (`sinks`): the outbox with its uploader, nowhere, or a test's
capture. What happens at exit is `exit_delivery`'s.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import numbers
import operator
import os
import time
import typing
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec

from . import exit_delivery, messages
from .config import DEFAULT_HOST, KILL_SWITCH_ENV, ClientConfig, kill_switch_on, option_names
from .delivery import FlushResult, Uploader
from .errors import OutboxUnavailable
from .exit_delivery import EXIT_BUDGET
from .messages import MAX_MESSAGE_BYTES, validate_message
from .request import Requester, import_requests, proxies_for
from .segment_compat import ConsumerView, QueueView
from .sinks import Discard, OutboxSink, Sink, Stranded, captures
from .store import PATH_ENV, Outbox, OutboxStats, default_outbox_path, fallback_outbox_path
from .store.files import make_own_directory
from .utils import clean

__all__ = [
    "Client",
    "ClientConfig",
    "DEFAULT_HOST",
    "EXIT_BUDGET",
    "KILL_SWITCH_ENV",
    "MAX_MESSAGE_BYTES",
    "kill_switch_on",
    "validate_message",
]

log = logging.getLogger("outbox_analytics")
_debug_handler: logging.Handler | None = None

P = ParamSpec("P")
Message = dict[str, Any]


def takes_options(
    config: Callable[P, ClientConfig],
) -> Callable[[Callable[..., None]], Callable[Concatenate[Client, P], None]]:
    """Give `Client.__init__` the options of `ClientConfig` as its own parameters.

    Written once, in ClientConfig: type checkers see each parameter
    (ParamSpec), and `inspect.signature()` and `help()` show them.
    """

    def give(init: Callable[..., None]) -> Callable[Concatenate[Client, P], None]:
        options = list(inspect.signature(config).parameters.values())
        self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        init.__signature__ = inspect.Signature([self, *options], return_annotation=None)  # type: ignore[attr-defined]
        init.__annotations__ = {**typing.get_type_hints(config), "return": None}
        return init

    return give


def sends(build: Callable[P, Message]) -> Callable[Concatenate[Client, P], tuple[bool, Message]]:
    """A Client method made of a message builder: build (raising at the caller's line), then keep.

    The method has the builder's parameters, for type checkers (ParamSpec),
    `inspect.signature()` and `help()` alike, and returns (kept, message).
    """

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> tuple[bool, Message]:
        return self._enqueue(build(*args, **kwargs))

    name = build.__name__
    method.__name__, method.__qualname__ = name, f"Client.{name}"
    method.__doc__ = f"{build.__doc__}\n\nReturns (whether it was stored, the message)."
    built = inspect.signature(build)
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = [self, *built.parameters.values()]
    method.__signature__ = built.replace(  # type: ignore[attr-defined]
        parameters=parameters, return_annotation=tuple[bool, Message]
    )
    method.__annotations__ = {**typing.get_type_hints(build), "return": tuple[bool, Message]}
    return method


class Client:
    """A Segment-compatible analytics client backed by a durable SQLite outbox.

    Its options are `ClientConfig`'s: every option of segment-analytics-python
    2.4.0's Client, with the same default, then ours. They are read as
    `client.config.<name>` (and, as in Segment, `client.<name>`).
    """

    DefaultConfig = ClientConfig  # Segment's name: its class attributes are the defaults
    log = log

    @takes_options(ClientConfig)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.config = config = ClientConfig(*args, **kwargs)
        # A bad key fails here, at the call, not later in the uploader's thread.
        self._oauth_key = config.oauth_key
        self.disabled = kill_switch_on()  # (read once: the sink is chosen now)
        self.dropped_by_before_send = 0  # events before_send dropped or failed on
        _configure_logging(config.debug, config.log_handler)
        self.outbox: Outbox | None = None
        self.uploader: Uploader | None = None
        self.sink: Sink = self._choose_sink()

    @property
    def write_key(self) -> str:
        """The write key ("" under the kill switch when none was given)."""
        return self.config.write_key or ""

    @property
    def outbox_path(self) -> str | None:
        """The outbox file's absolute path, symlinks resolved; None when nothing is stored."""
        return None if self.outbox is None else self.outbox.path

    def _choose_sink(self) -> Sink:
        """Where this client's messages go, for good (a test capture re-points it while on).

        send=False keeps Segment's meaning: build and check, keep nothing. The
        kill switch does the same. A client given a transport and its own file
        is a test double already: a capture leaves it alone; any other
        client made during a capture opens no file (it would use, and drain,
        the application's real outbox).
        """
        config = self.config
        if not config.send:
            return Discard()
        test_double = config.transport is not None and config.outbox_path is not None
        if self.disabled:
            home: Sink = Discard()
        elif captures.current is not None and not test_double:
            home = Stranded()
        else:
            home = self._open_outbox()
        return home if test_double else captures.enroll(self, home)

    def _open_outbox(self) -> OutboxSink:
        """The outbox (bound to this key and host), and its uploader unless upload=False."""
        config = self.config
        if config.outbox_path is None:
            outbox = self._open_default_outbox(config.fsync, config.max_queue_size)
        else:
            outbox = Outbox(
                config.outbox_path, fsync=config.fsync, max_pending=config.max_queue_size
            )
        self.outbox = outbox
        exit_delivery.keep_count_of_drops()
        # One file, one key and host: never send another app's events.
        outbox.bind(self.write_key, config.host if config.upload else None)
        # Rows a dead uploader left in flight are pending again; a live
        # uploader's rows (the lease is held) are left alone.
        lease = outbox.try_lease()
        if lease is not None:
            lease.close()
        if config.upload:
            self.uploader = self._start_uploader(outbox)
        return OutboxSink(outbox, self.uploader, sync_mode=config.sync_mode, timeout=config.timeout)

    def _start_uploader(self, outbox: Outbox) -> Uploader:
        config = self.config
        import_requests()
        uploader = Uploader(
            outbox,
            self._new_requester,
            upload_size=config.upload_size,
            upload_interval=config.upload_interval,
            max_retries=config.max_retries,
            retry_wait=config.retry_wait,
            max_total_backoff_duration=config.max_total_backoff_duration,
            on_error=config.on_error,
        )
        if not config.sync_mode:
            exit_delivery.enroll(self)
            if outbox.head(1).pending:
                uploader.ensure_running()  # replay what earlier runs left
        return uploader

    def _open_default_outbox(self, fsync: bool, max_pending: int) -> Outbox:
        """The outbox in the state directory; in the per-user fallback one if that cannot be used.

        A job with no home, a read-only root (AWS Lambda) or run as `nobody`
        still keeps its events, with a warning saying where and how to choose.
        `$OUTBOX_ANALYTICS_PATH` is a choice, as `outbox_path` is: not replaced.
        """
        host = str(self.config.host)
        path = default_outbox_path(self.write_key, host)
        if os.environ.get(PATH_ENV):
            return Outbox(path, fsync=fsync, max_pending=max_pending)
        fallback = fallback_outbox_path(self.write_key, host)
        why = "no home directory to keep it in"  # (then the default path is the fallback)
        if path != fallback:
            try:
                return Outbox(path, fsync=fsync, max_pending=max_pending)
            except OutboxUnavailable as exc:
                why = str(exc)
        try:
            make_own_directory(os.path.dirname(fallback))  # (a name anyone may take first)
            outbox = Outbox(fallback, fsync=fsync, max_pending=max_pending)
        except OutboxUnavailable as other:
            raise OutboxUnavailable(
                f"no place for the outbox ({why}; and the fallback, in the temp directory:"
                f" {other}): set outbox_path"
                f" (or ${PATH_ENV}) to a directory this user may write",
                path,
            ) from None
        log.warning(
            "outbox-analytics: cannot keep the outbox in the state directory (%s); using %s"
            " instead: set outbox_path (or $%s) to choose where",
            why, fallback, PATH_ENV,
        )  # fmt: skip
        return outbox

    def _new_requester(self) -> Requester:
        config = self.config
        requester = Requester(
            self.write_key,
            str(config.host),
            gzip=config.gzip,
            timeout=config.timeout,
            proxies=config.proxies,
            transport=config.transport,
        )
        if self._oauth_key is not None:
            from .oauth import TokenManager  # PyJWT: only with OAuth (see config.oauth_key)

            requester.token_manager = TokenManager(
                str(config.oauth_client_id),
                self._oauth_key,
                str(config.oauth_key_id),
                config.oauth_auth_server,
                config.oauth_scope,
                session=requester.session,
                timeout=config.timeout,
                # The auth server's own: NO_PROXY may name it and not the API.
                proxies=proxies_for(
                    config.oauth_auth_server.rstrip("/") + "/token", config.proxies
                ),
                verify=requester.verify,
                redactor=requester.redactor,
            )
        return requester

    # -- the six calls: build the message (messages.py), then keep it ------------------

    identify = sends(messages.identify)
    track = sends(messages.track)
    alias = sends(messages.alias)
    group = sends(messages.group)
    page = sends(messages.page)
    screen = sends(messages.screen)

    def _enqueue(self, msg: Message) -> tuple[bool, Message]:
        """Run before_send, then hand the message to the sink; (kept, the message)."""
        if self.config.before_send is None:
            data = messages.encode(msg)
        else:
            changed = self._before_send(msg)
            if changed is None:
                return False, msg
            msg, data = changed
        return self.sink.put(msg, data), msg

    def _before_send(self, msg: dict[str, Any]) -> tuple[dict[str, Any], bytes] | None:
        """Run the before_send hook: the message it returns, cleaned and encoded.

        None (the event is dropped, counted) if the hook says so, fails, or
        returns something that cannot be sent.
        """
        before_send = self.config.before_send
        assert before_send is not None
        try:
            changed = before_send(msg)
            if changed is None:
                self.dropped_by_before_send += 1
                log.debug("before_send dropped message %s", msg["messageId"])
                return None
            if not isinstance(changed, dict):
                raise TypeError(f"before_send must return a dict or None, not {type(changed)}")
            result: dict[str, Any] = clean(changed)
            return result, messages.encode(result)  # what it returns must fit the limits too
        except Exception:
            self.dropped_by_before_send += 1
            log.exception("before_send failed; message %s dropped", msg.get("messageId"))
            return None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Commit every event of the block (on this thread) in one transaction.

        Much faster for jobs that emit many events. All or nothing: if the
        block raises, or the process dies inside it, none of its events are
        stored. Calls inside the block return (True, msg) once the message is
        valid; it becomes durable when the block ends.
        """
        with self.sink.batch():
            yield

    # -- lifecycle and inspection -------------------------------------------------

    @property
    def queue(self) -> QueueView:
        """Segment's `client.queue`: `qsize()`, `empty()`, `full()`, `maxsize`, of the outbox."""
        return QueueView(self)

    @property
    def consumers(self) -> list[ConsumerView]:
        """Segment's `client.consumers`: the uploader, or none (sync_mode, not sending)."""
        if self.uploader is None or self.config.sync_mode:
            return []
        return [ConsumerView(self)]

    def stats(self) -> OutboxStats | None:
        """Counts of the outbox file (None when send=False, as nothing is stored).

        `dropped` includes events this process failed to write to the file
        and could not count there yet.
        """
        if self.outbox is None:
            return None
        return self.outbox.stats()

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Send what is pending now; return counts of what was sent, dead and left.

        Returns when every event pending at the call is delivered or dead, when
        retries ran out (the server is down: the events stay pending), or when
        `timeout` seconds have passed. Every event is durable either way.
        With no uploader (send=False, upload=False, sync_mode) it returns at
        once; after `join()` or `shutdown()` it sends from the calling thread.
        """
        _require_timeout(timeout)
        if self.uploader is None or self.config.sync_mode:
            return self._nothing_sent()
        return self.uploader.flush(timeout)

    def drain(
        self,
        timeout: float | None = None,
        progress: Callable[[FlushResult], None] | None = None,
    ) -> FlushResult:
        """Send what is pending now on the calling thread, and return counts, like flush().

        For programs that exist to deliver (`outbox-analytics drain`): no
        background thread is needed, `timeout` bounds the whole call (a
        request in flight included), and an interruption (KeyboardInterrupt,
        a signal handler raising) hands the rows in flight back to pending
        before it propagates. `progress`, if given, is called on this thread
        after each batch with the counts so far.
        """
        _require_timeout(timeout)
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be callable, got {progress!r}")
        if self.uploader is None:
            return self._nothing_sent()
        return self.uploader.drain(timeout, progress)

    def _nothing_sent(self) -> FlushResult:
        stats = self.stats()
        left = stats.pending + stats.inflight if stats else 0
        why = "this client does not upload (upload=False)" if left else None
        return FlushResult(0, 0, left, why)

    def join(self, timeout: float | None = None) -> None:
        """Stop uploading after the batch in flight; what is pending stays for the next run."""
        _require_timeout(timeout)
        if self.uploader is not None:
            self.uploader.stop(timeout)

    def shutdown(self, timeout: float | None = None) -> FlushResult:
        """Flush (within `timeout`), stop uploading and close the outbox file."""
        _require_timeout(timeout)
        started = time.monotonic()
        # Keep a little of the budget for the thread to put back what it holds.
        result = self.flush(None if timeout is None else timeout * 0.8)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        self.join(left)
        if self.outbox is not None:
            self.outbox.close()
        return result


def _refuse_change(name: str) -> Callable[[Client, Any], None]:
    def refuse(client: Client, value: Any) -> None:
        raise AttributeError(
            f"client.{name} is read only: a client's options are fixed when it is made"
            f" (see client.config); make a new Client(..., {name}=...)"
        )

    return refuse


# Segment's clients carry their options as attributes: `client.host`,
# `client.send`... Read from the config, never changed after Client(): a
# key or host changed then would send a file's events elsewhere. Typed code
# reads `client.config.<name>` (type checkers do not see these).
for _name in option_names():
    _own = Client.__dict__.get(_name)  # write_key, outbox_path: the client's own reading
    _read = _own.fget if isinstance(_own, property) else operator.attrgetter(f"config.{_name}")
    _doc = _own.__doc__ if isinstance(_own, property) else f"`config.{_name}`, read only."
    setattr(Client, _name, property(_read, _refuse_change(_name), doc=_doc))
del _name, _own, _read, _doc


def _require_timeout(timeout: Any) -> None:
    """flush(), join(), shutdown() and drain(): a wrong timeout fails at the call, not inside."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if timeout is not None and math.isnan(timeout):  # (it compared as no timeout at all)
        raise ValueError("timeout must be a number of seconds or None, got nan")


def _configure_logging(debug: bool, log_handler: logging.Handler | None) -> None:
    """Segment's debug/log_handler behaviour, without stacking handlers per client."""
    global _debug_handler
    if log_handler is not None and log_handler not in log.handlers:
        log.addHandler(log_handler)
    if debug:
        log.setLevel(logging.DEBUG)
        if log_handler is None and _debug_handler is None:
            _debug_handler = logging.StreamHandler()
            log.addHandler(_debug_handler)
