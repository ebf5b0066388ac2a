"""The requester: one HTTP POST of one batch, and what its answer means.

requests' errors and HTTP statuses are translated here, at the boundary, into
the library's own outcomes: success returns, `RetryableError` means "the same
batch may succeed later", `APIError` means "the server rejected these events".
"""

from __future__ import annotations

import base64
import collections
import gzip as gzip_module
import json
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .errors import APIError, RetryableError
from .transport import Reply, Transport
from .utils import display_url, printable
from .version import VERSION
from .wire import ACCEPT_ENCODING, Call, mount_cuttable_adapters, read_answer

# requests (with urllib3, idna, charset_normalizer, certifi) takes about 70 ms
# to import: it is imported where it is used, and by a client that will
# upload (see import_requests), so that a process that never uploads
# (send=False, upload=False, a test capture, a CLI command reading the file)
# does not pay for it.
if TYPE_CHECKING:
    import requests


def import_requests() -> None:
    """Import requests now, on the calling thread: `Client()` does, when it will upload.

    Left to the first request, the import would run on the uploader's thread
    after `Client()` returned: a restart's first batch waited for it (about
    70 ms), and a child forked halfway through would inherit the module's
    import lock held by a thread it does not have, and hang on its first
    `import requests`.
    """
    import requests  # noqa: F401


def _finish_importing_requests() -> None:
    """Before a fork, let an import of requests under way on another thread end.

    `Client()` may be importing it on one thread while another forks: the
    child would inherit the module's import lock held by a thread it does
    not have, and hang on its first `import requests`.
    """
    if "requests" in sys.modules:  # present from the start of its import
        import requests  # noqa: F401 - waits for an import under way, if any


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_finish_importing_requests)


__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_RETRY_AFTER",
    "CallerDeadline",
    "Requester",
    "capped_wait",
    "display_url",
    "encode_batch",
    "join_messages",
    "error_fields",
    "is_retryable_status",
    "not_an_acknowledgement",
    "parse_retry_after",
    "Redactor",
    "redact",
]


class TokenSource(Protocol):
    """What the requester needs from an OAuth token manager."""

    def authorization(self) -> str: ...

    def invalidate(self) -> None: ...


log = logging.getLogger("outbox_analytics")

MAX_BATCH_BYTES = 500_000  # Segment's limit on one request body, as JSON
MAX_RETRY_AFTER = 300.0  # a server may ask us to wait; not for longer than this
# A request's thread gets this much longer than `timeout` before we stop waiting.
_DEADLINE_GRACE = 0.05

# Statuses that say nothing about the events themselves, so that retrying the
# same batch later can succeed. Segment 2.4.0's list (408, 410, 429, 460, 5xx
# but 501 and 505), plus the ones that mean "misconfigured" rather than "bad
# events": a redirect requests would not follow, a wrong write key or token
# (401, 403), a wrong host or path (404), a proxy asking for credentials
# (407). Segment drops the batch on those; dead-lettering every event of a
# job because of a typo in its settings would not serve anyone.
_RETRYABLE_4XX = frozenset({401, 403, 404, 407, 408, 410, 429, 460})
_REJECTING_5XX = frozenset({501, 505})


def is_retryable_status(status: int) -> bool:
    if 300 <= status < 400:
        return True
    if 400 <= status < 500:
        return status in _RETRYABLE_4XX
    return status >= 500 and status not in _REJECTING_5XX


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), capped.

    Returns None when there is no usable value. Pure: `now` is unix time.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
            if when.tzinfo is None:  # "-0000" gives a naive value; it means UTC
                when = when.replace(tzinfo=timezone.utc)
            seconds = when.timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):  # garbage, year 99999...
            return None
    return capped_wait(seconds)


def capped_wait(seconds: float) -> float | None:
    """A server-given wait, at most MAX_RETRY_AFTER; None for NaN, zero or the past."""
    if seconds != seconds or seconds <= 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)


def join_messages(encoded: Sequence[bytes]) -> bytes:
    """Messages, each already JSON (see store.Claimed), as one JSON array."""
    return b"[" + b",".join(encoded) + b"]"


