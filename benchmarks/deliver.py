"""End-to-end delivery: track N events and wait until a local receiver has them all.

    python benchmarks/deliver.py [--events 20000] [--rounds 5] [--drain 1000000]
                                 [--drain-rounds 3]

Ours and segment-analytics-python 2.4.0 in the same run, against the same
receiver (its own process, on 127.0.0.1), upload_size=100 on both, gzip off
and on; rounds interleaved (who goes first alternates), medians and ratios
printed; target ours >= 1.5x Segment's. Each round uses a fresh client of
each (and a fresh outbox), built before the clock starts; the clock runs
from the first track() until the receiver has counted every event.

Then a restart drain: a fresh process opens an outbox holding --drain pending
rows and delivers them to a receiver of its own. We report, from Client() in
that process: the time to the first batch received (stamped by the receiver,
target < 0.1 s), events per second until all are delivered (>= 30,000), and
the process's peak RSS (< 60 MB). The file is built once and copied for each
of --drain-rounds rounds. Needs `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time

import receiver
from benchlib import at_least, below, build_outbox, exit_on_signals, info, run_python, stop
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
    client.shutdown()  # off the clock
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


# A restarted program: its clock starts just before Client(), whose uploader
# starts at once on what the file holds. time.monotonic() is one clock for
# every process (Linux), so the receiver's stamp of the first batch compares.
DRAINER = """
import json, sys, time
importing = time.monotonic()  # what the restarted program waits for includes the import
from outbox_analytics import Client

started = time.monotonic()
client = Client("bench-key", host=sys.argv[1], outbox_path=sys.argv[2], upload_size=100)
deadline = started + 1800
while client.flush(timeout=60).pending and time.monotonic() < deadline:
    pass
finished = time.monotonic()
left = client.stats().pending
# VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)
with open("/proc/self/status") as status:
    rss_mb = int([l for l in status if l.startswith("VmHWM")][0].split()[1]) / 1024
client.shutdown()
print(json.dumps({"importing": importing, "started": started, "finished": finished, "left": left,
                  "peak_rss_mb": rss_mb}))
"""


def drain_round(built: str, rows: int, work: str, number: int) -> dict[str, float]:
    """One restart drain of a copy of `built`, to a receiver of its own (fresh counts)."""
    path = os.path.join(work, f"drain-{number}.db")
    copy_outbox(built, path)
    stamp = os.path.join(work, f"first-batch-{number}")
    receiver_process, url = receiver.start(stamp)
    try:
        result = run_python(DRAINER, url, path)
        got = receiver.received(url)
    finally:
        stop(receiver_process)
        for leftover in (path, path + "-wal", path + "-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)  # (the next copy needs the room more than the run does)
    if got < rows or result["left"]:
        raise RuntimeError(f"the drain delivered {got} of {rows}; {result['left']} left pending")
    first_batch_at = receiver.first_batch_at(stamp)
    first = first_batch_at - result["started"]
    from_import = first_batch_at - result["importing"]
    rate = rows / (result["finished"] - result["started"])
    return {
        "first_batch_s": first,
        "from_import_s": from_import,
        "rate": rate,
        "peak_rss_mb": result["peak_rss_mb"],
    }


def copy_outbox(source: str, destination: str) -> None:
    """Copy a closed outbox (and its -wal, should one remain): the same rows, a fresh file."""
    shutil.copyfile(source, destination)
    if os.path.exists(source + "-wal"):
        shutil.copyfile(source + "-wal", destination + "-wal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drain", type=int, default=1_000_000, help="rows to drain (0: skip)")
    parser.add_argument("--drain-rounds", type=int, default=3)
    args = parser.parse_args()
    exit_on_signals()
    # Every outbox of the run (the drain's holds --drain rows) is under `work`,
    # removed when the run ends, however it ends (an error, Ctrl-C, SIGTERM).
    with tempfile.TemporaryDirectory(prefix="outbox-deliver-") as work:
        end_to_end(args, work)
        if args.drain:
            drain(args, work)


def end_to_end(args: argparse.Namespace, work: str) -> None:
    receiver_process, url = receiver.start()
    try:
        rates: dict[str, list[float]] = {}
        for round_number in range(args.rounds):
            for gzip in (False, True):
                suffix = "gzip" if gzip else "plain"
                runs = {
                    f"outbox-analytics ({suffix})": functools.partial(
                        round_ours, url, args.events, gzip, work
                    ),
                    f"segment 2.4.0 ({suffix})": functools.partial(
                        round_segment, url, args.events, gzip
                    ),
                }
                # Who goes first alternates: a slow start or a warm cache is shared.
                order = list(runs.items())
                for name, run in order if round_number % 2 == 0 else order[::-1]:
                    rates.setdefault(name, []).append(run())
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        stop(receiver_process)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\nend to end, median events/s over {args.rounds} rounds of {args.events}")
    for name, value in median.items():
        info(name, f"{value:,.0f}")
    print("\nratios")
    for suffix in ("plain", "gzip"):
        ours, theirs = median[f"outbox-analytics ({suffix})"], median[f"segment 2.4.0 ({suffix})"]
        at_least(f"ours / segment ({suffix})", ours / theirs, 1.5)


def drain(args: argparse.Namespace, work: str) -> None:
    print(f"building an outbox of {args.drain:,} pending rows ...", file=sys.stderr)
    built = os.path.join(work, "drain-source.db")
    build_outbox(built, args.drain)
    results = []
    for number in range(args.drain_rounds):
        results.append(drain_round(built, args.drain, work, number))
        print(f"drain {number + 1}/{args.drain_rounds} done", file=sys.stderr)
    figures = {name: [r[name] for r in results] for name in results[0]}
    median = {name: statistics.median(values) for name, values in figures.items()}
    print(f"\nrestart drain of {args.drain:,} rows, median of {args.drain_rounds}")
    below("time from Client() to first batch received", median["first_batch_s"], 0.1, "s", 3)
    info("  the same, from `import outbox_analytics`", f"{median['from_import_s']:.3f} s")
    at_least("events per second until all delivered", median["rate"], 30_000, "/s", 0)
    below("peak RSS of the draining process", median["peak_rss_mb"], 60, "MB")
    info("  each round: first batch (s)", " ".join(f"{v:.3f}" for v in figures["first_batch_s"]))
    info("  each round: events/s", " ".join(f"{v:,.0f}" for v in figures["rate"]))
    info("  each round: peak RSS (MB)", " ".join(f"{v:.1f}" for v in figures["peak_rss_mb"]))


if __name__ == "__main__":
    main()
