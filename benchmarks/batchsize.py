"""Batch size under steady load: events per request while events arrive at a steady rate.

    python benchmarks/batchsize.py [--rates 1000,3000,5000,8000] [--seconds 2] [--rounds 3]

Ours and segment-analytics-python 2.4.0 in the same run, upload_size=100 and
upload_interval=0.5 on both, each sending to a receiver of its own (a process
of its own, on 127.0.0.1). `track()` is called at each rate (paced every 20
events) for --seconds; the requests the receiver got meanwhile (before any
flush, which may send a short last batch) give the events per request.
Rounds interleaved; medians printed. Target: >= 80 (80% of upload_size).
For before and after, run it with PYTHONPATH set to an older tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from urllib.request import urlopen

import receiver
from benchlib import CONTEXT, EVENT, PROPERTIES, USER, at_least, exit_on_signals, stop
from segment.analytics import Client as SegmentClient

from outbox_analytics import Client

UPLOAD_SIZE = 100


def counts(url: str) -> tuple[int, int]:
    """(events received, requests received) so far."""
    with urlopen(f"{url}/stats", timeout=10) as answer:
        stats = json.load(answer)
    return stats["received"], stats["requests"]


def per_request(make_client, rate: float, seconds: float) -> float:
    """Events per request while `rate` events a second are tracked for `seconds`."""
    process, url = receiver.start()
    try:
        client = make_client(url)
        events = int(rate * seconds)
        started = time.perf_counter()
        for n in range(events):
            client.track(USER, EVENT, PROPERTIES, CONTEXT)
            if n % 20 == 19:
                time.sleep(max(0.0, started + (n + 1) / rate - time.perf_counter()))
        received, requests = counts(url)
        client.shutdown()
    finally:
        stop(process)
    return received / requests if requests else 0.0


def ours(work: str, url: str) -> Client:
    path = os.path.join(work, f"{time.monotonic_ns()}.db")  # a fresh outbox each time
    return Client("bench-key", host=url, outbox_path=path, upload_size=UPLOAD_SIZE)


def segment(url: str) -> SegmentClient:
    return SegmentClient("bench-key", host=url, upload_size=UPLOAD_SIZE, max_queue_size=10**6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="1000,3000,5000,8000")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    exit_on_signals()
    rates = [float(rate) for rate in args.rates.split(",")]
    sizes: dict[tuple[str, float], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="outbox-batchsize-") as work:
        clients = {"outbox-analytics": lambda url: ours(work, url), "segment 2.4.0": segment}
        for round_number in range(args.rounds):
            order = list(clients.items())
            for rate in rates:
                for name, make in order if round_number % 2 == 0 else order[::-1]:
                    sizes.setdefault((name, rate), []).append(per_request(make, rate, args.seconds))
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    print(f"\nevents per request, median of {args.rounds} rounds (upload_size {UPLOAD_SIZE})")
    for rate in rates:
        for name in clients:
            median = statistics.median(sizes[(name, rate)])
            at_least(f"{name} at {rate:,.0f} events/s", median, 0.8 * UPLOAD_SIZE, "", 1)


if __name__ == "__main__":
    main()