def encode_batch(messages: bytes, sent_at: str, write_key: str) -> bytes:
    """The request body, from the messages already joined by `join_messages`.

    The array is encoded once per batch; only sentAt changes between attempts.
    """
    head = b'{"batch":'
    tail = f',"sentAt":"{sent_at}","writeKey":'.encode() + orjson.dumps(write_key) + b"}"
    return head + messages + tail


class CallerDeadline(RetryableError):
    """The caller's deadline (not `timeout`) cut the request: no failure of the server's."""


class Requester:
    """Sends batches to `{host}/v1/batch` over one requests.Session.

    The Authorization header is Basic with the write key, or a Bearer token
    from `token_manager` (see oauth.py) when one is given; a 401 or 403 then
    makes it forget the token, so the next attempt fetches a new one.
    """

    def __init__(
        self,
        write_key: str,
        host: str,
        *,
        gzip: bool = False,
        timeout: float = 15,
        proxies: dict[str, str] | None = None,
        token_manager: TokenSource | None = None,
        session: requests.Session | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.write_key = write_key
        self.transport = transport  # None: HTTP through requests
        self.url = host.rstrip("/") + "/v1/batch"
        self.gzip = gzip
        self.timeout = timeout
        self.proxies = proxies
        self.verify: bool | str = True
        if session is None:
            session = _new_session()
            self.proxies = proxies_for(self.url, proxies)
            self.verify = _ca_bundle_from_environment() or True
        self.session = session
        self.token_manager = token_manager
        self._poster: _Poster | None = None  # started with the first request
        self._basic = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
        # A server may quote what we sent it (an Authorization header, a key)
        # in its answer: those values are left out of every text made from it.
        self.redactor = Redactor()
        self.redactor.add(write_key, self._basic.split(" ")[1])
        for proxy in (self.proxies or {}).values():
            self.redactor.add_credentials_of(proxy)

    def _proxy(self) -> str | None:
        """The proxy requests takes for our URL, if any (to name it when it fails)."""
        import requests.utils

        proxy = requests.utils.select_proxy(self.url, self.proxies or {})
        if not proxy:
            return None
        # Not requests' prepend_scheme_if_needed: it reads "user:pw@host" as
        # the scheme "user", which display_url would then show.
        return proxy if "://" in proxy else "http://" + proxy

    def authorization(self) -> str:
        if self.token_manager is None:
            return self._basic
        return self.token_manager.authorization()

    def send(
        self,
        body: bytes,
        retry_count: int = 0,
        deadline: float | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> None:
        """POST one batch body. Returns on an acknowledgement; raises RetryableError or APIError.

        `deadline` (monotonic time, for sync_mode) cuts the wait for the answer
        shorter than `timeout` when it comes first. `meanwhile()` runs on the
        calling thread while the request is on its way (it must not raise).
        """
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"outbox-analytics/{VERSION}",
            "Accept-Encoding": ACCEPT_ENCODING,
        }
        if retry_count:
            headers["X-Retry-Count"] = str(retry_count)
        if self.gzip:
            headers["Content-Encoding"] = "gzip"
            body = gzip_module.compress(body, compresslevel=6)
        reply = self._post(body, headers, deadline, meanwhile)
        reply = Reply(reply.status, reply.headers, self.redactor(reply.text))
        if 200 <= reply.status < 300:
            refusal = not_an_acknowledgement(reply)
            if refusal is None:
                return
            raise _report_once(RetryableError(refusal, status=reply.status), self.url)
        if reply.status in (401, 403) and self.token_manager is not None:
            self.token_manager.invalidate()
        raise _error_for(reply, self.url, self.redactor)

    def _post(
        self,
        body: bytes,
        headers: dict[str, str],
        deadline: float | None,
        meanwhile: Callable[[], None] | None = None,
    ) -> Reply:
        """The POST (and the token request before it), with `timeout` as a deadline for all of it.

        requests' timeout bounds each socket read only: a server that trickles
        a byte a second would hold us for good. So the request runs on a
        thread of this requester's, and at the deadline its sockets are shut
        (see wire.py): it fails at once and the thread serves the next one.
        Time the process spends stopped does not count (_wait_while_running).
        """
        if self.transport is not None:
            if meanwhile is not None:
                meanwhile()
            headers["Authorization"] = self.authorization()
            return self.transport.post(self.url, body, headers, self.timeout)
        request = _Request(self.session, body, headers)
        poster = self._poster
        # No thread survives a fork, and an idle poster stands down for one.
        if poster is None or poster.pid != os.getpid() or not poster.submit(request):
            poster = self._poster = _Poster(self._post_with)
            poster.submit(request)
        if meanwhile is not None:
            meanwhile()
        wait = self.timeout + _DEADLINE_GRACE
        callers = deadline is not None and deadline - time.monotonic() < wait
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        if not _wait_while_running(request.done, wait, callers=deadline is not None):
            request.call.cut()
            if not request.done.wait(_CUT_GRACE):
                # Not on a socket (resolving the host name, say): this thread
                # ends once it returns; the next request gets a new one.
                poster.retire()
                self._poster = None
            if callers:
                raise CallerDeadline("the caller's deadline came before an answer")
            raise RetryableError(
                f"no complete answer from {display_url(self.url)} within {self.timeout}s"
                " (a slow server)"
            )
        if request.error is not None:
            raise request.error
        assert request.reply is not None
        return request.reply

    def _post_with(self, request: _Request) -> Reply:
        """On the poster's thread: the token (if any), then the POST; its answer read in bounds."""
        import requests
        import urllib3

        with request.call:
            try:
                request.headers["Authorization"] = self.authorization()
                response = request.session.post(
                    self.url,
                    data=request.body,
                    headers=request.headers,
                    timeout=self.timeout,
                    proxies=self.proxies,
                    verify=self.verify,  # never False: TLS verification stays on
                    # Never: a redirect would turn the POST into a GET whose 2xx
                    # deletes undelivered events, or carry the body and its write
                    # key to another host.
                    allow_redirects=False,
                    stream=True,  # read within bounds by read_answer
                )
                text, problem = read_answer(response)
            except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                # (urllib3's own: reading the body)
                said = self.redactor(_describe(exc, self.url, self._proxy()))
                raise RetryableError(f"request failed: {said}") from exc
            except (OSError, ValueError) as exc:
                # Not requests' own errors, raised before any byte is sent: a
                # CA bundle that is not there, a setting urllib3 refuses. Still a
                # failure to report and retry with backoff, not a crash to loop on.
                text = self.redactor(f"{type(exc).__name__}: {str(exc)[:300]}")
                raise RetryableError(f"request failed: {text}") from exc
        if problem is not None and 200 <= response.status_code < 300:
            error = RetryableError(
                f"HTTP {response.status_code} with an answer {problem}: not an acknowledgement"
                " (the API's are a few bytes of JSON); the events stay pending",
                status=response.status_code,
            )
            raise _report_once(error, problem)
        return Reply(response.status_code, dict(response.headers), text)

    def close(self) -> None:
        if self._poster is not None:
            self._poster.retire()
            self._poster = None
        self.session.close()


class _Request:
    """One POST handed to the poster thread, and what came of it."""

    __slots__ = ("body", "call", "done", "error", "headers", "reply", "session")

    def __init__(self, session: requests.Session, body: bytes, headers: dict[str, str]) -> None:
        self.session, self.body, self.headers = session, body, headers
        self.call = Call()  # its sockets, to shut at the deadline
        self.done = threading.Event()
        self.reply: Reply | None = None
        self.error: BaseException | None = None


class _Poster:
    """A thread that makes a requester's POSTs, one at a time, until retired.

    One thread for all of a requester's requests, not one per request:
    starting a thread per batch took a tenth of a restart drain's time
    (measured with py-spy). A request that outlives its deadline keeps this
    thread only until its sockets are shut; one that is not on a socket then
    (resolving a name) keeps it, and the requester starts another. Before a
    Python fork, an idle
    poster stands down (see delivery/worker.py: Python 3.12+ warns on a fork
    of a process with threads); the next request starts another.
    """

    def __init__(self, post: Callable[[_Request], Reply]) -> None:
        self.jobs: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self.pid = os.getpid()
        self._post = post
        self._lock = threading.Lock()  # submitting, retiring and counting are one at a time
        self._unfinished = 0  # requests submitted and not answered yet
        self._retired = False
        self._thread = threading.Thread(
            target=self._run, name="outbox-analytics-request", daemon=True
        )
        self._thread.start()
        _posters.add(self)

    def submit(self, request: _Request) -> bool:
        """Hand `request` to the thread; False once retired (start another poster)."""
        with self._lock:
            if self._retired:
                return False
            self._unfinished += 1
            self.jobs.put(request)
            return True

    def retire(self) -> None:
        """No more requests: the thread ends after those submitted."""
        with self._lock:
            self._retired = True
            self.jobs.put(None)

    def stand_down(self) -> None:
        """Before a fork: an idle poster retires and its thread ends (waited for briefly)."""
        if self.pid != os.getpid() or not self._lock.acquire(blocking=False):
            return
        try:
            if self._retired or self._unfinished:
                return
            self._retired = True
            self.jobs.put(None)
        finally:
            self._lock.release()
        self._thread.join(_STAND_DOWN_WAIT)

    def _run(self) -> None:
        while True:
            request = self.jobs.get()
            if request is None:
                return
            try:
                request.reply = self._post(request)
            except BaseException as exc:  # handed to the waiting thread
                request.error = exc
            finally:
                with self._lock:
                    self._unfinished -= 1
                request.done.set()


def _wait_while_running(done: threading.Event, seconds: float, callers: bool = False) -> bool:
    """Wait for `done` for up to `seconds` of the time this process runs; whether it is set.

    A process stopped while a request is on the wire (SIGSTOP, Ctrl-Z, a
    Lambda frozen between invocations) finds at thaw that the monotonic
    clock ran on: a plain wait has expired, and cutting the call would throw
    away an answer that may be in the socket already, and send the batch
    again. So the wait goes in short steps, and a step that came back late by
    far while the process hardly used the CPU (it was stopped) is not
    counted: the request gets the rest of its time, and reads what came.
    A step late because the process was busy (a thread or a gevent greenlet
    holding the CPU) counts: the server had that time.

    A caller's deadline (`callers`: flush, drain, sync_mode, the exit budget)
    is the caller's wall clock, and stays so: a stop only leaves the request
    a moment after the thaw to read an answer already there.
    """
    left, grace = seconds, _AFTER_A_STOP
    while left > 0:
        step = min(left, _WAIT_STEP)
        started, cpu_started = time.monotonic(), time.process_time()
        if done.wait(step):
            return True
        late = time.monotonic() - started - step
        stopped = late >= _STOPPED_FOR and time.process_time() - cpu_started < late / 2
        if not stopped:
            left -= step + max(0.0, late)
        elif callers:  # the moment after the thaw, once
            left, grace = max(left - step - late, grace), 0.0
    return done.is_set()


# A step of a wait; one back this much late (and the process idle) means the
# process was stopped: a loaded machine wakes a thread late by milliseconds.
_WAIT_STEP = 1.0
_STOPPED_FOR = 0.5
# What a caller's deadline leaves a request after a stop, to read an answer already there.
_AFTER_A_STOP = 0.2
_posters: weakref.WeakSet[_Poster] = weakref.WeakSet()
_STAND_DOWN_WAIT = 0.05
# How long a request whose sockets were shut at the deadline has to end.
_CUT_GRACE = 0.05


def _stand_down_posters() -> None:
    for poster in list(_posters):
        poster.stand_down()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_stand_down_posters)


