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
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

import msgpack
import orjson

from ..errors import NotAnOutbox

__all__ = [
    "DEAD",
    "INFLIGHT",
    "NEW",
    "READY",
    "TABLE",
    "TABLE_NAME",
    "Claimed",
    "Head",
    "OutboxStats",
    "Row",
    "decode_message",
    "encode_message",
]

TABLE_NAME = "ack_queue_default"  # persist-queue's table for queue name "default"
TABLE = f"`{TABLE_NAME}`"
# persist-queue's AckStatus codes: 0 and 1 are pending (new, released), 2 is
# in flight, 9 ("ack_failed") is our dead-letter state. Delivered rows are
# deleted, except the one with the highest id, which stays as a tombstone of
# status 5 ("acked", no payload): see delete_rows().
NEW, READY, INFLIGHT, ACKED, DEAD = 0, 1, 2, 5, 9
# The redundant "status >= 2" lets SQLite use the partial index outbox_taken:
# it only uses a partial index whose WHERE clause it finds in the query's.
INFLIGHT_WHERE = f"status >= 2 AND status = {INFLIGHT}"
DEAD_WHERE = f"status >= 2 AND status = {DEAD}"
# A row another program inserted without a status (NULL) is pending, as an
# append is: counted, claimed and sent, not left uncounted and unsent forever.
PENDING_WHERE = "ifnull(status, 0) < 2"
STATE_WHERE = {
    "pending": PENDING_WHERE,
    "inflight": INFLIGHT_WHERE,
    "dead": DEAD_WHERE,
    "all": f"ifnull(status, {NEW}) IN ({NEW}, {READY}, {INFLIGHT}, {DEAD})",
}
_STATE_NAMES = {
    NEW: "pending",
    READY: "pending",
    None: "pending",
    INFLIGHT: "inflight",
    DEAD: "dead",
}

EXTRA_COLUMNS = {
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "last_status": "INTEGER",  # HTTP status of the last failed attempt
    "last_error": "TEXT",
    "next_attempt_at": "REAL",  # unix time before which the row is not retried
    "first_attempt_at": "REAL",
}
# persist-queue's columns and types (SQLiteAckQueue._SQL_CREATE) and ours,
# with one difference: a plain INTEGER PRIMARY KEY, not AUTOINCREMENT, which
# made every append also write the sqlite_sequence page (measured: about 15%
# of an append). Ids still never go back: see delete_rows().
_COLUMNS_SQL = "_id INTEGER PRIMARY KEY, data BLOB, timestamp FLOAT, status INTEGER, " + ", ".join(
    f"{name} {decl}" for name, decl in EXTRA_COLUMNS.items()
)
CREATE_TABLE = f"CREATE TABLE {TABLE} ({_COLUMNS_SQL})"

