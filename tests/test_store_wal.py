"""The write-ahead log stays bounded, and `status` says when a reader pins it.

A reader holding a snapshot (the sqlite3 shell left in a transaction, a
backup agent) keeps every frame written since from being copied back, so the
-wal grows while a job writes. Once the reader is gone, the log is back under
its bound soon (not at the job's end); while it is held, `Outbox.stats()`
and `outbox-analytics status` say so. The bound is lowered here through the
module constant to keep the test quick (so the command line runs in this
process, which sees it); the reader is a real second process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from outbox_analytics import cli
from outbox_analytics.store import Outbox, connection
from outbox_analytics.store import outbox as outbox_module

BOUND = 256 * 1024
PAYLOAD = b"\xa1x" + b"p" * 1000  # (any bytes: the outbox stores what it is given)

READER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT count(*) FROM ack_queue_default").fetchone()  # the snapshot, held
print("reading", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
conn.close()
"""


@pytest.fixture
def small_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "WAL_LIMIT_BYTES", BOUND)
    monkeypatch.setattr(outbox_module, "_WAL_CHECK_INTERVAL", 0.0)


def start_reader(path: Path) -> subprocess.Popen[str]:
    """A second process holding a read transaction until its stdin closes."""
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
    return reader


def wal_size(path: Path) -> int:
    try:
        return os.path.getsize(str(path) + "-wal")
    except FileNotFoundError:
        return 0


def status(capsys: pytest.CaptureFixture[str], path: Path, *options: str) -> str:
    """`outbox-analytics status PATH`'s output, run in this process."""
    capsys.readouterr()
    assert cli.main(["status", str(path), *options]) == 0
    return capsys.readouterr().out


def status_json(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(status(capsys, path, "--json"))
    return document


def test_a_reader_pins_the_wal_it_is_reported_and_cut_back_once_the_reader_leaves(
    tmp_path: Path, small_bound: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    try:
        outbox.append(PAYLOAD)
        reader = start_reader(path)
        try:
            for _ in range(1000):  # about 4 times the bound of appends
                outbox.append(PAYLOAD)
            assert wal_size(path) > 3 * BOUND  # the job could not cut it back
            pinned = outbox.stats().wal_pinned_since
            assert pinned is not None and time.time() - pinned < 60
            # `status`, through the note in the file (the CLI opens it read-only).
            assert status_json(capsys, path)["wal_pinned_since"] == pinned
            table = status(capsys, path)
            assert "log pinned" in table and "by a reader's open transaction" in table
        finally:
            assert reader.stdin is not None
            reader.stdin.close()  # the reader commits and leaves
            assert reader.wait(timeout=10) == 0
        deadline = time.monotonic() + 5
        while wal_size(path) > BOUND and time.monotonic() < deadline:
            outbox.append(PAYLOAD)  # a job that keeps writing
            time.sleep(0.01)
        assert wal_size(path) <= BOUND
        assert outbox.stats().wal_pinned_since is None
        assert status_json(capsys, path)["wal_pinned_since"] is None
        assert "log pinned" not in status(capsys, path)
        assert outbox.stats().pending == outbox.last_id()  # nothing lost on the way
    finally:
        outbox.close()


def test_writers_set_the_bound_on_their_connections(tmp_path: Path) -> None:
    """SQLite itself cuts the log back to the bound each time it starts it afresh."""
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        limit = outbox.database.scalar("PRAGMA journal_size_limit")
    assert limit == connection.WAL_LIMIT_BYTES == 20 * 1024 * 1024


def test_a_wal_over_the_bound_with_no_reader_is_cut_back_at_once(
    tmp_path: Path, small_bound: None
) -> None:
    """No reader: the first look after the log passed the bound empties it."""
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as outbox:
        sizes = []
        for _ in range(600):  # about 2.4 times the bound of appends
            outbox.append(PAYLOAD)
            sizes.append(wal_size(path))
        assert max(sizes) <= BOUND + 8 * 1024  # (one commit's frames past it, at most)
        assert outbox.stats().wal_pinned_since is None
