"""What an idle uploader costs each fork: it stands down before and starts again after.

    python benchmarks/forks.py [--forks 1000] [--rounds 5]

Each round forks `--forks` children one after another (each exits at once)
in three fresh interpreters: without a client, with a client whose uploader
idles (it stands down for every fork), and with that uploader busy on a
slow server (it cannot stand down, so Python 3.12+ would warn). Printed:
median microseconds per fork and the ratios to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import receiver

CHILD = r"""
import json, os, sys, time
kind, forks, folder, url = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if kind != "none":
    from outbox_analytics import Client
    client = Client("k", host=url, outbox_path=folder + "/o.db", upload_interval=0.05)
    client.track("u", "E")
    if kind == "idle":
        client.flush(timeout=10)
        time.sleep(0.1)
start = time.perf_counter()
for _ in range(forks):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print(json.dumps((time.perf_counter() - start) / forks * 1e6))
os._exit(0)
"""

KINDS = ("none", "idle", "busy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    collector, fast = receiver.start()
    # A server that never answers: connections wait in its backlog.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    slow = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        for _ in range(args.rounds):
            for kind in KINDS:
                url = slow if kind == "busy" else fast
                with tempfile.TemporaryDirectory() as folder:
                    out = subprocess.run(
                        [sys.executable, "-c", CHILD, kind, str(args.forks), folder, url],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                        timeout=300,
                    ).stdout
                times[kind].append(json.loads(out.splitlines()[-1]))
    finally:
        collector.terminate()
        silent.close()
    base = statistics.median(times["none"])
    print(f"{args.forks} forks, {args.rounds} rounds; median us per fork (ratio to no client)")
    for kind in KINDS:
        median = statistics.median(times[kind])
        print(f"  {kind:5} {median:8.1f} us  {median / base:5.2f}x")


if __name__ == "__main__":
    main()