# The claim cursor: no pending row has an id below it. Claims start there
# instead of reading an index of pending rows, which every append had to
# write (measured: about 15% of an append); a claim moves it past what it
# took, and whatever makes rows pending again lowers it (make_pending()).
CURSOR = "coalesce((SELECT value FROM outbox_meta WHERE key = 'claim_from'), 0)"
# Older versions of this library refuse a file holding a table they do not
# know, naming it: this one tells an operator why, instead of an older
# version breaking the claim cursor or the kept-highest-id rule.
NEWER_THAN_0_1 = "requires_outbox_analytics_0_2"
SCHEMA_VERSION = 4  # 4: the stranded-rows trigger also sees a status set to NULL
# The lowest pending row below the claim cursor (see first_stranded), if any:
# noted by a trigger, forgotten once the cursor is lowered to it.
STRANDED_FROM = "stranded_from"
STRANDED_TRIGGER = "outbox_stranded"
# Every id from this one to the highest is a row: no deleted row left a gap
# there. Ids are given in order; delete_rows() moves it past the ids it frees
# before deleting, and a trigger does for a row deleted by any other program
# (an older version of this library, persist-queue, the sqlite3 shell). It
# lets the pending rows be counted without reading most of them: they are a
# run of ids with no gap.
GAPLESS_FROM = "gapless_from"
GAPS_TRIGGER = "outbox_gaps"
RENUMBER_TRIGGER = "outbox_renumbered"
_SCHEMA = [
    # In-flight, dead and tombstone rows are few; appends (status 0) never touch it.
    f"CREATE INDEX IF NOT EXISTS outbox_taken ON {TABLE} (status) WHERE status >= 2",
    # Values are integers (counts, ids) or text that never looks like a number.
    "CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO outbox_meta (key, value) VALUES ('dropped', 0)",
    f"CREATE TABLE IF NOT EXISTS {NEWER_THAN_0_1} (why TEXT)",
    # Notes where a row made pending below the claim cursor lies (by any
    # program: persist-queue's resume of unacknowledged rows too), so that
    # counts know where pending rows start, and the next claim goes back for
    # it. Appends (INSERT) never run it.
    f"""CREATE TRIGGER IF NOT EXISTS {STRANDED_TRIGGER} AFTER UPDATE OF status ON {TABLE}
    WHEN ifnull(NEW.status, 0) < 2 AND NEW._id < {CURSOR}
    BEGIN
        INSERT INTO outbox_meta (key, value) VALUES ('{STRANDED_FROM}', NEW._id)
        ON CONFLICT (key) DO UPDATE SET value = min(value, excluded.value);
    END""",
    # (The highest row deleted leaves no gap: the next row takes its id, or
    # delete_rows() puts it back as a tombstone.) About 0.5 us per row deleted.
    f"""CREATE TRIGGER IF NOT EXISTS {GAPS_TRIGGER} AFTER DELETE ON {TABLE}
    WHEN OLD._id >= (SELECT value FROM outbox_meta WHERE key = '{GAPLESS_FROM}')
        AND OLD._id < (SELECT max(_id) FROM {TABLE})
    BEGIN
        UPDATE outbox_meta SET value = OLD._id + 1 WHERE key = '{GAPLESS_FROM}';
    END""",
    # A row renumbered by hand (the sqlite3 shell) leaves a gap where it was,
    # and one below its new id if that is past the highest: the run starts
    # after both. (Starting it later than needed only makes counts read more.)
    f"""CREATE TRIGGER IF NOT EXISTS {RENUMBER_TRIGGER} AFTER UPDATE OF _id ON {TABLE}
    WHEN OLD._id != NEW._id
    BEGIN
        UPDATE outbox_meta SET value = max(value, OLD._id + 1, NEW._id)
        WHERE key = '{GAPLESS_FROM}';
    END""",
]
OUR_TABLES = {TABLE_NAME, "outbox_meta", "sqlite_sequence", NEWER_THAN_0_1}
# A new file: 2 KiB pages make each commit write half the bytes of the 4 KiB
# default (measured: ~30% faster appends). It can only be set before the
# first table exists. (Incremental auto-vacuum, which would let `vacuum` work
# in small steps, was measured to cost 5-15% of every append; `vacuum`
# instead refuses while another process has the file open for writing.)
NEW_FILE_PRAGMAS = ("PRAGMA page_size=2048",)

INSERT = f"INSERT INTO {TABLE} (data, timestamp, status) VALUES (?, ?, {NEW})"
_GAPLESS = f"(SELECT value FROM outbox_meta WHERE key = '{GAPLESS_FROM}')"
# Every row, less those in flight, dead or tombstones (a small index): reads
# every page of the table (a quarter of a second for a million rows).
_COUNT_EVERY_PENDING = (
    f"(SELECT count(*) FROM {TABLE}) - (SELECT count(*) FROM {TABLE} WHERE status >= 2)"
)
# The same count, reading only the rows between the first that may be
# pending (the claim cursor, or a stranded row below it) and the gapless run
# (rows made pending again: few); the run itself is counted from its ends,
# less its in-flight, dead and tombstone rows (a small index).
_COUNT_PENDING_BY_RUN = f"""
    (SELECT count(*) FROM {TABLE} WHERE _id >= low AND _id < gapless AND {PENDING_WHERE})
    + max(0, coalesce((SELECT max(_id) FROM {TABLE}), 0) - max(low, gapless) + 1)
    - (SELECT count(*) FROM {TABLE} WHERE status >= 2 AND _id >= max(low, gapless))"""
