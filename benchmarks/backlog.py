"""Flat at any backlog: enqueue rate, first claim after a restart and status, in one run.

    python benchmarks/backlog.py [--events 10000] [--rounds 9] [--pending 1000000] [--dead 200000]

Four outboxes, each built once per run through the storage API: empty;
--pending pending rows; --pending pending with --dead dead rows spread evenly
among them (one dead after every five pending by default); and the same with
the dead rows at the head (the oldest). Each round (the order of the files
rotates from round to round), we time:

- default track() into each file in turn, in this process, with one client
  per file kept open all run (target: >= 0.9x the empty file's rate);
- then for each file, in a fresh process: Outbox(path), try_lease(), then
  lease.claim(100), the first claim after a restart (target < 10 ms; the
  claimed rows are given back untried);
- in a fresh process: Outbox(path, readonly=True).stats(), the work of
  `status --json` (target < 50 ms, issue 25); and the wall time of the whole
  `python -m outbox_analytics status --json PATH` command.

Every file grows by --events rows a round ("empty" too: it holds at most
--events x --rounds). The files are read with a warm page cache (they were
just written): a cold restart after a reboot can be slower. Medians over
rounds are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from benchlib import (
    HERE,
    at_least,
    below,
    build_outbox,
    exit_on_signals,
    info,
    rate,
    refused,
    run_python,
    track_with,
)

from outbox_analytics import Client

# The first claim of a restarted uploader. The rows are given back untried
# (attempts unchanged), so every round finds the file as the last one left it.
CLAIM = """
import json, sys, time
from outbox_analytics.store import Outbox
started = time.perf_counter()
outbox = Outbox(sys.argv[1], max_pending=int(sys.argv[2]))
opened = time.perf_counter()
lease = outbox.try_lease()
if lease is None:
    sys.exit("the upload lease is held by another process")
leased = time.perf_counter()
rows = lease.claim(100)
claimed = time.perf_counter()
lease.release([row.id for row in rows], attempts=0)
lease.close()
outbox.close()
print(json.dumps({"open_s": opened - started, "lease_s": leased - opened,
                  "claim_s": claimed - leased, "rows": len(rows)}))
"""

# What `status --json` does, without the interpreter's start and the CLI's imports.
STATS = """
import json, sys, time
from outbox_analytics.store import Outbox
started = time.perf_counter()
outbox = Outbox(sys.argv[1], readonly=True)
stats = outbox.stats()
took = time.perf_counter() - started
outbox.close()
print(json.dumps({"stats_s": took, "pending": stats.pending, "dead": stats.dead}))
"""


@dataclass
class Backlog:
    """One outbox file of the run, what it should hold, and its figures per round."""

    label: str
    path: str
    pending: int
    dead: int
    client: Client | None = None
    figures: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.figures.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.figures[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000, help="track() calls per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pending", type=int, default=1_000_000, help="pending rows per file")
    parser.add_argument("--dead", type=int, default=200_000, help="dead rows (2 of the files)")
    args = parser.parse_args()
    exit_on_signals()
    # The files (1.2M rows are about 600 MB each) are under `work`, removed
    # when the run ends, however it ends (an error, Ctrl-C, SIGTERM).
    with tempfile.TemporaryDirectory(prefix="outbox-backlog-") as work:
        backlogs = files(args, work)
        with contextlib.ExitStack() as cleanup:
            open_clients(args, backlogs, cleanup)
            fixed = measure(args, backlogs)
    report(args, backlogs, fixed)


def files(args: argparse.Namespace, work: str) -> list[Backlog]:
    """Build the four files, once per run: they take most of the run's time."""
    p, d = args.pending, args.dead
    plan = [
        ("empty", 0, 0, "pending"),
        (f"{short(p)} pending", p, 0, "pending"),
        (f"{short(p)} pending + {short(d)} dead interleaved", p, d, "interleaved"),
        (f"{short(p)} pending + {short(d)} dead at head", p, d, "head"),
    ]
    backlogs = []
    for number, (label, pending, dead, layout) in enumerate(plan):
        path = f"{work}/backlog-{number}.db"
        started = time.perf_counter()
        build_outbox(path, pending, dead, layout)
        took = time.perf_counter() - started
        print(f"built {label} in {took:.1f} s", file=sys.stderr)
        backlogs.append(Backlog(label, path, pending, dead))
    return backlogs


