"""The outbox's table: persist-queue's, plus our columns, indexes and metadata.

The table is persist-queue's `SQLiteAckQueue` table for the queue name
"default", with its status codes, so `persistqueue.SQLiteAckQueue(dirname,
db_file_name=basename, serializer=persistqueue.serializers.msgpack,
auto_resume=False)` still reads the pending messages in order. The CREATE
statement is our own copy (a test keeps it equal to persist-queue's), so that
persist-queue is not imported to open a file.

This module only knows SQL and bytes: it runs statements on a connection it
is given and never opens, locks or recovers anything itself.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack

from ..errors import NotAnOutbox

__all__ = [
    "DEAD",
    "INFLIGHT",
    "NEW",
    "READY",
    "TABLE",
    "TABLE_NAME",
    "Head",
    "OutboxStats",
    "Row",
    "decode_message",
    "encode_message",
]

TABLE_NAME = "ack_queue_default"  # persist-queue's table for queue name "default"
TABLE = f"`{TABLE_NAME}`"
# persist-queue's CREATE statement (SQLiteAckQueue._SQL_CREATE), for our table.
CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (_id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " data BLOB, timestamp FLOAT, status INTEGER)"
)
# persist-queue's AckStatus codes: 0 and 1 are pending (new, released), 2 is
# in flight, 9 ("ack_failed") is our dead-letter state. Acknowledged rows are
# deleted instead of kept as 5 ("acked"), so the table holds only live rows.
NEW, READY, INFLIGHT, DEAD = 0, 1, 2, 9
# The redundant "status >= 2" lets SQLite use the partial index outbox_taken:
# it only uses a partial index whose WHERE clause it finds in the query's.
INFLIGHT_WHERE = f"status >= 2 AND status = {INFLIGHT}"
DEAD_WHERE = f"status >= 2 AND status = {DEAD}"
PENDING_WHERE = "status < 2"
STATE_WHERE = {
    "pending": PENDING_WHERE,
    "inflight": INFLIGHT_WHERE,
    "dead": DEAD_WHERE,
    "all": f"status IN ({NEW}, {READY}, {INFLIGHT}, {DEAD})",
}
_STATE_NAMES = {NEW: "pending", READY: "pending", INFLIGHT: "inflight", DEAD: "dead"}

EXTRA_COLUMNS = {
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "last_status": "INTEGER",  # HTTP status of the last failed attempt
    "last_error": "TEXT",
    "next_attempt_at": "REAL",  # unix time before which the row is not retried
    "first_attempt_at": "REAL",
}
_SCHEMA = [
    # Only pending rows are indexed in id order: claims and the pending count
    # read this index and nothing else, however many dead rows pile up.
    f"CREATE INDEX IF NOT EXISTS outbox_pending ON {TABLE} (_id) WHERE status < 2",
    # In-flight and dead rows are few; inserts (status 0) never touch this one.
    f"CREATE INDEX IF NOT EXISTS outbox_taken ON {TABLE} (status) WHERE status >= 2",
    # Values are integers (counts) or text that never looks like a number.
    "CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO outbox_meta (key, value) VALUES ('schema_version', 1), ('dropped', 0)",
]
OUR_TABLES = {TABLE_NAME, "outbox_meta", "sqlite_sequence"}
# A new file: 2 KiB pages make each commit write half the bytes of the 4 KiB
# default (measured: ~30% faster appends). It can only be set before the
# first table exists. (Incremental auto-vacuum, which would let `vacuum` work
# in small steps, was measured to cost 5-15% of every append; `vacuum`
# instead refuses while another process has the file open for writing.)
NEW_FILE_PRAGMAS = ("PRAGMA page_size=2048",)

INSERT = f"INSERT INTO {TABLE} (data, timestamp, status) VALUES (?, ?, {NEW})"
COUNT_PENDING = f"SELECT count(*) FROM {TABLE} WHERE status < 2"
# max - min + 1 of the pending ids: at least the pending count, in O(log n).
PENDING_SPAN = (
    f"SELECT (SELECT max(_id) FROM {TABLE} WHERE status < 2)"
    f" - (SELECT min(_id) FROM {TABLE} WHERE status < 2) + 1"
)
# length(data) from SQL, not len() in Python: a hostile or damaged row may
# hold an integer or NULL there, and must be dead-lettered, not crash a loop.
ROW_COLUMNS = (
    "_id, data, timestamp, status, attempts, last_status, last_error,"
    " next_attempt_at, first_attempt_at, coalesce(length(data), 0)"
)
ADD_DROPPED = "UPDATE outbox_meta SET value = value + ? WHERE key = 'dropped'"


class Row(NamedTuple):
    """One stored message and its delivery bookkeeping.

    A NamedTuple, not a frozen dataclass: the uploader builds one per message
    sent, and a frozen dataclass's __init__ costs several times more.
    """

    id: int
    message: dict[str, Any]
    state: str
    enqueued_at: float
    size: int  # bytes of the stored (msgpack) payload
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    next_attempt_at: float | None = None
    first_attempt_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Head:
    """The front of the pending queue."""

    pending: int  # pending rows, counted up to the limit asked for
    oldest_enqueued_at: float | None
    next_attempt_at: float | None


@dataclasses.dataclass(frozen=True)
class OutboxStats:
    """Counts read from the file itself, so every process sees the same numbers.

    `pending` includes rows left in flight by an uploader that died (they are
    sent again); `inflight` counts only rows a live uploader is sending.
    """

    pending: int
    inflight: int
    dead: int
    dropped: int
    oldest_pending_age_s: float | None
    file_bytes: int
    path: str
    # Whether a process holds the upload lease (rows in flight are its own).
    uploader_alive: bool = False
    # The first pending row: if it is failing, how and until when it waits.
    head_attempts: int = 0
    head_last_status: int | None = None
    head_last_error: str | None = None
    head_next_attempt_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- creating and checking ------------------------------------------------------


def inspect(conn: sqlite3.Connection, path: str) -> bool:
    """Refuse a database that is not an outbox; True if it is empty (new).

    Only reads: a file we refuse is left exactly as it was.
    """
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if tables and TABLE_NAME not in tables:
        raise NotAnOutbox(f"not an outbox: an SQLite database without the {TABLE_NAME} table", path)
    if tables - OUR_TABLES:
        raise NotAnOutbox(
            f"not an outbox: the database also holds {sorted(tables - OUR_TABLES)}", path
        )
    if TABLE_NAME in tables and not {"_id", "data", "timestamp", "status"} <= _columns(conn):
        raise NotAnOutbox(f"not an outbox: {TABLE_NAME} has unexpected columns", path)
    return not tables


def is_current(conn: sqlite3.Connection) -> bool:
    """Whether the file already has every column, index and table we add."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    return set(EXTRA_COLUMNS) <= _columns(conn) and {"outbox_meta", "outbox_pending"} <= tables


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a new, persist-queue or older outbox to our schema (in a write transaction)."""
    conn.execute(CREATE_TABLE)
    present = _columns(conn)
    for name, decl in EXTRA_COLUMNS.items():
        if name not in present:
            conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN {name} {decl}")
    for statement in _SCHEMA:
        conn.execute(statement)


def fill_in_for_reading(conn: sqlite3.Connection) -> None:
    """Let a read-only connection read a persist-queue or older file as if it were current.

    The file is not changed: what it lacks (our columns, the metadata table)
    is supplied by TEMP objects of this connection, in memory, which SQLite
    finds before the file's own tables of the same name.
    """
    tables = {name for (name,) in conn.execute("SELECT name FROM main.sqlite_master")}
    if TABLE_NAME not in tables:
        return  # not an outbox: inspect() says so
    present = _columns(conn)
    if not set(EXTRA_COLUMNS) <= present:
        columns = ["_id", "data", "timestamp", "status"] + [
            name if name in present else f"{'0' if name == 'attempts' else 'NULL'} AS {name}"
            for name in EXTRA_COLUMNS
        ]
        conn.execute(
            f"CREATE TEMP VIEW IF NOT EXISTS {TABLE} AS"
            f" SELECT {', '.join(columns)} FROM main.{TABLE}"
        )
    if "outbox_meta" not in tables:
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER)"
        )


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")}


def read_meta(conn: sqlite3.Connection, key: str) -> Any:
    row = conn.execute("SELECT value FROM outbox_meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def write_meta(conn: sqlite3.Connection, key: str, value: Any) -> None:
    conn.execute("INSERT OR REPLACE INTO outbox_meta (key, value) VALUES (?, ?)", (key, value))


# -- values -----------------------------------------------------------------------


def encode_message(message: dict[str, Any]) -> bytes:
    """The stored form of a message: msgpack, as persist-queue's msgpack serializer writes it."""
    try:
        return bytes(msgpack.packb(message, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"message cannot be stored: {exc}") from exc


def decode_message(row_id: int, data: Any) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise ValueError(f"row {row_id} holds {type(data).__name__}, not a msgpack payload")
    try:
        message = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"row {row_id} cannot be decoded: {exc}") from exc
    if not isinstance(message, dict):
        raise ValueError(f"row {row_id} does not hold a message")
    return message


def state_of(status: Any) -> str:
    # Any, not int: a damaged or hostile file may hold anything in that column.
    return _STATE_NAMES.get(status, "unknown")


def to_row(raw: Sequence[Any], state: str) -> Row:
    """A Row from the ROW_COLUMNS of one row; ValueError if its payload cannot be decoded."""
    message = decode_message(raw[0], raw[1])
    return Row(raw[0], message, state, raw[2], raw[9], raw[4] or 0, *raw[5:9])


def readable_row(raw: Sequence[Any]) -> Row:
    """A row for reading: one whose payload cannot be decoded shows why, instead of failing."""
    try:
        return to_row(raw, state_of(raw[3]))
    except ValueError as exc:
        undecodable = {"_undecodable": str(exc)}
        return Row(raw[0], undecodable, state_of(raw[3]), raw[2], raw[9], raw[4] or 0, *raw[5:9])