_LOWEST_PENDING = (
    f"min({CURSOR}, coalesce((SELECT value FROM outbox_meta WHERE key = '{STRANDED_FROM}'),"
    f" {CURSOR}))"
)
COUNT_PENDING = f"""
SELECT CASE WHEN gapless IS NULL THEN {_COUNT_EVERY_PENDING} ELSE {_COUNT_PENDING_BY_RUN} END
FROM (SELECT {_GAPLESS} AS gapless, {_LOWEST_PENDING} AS low)"""
# At least the pending count, from a few lookups (no count: dead rows can be
# many): no pending row lies below the lowest that may be pending.
PENDING_SPAN = (
    f"SELECT max(0, coalesce((SELECT max(_id) FROM {TABLE}), 0) - max({_LOWEST_PENDING}, 1) + 1)"
)
# The oldest pending rows, in order, reading from the cursor on.
FIRST_PENDING = f"FROM {TABLE} WHERE _id >= {CURSOR} AND {PENDING_WHERE} ORDER BY _id"
# The pending rows up to an id (the one parameter), stranded ones noted below the cursor too.
FIRST_PENDING_UP_TO = (
    f"FROM {TABLE} WHERE _id >= {_LOWEST_PENDING} AND _id <= ? AND {PENDING_WHERE}"
)
# length(data) from SQL, not len() in Python: a hostile or damaged row may
# hold an integer or NULL there, and must be dead-lettered, not crash a loop.
ROW_COLUMNS = (
    "_id, data, timestamp, status, attempts, last_status, last_error,"
    " next_attempt_at, first_attempt_at, coalesce(length(data), 0)"
)
ADD_DROPPED = "UPDATE outbox_meta SET value = value + ? WHERE key = 'dropped'"
# The owner's host as people read it (scheme://host:port); the key and host
# themselves are kept only as salted hashes (Outbox.bind).
OWNER_HOST_URL = "owner_host_url"


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


class Claimed(NamedTuple):
    """A row claimed for delivery, its message already the JSON that the request body holds.

    The decoded message is not kept. Kept, a batch's dicts and lists stayed
    alive while it was on the wire, and the garbage collector's passes over
    them were the uploader's largest single cost (measured in a restart
    drain: decoding took 12 us a row with them, 6.5 with the collector off).
    """

    id: int
    json: bytes
    enqueued_at: float
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    next_attempt_at: float | None = None
    first_attempt_at: float | None = None

    @property
    def message(self) -> dict[str, Any]:
        """The message itself (for callbacks and tests: delivery needs only the JSON)."""
        message: dict[str, Any] = orjson.loads(self.json)
        return message


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
    # Since when (unix time) a reader's old snapshot (the sqlite3 shell left in
    # a transaction, a backup) keeps the write-ahead log over its bound.
    wal_pinned_since: float | None = None
    # The write-ahead log's part of `file_bytes` (up to about 20 MB, emptied
    # when copied back), so the database itself can be told from it.
    wal_bytes: int = 0
    # While a process holds the upload lease: its pid and host name (None if
    # not known: an older release took it, or could not note itself).
    uploader_pid: int | None = None
    uploader_host: str | None = None
    # Whether that process is stopped (Ctrl-Z, SIGSTOP): it keeps the lease
    # and sends nothing until it runs again. Seen on Linux only.
    uploader_stopped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- creating and checking ------------------------------------------------------


def inspect(conn: sqlite3.Connection, path: str) -> bool:
    """Refuse a database that is not an outbox; True if it is empty (new).

    Ours: a file with our metadata table, or persist-queue's table of
    msgpack messages (a file an earlier pipeline filled: adopted). Not ours:
    another program's database, and a persist-queue file of pickles (its
    default), JSON or no item at all to tell by, which persist-queue could
    no longer read once we wrote into it. Only reads, and never unpickles
    (that runs code from the file): a file we refuse is left as it was.
    """
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    queues = sorted(name for name in tables - {TABLE_NAME} if name.startswith("ack_queue_"))
    if queues:
        names = ", ".join(repr(name.removeprefix("ack_queue_")) for name in queues)
        _refuse(f"a persist-queue file (queue {names}) of another program", path)
    if (tables and TABLE_NAME not in tables) or tables - OUR_TABLES:
        _refuse(f"an SQLite database of another program (tables {sorted(tables)})", path)
    if TABLE_NAME in tables and not {"_id", "data", "timestamp", "status"} <= _columns(conn):
        raise NotAnOutbox(f"not an outbox: {TABLE_NAME} has unexpected columns", path)
    if TABLE_NAME in tables and "outbox_meta" not in tables:
        _refuse_unless_msgpack(conn, path)
    return not tables


