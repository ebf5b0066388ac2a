"""Deadlines hold while another process writes: flush, stats, exit, and vacuum.

A writer waiting for another process's lock must never hold what `flush()`,
`stats()` or the exit hook need; an operator's `vacuum`, which rebuilds the
file, refuses while another process could be kept waiting by it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from outbox_analytics import OutboxBusy
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


WRITER = """
import sys, time
from outbox_analytics import Client
client = Client("k", outbox_path=sys.argv[1], upload=False)
client.track("user", "A writer is here")
print("open", flush=True)
time.sleep(60)
"""


def test_vacuum_refuses_while_another_process_writes_and_runs_when_none_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rebuild holds the write lock throughout: it must never make a writer wait for it."""
    path = tmp_path / "big.sqlite3"
    fill_and_delete(path, live=2_000, deleted=8_000)
    writer = start_python(WRITER, str(path))
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        before = path.read_bytes()
        assert main(["vacuum", str(path)]) == 75  # EX_TEMPFAIL: try again when the jobs have ended
        assert "open for writing" in capsys.readouterr().err
        assert path.read_bytes() == before  # nothing rebuilt
        with Outbox(path) as outbox, pytest.raises(OutboxBusy):
            maintenance.vacuum(outbox)
    finally:
        writer.kill()
        writer.wait()
    assert main(["vacuum", str(path)]) == 0  # the writer is gone: no one to keep waiting
    result = json.loads(capsys.readouterr().out)
    assert result["bytes_after"] < result["bytes_before"]
    with Outbox(path, readonly=True) as outbox:
        assert outbox.stats().pending == 2_001
        assert outbox.database.scalar("PRAGMA freelist_count") == 0
