"""Before and after: two source trees of this library, timed in one run, rounds interleaved.

    python benchmarks/versions.py OLD_TREE [NEW_TREE] [--rounds 7] [--events 5000]

OLD_TREE is a checkout of an earlier commit (`git worktree add /tmp/old REV`);
NEW_TREE defaults to this repository. Each round runs one fresh interpreter
per tree and kind of work, so both meet the same machine noise; medians and
new/old ratios are printed. Measured: `track()` into a fresh outbox (default,
`fsync=True`, in `batch()`), a drain of pending rows to a local collector,
and track-then-deliver end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import io, json, sys, tempfile, threading, time
from outbox_analytics import Client
from outbox_analytics.collector import Collector

kind, n = sys.argv[1], int(sys.argv[2])
P = {"order_id": "50314b8e9bcf000000000000", "total": 27.5, "currency": "USD",
     "products": [{"sku": "45790-32", "name": "Monopoly", "price": 19.0, "quantity": 1}]}
folder = tempfile.mkdtemp(prefix="outbox-versions-")
path = folder + "/o.db"

def rate(run, count):
    start = time.perf_counter()
    run(count)
    return count / (time.perf_counter() - start)

def tracks(client, count):
    for _ in range(count):
        client.track("user-8f14e45f", "Order Completed", P)

if kind in ("default", "fsync"):
    client = Client("bench-key", outbox_path=path, upload=False, fsync=kind == "fsync")
    result = rate(lambda c: tracks(client, c), n if kind == "default" else n // 10)
elif kind == "batch":
    client = Client("bench-key", outbox_path=path, upload=False)
    def in_batch(count):
        with client.batch():
            tracks(client, count)
    result = rate(in_batch, n)
else:
    collector = Collector("127.0.0.1", 0, out=io.StringIO())
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    if kind == "drain":
        store = Client("bench-key", outbox_path=path, upload=False)
        with store.batch():
            tracks(store, n)
        store.shutdown()
    client = Client("bench-key", host=collector.url, outbox_path=path)
    def deliver(count):
        if kind == "deliver":
            tracks(client, count)
        client.flush()
        while collector.counts()["received"] < count:
            time.sleep(0.002)
    result = rate(deliver, n)
    client.shutdown()
    collector.stop()
import shutil; shutil.rmtree(folder, ignore_errors=True)
print(json.dumps(result))
"""

KINDS = ("default", "fsync", "batch", "drain", "deliver")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("old", help="the earlier source tree")
    parser.add_argument("new", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    rates: dict[tuple[str, str], list[float]] = {}
    for round_number in range(args.rounds):
        for kind in KINDS:
            for label, tree in trees.items():
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, kind, str(args.events)],
                    env=dict(os.environ, PYTHONPATH=tree),
                    cwd=tree,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rates.setdefault((kind, label), []).append(json.loads(done.stdout))
        print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    print(f"\nmedian events/s over {args.rounds} rounds of {args.events} events")
    for kind in KINDS:
        old = statistics.median(rates[(kind, "old")])
        new = statistics.median(rates[(kind, "new")])
        print(f"  {kind:8} old {old:10,.0f}  new {new:10,.0f}  new/old {new / old:5.2f}x")


if __name__ == "__main__":
    main()
