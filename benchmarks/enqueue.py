"""Enqueue speed: our track() against Segment's and plain persist-queue's, in one run.

    python benchmarks/enqueue.py [--events 5000] [--rounds 7] [--pending 1000000]

Every contender handles the same message. Rounds are interleaved so that
machine noise hits all of them alike; medians and ratios are printed.
Needs `pip install -e ".[bench]"` (segment-analytics-python 2.4.0).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import persistqueue
import persistqueue.serializers.msgpack
import receiver
from segment.analytics import Client as SegmentClient

from outbox_analytics import Client

USER = "user-8f14e45f"
EVENT = "Order Completed"
PROPERTIES = {
    "order_id": "50314b8e9bcf000000000000",
    "total": 27.5,
    "currency": "USD",
    "products": [{"sku": "45790-32", "name": "Monopoly", "price": 19.0, "quantity": 1}],
}
CONTEXT = {"ip": "203.0.113.7", "locale": "en-US"}


def track_with(client: Client | SegmentClient, count: int) -> None:
    for _ in range(count):
        client.track(USER, EVENT, PROPERTIES, CONTEXT)


def rate(run: Callable[[int], None], count: int) -> float:
    start = time.perf_counter()
    run(count)
    return count / (time.perf_counter() - start)


def prefill(path: str, rows: int) -> None:
    client = Client("bench-key", outbox_path=path, upload=False, max_queue_size=rows * 2)
    try:
        done = 0
        while done < rows:
            chunk = min(20_000, rows - done)
            with client.batch():
                track_with(client, chunk)
            done += chunk
    finally:
        client.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=5000, help="events per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pending", type=int, default=1_000_000, help="rows already pending")
    args = parser.parse_args()
    # Everything this run creates (outboxes, persist-queue's folder) is under
    # `work`, removed when the run ends, however it ends (an error, Ctrl-C).
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as work:
        rates = measure(args, work)
    report(args, rates)


def measure(args: argparse.Namespace, work: str) -> dict[str, list[float]]:
    """Rates per contender per round; every client and process is closed on the way out."""
    n = args.events
    cap = (args.pending + n * args.rounds) * 2
    with contextlib.ExitStack() as cleanup:
        receiver_process, url = receiver.start()
        cleanup.callback(stop, receiver_process)
        ours = Client(
            "bench-key", outbox_path=f"{work}/default.db", upload=False, max_queue_size=cap
        )
        cleanup.callback(ours.shutdown)
        durable = Client("bench-key", outbox_path=f"{work}/fsync.db", fsync=True, upload=False)
        cleanup.callback(durable.shutdown)
        batched = Client(
            "bench-key", outbox_path=f"{work}/batch.db", upload=False, max_queue_size=cap
        )
        cleanup.callback(batched.shutdown)
        print(f"prefilling {args.pending} rows ...", file=sys.stderr)
        prefill(f"{work}/full.db", args.pending)
        full = Client("bench-key", outbox_path=f"{work}/full.db", upload=False, max_queue_size=cap)
        cleanup.callback(full.shutdown)
        # Segment with its consumer thread running, uploading to a local receiver;
        # its queue is made big enough that it never drops (a drop would be "free").
        segment = SegmentClient("bench-key", host=url, max_queue_size=cap)
        cleanup.callback(segment.shutdown)
        message = segment.track(USER, EVENT, PROPERTIES, CONTEXT)[1]
        plain = persistqueue.SQLiteAckQueue(
            f"{work}/plain", serializer=persistqueue.serializers.msgpack, auto_resume=False
        )
        cleanup.callback(plain.close)

        def in_batches(count: int) -> None:
            with batched.batch():
                track_with(batched, count)

        contenders: dict[str, Callable[[int], None]] = {
            "outbox-analytics track() default": lambda c: track_with(ours, c),
            "outbox-analytics track() fsync=True": lambda c: track_with(durable, c),
            "outbox-analytics track() in batch()": in_batches,
            f"outbox-analytics track() {args.pending:,} pending": lambda c: track_with(full, c),
            "segment-analytics-python 2.4.0 track()": lambda c: track_with(segment, c),
            "persist-queue SQLiteAckQueue.put()": lambda c: [plain.put(message) for _ in range(c)],
        }
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for round_number in range(args.rounds):
            for name, run in contenders.items():
                # fsync and plain persist-queue are slow: fewer events, same rate.
                count = n // 10 if ("fsync" in name or "persist-queue" in name) else n
                rates[name].append(rate(run, count))
                # Segment's thread goes on uploading its backlog after the loop:
                # let it finish outside the clock, or it would slow whoever is next.
                segment.flush()
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    return rates


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait()


def report(args: argparse.Namespace, rates: dict[str, list[float]]) -> None:
    n = args.events
    median = {name: statistics.median(values) for name, values in rates.items()}
    python = sys.version.split()[0]
    print(f"\nmedian events/s over {args.rounds} rounds of {n} events (python {python})")
    for name, value in median.items():
        print(f"  {name:45} {value:12,.0f}")
    default = median["outbox-analytics track() default"]
    seg = median["segment-analytics-python 2.4.0 track()"]
    checks = [
        ("default / segment", default / seg, 1.0),
        ("batch() / segment", median["outbox-analytics track() in batch()"] / seg, 3.0),
        (
            "default / plain persist-queue",
            default / median["persist-queue SQLiteAckQueue.put()"],
            8.0,
        ),
        (
            f"{args.pending:,} pending / empty",
            median[f"outbox-analytics track() {args.pending:,} pending"] / default,
            0.8,
        ),
        ("fsync=True / segment", median["outbox-analytics track() fsync=True"] / seg, None),
    ]
    print("\nratios (target)")
    for name, value, target in checks:
        verdict = "" if target is None else ("  ok" if value >= target else "  BELOW TARGET")
        wanted = "" if target is None else f"(>= {target:.1f}x)"
        print(f"  {name:45} {value:8.2f}x {wanted}{verdict}")


if __name__ == "__main__":
    main()
