"""The outbox file: its operations, its compatibility with persist-queue, its guards."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import persistqueue
import persistqueue.serializers.msgpack
import pytest

from outbox_analytics import Client, OutboxError, OutboxFull
from outbox_analytics.store import (
    Outbox,
    UploadLease,
    default_outbox_path,
    encode_message,
    maintenance,
)


def message(number: int) -> dict:
    return {"type": "track", "event": "E", "messageId": f"m-{number}", "properties": {"n": number}}


def fill(outbox: Outbox, count: int, start: int = 0) -> None:
    for number in range(start, start + count):
        outbox.append(encode_message(message(number)))


def lease_of(outbox: Outbox) -> UploadLease:
    lease = outbox.try_lease()
    assert lease is not None
    return lease


def numbers(rows) -> list[int]:
    return [row.message["properties"]["n"] for row in rows]


@pytest.mark.every_python
def test_messages_survive_a_reopen_in_order(store_only: Client, outbox_file: Path) -> None:
    sent = [store_only.track("u", "Event", {"n": n})[1] for n in range(50)]
    store_only.shutdown()

    reopened = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    stored = [row.message for row in reopened.outbox.rows("pending")]
    reopened.shutdown()
    assert stored == sent


def test_plain_persist_queue_reads_the_pending_messages_in_order(
    store_only: Client, outbox_file: Path
) -> None:
    sent = [store_only.track("u", "Event", {"n": n, "tags": ["a", "b"]})[1] for n in range(20)]
    store_only.shutdown()

    queue = persistqueue.SQLiteAckQueue(
        str(outbox_file.parent),
        db_file_name=outbox_file.name,
        serializer=persistqueue.serializers.msgpack,
        auto_resume=False,
    )
    read = [queue.get(block=False) for _ in range(queue.qsize())]
    # persist-queue's msgpack loader gives tuples for arrays.
    assert [item["messageId"] for item in read] == [m["messageId"] for m in sent]
    assert [item["properties"]["tags"] for item in read] == [("a", "b")] * 20
    assert queue.qsize() == 0


def test_a_file_written_by_persist_queue_is_adopted(outbox_file: Path) -> None:
    queue = persistqueue.SQLiteAckQueue(
        str(outbox_file.parent),
        db_file_name=outbox_file.name,
        serializer=persistqueue.serializers.msgpack,
    )
    for number in range(3):
        queue.put(message(number))
    del queue

    with Outbox(outbox_file) as outbox:
        lease = lease_of(outbox)
        fill(outbox, 2, start=3)
        assert numbers(outbox.rows()) == [0, 1, 2, 3, 4]
        assert numbers(lease.claim(10)) == [0, 1, 2, 3, 4]


@pytest.mark.every_python
def test_claim_ack_release_and_dead_letter(outbox_file: Path) -> None:
    with Outbox(outbox_file) as outbox:
        lease = lease_of(outbox)
        fill(outbox, 10)
        first = lease.claim(4)
        assert numbers(first) == [0, 1, 2, 3]
        assert numbers(lease.claim(3)) == [4, 5, 6]  # in-flight rows are not claimed twice
        assert outbox.stats().inflight == 7

        assert lease.ack([row.id for row in first[:2]]) == 2
        lease.dead_letter([first[2].id], status=400, error="bad event")
        lease.release([first[3].id], status=503, error="unavailable", next_attempt_at=123.0)
        stats = outbox.stats()
        assert (stats.pending, stats.inflight, stats.dead) == (4, 3, 1)

        # The released row keeps its place: it is first again, with its history.
        again = lease.claim(2)
        assert numbers(again) == [3, 7]
        assert (again[0].attempts, again[0].last_status, again[0].last_error) == (
            1,
            503,
            "unavailable",
        )
        assert again[0].next_attempt_at == 123.0
        dead = list(outbox.rows("dead"))
        assert numbers(dead) == [2]
        assert (dead[0].last_status, dead[0].last_error, dead[0].attempts) == (400, "bad event", 1)

        assert maintenance.requeue(outbox) == 1
        assert numbers(outbox.rows("pending")) == [2, 8, 9]


def test_ack_only_touches_rows_in_flight(outbox_file: Path) -> None:
    with Outbox(outbox_file) as outbox:
        lease = lease_of(outbox)
        fill(outbox, 3)
        pending_ids = [row.id for row in outbox.rows()]
        assert lease.ack(pending_ids) == 0
        assert outbox.stats().pending == 3


def test_claim_is_bounded_by_bytes_but_takes_at_least_one_row(outbox_file: Path) -> None:
    with Outbox(outbox_file) as outbox:
        lease = lease_of(outbox)
        for number in range(5):
            outbox.append(encode_message({"n": number, "blob": "x" * 1000}))
        size = next(outbox.rows()).size
        assert len(lease.claim(100, max_bytes=size * 2 + 1)) == 2
        assert len(lease.claim(100, max_bytes=10)) == 1


def test_an_undecodable_row_is_dead_lettered_not_stuck(outbox_file: Path) -> None:
    with Outbox(outbox_file) as outbox:
        lease = lease_of(outbox)
        fill(outbox, 1)
        outbox.append(b"\xc1 not msgpack")
        fill(outbox, 1, start=2)
        assert numbers(lease.claim(10)) == [0, 2]
        dead = outbox.stats().dead
        assert dead == 1


def test_acked_rows_leave_the_table(outbox_file: Path) -> None:
    with Outbox(outbox_file) as outbox:
        lease = lease_of(outbox)
        fill(outbox, 100)
        while rows := lease.claim(30):
            lease.ack(row.id for row in rows)
    with sqlite3.connect(outbox_file) as conn:
        # Only a payload-less tombstone is left, keeping the highest id used.
        left = conn.execute("SELECT _id, data, status FROM ack_queue_default").fetchall()
    assert left == [(100, None, 5)]


def test_ids_never_go_back_once_the_highest_row_is_delivered(outbox_file: Path) -> None:
    with Outbox(outbox_file) as outbox:
        lease = lease_of(outbox)
        for round_number in range(3):
            fill(outbox, 5)
            lease.ack(row.id for row in lease.claim(10))
            assert outbox.last_id() == 5 * (round_number + 1)
        assert outbox.append(encode_message({"messageId": "next"})) == 16
        assert outbox.stats().pending == 1
        assert outbox.state_of(15) is None  # the tombstone is no row of any state


def test_stats_are_the_same_from_another_connection(outbox_file: Path) -> None:
    with Outbox(outbox_file) as writer, Outbox(outbox_file) as reader:
        lease = lease_of(writer)
        fill(writer, 5)
        lease.claim(2)
        ours, theirs = writer.stats(), reader.stats()
        assert (theirs.pending, theirs.inflight) == (3, 2)
        assert (ours.pending, ours.inflight, ours.dead) == (
            theirs.pending,
            theirs.inflight,
            theirs.dead,
        )
        assert theirs.oldest_pending_age_s is not None and theirs.oldest_pending_age_s >= 0
        assert theirs.file_bytes > 0


def test_a_full_outbox_refuses_counts_and_warns(
    outbox_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client("k", outbox_path=str(outbox_file), upload=False, max_queue_size=5)
    results = [client.track("u", "E", {"n": n})[0] for n in range(8)]
    assert results == [True] * 5 + [False] * 3
    stats = client.stats()
    assert (stats.pending, stats.dropped) == (5, 3)
    warnings = [r for r in caplog.records if "outbox is full" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one line for three drops
    client.shutdown()

    # The drop count lives in the file: another process sees it too.
    with Outbox(outbox_file) as outbox:
        assert outbox.stats().dropped == 3


def test_the_cap_sees_rows_that_another_writer_added(outbox_file: Path) -> None:
    client = Client("k", outbox_path=str(outbox_file), upload=False, max_queue_size=10)
    with Outbox(outbox_file) as other:
        fill(other, 10)
    # Other writers are counted at most a second late (counting on every call
    # would make appends slow on a large outbox).
    time.sleep(1.1)
    assert client.track("u", "E")[0] is False
    client.shutdown()


def test_files_are_private_to_the_user(outbox_file: Path) -> None:
    old = os.umask(0o022)
    try:
        client = Client("k", outbox_path=str(outbox_file), upload=False)
        client.track("u", "E")
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(f"{outbox_file}{suffix}").st_mode)
            assert mode == 0o600, (suffix, oct(mode))
        client.shutdown()
    finally:
        os.umask(old)


def test_a_missing_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "outbox.db"
    client = Client("k", outbox_path=str(path), upload=False)
    assert client.track("u", "E")[0]
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path.parent.parent).st_mode) == 0o700  # every one it made
    client.shutdown()


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(outbox_file: Path) -> None:
    outbox_file.write_bytes(b"my precious notes\n" * 100)
    with pytest.raises(OutboxError, match="not an outbox") as excinfo:
        Client("k", outbox_path=str(outbox_file))
    assert str(outbox_file) in str(excinfo.value)
    assert outbox_file.read_bytes() == b"my precious notes\n" * 100


def test_another_sqlite_database_is_refused_and_left_alone(outbox_file: Path) -> None:
    with sqlite3.connect(outbox_file) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("INSERT INTO users VALUES ('ada')")
    before = outbox_file.read_bytes()
    with pytest.raises(OutboxError, match="not an outbox"):
        Client("k", outbox_path=str(outbox_file))
    assert outbox_file.read_bytes() == before


def test_an_unusable_path_fails_at_construction_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutboxError) as excinfo:
        Client("k", outbox_path=str(blocker / "outbox.db"))
    assert str(blocker / "outbox.db") in str(excinfo.value)
    with pytest.raises(OutboxError, match="directory"):
        Client("k", outbox_path=str(tmp_path))


def test_send_false_stores_nothing(tmp_path: Path) -> None:
    path = tmp_path / "never.db"
    client = Client("k", outbox_path=str(path), send=False)
    ok, msg = client.track("u", "E", {"a": 1})
    assert ok and msg["event"] == "E"
    assert client.stats() is None
    assert not path.exists()


@pytest.mark.parametrize(
    ("home", "state"), [("relhome", None), ("", None), ("/nowhere-home", "rel/state")]
)
def test_the_default_path_never_depends_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: str, state: str | None
) -> None:
    """A relative or empty HOME, or a relative XDG_STATE_HOME (which the XDG spec
    says to ignore), put the outbox under whatever directory the job started in."""
    monkeypatch.delenv("OUTBOX_ANALYTICS_PATH", raising=False)
    monkeypatch.setenv("HOME", home)
    if state is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", state)
    paths = set()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        paths.add(default_outbox_path("k", "https://api.segment.io"))
    (path,) = paths
    assert os.path.isabs(path) and not path.startswith((str(tmp_path), "/.local"))
    if home.startswith("/"):
        assert path.startswith("/nowhere-home/.local/state/")  # the relative XDG value ignored


def test_default_path_is_per_user_keyed_and_hides_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OUTBOX_ANALYTICS_PATH", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    one = default_outbox_path("secret-key-1", "https://api.segment.io")
    assert one.startswith(str(tmp_path / "state" / "outbox-analytics"))
    assert "secret-key-1" not in one
    assert one == default_outbox_path("secret-key-1", "https://api.segment.io")
    assert one != default_outbox_path("secret-key-2", "https://api.segment.io")
    assert one != default_outbox_path("secret-key-1", "https://events.example.com")

    client = Client("secret-key-1", upload=False)
    assert client.outbox_path == default_outbox_path("secret-key-1", client.host)
    assert os.path.exists(client.outbox_path)
    client.shutdown()

    monkeypatch.setenv("OUTBOX_ANALYTICS_PATH", str(tmp_path / "chosen.db"))
    client = Client("secret-key-1", upload=False)
    assert client.outbox_path == str(tmp_path / "chosen.db")
    client.shutdown()


@pytest.mark.every_python
def test_threads_tracking_at_once_lose_nothing(store_only: Client) -> None:
    def work(thread_number: int) -> None:
        for n in range(200):
            assert store_only.track(f"user-{thread_number}", "E", {"n": n})[0]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = list(store_only.outbox.rows())
    assert len(rows) == 1600
    for thread_number in range(8):
        mine = [
            r.message["properties"]["n"]
            for r in rows
            if r.message["userId"] == f"user-{thread_number}"
        ]
        assert mine == list(range(200))  # each thread's events in its own order


def test_batch_commits_the_block_at_its_end(store_only: Client) -> None:
    with store_only.batch():
        for n in range(10):
            store_only.track("u", "E", {"n": n})
        with store_only.batch():  # nested: joins the outer block
            store_only.track("u", "E", {"n": 10})
        assert store_only.stats().pending == 0
    assert numbers(store_only.outbox.rows()) == list(range(11))


def test_batch_stores_nothing_when_the_block_raises(store_only: Client) -> None:
    with pytest.raises(KeyError), store_only.batch():
        store_only.track("u", "E", {"n": 1})
        raise KeyError("job failed")
    assert store_only.stats().pending == 0
    store_only.track("u", "E", {"n": 2})  # and the client still works after it
    assert numbers(store_only.outbox.rows()) == [2]


def test_batch_is_per_thread(store_only: Client) -> None:
    inside = threading.Event()
    release = threading.Event()

    def other_thread() -> None:
        inside.wait()
        store_only.track("other", "E", {"n": 99})  # not part of the block
        release.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with store_only.batch():
        store_only.track("u", "E", {"n": 1})
        inside.set()
        release.wait(10)
        assert numbers(store_only.outbox.rows()) == [99]
    thread.join()
    assert numbers(store_only.outbox.rows()) == [99, 1]


def test_dead_rows_between_pending_ones_do_not_count_against_the_cap(outbox_file: Path) -> None:
    with Outbox(outbox_file, max_pending=6) as outbox:
        lease = lease_of(outbox)
        fill(outbox, 6)
        rows = lease.claim(6)
        # Pending ids 1 and 6 with four dead rows between them: the id span (6)
        # says "full", the real count (2) says four more fit.
        lease.dead_letter([row.id for row in rows[1:5]], status=400, error="bad")
        lease.release([rows[0].id, rows[5].id])
        time.sleep(1.1)  # let the estimate expire
        fill(outbox, 4, start=6)
        with pytest.raises(OutboxFull):
            fill(outbox, 1, start=10)
        assert outbox.stats().pending == 6


def test_a_failing_write_returns_false_counts_and_logs(
    outbox_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client("k", outbox_path=str(outbox_file), upload=False)
    assert client.track("u", "Before")[0]
    # A real SQLite failure: the connection can no longer write the file.
    client.outbox.database._conn = sqlite3.connect(
        f"file:{outbox_file}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
    )
    ok, msg = client.track("u", "Lost")
    assert ok is False and msg["event"] == "Lost"
    assert client.stats().dropped == 1
    assert any("event not stored" in r.getMessage() for r in caplog.records)
    client.outbox.database._conn = None  # reconnect: writing works again
    assert client.track("u", "After")[0]
    assert [r.message["event"] for r in client.outbox.rows()] == ["Before", "After"]
    client.shutdown()
