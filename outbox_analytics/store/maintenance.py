"""What the operator's commands do to an outbox: find, requeue, purge, erase, vacuum, check, import.

Each function is one call on an open `Outbox`; the CLI parses, calls one of
these and prints. None of them claims or acknowledges rows (that is the
upload lease's alone), and none keeps a writer of another process waiting for
long: whatever the outbox's size, each write transaction changes at most
5,000 rows (a few milliseconds), scans run outside them in short reads, and
memory stays bounded (import keeps the messageIds it compares in a temporary
table on disk, never in a set). `vacuum`, which must rebuild the file,
refuses while a writer has it open.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, NamedTuple

from ..errors import OutboxBusy, OutboxError, OutboxFull
from . import schema
from .connection import Database
from .outbox import Outbox, file_bytes
from .schema import DEAD, DEAD_WHERE, TABLE, Row

__all__ = [
    "NotDead",
    "check",
    "count_dead",
    "erase",
    "find",
    "import_messages",
    "latest_dead_error",
    "purge",
    "requeue",
    "vacuum",
]

_ID_CHUNK = 500  # ids per statement (older SQLite builds allow 999 parameters)
# Rows changed per write transaction: a few milliseconds of the write lock, so
# a job's track() in another process never waits long for an operator.
_ROWS_PER_TRANSACTION = 5_000
# Rows read per step of a scan: payloads of up to 32 KB keep a page in megabytes.
_SCAN_PAGE = 500
# The pause between two of those transactions while another process has the
# file open for writing: longer than a waiting writer's cycle (SQLite waits
# 10 ms, then connection.py sleeps up to 50 ms), so the writer gets its turn
# instead of meeting the next transaction.
_GIVE_WAY = 0.07


def find(outbox: Outbox, key: str | int) -> Row | None:
    """A row by id, or by messageId (a scan: for operators, not hot paths)."""
    if isinstance(key, int) or key.isdigit():
        raws = outbox.database.rows(
            f"SELECT {schema.ROW_COLUMNS} FROM {TABLE}"
            f" WHERE _id = ? AND {schema.STATE_WHERE['all']}",
            (int(key),),
        )
        row = schema.readable_row(raws[0]) if raws else None
    else:
        row = next((r for r in outbox.rows("all") if r.message.get("messageId") == key), None)
    if row is not None and row.state == "inflight" and outbox.lease_is_free():
        return row._replace(state="pending")  # left by an uploader that ended, as rows() says
    return row


class NotDead(LookupError):
    """Rows asked for by id that are not in the dead-letter state (or not there at all)."""

    def __init__(self, ids: Sequence[int]) -> None:
        super().__init__(f"not dead-lettered (or not in the outbox): {list(ids)}")
        self.ids = list(ids)


def requeue(outbox: Outbox, ids: Iterable[int] | None = None) -> int:
    """Move dead rows (all of them, or those given) back to pending, as fresh rows.

    With `ids`, all or nothing: if any of them is not a dead row, NotDead
    names them and nothing changes. Rows move in transactions of at most
    5,000; `--all` moves the rows dead when it starts (not those that die
    while it runs).
    """
    if ids is None:
        where, params = f"{DEAD_WHERE} AND _id <= ?", (outbox.last_id(),)
        return _in_transactions(outbox, "requeue", where, params, _make_fresh)
    chosen = sorted(set(ids))
    missing = outbox.database.snapshot(lambda conn: _not_dead(conn, chosen), "requeue")
    if missing:
        raise NotDead(missing)
    return _write_by_ids(outbox, chosen, _requeue_ids, "requeue")


def _write_by_ids(outbox: Outbox, ids: Sequence[int], work: Callable[..., int], doing: str) -> int:
    """`work(conn, ids=...)` on `ids`, one short transaction per chunk, giving way between."""
    done = 0
    for start in range(0, len(ids), _ROWS_PER_TRANSACTION):
        if start:
            _give_way(outbox)
        share = ids[start : start + _ROWS_PER_TRANSACTION]
        done += outbox.database.write(functools.partial(work, ids=share), doing)
    return done


def _give_way(outbox: Outbox) -> None:
    """Between two write transactions: let a writer waiting for the lock take it first."""
    time.sleep(_GIVE_WAY if outbox.other_writers() else 0)  # (0: to this process's threads)


_FRESH = (
    ", attempts = 0, last_status = NULL, last_error = NULL,"
    " next_attempt_at = NULL, first_attempt_at = NULL"
)


def _make_fresh(conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> int:
    return schema.make_pending(conn, where, params, _FRESH)


def _requeue_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> int:
    moved = 0
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = ids[start : start + _ID_CHUNK]
        moved += _make_fresh(conn, f"_id IN ({','.join('?' * len(chunk))}) AND {DEAD_WHERE}", chunk)
    return moved


def _in_transactions(
    outbox: Outbox,
    doing: str,
    where: str,
    params: Sequence[Any],
    change: Callable[[sqlite3.Connection, str, Sequence[Any]], int],
) -> int:
    """`change(conn, where, params)` the rows matching `where`, 5,000 rows per transaction.

    Each transaction takes the next rows in id order (the index of in-flight
    and dead rows finds them), so the whole is one pass; the sum of what
    `change` returned.
    """
    share = (
        f"SELECT _id FROM {TABLE} WHERE {where} AND _id > ?"
        f" ORDER BY _id LIMIT {_ROWS_PER_TRANSACTION}"
    )

    def step(conn: sqlite3.Connection, after: int) -> tuple[int, int | None]:
        """Change the next share; how many rows, and the id to go on after (None: done)."""
        last_id, count = conn.execute(
            f"SELECT max(_id), count(*) FROM ({share})", (*params, after)
        ).fetchone()
        if not count:
            return 0, None
        changed = change(conn, f"_id IN ({share})", (*params, after))
        return changed, last_id if count == _ROWS_PER_TRANSACTION else None

    done, after = 0, 0
    while True:
        changed, next_after = outbox.database.write(functools.partial(step, after=after), doing)
        done += changed
        if next_after is None:
            return done
        after = next_after
        _give_way(outbox)


def count_dead(outbox: Outbox, ids: Iterable[int] | None = None) -> int:
    """How many rows `requeue` would move (NotDead if some of `ids` are not dead)."""
    if ids is None:
        return int(outbox.database.scalar(f"SELECT count(*) FROM {TABLE} WHERE {DEAD_WHERE}"))
    chosen = sorted(set(ids))
    missing = outbox.database.read(lambda conn: _not_dead(conn, chosen))
    if missing:
        raise NotDead(missing)
    return len(chosen)


def latest_dead_error(outbox: Outbox) -> str | None:
    """The error of the row dead-lettered last (by when its batch was sent), to quote."""
    error = outbox.database.scalar(
        f"SELECT last_error FROM {TABLE} WHERE {DEAD_WHERE}"
        " ORDER BY coalesce(first_attempt_at, 0) DESC, _id DESC LIMIT 1"
    )
    return None if error is None else str(error)


def _not_dead(conn: sqlite3.Connection, ids: Sequence[int]) -> list[int]:
    found: set[int] = set()
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = ids[start : start + _ID_CHUNK]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT _id FROM {TABLE} WHERE _id IN ({marks}) AND {DEAD_WHERE}"
        found.update(row_id for (row_id,) in conn.execute(sql, chunk))
    return [row_id for row_id in ids if row_id not in found]


def purge(outbox: Outbox, *, older_than: float | None = None, dry_run: bool = False) -> int:
    """Delete dead rows (those enqueued over `older_than` seconds ago); how many.

    In transactions of at most 5,000 rows; the rows dead when it starts. With
    `dry_run`, only count them (a read-only outbox will do).
    """
    where: str = DEAD_WHERE
    params: tuple[Any, ...] = ()
    if older_than is not None:
        where += " AND timestamp < ?"
        params = (time.time() - older_than,)
    if dry_run:
        return int(outbox.database.scalar(f"SELECT count(*) FROM {TABLE} WHERE {where}", params))
    where, params = f"{where} AND _id <= ?", (*params, outbox.last_id())
    return _in_transactions(outbox, "purge", where, params, schema.delete_rows)


class Erased(NamedTuple):
    """What `erase` did (or, with dry_run, would do)."""

    removed: int  # pending and dead rows deleted
    in_flight: int  # rows a live uploader is sending: left alone, maybe already on the wire


def erase(
    outbox: Outbox,
    *,
    user_ids: Collection[str] = (),
    anonymous_ids: Collection[str] = (),
    dry_run: bool = False,
) -> Erased:
    """Delete a person's pending and dead rows (a deletion request reaching the outbox).

    A row is the person's if its userId is one of `user_ids`, its
    anonymousId one of `anonymous_ids`, or (an alias) its previousId one of
    either. The file is scanned in short reads, outside any transaction; the
    rows found are deleted 5,000 per transaction, giving way to a job
    writing the file. While it deletes, this holds the upload lease if it
    is free: rows a dead uploader left in flight become pending (and are
    deleted), and no uploader starts sending the person's rows meanwhile.
    Rows a live uploader holds in flight are left alone and counted: they
    may be on the wire already. Rows stored after the scan are not seen.
    With `dry_run`, only count (a read-only outbox will do).
    """
    users, anonymous = set(user_ids), set(anonymous_ids)
    if not users and not anonymous:
        raise ValueError("erase needs a user id or an anonymous id")
    live_uploader = not outbox.lease_is_free()
    found, in_flight = [], 0
    for row in outbox.rows("all"):
        if not _names_person(row.message, users, anonymous):
            continue
        if row.state == "inflight" and live_uploader:
            in_flight += 1
        else:  # (in flight with no uploader alive: the next one would send it)
            found.append(row.id)
    if dry_run:
        return Erased(len(found), in_flight)
    lease = outbox.try_lease()  # (None: an uploader lives; what it claimed stays)
    try:
        removed = _delete_unclaimed(outbox, found)
    finally:
        if lease is not None:
            lease.close()
    # Rows an uploader claimed between the scan and their deletion are on their way too.
    return Erased(removed, in_flight + len(found) - removed)


def _names_person(message: dict[str, Any], users: set[str], anonymous: set[str]) -> bool:
    previous = _as_id(message.get("previousId"))
    return (
        _as_id(message.get("userId")) in users
        or _as_id(message.get("anonymousId")) in anonymous
        or (previous is not None and (previous in users or previous in anonymous))
    )


def _as_id(value: Any) -> str | None:
    """An id as text: Segment accepts numbers too (user 42 is "42" on the command line)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _delete_unclaimed(outbox: Outbox, ids: Sequence[int]) -> int:
    """Delete those of `ids` still pending or dead, 5,000 per transaction; how many."""

    def delete(conn: sqlite3.Connection, ids: Sequence[int]) -> int:
        deleted = 0
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = ids[start : start + _ID_CHUNK]
            marks = ",".join("?" * len(chunk))
            where = f"_id IN ({marks}) AND ({schema.PENDING_WHERE} OR {DEAD_WHERE})"
            deleted += schema.delete_rows(conn, where, chunk)
        return deleted

    return _write_by_ids(outbox, ids, delete, "erase")


