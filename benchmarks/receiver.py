"""The benchmarks' receiver: the library's collector, in a process of its own.

A process of its own, so that a client's background thread does real work
without sharing the measured process's GIL. It keeps counts, not messages.
Binds 127.0.0.1 only (the collector's default host).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from urllib.request import urlopen

# With a stamp file, the time (time.monotonic(), the same clock in every
# process on Linux) of the first batch accepted is written there: a client's
# process can then be timed to its first delivery without polling, which
# would take CPU from what is measured. The collector hands each accepted
# batch to `out`; the generator of JSON lines is never iterated, so stamping
# costs the receiver nothing per message.
_SERVE = """
import sys, time
from outbox_analytics.collector import Collector

class FirstBatchStamp:
    def __init__(self, path):
        self.path = path
    def writelines(self, lines):
        if self.path:
            with open(self.path, "w") as stamp:
                stamp.write(repr(time.monotonic()))
            self.path = None
    def flush(self):
        pass

stamp = FirstBatchStamp(sys.argv[1]) if len(sys.argv) > 1 else None
collector = Collector(keep_messages=False, out=stamp)
print(collector.url, flush=True)
collector.serve_forever()
"""


def start(stamp_path: str | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a collector on 127.0.0.1; return its process and base URL.

    With `stamp_path`, the monotonic time of the first batch it accepts is written there.
    """
    command = [sys.executable, "-c", _SERVE, *([stamp_path] if stamp_path else [])]
    # Run from this folder: `-c` puts the working directory first on sys.path, and
    # the repository's package would shadow the tree PYTHONPATH names.
    here = os.path.dirname(os.path.abspath(__file__))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=here)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def received(url: str) -> int:
    """Messages received so far (duplicates included)."""
    with urlopen(f"{url}/stats", timeout=10) as response:
        return int(json.load(response)["received"])


def first_batch_at(stamp_path: str) -> float:
    """When (time.monotonic()) the receiver started with `stamp_path` accepted its first batch."""
    with open(stamp_path) as stamp:
        return float(stamp.read())