def _new_session() -> requests.Session:
    import requests

    session = requests.Session()
    # requests reads proxy and CA settings from the environment on every
    # request (most of a millisecond here); they are read once instead.
    session.trust_env = False
    mount_cuttable_adapters(session)
    return session


def proxies_for(url: str, proxies: dict[str, str] | None) -> dict[str, str]:
    """The proxies for `url`: the environment's (HTTP(S)_PROXY, NO_PROXY), then ours on top."""
    import requests.utils

    return {**requests.utils.get_environ_proxies(url), **(proxies or {})}


def _ca_bundle_from_environment() -> str | None:
    """The CA bundle requests itself would take from the environment."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def _error_for(reply: Reply, url: str, redactor: Redactor) -> RetryableError | APIError:
    status = reply.status
    text = reply.text[:1000]
    if status < 200:
        return RetryableError(f"HTTP {status}: an interim answer, and no final one", status=status)
    if 300 <= status < 400:
        return _redirect(reply, url, redactor)
    code, message = error_fields(text, "code", "message")
    if is_retryable_status(status):
        retry_after = parse_retry_after(_header(reply, "Retry-After"), time.time())
        return RetryableError(
            f"HTTP {status}: {message or text}",
            status=status,
            retry_after=retry_after,
            body=text,
        )
    return APIError(status, code, message or text or f"HTTP {status}", body=text)


def _redirect(reply: Reply, url: str, redactor: Redactor) -> RetryableError:
    """A 3xx: a setting to fix (the host). The events stay pending; it is logged once per target."""
    location = redactor(str(_header(reply, "Location") or "(no Location)")[:300])
    error = RetryableError(
        f"HTTP {reply.status}: {display_url(url)} redirects to {location}; redirects are never"
        " followed (the events stay pending): set host to the API's real address",
        status=reply.status,
    )
    return _report_once(error, location)


def not_an_acknowledgement(reply: Reply) -> str | None:
    """Why a 2xx answer does not acknowledge the batch; None when it does.

    Segment answers `{"success": true}`, RudderStack `OK`, other receivers
    nothing at all: each is an acknowledgement. An HTML document is not (a
    proxy's block page, a captive portal, a web site's catch-all route), nor
    a JSON object whose `success` is false: the events stay pending, and the
    setting to fix is named, as for a redirect.
    """
    text = reply.text.lstrip("\ufeff").strip()  # (a byte order mark before the page)
    # By the body, not Content-Type: a small Flask receiver answers "OK" as text/html.
    if text[:1] == "<":
        return (
            f"HTTP {reply.status} with an HTML page, not an acknowledgement (a proxy's block"
            " page, a captive portal or a web site answered, not the API): the events stay"
            " pending; check host and the network's proxy"
        )
    if text[:1] == "{":
        try:
            payload = json.loads(text)
        except ValueError:
            return None
        if isinstance(payload, dict) and _says_no(payload.get("success", True)):
            said = str(payload.get("message") or payload.get("error") or "")[:200]
            return (
                f"HTTP {reply.status} with success false{f' ({said})' if said else ''}: not"
                " an acknowledgement; the events stay pending"
            )
    return None


def _says_no(success: Any) -> bool:
    """`success` false, however a receiver spells it: false, 0, null, "false", "0"."""
    if isinstance(success, str):
        return success.strip().lower() in ("false", "0", "no", "")
    return not success


def _report_once(error: RetryableError, key: str) -> RetryableError:
    """Log a settings error once per process and cause (it comes back on every retry)."""
    if key not in _settings_errors_logged:
        _settings_errors_logged.add(key)
        log.error("%s", printable(str(error)))  # a Location may carry escape sequences
    return error


_settings_errors_logged: set[str] = set()


# scheme://user:password@ in any text (a proxy's URL in requests' words, a Location)
_USERINFO = re.compile(r"(?<=://)[^/\s@]*@")


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it left out."""
    return _USERINFO.sub("", text)