# What a refusal of another program's file says to do with its events.
_IMPORT_ADVICE = (
    "to send its events, write them one JSON message per line to a file and run"
    " `outbox-analytics import OUTBOX FILE` with an outbox file of their own"
)


def _refuse(what: str, path: str, advice: str = _IMPORT_ADVICE) -> NoReturn:
    raise NotAnOutbox(f"not an outbox: {what}, left as it is; {advice}", path)


def _refuse_unless_msgpack(conn: sqlite3.Connection, path: str) -> None:
    """A persist-queue file: ours to adopt only if its first and last items are our messages."""
    samples = conn.execute(
        f"SELECT * FROM (SELECT _id, data FROM {TABLE} WHERE data IS NOT NULL ORDER BY _id LIMIT 1)"
        f" UNION SELECT * FROM (SELECT _id, data FROM {TABLE} WHERE data IS NOT NULL"
        " ORDER BY _id DESC LIMIT 1)"
    ).fetchall()
    if not samples:
        advice = "give the outbox a file of its own (or remove this one if nothing uses it)"
        _refuse("a persist-queue file with no item to tell its format by", path, advice)
    for row_id, data in samples:
        try:
            decode_message(row_id, data)
        except ValueError:
            _refuse(
                "a persist-queue file whose items are not msgpack messages (persist-queue's"
                " default is pickle, which is never read here)",
                path,
            )


def is_current(conn: sqlite3.Connection) -> bool:
    """Whether the file already has this version's table, indexes and metadata."""
    tables = dict(conn.execute("SELECT name, sql FROM sqlite_master"))
    return (
        NEWER_THAN_0_1 in tables
        and STRANDED_TRIGGER in tables
        and GAPS_TRIGGER in tables
        and RENUMBER_TRIGGER in tables
        and "outbox_pending" not in tables  # (0.1's index of pending rows)
        and not _autoincrement(tables.get(TABLE_NAME))
        and set(EXTRA_COLUMNS) <= _columns(conn)
        and read_meta(conn, "schema_version") == SCHEMA_VERSION
    )


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a new, persist-queue or older outbox to this version (in one write transaction).

    An older table (AUTOINCREMENT, fewer columns) is rebuilt once, rows and
    ids kept; for a million rows this takes seconds, under the write lock.
    """
    sql = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE_NAME,)
    ).fetchone()
    if sql is None:
        conn.execute(CREATE_TABLE)
    elif _autoincrement(sql[0]) or not set(EXTRA_COLUMNS) <= _columns(conn):
        _rebuild(conn)
    conn.execute("DROP INDEX IF EXISTS outbox_pending")
    version = _stored_version(conn)
    if version != SCHEMA_VERSION:  # an older trigger's text is replaced by this version's
        conn.execute(f"DROP TRIGGER IF EXISTS {STRANDED_TRIGGER}")
    for statement in _SCHEMA:
        conn.execute(statement)
    if read_meta(conn, "claim_from") is None:  # the first pending row, found once by a scan
        first = conn.execute(f"SELECT min(_id) FROM {TABLE} WHERE {PENDING_WHERE}").fetchone()[0]
        write_meta(conn, "claim_from", first or 0)
    if version is None or version < 3:  # (before the gaps triggers were there)
        write_meta(conn, GAPLESS_FROM, _find_gapless_from(conn))
    if version != SCHEMA_VERSION:  # (strandings an older trigger did not see)
        stranded = first_stranded(conn)
        if stranded is not None:
            write_meta(conn, STRANDED_FROM, stranded)
    write_meta(conn, "schema_version", SCHEMA_VERSION)


def _stored_version(conn: sqlite3.Connection) -> int | None:
    """The schema version the file says it has (None: a new or persist-queue file)."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox_meta'"
    ).fetchone()
    version = read_meta(conn, "schema_version") if has_meta else None
    return version if isinstance(version, int) else None


