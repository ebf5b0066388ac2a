"""Before and after: two source trees of this library, timed in one run, rounds interleaved.

    python benchmarks/versions.py OLD_TREE [NEW_TREE] [--rounds 7] [--events 5000]
                                  [--kinds default,fsync,batch,drain,deliver]

OLD_TREE is a checkout of an earlier commit (`git worktree add /tmp/old REV`);
NEW_TREE defaults to this repository. Each round runs one fresh interpreter
per tree and kind of work, so both meet the same machine noise; medians and
new/old ratios are printed. Measured: `track()` into a fresh outbox (default,
`fsync=True`, in `batch()`), a drain of pending rows to a local collector,
and track-then-deliver end to end. The collector runs in a process of its
own, as in deliver.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import receiver

CHILD = r"""
import json, sys, time
from urllib.request import urlopen
from outbox_analytics import Client

# `folder`: made, and removed however this process ends, by the parent.
kind, n, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
P = {"order_id": "50314b8e9bcf000000000000", "total": 27.5, "currency": "USD",
     "products": [{"sku": "45790-32", "name": "Monopoly", "price": 19.0, "quantity": 1}]}
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
    # The receiver runs in a process of its own (started once by the parent):
    # in this one it would compete for the GIL with what is measured.
    url = sys.argv[4]
    def received():
        with urlopen(url + "/stats", timeout=10) as answer:
            return json.load(answer)["received"]
    if kind == "drain":
        store = Client("bench-key", outbox_path=path, upload=False)
        with store.batch():
            tracks(store, n)
        store.shutdown()
    target = received() + n  # before the client: it starts sending pending rows at once
    client = Client("bench-key", host=url, outbox_path=path)
    def deliver(count):
        if kind == "deliver":
            tracks(client, count)
        client.flush()
        while received() < target:
            time.sleep(0.002)
    result = rate(deliver, n)
    client.shutdown()
print(json.dumps(result))
"""

KINDS = ("default", "fsync", "batch", "drain", "deliver")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("old", help="the earlier source tree")
    parser.add_argument("new", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    args = parser.parse_args()
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    rates: dict[tuple[str, str], list[float]] = {}
    # The children's outboxes are under `work`, removed when the run ends,
    # however it ends (a child failing, Ctrl-C).
    with tempfile.TemporaryDirectory(prefix="outbox-versions-") as work:
        receiver_process, url = receiver.start()
        try:
            measure(args.rounds, args.events, kinds, trees, url, rates, work)
        finally:
            receiver_process.kill()
            receiver_process.wait()
    print(f"\nmedian events/s over {args.rounds} rounds of {args.events} events")
    for kind in kinds:
        old = statistics.median(rates[(kind, "old")])
        new = statistics.median(rates[(kind, "new")])
        print(f"  {kind:8} old {old:10,.0f}  new {new:10,.0f}  new/old {new / old:5.2f}x")


def measure(
    rounds: int,
    events: int,
    kinds: list[str],
    trees: dict[str, str],
    url: str,
    rates: dict[tuple[str, str], list[float]],
    work: str,
) -> None:
    for round_number in range(rounds):
        for kind in kinds:
            for label, tree in trees.items():
                # A folder per child for its outbox, removed as soon as the
                # child ends; its TMPDIR too, so that whatever a tree writes
                # to temporary files is removed with it.
                folder = tempfile.mkdtemp(prefix=f"{kind}-{label}-", dir=work)
                try:
                    done = subprocess.run(
                        [sys.executable, "-c", CHILD, kind, str(events), folder, url],
                        env=dict(os.environ, PYTHONPATH=tree, TMPDIR=folder),
                        cwd=tree,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                rates.setdefault((kind, label), []).append(json.loads(done.stdout))
        print(f"round {round_number + 1}/{rounds} done", file=sys.stderr)


if __name__ == "__main__":
    main()