class Redactor:
    """The secrets a server may quote back to us; `redactor(text)` leaves them out of `text`.

    The write key and its Basic header and proxy credentials, for good; OAuth
    tokens and client assertions as they are made (the latest few: older ones
    expired long ago). A 401 that quotes the Authorization header, a token
    server that quotes the assertion it refused, must not put them in a log
    line, an error or the outbox file.
    """

    def __init__(self) -> None:
        self._lasting: list[str] = []
        self._recent: collections.deque[str] = collections.deque(maxlen=16)

    def add(self, *values: str) -> None:
        self._lasting.extend(value for value in values if _is_secret_like(value))

    def add_recent(self, value: str) -> None:
        if _is_secret_like(value):
            self._recent.append(value)

    def add_credentials_of(self, url: str) -> None:
        """A proxy's `user:password@`: as written, decoded, and as its Basic header.

        Up to the URL's last "@" (no host holds one), not as a URL parser reads
        it: a "#", "/" or "?" that a password should have escaped ends the
        parser's netloc early, and its error then quotes the piece before it.
        """
        userinfo = url.split("://", 1)[-1].rpartition("@")[0]  # (requests allows no scheme)
        if not userinfo:
            return
        for written in {userinfo, re.split(r"[/?#]", userinfo, maxsplit=1)[0]}:
            plain = urllib.parse.unquote(written)
            self.add(written, plain, base64.b64encode(plain.encode()).decode())
            self.add(*plain.split(":", 1))

    def __call__(self, text: str) -> str:
        for secret in [*self._lasting, *self._recent]:
            if secret in text:
                text = text.replace(secret, "<redacted>")
        return redact(text)