def _find_gapless_from(conn: sqlite3.Connection) -> int:
    """The lowest id from which every id to the highest is a row: reads every row, once."""
    after_last_gap = conn.execute(
        f"SELECT max(_id) FROM (SELECT _id, _id - lag(_id) OVER (ORDER BY _id) AS step"
        f" FROM {TABLE}) WHERE step > 1"
    ).fetchone()[0]
    if after_last_gap is not None:
        return int(after_last_gap)
    return int(conn.execute(f"SELECT coalesce(min(_id), 1) FROM {TABLE}").fetchone()[0])


def _autoincrement(table_sql: str | None) -> bool:
    return table_sql is not None and "AUTOINCREMENT" in table_sql.upper()


def _rebuild(conn: sqlite3.Connection) -> None:
    """Copy the table into our form: same ids, persist-queue's columns, ours filled in."""
    present = _columns(conn)
    highest = 0
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
        seq = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (TABLE_NAME,)
        ).fetchone()
        highest = int(seq[0]) if seq and isinstance(seq[0], int) else 0
    names = ["_id", "data", "timestamp", "status", *EXTRA_COLUMNS]
    values = [
        name if name in present else ("0" if name == "attempts" else "NULL") for name in names
    ]
    conn.execute(f"CREATE TABLE outbox_rebuilt ({_COLUMNS_SQL})")
    conn.execute(
        f"INSERT INTO outbox_rebuilt ({', '.join(names)}) SELECT {', '.join(values)} FROM {TABLE}"
    )
    conn.execute(f"DROP TABLE {TABLE}")  # (and its indexes)
    conn.execute(f"ALTER TABLE outbox_rebuilt RENAME TO {TABLE}")
    if highest:  # AUTOINCREMENT's high-water mark, kept as a tombstone when above every row
        conn.execute("DELETE FROM sqlite_sequence WHERE name = ?", (TABLE_NAME,))
        conn.execute(
            f"INSERT INTO {TABLE} (_id, status) SELECT ?, {ACKED}"
            f" WHERE ? > coalesce((SELECT max(_id) FROM {TABLE}), 0)",
            (highest, highest),
        )


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


# -- changing rows ------------------------------------------------------------------
# Every statement that deletes rows or makes them pending goes through these
# two functions: they keep the rules that claims and ids rely on.


def make_pending(
    conn: sqlite3.Connection,
    where: str,
    params: Sequence[Any] = (),
    assignments: str = "",
    values: Sequence[Any] = (),
) -> int:
    """Make the rows matching `where` pending (status 1), lowering the claim cursor to them.

    `assignments` (with its parameters in `values`) sets other columns as
    well: ", attempts = 0". Returns how many rows changed.
    """
    first = conn.execute(f"SELECT min(_id) FROM {TABLE} WHERE {where}", params).fetchone()[0]
    if first is None:
        return 0
    sql = f"UPDATE {TABLE} SET status = {READY}{assignments} WHERE {where}"
    changed = int(conn.execute(sql, (*values, *params)).rowcount)
    lower_cursor(conn, first)
    return changed


def lower_cursor(conn: sqlite3.Connection, row_id: int) -> None:
    """Let claims start at `row_id` (or earlier): a row there is, or may become, pending."""
    conn.execute(
        "INSERT INTO outbox_meta (key, value) VALUES ('claim_from', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = min(value, excluded.value)",
        (row_id,),
    )
    conn.execute(f"DELETE FROM outbox_meta WHERE key = '{STRANDED_FROM}' AND value >= {CURSOR}")


def move_cursor(conn: sqlite3.Connection, row_id: int) -> None:
    """Claims start at `row_id` now: every row below it is in flight, dead or gone."""
    write_meta(conn, "claim_from", row_id)


