"""Delivery at the receiver's speed, without giving up a guarantee (issue 25).

Full batches under steady load, and the rules a faster uploader must keep.
"""

from __future__ import annotations

import gc
import json
import sqlite3
import threading
import time
from pathlib import Path

import msgpack
import pytest

from outbox_analytics.delivery import flushing
from outbox_analytics.delivery.flushing import STOPPED, FlushResult
from outbox_analytics.store import Outbox, UploadLease

from .conftest import outbox_with
from .receiver import Reply


def test_a_whole_claim_takes_a_full_batch_or_nothing(outbox_file: Path) -> None:
    outbox_with(outbox_file, 6)
    with Outbox(str(outbox_file)) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        assert lease.claim(10, whole=True) == []  # 6 pending: not a full batch
        assert outbox.stats().inflight == 0  # and nothing was taken
        full = lease.claim(4, whole=True)
        assert [row.message["properties"]["n"] for row in full] == [0, 1, 2, 3]
        # the byte limit makes a batch full too (2 pending: it takes the first)
        assert len(lease.claim(10, max_bytes=1, whole=True)) == 1
        lease.close()


def test_a_claim_marks_only_the_pending_rows_it_takes(outbox_file: Path) -> None:
    """Claims mark their rows by range: a dead row inside the range stays dead."""
    outbox_with(outbox_file, 6)
    with Outbox(str(outbox_file)) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        first, second = lease.claim(2)
        lease.dead_letter([second.id], status=400, error="rejected")
        lease.release([first.id], attempts=0)  # back before the dead row
        taken = lease.claim(10)
        assert [row.id for row in taken] == [first.id] + [second.id + n for n in range(1, 5)]
        assert [row.id for row in outbox.rows("dead")] == [second.id]
        assert outbox.stats().inflight == 5
        lease.close()


def test_batches_are_full_under_steady_load(make_client, receiver) -> None:
    """Events arriving steadily (about 4,000/s) go in full batches, not in what
    happened to be there while the previous batch was on the wire."""
    client = make_client(upload_size=20, upload_interval=0.5)
    started = time.perf_counter()
    for n in range(1200):
        client.track("user-1", "Steady", {"n": n})
        if n % 10 == 9:  # paced: the uploader keeps up, a backlog never builds
            time.sleep(max(0.0, started + (n + 1) / 4000 - time.perf_counter()))
    sizes = [len(request.batch) for request in receiver.requests]
    assert client.flush(timeout=10).pending == 0
    assert len(sizes) >= 5, sizes  # (the load was steady: it was being delivered meanwhile)
    assert sum(sizes) / len(sizes) >= 18, sizes  # full, but for one cut short by a stall


def test_a_claimed_batch_keeps_no_decoded_messages(outbox_file: Path) -> None:
    """Claimed rows hold their messages as JSON bytes: nothing for the garbage
    collector to walk while the batch is on the wire (its passes were the
    uploader's largest cost)."""
    outbox_with(outbox_file, 5)
    with Outbox(str(outbox_file)) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        rows = lease.claim(5)
        assert not any(gc.is_tracked(value) for row in rows for value in row)
        assert [json.loads(row.json)["properties"]["n"] for row in rows] == [0, 1, 2, 3, 4]
        assert rows[2].message["event"] == "Stored"  # (decoded on demand, for callbacks)
        lease.close()


