"""Deadlines hold while another process writes: flush, stats, exit, and vacuum in steps.

A writer waiting for another process's lock must never hold what `flush()`,
`stats()` or the exit hook need; an operator's `vacuum` must never keep
`track()` waiting for more than a moment.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from outbox_analytics import Client, OutboxBusy
from outbox_analytics.cli import main
from outbox_analytics.store import Outbox, encode_message, maintenance

from .conftest import hold_write_lock, start_python


def test_flush_and_stats_return_on_time_while_another_process_holds_the_write_lock(
    make_client, receiver, outbox_file: Path
) -> None:
    client = make_client()
    for n in range(5):
        client.track("user", "Before", {"n": n})
    assert client.flush(timeout=10).pending == 0
    holder = hold_write_lock(outbox_file, 6)
    try:
        # The uploader now waits for the lock (to claim); nothing of ours may wait with it.
        started = time.monotonic()
        stats = client.stats()
        assert time.monotonic() - started < 1.0
        assert stats.pending == 0
        started = time.monotonic()
        client.flush(timeout=1)
        assert time.monotonic() - started < 2.0
        # A track() waits for the writer (it has to: it must commit before it returns)...
        done = threading.Event()
        threading.Thread(target=lambda: (client.track("user", "During"), done.set())).start()
        time.sleep(0.3)
        # ... and still stats() answers while it waits.
        started = time.monotonic()
        client.stats()
        assert time.monotonic() - started < 1.0
    finally:
        holder.kill()
        holder.wait()
    assert done.wait(10)
    assert client.flush(timeout=10).pending == 0
    assert [m["event"] for m in receiver.accepted()][-1] == "During"


EXITING = """
import os, sys, time
from outbox_analytics import Client

client = Client("k", host=sys.argv[1], outbox_path=sys.argv[2], upload_interval=0.05)
for n in range(5):
    client.track("user", "Numbered", {"n": n})
client.flush(timeout=10)
print("ready", flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
client.track("user", "Last")  # pending at exit: the hook tries, within its budget
print(time.monotonic(), flush=True)
"""


def test_exit_is_prompt_while_another_process_holds_the_write_lock(
    receiver, outbox_file: Path, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    process = start_python(EXITING, receiver.url, str(outbox_file), str(go))
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    holder = None
    try:
        go.touch()
        left_main = float(process.stdout.readline())
        holder = hold_write_lock(outbox_file, 8)
        process.wait(timeout=30)
        exited = time.monotonic()
        assert exited - left_main < 4.0  # the exit budget is 1 s; never the lock holder's 8
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    with Outbox(outbox_file, readonly=True) as outbox:
        events = [row.message["event"] for row in outbox.rows("all")]
    delivered = [m["event"] for m in receiver.accepted()]
    assert "Last" in events + delivered  # kept for the next run, or delivered


def fill_and_delete(path: Path, live: int, deleted: int) -> None:
    with Outbox(path, max_pending=10 * (live + deleted)) as outbox:
        blob = "x" * 300
        with outbox.batch():
            for n in range(deleted + live):
                outbox.append(encode_message({"type": "track", "messageId": f"m{n}", "b": blob}))
        lease = outbox.try_lease()
        assert lease is not None
        while (rows := lease.claim(500)) and rows[0].message["messageId"] != f"m{deleted}":
            lease.ack([row.id for row in rows if int(row.message["messageId"][1:]) < deleted])
            lease.release([row.id for row in rows if int(row.message["messageId"][1:]) >= deleted])
        lease.release([row.id for row in rows], attempts=0)
        lease.close()


VACUUM = """
import sys, time
from outbox_analytics.cli import main
started = time.monotonic()
code = main(["vacuum", sys.argv[1]])
print(code, time.monotonic() - started, flush=True)
"""


def test_vacuum_keeps_track_waiting_only_moments(tmp_path: Path) -> None:
    path = tmp_path / "big.sqlite3"
    fill_and_delete(path, live=60_000, deleted=60_000)
    client = Client("k", outbox_path=str(path), upload=False, max_queue_size=10**7)
    latencies: list[float] = []
    stop = threading.Event()

    def track_until_stopped() -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert client.track("user", "During vacuum")[0]
            latencies.append(time.monotonic() - started)

    tracker = threading.Thread(target=track_until_stopped)
    tracker.start()
    try:
        vacuum = start_python(VACUUM, str(path))
        out, err = vacuum.communicate(timeout=120)
    finally:
        stop.set()
        tracker.join(10)
    code, took = out.splitlines()[-1].split()
    assert code == "0", err
    # Old files were rebuilt in one transaction: track() waited for all of it.
    # Now no wait comes near the length of the whole vacuum.
    assert latencies and max(latencies) < min(0.5, float(took) / 3), (max(latencies), took)
    with Outbox(path, readonly=True) as outbox:
        assert outbox.stats().pending == 60_000 + len(latencies)
        assert outbox.database.scalar("PRAGMA freelist_count") == 0
    client.shutdown()


def test_an_old_file_is_rebuilt_only_while_no_uploader_is_alive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:  # an outbox made before incremental vacuuming
        conn.execute("PRAGMA journal_mode=WAL")
    with Outbox(path) as outbox:
        assert outbox.database.scalar("PRAGMA auto_vacuum") == 0
        outbox.append(encode_message({"type": "track", "messageId": "m"}))
        lease = outbox.try_lease()
        assert lease is not None
        with pytest.raises(OutboxBusy, match="stop the jobs"):
            maintenance.vacuum(outbox)
        lease.close()
    assert main(["vacuum", str(path)]) == 0
    capsys.readouterr()
    with Outbox(path) as outbox:
        assert outbox.database.scalar("PRAGMA auto_vacuum") == 2  # incremental from now on
        assert [row.message["messageId"] for row in outbox.rows()] == ["m"]
