"""A minimal Segment-compatible receiver for benchmarks, run as its own process.

It answers every POST with 200 and counts the messages it received, so that a
peer's background thread does real work without sharing our process's GIL.
Binds 127.0.0.1 only. Prints the port on its first line of stdout.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.request import urlopen

_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    received = 0
    protocol_version = "HTTP/1.1"  # keep-alive, as real collectors do
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def do_GET(self) -> None:
        """GET /count: how many messages have been received so far."""
        self._reply(json.dumps({"received": _Handler.received}).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        count = len(json.loads(body).get("batch", []))
        with _lock:
            _Handler.received += count
        self._reply(b'{"success": true}')

    def _reply(self, reply: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


def start() -> tuple[subprocess.Popen[str], str]:
    """Run the receiver in a process of its own; return it and its base URL."""
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, f"http://127.0.0.1:{process.stdout.readline().strip()}"


def received(url: str) -> int:
    with urlopen(f"{url}/count", timeout=10) as response:
        return int(json.load(response)["received"])


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    print(server.server_address[1], flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print(f"received {_Handler.received}", file=sys.stderr)


if __name__ == "__main__":
    main()
