"""fsync=True near the disk's limit: track() against the file system's own fsync, in one run.

    python benchmarks/fsync.py [--dir DIR] [--events 500] [--threads 8] [--rounds 7]

Everything happens in a temporary directory made inside DIR (default: the
current directory, so the file system is the one you run from, not a tmpfs
/tmp), removed however the run ends. Each round, interleaved:

- the file system's fsync latency: a 4 KiB write then os.fsync(), --probes
  times, median; rewriting one block in place (as SQLite rewrites its WAL
  from the start after each checkpoint: the fastest durable write there is,
  so the strictest limit), and appending (the file grows, so its size is
  written too);
- SQLite's own floor: one-row autocommit INSERTs of the stored event
  (the same bytes) into a table of the same shape, in a WAL file with
  synchronous=FULL and 2 KiB pages, like ours, --events of them;
- one thread: Client(fsync=True, upload=False).track(), --events calls;
  target >= 0.9 of SQLite's own one-row commit;
- --threads threads at once into one client with fsync=True, --events calls
  each; target: total rate >= 4x the one thread's.

Medians over rounds are printed, and the file system type from /proc/mounts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time

from benchlib import (
    CONTEXT,
    EVENT,
    PROPERTIES,
    USER,
    at_least,
    exit_on_signals,
    file_system,
    info,
    rate,
    refused,
    stored_message,
    track_with,
)

from outbox_analytics import Client
from outbox_analytics.store import encode_message

BLOCK = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=os.getcwd(), help="where to make the temporary directory")
    parser.add_argument("--events", type=int, default=500, help="track() calls per thread")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--probes", type=int, default=300, help="fsyncs per latency probe")
    args = parser.parse_args()
    exit_on_signals()
    with tempfile.TemporaryDirectory(prefix="outbox-fsync-", dir=args.dir) as work:
        where = file_system(work)
        figures = measure(args, work)
    report(args, where, figures)


def measure(args: argparse.Namespace, work: str) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {
        "rewrite": [],
        "append": [],
        "sqlite": [],
        "single": [],
        "threads": [],
    }
    with contextlib.ExitStack() as cleanup:
        # A client per figure, for the whole run: the threads' file never slows the single's.
        single = Client("bench-key", outbox_path=f"{work}/single.db", fsync=True, upload=False)
        cleanup.callback(single.shutdown)
        shared = Client("bench-key", outbox_path=f"{work}/threads.db", fsync=True, upload=False)
        cleanup.callback(shared.shutdown)
        peer = sqlite_peer(f"{work}/sqlite.db")
        cleanup.callback(peer.close)
        row = encode_message(stored_message())
        for round_number in range(args.rounds):
            figures["rewrite"].append(fsync_latency(f"{work}/probe", args.probes, in_place=True))
            figures["append"].append(fsync_latency(f"{work}/probe", args.probes, in_place=False))
            figures["sqlite"].append(rate(lambda c: sqlite_commits(peer, row, c), args.events))
            figures["single"].append(rate(lambda c: track_with(single, c), args.events))
            figures["threads"].append(threaded_rate(shared, args.threads, args.events))
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
        if refused(single, shared):
            raise RuntimeError("a track() was refused: the measurement would be flattered")
    return figures


def sqlite_peer(path: str) -> sqlite3.Connection:
    """SQLite on its own: a WAL file with synchronous=FULL, 2 KiB pages, autocommit."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA page_size=2048")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE events (_id INTEGER PRIMARY KEY, data BLOB, timestamp FLOAT, status INTEGER)"
    )
    return conn


def sqlite_commits(conn: sqlite3.Connection, row: bytes, count: int) -> None:
    """`count` one-row commits: each INSERT is its own transaction, synced before it returns."""
    insert = "INSERT INTO events (data, timestamp, status) VALUES (?, ?, 0)"
    for _ in range(count):
        conn.execute(insert, (row, time.time()))


def fsync_latency(path: str, probes: int, in_place: bool) -> float:
    """Median seconds of one 4 KiB write plus os.fsync() in `path` (a fresh file)."""
    block = os.urandom(BLOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if in_place:  # the block exists and is on disk before the first timing
            os.write(fd, block)
            os.fsync(fd)
        timings = []
        for _ in range(probes):
            started = time.perf_counter()
            if in_place:
                os.pwrite(fd, block, 0)
            else:
                os.write(fd, block)
            os.fsync(fd)
            timings.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(timings)


def threaded_rate(client: Client, threads: int, events: int) -> float:
    """Total calls per second of `threads` threads tracking `events` each, started together."""
    start = threading.Barrier(threads + 1)  # the clock starts when every thread is ready
    stop = threading.Event()  # set if we are interrupted: no thread may outlive the run
    failures: list[BaseException] = []

    def work() -> None:
        try:
            start.wait()
            for _ in range(events):
                if stop.is_set():
                    return
                client.track(USER, EVENT, PROPERTIES, CONTEXT)
        except BaseException as exc:  # (re-raised below: a dead thread would look fast)
            failures.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        start.wait()
        started = time.perf_counter()
        for worker in workers:
            worker.join()
        took = time.perf_counter() - started
    finally:
        # Interrupted (Ctrl-C, SIGTERM): stop the threads before the client is
        # closed and the directory removed, or they would write into it again.
        stop.set()
        start.abort()
        for worker in workers:
            worker.join()
    if failures:
        raise failures[0]
    return threads * events / took


def report(args: argparse.Namespace, where: str, figures: dict[str, list[float]]) -> None:
    median = {name: statistics.median(values) for name, values in figures.items()}
    rewrite, append = median["rewrite"], median["append"]
    single, threads, peer = median["single"], median["threads"], median["sqlite"]
    print(f"\nfile system: {where}")
    print(f"medians over {args.rounds} rounds (python {sys.version.split()[0]})")
    info("fsync of a 4 KiB rewrite in place", f"{rewrite * 1000:.3f} ms")
    info("  so at most, one at a time", f"{1 / rewrite:,.0f} /s")
    info("fsync of a 4 KiB append", f"{append * 1000:.3f} ms")
    info("  so at most, one at a time", f"{1 / append:,.0f} /s")
    info(f"SQLite WAL synchronous=FULL, one-row commits x {args.events}", f"{peer:,.0f} /s")
    info(f"track() fsync=True, 1 thread x {args.events}", f"{single:,.0f} /s")
    info(f"track() fsync=True, {args.threads} threads x {args.events}", f"{threads:,.0f} /s")
    print("\ntargets")
    at_least("1 thread / SQLite's own one-row commit", single / peer, 0.9)
    at_least(f"{args.threads} threads / 1 thread", threads / single, 4.0)
    info("1 thread / (1 / fsync latency, rewrite)", f"{single * rewrite:.2f}x")
    info("1 thread / (1 / fsync latency, append)", f"{single * append:.2f}x")
    info("SQLite's own / (1 / fsync latency, rewrite)", f"{peer * rewrite:.2f}x")


if __name__ == "__main__":
    main()
