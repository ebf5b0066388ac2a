"""`outbox-analytics demo`: a job killed midway loses nothing. No account, no network.

A local collector stands in for Segment on 127.0.0.1. A batch job tracks
numbered events and is SIGKILLed halfway; the outbox it leaves is shown;
the job runs again and replays what was pending; then the collector's count
is compared with what the first run had confirmed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from .collector import Collector
from .store import Outbox

__all__ = ["run_demo"]

# The batch job: tracks `count` numbered events, printing each number once its
# track() has returned (so the event is on disk), then flushes and exits.
_JOB = """
import sys, time
from outbox_analytics import Client

url, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = Client("demo-write-key", host=url, outbox_path=path, upload_interval=0.2)
for number in range(count):
    time.sleep(0.0005)  # the job's real work, between events
    client.track("demo-user", "Row Processed", {"row": number})
    print(number, flush=True)
client.shutdown(timeout=30)
"""


def run_demo(events: int = 3000, directory: str | None = None) -> bool:
    """Run the demo, narrating on stdout; True when nothing was lost."""
    folder = directory or tempfile.mkdtemp(prefix="outbox-demo-")
    path = os.path.join(folder, "outbox.sqlite3")
    with Collector() as collector:
        say(f"1. a local collector (standing in for Segment) listens on {collector.url}")
        confirmed = _run_and_kill(collector.url, path, events)
        say(f"2. the job tracked {len(confirmed)} of {events} events, then was SIGKILLed")
        _show_status(path, collector.counts()["unique"])
        say("3. the job runs again: on start it replays what the killed run left pending")
        _run(collector.url, path, 0)
        return _report(collector, confirmed, path)


def say(text: str) -> None:
    print(text, flush=True)


def _start_job(url: str, path: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _JOB, url, path, str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _run_and_kill(url: str, path: str, events: int) -> set[int]:
    job = _start_job(url, path, events)
    assert job.stdout is not None
    confirmed: set[int] = set()
    while len(confirmed) < events // 2:
        line = job.stdout.readline()
        if not line:
            break
        confirmed.add(int(line))
    job.send_signal(signal.SIGKILL)
    job.wait()
    for line in job.stdout.read().splitlines():  # printed before the kill, read after
        if line.strip().isdigit():
            confirmed.add(int(line))
    return confirmed


def _run(url: str, path: str, events: int) -> None:
    job = _start_job(url, path, events)
    job.communicate(timeout=120)


def _show_status(path: str, delivered: int) -> None:
    with Outbox(path, readonly=True) as outbox:
        stats = outbox.stats()
    say(f"   its outbox now (outbox-analytics status {path}):")
    say(f"     delivered so far {delivered:6}")
    say(f"     pending          {stats.pending:6}   (with the killed uploader's batch in flight)")
    say(f"     dead             {stats.dead:6}")


def _report(collector: Collector, confirmed: set[int], path: str) -> bool:
    deadline = time.monotonic() + 10
    while collector.counts()["unique"] < len(confirmed) and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = collector.counts()
    delivered = {message["properties"]["row"] for message in collector.messages()}
    lost = confirmed - delivered
    say("4. result")
    say(f"     tracked (confirmed)   {len(confirmed):6}")
    say(f"     delivered (unique)    {counts['unique']:6}")
    duplicates = counts["duplicates"]
    say(f"     duplicates            {duplicates:6}   (same messageId: in flight at the kill)")
    say(f"     lost                  {len(lost):6}")
    say(f"   the outbox file: {path}")
    return not lost
