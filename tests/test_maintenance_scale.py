"""Operator commands on a large outbox keep a writing job's track() quick (store/maintenance.py).

- Every write transaction of `import`, `requeue --all` and `purge` does a
  bounded amount of work, whatever the outbox's size: measured as SQLite's
  virtual machine steps between BEGIN IMMEDIATE and COMMIT on the command's
  own connection (a progress handler), against the steps of one read of the
  whole table. (Time is printed, not asserted: a noisy machine makes a timed
  bound fragile.)
- Meanwhile another process (a job) appends with `Outbox.append`; the
  slowest append is printed.
- `import` of one message into a large outbox builds no set of messageIds:
  Python's peak allocation stays far below the outbox's ids.
- Counts and order stay right across transactions.

The outboxes are real files, filled with SQL in one transaction (fast).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import outbox_analytics
from outbox_analytics.store import Outbox, encode_message, maintenance

# The checkout this process imported: the job's process imports the same one.
CODE = Path(outbox_analytics.__file__).resolve().parents[1]

ROWS = 150_000
STEPS_PER_CALL = 1_000  # the progress handler's period, in virtual machine steps


def _message(n: int) -> dict:
    return {
        "type": "track",
        "event": "Stored",
        "userId": "u",
        "messageId": f"m-{n}",
        "timestamp": "2026-01-02T03:04:05.000+00:00",
        "properties": {"n": n},
    }


def _fill(path: Path, numbers: range, status: int) -> None:
    """Rows straight into the table, in one transaction (an outbox made by Outbox first)."""
    Outbox(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO ack_queue_default (data, timestamp, status) VALUES (?, ?, ?)",
            ((encode_message(_message(n)), time.time() - 3600, status) for n in numbers),
        )
    conn.close()


@pytest.fixture(scope="module")
def dead_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "outbox.sqlite3"
    started = time.monotonic()
    _fill(path, range(ROWS), status=9)
    print(f"\n{ROWS} dead rows written in {time.monotonic() - started:.1f} s")
    return path


@pytest.fixture
def large(tmp_path: Path, dead_template: Path) -> Path:
    path = tmp_path / "outbox.sqlite3"
    shutil.copyfile(dead_template, path)
    return path


@dataclasses.dataclass
class Transactions:
    """The virtual machine steps of each write transaction on one connection."""

    steps: list[int] = dataclasses.field(default_factory=list)
    current: int | None = None

    def trace(self, sql: str) -> None:
        if sql == "BEGIN IMMEDIATE":
            self.current = 0
        elif sql in ("COMMIT", "ROLLBACK") and self.current is not None:
            self.steps.append(self.current)
            self.current = None

    def progress(self) -> int:
        if self.current is not None:
            self.current += STEPS_PER_CALL
        return 0  # go on


@pytest.fixture
def watched() -> Iterator[Callable[[Outbox], Transactions]]:
    """Count the steps of each write transaction of an outbox's connection."""
    connections: list[sqlite3.Connection] = []

    def watch(outbox: Outbox) -> Transactions:
        transactions = Transactions()
        conn = outbox.database.read(lambda conn: conn)
        conn.set_trace_callback(transactions.trace)
        conn.set_progress_handler(transactions.progress, STEPS_PER_CALL)
        connections.append(conn)
        return transactions

    yield watch
    for conn in connections:
        with contextlib.suppress(sqlite3.ProgrammingError):  # (closed with its outbox)
            conn.set_trace_callback(None)
            conn.set_progress_handler(None, 0)


# A running job: appends through an Outbox of its own until told to stop.
APPENDER = """
import json, os, sys, time
from outbox_analytics.store import Outbox, encode_message

outbox = Outbox(sys.argv[1])
data = encode_message({"type": "track", "event": "Meanwhile", "messageId": "-", "userId": "u"})
outbox.append(data)
print("ready", flush=True)
slowest, appended = 0.0, 0
while not os.path.exists(sys.argv[2]):
    started = time.perf_counter()
    outbox.append(data)
    slowest = max(slowest, time.perf_counter() - started)
    appended += 1
    time.sleep(0.002)
outbox.close()
print(json.dumps({"slowest": slowest, "appended": appended}), flush=True)
"""


