"""The benchmarks' receiver: the library's collector, in a process of its own.

A process of its own, so that a client's background thread does real work
without sharing the measured process's GIL. It keeps counts, not messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from urllib.request import urlopen

_SERVE = """
import sys
from outbox_analytics.collector import Collector
collector = Collector(keep_messages=False)
print(collector.url, flush=True)
collector.serve_forever()
"""


def start() -> tuple[subprocess.Popen[str], str]:
    """Start a collector on 127.0.0.1; return its process and base URL."""
    process = subprocess.Popen([sys.executable, "-c", _SERVE], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def received(url: str) -> int:
    """Messages received so far (duplicates included)."""
    with urlopen(f"{url}/stats", timeout=10) as response:
        return int(json.load(response)["received"])