def vacuum(outbox: Outbox) -> tuple[int, int]:
    """Give the space of deleted rows back to the disk; (bytes before, after).

    SQLite rebuilds the file, holding its write lock throughout: a writer in
    another process would wait for all of it (seconds for a large file), so
    this is refused while another process has the outbox open for writing.
    """
    db = outbox.database
    before = file_bytes(outbox.path)
    if outbox.other_writers():
        raise OutboxBusy(
            "another process has this outbox open for writing; vacuum rebuilds the file and"
            " would make it wait until done: run it when the jobs that use the file have ended",
            outbox.path,
        )
    db.read(lambda conn: conn.execute("VACUUM"), "vacuum")
    # Best effort: with a reader in another process the WAL keeps its size for now.
    db.read(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall(), "vacuum")
    return before, file_bytes(outbox.path)


def check(outbox: Outbox) -> list[str]:
    """Problems found: SQLite's integrity check, then our own invariants. [] is healthy."""
    db = outbox.database
    problems = [f"sqlite: {line}" for (line,) in db.rows("PRAGMA integrity_check") if line != "ok"]
    unknown = db.rows(
        f"SELECT status, count(*) FROM {TABLE}"
        f" WHERE status NOT IN ({schema.NEW}, {schema.READY}, {schema.INFLIGHT}, {DEAD},"
        f" {schema.ACKED}) GROUP BY status"
    )
    problems += [f"{count} row(s) with unknown status {status}" for status, count in unknown]
    stranded = db.read(schema.first_stranded)
    if stranded is not None:
        problems.append(
            f"row {stranded} is pending below the claim cursor (another program changed the"
            " file; the next uploader to find it goes back for it)"
        )
    undecodable = 0
    after = 0
    while True:  # in pages: a million rows never sit in memory at once
        page = db.rows(
            f"SELECT _id, data FROM {TABLE} WHERE _id > ? AND {schema.STATE_WHERE['all']}"
            " ORDER BY _id LIMIT 500",
            (after,),
        )
        for row_id, data in page:
            try:
                message = schema.decode_message(row_id, data)
            except ValueError:
                undecodable += 1
                continue
            if not isinstance(message.get("messageId"), str):
                problems.append(f"row {row_id} has no messageId")
        if len(page) < 500:
            break
        after = page[-1][0]
    if undecodable:
        problems.append(f"{undecodable} row(s) whose payload cannot be decoded")
    # (Rows a dead uploader left in flight are no problem: every view counts
    # them as pending, and the next uploader reclaims them in place.)
    return problems


