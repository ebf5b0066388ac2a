"""Delivery against servers and programs that behave badly in ordinary ways.

Redirects (never followed: nothing reaches another host, nothing is deleted),
a server that trickles its answer, hostile rate-limit headers, rows stored
while the clock was ahead, callbacks that raise SystemExit, threads racing a
client's first call, the OAuth token request's own proxies, and a process
stopped while its request is on the wire.
"""

from __future__ import annotations

import ctypes
import json
import logging
import random
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tenacity

from outbox_analytics import Client, DeliveryError, RetryableError
from outbox_analytics.delivery.schedule import stored_wait
from outbox_analytics.oauth import _rate_limit_reset
from outbox_analytics.request import MAX_RETRY_AFTER, Requester, parse_retry_after

from .conftest import start_python
from .receiver import Reply, SenderSpans


class AnyHost:
    """A second host that answers 200 to every method: a captive portal, a login page."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes, dict[str, str]]] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                host.requests.append((self.command, self.path, body, dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def other_host() -> Iterator[AnyHost]:
    host = AnyHost()
    yield host
    host.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed_and_deletes_nothing(
    make_client, receiver, other_host: AnyHost, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    location = f"{other_host.url}/login?next=/v1/batch"
    receiver.responder = lambda request: Reply(status, headers={"Location": location})
    errors: list[Exception] = []
    client = make_client(max_retries=1, on_error=lambda exc, messages: errors.append(exc))
    for n in range(3):
        client.track("user", "Redirected", {"n": n})
    result = client.flush(timeout=10)

    assert other_host.requests == []  # no body, no write key, not even a GET
    assert result.pending == 3 and result.sent == 0
    stats = client.stats()
    assert stats.pending == 3 and stats.head_last_status == status
    assert "redirects to" in (stats.head_last_error or "") and location in stats.head_last_error
    assert errors and isinstance(errors[0], RetryableError) and errors[0].status == status
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and "redirects to" in r.getMessage()
    ]
    assert len(lines) == 1  # once per Location, however often it is retried
    assert "test-write-key" not in " ".join(r.getMessage() for r in caplog.records)


def test_a_redirect_that_names_the_write_key_is_logged_without_it(
    make_client, receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.responder = lambda request: Reply(
        302, headers={"Location": "http://127.0.0.1:9/portal?key=test-write-key"}
    )
    client = make_client(max_retries=0)
    client.track("user", "E")
    client.flush(timeout=5)
    text = " ".join(r.getMessage() for r in caplog.records) + str(client.stats())
    assert "redirects to" in text and "test-write-key" not in text


@pytest.fixture
def trickling_server() -> Iterator[str]:
    """Accepts, then answers one byte every 0.2 s, for as long as the client listens."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000:
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


def test_a_trickling_server_costs_one_timeout_not_a_hang(trickling_server: str) -> None:
    requester = Requester("k", trickling_server, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RetryableError, match="no complete answer"):
        requester.send(b'{"batch": []}')
    assert time.monotonic() - started < 3.0  # each read came within 1 s: only a deadline helps


def _request_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "outbox-analytics-request"]


def test_requests_share_one_thread_until_one_outlives_its_deadline(
    receiver, trickling_server: str
) -> None:
    # Another test's late request may still hold (and soon end) a thread of its own.
    before = set(_request_threads())
    requester = Requester("k", receiver.url, timeout=1.0)
    for _ in range(20):
        requester.send(b'{"batch": []}')
    assert len(set(_request_threads()) - before) == 1  # not a thread per request
    requester.url = trickling_server + "/v1/batch"
    with pytest.raises(RetryableError, match="no complete answer"):
        requester.send(b'{"batch": []}')  # that thread stays with the late request
    requester.url = receiver.url + "/v1/batch"
    requester.send(b'{"batch": []}')  # on a new thread, and a new session
    assert len(receiver.requests) == 21
    requester.close()


def test_flush_returns_and_the_uploader_moves_on_past_a_trickling_server(
    trickling_server: str, outbox_file: Path
) -> None:
    client = Client(
        "k", host=trickling_server, outbox_path=str(outbox_file), timeout=0.5, max_retries=1,
        retry_wait=tenacity.wait_fixed(0.01),
    )  # fmt: skip
    client.track("user", "E")
    started = time.monotonic()
    result = client.flush(timeout=20)
    assert time.monotonic() - started < 6.0 and result.pending == 1
    assert client.stats().head_last_error is not None  # recorded as a failed attempt
    client.shutdown(timeout=1)


