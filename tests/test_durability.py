"""What survives a SIGKILL: real subprocesses, killed at real moments."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from outbox_analytics.store import Outbox, encode_message

from .conftest import start_python

TRACKER = """
import sys
from outbox_analytics import Client

client = Client("k", outbox_path=sys.argv[1], upload=False, fsync=sys.argv[2] == "fsync")
number = 0
while True:
    ok, msg = client.track("user", "Tick", {"n": number})
    assert ok
    # Printed only once track() has returned: the event is committed.
    print(number, msg["messageId"], msg["timestamp"], flush=True)
    number += 1
"""


@pytest.mark.parametrize("durability", ["default", "fsync"])
@pytest.mark.parametrize("attempt", range(3))
def test_every_returned_event_survives_sigkill(
    outbox_file: Path, durability: str, attempt: int
) -> None:
    tracker = start_python(TRACKER, str(outbox_file), durability)
    assert tracker.stdout is not None
    confirmed: list[tuple[int, str, str]] = []
    deadline = time.monotonic() + random.uniform(0.3, 1.5)
    while time.monotonic() < deadline or len(confirmed) < 20:
        number, message_id, timestamp = tracker.stdout.readline().split()
        confirmed.append((int(number), message_id, timestamp))
    tracker.send_signal(signal.SIGKILL)
    tracker.wait()
    # Lines the child printed before it died are confirmed events too; the kill
    # may cut the last line short (its event returned, but is not counted).
    for line in tracker.stdout.read().splitlines():
        fields = line.split()
        if len(fields) == 3 and len(fields[2]) == len(confirmed[0][2]):
            confirmed.append((int(fields[0]), fields[1], fields[2]))

    with Outbox(outbox_file) as outbox:
        stored = [
            (r.message["properties"]["n"], r.message["messageId"], r.message["timestamp"])
            for r in outbox.rows("all")
        ]
    # Everything confirmed is there, in order, unchanged; at most the one
    # event whose commit raced the kill is there unconfirmed.
    assert stored[: len(confirmed)] == confirmed
    assert len(stored) - len(confirmed) in (0, 1)
    assert [n for n, _, _ in stored] == list(range(len(stored)))


BATCHER = """
import sys, time
from outbox_analytics import Client

client = Client("k", outbox_path=sys.argv[1], upload=False)
client.track("user", "Before")
with client.batch():
    for number in range(500):
        client.track("user", "Inside", {"n": number})
    print("inside", flush=True)
    time.sleep(60)
"""


@pytest.mark.every_python
def test_a_kill_inside_batch_stores_none_of_the_block(outbox_file: Path) -> None:
    batcher = start_python(BATCHER, str(outbox_file))
    assert batcher.stdout is not None
    assert batcher.stdout.readline().strip() == "inside"
    batcher.send_signal(signal.SIGKILL)
    batcher.wait()
    with Outbox(outbox_file) as outbox:
        assert [r.message["event"] for r in outbox.rows("all")] == ["Before"]


CLAIMER = """
import sys, time
from outbox_analytics.store import Outbox

outbox = Outbox(sys.argv[1])
lease = outbox.try_lease()
rows = lease.claim(3)
print(" ".join(str(r.id) for r in rows), flush=True)
time.sleep(60)
"""


@pytest.mark.every_python
def test_in_flight_rows_of_a_live_uploader_are_left_and_of_a_dead_one_reclaimed(
    outbox_file: Path,
) -> None:
    with Outbox(outbox_file) as outbox:
        for number in range(5):
            outbox.append(encode_message({"n": number}))
    uploader = start_python(CLAIMER, str(outbox_file))
    assert uploader.stdout is not None
    claimed = uploader.stdout.readline().split()
    assert len(claimed) == 3

    with Outbox(outbox_file) as outbox:
        # The holder is alive: no lease for us, and its rows stay in flight.
        assert outbox.try_lease() is None
        assert outbox.stats().inflight == 3

        uploader.send_signal(signal.SIGKILL)
        uploader.wait()
        # Its lease died with it; taking it over reclaims the rows, in order.
        lease = outbox.try_lease()
        assert lease is not None
        assert outbox.stats().inflight == 0
        assert [r.message["n"] for r in lease.claim(10)] == [0, 1, 2, 3, 4]
        lease.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.every_python
def test_a_forked_child_stores_through_its_own_connection(outbox_file: Path) -> None:
    from outbox_analytics import Client

    client = Client("k", outbox_path=str(outbox_file), upload=False)
    client.track("parent", "Before fork")
    pid = os.fork()
    if pid == 0:  # the child: exit without running pytest's teardown
        try:
            ok = all(client.track("child", "In child", {"n": n})[0] for n in range(50))
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    client.track("parent", "After fork")
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    events = [r.message["event"] for r in client.outbox.rows()]
    assert events.count("In child") == 50
    assert events[0] == "Before fork" and "After fork" in events
    client.shutdown()
