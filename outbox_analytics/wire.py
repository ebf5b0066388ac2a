"""The HTTP wire under requests: calls that can be cut off, interim answers skipped, bounded reads.

requests bounds each socket read, not a whole call: a server that trickles a
byte a second, or whose body never ends, would hold a request forever, and a
request given up on would keep its thread and socket. Here every connection
a session opens is known to the call using it (`Call`), so that the thread
waiting for the call can shut its sockets at the deadline: the call then
fails at once and its thread is free again.

Two more things requests leaves to us:
- An interim answer (`102 Processing`, `103 Early Hints`) before the final
  one is skipped, as `100 Continue` already is; requests would return it as
  the answer.
- Bodies are read up to `MAX_ANSWER_BYTES`, decompressed within that bound:
  a gzip answer that inflates to gigabytes costs at most that much memory.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import http.client
import socket
import threading
import zlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests

__all__ = ["MAX_ANSWER_BYTES", "Call", "mount_cuttable_adapters", "read_answer"]

# Segment's answers are a few dozen bytes; a token answer, a few kilobytes.
MAX_ANSWER_BYTES = 64 * 1024
_READ_CHUNK = 16 * 1024
# What we can decode within the bound; no brotli or zstd is asked for.
ACCEPT_ENCODING = "gzip, deflate"


class Call:
    """One call on the wire, and the sockets it uses: `cut()` shuts them, from any thread.

    Shutting a socket (not closing it: its descriptor stays with the thread
    using it) wakes a blocked read or write with an error at once. Each
    socket is a duplicate of the connection's, so it can be shut even during
    the TLS handshake, and is closed when the call ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._cut = False

    def watch(self, sock: socket.socket | None) -> None:
        """The call uses `sock`: keep a way to shut it (at once, if cut already)."""
        if sock is None or sock.fileno() < 0:
            return
        handle = sock.dup()
        with self._lock:
            self._sockets.append(handle)
            if self._cut:
                _shut(handle)

    def cut(self) -> None:
        """The deadline passed: every read and write of the call fails now."""
        with self._lock:
            self._cut = True
            for handle in self._sockets:
                _shut(handle)

    @property
    def was_cut(self) -> bool:
        return self._cut

    def end(self) -> None:
        """The call is over: close the duplicates (the connections stay the pool's)."""
        with self._lock:
            for handle in self._sockets:
                handle.close()
            self._sockets.clear()

    # The call a thread is making, for the connections it opens or reuses.
    _current = threading.local()

    def __enter__(self) -> Call:
        Call._current.call = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        Call._current.call = None
        self.end()


def _shut(handle: socket.socket) -> None:
    # Not connected yet, or closed by the peer: nothing left to wake.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(handle, socket.SHUT_RDWR)  # the plain socket's, even under TLS


def _watch_on_this_thread(sock: socket.socket | None) -> None:
    call: Call | None = getattr(Call._current, "call", None)
    if call is not None:
        call.watch(sock)


class _FinalAnswer(http.client.HTTPResponse):
    """Skips interim answers (1xx but 101) before the final one; http.client skips only 100."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not (100 < status < 200) or status == 101:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim answer's headers: not ours


class _WatchedMixin:
    """What our connections add: their sockets are watched by the call using them."""

    response_class: type[http.client.HTTPResponse] = _FinalAnswer
    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        _watch_on_this_thread(sock)  # before any TLS handshake
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch_on_this_thread(self.sock)  # a kept-alive connection, used again
        super().request(*args, **kwargs)  # type: ignore[misc]


@functools.cache
def _watched_pools() -> dict[str, type]:
    """urllib3's pools, opening our connections (made when first needed: urllib3 loads slowly)."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class WatchedHTTPConnection(_WatchedMixin, HTTPConnection):
        pass

    class WatchedHTTPSConnection(_WatchedMixin, HTTPSConnection):
        pass

    class WatchedHTTPPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class WatchedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    return {"http": WatchedHTTPPool, "https": WatchedHTTPSPool}


def mount_cuttable_adapters(session: requests.Session) -> None:
    """Make `session` open only connections that a `Call` can cut (proxied ones included)."""
    import requests.adapters

    class _Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = dict(_watched_pools())

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if hasattr(manager, "pool_classes_by_scheme") and not proxy.startswith("socks"):
                manager.pool_classes_by_scheme = dict(_watched_pools())
            return manager

    session.mount("http://", _Adapter())
    session.mount("https://", _Adapter())


def read_answer(
    response: requests.Response, limit: int = MAX_ANSWER_BYTES
) -> tuple[str, str | None]:
    """The body of a response made with `stream=True`, decoded; and what kept it from being whole.

    At most `limit` bytes are read from the wire and at most `limit` bytes
    come out of each decompression. A body not read to its end is closed
    with its connection, which is not reused. The second value is None for a
    body read whole, or says why it was not ("over 64 KB", "in br coding"...):
    such an answer is no acknowledgement.
    """
    raw = b""
    complete = False
    try:
        while len(raw) <= limit:
            chunk = response.raw.read(_READ_CHUNK, decode_content=False)
            if not chunk:
                complete = True
                break
            raw += chunk
    finally:
        if not complete:
            response.close()
    codings = (response.headers.get("Content-Encoding") or "").lower().split(",")
    body, problem = _decode(raw[:limit], codings, limit)
    if not complete:
        problem = f"over {limit // 1024} KB"
    return _text(body, response.encoding), problem


def _text(body: bytes, charset: str | None) -> str:
    """The body as text in its declared charset; UTF-8 when it names none we know."""
    if body.startswith(codecs.BOM_UTF8):  # whatever the charset says (or requests guessed)
        return body[3:].decode("utf-8", errors="replace")
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset no codec has, named by the server
        return body.decode("utf-8", errors="replace")


def _decode(raw: bytes, codings: list[str], limit: int) -> tuple[bytes, str | None]:
    """The body without its content codings (the last applied first), within `limit` bytes each."""
    body = raw
    for coding in reversed([coding.strip() for coding in codings]):
        if coding in ("", "identity"):
            continue
        if coding not in ("gzip", "x-gzip", "deflate"):
            return f"(a body in {coding[:40]} coding)".encode(), f"in {coding[:40]} coding"
        inflated = _inflate(body, limit)
        if inflated is None:
            return b"(a compressed body that does not decompress)", "that does not decompress"
        body, whole = inflated
        if not whole:
            return body, f"over {limit // 1024} KB decompressed"
    return body, None


def _inflate(data: bytes, limit: int) -> tuple[bytes, bool] | None:
    """gzip, zlib or raw deflate data inflated to at most `limit` bytes, and whether that is all."""
    # 32 + 15: gzip or zlib headers, found by looking; raw deflate is tried after.
    for window in (47, -15):
        inflater = zlib.decompressobj(window)
        try:
            body = inflater.decompress(data, limit)
        except zlib.error:
            continue
        if inflater.unconsumed_tail or inflater.eof or not data:
            return body, not inflater.unconsumed_tail
        return None  # cut short: a corrupt or truncated stream
    return None