def _is_secret_like(value: str) -> bool:
    return len(value) >= 4  # not "", nor a user called "a" whose every letter would go


def _header(reply: Reply, name: str) -> str | None:
    """A header of the reply, whatever the case of its name."""
    wanted = name.lower()
    return next((value for key, value in reply.headers.items() if key.lower() == wanted), None)


def error_fields(text: str, code_key: str, message_key: str) -> tuple[str, str]:
    """A JSON error body's code and message ("unknown", "" when it has none).

    Segment answers {"code", "message"}; OAuth servers {"error", "error_description"}.
    """
    try:
        payload: Any = json.loads(text)
    except ValueError:
        return "unknown", ""
    if not isinstance(payload, dict):
        return "unknown", ""
    return str(payload.get(code_key, "unknown")), str(payload.get(message_key, ""))


def _describe(exc: Exception, url: str, proxy: str | None = None) -> str:
    """What went wrong, in a few words an operator can act on (requests' own are long chains)."""
    import requests

    shown = proxy and display_url(proxy)
    said = _describe_in_full(exc, display_url(url), shown)
    named = (requests.exceptions.ProxyError, requests.exceptions.InvalidURL)  # (said there)
    if shown and not isinstance(exc, named):
        said += f" (through the proxy {shown})"  # a hanging proxy looks like a slow server
    return redact(said)


