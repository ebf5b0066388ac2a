"""End-to-end delivery: track N events and wait until a local receiver has them all.

    python benchmarks/deliver.py [--events 20000] [--rounds 5] [--drain 1000000]

Ours and segment-analytics-python 2.4.0 in the same run, against the same
receiver (its own process, on 127.0.0.1), with the same upload_size, gzip off
and on; rounds interleaved, medians and ratios printed. Then a restart drain:
a fresh process opens an outbox holding --drain pending rows and delivers
them; we report the time to the first batch sent, events per second and peak RSS.
Needs `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import receiver
from segment.analytics import Client as SegmentClient

from outbox_analytics import Client

PROPERTIES = {"order_id": "50314b8e9bcf", "total": 27.5, "currency": "USD", "items": 3}
_round_numbers = itertools.count()


def wait_received(url: str, target: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while receiver.received(url) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"receiver got {receiver.received(url)} of {target}")
        time.sleep(0.005)


def timed_round(client: Client | SegmentClient, url: str, events: int) -> float:
    """Events per second from the first track() until the receiver has them all."""
    target = receiver.received(url) + events
    start = time.perf_counter()
    for n in range(events):
        client.track("user-1", "Order Completed", {**PROPERTIES, "n": n})
    client.flush()
    wait_received(url, target)
    elapsed = time.perf_counter() - start
    client.shutdown()
    return events / elapsed


def round_ours(url: str, events: int, gzip: bool, work: str) -> float:
    path = os.path.join(work, f"round-{next(_round_numbers)}.db")  # a fresh outbox per round
    client = Client("bench-key", host=url, outbox_path=path, gzip=gzip, upload_size=100)
    return timed_round(client, url, events)


def round_segment(url: str, events: int, gzip: bool) -> float:
    # Its queue is made big enough that it never drops (a drop would be "free").
    queue_size = events * 2
    client = SegmentClient(
        "bench-key", host=url, gzip=gzip, upload_size=100, max_queue_size=queue_size
    )
    return timed_round(client, url, events)


DRAINER = """
import json, sys, time
from outbox_analytics import Client

started = time.perf_counter()
client = Client("bench-key", host=sys.argv[1], outbox_path=sys.argv[2], upload_size=100)
while client.uploader.sent == 0:
    time.sleep(0.001)
first = time.perf_counter() - started
while client.stats().pending:
    client.flush(timeout=60)
total = time.perf_counter() - started
# VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)
with open("/proc/self/status") as status:
    rss_mb = int([l for l in status if l.startswith("VmHWM")][0].split()[1]) / 1024
print(json.dumps({"first_batch_s": first, "total_s": total, "sent": client.uploader.sent,
                  "peak_rss_mb": rss_mb}))
client.shutdown()
"""


def drain(url: str, rows: int, work: str) -> dict[str, float]:
    path = os.path.join(work, "drain.db")
    filler = Client("bench-key", outbox_path=path, upload=False, max_queue_size=rows * 2)
    try:
        done = 0
        while done < rows:
            chunk = min(20_000, rows - done)
            with filler.batch():
                for n in range(done, done + chunk):
                    filler.track("user-1", "Order Completed", {**PROPERTIES, "n": n})
            done += chunk
    finally:
        filler.shutdown()
    out = subprocess.run(
        [sys.executable, "-c", DRAINER, url, path], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drain", type=int, default=1_000_000, help="rows to drain (0: skip)")
    args = parser.parse_args()
    # Every outbox of the run (the drain's holds --drain rows) is under `work`,
    # removed when the run ends, however it ends (an error, Ctrl-C).
    with tempfile.TemporaryDirectory(prefix="outbox-deliver-") as work:
        run(args, work)


def run(args: argparse.Namespace, work: str) -> None:
    receiver_process, url = receiver.start()
    try:
        rates: dict[str, list[float]] = {}
        for round_number in range(args.rounds):
            for gzip in (False, True):
                suffix = "gzip" if gzip else "plain"
                rates.setdefault(f"outbox-analytics ({suffix})", []).append(
                    round_ours(url, args.events, gzip, work)
                )
                rates.setdefault(f"segment 2.4.0 ({suffix})", []).append(
                    round_segment(url, args.events, gzip)
                )
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
        median = {name: statistics.median(values) for name, values in rates.items()}
        print(f"\nend to end, median events/s over {args.rounds} rounds of {args.events}")
        for name, value in median.items():
            print(f"  {name:32} {value:10,.0f}")
        print("\nratios (target >= 1.0x)")
        for suffix in ("plain", "gzip"):
            ratio = median[f"outbox-analytics ({suffix})"] / median[f"segment 2.4.0 ({suffix})"]
            print(f"  ours / segment ({suffix}){'':14} {ratio:6.2f}x")
        if args.drain:
            print(f"\ndraining {args.drain:,} pending rows after a restart ...", file=sys.stderr)
            result = drain(url, args.drain, work)
            print(f"\nrestart drain of {args.drain:,} rows")
            print(f"  time to first batch sent   {result['first_batch_s']:8.3f} s (target < 1 s)")
            print(f"  events per second          {result['sent'] / result['total_s']:8,.0f}")
            print(f"  peak RSS                   {result['peak_rss_mb']:8.1f} MB (target < 100)")
    finally:
        receiver_process.terminate()
        receiver_process.wait()


if __name__ == "__main__":
    main()
