"""What the benchmarks share: the event, timing, target lines, fresh interpreters, big outboxes.

Verdicts: "ok" when a figure meets its target, "BELOW TARGET" when it misses
it, whichever way the target points (a rate too low, a time or a size too
high): the team greps for the one phrase.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from outbox_analytics import Client
from outbox_analytics.store import Outbox, encode_message

# The benchmarks' folder: no copy of the package is there (see run_python).
HERE = os.path.dirname(os.path.abspath(__file__))
USER = "user-8f14e45f"
EVENT = "Order Completed"
PROPERTIES = {
    "order_id": "50314b8e9bcf000000000000",
    "total": 27.5,
    "currency": "USD",
    "products": [{"sku": "45790-32", "name": "Monopoly", "price": 19.0, "quantity": 1}],
}
CONTEXT = {"ip": "203.0.113.7", "locale": "en-US"}


def track_with(client: Any, count: int) -> None:
    """`count` calls of the same track(): ours and Segment's take the same arguments."""
    for _ in range(count):
        client.track(USER, EVENT, PROPERTIES, CONTEXT)


def refused(*clients: Client) -> int:
    """Events our clients refused (a full outbox, a failed write): such a call is "free"."""
    return sum(stats.dropped for stats in (client.stats() for client in clients) if stats)


def rate(run: Callable[[int], None], count: int) -> float:
    """Calls per second of `run(count)`, on the wall clock (what a caller waits)."""
    start = time.perf_counter()
    run(count)
    return count / (time.perf_counter() - start)


# -- printing figures against targets -------------------------------------------------


def verdict(met: bool) -> str:
    return "ok" if met else "BELOW TARGET"


def at_least(label: str, value: float, target: float, unit: str = "x", digits: int = 2) -> None:
    """One line: a figure that must reach `target` (a rate, a ratio)."""
    shown = f"{value:,.{digits}f}{unit}"
    print(f"  {label:44} {shown:>14}  (>= {target:,.{digits}f}{unit})  {verdict(value >= target)}")


def below(label: str, value: float, limit: float, unit: str, digits: int = 1) -> None:
    """One line: a figure that must stay under `limit` (a latency, a size)."""
    shown = f"{value:,.{digits}f} {unit}"
    print(f"  {label:44} {shown:>14}  (< {limit:,.{digits}f} {unit})  {verdict(value < limit)}")


def info(label: str, shown: str) -> None:
    """One line: a figure reported for context, without a target."""
    print(f"  {label:44} {shown:>14}")


# -- processes --------------------------------------------------------------------------


def run_python(code: str, *args: str, timeout: float = 1800) -> Any:
    """Run `code` in a fresh interpreter and return the JSON its last stdout line holds.

    A fresh interpreter is what a restarted program is: no warm module, no
    open connection, no cached count of this process carries over.
    """
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=HERE,  # `-c` puts the working directory first on sys.path: the repository's
        # package would shadow the tree PYTHONPATH names (before/after runs)
    )
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def exit_on_signals() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C: `with` blocks remove temporary files.

    By default they end the interpreter at once, leaving a run's files behind.
    """
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, lambda signum, frame: sys.exit(128 + signum))


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait()


def file_system(path: str) -> str:
    """The type and device of the file system holding `path`, from /proc/mounts (Linux)."""
    try:
        with open("/proc/mounts") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return "unknown (no /proc/mounts)"
    real = os.path.realpath(path)
    best: list[str] | None = None
    for entry in entries:
        mount_point = entry[1].replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= len(best[1])):
            best = entry  # the longest mount point containing the path is the one in effect
    if best is None:
        return "unknown"
    return f"{best[2]} on {best[0]} (mounted at {best[1]})"


# -- building big outboxes ----------------------------------------------------------------

LAYOUTS = ("pending", "interleaved", "head")
_CHUNK = 50_000  # rows per transaction while building: big enough to be fast, small in memory


def stored_message() -> dict[str, Any]:
    """The message our track() stores for the benchmark event (context.library and all)."""
    message: dict[str, Any] = Client("bench-key", send=False).track(
        USER, EVENT, PROPERTIES, CONTEXT
    )[1]
    return message


def build_outbox(path: str, pending: int, dead: int = 0, layout: str = "pending") -> None:
    """Make the outbox at `path` hold `pending` pending and `dead` dead-lettered rows.

    Through the storage API only, as the uploader itself would leave them:
    rows are appended, claimed, and dead-lettered or given back untried.
    Layouts: "pending" (no dead rows), "head" (the dead rows are the oldest),
    "interleaved" (dead rows spread evenly: with 1M pending and 200k dead,
    one dead after every five pending).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    message = stored_message()
    outbox = Outbox(path, max_pending=(pending + dead) * 2 + 1_000_000)
    try:
        if layout == "head":
            _append(outbox, message, 0, dead)
            _dead_letter_all(outbox, dead)
            _append(outbox, message, dead, pending)
        elif layout == "interleaved":
            _interleave(outbox, message, pending, dead)
        else:
            _append(outbox, message, 0, pending)
    finally:
        outbox.close()


def _append(outbox: Outbox, message: dict[str, Any], first: int, count: int) -> None:
    """Append `count` copies of `message`, each with its own messageId, in big transactions."""
    for start in range(first, first + count, _CHUNK):
        with outbox.batch():
            for n in range(start, min(start + _CHUNK, first + count)):
                outbox.append(encode_message({**message, "messageId": f"bench-{n:030d}"}))


def _dead_letter_all(outbox: Outbox, count: int) -> None:
    """Claim the `count` oldest pending rows and dead-letter them, as after a 400."""
    lease = _lease(outbox)
    try:
        left = count
        while left > 0:
            rows = lease.claim(min(_CHUNK, left))
            if not rows:
                raise RuntimeError(f"only {count - left} of {count} rows could be claimed")
            lease.dead_letter([row.id for row in rows], status=400, error="bench")
            left -= len(rows)
    finally:
        lease.close()


def _interleave(outbox: Outbox, message: dict[str, Any], pending: int, dead: int) -> None:
    """Append all rows, dead-lettering an evenly spread `dead` of them on the way.

    Each chunk is appended and claimed whole; its dead rows are dead-lettered
    at once, its pending rows stay in flight (so the next claim takes only the
    next chunk) and are given back untried, attempts unchanged, at the end.
    """
    total = pending + dead
    lease = _lease(outbox)
    keep: list[int] = []
    try:
        for start in range(0, total, _CHUNK):
            count = min(_CHUNK, total - start)
            _append(outbox, message, start, count)
            rows = lease.claim(count)
            if len(rows) != count:
                raise RuntimeError(f"claimed {len(rows)} rows of a chunk of {count}")
            doomed = [row.id for n, row in enumerate(rows, start) if _is_dead(n, dead, total)]
            lease.dead_letter(doomed, status=400, error="bench")
            keep.extend(row.id for n, row in enumerate(rows, start) if not _is_dead(n, dead, total))
        lease.release(keep, attempts=0)
    finally:
        lease.close()


def _is_dead(n: int, dead: int, total: int) -> bool:
    """Whether row `n` (0-based) is one of `dead` rows spread evenly over `total`."""
    return (n + 1) * dead // total > n * dead // total


def _lease(outbox: Outbox) -> Any:
    lease = outbox.try_lease()
    if lease is None:
        raise RuntimeError(f"another process holds the upload lease of {outbox.path}")
    return lease