def import_messages(outbox: Outbox, messages: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """Store already-built messages as they are (keeping messageId and timestamp).

    Messages whose messageId the outbox already holds, or that came earlier in
    `messages`, are skipped. Nothing is stored before every message has been
    read (an exception raised while iterating `messages` stores none) and
    the cap checked; then they are stored in transactions of 5,000, in their
    order. An import cut short keeps what it stored: run again, it skips
    those. Returns (imported, skipped).

    The messages wait in a temporary table (on disk, with the messageIds to
    compare) while the outbox is read in short steps, outside any write
    transaction: a writer appending meanwhile is never held up, and a
    message it appends that is also imported is sent twice (delivery is at
    least once; Segment drops the second by its messageId).
    """
    db = outbox.database
    db.read(lambda conn: conn.executescript(_STAGING), "import messages")
    try:
        read = _stage(db, messages)
        _unstage_stored(db)
        staged = int(db.scalar("SELECT count(*) FROM temp.import_staged"))
        pending = int(db.scalar(schema.COUNT_PENDING))
        if pending + staged > outbox.max_pending:
            raise OutboxFull(
                f"importing {staged} messages would hold {pending + staged} pending events, over"
                f" max_queue_size {outbox.max_pending}: {outbox.path}"
            )
        _store_staged(outbox)
        return staged, read - staged
    finally:
        with contextlib.suppress(OutboxError):  # (it goes with the connection anyway)
            db.read(lambda conn: conn.execute("DROP TABLE IF EXISTS temp.import_staged"))


# The first message of each messageId, in the order read (rowid).
_STAGING = """
DROP TABLE IF EXISTS temp.import_staged;
CREATE TEMP TABLE import_staged (message_id TEXT NOT NULL UNIQUE, data BLOB NOT NULL);
"""


def _stage(db: Database, messages: Iterable[dict[str, Any]]) -> int:
    """Put the messages in the temporary table, the first of each messageId; how many read."""
    read = 0
    iterator = iter(messages)
    while batch := list(itertools.islice(iterator, _SCAN_PAGE)):
        rows = [(message["messageId"], schema.encode_message(message)) for message in batch]
        db.read(functools.partial(_run_many, sql=_STAGE, rows=rows), "import messages")
        read += len(batch)
    return read


def _unstage_stored(db: Database) -> None:
    """Drop from the temporary table every message whose messageId the outbox holds.

    The outbox is read in pages of ids, each in a statement of its own,
    decoded outside the file's lock: no write lock is taken, no set of
    messageIds is built.
    """
    after = 0
    while db.scalar("SELECT EXISTS (SELECT 1 FROM temp.import_staged)"):
        page = db.rows(
            f"SELECT _id, data FROM {TABLE} WHERE _id > ? ORDER BY _id LIMIT ?",
            (after, _SCAN_PAGE),
        )
        if not page:
            return
        stored = [(message_id,) for message_id in _message_ids(page)]
        db.read(functools.partial(_run_many, sql=_UNSTAGE, rows=stored), "import messages")
        after = page[-1][0]


_STAGE = "INSERT OR IGNORE INTO temp.import_staged (message_id, data) VALUES (?, ?)"
_UNSTAGE = "DELETE FROM temp.import_staged WHERE message_id = ?"


def _run_many(conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(sql, rows)


def _message_ids(rows: Iterable[tuple[int, Any]]) -> Iterable[str]:
    for row_id, data in rows:
        try:
            message_id = schema.decode_message(row_id, data).get("messageId")
        except ValueError:
            continue  # an undecodable row has no messageId to compare
        if message_id is not None:
            yield str(message_id)


def _store_staged(outbox: Outbox) -> None:
    """Copy the staged messages into the outbox, 5,000 per write transaction, in order."""
    share = f"FROM temp.import_staged WHERE rowid > ? ORDER BY rowid LIMIT {_ROWS_PER_TRANSACTION}"

    def store(conn: sqlite3.Connection, after: int) -> int | None:
        """Store the next share; the rowid to go on after (None: done)."""
        last_rowid, count = conn.execute(
            f"SELECT max(rowid), count(*) FROM (SELECT rowid {share})", (after,)
        ).fetchone()
        if count:
            conn.execute(
                f"INSERT INTO {TABLE} (data, timestamp, status)"
                f" SELECT data, ?, {schema.NEW} {share}",
                (time.time(), after),
            )
        return last_rowid if count == _ROWS_PER_TRANSACTION else None

    after = outbox.database.write(functools.partial(store, after=0), "import messages")
    while after is not None:
        _give_way(outbox)
        after = outbox.database.write(functools.partial(store, after=after), "import messages")