@pytest.mark.parametrize(
    "value",
    [
        "Fri, 31 Dec 99999 23:59:59 GMT",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Mon, 01 Jan 0001 00:00:00 GMT",
        "1e400",
        "-1e400",
        "nan",
        "inf",
        "99999999999999999999999999",
        "\x00\xff garbage",
        "",
    ],
)
def test_any_rate_limit_header_parses_without_raising(value: str) -> None:
    now = time.time()
    for wait in (parse_retry_after(value, now), _rate_limit_reset(value, now)):
        assert wait is None or 0 < wait <= MAX_RETRY_AFTER


def test_sync_mode_with_an_absurd_retry_after_raises_a_delivery_error_in_time(
    make_client, receiver
) -> None:
    receiver.responder = lambda r: Reply(
        429, headers={"Retry-After": "Fri, 31 Dec 99999 23:59:59 GMT"}
    )
    client = make_client(sync_mode=True, timeout=1, max_retries=3)
    started = time.monotonic()
    with pytest.raises(DeliveryError):
        client.track("user", "E")
    assert time.monotonic() - started < 5
    assert len(receiver.requests) < 20  # backed off, not hammered


def test_a_wall_clock_wait_is_bounded() -> None:
    now = 1_000_000.0
    assert stored_wait(None, now) == 0.0
    assert stored_wait(now - 5, now) == 0.0
    assert stored_wait(now + 5, now) == 5.0
    assert stored_wait(now + 3600, now) == 0.0  # a clock that jumped back: due now


