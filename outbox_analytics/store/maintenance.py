"""What the operator's commands do to an outbox: find, requeue, purge, vacuum, check, import.

Each function is one call on an open `Outbox`; the CLI parses, calls one of
these and prints. None of them claims or acknowledges rows (that is the
upload lease's alone), and none keeps a writer of another process waiting for
long: `vacuum`, which must rebuild the file, refuses while one is open.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import OutboxBusy, OutboxFull
from . import schema
from .outbox import Outbox, file_bytes
from .schema import DEAD, DEAD_WHERE, INFLIGHT_WHERE, TABLE, Row

__all__ = [
    "NotDead",
    "check",
    "count_dead",
    "find",
    "import_messages",
    "purge",
    "requeue",
    "vacuum",
]

_ID_CHUNK = 500


def find(outbox: Outbox, key: str | int) -> Row | None:
    """A row by id, or by messageId (a scan: for operators, not hot paths)."""
    if isinstance(key, int) or key.isdigit():
        raws = outbox.database.rows(
            f"SELECT {schema.ROW_COLUMNS} FROM {TABLE}"
            f" WHERE _id = ? AND {schema.STATE_WHERE['all']}",
            (int(key),),
        )
        return schema.readable_row(raws[0]) if raws else None
    return next((row for row in outbox.rows("all") if row.message.get("messageId") == key), None)


class NotDead(LookupError):
    """Rows asked for by id that are not in the dead-letter state (or not there at all)."""

    def __init__(self, ids: Sequence[int]) -> None:
        super().__init__(f"not dead-lettered (or not in the outbox): {list(ids)}")
        self.ids = list(ids)


def requeue(outbox: Outbox, ids: Iterable[int] | None = None) -> int:
    """Move dead rows (all of them, or those given) back to pending, as fresh rows.

    With `ids`, all or nothing: if any of them is not a dead row, NotDead
    names them and nothing changes.
    """
    fresh = (
        ", attempts = 0, last_status = NULL, last_error = NULL,"
        " next_attempt_at = NULL, first_attempt_at = NULL"
    )
    if ids is None:
        return int(
            outbox.database.write(
                lambda conn: schema.make_pending(conn, DEAD_WHERE, (), fresh), "requeue"
            )
        )
    chosen = sorted(set(ids))

    def move(conn: sqlite3.Connection) -> int:
        missing = _not_dead(conn, chosen)
        if missing:
            raise NotDead(missing)
        moved = 0
        for start in range(0, len(chosen), _ID_CHUNK):
            chunk = chosen[start : start + _ID_CHUNK]
            where = f"_id IN ({','.join('?' * len(chunk))}) AND {DEAD_WHERE}"
            moved += schema.make_pending(conn, where, chunk, fresh)
        return moved

    return int(outbox.database.write(move, "requeue"))


def count_dead(outbox: Outbox, ids: Iterable[int] | None = None) -> int:
    """How many rows `requeue` would move (NotDead if some of `ids` are not dead)."""
    if ids is None:
        return int(outbox.database.scalar(f"SELECT count(*) FROM {TABLE} WHERE {DEAD_WHERE}"))
    chosen = sorted(set(ids))
    missing = outbox.database.read(lambda conn: _not_dead(conn, chosen))
    if missing:
        raise NotDead(missing)
    return len(chosen)


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

    With `dry_run`, only count them (a read-only outbox will do).
    """
    where: str = DEAD_WHERE
    params: tuple[Any, ...] = ()
    if older_than is not None:
        where += " AND timestamp < ?"
        params = (time.time() - older_than,)
    if dry_run:
        return int(outbox.database.scalar(f"SELECT count(*) FROM {TABLE} WHERE {where}", params))
    return int(outbox.database.write(lambda conn: schema.delete_rows(conn, where, params), "purge"))


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
    if outbox.lease_is_free() and db.scalar(f"SELECT count(*) FROM {TABLE} WHERE {INFLIGHT_WHERE}"):
        problems.append("rows in flight with no uploader alive (the next uploader reclaims them)")
    return problems


def import_messages(outbox: Outbox, messages: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """Store already-built messages as they are (keeping messageId and timestamp).

    Messages whose messageId the outbox already holds, or that came earlier in
    `messages`, are skipped. One transaction: all of them are stored, or none
    (an exception raised while iterating `messages` undoes the import). The
    cap applies. Returns (imported, skipped).
    """

    def insert(conn: sqlite3.Connection) -> tuple[int, int]:
        present = _stored_message_ids(conn)
        imported = skipped = 0
        now = time.time()
        for message in messages:
            if message["messageId"] in present:
                skipped += 1
                continue
            present.add(message["messageId"])
            conn.execute(schema.INSERT, (schema.encode_message(message), now))
            imported += 1
        pending = conn.execute(schema.COUNT_PENDING).fetchone()[0]
        if pending > outbox.max_pending:
            raise OutboxFull(
                f"importing {imported} messages would hold {pending} pending events, over"
                f" max_queue_size {outbox.max_pending}: {outbox.path}"
            )
        return imported, skipped

    return outbox.database.write(insert, "import messages")


def _stored_message_ids(conn: sqlite3.Connection) -> set[str]:
    found = set()
    for row_id, data in conn.execute(f"SELECT _id, data FROM {TABLE}"):
        try:
            found.add(str(schema.decode_message(row_id, data).get("messageId")))
        except ValueError:
            continue  # an undecodable row has no messageId to compare
    return found