def _run_beside_a_job(path: Path, work: Callable[[], object]) -> tuple[object, float, float]:
    """Run `work` while another process appends; (its result, seconds taken, slowest append)."""
    stop = path.with_name("stop")
    job = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(path), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(CODE)),
    )
    try:
        assert job.stdout is not None and job.stdout.readline().strip() == "ready"
        started = time.monotonic()
        result = work()
        took = time.monotonic() - started
        stop.touch()
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
        job.wait()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["appended"] > 0, err
    return result, took, report["slowest"]


def _command(outbox: Outbox, command: str) -> Callable[[], object]:
    return {
        "import": lambda: maintenance.import_messages(outbox, [_message(-2)]),
        "requeue --all": lambda: maintenance.requeue(outbox),
        "purge": lambda: maintenance.purge(outbox),
    }[command]


@pytest.mark.parametrize("command", ["import", "requeue --all", "purge"])
def test_no_write_transaction_grows_with_the_outbox(
    tmp_path: Path, large: Path, watched: Callable[[Outbox], Transactions], command: str
) -> None:
    small = tmp_path / "small.sqlite3"
    _fill(small, range(12_000), status=9)
    with Outbox(small) as outbox:
        on_small = watched(outbox)
        _command(outbox, command)()
    with Outbox(large) as outbox:
        on_large = watched(outbox)
        result, took, slowest = _run_beside_a_job(large, _command(outbox, command))
        written = len(on_large.steps)
        stats = outbox.stats()

    print(
        f"\n{command} on {ROWS} rows: {took:.2f} s in {written} write transactions of at most"
        f" {max(on_large.steps)} steps ({max(on_small.steps)} on 12,000 rows);"
        f" slowest append beside it {slowest * 1000:.0f} ms"
    )
    # 12.5 times the rows: no more work under the write lock at once (it was 12.5 times more).
    assert max(on_large.steps) <= 2 * max(on_small.steps) + 10 * STEPS_PER_CALL
    assert result == {"import": (1, 0), "requeue --all": ROWS, "purge": ROWS}[command]
    assert stats.dead == (ROWS if command == "import" else 0)
    if command == "requeue --all":
        assert stats.pending >= ROWS


@pytest.mark.parametrize("command", ["import", "requeue --all", "purge"])
def test_a_command_changes_at_most_5000_rows_per_transaction(
    tmp_path: Path, watched: Callable[[Outbox], Transactions], command: str
) -> None:
    """12,000 rows: three transactions, every row changed, in order, once."""
    path = tmp_path / "outbox.sqlite3"
    _fill(path, range(12_000), status=9)
    with Outbox(path) as outbox:
        transactions = watched(outbox)
        _change_12000_rows(outbox, command)
        assert len(transactions.steps) == 3, transactions.steps


def _change_12000_rows(outbox: Outbox, command: str) -> None:
    if command == "import":
        # 6,000 of them are there already; the input repeats one of the new ones.
        messages = [_message(n) for n in range(6_000, 24_000)] + [_message(20_000)]
        assert maintenance.import_messages(outbox, messages) == (12_000, 6_001)
        stored = [row.message["messageId"] for row in outbox.rows("pending")]
        assert stored == [f"m-{n}" for n in range(12_000, 24_000)]  # in order, each once
    elif command == "requeue --all":
        assert maintenance.requeue(outbox) == 12_000
        pending = [row.message["properties"]["n"] for row in outbox.rows("pending")]
        assert pending == list(range(12_000))
    else:
        assert maintenance.purge(outbox) == 12_000
        assert outbox.stats().dead == 0 and not list(outbox.rows("all"))


def test_import_of_one_message_builds_no_set_of_the_outboxs_ids(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _fill(path, range(100_000), status=0)
    with Outbox(path) as outbox:
        tracemalloc.start()
        try:
            assert maintenance.import_messages(outbox, [_message(5)]) == (0, 1)  # a duplicate
            assert maintenance.import_messages(outbox, [_message(-5)]) == (1, 0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    print(f"\nimport into 100,000 rows: peak {peak / 2**20:.1f} MiB allocated by Python")
    # A set of 100,000 messageIds alone takes about 9 MiB.
    assert peak < 2 * 2**20
