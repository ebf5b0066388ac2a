"""The durable outbox: one SQLite file, persist-queue's table, msgpack values.

The table is persist-queue's `SQLiteAckQueue` table (`ack_queue_default`) with
its status codes, so `persistqueue.SQLiteAckQueue(dirname,
db_file_name=basename, serializer=persistqueue.serializers.msgpack,
auto_resume=False)` still reads the pending messages in order. What
persist-queue lacks is added on the same table:

- batch SQL: claim, ack, release and dead-letter many rows in one transaction;
- partial indexes, so claims and counts never walk dead or in-flight rows,
  and acknowledged rows are deleted so a claim does not slow down with history;
- extra columns for the uploader (attempts, last status and error, next
  attempt time, first attempt time);
- a capacity check that does not count the table on every append;
- a single-uploader lease: an OS lock on `<file>.lock` that dies with its
  process, so in-flight rows of a dead uploader can be reclaimed safely.

Only this module imports sqlite3, persistqueue and msgpack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import sqlite3
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import msgpack
from persistqueue.sqlackqueue import AckStatus, SQLiteAckQueue

from .errors import OutboxError, OutboxFull

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_PENDING",
    "Head",
    "Outbox",
    "OutboxStats",
    "Row",
    "default_outbox_path",
    "encode_message",
]

log = logging.getLogger("outbox_analytics")

DEFAULT_MAX_PENDING = 1_000_000

_TABLE = "`ack_queue_default`"  # persist-queue's table for queue name "default"
_TABLE_NAME = "ack_queue_default"
# persist-queue's status codes: 0 and 1 are pending (new, released), 2 is in
# flight, 9 ("ack_failed") is our dead-letter state. We delete on ack instead
# of keeping persist-queue's 5 ("acked"), so the table holds only live rows.
_NEW = int(AckStatus.inited)
_READY = int(AckStatus.ready)
_INFLIGHT = int(AckStatus.unack)
_DEAD = int(AckStatus.ack_failed)
# The redundant "status >= 2" lets SQLite use the partial index outbox_taken:
# it only uses a partial index whose WHERE clause it finds in the query's.
_INFLIGHT_WHERE = f"status >= 2 AND status = {_INFLIGHT}"
_DEAD_WHERE = f"status >= 2 AND status = {_DEAD}"
_STATE_NAMES = {_NEW: "pending", _READY: "pending", _INFLIGHT: "inflight", _DEAD: "dead"}
_STATE_WHERE = {
    "pending": "status < 2",
    "inflight": _INFLIGHT_WHERE,
    "dead": _DEAD_WHERE,
    "all": f"status IN ({_NEW}, {_READY}, {_INFLIGHT}, {_DEAD})",
}

_EXTRA_COLUMNS = {
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "last_status": "INTEGER",  # HTTP status of the last failed attempt
    "last_error": "TEXT",
    "next_attempt_at": "REAL",  # unix time before which the row is not retried
    "first_attempt_at": "REAL",
}
_SCHEMA_SQL = [
    # Only pending rows are indexed in id order: claims and the pending count
    # read this index and nothing else, however many dead rows pile up.
    f"CREATE INDEX IF NOT EXISTS outbox_pending ON {_TABLE} (_id) WHERE status < 2",
    # In-flight and dead rows are few; inserts (status 0) never touch this one.
    f"CREATE INDEX IF NOT EXISTS outbox_taken ON {_TABLE} (status) WHERE status >= 2",
    "CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO outbox_meta (key, value) VALUES ('schema_version', 1), ('dropped', 0)",
]
_INSERT = f"INSERT INTO {_TABLE} (data, timestamp, status) VALUES (?, ?, {_NEW})"
_COUNT_PENDING = f"SELECT count(*) FROM {_TABLE} WHERE status < 2"
# max - min + 1 of the pending ids: at least the pending count, in O(log n).
_PENDING_SPAN = (
    f"SELECT (SELECT max(_id) FROM {_TABLE} WHERE status < 2)"
    f" - (SELECT min(_id) FROM {_TABLE} WHERE status < 2) + 1"
)
# length(data) from SQL, not len() in Python: a hostile or damaged row may
# hold an integer or NULL there, and must be dead-lettered, not crash a loop.
_ROW_COLUMNS = (
    "_id, data, timestamp, status, attempts, last_status, last_error,"
    " next_attempt_at, first_attempt_at, coalesce(length(data), 0)"
)
_NEW_FILE_PAGE_SIZE = 2048
_ID_CHUNK = 500  # stays far below SQLite's limit on bound parameters
# How stale the pending estimate may get: other processes append and
# acknowledge too, and counting a large table on every call is too slow.
_RECOUNT_INTERVAL = 1.0
_RECOUNT_WHEN_FULL = 0.1  # a full outbox looks again sooner, to refuse no longer than needed


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
    """Counts read from the file itself, so every process sees the same numbers."""

    pending: int
    inflight: int
    dead: int
    dropped: int
    oldest_pending_age_s: float | None
    file_bytes: int
    path: str
    # The first pending row: if it is failing, how and until when it waits.
    head_attempts: int = 0
    head_last_status: int | None = None
    head_last_error: str | None = None
    head_next_attempt_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_outbox_path(write_key: str, host: str) -> str:
    """Where a client keeps its outbox when `outbox_path` is not given.

    `$OUTBOX_ANALYTICS_PATH` when set; otherwise one file per (host, write key)
    in the per-user state directory, so that a job restarted from another
    working directory finds what its last run left pending. The write key is
    hashed: it never appears in a file name.
    """
    override = os.environ.get("OUTBOX_ANALYTICS_PATH")
    if override:
        return override
    digest = hashlib.sha256(f"{host}\n{write_key}".encode()).hexdigest()[:16]
    return os.path.join(_user_state_dir(), "outbox-analytics", f"outbox-{digest}.sqlite3")


def _user_state_dir() -> str:
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        return os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
    if sys.platform == "darwin":
        return os.path.join(home, "Library", "Application Support")
    return os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")


class Outbox:
    """A durable FIFO of messages in one SQLite file, safe across threads and processes.

    Every public method is one transaction. One connection per instance,
    guarded by a lock; an uploader should open an instance of its own so that
    its claims never wait on callers' appends in Python.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = False,
        max_pending: int = DEFAULT_MAX_PENDING,
        busy_timeout: float = 60.0,
        readonly: bool = False,
    ) -> None:
        """Open (creating it if needed) the outbox at `path`.

        `readonly=True` opens an existing outbox for reading only: nothing is
        created or changed, and a job writing the file is never blocked.
        """
        self.path = os.path.abspath(os.fspath(path))
        self.fsync = fsync
        self.max_pending = max_pending
        self.busy_timeout = busy_timeout
        self.readonly = readonly
        self._lock = _lock_for(self.path)
        self._local = threading.local()
        self._lease_fd: int | None = None
        self._abandoned: list[sqlite3.Connection] = []
        self._conn: sqlite3.Connection | None = None
        if readonly:
            if not os.path.isfile(self.path):
                raise OutboxError("no outbox file there", self.path)
        else:
            _create_private_file(self.path)
        try:
            self._open()
        except (sqlite3.DatabaseError, OutboxError) as exc:
            if readonly or not _is_damaged_outbox(self.path, exc):
                if isinstance(exc, OutboxError):
                    raise
                raise OutboxError(f"the outbox file is damaged ({exc})", self.path) from exc
            self._recover_from_damage(exc)
        self._counted_at = self._exactly_counted_at = time.monotonic()
        _live_outboxes.add(self)

    def _open(self) -> None:
        self._conn = self._connect()
        if not self.readonly:
            self._migrate()
        self._pending_estimate = self._count_pending()

    def _recover_from_damage(self, error: Exception) -> None:
        """Move a damaged outbox aside, start a fresh one, and copy over what can be read.

        Never deletes anything: the damaged file stays as `<name>.corrupt-<time>`.
        """
        if self._conn is not None:
            self._abandoned.append(self._conn)
            self._conn = None
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.rename(self.path + suffix, aside + suffix)
        _create_private_file(self.path)
        self._open()
        salvaged, unreadable = _salvage(aside, self)
        log.error(
            "outbox %s was damaged (%s); moved aside to %s; %d rows salvaged, %d unreadable",
            self.path, error, aside, salvaged, unreadable,
        )  # fmt: skip

    # -- connection -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        target = f"file:{urllib.parse.quote(self.path)}?mode=ro" if self.readonly else self.path
        try:
            conn = sqlite3.connect(
                target,
                timeout=self.busy_timeout,
                isolation_level=None,  # we open transactions ourselves
                check_same_thread=False,  # guarded by self._lock
                uri=self.readonly,
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox ({exc})", self.path) from exc
        try:
            new = _check_is_outbox(conn, self.path)
            if self.readonly:
                if new or not _has_our_schema(conn):
                    raise OutboxError("not an outbox written by outbox-analytics", self.path)
                return conn
            if new:
                # A new file: 2 KiB pages make each commit write half the
                # bytes of the 4 KiB default (measured: ~30% faster appends).
                # It can only be set before the first table exists.
                conn.execute(f"PRAGMA page_size={_NEW_FILE_PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a crash or kill of the process; FULL
            # also syncs the WAL on each commit, which survives power loss.
            conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock up front.

        BEGIN IMMEDIATE makes SQLite wait (busy_timeout) for other writers at
        the start, instead of failing with "database is locked" when a read
        turns into a write halfway through.
        """
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _migrate(self) -> None:
        try:
            with self._transaction() as conn:
                conn.execute(SQLiteAckQueue._SQL_CREATE.format(table_name=_TABLE, key_column="_id"))
                present = {row[1] for row in conn.execute(f"PRAGMA table_info({_TABLE})")}
                for name, decl in _EXTRA_COLUMNS.items():
                    if name not in present:
                        conn.execute(f"ALTER TABLE {_TABLE} ADD COLUMN {name} {decl}")
                for statement in _SCHEMA_SQL:
                    conn.execute(statement)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot write to the outbox ({exc})", self.path) from exc

    def close(self) -> None:
        with self._lock:
            self.release_lease()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        # Still usable: a later append reopens the file rather than lose an event.

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _after_fork_in_child(self) -> None:
        # SQLite forbids using a connection opened before fork(); closing it
        # could also disturb the parent's locks. Keep it unreferenced-but-alive
        # and open a fresh one on first use. The lease belongs to the parent.
        self._lock = _lock_for(self.path)
        if self._conn is not None:
            self._abandoned.append(self._conn)
            self._conn = None
        if self._lease_fd is not None:
            os.close(self._lease_fd)
            self._lease_fd = None

    # -- appending ------------------------------------------------------------

    def append(self, data: bytes) -> int | None:
        """Store one message, encoded by `encode_message`, durably (committed before return).

        Returns the row id. Inside `batch()` on this thread the message is only
        buffered (and None returned), and committed with the rest of the
        block. Raises OutboxFull (the drop is counted in the file) when
        `max_pending` messages are pending.
        """
        buffered: list[tuple[bytes, float]] | None = getattr(self._local, "rows", None)
        if buffered is not None:
            # This thread's own buffer: no lock needed but for the cap check.
            self._reserve(1 + len(buffered))
            buffered.append((data, time.time()))
            return None
        with self._lock:
            self._reserve(1)
            try:
                row_id = self._connection().execute(_INSERT, (data, time.time())).lastrowid
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot append to the outbox ({exc})", self.path) from exc
            self._pending_estimate += 1
            return row_id

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Buffer this thread's appends and commit them in one transaction at the end.

        All or nothing: if the block raises (or the process dies inside it),
        none of its messages are stored. Nested blocks join the outermost one.
        """
        if getattr(self._local, "rows", None) is not None:
            yield
            return
        self._local.rows = []
        try:
            yield
            rows = self._local.rows
        finally:
            self._local.rows = None
        if rows:
            self._append_many(rows)

    def append_messages(self, messages: Iterable[dict[str, Any]], chunk: int = 10_000) -> int:
        """Store already-built messages as they are (keeping messageId and timestamp).

        For imports: one transaction per `chunk` messages; the cap applies.
        """
        count = 0
        rows: list[tuple[bytes, float]] = []
        for message in messages:
            rows.append((encode_message(message), time.time()))
            if len(rows) >= chunk:
                count += self._store_chunk(rows)
        return count + self._store_chunk(rows)

    def _store_chunk(self, rows: list[tuple[bytes, float]]) -> int:
        if not rows:
            return 0
        with self._lock:
            self._reserve(len(rows))
        self._append_many(rows)
        stored = len(rows)
        rows.clear()
        return stored

    def _append_many(self, rows: Sequence[tuple[bytes, float]]) -> None:
        try:
            with self._transaction() as conn:
                conn.executemany(_INSERT, rows)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot append to the outbox ({exc})", self.path) from exc
        self._pending_estimate += len(rows)

    def _reserve(self, count: int) -> None:
        """Raise OutboxFull unless `count` more pending rows fit under the cap.

        The pending count is an estimate (the last count plus our appends
        since), refreshed every `_RECOUNT_INTERVAL` seconds because other
        processes append and acknowledge too. Refreshing reads the span of
        pending ids, an upper bound that costs two index lookups; only when
        that bound does not fit are the rows counted, at most once a second
        (counting a million rows takes tens of milliseconds).
        """
        now = time.monotonic()
        over = self._pending_estimate + count > self.max_pending
        since = now - self._counted_at
        if since <= (_RECOUNT_WHEN_FULL if over else _RECOUNT_INTERVAL):
            if over:
                self._refuse()
            return
        with self._lock:
            self._counted_at = now
            span = int(self._scalar(_PENDING_SPAN) or 0)
            if span + count <= self.max_pending:
                self._pending_estimate = span
            elif now - self._exactly_counted_at >= _RECOUNT_INTERVAL:
                self._pending_estimate = self._count_pending()
                self._exactly_counted_at = now
            if self._pending_estimate + count > self.max_pending:
                self._refuse()

    def _refuse(self) -> None:
        full = OutboxFull(f"the outbox holds {self.max_pending} pending events: {self.path}")
        try:
            self._add_dropped(1)
        except sqlite3.Error:  # a full disk too: the caller counts it instead
            full.recorded = False
        raise full

    def _count_pending(self) -> int:
        return int(self._scalar(_COUNT_PENDING))

    def _add_dropped(self, count: int) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE outbox_meta SET value = value + ? WHERE key = 'dropped'", (count,))

    # -- the uploader's operations ---------------------------------------------

    def claim(self, max_count: int, max_bytes: int | None = None) -> list[Row]:
        """Mark the oldest pending rows in flight and return them, in order.

        At most `max_count` rows whose stored sizes add up to at most
        `max_bytes` (but always at least one row, so an oversized row cannot
        stall the queue). Stored sizes only approximate JSON sizes: a caller
        with a hard limit measures the body it builds. A row whose payload
        cannot be decoded is moved to the dead-letter state instead.
        """
        with self._transaction() as conn:
            candidates = conn.execute(
                f"SELECT {_ROW_COLUMNS} FROM {_TABLE} WHERE status < 2 ORDER BY _id LIMIT ?",
                (max_count,),
            ).fetchall()
            chosen: list[Any] = []
            total = 0
            for raw in candidates:
                if chosen and max_bytes is not None and total + raw[9] > max_bytes:
                    break
                chosen.append(raw)
                total += raw[9]
            _update_ids(conn, f"status = {_INFLIGHT}", (), [raw[0] for raw in chosen])
        # Decoded after the commit: appends in this process wait on the file
        # lock for as short a time as possible.
        taken: list[Row] = []
        undecodable: list[int] = []
        for raw in chosen:
            try:
                taken.append(_row(raw, "inflight"))
            except ValueError:
                undecodable.append(raw[0])
        if undecodable:
            self.dead_letter(
                undecodable, attempts=0, status=None, error="the stored payload cannot be decoded"
            )
        return taken

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered rows (only rows still in flight). Returns how many."""
        with self._transaction() as conn:
            return _delete_ids(conn, list(ids), f"status = {_INFLIGHT}")

    def release(
        self,
        ids: Iterable[int],
        *,
        attempts: int = 1,
        status: int | None = None,
        error: str | None = None,
        next_attempt_at: float | None = None,
        first_attempt_at: float | None = None,
    ) -> None:
        """Return in-flight rows to pending, keeping their place in the order.

        `attempts` (sends made since the claim) is added to the rows' count;
        0 releases rows that were claimed but not tried, leaving them as they were.
        """
        ids = list(ids)
        with self._transaction() as conn:
            if attempts == 0:
                _update_ids(conn, f"status = {_READY}", (), ids, only=f"status = {_INFLIGHT}")
                return
            _update_ids(
                conn,
                f"status = {_READY}, attempts = attempts + ?,"
                " last_status = coalesce(?, last_status), last_error = coalesce(?, last_error),"
                " next_attempt_at = ?, first_attempt_at = coalesce(first_attempt_at, ?)",
                (attempts, status, error, next_attempt_at, first_attempt_at or time.time()),
                ids,
                only=f"status = {_INFLIGHT}",
            )

    def dead_letter(
        self,
        ids: Iterable[int],
        *,
        attempts: int = 1,
        status: int | None,
        error: str | None,
        first_attempt_at: float | None = None,
    ) -> None:
        """Move in-flight rows to the dead-letter state, keeping why."""
        with self._transaction() as conn:
            _update_ids(
                conn,
                f"status = {_DEAD}, attempts = attempts + ?, last_status = ?, last_error = ?,"
                " first_attempt_at = coalesce(first_attempt_at, ?)",
                (attempts, status, error, first_attempt_at or time.time()),
                list(ids),
                only=f"status = {_INFLIGHT}",
            )

    def requeue(self, ids: Iterable[int] | None = None) -> int:
        """Move dead rows (all of them, or those given) back to pending."""
        assignments = f"status = {_READY}, next_attempt_at = NULL, first_attempt_at = NULL"
        with self._transaction() as conn:
            if ids is None:
                return conn.execute(
                    f"UPDATE {_TABLE} SET {assignments} WHERE {_DEAD_WHERE}"
                ).rowcount
            return _update_ids(conn, assignments, (), list(ids), only=f"status = {_DEAD}")

    # -- the single-uploader lease --------------------------------------------

    def acquire_lease(self) -> bool:
        """Try to become this file's only uploader; never blocks.

        The lease is an flock on `<file>.lock`: the OS drops it when the
        holder dies, however it dies. Taking it reclaims rows left in flight,
        which can only belong to a dead holder.
        """
        with self._lock:
            if self._lease_fd is not None:
                return True
            if fcntl is None:  # pragma: no cover - no OS lock: one process only
                self._lease_fd = -1
            else:
                fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    return False
                self._lease_fd = fd
            self.reclaim_inflight()
            return True

    def release_lease(self) -> None:
        with self._lock:
            if self._lease_fd is not None and self._lease_fd >= 0:
                os.close(self._lease_fd)  # closing the descriptor drops the flock
            self._lease_fd = None

    @property
    def holds_lease(self) -> bool:
        return self._lease_fd is not None

    def reclaim_inflight(self) -> int:
        """Make in-flight rows pending again. Only for the lease holder (they are its rows)."""
        with self._transaction() as conn:
            return conn.execute(
                f"UPDATE {_TABLE} SET status = {_READY} WHERE {_INFLIGHT_WHERE}"
            ).rowcount

    # -- reading --------------------------------------------------------------

    def head(self, limit: int) -> Head:
        """What the uploader needs to decide whether to send now: cheap index reads."""
        with self._lock:
            conn = self._connection()
            pending = conn.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM {_TABLE} WHERE status < 2 LIMIT ?)",
                (limit,),
            ).fetchone()[0]
            first = conn.execute(
                f"SELECT timestamp, next_attempt_at FROM {_TABLE}"
                " WHERE status < 2 ORDER BY _id LIMIT 1"
            ).fetchone()
        if first is None:
            return Head(0, None, None)
        return Head(int(pending), first[0], first[1])

    def last_id(self) -> int:
        """The highest row id ever used (ids are never reused: AUTOINCREMENT)."""
        seq = self._scalar("SELECT seq FROM sqlite_sequence WHERE name = ?", (_TABLE_NAME,))
        return int(seq or 0)

    def state_of(self, row_id: int) -> str | None:
        """The row's state (pending, inflight or dead); None once delivered or never stored."""
        status = self._scalar(f"SELECT status FROM {_TABLE} WHERE _id = ?", (row_id,))
        return None if status is None else _state_of(status)

    def unfinished(self, up_to_id: int) -> bool:
        """Whether any row with id <= `up_to_id` is still pending or in flight (cheap)."""
        return bool(
            self._scalar(
                f"SELECT EXISTS (SELECT 1 FROM {_TABLE} WHERE status < 2 AND _id <= ?)"
                f" OR EXISTS (SELECT 1 FROM {_TABLE} WHERE {_INFLIGHT_WHERE} AND _id <= ?)",
                (up_to_id, up_to_id),
            )
        )

    def count_unfinished(self, up_to_id: int) -> int:
        """How many rows with id <= `up_to_id` are still pending or in flight."""
        return int(
            self._scalar(
                f"SELECT (SELECT count(*) FROM {_TABLE} WHERE status < 2 AND _id <= ?)"
                f" + (SELECT count(*) FROM {_TABLE} WHERE {_INFLIGHT_WHERE} AND _id <= ?)",
                (up_to_id, up_to_id),
            )
        )

    def _scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """The first column of the first row of a read, or None."""
        with self._lock:
            row = self._connection().execute(sql, params).fetchone()
        return None if row is None else row[0]

    def stats(self) -> OutboxStats:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")  # one snapshot for all the counts
            try:
                pending = int(conn.execute(_COUNT_PENDING).fetchone()[0])
                taken = dict(
                    conn.execute(
                        f"SELECT status, count(*) FROM {_TABLE} WHERE status >= 2 GROUP BY status"
                    ).fetchall()
                )
                head = conn.execute(
                    f"SELECT timestamp, attempts, last_status, last_error, next_attempt_at"
                    f" FROM {_TABLE} WHERE status < 2 ORDER BY _id LIMIT 1"
                ).fetchone()
                dropped = conn.execute(
                    "SELECT value FROM outbox_meta WHERE key = 'dropped'"
                ).fetchone()
            finally:
                conn.execute("COMMIT")
        return OutboxStats(
            pending=pending,
            inflight=int(taken.get(_INFLIGHT, 0)),
            dead=int(taken.get(_DEAD, 0)),
            dropped=int(dropped[0]) if dropped else 0,
            oldest_pending_age_s=max(0.0, time.time() - head[0]) if head else None,
            file_bytes=_file_bytes(self.path),
            path=self.path,
            head_attempts=head[1] or 0 if head else 0,
            head_last_status=head[2] if head else None,
            head_last_error=head[3] if head else None,
            head_next_attempt_at=head[4] if head else None,
        )

    def rows(self, state: str = "pending", limit: int | None = None) -> Iterator[Row]:
        """Yield stored rows of one state ("pending", "inflight", "dead" or "all") in order.

        Streams in pages, so a million rows never sit in memory at once.
        """
        if state not in _STATE_WHERE:
            raise ValueError(f"state must be one of {sorted(_STATE_WHERE)}, got {state!r}")
        after, remaining = 0, limit
        while remaining is None or remaining > 0:
            page = 500 if remaining is None else min(500, remaining)
            with self._lock:
                raws = (
                    self._connection()
                    .execute(
                        f"SELECT {_ROW_COLUMNS} FROM {_TABLE}"
                        f" WHERE {_STATE_WHERE[state]} AND _id > ? ORDER BY _id LIMIT ?",
                        (after, page),
                    )
                    .fetchall()
                )
            for raw in raws:
                yield _readable_row(raw)
            if len(raws) < page:
                return
            after = raws[-1][0]
            if remaining is not None:
                remaining -= len(raws)

    # -- operator commands ----------------------------------------------------

    def find(self, key: str | int) -> Row | None:
        """A row by id, or by messageId (a scan: for operators, not hot paths)."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            raws = self._read(f"SELECT {_ROW_COLUMNS} FROM {_TABLE} WHERE _id = ?", (int(key),))
            return _readable_row(raws[0]) if raws else None
        return next((row for row in self.rows("all") if row.message.get("messageId") == key), None)

    def message_ids(self) -> set[str]:
        """Every stored messageId (streamed from the file)."""
        return {str(row.message.get("messageId")) for row in self.rows("all")}

    def purge(
        self,
        *,
        ids: Iterable[int] | None = None,
        older_than: float | None = None,
        dry_run: bool = False,
    ) -> int:
        """Delete dead rows (those given, or all; enqueued over `older_than` seconds ago)."""
        where, params = _DEAD_WHERE, []
        if older_than is not None:
            where += " AND timestamp < ?"
            params.append(time.time() - older_than)
        with self._transaction() as conn:
            if ids is not None:
                chosen = list(ids)
                if dry_run:
                    return len(self._read_ids(conn, chosen, where, params))
                return _delete_ids(conn, chosen, where, tuple(params))
            if dry_run:
                return int(
                    conn.execute(f"SELECT count(*) FROM {_TABLE} WHERE {where}", params).fetchone()[
                        0
                    ]
                )
            return conn.execute(f"DELETE FROM {_TABLE} WHERE {where}", params).rowcount

    @staticmethod
    def _read_ids(
        conn: sqlite3.Connection, ids: Sequence[int], where: str, params: list[Any]
    ) -> list[int]:
        found: list[int] = []
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            found += [
                row[0]
                for row in conn.execute(
                    f"SELECT _id FROM {_TABLE} WHERE _id IN ({marks}) AND {where}",
                    (*chunk, *params),
                )
            ]
        return found

    def vacuum(self) -> tuple[int, int]:
        """Rebuild the file to give back the space of deleted rows; (bytes before, after)."""
        before = _file_bytes(self.path)
        with self._lock:
            conn = self._connection()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return before, _file_bytes(self.path)

    def check(self) -> list[str]:
        """Problems found: SQLite's integrity check, then our own invariants. [] is healthy."""
        problems = [
            f"sqlite: {line}" for (line,) in self._read("PRAGMA integrity_check") if line != "ok"
        ]
        unknown = self._read(
            f"SELECT status, count(*) FROM {_TABLE}"
            f" WHERE status NOT IN ({_NEW}, {_READY}, {_INFLIGHT}, {_DEAD}) GROUP BY status"
        )
        problems += [f"{count} row(s) with unknown status {status}" for status, count in unknown]
        undecodable = 0
        with self._lock:  # streamed: a million rows never sit in memory at once
            for row_id, data in self._connection().execute(f"SELECT _id, data FROM {_TABLE}"):
                try:
                    message = _decode(row_id, data)
                except ValueError:
                    undecodable += 1
                    continue
                if not isinstance(message.get("messageId"), str):
                    problems.append(f"row {row_id} has no messageId")
        if undecodable:
            problems.append(f"{undecodable} row(s) whose payload cannot be decoded")
        if self.stats().inflight and self.lease_is_free():
            problems.append(
                "rows in flight with no uploader alive (the next uploader reclaims them)"
            )
        return problems

    def lease_is_free(self) -> bool:
        """Whether no process holds the upload lease right now (without taking it)."""
        if fcntl is None or self._lease_fd is not None:  # pragma: no cover
            return self._lease_fd is None
        try:
            fd = os.open(self.path + ".lock", os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return False
        finally:
            os.close(fd)  # closing drops the shared lock we may have taken
        return True

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()


# -- helpers --------------------------------------------------------------------

_live_outboxes: weakref.WeakSet[Outbox] = weakref.WeakSet()
# One lock per file and process, shared by every Outbox on that file (the
# client's and the uploader's): their transactions then queue here, in
# microseconds, instead of meeting SQLite's busy handler, which sleeps for a
# millisecond or more each time it finds the file locked.
_file_locks: dict[str, threading.RLock] = {}
_file_locks_guard = threading.Lock()


def _lock_for(path: str) -> threading.RLock:
    with _file_locks_guard:
        return _file_locks.setdefault(path, threading.RLock())


def _reset_after_fork() -> None:
    global _file_locks_guard
    # A lock held by another thread at fork() stays held forever in the child.
    _file_locks_guard = threading.Lock()
    _file_locks.clear()
    for outbox in list(_live_outboxes):
        outbox._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _create_private_file(path: str) -> None:
    """Create the file (and its directory) readable by this user only.

    SQLite gives the -wal and -shm sidecars the mode of the database file, so
    they are private too. An existing file is never truncated or replaced.
    """
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except FileExistsError:
        if os.path.isdir(path):
            raise OutboxError("the outbox path is a directory", path) from None
    except OSError as exc:
        raise OutboxError(f"cannot create the outbox ({exc.strerror})", path) from exc


def _check_is_outbox(conn: sqlite3.Connection, path: str) -> bool:
    """Refuse a file that is not SQLite, or SQLite holding something else.

    Returns True for an empty (new) database. Only reads: a file we refuse is
    left exactly as it was.
    """
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    except sqlite3.DatabaseError as exc:
        if _has_sqlite_header(path):
            raise OutboxError(f"the outbox file is damaged ({exc})", path) from exc
        raise OutboxError(
            f"not an outbox: the file is not an SQLite database ({exc})", path
        ) from exc
    ours = {_TABLE_NAME, "outbox_meta", "sqlite_sequence"}
    if tables and _TABLE_NAME not in tables:
        raise OutboxError(
            f"not an outbox: an SQLite database without the {_TABLE_NAME} table", path
        )
    if tables - ours:
        raise OutboxError(f"not an outbox: the database also holds {sorted(tables - ours)}", path)
    if _TABLE_NAME in tables:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({_TABLE})")}
        if not {"_id", "data", "timestamp", "status"} <= columns:
            raise OutboxError(f"not an outbox: {_TABLE_NAME} has unexpected columns", path)
    return not tables


def encode_message(message: dict[str, Any]) -> bytes:
    """The stored form of a message: msgpack, as persist-queue's msgpack serializer writes it."""
    try:
        return bytes(msgpack.packb(message, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"message cannot be stored: {exc}") from exc


def _decode(row_id: int, data: bytes) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise ValueError(f"row {row_id} holds {type(data).__name__}, not a msgpack payload")
    try:
        message = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"row {row_id} cannot be decoded: {exc}") from exc
    if not isinstance(message, dict):
        raise ValueError(f"row {row_id} does not hold a message")
    return message


def _row(raw: Sequence[Any], state: str) -> Row:
    message = _decode(raw[0], raw[1])
    return Row(raw[0], message, state, raw[2], raw[9], raw[4] or 0, *raw[5:9])


def _readable_row(raw: Sequence[Any]) -> Row:
    """A row for reading: one whose payload cannot be decoded shows why, instead of failing."""
    try:
        return _row(raw, _state_of(raw[3]))
    except ValueError as exc:
        return Row(
            raw[0],
            {"_undecodable": str(exc)},
            _state_of(raw[3]),
            raw[2],
            raw[9],
            raw[4] or 0,
            *raw[5:9],
        )


def _state_of(status: Any) -> str:
    # Any, not int: a damaged or hostile file may hold anything in that column.
    return _STATE_NAMES.get(status, "unknown")


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), _ID_CHUNK):
        yield ids[start : start + _ID_CHUNK]


def _update_ids(
    conn: sqlite3.Connection,
    assignments: str,
    params: tuple[Any, ...],
    ids: Sequence[int],
    only: str = "1",
) -> int:
    changed = 0
    for chunk in _chunks(ids):
        marks = ",".join("?" * len(chunk))
        changed += conn.execute(
            f"UPDATE {_TABLE} SET {assignments} WHERE _id IN ({marks}) AND {only}",
            (*params, *chunk),
        ).rowcount
    return changed


def _delete_ids(
    conn: sqlite3.Connection, ids: Sequence[int], only: str, params: tuple[Any, ...] = ()
) -> int:
    deleted = 0
    for chunk in _chunks(ids):
        marks = ",".join("?" * len(chunk))
        deleted += conn.execute(
            f"DELETE FROM {_TABLE} WHERE _id IN ({marks}) AND {only}", (*chunk, *params)
        ).rowcount
    return deleted


def _is_damaged_outbox(path: str, error: Exception) -> bool:
    """An SQLite file (by its header) that SQLite calls damaged: ours to recover.

    Anything else (a file that is not SQLite at all, a database of another
    program) is refused untouched, as it may be someone's data.
    """
    text = str(error).lower()
    signs = ("malformed", "corrupt", "not a database", "damaged")
    return any(sign in text for sign in signs) and _has_sqlite_header(path)


def _has_sqlite_header(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _salvage(damaged: str, outbox: Outbox) -> tuple[int, int]:
    """Copy the readable rows of a damaged outbox into `outbox`; (copied, unreadable)."""
    copied = unreadable = 0
    readable = _readable_copy(damaged)
    try:
        source = sqlite3.connect(readable)
    except sqlite3.Error:
        return 0, 0
    columns = "_id, data, timestamp, status, attempts, last_status, last_error"
    last = 0
    try:
        highest = source.execute(f"SELECT max(_id) FROM {_TABLE}").fetchone()[0] or 0
    except sqlite3.Error:
        highest = 0
    while True:
        try:
            rows = source.execute(
                f"SELECT {columns} FROM {_TABLE} WHERE _id > ? ORDER BY _id LIMIT 500", (last,)
            ).fetchall()
        except sqlite3.DatabaseError:
            # A damaged page: step over it one id at a time.
            last += 1
            unreadable += 1
            if last > highest:
                break
            continue
        if not rows:
            break
        copied += _copy_rows(outbox, rows)
        last = rows[-1][0]
    source.close()
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.unlink(readable + suffix)
    return copied, unreadable


def _readable_copy(damaged: str) -> str:
    """A scratch copy of a damaged file that SQLite will open, for salvaging.

    A truncated file still claims its old size in its header (bytes 28-31),
    and SQLite then refuses even to read the schema: the copy claims the
    pages it really has. The damaged file itself is never written.
    """
    copy = f"{damaged}.salvage"
    for suffix in ("", "-wal"):  # a WAL may hold the latest commits
        if os.path.exists(damaged + suffix):
            shutil.copyfile(damaged + suffix, copy + suffix)
            os.chmod(copy + suffix, 0o600)
    with open(copy, "r+b") as file:
        header = file.read(32)
        if len(header) == 32:
            page_size = int.from_bytes(header[16:18], "big")
            page_size = 65536 if page_size in (0, 1) else page_size  # 1 stands for 65536
            pages = os.path.getsize(copy) // page_size
            file.seek(28)
            file.write(pages.to_bytes(4, "big"))
    return copy


def _copy_rows(outbox: Outbox, rows: list[Any]) -> int:
    # In flight in a dead file means pending now; dead rows stay dead, with why.
    fresh = [
        (data, stamp, _DEAD if status == _DEAD else _READY, attempts or 0, code, error)
        for _, data, stamp, status, attempts, code, error in rows
    ]
    with outbox._transaction() as conn:
        conn.executemany(
            f"INSERT INTO {_TABLE} (data, timestamp, status, attempts, last_status, last_error)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            fresh,
        )
    return len(fresh)


def _has_our_schema(conn: sqlite3.Connection) -> bool:
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({_TABLE})")}
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    return set(_EXTRA_COLUMNS) <= columns and "outbox_meta" in tables


def _file_bytes(path: str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(path + suffix)
    return total
