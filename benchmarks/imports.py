"""Import time and the first track(): what a short command pays before doing anything.

    python benchmarks/imports.py [--rounds 15]

Each figure comes from a fresh interpreter (nothing is warm but the file
system's cache), timed inside it so that the interpreter's own start-up,
the same for everyone, is left out. Rounds are interleaved, who goes first
alternating; medians are printed.

- `import outbox_analytics` against `import segment.analytics` (2.4.0):
  target ours no slower (ratio <= 1.0).
- `import outbox_analytics.cli`, what every `outbox-analytics` command pays.
- The first `Client.track()` against the median of the 199 calls after it,
  on a client built beforehand whose uploader sends to a local receiver:
  target under 1 ms more. Building the default client on the module API's
  first call (opening the outbox file) is reported for context.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import receiver
from benchlib import below, exit_on_signals, info, run_python, stop

IMPORT = """
import json, sys, time
start = time.perf_counter()
__import__(sys.argv[1])
print(json.dumps(time.perf_counter() - start))
"""

FIRST_TRACK = """
import json, os, sys, time
import outbox_analytics
client = outbox_analytics.Client("key", host=sys.argv[1], outbox_path=sys.argv[2])
calls = []
for n in range(200):
    start = time.perf_counter()
    client.track("user-1", "Order Completed", {"n": n})
    calls.append(time.perf_counter() - start)
client.shutdown()
print(json.dumps([calls[0], sorted(calls[1:])[len(calls[1:]) // 2]]))
"""

MODULE_FIRST_TRACK = """
import json, sys, time
import outbox_analytics as analytics
analytics.write_key, analytics.host, analytics.outbox_path = "key", sys.argv[1], sys.argv[2]
start = time.perf_counter()
analytics.track("user-1", "Order Completed", {"n": 0})
first = time.perf_counter() - start
analytics.shutdown()
print(json.dumps(first))
"""

MODULES = {"ours": "outbox_analytics", "segment": "segment.analytics"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    exit_on_signals()
    imports: dict[str, list[float]] = {"ours": [], "segment": [], "cli": []}
    for n in range(args.rounds):
        order = ["ours", "segment"] if n % 2 == 0 else ["segment", "ours"]
        for name in order:
            imports[name].append(run_python(IMPORT, MODULES[name]))
        imports["cli"].append(run_python(IMPORT, "outbox_analytics.cli"))
    ours, segment = (statistics.median(imports[name]) for name in ("ours", "segment"))
    print(f"\nimport time, median of {args.rounds} fresh interpreters")
    info("import outbox_analytics", f"{ours * 1000:.1f} ms")
    info("import segment.analytics (2.4.0)", f"{segment * 1000:.1f} ms")
    below("ours / segment", ours / segment, 1.0 + 1e-9, "x", digits=2)
    info("import outbox_analytics.cli", f"{statistics.median(imports['cli']) * 1000:.1f} ms")

    extra, module_first = first_track_figures(args.rounds)
    print(f"\nthe first track(), median of {args.rounds} fresh interpreters")
    below("first Client.track() minus a later one", extra * 1000, 1.0, "ms", digits=2)
    info("first analytics.track() (builds the client)", f"{module_first * 1000:.1f} ms")


def first_track_figures(rounds: int) -> tuple[float, float]:
    """Medians of: the first call's extra time over later calls; the module API's first call."""
    process, url = receiver.start()
    extras, module_firsts = [], []
    try:
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as directory:
                first, later = run_python(FIRST_TRACK, url, f"{directory}/client.sqlite3")
                extras.append(first - later)
                module_firsts.append(run_python(MODULE_FIRST_TRACK, url, f"{directory}/m.sqlite3"))
    finally:
        stop(process)
    return statistics.median(extras), statistics.median(module_firsts)


if __name__ == "__main__":
    main()
