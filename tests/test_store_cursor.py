"""The claim cursor, kept ids and exact counts, without an index of pending rows.

Claims start at a cursor kept in the file instead of reading an index that
every append had to write; delivered rows are deleted but the highest id
stays as a tombstone. These tests hold the storage to a model: whatever the
order of appends, claims, acks, releases, dead-letters, requeues and purges,
from one or several `Outbox` objects, claims return the oldest pending rows
in order, counts are exact and ids never go back.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import persistqueue
import persistqueue.serializers.msgpack
import pytest

from outbox_analytics import Client
from outbox_analytics.store import Outbox, UploadLease, encode_message, maintenance, schema


def _message(number: int) -> bytes:
    return encode_message({"type": "track", "messageId": f"m-{number}", "n": number})


def _lease(outbox: Outbox) -> UploadLease:
    lease = outbox.try_lease()
    assert lease is not None
    return lease


class _Model:
    """What the outbox should hold: id -> state, in id order."""

    def __init__(self) -> None:
        self.state: dict[int, str] = {}
        self.highest = 0

    def pending(self) -> list[int]:
        return sorted(i for i, s in self.state.items() if s == "pending")

    def of(self, state: str) -> list[int]:
        return sorted(i for i, s in self.state.items() if s == state)


def _check(outbox: Outbox, model: _Model) -> None:
    stats = outbox.stats()
    assert (stats.pending, stats.inflight, stats.dead) == (
        len(model.pending()),
        len(model.of("inflight")),
        len(model.of("dead")),
    )
    assert [row.id for row in outbox.rows("pending")] == model.pending()
    head = outbox.head(10_000)
    assert head.pending == len(model.pending())
    assert outbox.last_id() == model.highest
    assert maintenance.check(outbox) == []


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_the_model(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "outbox.sqlite3"
    uploader_side = Outbox(path)
    operator_side = Outbox(path)  # requeue and purge come from "another process"
    lease = _lease(uploader_side)
    model = _Model()
    try:
        for _ in range(250):
            action = rng.choice(
                ["append", "append", "batch", "claim", "claim", "ack", "release", "dead",
                 "requeue", "purge"]
            )  # fmt: skip
            inflight = model.of("inflight")
            if action == "append":
                row_id = uploader_side.append(_message(model.highest + 1))
                assert row_id == model.highest + 1  # ids only go up, one by one
                model.highest = row_id
                model.state[row_id] = "pending"
            elif action == "batch":
                with operator_side.batch():
                    for _ in range(rng.randint(1, 20)):
                        operator_side.append(_message(0))
                for _ in range(operator_side.last_id() - model.highest):
                    model.highest += 1
                    model.state[model.highest] = "pending"
            elif action == "claim":
                count = rng.randint(1, 15)
                claimed = [row.id for row in lease.claim(count)]
                assert claimed == model.pending()[:count]  # the oldest, in order
                model.state.update(dict.fromkeys(claimed, "inflight"))
            elif action in ("ack", "release", "dead") and inflight:
                chosen = rng.sample(inflight, rng.randint(1, len(inflight)))
                if action == "ack":
                    assert lease.ack(chosen) == len(chosen)
                    for row_id in chosen:
                        del model.state[row_id]
                elif action == "release":
                    lease.release(chosen, attempts=rng.choice([0, 1]))
                    model.state.update(dict.fromkeys(chosen, "pending"))
                else:
                    lease.dead_letter(chosen, status=400, error="bad")
                    model.state.update(dict.fromkeys(chosen, "dead"))
            elif action == "requeue" and model.of("dead"):
                dead = model.of("dead")
                chosen = rng.sample(dead, rng.randint(1, len(dead)))
                assert maintenance.requeue(operator_side, chosen) == len(chosen)
                model.state.update(dict.fromkeys(chosen, "pending"))
            elif action == "purge":
                assert maintenance.purge(operator_side) == len(model.of("dead"))
                for row_id in model.of("dead"):
                    del model.state[row_id]
            _check(uploader_side, model)
        # A restart: whatever was in flight is reclaimed, in place.
        lease.close()
        lease = _lease(operator_side)
        model.state.update(dict.fromkeys(model.of("inflight"), "pending"))
        _check(operator_side, model)
        assert [row.id for row in lease.claim(100_000)] == model.pending()
    finally:
        lease.close()
        uploader_side.close()
        operator_side.close()


def test_the_highest_id_survives_purging_and_acking_the_newest_rows(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        lease = _lease(outbox)
        for number in range(3):
            outbox.append(_message(number))
        lease.dead_letter([row.id for row in lease.claim(3)], status=400, error="bad")
        assert maintenance.purge(outbox) == 3
        assert outbox.append(_message(3)) == 4  # not 1
        lease.ack([row.id for row in lease.claim(1)])
        assert outbox.append(_message(4)) == 5  # not 4
        assert outbox.stats().pending == 1
        lease.close()


def test_dead_rows_at_the_head_are_stepped_over_once(tmp_path: Path) -> None:
    """After the first claim passes them, claims start beyond: the cursor is kept in the file."""
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as outbox:
        with outbox.batch():
            for number in range(300):
                outbox.append(_message(number))
        lease = _lease(outbox)
        lease.dead_letter([row.id for row in lease.claim(200)], status=400, error="bad")
        lease.close()
    with Outbox(path) as reopened:
        lease = _lease(reopened)
        cursor = reopened.database.scalar(f"SELECT {schema.CURSOR}")
        assert cursor == 201  # the next claim reads no dead row
        assert [row.id for row in lease.claim(5)] == [201, 202, 203, 204, 205]
        lease.close()


def _strand_in_flight_rows(path: Path, count: int, noted: bool = True) -> None:
    """Claim rows, then let persist-queue's auto_resume make them pending behind the cursor.

    Not `noted`: as if the trigger had not seen it (a program that dropped it,
    a version of this library older than the trigger).
    """
    with Outbox(path) as outbox:
        for number in range(count):
            outbox.append(_message(number))
        lease = _lease(outbox)
        assert len(lease.claim(count)) == count
        # persist-queue's "resume unacknowledged" sets status 1 without knowing the cursor.
        persistqueue.SQLiteAckQueue(
            str(path.parent),
            db_file_name=path.name,
            serializer=persistqueue.serializers.msgpack,
            auto_resume=True,
        )
        lease.close()
        if not noted:
            outbox.database.execute(f"DELETE FROM outbox_meta WHERE key = '{schema.STRANDED_FROM}'")


def test_rows_stranded_by_another_program_are_counted_checked_and_claimed(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _strand_in_flight_rows(path, 5)
    with Outbox(path) as outbox:
        assert outbox.stats().pending == 5  # counts do not depend on the cursor
        assert outbox.count_unfinished(outbox.last_id()) == 5  # nor what a flush waits for
        problems = maintenance.check(outbox)
        assert len(problems) == 1 and "below the claim cursor" in problems[0]
        lease = _lease(outbox)
        # The trigger noted where they are: the next claim goes back for them.
        assert [row.message["n"] for row in lease.claim(10)] == [0, 1, 2, 3, 4]
        assert lease.find_stranded() is None
        lease.close()


def test_rows_stranded_unseen_by_the_trigger_are_found_by_a_look(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _strand_in_flight_rows(path, 5, noted=False)
    with Outbox(path) as outbox:
        lease = _lease(outbox)
        assert lease.claim(10) == []  # claims start past them
        problems = maintenance.check(outbox)
        assert len(problems) == 1 and "below the claim cursor" in problems[0]
        assert lease.find_stranded() == 1
        assert [row.message["n"] for row in lease.claim(10)] == [0, 1, 2, 3, 4]
        assert lease.find_stranded() is None
        lease.close()


@pytest.mark.parametrize("status", [None, 0])
def test_a_drain_sends_a_dead_row_another_program_made_pending(
    tmp_path: Path, receiver, status: int | None
) -> None:
    """Set to NULL below the cursor, the trigger missed it (counted as 0, never sent);
    set to 0, it was counted but only an idle thread's look, once a minute, found it:
    drain() and the CLI's drain said it was stored after they began."""
    from .receiver import Reply

    path = tmp_path / "outbox.sqlite3"
    receiver.responder = lambda request: Reply(400 if request.batch[0]["event"] == "Bad" else 200)
    client = Client("k", host=receiver.url, outbox_path=str(path), upload=False)
    for event in ("A", "Bad", "B"):
        client.track("u", event)
    client.shutdown()
    client = Client("k", host=receiver.url, outbox_path=str(path), upload_size=1, sync_mode=True)
    assert client.drain(timeout=10).dead == 1
    receiver.responder = lambda request: Reply()
    with sqlite3.connect(path) as db:  # the other program
        db.execute("UPDATE ack_queue_default SET status = ? WHERE status = 9", (status,))
    db.close()
    assert client.stats().pending == 1
    result = client.drain(timeout=10)
    assert (result.sent, result.pending) == (1, 0) and client.stats().pending == 0
    client.shutdown()
    assert [m["event"] for m in receiver.accepted()] == ["A", "B", "Bad"]