def short(count: int) -> str:
    """1,000,000 as "1M", 200,000 as "200k": labels that fit one line with their figures."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if count >= size and count % size == 0:
            return f"{count // size}{suffix}"
    return f"{count:,}"


def open_clients(
    args: argparse.Namespace, backlogs: list[Backlog], cleanup: contextlib.ExitStack
) -> None:
    """One storing client per file for the whole run, as a long-lived program has."""
    for backlog in backlogs:
        backlog.client = Client(
            "bench-key", outbox_path=backlog.path, upload=False, max_queue_size=capacity(args)
        )
        cleanup.callback(backlog.client.shutdown)


def capacity(args: argparse.Namespace) -> int:
    """A cap far above what any file will hold: a refused event would be free."""
    return int((args.pending + args.dead + args.events * args.rounds) * 2)


def measure(args: argparse.Namespace, backlogs: list[Backlog]) -> list[float]:
    """Fill in every file's figures; return the CLI's fixed cost per round (no file read)."""
    fixed: list[float] = []
    for round_number in range(args.rounds):
        # Rotate who goes first, so that no file always follows the same neighbour.
        shift = round_number % len(backlogs)
        order = backlogs[shift:] + backlogs[:shift]
        # The enqueue timings back to back, before any child process of the
        # round: a process starting or ending (its exit, its page-cache
        # reads) must not land inside one file's timing and not another's.
        for backlog in order:
            enqueue(args, backlog)
        if refused(*(b.client for b in backlogs if b.client)):
            raise RuntimeError("a track() was refused: the measurement would be flattered")
        fixed.append(time_command([sys.executable, "-c", "import outbox_analytics.cli"]))
        for backlog in order:
            restart_and_status(args, backlog)
        print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    return fixed


def enqueue(args: argparse.Namespace, backlog: Backlog) -> None:
    """Default track() into the file, in this process, with its long-lived client."""
    client = backlog.client
    backlog.add("track", rate(lambda c: track_with(client, c), args.events))
    backlog.pending += args.events  # what the file should now hold


def restart_and_status(args: argparse.Namespace, backlog: Backlog) -> None:
    """The first claim after a restart, and status, each in a fresh process."""
    restart = run_python(CLAIM, backlog.path, str(capacity(args)))
    if restart["rows"] != min(100, backlog.pending):  # a short claim would be a cheap one
        print(f"WARNING: claim(100) on '{backlog.label}' took {restart['rows']}", file=sys.stderr)
    backlog.add("open", restart["open_s"] + restart["lease_s"])
    backlog.add("claim", restart["claim_s"])
    status = run_python(STATS, backlog.path)
    backlog.add("stats", status["stats_s"])
    check_counts(backlog, status, "Outbox.stats()")
    backlog.add("cli", time_cli(backlog))


def time_command(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, cwd=HERE)
    return time.perf_counter() - started


def time_cli(backlog: Backlog) -> float:
    """Wall time of the status command, interpreter start and imports included."""
    command = [sys.executable, "-m", "outbox_analytics", "status", "--json", backlog.path]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=HERE)
    took = time.perf_counter() - started
    check_counts(backlog, json.loads(done.stdout), "status --json")
    return took


def check_counts(backlog: Backlog, seen: dict[str, int], who: str) -> None:
    """Warn when a file does not hold what it was built to: its figures would mislead."""
    if (seen["pending"], seen["dead"]) != (backlog.pending, backlog.dead):
        print(
            f"WARNING: {who} on '{backlog.label}' says pending={seen['pending']}"
            f" dead={seen['dead']}, expected {backlog.pending} and {backlog.dead}",
            file=sys.stderr,
        )


def report(args: argparse.Namespace, backlogs: list[Backlog], fixed: list[float]) -> None:
    empty, *loaded = backlogs
    python = sys.version.split()[0]
    print(f"\nmedians over {args.rounds} rounds (python {python}; page cache warm)")
    print(f"\nenqueue: default track(), events/s over {args.events} calls")
    for backlog in backlogs:
        info(backlog.label, f"{backlog.median('track'):,.0f}")
    print("\nenqueue rate against the empty outbox")
    for backlog in loaded:
        at_least(f"{backlog.label} / empty", backlog.median("track") / empty.median("track"), 0.9)
    print("\nfirst claim after a restart: lease.claim(100) in a fresh process")
    for backlog in backlogs:
        below(backlog.label, backlog.median("claim") * 1000, 10, "ms", 2)
    print("  before it, Outbox(path) + try_lease() (no target):")
    for backlog in backlogs:
        info(f"  {backlog.label}", f"{backlog.median('open') * 1000:,.1f} ms")
    print("\nstatus: Outbox(path, readonly=True).stats() in a fresh process")
    for backlog in backlogs:
        below(backlog.label, backlog.median("stats") * 1000, 50, "ms")
    print("\nstatus: `python -m outbox_analytics status --json PATH`, whole command, wall time")
    for backlog in backlogs:
        info(backlog.label, f"{backlog.median('cli') * 1000:,.0f} ms")
    # What any command pays before reading a file: most of the wall time of a small one.
    info("(python -c 'import outbox_analytics.cli')", f"{statistics.median(fixed) * 1000:,.0f} ms")


if __name__ == "__main__":
    main()
