"""A Segment-compatible HTTP receiver on 127.0.0.1 whose answers each test scripts."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]  # the JSON body ({} for other bodies)
    raw_length: int
    at: float
    text: str = ""  # the decoded body as text (a form, for instance)

    @property
    def form(self) -> dict[str, str]:
        return {key: values[0] for key, values in parse_qs(self.text).items()}

    @property
    def batch(self) -> list[dict[str, Any]]:
        return self.body.get("batch", [])


@dataclasses.dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: str = '{"success": true}'
    delay: float = 0.0  # seconds to wait before answering
    drop: bool = False  # close the connection without answering


Responder = Callable[[Received], Reply]


class Receiver:
    """Records every request; answers from `script` (in order), then from `responder`."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[Reply] = []
        self.responder: Responder = lambda request: Reply()
        self._lock = threading.Lock()
        self._writing = 0  # answers being written, not yet noted as answered
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what tests read ------------------------------------------------------------

    def accepted(self) -> list[dict[str, Any]]:
        """Messages of the requests answered 2xx, in the order received.

        A client can read its answer before the handler thread has noted it:
        wait (briefly) for answers being written, so a test never races them.
        """
        deadline = time.monotonic() + 2
        while self._writing and time.monotonic() < deadline:
            time.sleep(0.005)
        with self._lock:
            return [m for r, reply in self._answered for m in r.batch if 200 <= reply.status < 300]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            accepted = self.accepted()
            if len(accepted) >= count:
                return accepted
            time.sleep(0.01)
        return self.accepted()

    # -- serving --------------------------------------------------------------------

    _answered: list[tuple[Received, Reply]]

    def _reply_for(self, request: Received) -> Reply:
        with self._lock:
            self.requests.append(request)
            return self.script.pop(0) if self.script else self.responder(request)

    def _record(self, request: Received, reply: Reply) -> None:
        with self._lock:  # noted and no longer "being written", in one step
            self._answered.append((request, reply))
            self._writing -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self
        receiver._answered = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                data = (
                    gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
                )
                is_json = self.headers.get("Content-Type", "").startswith("application/json")
                request = Received(
                    path=self.path,
                    headers=dict(self.headers.items()),
                    body=json.loads(data) if data and is_json else {},
                    raw_length=len(raw),
                    at=time.monotonic(),
                    text=data.decode(errors="replace"),
                )
                reply = receiver._reply_for(request)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    return
                body = reply.body.encode()
                with receiver._lock:
                    receiver._writing += 1
                try:
                    self.send_response_only(reply.status)
                    headers = {"Date": self.date_time_string(), **reply.headers}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    with receiver._lock:
                        receiver._writing -= 1
                    return  # the client gave up waiting (a timeout test): not answered
                receiver._record(request, reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


class SenderSpans:
    """A responder that answers slowly and notes who sent each request, and when.

    `assert_one_at_a_time()` then checks that requests of different senders
    never overlapped: one uploader at a time. Uploaders of one outbox share
    its write key, so senders are told apart by their Content-Encoding: give
    one `gzip=True` and the other not.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.spans: list[tuple[str, float, float]] = []

    def __call__(self, request: Received) -> Reply:
        sender = request.headers.get("Content-Encoding", "plain")
        self.spans.append((sender, request.at, request.at + self.delay))
        return Reply(delay=self.delay)

    def assert_one_at_a_time(self) -> int:
        """Checks the spans; returns how many times the sender changed."""
        spans = sorted(self.spans, key=lambda span: span[1])
        for (key_a, _, end_a), (key_b, start_b, _) in itertools.pairwise(spans):
            assert key_a == key_b or start_b >= end_a - 0.001, (key_a, key_b)
        senders = [key for key, _, _ in spans]
        return sum(1 for a, b in itertools.pairwise(senders) if a != b)