def _describe_in_full(exc: Exception, where: str, proxy: str | None) -> str:
    import requests

    if isinstance(exc, requests.exceptions.InvalidURL):
        return (
            "the URL of the host or of a proxy cannot be parsed (a proxy's URL needs its"
            " scheme, as http://host:port, and a '#', '/', '?' or '@' in its user or password"
            f" percent-encoded, as %23, %2F, %3F, %40): {exc}"
        )
    if isinstance(exc, requests.exceptions.InvalidHeader):
        # Its words quote the header's value: the write key or a token.
        return "a header was refused, ours or the answer's (its value is not shown)"
    cause = _os_error_under(exc)
    if isinstance(exc, requests.exceptions.ProxyError):  # first: its cause is the proxy's
        named = f" {proxy}" if proxy else ""
        return f"the proxy{named} for {where} failed ({_proxy_failure(exc, cause)})"
    if isinstance(cause, ConnectionRefusedError):
        return f"connection refused by {where}"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the host of {where} ({cause.strerror})"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS failed with {where}: {str(exc)[:200]}"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"timed out connecting to {where}"
    if isinstance(exc, requests.Timeout):
        return f"timed out waiting for {where} to answer"
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror.lower()} ({where})"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _proxy_failure(exc: Exception, cause: OSError | None) -> str:
    """Why a proxy failed: the system's error, or its answer to an HTTPS tunnel's CONNECT."""
    if cause is not None and cause.strerror:
        return cause.strerror.lower()
    tunnel = re.search(r"Tunnel connection failed: (\d{3}[\w ]*)", str(exc))
    if tunnel:
        said = tunnel.group(1).strip()
        check = "; check its user and password" if said.startswith("407") else ""
        return f"it answered {said} to the tunnel's CONNECT{check}"
    return str(exc)[:200]


def _os_error_under(exc: BaseException) -> OSError | None:
    """The operating system's error at the root of requests' and urllib3's wrappers, if any."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current  # (requests' and urllib3's own errors carry no errno)
        todo.extend([current.__cause__, current.__context__, getattr(current, "reason", None)])
        todo.extend(current.args)
    return None