def test_rows_stored_while_the_clock_was_ahead_are_sent_at_once(
    make_client, receiver, outbox_file: Path
) -> None:
    store = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    for n in range(3):
        store.track("user", "From the future", {"n": n})
    store.shutdown()
    ahead = time.time() + 3 * 3600
    with sqlite3.connect(outbox_file) as conn:  # enqueued, and last tried, 3 hours from now
        conn.execute(
            "UPDATE ack_queue_default SET timestamp = ?, next_attempt_at = ?", (ahead, ahead)
        )
    client = make_client(upload_interval=0.2)
    deadline = time.monotonic() + 10
    while len(receiver.accepted()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # no flush: the uploader must see them due on its own
    assert [m["properties"]["n"] for m in receiver.accepted()] == [0, 1, 2]
    assert client.uploader.running


def test_new_events_wake_an_idle_uploader(make_client, receiver) -> None:
    receiver.responder = lambda r: Reply(503)
    client = make_client(max_retries=0, upload_interval=0.05)
    client.track("user", "Fails")
    client.flush(timeout=5)  # the head now backs off
    receiver.responder = lambda r: Reply()
    with sqlite3.connect(client.outbox_path) as conn:  # an operator cleared the backoff
        conn.execute("UPDATE ack_queue_default SET next_attempt_at = NULL")
    client.track("user", "New")
    deadline = time.monotonic() + 3
    while len(receiver.accepted()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [m["event"] for m in receiver.accepted()] == ["Fails", "New"]


def test_an_on_error_that_calls_sys_exit_never_stops_delivery(make_client, receiver) -> None:
    receiver.responder = lambda r: (
        Reply(400) if any(m["event"] == "Poison" for m in r.batch) else Reply()
    )
    calls: list[int] = []

    def leave(exc: Exception, messages: list) -> None:
        calls.append(len(messages))
        sys.exit("a callback that exits")

    client = make_client(on_error=leave)
    client.track("user", "Poison")
    assert client.flush(timeout=10).dead == 1
    for n in range(3):
        client.track("user", "After", {"n": n})
    assert client.flush(timeout=10).sent == 3
    assert calls == [1] and client.uploader.running
    assert [m["properties"]["n"] for m in receiver.accepted()] == [0, 1, 2]


def test_threads_racing_a_clients_first_call_start_one_uploader(make_client, receiver) -> None:
    spans = SenderSpans(delay=0.01)
    receiver.responder = spans
    client = make_client(upload_size=5, upload_interval=0.01)
    start = threading.Barrier(8)

    def first_calls(thread: int) -> None:
        start.wait()
        for n in range(20):
            client.track("user", "Raced", {"thread": thread, "n": n})

    threads = [threading.Thread(target=first_calls, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.flush(timeout=20).pending == 0
    uploaders = [t for t in threading.enumerate() if t.name == "outbox-analytics-uploader"]
    assert len(uploaders) == 1
    spans.assert_one_at_a_time()
    for thread in range(8):  # each thread's events in its own order
        mine = [
            m["properties"]["n"] for m in receiver.accepted() if m["properties"]["thread"] == thread
        ]
        assert mine == list(range(20))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_uploader_thread_is_started_again(make_client, receiver) -> None:
    client = make_client(upload_interval=5)  # it rests long between steps
    client.track("user", "Before")
    assert client.flush(timeout=10).sent == 1
    # The thread dies of an exception raised into it from outside while it
    # rests between steps (nothing of ours lets it die).
    worker = client.uploader.worker
    thread = worker._thread
    deadline = time.monotonic() + 5
    while not worker._idle and time.monotonic() < deadline:
        time.sleep(0.01)
    killed = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit)
    )
    assert killed == 1
    client.uploader.worker.wake()
    thread.join(5)
    assert not thread.is_alive() and not client.uploader.running
    client.track("user", "After")
    assert client.flush(timeout=10).sent == 1
    assert [m["event"] for m in receiver.accepted()] == ["Before", "After"]


def test_the_token_request_uses_the_auth_servers_own_proxies(
    monkeypatch: pytest.MonkeyPatch, outbox_file: Path, key_pem: str
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "auth.internal")
    client = Client(
        "k", host="https://api.internal", outbox_path=str(outbox_file), upload=True,
        oauth_client_id="id", oauth_client_key=key_pem, oauth_key_id="kid",
        oauth_auth_server="https://auth.internal",
    )  # fmt: skip
    requester = client._new_requester()
    assert requester.proxies.get("https") == "http://127.0.0.1:9"  # the API goes through it
    assert requester.token_manager is not None
    assert not requester.token_manager.proxies  # NO_PROXY names the auth server: direct
    client.shutdown(timeout=1)


def test_a_redirect_is_logged_at_error_level(make_client, receiver, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="outbox_analytics")
    receiver.responder = lambda r: Reply(308, headers={"Location": "http://127.0.0.1:9/x"})
    client = make_client(max_retries=0)
    client.track("user", "E")
    client.flush(timeout=5)
    assert any(
        r.levelno == logging.ERROR and "redirects to" in r.getMessage() for r in caplog.records
    )


RESTARTED_SERVICE = """
import sys, time
import outbox_analytics as analytics

analytics.write_key = "test-write-key"
analytics.host = sys.argv[1]
analytics.outbox_path = sys.argv[2]
analytics.stats()  # what the README says starts delivery; no event is tracked
deadline = time.monotonic() + 10
while analytics.stats().pending and time.monotonic() < deadline:
    time.sleep(0.05)
print(analytics.stats().pending, flush=True)
"""


def test_a_restarted_service_sends_what_a_crashed_run_left_on_its_first_call(
    receiver, outbox_file: Path
) -> None:
    earlier = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    for n in range(5):
        earlier.track("user", "Left by a crashed run", {"n": n})
    earlier.shutdown()
    service = start_python(RESTARTED_SERVICE, receiver.url, str(outbox_file))
    out, err = service.communicate(timeout=30)
    assert out.strip() == "0", err
    assert [m["properties"]["n"] for m in receiver.accepted()] == [0, 1, 2, 3, 4]


def test_interrupts_during_tracking_never_start_a_second_uploader(make_client, receiver) -> None:
    """A KeyboardInterrupt can land inside the thread's start; one thread still sends, in order."""
    client = make_client(upload_interval=0.01, upload_size=10)
    armed = [False]

    def interrupt(*_: object) -> None:
        if armed[0]:  # only inside track(): the test's own lines are left alone
            armed[0] = False
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    stored: list[int] = []
    most_threads = 0
    # Other tests' clients (in this xdist worker) may still be running theirs.
    others = {t for t in threading.enumerate() if t.name == "outbox-analytics-uploader"}
    try:
        deadline = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < deadline:
            signal.setitimer(signal.ITIMER_REAL, random.uniform(0, 0.002))
            try:
                armed[0] = True
                if client.track("user", "Interrupted", {"n": n})[0]:
                    stored.append(n)
            except KeyboardInterrupt:
                pass
            finally:
                armed[0] = False
            n += 1
            live = [
                t
                for t in threading.enumerate()
                if t.name == "outbox-analytics-uploader" and t not in others
            ]
            most_threads = max(most_threads, len([t for t in live if t.is_alive()]))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    client.flush(timeout=20)
    sent = [m["properties"]["n"] for m in receiver.accepted()]
    assert sent == sorted(sent)  # one sender at a time: commit order kept
    assert set(stored) <= set(sent)
    assert most_threads <= 2  # at most a superseded one, on its way out


def test_a_sync_call_keeps_its_timeout_against_a_trickling_server(
    trickling_server: str, outbox_file: Path
) -> None:
    client = Client(
        "k", host=trickling_server, outbox_path=str(outbox_file), sync_mode=True, timeout=0.4
    )
    started = time.monotonic()
    with pytest.raises(RetryableError):
        client.track("u", "Trickled")
    assert time.monotonic() - started < 0.7  # not timeout plus the request thread's grace
    client.shutdown(timeout=1)


STOPPED_MID_REQUEST = """
import json, sys
from outbox_analytics import Client

client = Client("test-write-key", host=sys.argv[1], outbox_path=sys.argv[2], timeout=1.0)
with client.batch():  # one request, whenever the uploader wakes
    for n in range(5):
        client.track("u", "Frozen", {"n": n})
result = client.flush(timeout=30)
print(json.dumps({"sent": result.sent, "pending": result.pending, "error": result.last_error}))
client.shutdown()
"""


def test_a_process_stopped_mid_request_reads_the_answer_that_came_meanwhile(
    receiver, tmp_path: Path
) -> None:
    # A Lambda frozen between invocations, or a job stopped with Ctrl-Z: the
    # server answers while the process is stopped, for longer than `timeout`.
    # At thaw, the answer in the socket acknowledges the batch: cutting the
    # call as too slow sent the same events again, thaw after thaw.
    child = None
    stopped = threading.Event()

    def stop_the_sender(request):
        if not stopped.is_set():
            child.send_signal(signal.SIGSTOP)
            stopped.set()
        return Reply()  # at once, into the stopped process's socket

    receiver.responder = stop_the_sender
    child = start_python(STOPPED_MID_REQUEST, receiver.url, str(tmp_path / "outbox.sqlite3"))
    try:
        assert stopped.wait(30)
        time.sleep(2.5)  # stopped for longer than timeout (1 s) and its grace
    finally:
        child.send_signal(signal.SIGCONT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert json.loads(out) == {"sent": 5, "pending": 0, "error": None}
    assert len(receiver.requests) == 1  # sent once
    assert sorted(m["properties"]["n"] for m in receiver.accepted()) == list(range(5))


# How long one sync_mode call against sys.argv[1] takes, with `timeout` set before.
TIMED_SYNC_CALL = """
import json, sys, time
from outbox_analytics import Client, RetryableError

client = Client("test-write-key", host=sys.argv[1], outbox_path=sys.argv[2], sync_mode=True,
                timeout=timeout, max_retries=0)
print("calling", flush=True)
started = time.monotonic()
try:
    client.track("u", "Timed")
except RetryableError:
    pass
print(json.dumps({"took": time.monotonic() - started}), flush=True)
"""

BUSY_UNDER_GEVENT = (
    """
from gevent import monkey
monkey.patch_all()

import time
import gevent

def hog():  # holds the CPU 1.5 s at a time: every step of a wait comes back late
    while True:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            pass
        gevent.sleep(0.01)

gevent.spawn(hog)
gevent.sleep(0.1)
timeout = 1.0
"""
    + TIMED_SYNC_CALL
)


def test_a_busy_process_is_not_taken_for_a_stopped_one(
    trickling_server: str, tmp_path: Path
) -> None:
    # Under gevent, a greenlet holding the CPU makes each step of a wait come
    # back late, as a stopped process does; but the process ran, so the time
    # counts: the request still ends after about `timeout`, not when the hog stops.
    pytest.importorskip("gevent")
    child = start_python(BUSY_UNDER_GEVENT, trickling_server, str(tmp_path / "outbox.sqlite3"))
    try:
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err
    took = json.loads(out.splitlines()[-1])["took"]
    assert took < 10  # timeout plus a burst or two; never the hog's whole life


def test_a_caller_stopped_mid_request_keeps_its_deadline(
    trickling_server: str, tmp_path: Path
) -> None:
    # A caller's deadline (here sync_mode's 5 s) is wall-clock time: stopped
    # for 6 s while a server trickles its answer, the call ends at the thaw,
    # not 5 s of running time later (the background uploader's requests get that).
    child = start_python("timeout = 5.0" + TIMED_SYNC_CALL, trickling_server, str(tmp_path / "o"))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "calling"
        time.sleep(0.5)  # the request is on the wire
        child.send_signal(signal.SIGSTOP)
        time.sleep(6)
    finally:
        child.send_signal(signal.SIGCONT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["took"] < 9  # 6.5 s and a moment: not 6 + 5
