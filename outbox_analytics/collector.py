"""A local Segment-compatible receiver, to see what a client delivered and how often.

Point a client's `host` at `Collector().url` and read `counts()`. Segment
deduplicates by messageId silently; this counts duplicates instead, because a
batch retried after a crash may deliver a message twice and that must show.
Standard library only, so that it runs wherever the library does.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import socket
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, cast
from urllib.parse import urlsplit

__all__ = ["MAX_BODY_BYTES", "Collector"]

MAX_BODY_BYTES = 600_000  # uncompressed; Segment's limit is 500 KB, leave clients some slack
_BATCH_PATHS = frozenset({"/v1/batch", "/v1/import"})
_CHUNK = 64 * 1024
_POLL = 0.05  # how often serving checks for stop(); the default 0.5 s slows every test
# Deflate adds at most a few bytes per 64 KB to incompressible data, so a gzip
# body longer than this inflates past the limit too: keep no more of it in memory.
_RAW_LIMIT = MAX_BODY_BYTES + _CHUNK


class _Refused(Exception):
    """A request answered with an error status instead of being accepted."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Collector:
    """Accepts batches on `url` and records their messages; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        out: IO[str] | None = None,
        keep_messages: bool = True,
    ) -> None:
        """`keep_messages=False` keeps only the counts: for long runs (the command line's).

        Either way each messageId is kept as an 8-byte digest, to count
        duplicates in bounded memory (tens of bytes per message; a million
        messages kept whole took 1.6 GB).
        """
        self._out = out
        self._keep = keep_messages
        self._lock = threading.Lock()
        self._messages: list[dict[str, Any]] = []
        self._received = 0
        self._ids: set[int] = set()  # digests of the messageIds seen
        self._without_id = 0  # a message without a messageId cannot be a duplicate
        self._requests = 0
        self._rejected = 0
        self._connections: set[socket.socket] = set()
        self._state = "new"  # then "serving", then "stopped"
        self._thread: threading.Thread | None = None
        self._server = _Server((host, port), self)  # binds now, so `url` is known at once
        bound_host, bound_port = self._server.socket.getsockname()[:2]
        self._url = f"http://{bound_host}:{bound_port}"  # still readable after stop()

    @property
    def url(self) -> str:
        return self._url

    def start(self) -> None:
        """Serve in a daemon thread, so that a forgotten collector never keeps a process alive."""
        self._begin()
        serve = self._server.serve_forever
        self._thread = threading.Thread(target=serve, args=(_POLL,), daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve in this thread until stop() is called from another (or KeyboardInterrupt)."""
        self._begin()
        self._server.serve_forever(_POLL)

    def stop(self) -> None:
        """Stop serving and close every socket, kept-alive connections included. Idempotent."""
        with self._lock:
            was_serving, self._state = self._state == "serving", "stopped"
            connections = list(self._connections)
        if was_serving:  # shutdown() waits for serve_forever, forever if it never ran
            self._server.shutdown()
        self._server.server_close()
        # A client's pooled connection would otherwise still be answered after stop().
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Collector:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def counts(self) -> dict[str, int]:
        with self._lock:
            received, unique = self._received, len(self._ids) + self._without_id
            counts = {"received": received, "unique": unique, "duplicates": received - unique}
            return {**counts, "requests": self._requests, "rejected": self._rejected}

    @property
    def keeps_messages(self) -> bool:
        return self._keep

    def messages(self) -> list[dict[str, Any]]:
        """The messages of accepted batches in arrival order, copied: callers may change them.

        Empty when made with `keep_messages=False`.
        """
        with self._lock:
            snapshot = list(self._messages)
        return copy.deepcopy(snapshot)  # outside the lock: copying must not stall requests

    # -- called by the request handler -------------------------------------------------

    def _begin(self) -> None:
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"collector already {self._state}")
            self._state = "serving"

    def _accept(self, batch: list[dict[str, Any]]) -> None:
        # One lock for counting and writing keeps `out` in the order of messages().
        with self._lock:
            self._requests += 1
            self._received += len(batch)
            for message in batch:
                if self._keep:
                    self._messages.append(message)
                if "messageId" in message:
                    self._ids.add(_digest(message["messageId"]))
                else:
                    self._without_id += 1
            if self._out is not None:
                self._out.writelines(json.dumps(message) + "\n" for message in batch)
                self._out.flush()  # readers tail the file while the collector runs

    def _reject(self) -> None:
        with self._lock:
            self._rejected += 1

    def _track(self, connection: socket.socket, is_open: bool) -> None:
        with self._lock:
            if not is_open:
                self._connections.discard(connection)
            elif self._state == "stopped":  # accepted while stop() ran: close it too
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            else:
                self._connections.add(connection)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not block exit

    def __init__(self, address: tuple[str, int], collector: Collector) -> None:
        self.collector = collector
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-request (the demo does it on purpose) is not an error.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection per session
    disable_nagle_algorithm = True  # headers and body are two writes: don't wait for an ACK

    @property
    def collector(self) -> Collector:
        return cast(_Server, self.server).collector

    def setup(self) -> None:
        super().setup()
        self.collector._track(self.connection, True)

    def finish(self) -> None:
        self.collector._track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one stderr line per request would drown a benchmark's output

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/stats":
            self._reply(200, self.collector.counts())
        elif path == "/messages" and self.collector.keeps_messages:
            self._reply(200, self.collector.messages())
        elif path == "/messages":
            message = "this collector keeps no messages: read its output (--out) instead"
            self._refuse(_Refused(404, "not_kept", message))
        else:
            self._refuse(_Refused(404, "not_found", f"no such path: {path}"))

    def do_POST(self) -> None:
        try:
            batch = self._read_batch()
        except _Refused as refusal:
            self._refuse(refusal)
            return
        self.collector._accept(batch)
        self._reply(200, {"success": True})

    def _read_batch(self) -> list[dict[str, Any]]:
        raw = self._drain()  # read before refusing, or the next request would start mid-body
        path = urlsplit(self.path).path
        if path not in _BATCH_PATHS:
            raise _Refused(404, "not_found", f"no such path: {path}")
        if not _authorized(self.headers.get("Authorization", "")):
            raise _Refused(401, "unauthorized", "Authorization must be Basic or Bearer")
        gzipped = self.headers.get("Content-Encoding", "").strip().lower() == "gzip"
        if gzipped and len(raw) <= _RAW_LIMIT:
            raw = _gunzip(raw)
        if len(raw) > MAX_BODY_BYTES:
            raise _Refused(413, "request_too_large", f"body over {MAX_BODY_BYTES} bytes")
        return _parse_batch(raw)

    def _drain(self) -> bytes:
        """The body, read whole but kept only up to _RAW_LIMIT + 1 bytes (more is refused)."""
        try:
            left = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            left = -1
        if left < 0 or "Transfer-Encoding" in self.headers:  # chunked: not worth supporting
            self.close_connection = True  # where the next request starts is unknown
            raise _Refused(400, "invalid_request", "a body needs a valid Content-Length")
        kept = bytearray()
        while left > 0:
            chunk = self.rfile.read(min(left, _CHUNK))
            if not chunk:
                self.close_connection = True
                raise _Refused(400, "invalid_request", "body shorter than Content-Length")
            left -= len(chunk)
            kept += chunk[: max(0, _RAW_LIMIT + 1 - len(kept))]
        return bytes(kept)

    def _refuse(self, refusal: _Refused) -> None:
        self.collector._reject()
        self._reply(refusal.status, {"code": refusal.code, "message": refusal.message})

    def _reply(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing to answer


def _digest(message_id: Any) -> int:
    """A messageId as 8 bytes: two ids collide once in 10^19 pairs (never, at a million)."""
    text = json.dumps(message_id, sort_keys=True).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def _authorized(header: str) -> bool:
    scheme, _, credentials = header.strip().partition(" ")
    return scheme.lower() in ("basic", "bearer") and bool(credentials.strip())


def _gunzip(raw: bytes) -> bytes:
    """Inflate at most one byte past the limit, so a small gzip bomb cannot fill memory."""
    inflater = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
    try:
        data = inflater.decompress(raw, MAX_BODY_BYTES + 1)
    except zlib.error as exc:
        raise _Refused(400, "invalid_request", f"invalid gzip body: {exc}") from exc
    if len(data) <= MAX_BODY_BYTES and not inflater.eof:
        raise _Refused(400, "invalid_request", "truncated gzip body")
    return data


def _parse_batch(raw: bytes) -> list[dict[str, Any]]:
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
        raise _Refused(400, "invalid_request", f"body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise _Refused(400, "invalid_request", "body must be a JSON object")
    batch = payload.get("batch")
    if not isinstance(batch, list) or not all(isinstance(m, dict) for m in batch):
        raise _Refused(400, "invalid_request", "batch must be a list of objects")
    return batch
