"""Files that are not ours are refused, left byte for byte, with advice (store/schema.py inspect).

- A persist-queue file in its default format (pickle), made by persist-queue
  itself: every writing command and Client() refuse it, saying how to bring
  its events in (`import`); nothing is added to it, and persist-queue still
  reads its three items. Reading commands refuse it too: its values are
  never unpickled (that would run code from the file), so there is nothing
  they could show.
- The same for another queue name, the JSON serializer, an empty queue
  (its format cannot be told), and another program's database.
- Still ours: a persist-queue file of msgpack messages (adopted, as before),
  and an SQLite file with no tables at all (initialised).
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import persistqueue
import persistqueue.serializers.json
import persistqueue.serializers.msgpack
import pytest

import outbox_analytics
from outbox_analytics import Client
from outbox_analytics.cli import main

ITEMS = [
    {
        "type": "track",
        "event": "Old",
        "userId": "u",
        "messageId": f"pq-{n}",
        "timestamp": "2026-01-02T03:04:05.000+00:00",
    }
    for n in range(3)
]
ADVICE = "outbox-analytics import"


def _queue(path: Path, **options: object) -> persistqueue.SQLiteAckQueue:
    return persistqueue.SQLiteAckQueue(
        str(path.parent), db_file_name=path.name, auto_commit=True, **options
    )


def pickle_queue(path: Path) -> None:
    """persist-queue as its users make it: the default serializer (pickle)."""
    queue = _queue(path)
    for item in ITEMS:
        queue.put(item)
    del queue


def named_queue(path: Path) -> None:
    queue = _queue(path, name="jobs")
    for item in ITEMS:
        queue.put(item)
    del queue


def json_queue(path: Path) -> None:
    queue = _queue(path, serializer=persistqueue.serializers.json)
    for item in ITEMS:
        queue.put(item)
    del queue


def empty_queue(path: Path) -> None:
    queue = _queue(path)
    del queue


def another_program(path: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()


FOREIGN = [pickle_queue, named_queue, json_queue, empty_queue, another_program]


def _listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _run(*args: object) -> tuple[int, str, str]:
    """The command line, in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _commands(path: Path, events: Path) -> list[tuple[object, ...]]:
    writing = [
        ("drain", path, "--write-key", "k", "--host", "http://127.0.0.1:9", "--timeout", "5"),
        ("vacuum", path),
        ("import", path, events),
        ("requeue", path, "--all", "--yes"),
        ("purge", path, "--state", "dead", "--yes"),
        ("track", path, "--write-key", "k", "--user-id", "u", "--event", "E"),
    ]
    reading = [("status", path), ("list", path), ("export", path), ("check", path)]
    return writing + reading


@pytest.mark.parametrize("make", FOREIGN, ids=lambda make: make.__name__)
def test_every_command_refuses_a_foreign_file_and_changes_nothing(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    path = tmp_path / "queue.db"
    make(path)
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    before = _listing(tmp_path)

    for command in _commands(path, events):
        code, out, err = _run(*command)
        assert code == 2, (command, code, out, err)
        assert "not an outbox" in err and str(path) in err, (command, err)
        if make is not empty_queue:
            assert ADVICE in err, (command, err)
        assert _listing(tmp_path) == before, command  # not a byte, no -wal or -shm

    with pytest.raises(outbox_analytics.NotAnOutbox) as raised:
        Client("k", outbox_path=str(path), upload=False)
    assert raised.value.path == str(path)
    assert _listing(tmp_path) == before


def test_persist_queue_still_reads_its_items_after_every_command(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    pickle_queue(path)
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({**ITEMS[0], "messageId": "new"}) + "\n")
    for command in _commands(path, events):
        _run(*command)
    with pytest.raises(outbox_analytics.NotAnOutbox, match=ADVICE):
        Client("k", outbox_path=str(path), upload=False)

    queue = _queue(path)
    assert [queue.get(block=False) for _ in range(queue.qsize())] == ITEMS
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    assert not tables & {"outbox_meta", "outbox_taken", "requires_outbox_analytics_0_2"}  # ours


def test_the_advice_works(tmp_path: Path) -> None:
    """What the message says to do: items as JSON lines, imported into an outbox of their own."""
    path = tmp_path / "queue.db"
    pickle_queue(path)
    code, _, err = _run("status", path)
    assert code == 2 and ADVICE in err
    queue = _queue(path)  # (the operator's own code, which trusts its own pickles)
    lines = tmp_path / "items.jsonl"
    lines.write_text("".join(json.dumps(queue.get(block=False)) + "\n" for _ in range(3)))
    outbox = tmp_path / "outbox.sqlite3"
    code, out, err = _run("import", outbox, lines)
    assert (code, json.loads(out)) == (0, {"imported": 3, "skipped": 0}), err


def test_a_persist_queue_file_of_msgpack_messages_is_still_adopted(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    queue = _queue(path, serializer=persistqueue.serializers.msgpack)
    for item in ITEMS:
        queue.put(item)
    del queue
    code, out, _ = _run("status", path, "--json")
    assert code == 0 and json.loads(out)["pending"] == 3
    client = Client("k", outbox_path=str(path), upload=False)
    assert client.stats().pending == 3
    client.shutdown()


def test_an_sqlite_file_without_tables_is_made_an_outbox(tmp_path: Path) -> None:
    path = tmp_path / "blank.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE scratch (x)")
    conn.execute("DROP TABLE scratch")  # an SQLite header, no table
    conn.close()
    client = Client("k", outbox_path=str(path), upload=False)
    assert client.track("u", "First")[0]
    client.shutdown()
    code, out, _ = _run("status", path, "--json")
    assert code == 0 and json.loads(out)["pending"] == 1


def test_a_row_another_program_inserted_without_a_status_is_pending_and_sent(
    outbox_file: Path, make_client, receiver
) -> None:
    """A hand-written INSERT leaves status NULL: it was counted as pending, never
    claimed, and no command could send or remove it (shutdown said, forever, that
    an event was left)."""
    storing = make_client(upload=False)
    storing.track("u", "Stored")
    storing.track("u", "Stored")
    storing.shutdown()
    hand = {"type": "track", "event": "By Hand", "userId": "u", "messageId": "hand-1"}
    with contextlib.closing(sqlite3.connect(outbox_file)) as db, db:
        db.execute(
            "INSERT INTO ack_queue_default (data, timestamp) VALUES (?, 0)",
            (persistqueue.serializers.msgpack.dumps(hand),),
        )
    code, out, _ = _run("list", outbox_file, "--jsonl")
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and listed[-1]["event"] == "By Hand"
    assert listed[-1]["_outbox"]["state"] == "pending"

    client = make_client()
    assert client.stats().pending == 3
    result = client.flush(timeout=10)
    assert (result.sent, result.pending) == (3, 0)
    assert client.stats().pending == 0
    assert [m["messageId"] for m in receiver.accepted()][-1] == "hand-1"
