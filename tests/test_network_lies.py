"""Servers that lie: answers that never end, gzip bombs, interim answers, 2xx that is no ack.

Each server here is a real socket on 127.0.0.1 scripted byte by byte, since
http.server cannot misbehave the way proxies, portals and broken receivers do.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tenacity

from outbox_analytics import Client, EndpointRejected, RetryableError
from outbox_analytics.request import Requester, not_an_acknowledgement
from outbox_analytics.transport import Reply as TransportReply

from .receiver import Reply

Script = Callable[[socket.socket], None]


class RawServer:
    """Answers each connection with `script(conn)`, after reading the request; counts them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.open = 0  # connections not closed by the client yet
        self.requests = 0
        self.last_request = b""  # the head of the last request read
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.open += 1
        try:
            with conn:
                while self._read_request(conn):
                    with self._lock:
                        self.requests += 1
                    self.script(conn)
        except OSError:
            pass  # the client went away
        finally:
            with self._lock:
                self.open -= 1

    def _read_request(self, conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        self.last_request = head
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(body) < length:
            body += conn.recv(65536)
        return True

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[Script], RawServer]]:
    servers: list[RawServer] = []

    def start(script: Script) -> RawServer:
        servers.append(RawServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def answer(status_line: str, body: bytes = b"", **headers: str) -> Script:
    def script(conn: socket.socket) -> None:
        lines = [f"HTTP/1.1 {status_line}", f"Content-Length: {len(body)}"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    return script


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _request_threads() -> int:
    return sum(t.name == "outbox-analytics-request" for t in threading.enumerate())


def _endless_body(conn: socket.socket) -> None:
    """A 200 whose body never ends: a byte every 50 ms, for as long as anyone listens."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
    while True:
        time.sleep(0.05)
        conn.sendall(b"x")


def test_a_request_cut_at_its_deadline_is_closed_and_its_thread_serves_the_next(
    raw_server,
) -> None:
    server = raw_server(_endless_body)
    requester = Requester("k", server.url, timeout=0.3)
    with pytest.raises(RetryableError, match="no complete answer"):
        requester.send(b'{"batch": []}')  # the thread and the session's pool are made
    threads, descriptors = _request_threads(), _open_descriptors()
    for _ in range(8):
        with pytest.raises(RetryableError, match="no complete answer"):
            requester.send(b'{"batch": []}')
    deadline = time.monotonic() + 2
    while server.open and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.requests == 9
    assert server.open == 0  # every connection was closed, not left reading
    assert _request_threads() == threads  # one thread, the same, not one per attempt
    assert _open_descriptors() <= descriptors
    requester.close()


def _trickled_token(conn: socket.socket) -> None:
    """A token answer that comes a byte every 0.1 s."""
    body = b'{"access_token": "t", "expires_in": 3600}'
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body):
        time.sleep(0.1)
        conn.sendall(bytes([byte]))


def test_the_token_request_is_under_the_requests_deadline(
    raw_server, receiver, key_pem: str, outbox_file: Path
) -> None:
    token_server = raw_server(_trickled_token)
    client = Client(
        "k", host=receiver.url, outbox_path=str(outbox_file), sync_mode=True, timeout=0.5,
        max_retries=0, oauth_client_id="c", oauth_client_key=key_pem, oauth_key_id="k1",
        oauth_auth_server=token_server.url,
    )  # fmt: skip
    started = time.monotonic()
    with pytest.raises(RetryableError):
        client.track("user", "E")
    assert time.monotonic() - started < 2.5  # the trickle lasts 6 s
    started = time.monotonic()
    client.drain(timeout=1)
    assert time.monotonic() - started < 2.5
    assert receiver.requests == []  # no token: no batch went out
    client.shutdown(timeout=1)


def _gzip_bomb(size: int) -> bytes:
    """`size` zero bytes, gzipped (about a thousandth of that), made without holding them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


@pytest.mark.parametrize("status", ["200 OK", "500 Internal Server Error"])
def test_a_gzip_bomb_costs_at_most_the_answer_bound(raw_server, status: str) -> None:
    bomb = _gzip_bomb(64 << 20)  # 64 MB inflated, 64 KB on the wire
    server = raw_server(answer(status, bomb, Content_Encoding="gzip"))
    requester = Requester("k", server.url, timeout=5)
    tracemalloc.start()
    try:
        with contextlib.suppress(RetryableError):
            requester.send(b'{"batch": []}')
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        requester.close()
    assert peak < 4 << 20  # it was 64 MB and more: the whole body, inflated


def test_a_gzip_answer_within_the_bound_is_read(raw_server) -> None:
    body = gzip.compress(json.dumps({"code": "bad", "message": "no such event"}).encode())
    server = raw_server(answer("400 Bad Request", body, Content_Encoding="gzip"))
    requester = Requester("k", server.url, timeout=5)
    with pytest.raises(Exception, match="no such event"):
        requester.send(b'{"batch": []}')
    requester.close()


@pytest.mark.parametrize("interim", ["102 Processing", "103 Early Hints"])
def test_an_interim_answer_before_the_final_one_is_skipped(
    raw_server, outbox_file: Path, interim: str
) -> None:
    final = answer("200 OK", b'{"success": true}')

    def script(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 {interim}\r\nLink: </style.css>; rel=preload\r\n\r\n".encode())
        final(conn)

    server = raw_server(script)
    client = Client("k", host=server.url, outbox_path=str(outbox_file), max_retries=0)
    for n in range(5):
        client.track("user", "E", {"n": n})
    assert client.flush(timeout=10).pending == 0
    stats = client.stats()
    assert stats is not None and stats.dead == 0 and server.requests >= 1
    client.shutdown(timeout=1)


NOT_ACKS = {
    "proxy block page": Reply(
        200, {"Content-Type": "text/html"}, "<html><body>Blocked by policy</body></html>"
    ),
    "a web app's index": Reply(200, {"Content-Type": "text/plain"}, "<!doctype html><h1>Hi"),
    "success false": Reply(200, {"Content-Type": "application/json"}, '{"success": false}'),
    "202 success false": Reply(202, {}, '{"success": false, "message": "quota"}'),
}
ACKS = {
    "segment": Reply(200, {"Content-Type": "application/json"}, '{"success": true}'),
    "empty 200": Reply(200, {}, ""),
    "rudderstack": Reply(200, {"Content-Type": "text/plain; charset=utf-8"}, "OK"),
    "204": Reply(204, {}, ""),
    "json without success": Reply(200, {"Content-Type": "application/json"}, "{}"),
}


@pytest.mark.parametrize("name", list(NOT_ACKS))
def test_a_2xx_that_is_not_an_acknowledgement_keeps_the_events(
    make_client, receiver, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.responder = lambda request: NOT_ACKS[name]
    reports: list[Exception] = []
    client = make_client(max_retries=1, on_error=lambda exc, batch: reports.append(exc))
    for n in range(10):
        client.track("user", "E", {"n": n})
    result = client.flush(timeout=10)
    stats = client.stats()
    assert result.pending == 10 and stats is not None and stats.dead == 0
    assert reports and "not an acknowledgement" in str(reports[0])
    assert "()" not in str(reports[0])  # no empty quote of a message the server did not give
    if name == "202 success false":
        assert "HTTP 202 with success false (quota): not an acknowledgement" in str(reports[0])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len([e for e in errors if "not an acknowledgement" in e]) == 1  # once, not per retry
    receiver.responder = lambda request: Reply()
    assert client.flush(timeout=10).pending == 0  # nothing lost: delivered once it is fixed
    assert len({m["messageId"] for m in receiver.accepted()}) == 10


@pytest.mark.parametrize("name", list(ACKS))
def test_what_receivers_really_answer_is_an_acknowledgement(
    make_client, receiver, name: str
) -> None:
    receiver.responder = lambda request: ACKS[name]
    client = make_client()
    client.track("user", "E")
    assert client.flush(timeout=10).pending == 0


@pytest.mark.parametrize(
    ("headers", "text", "ack"),
    [
        ({}, '{"success": true}', True),
        ({}, "", True),
        ({}, "OK", True),
        ({}, "  <html>", False),
        ({"content-type": "text/html; charset=utf-8"}, "OK", True),  # Flask's "OK"
        ({"content-type": "text/html; charset=utf-8"}, "", True),
        ({"content-type": "text/html"}, "\n<!DOCTYPE html><title>Sign in</title>", False),
        ({}, '{"success": false}', False),
        ({}, '{"success": "false"}', False),  # however a receiver spells it
        ({}, '{"success": 0, "x": 1}', False),
        ({}, '{"success": null}', False),
        ({}, "\ufeff<!DOCTYPE html>", False),  # a byte order mark before the page
        ({}, "[1, 2]", True),
        ({}, "{not json", True),
    ],
)
def test_the_acknowledgement_rule(headers: dict[str, str], text: str, ack: bool) -> None:
    reply = TransportReply(200, headers, text)
    assert (not_an_acknowledgement(reply) is None) is ack


def test_an_answer_cut_at_the_bound_is_not_an_acknowledgement(raw_server) -> None:
    server = raw_server(answer("200 OK", b"x" * (200 * 1024)))
    requester = Requester("k", server.url, timeout=5)
    with pytest.raises(RetryableError, match="64 KB"):
        requester.send(b'{"batch": []}')
    requester.close()


def test_flush_with_a_never_ending_answer_keeps_one_thread(raw_server, outbox_file: Path) -> None:
    server = raw_server(_endless_body)
    client = Client(
        "k", host=server.url, outbox_path=str(outbox_file), timeout=0.2, max_retries=2,
        retry_wait=tenacity.wait_fixed(0.01),
    )  # fmt: skip
    client.track("user", "E")
    client.flush(timeout=3)
    assert _request_threads() <= 1 + 1  # this client's, and one another test may still end
    assert client.stats().pending == 1
    client.shutdown(timeout=1)


def test_a_charset_no_codec_has_is_read_as_utf8(raw_server) -> None:
    body = b'{"code": "bad", "message": "r\xc3\xa9sum\xc3\xa9 refused"}'
    server = raw_server(answer("400 Bad Request", body, Content_Type="text/plain; charset=klingon"))
    requester = Requester("k", server.url, timeout=5)
    with pytest.raises(Exception, match="résumé refused"):
        requester.send(b'{"batch": []}')
    requester.close()


def _problem_details(status: int, title: str) -> str:
    """ASP.NET Core's error body: a fresh traceId in each one."""
    trace = os.urandom(16).hex()
    return json.dumps(
        {"type": "https://tools.ietf.org/html/rfc9110#section-15.5.16", "title": title,
         "status": status, "traceId": f"00-{trace}-{os.urandom(8).hex()}-00"}
    )  # fmt: skip


def _spring_error(status: int, error: str) -> str:
    """Spring Boot's error body: a timestamp to the millisecond in each one."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S") + f".{time.time_ns() % 1000:03d}+00:00"
    return json.dumps({"timestamp": now, "status": status, "error": error, "path": "/v1/batch"})


def _cloudflare_page() -> str:
    ray = os.urandom(8).hex()
    return (
        "<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head>"
        f"<body>Sorry, you have been blocked. Cloudflare Ray ID: {ray}</body></html>"
    )


@pytest.mark.parametrize(
    ("first", "second", "alike"),
    [
        (lambda: _problem_details(415, "Unsupported Media Type"),
         lambda: _problem_details(415, "Unsupported Media Type"), True),
        (lambda: _spring_error(400, "Bad Request"),
         lambda: _spring_error(400, "Bad Request"), True),
        (_cloudflare_page, _cloudflare_page, True),
        (lambda: f"Bad request {os.urandom(6).hex()} at {time.time()}",
         lambda: f"Bad request {os.urandom(6).hex()} at {time.time()}", True),
        (lambda: '{"code": "invalid", "message": "event name too long"}',
         lambda: '{"code": "invalid", "message": "timestamp is not a date"}', False),
        (lambda: '{"code": "invalid"}', lambda: '{"code": "too_large"}', False),
        (lambda: _spring_error(400, "Bad Request"), lambda: _cloudflare_page(), False),
    ],
)  # fmt: skip
def test_rejections_are_alike_by_what_they_mean_not_their_bytes(first, second, alike) -> None:
    from outbox_analytics.delivery.triage import answer_meaning

    one, two = first(), second()
    time.sleep(0.002)
    assert (answer_meaning(one) == answer_meaning(two)) is alike


@pytest.mark.parametrize(
    ("status", "body", "most_requests"),
    [
        (415, lambda: _problem_details(415, "Unsupported Media Type"), 1),  # never split
        (400, _cloudflare_page, 1),  # an HTML page: never split
        (400, lambda: _spring_error(400, "Bad Request"), 2 * 50 - 1),  # split, then judged
    ],
)
def test_a_wrong_host_whose_errors_carry_fresh_ids_keeps_the_backlog_pending(
    make_client, receiver, status: int, body, most_requests: int
) -> None:
    receiver.responder = lambda request: Reply(status, {"Content-Type": "text/html"}, body())
    client = make_client(upload_size=50, max_retries=0)
    with client.batch():
        for n in range(50):
            client.track("u", "Backlog", {"n": n})
    result = client.flush(timeout=20)
    assert (result.dead, result.pending) == (0, 50)
    assert len(receiver.requests) <= most_requests
    receiver.responder = lambda request: Reply()
    assert client.flush(timeout=10).sent == 50


def test_escape_sequences_in_a_servers_answer_reach_no_log_line(
    make_client, receiver, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = '{"message": "\\u001b[2J\\u001b]0;owned\\u0007all good\\r\\u009b1A"}'
    receiver.responder = lambda request: Reply(503, body=hostile)
    client = make_client(max_retries=0)
    client.track("user", "E")
    client.flush(timeout=5)
    logged = [r.getMessage() for r in caplog.records if "all good" in r.getMessage()]
    assert logged and not [t for t in logged if any(c in t for c in "\x1b\x07\r\x9b")]
    assert "\\x1b[2J" in logged[0]  # shown, escaped
    stats = client.stats()
    assert stats is not None and "\x1b[2J" in (stats.head_last_error or "")  # the file: exact


def _gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


BLOCK_PAGE = b"<html><body>Blocked</body></html>"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, b"\xef\xbb\xbf" + BLOCK_PAGE),
        ({"Content-Encoding": "identity, gzip"}, _gzipped(BLOCK_PAGE)),
        ({"Content-Encoding": "gzip, gzip"}, _gzipped(_gzipped(BLOCK_PAGE))),
        ({"Content-Encoding": "br"}, b"\x1b\x20\x00\xf8"),
        ({"Content-Encoding": "gzip"}, _gzipped(BLOCK_PAGE)[:-12] + b"garbage!"),
        ({"Content-Encoding": "gzip, gzip, gzip"}, _gzipped(_gzipped(_gzip_bomb(256 << 20)))),
    ],
    ids=["bom", "identity-gzip", "gzip-twice", "brotli", "corrupt-gzip", "bomb-in-layers"],
)
def test_a_2xx_whose_body_cannot_be_read_whole_is_not_an_acknowledgement(
    raw_server, headers: dict[str, str], body: bytes
) -> None:
    named = {name.replace("-", "_"): value for name, value in headers.items()}
    server = raw_server(answer("200 OK", body, **named))
    requester = Requester("k", server.url, timeout=5)
    with pytest.raises(RetryableError, match="not an acknowledgement"):
        requester.send(b'{"batch": []}')
    requester.close()


@pytest.mark.parametrize(
    ("status", "body"),
    [(400, "<html><body><h1>400 Bad Request</h1><hr>nginx</body></html>"),
     (405, '{"error": "method not allowed"}'), (415, '{"title": "Unsupported Media Type"}')],
)  # fmt: skip
def test_a_lone_event_is_not_dead_lettered_for_an_answer_about_the_endpoint(
    make_client, receiver, status: int, body: str
) -> None:
    receiver.responder = lambda request: Reply(status, body=body)
    client = make_client(sync_mode=True, max_retries=0)
    with pytest.raises(EndpointRejected):
        client.track("user", "E")
    stats = client.stats()
    assert stats is not None and (stats.pending, stats.dead) == (1, 0)


def test_escape_sequences_reach_no_debug_line_either(
    make_client, receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="outbox_analytics")
    receiver.responder = lambda request: Reply(500, body="oops\x1b]0;owned\x07\x1b[2J\rFAKE")
    client = make_client(max_retries=2)
    client.track("user", "E")
    client.flush(timeout=5)
    failed = [r.getMessage() for r in caplog.records if "FAKE" in r.getMessage()]
    assert failed and not [t for t in failed if any(c in t for c in "\x1b\x07\r")]


def test_a_proxy_that_is_down_is_named_as_the_cause(receiver, outbox_file: Path) -> None:
    requester = Requester("k", receiver.url, timeout=5, proxies={"http": "http://127.0.0.1:1"})
    named = r"the proxy http://127\.0\.0\.1:1 for \S+ failed \(connection refused\)"
    with pytest.raises(RetryableError, match=named):
        requester.send(b'{"batch": []}')
    requester.close()


def test_a_proxy_that_never_answers_is_named_with_the_timeout(outbox_file: Path) -> None:
    answered = threading.Event()
    proxy = RawServer(lambda conn: answered.wait(5))  # reads the request, says nothing
    try:
        said = failure_through(proxy.url.replace("://", "://proxyman:Secret123@"))
    finally:
        answered.set()
        proxy.stop.set()
    assert said.endswith(f"(through the proxy {proxy.url})"), said
    assert "Secret123" not in said
    # Written without a scheme, which requests cannot use: the error says so,
    # and its credentials are known secrets too.
    said = failure_through(f"proxyman:Secret123@{proxy.url.removeprefix('http://')}")
    assert "a proxy's URL needs its scheme" in said
    assert "proxyman" not in said and "Secret123" not in said
    scheme_less = Requester("k", "http://api.invalid", proxies={"http": "proxyman:Secret123@h:1"})
    assert scheme_less.redactor("quoted: Secret123") == "quoted: <redacted>"
    scheme_less.close()


def failure_through(proxy: str) -> str:
    """What a request to a host that is not there says, through `proxy`."""
    requester = Requester("k", "http://api.invalid", timeout=1, proxies={"http": proxy})
    try:
        with pytest.raises(RetryableError) as raised:
            requester.send(b'{"batch": []}')
    finally:
        requester.close()
    return str(raised.value)


def test_an_https_proxy_refusing_the_tunnel_says_so(outbox_file: Path) -> None:
    def refuse_connect(conn) -> None:
        conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")

    proxy = RawServer(refuse_connect)
    requester = Requester("k", "https://api.invalid", timeout=5, proxies={"https": proxy.url})
    try:
        with pytest.raises(RetryableError) as raised:
            requester.send(b'{"batch": []}')
    finally:
        requester.close()
        proxy.stop.set()
    assert proxy.last_request.startswith(b"CONNECT api.invalid:443")
    assert str(raised.value) == (
        f"request failed: the proxy {proxy.url} for https://api.invalid failed (it answered"
        " 407 Proxy Authentication Required to the tunnel's CONNECT; check its user and password)"
    )
