"""Counting pending rows without reading them (issue 25): exact, and flat at any backlog.

Most pending rows are one run of ids with no gap, from the `gapless_from`
id (kept in the file: delete_rows() and a trigger move it past deleted ids)
to the highest: stats() counts that run from its ends and reads only the
rows between the first that may be pending (the claim cursor, or a row a
trigger noted as made pending below it) and the run. The exactness of every
mix of claims, acks, releases, dead letters, requeues and purges is held to
a model in test_store_cursor.py; these tests cover the run itself.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from outbox_analytics.store import Outbox, UploadLease, encode_message, schema


def _message(number: int, padding: int = 0) -> bytes:
    return encode_message({"type": "track", "messageId": f"m-{number}", "pad": "x" * padding})


def _fill(path: Path, count: int, padding: int = 0) -> None:
    with Outbox(path, max_pending=count + 10) as outbox, outbox.batch():
        for number in range(count):
            outbox.append(_message(number, padding))


def _lease(outbox: Outbox) -> UploadLease:
    lease = outbox.try_lease()
    assert lease is not None
    return lease


def _gapless_from(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(schema.read_meta(conn, schema.GAPLESS_FROM))


def _fastest(run: Callable[[], object]) -> float:
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return min(timings)


def _fastest_stats(path: Path, readonly: bool = True) -> float:
    with Outbox(path, readonly=readonly) as outbox:
        return _fastest(outbox.stats)


def test_stats_takes_as_long_for_20k_pending_rows_as_for_one(tmp_path: Path) -> None:
    # One row per 2 KiB page: counting them one by one reads 40 MB.
    big, small = tmp_path / "big.sqlite3", tmp_path / "small.sqlite3"
    _fill(big, 20_000, padding=1_900)
    _fill(small, 1, padding=1_900)
    with Outbox(big, readonly=True) as outbox:
        assert outbox.stats().pending == 20_000
    assert _fastest_stats(big) < 10 * _fastest_stats(small)  # (reading every row: 60x here)


def test_stats_reads_no_dead_row_below_the_run(tmp_path: Path) -> None:
    # 20k dead rows at the head, then rows delivered past them: the run starts
    # above the dead rows, and the pending rows all lie above the claim cursor.
    dead_first = tmp_path / "dead.sqlite3"
    _fill(dead_first, 20_100, padding=1_900)
    with Outbox(dead_first) as outbox:
        lease = _lease(outbox)
        lease.dead_letter([row.id for row in lease.claim(20_000)], status=400, error="bad")
        lease.ack([row.id for row in lease.claim(50)])
        lease.close()
    assert _gapless_from(dead_first) == 20_051
    with Outbox(dead_first, readonly=True) as outbox:
        stats = outbox.stats()
        assert (stats.pending, stats.dead) == (50, 20_000)
    # Their entries in the small index of dead rows are read (a hundred to a
    # page), the rows themselves (a page each) are not.
    with sqlite3.connect(dead_first) as conn:
        dead_entries = f"SELECT count(*) FROM {schema.TABLE} WHERE status >= 2"
        read_index = _fastest(lambda: conn.execute(dead_entries).fetchall())
    assert _fastest_stats(dead_first, readonly=False) < 10 * read_index + 0.003  # (rows: 20 ms)


def test_a_row_stranded_below_the_cursor_is_noted_counted_and_forgotten_once_found(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite3"
    _fill(path, 10)
    with Outbox(path) as outbox:
        lease = _lease(outbox)
        lease.claim(5)
        # Another program (persist-queue's resume of unacknowledged rows) makes
        # rows pending behind the cursor, without lowering it.
        with sqlite3.connect(path) as conn:
            conn.execute(f"UPDATE {schema.TABLE} SET status = 1 WHERE _id IN (2, 4)")
            assert schema.read_meta(conn, schema.STRANDED_FROM) == 2
        assert outbox.stats().pending == 7
        assert lease.find_stranded() == 2
        with sqlite3.connect(path) as conn:
            assert schema.read_meta(conn, schema.STRANDED_FROM) is None
        assert outbox.stats().pending == 7
        lease.close()


def test_delivering_from_the_middle_moves_the_run_past_the_gap(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _fill(path, 10)
    assert _gapless_from(path) == 1  # a new file: no id was ever freed
    with Outbox(path) as outbox:
        lease = _lease(outbox)
        rows = lease.claim(10)
        lease.release([row.id for row in rows[:3]] + [row.id for row in rows[6:]], attempts=0)
        lease.ack([row.id for row in rows[3:6]])  # ids 4, 5, 6 gone: 1-3 and 7-10 pending
        assert _gapless_from(path) == 7
        assert outbox.stats().pending == 7
        again = [row.id for row in lease.claim(10)]
        assert again == [1, 2, 3, 7, 8, 9, 10]
        lease.release(again[:-1], attempts=0)
        lease.ack([10])  # the highest row stays as a tombstone: no new gap
        assert _gapless_from(path) == 7
        assert outbox.stats().pending == 6
        lease.close()


def test_rows_deleted_by_another_program_move_the_run_past_them(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _fill(path, 10)
    # The sqlite3 shell, persist-queue or an older version of this library:
    # rows deleted without delete_rows(). The highest leaves no gap.
    with sqlite3.connect(path) as conn:
        conn.execute(f"DELETE FROM {schema.TABLE} WHERE _id IN (4, 5, 10)")
    assert _gapless_from(path) == 6
    with Outbox(path, readonly=True) as reader:
        assert reader.stats().pending == 7
    with Outbox(path) as writer:
        writer.append(_message(10))  # takes id 10 again: still no gap
        assert _gapless_from(path) == 6
        assert writer.stats().pending == 8


def test_rows_renumbered_by_hand_move_the_run_past_the_gaps_they_leave(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _fill(path, 20)
    with sqlite3.connect(path) as conn:  # the sqlite3 shell, by hand
        conn.execute(f"DELETE FROM {schema.TABLE} WHERE _id = 3")
        conn.execute(f"UPDATE {schema.TABLE} SET _id = 3 WHERE _id = 10")  # the gap moves to 10
        conn.execute(f"UPDATE {schema.TABLE} SET _id = _id + 100 WHERE _id = 20")
        counted = conn.execute(f"SELECT count(*) FROM {schema.TABLE} WHERE status < 2").fetchone()
    with Outbox(path, readonly=True) as reader:
        assert reader.stats().pending == counted[0] == 19


def test_a_file_of_an_older_version_has_its_run_found_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _fill(path, 10)
    with sqlite3.connect(path) as conn:  # as version 2 of the schema left it: no triggers
        conn.execute(f"DROP TRIGGER {schema.GAPS_TRIGGER}")
        conn.execute(f"DELETE FROM outbox_meta WHERE key = '{schema.GAPLESS_FROM}'")
        schema.write_meta(conn, "schema_version", 2)
        conn.execute(f"DELETE FROM {schema.TABLE} WHERE _id IN (4, 5)")
    with Outbox(path, readonly=True) as reader:
        assert reader.stats().pending == 8  # no run known: every row counted
    with Outbox(path) as writer:
        assert _gapless_from(path) == 6
        assert writer.stats().pending == 8
