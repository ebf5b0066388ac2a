"""track() latency as a web request sees it: beside a CPU-bound thread, and under gevent.

    python benchmarks/latency.py [--requests 400] [--rounds 3]

Each contender runs in a fresh interpreter (the child below): a
ThreadingHTTPServer on 127.0.0.1 whose handler times one `track()` per
request, and one more thread that does pure-Python work the whole time (a
job's computation, a template render). This process sends the requests,
one at a time, and reads the child's latencies at the end. Both clients
upload to the same local receiver (a process of its own).

Why it matters: while the CPU-bound thread runs, a thread that releases the
GIL (a system call, an SQLite step) waits up to the switch interval (5 ms by
default) to get it back. segment-analytics-python's track() only puts the
message on a queue.Queue; ours commits it to SQLite before it returns.

Contenders: ours and Segment's, each with the default switch interval and
with `sys.setswitchinterval(0.0005)` (what a user can do); and ours under
gevent (monkey-patched, the CPU-bound work a greenlet that yields every
millisecond). Medians of rounds; p50 and p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from urllib.request import urlopen

import receiver
from benchlib import HERE

CHILD = r"""
import sys
mode, contender, url, switch = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if mode == "gevent":
    from gevent import monkey
    monkey.patch_all()
import json, os, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.setswitchinterval(switch)
P = {"order_id": "50314b8e9bcf000000000000", "total": 27.5, "currency": "USD",
     "products": [{"sku": "45790-32", "name": "Monopoly", "price": 19.0, "quantity": 1}]}
if contender == "ours":
    from outbox_analytics import Client
    folder = tempfile.mkdtemp()
    client = Client("bench-key", host=url, outbox_path=os.path.join(folder, "o.db"))
else:
    from segment.analytics import Client
    client = Client("bench-key", host=url)
latencies = []
stop = threading.Event()
finished = threading.Event()  # (gevent's, when patched: a blocking read would stop the hub)

def busy():  # pure Python: holds the GIL except when the interpreter hands it over
    while not stop.is_set():
        deadline = time.perf_counter() + 0.001
        while time.perf_counter() < deadline:
            sum(range(100))
        if mode == "gevent":
            import gevent
            gevent.sleep(0)  # a greenlet that never yields would stop every other

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/done":
            body = json.dumps(latencies).encode()
        else:
            started = time.perf_counter()
            client.track("user-8f14e45f", "Order Completed", P)
            latencies.append(time.perf_counter() - started)
            body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.path == "/done":
            finished.set()

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=busy, daemon=True).start()
print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
finished.wait()
time.sleep(0.1)
stop.set()
"""

CASES = [
    ("threads", "ours", 0.005),
    ("threads", "segment", 0.005),
    ("threads", "ours", 0.0005),
    ("threads", "segment", 0.0005),
    ("gevent", "ours", 0.005),
]


def measure(mode: str, contender: str, switch: float, url: str, requests: int) -> list[float]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, contender, url, str(switch)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE,  # not the repository: its package would shadow PYTHONPATH's
    )
    assert child.stdout is not None
    try:
        server = child.stdout.readline().strip()
        for _ in range(requests):
            with urlopen(server + "/track", timeout=30) as answer:
                answer.read()
            time.sleep(0.002)  # requests arrive apart, as a server's do
        with urlopen(server + "/done", timeout=30) as answer:
            latencies: list[float] = json.load(answer)
    finally:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
    return latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures: dict[tuple[str, str, float], list[tuple[float, float]]] = {}
    receiver_process, url = receiver.start()
    try:
        for _ in range(args.rounds):
            for case in CASES:
                latencies = measure(*case, url, args.requests)
                p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
                figures.setdefault(case, []).append((p50 * 1000, p99 * 1000))
    finally:
        receiver_process.kill()
        receiver_process.wait()
    print(f"\ntrack() latency, ms, medians of {args.rounds} rounds of {args.requests} requests")
    for (mode, contender, switch), rounds in figures.items():
        p50 = statistics.median(r[0] for r in rounds)
        p99 = statistics.median(r[1] for r in rounds)
        label = f"{contender:8} {mode:8} switch interval {switch * 1000:g} ms"
        print(f"  {label:44} p50 {p50:7.3f}  p99 {p99:7.3f}")


if __name__ == "__main__":
    main()