def delete_rows(
    conn: sqlite3.Connection, where: str, params: Sequence[Any] = (), highest: int | None = None
) -> int:
    """Delete the rows matching `where`; how many.

    `highest`: no row above this id matches `where` (a caller deleting a list
    of ids knows it), which spares looking for the highest one deleted.

    Without AUTOINCREMENT, SQLite gives a new row the highest id plus one, so
    deleting the highest row would let its id be used again (and a flush
    waiting for that id would wait for another event). When the highest row
    goes, a tombstone (status 5, no payload) keeps its id; older tombstones
    go, so there is at most one.
    """
    top = conn.execute(f"SELECT max(_id) FROM {TABLE}").fetchone()[0]
    if top is None:
        return 0
    # The highest id this frees for good (the highest row itself stays, as a
    # tombstone), noted first: the trigger then has nothing to do, row by row.
    old_tombstones = f"{TABLE} WHERE status >= 2 AND status = {ACKED} AND _id < ?"
    if highest is None or highest >= top:  # (the highest row, if deleted, comes back)
        highest = conn.execute(
            f"SELECT max(_id) FROM {TABLE} WHERE ({where}) AND _id < ?", (*params, top)
        ).fetchone()[0]
    tombstone = conn.execute(f"SELECT max(_id) FROM {old_tombstones}", (top,)).fetchone()[0]
    freed = max(highest or 0, tombstone or 0) or None
    if freed is not None:
        conn.execute(
            f"UPDATE outbox_meta SET value = max(value, ?) WHERE key = '{GAPLESS_FROM}'",
            (freed + 1,),
        )
    deleted = int(conn.execute(f"DELETE FROM {TABLE} WHERE {where}", params).rowcount)
    if deleted:
        conn.execute(f"INSERT OR IGNORE INTO {TABLE} (_id, status) VALUES (?, {ACKED})", (top,))
        conn.execute(f"DELETE FROM {old_tombstones}", (top,))
    return deleted


def record_highest_id(conn: sqlite3.Connection) -> None:
    """Note the highest id in the metadata: if the table's newest pages are ever damaged,
    salvage still knows how far the ids went (at least), to say how many rows it lost."""
    conn.execute(
        "INSERT OR REPLACE INTO outbox_meta (key, value)"
        f" VALUES ('highest_id', coalesce((SELECT max(_id) FROM {TABLE}), 0))"
    )


def first_stranded(conn: sqlite3.Connection) -> int | None:
    """The first pending row below the claim cursor, which claims would never reach.

    None when the cursor's rule holds. Only a program that changes rows
    without make_pending() (persist-queue's resume of unacknowledged rows,
    say) can strand one; this reads every row below the cursor.
    """
    return conn.execute(  # type: ignore[no-any-return]
        f"SELECT min(_id) FROM {TABLE} WHERE _id < {CURSOR} AND {PENDING_WHERE}"
    ).fetchone()[0]


# -- values -----------------------------------------------------------------------


def encode_message(message: dict[str, Any]) -> bytes:
    """The stored form of a message: msgpack, as persist-queue's msgpack serializer writes it."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    try:
        return bytes(packer.pack(message))  # (a failed pack leaves the packer empty)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"message cannot be stored: {exc}") from exc


# One packer per thread: msgpack.packb() builds a new one per call, a third of
# its cost for a typical event (measured: 1.9 us against 1.2 us).
_packers = threading.local()


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


class NotJSON(ValueError):
    """A stored message that decodes but holds what JSON cannot (bytes, non-text keys)."""


def to_claimed(raw: Sequence[Any]) -> Claimed:
    """A Claimed row from the ROW_COLUMNS of one row; ValueError if it cannot be sent as JSON.

    orjson, not json: 100 typical events encode in 60 us instead of 510
    (measured), on the uploader's thread, which shares the interpreter with
    the threads that track. Its compact, unescaped UTF-8 is the JSON that
    Segment's API takes; cleaning made every value one it encodes.
    """
    message = decode_message(raw[0], raw[1])
    try:
        encoded = orjson.dumps(message)
    except orjson.JSONEncodeError as exc:  # (written by another program: bytes, say)
        raise NotJSON(f"the stored payload cannot be sent as JSON: {exc}") from exc
    return Claimed(raw[0], encoded, raw[2], raw[4] or 0, *raw[5:9])


def readable_row(raw: Sequence[Any]) -> Row:
    """A row for reading: one whose payload cannot be decoded shows why, instead of failing."""
    try:
        return to_row(raw, state_of(raw[3]))
    except ValueError as exc:
        undecodable = {"_undecodable": str(exc)}
        return Row(raw[0], undecodable, state_of(raw[3]), raw[2], raw[9], raw[4] or 0, *raw[5:9])
