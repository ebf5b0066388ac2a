"""The Client: Segment's API, with every event committed to the outbox before return."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import numbers
import os
import shlex
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import tenacity

from . import handoff, process, servers
from .delivery import DEFAULT_RETRY_WAIT, FlushResult, Uploader
from .errors import OutboxError, OutboxFull, OutboxUnavailable
from .request import Requester, import_requests, proxies_for
from .segment_compat import ConsumerView, QueueView
from .store import (
    DEFAULT_MAX_PENDING,
    PATH_ENV,
    Outbox,
    OutboxStats,
    default_outbox_path,
    encode_message,
    fallback_outbox_path,
)
from .store.files import make_own_directory
from .transport import MemoryTransport, Transport
from .utils import (
    RateLimitedLog,
    clean,
    guess_timezone,
    new_message_id,
    printable,
    require,
    stringify_id,
    utc_now_iso,
)
from .version import VERSION

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = [
    "Client",
    "DEFAULT_HOST",
    "EXIT_BUDGET",
    "MAX_MESSAGE_BYTES",
    "kill_switch_on",
    "validate_message",
]

DEFAULT_HOST = "https://api.segment.io"
MAX_MESSAGE_BYTES = 32 << 10  # Segment's limit on one message as JSON
# JSON (ASCII-escaped, as sent) is at most 7 bytes per stored msgpack byte:
# the worst case is a list of False ("false, " for 1 byte); control characters
# ("\u0001") and None ("null, ") give 6. A payload under an eighth of the
# limit cannot be over it, so the costly JSON measure is only taken for large
# messages.
_SURELY_UNDER_LIMIT = MAX_MESSAGE_BYTES // 8
# At interpreter exit, a client spends at most this long sending what is
# pending; whatever is left stays in the outbox for the next run.
EXIT_BUDGET = servers.EXIT_BUDGET
ID_TYPES = (str, numbers.Number)  # str first: isinstance() stops at the first match
LIBRARY = {"name": "outbox-analytics", "version": VERSION}

log = logging.getLogger("outbox_analytics")
_debug_handler: logging.Handler | None = None


class Client:
    """A Segment-compatible analytics client backed by a durable SQLite outbox.

    Every option of segment-analytics-python 2.4.0's Client is accepted with
    the same default. Ours: `outbox_path` (default: `default_outbox_path()`),
    `fsync` (survive power loss, not only a crash), `upload` (False: store
    only, and let another process, a later run or the CLI send) and
    `retry_wait` (a tenacity wait strategy for retries).
    """

    class DefaultConfig:
        write_key: str | None = None
        host: str | None = None
        on_error: Callable[[Exception, list[dict[str, Any]]], Any] | None = None
        debug = False
        log_handler: logging.Handler | None = None
        send = True
        sync_mode = False
        max_queue_size = DEFAULT_MAX_PENDING
        gzip = False
        timeout: float = 15
        max_retries = 10
        max_total_backoff_duration: float = 43200
        max_rate_limit_duration: float = 1800
        proxies: dict[str, str] | None = None
        thread = 1
        upload_interval = 0.5
        upload_size = 100
        oauth_client_id: str | None = None
        oauth_client_key: str | None = None
        oauth_key_id: str | None = None
        oauth_auth_server = "https://oauth2.segment.io"
        oauth_scope = "tracking_api:write"
        outbox_path: str | None = None
        fsync = False
        upload = True
        retry_wait: Callable[[tenacity.RetryCallState], float] = DEFAULT_RETRY_WAIT
        before_send: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        transport: Transport | None = None
        hand_off_at_exit = False  # Issue 23: the module-level client's is True (see handoff.py)

    log = log

    def __init__(
        self,
        write_key: str | None = DefaultConfig.write_key,
        host: str | None = DefaultConfig.host,
        debug: bool = DefaultConfig.debug,
        max_queue_size: int = DefaultConfig.max_queue_size,
        send: bool = DefaultConfig.send,
        on_error: Callable[[Exception, list[dict[str, Any]]], Any] | None = DefaultConfig.on_error,
        gzip: bool = DefaultConfig.gzip,
        max_retries: int = DefaultConfig.max_retries,
        sync_mode: bool = DefaultConfig.sync_mode,
        timeout: float = DefaultConfig.timeout,
        proxies: dict[str, str] | None = DefaultConfig.proxies,
        thread: int = DefaultConfig.thread,
        upload_size: int = DefaultConfig.upload_size,
        upload_interval: float = DefaultConfig.upload_interval,
        log_handler: logging.Handler | None = DefaultConfig.log_handler,
        oauth_client_id: str | None = DefaultConfig.oauth_client_id,
        oauth_client_key: str | None = DefaultConfig.oauth_client_key,
        oauth_key_id: str | None = DefaultConfig.oauth_key_id,
        oauth_auth_server: str = DefaultConfig.oauth_auth_server,
        oauth_scope: str = DefaultConfig.oauth_scope,
        max_total_backoff_duration: float = DefaultConfig.max_total_backoff_duration,
        max_rate_limit_duration: float = DefaultConfig.max_rate_limit_duration,
        outbox_path: str | os.PathLike[str] | None = DefaultConfig.outbox_path,
        fsync: bool = DefaultConfig.fsync,
        upload: bool = DefaultConfig.upload,
        retry_wait: Callable[[tenacity.RetryCallState], float] = DefaultConfig.retry_wait,
        before_send: Callable[[dict[str, Any]], dict[str, Any] | None]
        | None = DefaultConfig.before_send,
        transport: Transport | None = DefaultConfig.transport,
        hand_off_at_exit: bool = DefaultConfig.hand_off_at_exit,
    ) -> None:
        # The kill switch, and a test capturing events: validate and build
        # messages, store and send nothing, open no file, start no thread.
        self.disabled = kill_switch_on()
        # A client given a transport and its own file is a test double
        # already: a capture leaves its pipeline alone (the README's
        # MemoryTransport recipe). Without a file of its own it would use,
        # and drain, the application's real outbox: it is captured.
        self._test_double = transport is not None and outbox_path is not None
        offline = self.disabled or (_capture is not None and not self._test_double)
        # A test capture waives no argument: Client() without a key raises
        # there as anywhere (Segment's own tests check it). The module-level
        # API under a capture passes "" when no key is set (see __init__).
        if not self.disabled or write_key is not None:
            require("write_key", write_key, str)
        if before_send is not None and not callable(before_send):
            raise TypeError(f"before_send must be callable, got {before_send!r}")
        _require_number("max_queue_size", max_queue_size, minimum=1, integral=True)
        _require_number("max_retries", max_retries, minimum=0, integral=True)
        _require_number("upload_size", upload_size, minimum=1, integral=True)
        _require_number("thread", thread, minimum=1, integral=True)
        _require_number("timeout", timeout, minimum=0)
        if timeout == 0:  # requests refuses it at every request: say so here, once
            raise ValueError("timeout must be a number > 0 (seconds), got 0")
        _require_number("upload_interval", upload_interval, minimum=0)
        _require_number("max_total_backoff_duration", max_total_backoff_duration, minimum=0)
        _require_number("max_rate_limit_duration", max_rate_limit_duration, minimum=0)
        on_error = on_error or None  # Segment's own tests set on_error = False
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be callable, got {on_error!r}")
        host = host or None  # "" means the default, as in Segment
        if host is not None:
            require("host", host, str)
            check_host(host)
        if proxies is not None:
            require("proxies", proxies, dict)
        if outbox_path is not None:
            require("outbox_path", outbox_path, (str, os.PathLike))

        self.write_key: str = write_key or ""  # a str unless offline (checked above)
        self.before_send = before_send
        self.transport = transport
        require("hand_off_at_exit", hand_off_at_exit, bool)
        self.hand_off_at_exit = hand_off_at_exit  # what exit leaves pending: to a sender
        self.dropped_by_before_send = 0  # events before_send dropped or failed on
        self.host = client_host(host)
        self.on_error = on_error
        self.debug = debug
        self.send = send
        self.upload = upload
        self.sync_mode = sync_mode
        self.gzip = gzip
        self.timeout = timeout
        self.proxies = proxies
        self.max_retries = max_retries
        self.max_queue_size = max_queue_size
        self.max_total_backoff_duration = max_total_backoff_duration
        self.max_rate_limit_duration = max_rate_limit_duration
        self.thread = thread  # accepted for compatibility: ordering means one uploader
        self.upload_size = upload_size
        self.upload_interval = upload_interval
        self.oauth_client_id = oauth_client_id
        self.oauth_client_key = oauth_client_key
        self.oauth_key_id = oauth_key_id
        self.oauth_auth_server = _without_credentials("oauth_auth_server", oauth_auth_server)
        self.oauth_scope = oauth_scope
        # A bad key fails here, at the call, not later in the uploader's thread.
        self._oauth_key = _oauth_key(oauth_client_id, oauth_client_key, oauth_key_id)
        self.fsync = fsync
        self._full_warning = RateLimitedLog()
        self._write_error_log = RateLimitedLog()
        self._offline_warning = RateLimitedLog()
        _configure_logging(debug, log_handler)

        # send=False keeps Segment's meaning: validate and build, store nothing.
        self.outbox: Outbox | None = None
        self.outbox_path: str | None = None
        self.uploader: Uploader | None = None
        if send and not offline:
            if outbox_path is None:
                self.outbox = self._open_default_outbox(fsync, max_queue_size)
            else:
                self.outbox = Outbox(outbox_path, fsync=fsync, max_pending=max_queue_size)
            self.outbox_path = self.outbox.path  # absolute, symlinks resolved
            # One file, one key and host: never send another app's events.
            self.outbox.bind(self.write_key, self.host if upload else None)
            # Rows a dead uploader left in flight are pending again; a live
            # uploader's rows (the lease is held) are left alone.
            lease = self.outbox.try_lease()
            if lease is not None:
                lease.close()
        if self.outbox is not None and upload:
            import_requests()
            self.uploader = Uploader(
                self.outbox,
                self._new_requester,
                upload_size=upload_size,
                upload_interval=upload_interval,
                max_retries=max_retries,
                retry_wait=retry_wait,
                max_total_backoff_duration=max_total_backoff_duration,
                on_error=on_error,
            )
            if not sync_mode:
                _clients_to_flush_at_exit.add(self)
                _flush_at_exit_in_pool_workers()
                if self.outbox.head(1).pending:
                    self.uploader.ensure_running()  # replay what earlier runs left

    def _open_default_outbox(self, fsync: bool, max_pending: int) -> Outbox:
        """The outbox in the state directory; in the per-user fallback one if that cannot be used.

        A job with no home, a read-only root (AWS Lambda) or run as `nobody`
        still keeps its events, with a warning saying where and how to choose.
        `$OUTBOX_ANALYTICS_PATH` is a choice, as `outbox_path` is: not replaced.
        """
        path = default_outbox_path(self.write_key, self.host)
        try:
            return Outbox(path, fsync=fsync, max_pending=max_pending)
        except OutboxUnavailable as exc:
            if os.environ.get(PATH_ENV):
                raise
            why = str(exc)
        fallback = fallback_outbox_path(self.write_key, self.host)
        try:
            make_own_directory(os.path.dirname(fallback))  # (a name anyone may take first)
            outbox = Outbox(fallback, fsync=fsync, max_pending=max_pending)
        except OutboxUnavailable as other:
            raise OutboxUnavailable(
                f"no place for the outbox ({why}; nor {other}): set outbox_path"
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
        requester = Requester(
            self.write_key,
            self.host,
            gzip=self.gzip,
            timeout=self.timeout,
            proxies=self.proxies,
            transport=self.transport,
        )
        if self._oauth_key is not None:
            from .oauth import TokenManager  # PyJWT: only with OAuth (see _oauth_key)

            requester.token_manager = TokenManager(
                str(self.oauth_client_id),
                self._oauth_key,
                str(self.oauth_key_id),
                self.oauth_auth_server,
                self.oauth_scope,
                session=requester.session,
                timeout=self.timeout,
                # The auth server's own: NO_PROXY may name it and not the API.
                proxies=proxies_for(self.oauth_auth_server.rstrip("/") + "/token", self.proxies),
                verify=requester.verify,
                redactor=requester.redactor,
            )
        return requester

    # -- the six calls ----------------------------------------------------------

    def identify(
        self,
        user_id: Any = None,
        traits: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Any = None,
        integrations: dict[str, Any] | None = None,
        message_id: Any = None,
    ) -> tuple[bool, dict[str, Any]]:
        traits = traits or {}
        require("user_id or anonymous_id", user_id or anonymous_id, ID_TYPES)
        require("traits", traits, dict)
        msg = {
            "integrations": integrations or {},
            "anonymousId": anonymous_id,
            "timestamp": timestamp,
            "context": context or {},
            "type": "identify",
            "userId": user_id,
            "traits": traits,
            "messageId": message_id,
        }
        return self._enqueue(msg)

    def track(
        self,
        user_id: Any = None,
        event: str | None = None,
        properties: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Any = None,
        integrations: dict[str, Any] | None = None,
        message_id: Any = None,
    ) -> tuple[bool, dict[str, Any]]:
        properties = properties or {}
        require("user_id or anonymous_id", user_id or anonymous_id, ID_TYPES)
        require("properties", properties, dict)
        require("event", event, str)
        msg = {
            "integrations": integrations or {},
            "anonymousId": anonymous_id,
            "properties": properties,
            "timestamp": timestamp,
            "context": context or {},
            "userId": user_id,
            "type": "track",
            "event": event,
            "messageId": message_id,
        }
        return self._enqueue(msg)

    def alias(
        self,
        previous_id: Any = None,
        user_id: Any = None,
        context: dict[str, Any] | None = None,
        timestamp: datetime | None = None,
        integrations: dict[str, Any] | None = None,
        message_id: Any = None,
    ) -> tuple[bool, dict[str, Any]]:
        require("previous_id", previous_id, ID_TYPES)
        require("user_id", user_id, ID_TYPES)
        msg = {
            "integrations": integrations or {},
            "previousId": stringify_id(previous_id),
            "timestamp": timestamp,
            "context": context or {},
            "userId": user_id,
            "type": "alias",
            "messageId": message_id,
        }
        return self._enqueue(msg)

    def group(
        self,
        user_id: Any = None,
        group_id: Any = None,
        traits: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Any = None,
        integrations: dict[str, Any] | None = None,
        message_id: Any = None,
    ) -> tuple[bool, dict[str, Any]]:
        traits = traits or {}
        require("user_id or anonymous_id", user_id or anonymous_id, ID_TYPES)
        require("group_id", group_id, ID_TYPES)
        require("traits", traits, dict)
        msg = {
            "integrations": integrations or {},
            "anonymousId": anonymous_id,
            "timestamp": timestamp,
            "groupId": stringify_id(group_id),
            "context": context or {},
            "userId": user_id,
            "traits": traits,
            "type": "group",
            "messageId": message_id,
        }
        return self._enqueue(msg)

    def page(
        self,
        user_id: Any = None,
        category: str | None = None,
        name: str | None = None,
        properties: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Any = None,
        integrations: dict[str, Any] | None = None,
        message_id: Any = None,
    ) -> tuple[bool, dict[str, Any]]:
        return self._page_or_screen(
            "page", user_id, category, name, properties, context, timestamp,
            anonymous_id, integrations, message_id,
        )  # fmt: skip

    def screen(
        self,
        user_id: Any = None,
        category: str | None = None,
        name: str | None = None,
        properties: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Any = None,
        integrations: dict[str, Any] | None = None,
        message_id: Any = None,
    ) -> tuple[bool, dict[str, Any]]:
        return self._page_or_screen(
            "screen", user_id, category, name, properties, context, timestamp,
            anonymous_id, integrations, message_id,
        )  # fmt: skip

    def _page_or_screen(
        self,
        kind: str,
        user_id: Any,
        category: str | None,
        name: str | None,
        properties: dict[str, Any] | None,
        context: dict[str, Any] | None,
        timestamp: datetime | None,
        anonymous_id: Any,
        integrations: dict[str, Any] | None,
        message_id: Any,
    ) -> tuple[bool, dict[str, Any]]:
        properties = properties or {}
        require("user_id or anonymous_id", user_id or anonymous_id, ID_TYPES)
        require("properties", properties, dict)
        if name:
            require("name", name, str)
        if category:
            require("category", category, str)
        msg = {
            "integrations": integrations or {},
            "anonymousId": anonymous_id,
            "properties": properties,
            "timestamp": timestamp,
            "category": category,
            "context": context or {},
            "userId": user_id,
            "type": kind,
            "name": name,
            "messageId": message_id,
        }
        return self._enqueue(msg)

    # -- storing ----------------------------------------------------------------

    def _enqueue(self, msg: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Validate, complete and clean `msg`, then commit it to the outbox."""
        msg = self._complete(msg)
        if self.before_send is None:
            data = _encode(msg)
        else:
            changed = self._before_send(msg)
            if changed is None:
                return False, msg
            msg, data = changed
        capture = _capture
        if capture is not None and self.send and not self._test_double:
            _record(capture, msg)  # a test is looking: record, store nothing
            return True, msg  # kill switch or not: tests run with it on to stay offline
        if not self.send or self.disabled:
            return True, msg
        if self.outbox is None:
            self._warn_built_offline()
            return False, msg
        try:
            row_id = self.outbox.append(data)
        except OutboxFull:
            self._warn_full()  # counted by the outbox, in the file when it can be
            return False, msg
        except OutboxError as exc:
            if getattr(exc, "reentered", False) and not self.outbox.in_call_here():
                # A signal handler that interrupted this call used the outbox
                # and failed: its error, not ours, and never swallowed here.
                raise
            self._log_write_error(exc)  # counted by the outbox, too
            return False, msg
        if self.uploader is not None:
            if not self.sync_mode:
                self.uploader.ensure_running()
            elif row_id is not None:
                # Raises if not delivered in time; the event stays in the outbox.
                self.uploader.deliver_now(row_id, self.timeout)
        return True, msg

    def _complete(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Complete and clean a message; raise at the call site if it is bad."""
        timestamp = msg["timestamp"]
        if timestamp is None:
            msg["timestamp"] = utc_now_iso()
        else:
            require("timestamp", timestamp, datetime)
            msg["timestamp"] = guess_timezone(timestamp).isoformat(timespec="milliseconds")
        require("integrations", msg["integrations"], dict)
        require("context", msg["context"], dict)

        message_id = msg["messageId"]
        msg["messageId"] = new_message_id() if message_id is None else stringify_id(message_id)
        msg["userId"] = stringify_id(msg.get("userId"))
        msg["anonymousId"] = stringify_id(msg.get("anonymousId"))
        msg = clean(msg)  # a deep copy: the caller's dicts are never modified
        msg["context"]["library"] = dict(LIBRARY)
        return msg

    def _before_send(self, msg: dict[str, Any]) -> tuple[dict[str, Any], bytes] | None:
        """Run the before_send hook: the message it returns, cleaned and encoded.

        None (the event is dropped, counted) if the hook says so, fails, or
        returns something that cannot be sent.
        """
        assert self.before_send is not None
        try:
            changed = self.before_send(msg)
            if changed is None:
                self.dropped_by_before_send += 1
                log.debug("before_send dropped message %s", msg["messageId"])
                return None
            if not isinstance(changed, dict):
                raise TypeError(f"before_send must return a dict or None, not {type(changed)}")
            result: dict[str, Any] = clean(changed)
            return result, _encode(result)  # what it returns must fit the limits too
        except Exception:
            self.dropped_by_before_send += 1
            log.exception("before_send failed; message %s dropped", msg.get("messageId"))
            return None

    def _warn_full(self) -> None:
        suppressed = self._full_warning.ready()
        if suppressed is not None:
            log.warning(
                "outbox is full (%d pending events, max_queue_size); event dropped"
                " (%d more dropped since the last warning): %s",
                self.max_queue_size, suppressed, self.outbox_path,
            )  # fmt: skip

    def _log_write_error(self, exc: OutboxError) -> None:
        suppressed = self._write_error_log.ready()
        if suppressed is not None:
            log.error("event not stored: %s (%d more since the last error)", exc, suppressed)

    def _warn_built_offline(self) -> None:
        suppressed = self._offline_warning.ready()
        if suppressed is not None:
            log.warning(
                "event neither stored nor sent: this client was built while a test capture"
                " was on, and has no outbox; build clients for live tests inside them"
                " (%d more since the last warning)",
                suppressed,
            )

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Commit every event of the block (on this thread) in one transaction.

        Much faster for jobs that emit many events. All or nothing: if the
        block raises, or the process dies inside it, none of its events are
        stored. Calls inside the block return (True, msg) once the message is
        valid; it becomes durable when the block ends.
        """
        # Under a test capture, the block's events are recorded when it ends.
        stored = self.outbox.batch() if self.outbox is not None else contextlib.nullcontext()
        with _captured_batch(), stored:
            yield

    # -- lifecycle and inspection -------------------------------------------------

    @property
    def queue(self) -> QueueView:
        """Segment's `client.queue`: `qsize()`, `empty()`, `full()`, `maxsize`, of the outbox."""
        return QueueView(self)

    @property
    def consumers(self) -> list[ConsumerView]:
        """Segment's `client.consumers`: the uploader, or none (sync_mode, not sending)."""
        if self.uploader is None or self.sync_mode:
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
        if self.uploader is None or self.sync_mode:
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
        return FlushResult(0, 0, stats.pending + stats.inflight if stats else 0)

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

    def _flush_at_exit(self, budget: float) -> None:
        if self.uploader is None or not self.uploader.running:
            return
        started = time.monotonic()
        try:
            # Another live process uploads this file: our events are on disk and
            # it sends them. Waiting for it would only slow every exit (a pool
            # of short-lived workers would pay a second each). The process's
            # own lease counts from the moment it is taken: the thread may not
            # have it in hand yet, and would otherwise be stopped mid-claim,
            # leaving the others' events for the next run.
            outbox = self.outbox
            if outbox is None or outbox.lease_held_here() or outbox.lease_is_free():
                self.uploader.flush(budget)
            if not self.uploader.stop(max(0.0, budget - (time.monotonic() - started))):
                self.uploader.let_go_at_exit()
            if self.hand_off_at_exit:  # Issue 23: what is left goes to a detached sender
                handoff.hand_off(self)
        except Exception:
            log.exception("outbox-analytics: flush at exit failed; events stay in the outbox")

    def _say_what_is_left(self) -> None:
        """At exit: one line for the events the file still holds, unless another process sends them.

        How many, where, why, and the command that sends them now: a job
        whose events all failed used to exit without a word.
        """
        outbox = self.outbox
        if outbox is None or self.uploader is None:
            return
        try:
            stats = outbox.stats()
        except Exception:
            return  # (an error about the file was logged when it happened)
        if not stats.pending or self._another_process_sends(outbox):
            return
        if handoff.handed_off(outbox.path):
            return  # a sender of ours goes on with them, quietly
        why = stats.head_last_error or f"the exit budget ({EXIT_BUDGET:g}s) ran out"
        log.warning(
            "outbox-analytics: %d event(s) not sent yet stay in %s (%s); the next run sends"
            " them, or now: outbox-analytics drain %s",
            stats.pending, outbox.path, printable(why[:300]), shlex.quote(outbox.path),
        )  # fmt: skip

    def _another_process_sends(self, outbox: Outbox) -> bool:
        """Whether a live uploader of another process holds the file's lease.

        Our own thread may be giving the lease back at this very moment (a
        request outlived the exit budget): while it runs, the events are ours
        to report; once it ended, a lease still held is another process's.
        """
        assert self.uploader is not None
        for _ in range(2):
            if self.uploader.running or outbox.lease_held_here():
                return False
            if outbox.lease_is_free():
                return False
            time.sleep(0.05)  # (the lock may be on its way out with our thread)
        return True


_clients_to_flush_at_exit: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Send what can be sent within EXIT_BUDGET (for all clients), never waiting longer.

    The uploader threads are daemons: whatever is still in flight when the
    budget ends stays in the outbox, and the next run sends it.
    """
    deadline = time.monotonic() + EXIT_BUDGET
    clients = list(_clients_to_flush_at_exit)
    for client in clients:
        client._flush_at_exit(max(0.0, deadline - time.monotonic()))
    for client in clients:
        client._say_what_is_left()


# multiprocessing's fork workers leave through os._exit(): atexit never runs
# there, but multiprocessing's own finalizers do. In a forked child, the exit
# flush is registered with them too (once per process).
_forked_child = False
_exit_flush_registered_in: int | None = None


def _flush_at_exit_in_pool_workers() -> None:
    global _exit_flush_registered_in
    if not _forked_child or _exit_flush_registered_in == os.getpid():
        return
    if "multiprocessing.util" not in sys.modules:
        return  # a plain fork: its atexit hooks run as usual, or it chose os._exit
    import multiprocessing.util

    _exit_flush_registered_in = os.getpid()
    multiprocessing.util.Finalize(None, _flush_at_exit, exitpriority=100)


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = True
    if _clients_to_flush_at_exit:  # inherited clients deliver at the worker's exit too
        _flush_at_exit_in_pool_workers()


process.on_new_process(_after_fork_in_child)


MESSAGE_TYPES = ("track", "identify", "page", "screen", "group", "alias")
# What each type needs beyond messageId and timestamp: all of the names in a
# tuple's first item, and one of those in its second (empty: none needed).
_NEEDED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "track": (("event",), ("userId", "anonymousId")),
    "identify": ((), ("userId", "anonymousId")),
    "page": ((), ("userId", "anonymousId")),
    "screen": ((), ("userId", "anonymousId")),
    "group": (("groupId",), ("userId", "anonymousId")),
    "alias": (("previousId", "userId"), ()),
}
_OBJECTS = ("properties", "traits", "context", "integrations")


def validate_message(message: Any) -> dict[str, Any]:
    """A built message (as `export` writes it) checked as a client would have built it.

    Returns it cleaned; raises ValueError saying what is wrong: its type, a
    missing id, event or messageId, a timestamp that is not ISO 8601 with a
    time zone, a field that should be an object, or a size over Segment's limit.
    """
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        raise ValueError(f"type must be one of {', '.join(MESSAGE_TYPES)}, got {kind!r}")
    if not isinstance(message.get("messageId"), str):
        raise ValueError("messageId must be a non-empty text")
    all_of, one_of = _NEEDED[kind]
    a_kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} message"
    for name in ("messageId", *all_of):
        if not _given(message.get(name)):
            raise ValueError(f"{a_kind} needs {name}")
    if one_of and not any(_given(message.get(name)) for name in one_of):
        raise ValueError(f"{a_kind} needs {' or '.join(one_of)}")
    _check_timestamp(message.get("timestamp"))
    for name in _OBJECTS:
        if name in message and not isinstance(message[name], dict):
            raise ValueError(f"{name} must be a JSON object")
    cleaned: dict[str, Any] = clean(message)
    for name in ("userId", "anonymousId", "groupId", "previousId"):
        if name in cleaned:  # ids are text, as the client sends them
            cleaned[name] = stringify_id(cleaned[name])
    size = len(json.dumps(cleaned))
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"{size} bytes of JSON, over the {MAX_MESSAGE_BYTES // 1024} KB limit")
    return cleaned


def client_host(host: str | None) -> str:
    """The host as the client uses, stores and shows it: the default for None, no credentials."""
    return _without_credentials("host", host or DEFAULT_HOST).rstrip("/")


def _without_credentials(name: str, url: str) -> str:
    """`url` without a user:password@ part, which is never sent, stored or shown (Segment's way).

    requests would send it as Basic auth in place of the write key, and it
    would be quoted in every error, log line and the outbox file.
    """
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or "@" not in parts.netloc:
        return url
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    if bare not in _credentials_warned:  # once per process: the CLI and its client both ask
        _credentials_warned.add(bare)
        log.warning(
            "%s carries credentials (user:password@): they are ignored, never sent or shown;"
            " the write key (or OAuth) authenticates",
            name,
        )
    return bare


_credentials_warned: set[str] = set()


def check_host(host: str) -> None:
    """A host that can never work fails here, before it is recorded as the outbox's owner."""
    try:
        parts = urllib.parse.urlsplit(host)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"host is not a valid URL ({exc}): {host!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"host must be an http(s) URL such as {DEFAULT_HOST}, got {host!r}")


def _given(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, str) and value != "") or isinstance(value, numbers.Number)


def _check_timestamp(value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError("timestamp must be an ISO 8601 text")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"timestamp is not ISO 8601: {value!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp has no time zone: {value!r}")


def _encode(msg: dict[str, Any]) -> bytes:
    """The stored form of a message; RuntimeError, as in Segment, if it is over 32 KB."""
    data = encode_message(msg)
    if len(data) > _SURELY_UNDER_LIMIT:
        # Segment's measure: ASCII-escaped JSON, so len() is the byte count.
        size = len(json.dumps(msg))
        if size > MAX_MESSAGE_BYTES:
            raise RuntimeError(
                f"Message exceeds {MAX_MESSAGE_BYTES // 1024}kb limit. ({size} bytes,"
                f" messageId {msg['messageId']})"
            )
    return data


def kill_switch_on() -> bool:
    """Whether $OUTBOX_ANALYTICS_DISABLED turns every client into send=False.

    Not where the pytest plugin set it for the processes its tests start
    (it names its own process): there, its capture decides.
    """
    if os.environ.get(KILL_SWITCH_SETTER_ENV) == str(os.getpid()):
        return False
    return os.environ.get(KILL_SWITCH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


KILL_SWITCH_ENV = "OUTBOX_ANALYTICS_DISABLED"
KILL_SWITCH_SETTER_ENV = "OUTBOX_ANALYTICS_DISABLED_BY_PYTEST"  # the pid of the plugin's process


# Set by outbox_analytics.testing.capture(): every client records its events
# there instead of storing them.
_capture: MemoryTransport | None = None
# Per thread, inside an offline batch() block: its events and the capture
# each goes to, recorded when the block ends, none if it raises (as the
# outbox would store them).
_offline_batch = threading.local()
_Held = list[tuple[MemoryTransport, dict[str, Any]]]


def _record(capture: MemoryTransport, msg: dict[str, Any]) -> None:
    held: _Held | None = getattr(_offline_batch, "held", None)
    if held is None:
        capture.record([msg])
    else:
        held.append((capture, msg))


@contextlib.contextmanager
def _captured_batch() -> Iterator[None]:
    if getattr(_offline_batch, "held", None) is not None:
        yield  # nested: the outermost block decides
        return
    held: _Held = []
    _offline_batch.held = held
    try:
        yield
    finally:
        _offline_batch.held = None
    for capture, msg in held:  # only when the block did not raise
        capture.record([msg])


def _oauth_key(client_id: Any, client_key: Any, key_id: Any) -> RSAPrivateKey | None:
    """The loaded OAuth private key, or None when OAuth is off (none of the three given)."""
    given = {
        "oauth_client_id": client_id,
        "oauth_client_key": client_key,
        "oauth_key_id": key_id,
    }
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise ValueError(f"OAuth needs all three of {sorted(given)}; missing: {missing}")
    require("oauth_client_id", client_id, str)
    require("oauth_key_id", key_id, str)
    require("oauth_client_key", client_key, (str, bytes))
    # Imported only now: PyJWT and cryptography take over 100 ms to import,
    # a cost every process would pay on `import outbox_analytics` otherwise.
    from .oauth import load_private_key

    return load_private_key(client_key)


def _require_timeout(timeout: Any) -> None:
    """flush(), join(), shutdown() and drain(): a wrong timeout fails at the call, not inside."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")


def _require_number(name: str, value: Any, *, minimum: float, integral: bool = False) -> None:
    kind = int if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        wanted = "an integer" if integral else "a number"
        raise ValueError(f"{name} must be {wanted} >= {minimum}, got {value!r}")


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