def test_an_idle_uploader_sends_rows_stranded_behind_the_cursor(tmp_path: Path, receiver) -> None:
    path = tmp_path / "outbox.sqlite3"
    _strand_in_flight_rows(path, 5, noted=False)
    client = Client("k", host=receiver.url, outbox_path=str(path), upload_interval=0.05)
    assert client.uploader is not None
    client.track("u", "Starts the uploader", {"n": 5})  # (stranded rows alone do not)
    deadline = time.monotonic() + 10
    while client.uploader.stranded_found == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # (until then, only counts see them: flush reads from the cursor)
    result = client.flush(timeout=10)
    stats = client.stats()
    found = client.uploader.stranded_found
    client.shutdown()
    assert result.pending == 0 and stats is not None and stats.pending == 0
    assert found == 1
    received = sorted(m.get("n", m.get("properties", {}).get("n")) for m in receiver.accepted())
    assert received == [0, 1, 2, 3, 4, 5]


# -- files of older versions ---------------------------------------------------------


def _file_of_version_0_1(path: Path) -> None:
    """A file as 0.1 left it: AUTOINCREMENT, an index of pending rows, the newest rows acked."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        f"CREATE TABLE {schema.TABLE} (_id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " data BLOB, timestamp FLOAT, status INTEGER)"
    )
    for name, decl in schema.EXTRA_COLUMNS.items():
        conn.execute(f"ALTER TABLE {schema.TABLE} ADD COLUMN {name} {decl}")
    conn.execute(f"CREATE INDEX outbox_pending ON {schema.TABLE} (_id) WHERE status < 2")
    conn.execute(f"CREATE INDEX outbox_taken ON {schema.TABLE} (status) WHERE status >= 2")
    conn.execute("CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    conn.execute("INSERT INTO outbox_meta VALUES ('schema_version', 1), ('dropped', 3)")
    for number in range(1, 11):
        conn.execute(
            f"INSERT INTO {schema.TABLE} (data, timestamp, status) VALUES (?, 1.0, 0)",
            (_message(number),),
        )
    conn.execute(f"UPDATE {schema.TABLE} SET status = 9, attempts = 2 WHERE _id IN (1, 2)")
    conn.execute(f"DELETE FROM {schema.TABLE} WHERE _id IN (3, 9, 10)")  # delivered
    conn.close()


def test_a_file_of_0_1_is_migrated_once_keeping_rows_ids_and_the_highest_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite3"
    _file_of_version_0_1(path)
    with Outbox(path) as outbox:
        assert [row.id for row in outbox.rows("pending")] == [4, 5, 6, 7, 8]
        assert [(row.id, row.attempts) for row in outbox.rows("dead")] == [(1, 2), (2, 2)]
        assert outbox.stats().dropped == 3
        assert outbox.append(_message(11)) == 11  # 9 and 10 were used: AUTOINCREMENT's mark
        lease = _lease(outbox)
        assert [row.id for row in lease.claim(100)] == [4, 5, 6, 7, 8, 11]
        lease.close()
    conn = sqlite3.connect(path)
    names = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    table_sql = conn.execute(
        "SELECT sql FROM sqlite_master WHERE name = ?", (schema.TABLE_NAME,)
    ).fetchone()[0]
    conn.close()
    assert "outbox_pending" not in names and schema.NEWER_THAN_0_1 in names
    assert "AUTOINCREMENT" not in table_sql.upper()


def test_plain_persist_queue_still_reads_a_migrated_file_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _file_of_version_0_1(path)
    Outbox(path).close()
    queue = persistqueue.SQLiteAckQueue(
        str(tmp_path),
        db_file_name=path.name,
        serializer=persistqueue.serializers.msgpack,
        auto_resume=False,
    )
    assert [queue.get(block=False)["n"] for _ in range(queue.qsize())] == [4, 5, 6, 7, 8]


MIGRATE = """
import sys
from outbox_analytics.store import Outbox
print("opening", flush=True)
Outbox(sys.argv[1]).close()
print("migrated", flush=True)
"""


def test_a_migration_killed_at_any_moment_keeps_every_row_and_the_highest_id(
    tmp_path: Path,
) -> None:
    """The rebuild is one transaction: killed, it leaves the 0.1 file as it was."""
    import os
    import signal
    import subprocess
    import sys

    path = tmp_path / "outbox.sqlite3"
    _file_of_version_0_1(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")  # a bigger file: the rebuild takes a while (0.4 s)
    conn.executemany(
        f"INSERT INTO {schema.TABLE} (data, timestamp, status) VALUES (?, 1.0, 0)",
        [(_message(n),) for n in range(11, 200_011)],
    )
    conn.execute(f"DELETE FROM {schema.TABLE} WHERE _id > 200000")  # the newest delivered
    conn.execute("COMMIT")
    conn.close()
    rng = random.Random(13)
    killed = 0
    for _ in range(6):
        process = subprocess.Popen(
            [sys.executable, "-c", MIGRATE, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert process.stdout is not None
        assert process.stdout.readline() == "opening\n"
        time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
        killed += process.wait() == -signal.SIGKILL
    assert killed >= 1  # (some may have finished first: that is fine too)
    with Outbox(path) as outbox:
        pending = [row.id for row in outbox.rows("pending")]
        assert pending == [4, 5, 6, 7, 8, *range(11, 200_001)]
        assert [row.id for row in outbox.rows("dead")] == [1, 2]
        assert outbox.append(_message(0)) == 200_011  # AUTOINCREMENT's mark kept


def test_a_version_3_file_gets_the_trigger_that_sees_null_statuses(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as outbox:
        outbox.append(_message(0))
    with sqlite3.connect(path) as db:  # as version 3 left it
        (text,) = db.execute(
            "SELECT sql FROM sqlite_master WHERE name = ?", (schema.STRANDED_TRIGGER,)
        ).fetchone()
        db.execute(f"DROP TRIGGER {schema.STRANDED_TRIGGER}")
        db.execute(text.replace("ifnull(NEW.status, 0) < 2", "NEW.status < 2"))
        db.execute("UPDATE outbox_meta SET value = 3 WHERE key = 'schema_version'")
    db.close()
    with Outbox(path) as outbox:
        trigger = outbox.database.scalar(
            "SELECT sql FROM sqlite_master WHERE name = ?", (schema.STRANDED_TRIGGER,)
        )
        assert "ifnull(NEW.status, 0) < 2" in trigger
        assert [row.message["n"] for row in outbox.rows("pending")] == [0]