def test_a_row_that_cannot_be_sent_as_json_is_dead_lettered_not_stuck(
    make_client, receiver, outbox_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row written by another program holding bytes (msgpack's bin type) once
    stopped every later event: the batch failed to encode, again and again."""
    client = make_client(upload_size=10)
    client.track("u", "Before")
    assert client.flush(timeout=10).pending == 0
    _store_unsendable(outbox_file, 1)
    client.track("u", "After")
    result = client.flush(timeout=10)
    assert (result.pending, result.dead) == (0, 1)
    assert [m["event"] for m in receiver.accepted()] == ["Before", "After"]
    (dead,) = client.outbox.rows("dead")
    assert dead.last_error is not None and "cannot be sent as JSON" in dead.last_error
    assert "1 row(s) moved to the dead-letter state" in caplog.text


def test_a_drain_cut_short_with_a_batch_claimed_ahead_leaves_nothing_in_flight(
    outbox_file: Path, make_client, receiver
) -> None:
    """drain() claims the next batch while one is on the wire, as the thread does;
    when its time runs out, every row not delivered is pending again, none lost."""
    answers = iter([Reply(delay=0.3)])
    receiver.responder = lambda request: next(answers, Reply(delay=3))
    client = make_client(upload_size=10, sync_mode=True)
    with client.batch():
        for n in range(30):
            client.track("u", "Stored", {"n": n})
    first = client.drain(timeout=1.5)  # the first batch answered, the second cut short
    assert first.sent == 10 and first.pending == 20
    stats = client.stats()
    assert (stats.inflight, stats.pending) == (0, 20)
    receiver.responder = lambda request: Reply()
    assert client.drain(timeout=10).pending == 0
    delivered = {message["properties"]["n"] for message in receiver.accepted()}
    assert delivered == set(range(30))


def test_a_flush_reads_the_file_only_once_the_uploader_may_be_past_its_events(
    make_client, receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It wakes after every batch; while the uploader has not claimed as far as
    the flush's last event, reading the file only took the uploader's lock."""
    stored = make_client(upload=False)
    with stored.batch():
        for n in range(400):
            stored.track("u", "Stored", {"n": n})
    stored.shutdown()
    looks: list[int] = []
    unfinished = Outbox.unfinished

    def counted(self: Outbox, up_to_id: int) -> bool:
        looks.append(up_to_id)
        return unfinished(self, up_to_id)

    monkeypatch.setattr(Outbox, "unfinished", counted)
    client = make_client(upload_size=10)
    started = time.monotonic()
    assert client.flush(timeout=30).pending == 0
    elapsed = time.monotonic() - started
    assert len(receiver.requests) == 40
    # Before: one per batch. Now: one each 50 ms at most, and a few at the end.
    assert len(looks) <= 5 + elapsed / 0.05, (looks, elapsed)


def _store_unsendable(path: Path, count: int) -> None:
    """Rows another program appended, holding bytes: they decode, but JSON cannot hold them."""
    unsendable = {"type": "track", "event": "Bytes", "userId": "u", "properties": {"raw": b"\0"}}
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO ack_queue_default (data, timestamp, status) VALUES (?, ?, 0)",
            [(msgpack.packb(unsendable, use_bin_type=True), time.time())] * count,
        )


def test_rows_a_claim_ahead_dead_letters_are_counted_before_the_drain_ends(
    make_client, receiver, outbox_file: Path
) -> None:
    client = make_client(upload_size=10, sync_mode=True)
    with client.batch():
        for n in range(10):
            client.track("u", "Stored", {"n": n})
    _store_unsendable(outbox_file, 10)  # the next batch, claimed ahead while the first goes
    reports: list[FlushResult] = []
    result = client.drain(timeout=10, progress=reports.append)
    assert (result.sent, result.dead, result.pending) == (10, 10, 0)
    assert reports[-1] == result


def test_a_drain_ends_once_its_events_are_delivered_not_after_the_batch_ahead(
    make_client, receiver
) -> None:
    """Events stored while a drain runs may be claimed ahead; once the drain's
    own are delivered it returns, instead of sending (and retrying) those."""
    client = make_client(upload_size=10, sync_mode=True)
    with client.batch():
        for n in range(20):
            client.track("u", "Before", {"n": n})
    answers = iter([Reply(delay=0.3), Reply()])
    receiver.responder = lambda request: next(answers, Reply(503))

    def track_meanwhile() -> None:
        time.sleep(0.1)
        with client.batch():
            for n in range(10):
                client.track("u", "During", {"n": n})

    tracker = threading.Thread(target=track_meanwhile)
    tracker.start()
    result = client.drain(timeout=10)
    tracker.join()
    assert (result.sent, result.pending) == (20, 0)
    assert [len(request.batch) for request in receiver.requests] == [10, 10]
    assert client.stats().pending == 10  # (the events stored during it: pending, none in flight)


def test_a_batch_deleted_as_ctrl_c_lands_is_counted_as_sent(
    make_client, receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain's last progress report says what got through, even when the
    interrupt comes right after the delivered rows were deleted."""
    client = make_client(upload_size=2, sync_mode=True)
    with client.batch():
        for n in range(4):
            client.track("u", "Stored", {"n": n})
    ack = UploadLease.ack

    def ack_then_interrupt(lease: UploadLease, ids: list[int]) -> int:
        ack(lease, ids)
        raise KeyboardInterrupt

    monkeypatch.setattr(UploadLease, "ack", ack_then_interrupt)
    reports: list[FlushResult] = []
    with pytest.raises(KeyboardInterrupt):
        client.drain(timeout=10, progress=reports.append)
    assert (reports[-1].sent, reports[-1].pending) == (2, 2)


def test_a_flush_counting_while_a_batch_is_acknowledged_sees_it_once(
    make_client, receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush counting what is left while the uploader deleted a delivered batch
    saw it as sent and as pending: sent + pending came to more than was stored."""
    client = make_client(upload_size=10, sync_mode=True)
    with client.batch():
        for n in range(30):
            client.track("u", "Stored", {"n": n})
    uploader = client.uploader
    assert uploader is not None
    counts = flushing._Counts(uploader, uploader.outbox.last_id())
    readings: list[FlushResult] = []
    ack = UploadLease.ack

    def ack_while_counted(lease: UploadLease, ids: list[int]) -> int:
        if not readings:
            counter = threading.Thread(target=lambda: readings.append(counts.result()))
            counter.start()
            counter.join(0.2)  # (it waits for the deletion, unless nothing makes it)
        return ack(lease, ids)

    monkeypatch.setattr(UploadLease, "ack", ack_while_counted)
    client.drain(timeout=10)
    time.sleep(0.1)
    (reading,) = readings
    assert reading.sent + reading.pending == 30, reading


def test_a_flush_right_after_start_sends_a_head_an_earlier_run_left_backing_off(
    make_client, receiver
) -> None:
    """A cron job's second run: Client() then flush(). The first run's failures
    left a retry time ahead on the oldest event; no other process uploads, so
    the flush must not wait for one (it returned at once, sending nothing)."""
    receiver.responder = lambda request: Reply(500)
    first = make_client(max_retries=0)
    first.track("u", "Stored")
    assert first.flush(timeout=10).pending == 1
    first.shutdown()
    assert first.outbox is not None and first.outbox.head(1).next_attempt_at is not None
    receiver.responder = lambda request: Reply()
    second = make_client()
    result = second.flush(timeout=10)
    assert (result.sent, result.pending) == (1, 0)


def test_a_flush_ended_by_join_says_the_uploader_was_stopped(make_client, receiver) -> None:
    receiver.responder = lambda request: Reply(delay=0.2)
    client = make_client(upload_size=5)
    with client.batch():
        for n in range(100):
            client.track("u", "Stored", {"n": n})
    results: list[FlushResult] = []
    flusher = threading.Thread(target=lambda: results.append(client.flush(timeout=20)))
    flusher.start()
    time.sleep(0.5)
    client.join(5)
    flusher.join(10)
    (result,) = results
    assert result.pending > 0 and result.last_error == STOPPED
