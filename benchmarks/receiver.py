"""A minimal Segment-compatible receiver for benchmarks, run as its own process.

It answers every POST with 200 and counts the messages it received, so that a
peer's background thread does real work without sharing our process's GIL.
Binds 127.0.0.1 only. Prints the port on its first line of stdout.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    received = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        _Handler.received += len(json.loads(body).get("batch", []))
        reply = b'{"success": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    print(server.server_address[1], flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print(f"received {_Handler.received}", file=sys.stderr)


if __name__ == "__main__":
    main()
