"""The outbox: append, `batch()`, the size cap, counts, and the door to the upload lease.

A durable FIFO of messages in one SQLite file, safe across threads and
processes. Appending and reading are here; claiming, acknowledging and
dead-lettering exist only on the `UploadLease` that `try_lease()` hands out;
damage is handled by `recovery`, operator commands by `maintenance`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from .. import process
from ..errors import (
    NotAnOutbox,
    OutboxDamaged,
    OutboxError,
    OutboxFull,
    OutboxMismatch,
    OutboxUnavailable,
)
from ..utils import display_url
from . import connection, recovery, schema
from .connection import Database, file_identity
from .files import create_outbox_file
from .group_commit import GroupCommit
from .lease import (
    UploadLease,
    holder_stopped,
    lease_held_here,
    lease_is_free,
    mark_writer,
    other_writers,
    read_holder,
    try_lease,
    unmark_writer,
)
from .schema import INFLIGHT_WHERE, OWNER_HOST_URL, TABLE, Head, OutboxStats, Row

__all__ = [
    "DEFAULT_MAX_PENDING",
    "PATH_ENV",
    "Outbox",
    "default_directories",
    "default_outbox_path",
    "fallback_outbox_path",
    "record_drops_at_exit",
]

PATH_ENV = "OUTBOX_ANALYTICS_PATH"

log = logging.getLogger("outbox_analytics")
T = TypeVar("T")

DEFAULT_MAX_PENDING = 1_000_000
# How stale the pending estimate may get: other processes append and
# acknowledge too, and counting a large table on every call is too slow.
_RECOUNT_INTERVAL = 1.0
_RECOUNT_WHEN_FULL = 0.1  # a full outbox looks again sooner, to refuse no longer than needed
# Recording a drop must not hold up the caller whose event was just refused.
_DROP_RECORD_WAIT = 0.1
# Files made at the path for one commit, each removed again at once, before
# the commit gives up (a loop deleting the file).
_FOLLOW_ATTEMPTS = 3
# A batch's rows go in this many to a statement: one step for them all, where
# executemany() steps, resets and releases the GIL for each row (measured:
# 2.1 against 2.7 us a row). 500 parameters: under SQLite's lowest limit (999).
_ROWS_PER_INSERT = 250
_INSERT_ROWS = schema.INSERT + f", (?, ?, {schema.NEW})" * (_ROWS_PER_INSERT - 1)
# How often a writer looks whether the write-ahead log grew past its bound
# (a stat of the -wal after a commit; see Database.checkpoint_if_over_bound).
_WAL_CHECK_INTERVAL = 0.5
_WAL_PINNED_KEY = "wal_pinned_since"


def default_outbox_path(write_key: str, host: str) -> str:
    """Where a client keeps its outbox when `outbox_path` is not given.

    `$OUTBOX_ANALYTICS_PATH` when set; otherwise one file per (host, write key)
    in the per-user state directory, so that a job restarted from another
    working directory finds what its last run left pending. The write key is
    hashed: it never appears in a file name.
    """
    override = os.environ.get(PATH_ENV)
    if override:
        return override
    state = _user_state_dir()
    if state is None:
        return fallback_outbox_path(write_key, host)
    return os.path.join(state, "outbox-analytics", _file_name(write_key, host))


def fallback_outbox_path(write_key: str, host: str) -> str:
    """Where the default outbox goes when the state directory cannot be used.

    No home, a read-only root, AWS Lambda, a container running as `nobody`:
    a per-user directory under the system's temp directory, made 0700 and
    refused if another user made it first (see files.py).
    """
    return os.path.join(fallback_directory(), _file_name(write_key, host))


def fallback_directory() -> str:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return os.path.join(tempfile.gettempdir(), f"outbox-analytics-{user}")


def default_directories() -> list[str]:
    """Where default outboxes live: the state directory, then the fallback one."""
    state = _user_state_dir()
    mine = [] if state is None else [os.path.join(state, "outbox-analytics")]
    return [*mine, fallback_directory()]


def _file_name(write_key: str, host: str) -> str:
    digest = hashlib.sha256(f"{host}\n{write_key}".encode()).hexdigest()[:16]
    return f"outbox-{digest}.sqlite3"


def _user_state_dir() -> str | None:
    """The per-user state directory; None without an absolute one (then: the fallback).

    Relative settings are ignored, as the XDG spec says: the outbox would
    depend on the directory a job starts in, and a restart would not find it.
    """
    if sys.platform == "win32":
        return _absolute(os.environ.get("LOCALAPPDATA")) or _under_home("AppData", "Local")
    if sys.platform == "darwin":
        return _under_home("Library", "Application Support")
    return _absolute(os.environ.get("XDG_STATE_HOME")) or _under_home(".local", "state")


def _under_home(*parts: str) -> str | None:
    """A path in the home directory: $HOME if absolute, else the account's (an empty or
    relative $HOME is a mistake, not a place)."""
    home = _absolute(os.environ.get("HOME")) or _absolute(_account_home())
    return None if home is None else os.path.join(home, *parts)


def _account_home() -> str:
    try:
        import pwd
    except ImportError:  # pragma: no cover - Windows
        return os.path.expanduser("~")
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # a uid with no account (a container's)
        return ""


def _absolute(path: str | None) -> str | None:
    return path if path and os.path.isabs(path) else None


class Outbox:
    """A durable FIFO of messages in one SQLite file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = False,
        max_pending: int = DEFAULT_MAX_PENDING,
        wait: float = 60.0,
        readonly: bool = False,
    ) -> None:
        """Open (creating it if needed) the outbox at `path`.

        `readonly=True` opens an existing outbox for reading only: nothing is
        created or changed. A writer finding the file damaged moves it aside
        and starts afresh with what can be salvaged; a reader only reports it.
        """
        self.path = _resolve(path)
        self.fsync = fsync
        self.max_pending = max_pending
        self.wait = wait
        self.readonly = readonly
        self._local = threading.local()
        self._unrecorded_drops = 0  # drops not yet written to the file
        self.stored_here = 0  # rows this object stored (exit delivery: did we store meanwhile?)
        # Re-entrant: a signal handler whose track() fails counts its drop on a
        # thread that may be counting one already.
        self._drops_lock = threading.RLock()
        self._group = GroupCommit(self._store_now) if fsync else None
        if readonly:
            if not os.path.isfile(self.path):
                raise OutboxUnavailable("no outbox file there", self.path)
        else:
            create_outbox_file(self.path)
        self._db = self._open(recover=not readonly)
        mark_writer(self._db)  # (a no-op for readers): vacuum asks who writes the file
        self._marked = not readonly
        try:
            # An upper bound from a few index reads: counting every row would
            # make opening a million-row outbox take a quarter of a second.
            self._pending_estimate = self._recovering(self._pending_span)
        except BaseException:
            if readonly:  # damage past the schema: a reader still leaves no -wal or -shm
                self._db.close()
            raise
        self._counted_at = self._exactly_counted_at = time.monotonic()
        self._wal_checked_at = 0.0
        self._wal_pinned: bool | None = None  # as last noted in the file by this outbox
        _live_outboxes.add(self)

    def _open(self, recover: bool = False) -> Database:
        """Connect, refuse what is not an outbox, and bring the schema up to date.

        With `recover`, a damaged file is moved aside and replaced (see
        recovery.py); the opening then happens under a shared lock on the
        directory, so it never falls between another process's moving the
        file aside and its creating the fresh one. A salvage that stopped
        before its end (a full disk) goes on once the file is open.
        """
        if not recover:
            return self._connect()
        with recovery.opening(self.path):
            try:
                db = self._connect()
            except OutboxDamaged as exc:
                damage, damaged = exc, file_identity(self.path)
                db = None
        if db is None:
            return recovery.recover(self.path, damage, damaged, self._connect)
        recovery.finish_salvages(self.path, db)  # (it takes the directory's lock exclusively)
        return db

    def _connect(self) -> Database:
        db = Database(
            self.path,
            readonly=self.readonly,
            fsync=self.fsync,
            wait=self.wait,
            on_connect=schema.fill_in_for_reading if self.readonly else None,
        )
        try:
            return self._prepare(db)
        except OutboxDamaged:
            if self.readonly:
                db.close()  # a reader moves nothing aside: it leaves the directory as it was
            else:
                db.abandon()  # it is moved aside next: never close a connection to it
            raise
        except BaseException:
            db.close()  # (a connection kept open would be inherited by every fork)
            raise

    def _recovering(self, work: Callable[[], T]) -> T:
        """Run `work`; if it finds the file damaged, recover (writers only) and run it again."""
        try:
            return work()
        except OutboxDamaged as damage:
            if self.readonly:
                raise
            self._recover(damage)
            return work()

    def _prepare(self, db: Database) -> Database:
        try:
            new = db.read(lambda conn: schema.inspect(conn, self.path), "open the outbox")
        except OutboxDamaged as exc:
            if not db.moved() and not recovery.has_sqlite_header(db):
                message = "not an outbox: the file is not an SQLite database"
                raise NotAnOutbox(message, self.path) from exc
            raise
        if self.readonly:
            if new:
                raise NotAnOutbox("not an outbox: an empty database", self.path)
            return db  # an older or persist-queue file is read through schema.fill_in_for_reading
        if new:
            for pragma in schema.NEW_FILE_PRAGMAS:
                db.rows(pragma)
        db.rows("PRAGMA journal_mode=WAL")
        if not db.read(schema.is_current):
            db.write(schema.migrate, "create the outbox's tables")
        # A write that changes nothing: a read-only file system or file fails here, at open.
        db.execute(schema.ADD_DROPPED, (0,), "open the outbox for writing")
        return db

    def close(self) -> None:
        """Close the connection. Still usable: a later call reopens it rather than lose an event."""
        self.record_drops()
        if self._marked:
            self._marked = False
            unmark_writer(self._db)
        self._db.close()

    def record_drops(self) -> None:
        """Count in the file the drops it does not hold yet; note the highest id.

        Drops are counted with the next commit; those refused while the disk
        was full, with no commit after, would vanish with this process (at
        close and at exit, then). Still full, or a busy file: not now.
        """
        if self.readonly:
            return

        def record(conn: sqlite3.Connection) -> int:
            drops = self._unrecorded_drops
            if drops:
                conn.execute(schema.ADD_DROPPED, (drops,))
            schema.record_highest_id(conn)
            return drops

        with contextlib.suppress(OutboxError):
            recorded = self._db.write(record, "count drops", _DROP_RECORD_WAIT)
            self._count_unrecorded_drops(-recorded)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _follow_file(self) -> None:
        """Reopen if the file at our path is no longer the one we have open.

        Moved aside by a recovery, removed (an operator's rm, a tmp cleaner),
        moved away or replaced: a file is made at the path if none is there.
        """
        if self._db.moved() and not self.readonly:
            self._db.abandon()  # never closed: closing would remove the -wal and -shm by name
            create_outbox_file(self.path)
            self._db = self._open(recover=True)
            self._remark()

    def _recover(self, damage: OutboxDamaged) -> None:
        """The file turned out damaged while in use: move it aside and carry on with a fresh one."""
        damaged = self._db
        damaged.abandon()
        self._db = recovery.recover(self.path, damage, damaged.identity, self._connect)
        self._remark()

    def _remark(self) -> None:
        if self._marked:  # the file this outbox writes is now another one
            mark_writer(self._db)

    def recover(self, damage: OutboxDamaged) -> None:
        """For the uploader: its lease found the file damaged. Readers only re-raise."""
        if self.readonly:
            raise damage
        self._recover(damage)

    # -- the file's owner ---------------------------------------------------------

    def bind(self, write_key: str, host: str | None, *, force: bool = False) -> None:
        """Check that this outbox belongs to `write_key` (and `host`); record them when new.

        Raises OutboxMismatch naming which differs (the key is never shown;
        the host is, as the file records it). Only salted hashes are stored,
        never the key; the host is also stored as `display_url` shows it
        (scheme, host and port: no credentials, no path), so that `ls` and
        `drain` can say which host a file belongs to. A file bound before
        that was recorded learns it at the next bind with its host.
        `host=None` (a client that only stores) leaves the host to the first
        client that uploads; `force=True` makes the given key and host the
        owners (a rotated key).
        """
        wanted = {"owner_key": write_key, "owner_host": host}

        def check(conn: sqlite3.Connection) -> str | None:
            salt = schema.read_meta(conn, "owner_salt")
            if salt is None:
                salt = "salt-" + secrets.token_hex(8)  # text that never looks like a number
                schema.write_meta(conn, "owner_salt", salt)
            for name, value in wanted.items():
                if value is None:
                    continue
                stored = schema.read_meta(conn, name)
                if stored is None or force:
                    schema.write_meta(conn, name, _fingerprint(salt, value))
                elif stored != _fingerprint(salt, value):
                    return _mismatch(name, schema.read_meta(conn, OWNER_HOST_URL), value)
            if host is not None:  # the owner (now): record, or learn, where it sends
                schema.write_meta(conn, OWNER_HOST_URL, display_url(host))
            return None

        differs = self._recovering(lambda: self._db.write(check, "record the outbox's owner"))
        if differs:
            raise OutboxMismatch(
                f"this outbox holds events for {differs}; give each write key"
                " and host an outbox file of its own",
                self.path,
            )

    def owner_host(self) -> str | None:
        """The host this file's events go to, as `display_url` shows it; None if not recorded.

        Files bound before the host was recorded, and files no uploading
        client has opened yet, have none.
        """
        return self._recovering(lambda: self._db.read(_read_owner_host))

    def owned_by_host(self, host: str) -> bool:
        """Whether the file's events are `host`'s (False when it records no host)."""

        def check(conn: sqlite3.Connection) -> bool:
            salt = schema.read_meta(conn, "owner_salt")
            stored = schema.read_meta(conn, "owner_host")
            return salt is not None and stored == _fingerprint(salt, host)

        return self._recovering(lambda: self._db.read(check))

    # -- appending ------------------------------------------------------------

    def append(self, data: bytes) -> int | None:
        """Store one message, encoded by `encode_message`, durably (committed before return).

        Returns the row id. Inside `batch()` on this thread the message is only
        buffered (and None returned), and committed with the rest of the
        block. Raises OutboxFull (the drop is counted) when `max_pending`
        messages are pending, OutboxError (also counted) when it cannot write.
        """
        buffered: list[tuple[bytes, float]] | None = getattr(self._local, "rows", None)
        if buffered is not None:  # (the process is checked when the block commits)
            self._reserve(1 + len(buffered))
            buffered.append((data, time.time()))
            return None
        process.current_pid()  # in a forked child, the parent's connection is never used
        self._reserve(1)
        return self._store([(data, time.time())])

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
            process.current_pid()  # forked inside the block: the parent's connection is not ours
            self._store(rows)

    def _store(self, rows: Sequence[tuple[bytes, float]]) -> int:
        """Commit rows durably; the last row id. A failure is counted as dropped rows."""
        if self._group is not None:  # fsync=True: one sync for every thread waiting
            return self._group.store(rows)
        return self._store_now(rows)

    def _store_now(self, rows: Sequence[tuple[bytes, float]]) -> int:
        try:
            row_id = self._commit_at_path(rows)
        except OutboxError:
            self._count_unrecorded_drops(len(rows))
            raise
        self._pending_estimate += len(rows)
        self.stored_here += len(rows)
        self._keep_wal_bounded()
        return row_id

    def _keep_wal_bounded(self) -> None:
        """Now and then after a commit: cut back a grown WAL; note in the file if a reader pins it.

        The note is for `status`, which another process runs: it says since
        when a reader has kept the log from being checkpointed.
        """
        now = time.monotonic()
        if now - self._wal_checked_at < _WAL_CHECK_INTERVAL or self._db.in_call_here():
            return  # (in a signal handler whose thread is inside a call: next time)
        self._wal_checked_at = now
        try:
            pinned = self._db.checkpoint_if_over_bound()
            if pinned != self._wal_pinned:  # (unknown at first: a stale note is cleared)
                note = functools.partial(_note_wal_pinned, pinned=pinned)
                self._db.write(note, "note the write-ahead log's state", _DROP_RECORD_WAIT)
                self._wal_pinned = pinned
        except OutboxError:
            pass  # a busy file, a full disk: the next look tries again

    def _commit_at_path(self, rows: Sequence[tuple[bytes, float]]) -> int:
        """Commit rows into the file the path names once they are committed; the last row id.

        Looked at after each commit (a stat): a file removed or moved away
        before or while we committed would take the rows where the next run
        never looks. They are committed again in a file made at the path.
        (With group commit, the leader's commit covers every thread's rows.)
        """
        for _ in range(_FOLLOW_ATTEMPTS):
            try:
                row_id = self._commit_here(rows)
            except OutboxUnavailable:  # FileMoved, or a connection to a file that is gone
                if self.readonly or self._db.still_at_path():
                    raise
            else:
                if self.readonly or self._db.still_at_path():
                    return row_id
            self._follow_file()
        raise OutboxUnavailable("the outbox file is removed again as soon as it is made", self.path)

    def _commit_here(self, rows: Sequence[tuple[bytes, float]]) -> int:
        """Commit into the file we have open; one found damaged is recovered first."""
        try:
            return self._commit(rows)
        except OutboxDamaged as damage:
            if self.readonly:
                raise
            self._recover(damage)
            return self._commit(rows)

    def _commit(self, rows: Sequence[tuple[bytes, float]]) -> int:
        """Insert rows (and any drops not yet recorded) in one transaction; the last row id."""
        drops = self._unrecorded_drops
        if len(rows) == 1 and not drops:  # the common case: one statement, no transaction
            cursor = self._db.execute(schema.INSERT, rows[0], "append to the outbox")
            return int(cursor.lastrowid or 0)

        def insert(conn: sqlite3.Connection) -> int:
            if drops:
                conn.execute(schema.ADD_DROPPED, (drops,))
            whole = len(rows) - len(rows) % _ROWS_PER_INSERT
            for start in range(0, whole, _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                conn.execute(_INSERT_ROWS, [value for row in chunk for value in row])
            conn.executemany(schema.INSERT, rows[whole:])  # (the rest, one by one)
            return int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])

        row_id = self._db.write(insert, "append to the outbox")
        if drops:
            self._count_unrecorded_drops(-drops)
        return row_id

    def _count_unrecorded_drops(self, count: int) -> None:
        with self._drops_lock:
            self._unrecorded_drops += count
            # Kept alive while it owes the file a count: a client dropped
            # without shutdown() (a pool task's) would take it along.
            if self._unrecorded_drops:
                _owing_drops.add(self)
            else:
                _owing_drops.discard(self)

    @property
    def unrecorded_drops(self) -> int:
        """Events this process dropped and could not yet count in the file."""
        return self._unrecorded_drops

    def _reserve(self, count: int) -> None:
        """Raise OutboxFull unless `count` more pending rows fit; any failure is a counted drop."""
        fits = self._pending_estimate + count <= self.max_pending
        if fits and time.monotonic() - self._counted_at <= _RECOUNT_INTERVAL:
            return  # the common case, without reading the file
        process.current_pid()  # (appends inside batch() do not look at it each time)
        try:
            self._check_room(count)
        except OutboxFull:
            raise  # counted by _refuse
        except OutboxError:
            self._count_unrecorded_drops(1)
            raise

    def _check_room(self, count: int) -> None:
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
        if now - self._counted_at <= (_RECOUNT_WHEN_FULL if over else _RECOUNT_INTERVAL):
            if over:
                self._refuse()
            return
        self._counted_at = now
        self._follow_file()  # moved aside by another process's recovery?
        span = self._pending_span()
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
            self._db.write(
                lambda conn: conn.execute(schema.ADD_DROPPED, (1,)),
                "count a drop",
                _DROP_RECORD_WAIT,
            )
        except OutboxError:  # a full disk too: counted with the next write that succeeds
            self._count_unrecorded_drops(1)
        raise full

    def _count_pending(self) -> int:
        return int(self._db.scalar(schema.COUNT_PENDING))

    def _pending_span(self) -> int:
        return int(self._db.scalar(schema.PENDING_SPAN) or 0)

    # -- the upload lease -----------------------------------------------------

    def try_lease(self) -> UploadLease | None:
        """The upload lease, if no other process or client holds it (see lease.py)."""
        self._follow_file()
        return self._recovering(lambda: try_lease(self._db))

    def lease_held_here(self) -> bool:
        """Whether this process holds the upload lease (see lease.py)."""
        return lease_held_here(self._db)

    def lease_is_free(self) -> bool:
        """Whether no uploader holds the lease right now (without taking it)."""
        return lease_is_free(self._db)

    def other_writers(self) -> bool:
        """Whether another process has this outbox open for writing."""
        return other_writers(self._db)

    # -- reading --------------------------------------------------------------

    def head(self, limit: int) -> Head:
        """What the uploader needs to decide whether to send now: cheap index reads."""

        def read(conn: sqlite3.Connection) -> Head:
            pending = conn.execute(
                f"SELECT count(*) FROM (SELECT 1 {schema.FIRST_PENDING} LIMIT ?)", (limit,)
            ).fetchone()[0]
            first = conn.execute(
                f"SELECT timestamp, next_attempt_at {schema.FIRST_PENDING} LIMIT 1"
            ).fetchone()
            if first is None:
                return Head(0, None, None)
            return Head(int(pending), first[0], first[1])

        return self._db.snapshot(read)

    def last_id(self) -> int:
        """The highest row id ever used (ids never go back: see schema.delete_rows)."""
        return int(self._db.scalar(f"SELECT max(_id) FROM {TABLE}") or 0)

    def state_of(self, row_id: int) -> str | None:
        """The row's state (pending, inflight or dead); None once delivered or never stored."""
        status = self._db.scalar(
            f"SELECT ifnull(status, {schema.NEW}) FROM {TABLE}"
            f" WHERE _id = ? AND {schema.STATE_WHERE['all']}",
            (row_id,),
        )
        return None if status is None else schema.state_of(status)

    def unfinished(self, up_to_id: int) -> bool:
        """Whether any row with id <= `up_to_id` is still pending or in flight (cheap)."""
        return bool(
            self._db.scalar(
                f"SELECT EXISTS (SELECT 1 {schema.FIRST_PENDING_UP_TO})"
                f" OR EXISTS (SELECT 1 FROM {TABLE} WHERE {INFLIGHT_WHERE} AND _id <= ?)",
                (up_to_id, up_to_id),
            )
        )

    def count_unfinished(self, up_to_id: int) -> int:
        """How many rows with id <= `up_to_id` are still pending or in flight."""
        return int(
            self._db.scalar(
                f"SELECT (SELECT count(*) {schema.FIRST_PENDING_UP_TO})"
                f" + (SELECT count(*) FROM {TABLE} WHERE {INFLIGHT_WHERE} AND _id <= ?)",
                (up_to_id, up_to_id),
            )
        )

    def stats(self) -> OutboxStats:
        """Counts from one snapshot of the file, plus drops this process could not write yet.

        Rows in flight count as in flight only while their uploader lives;
        rows left in flight by an uploader that died are sent again by the
        next one, so they count as pending (and as the oldest pending).
        """
        alive = not self.lease_is_free()
        head_columns = "_id, timestamp, attempts, last_status, last_error, next_attempt_at"

        def read(conn: sqlite3.Connection) -> tuple[Any, ...]:
            pending = int(conn.execute(schema.COUNT_PENDING).fetchone()[0])
            taken = dict(
                conn.execute(
                    f"SELECT status, count(*) FROM {TABLE} WHERE status >= 2 GROUP BY status"
                ).fetchall()
            )
            heads = conn.execute(f"SELECT {head_columns} {schema.FIRST_PENDING} LIMIT 1").fetchall()
            # Rows in flight come first: an uploader is trying them (its failed
            # attempts are noted as they happen), or the next reclaims them in place.
            heads += conn.execute(
                f"SELECT {head_columns} FROM {TABLE} WHERE {INFLIGHT_WHERE} ORDER BY _id LIMIT 1"
            ).fetchall()
            dropped = schema.read_meta(conn, "dropped")
            pinned_since = schema.read_meta(conn, _WAL_PINNED_KEY)
            holder = read_holder(conn) if alive else (None, None)
            if holder[0] == os.getpid() and not held_here:
                holder = (None, None)  # our note from before; the lock is someone else's
            return pending, taken, min(heads, default=None), dropped, pinned_since, holder

        held_here = self.lease_held_here()  # (not inside the read: its lock comes first)
        with self._db.memory_mapped():
            pending, taken, head, dropped, pinned_since, holder = self._db.snapshot(read)
        log_bytes = wal_bytes(self.path)
        if log_bytes <= connection.WAL_LIMIT_BYTES:
            pinned_since = None  # (a note left by a writer that stopped since: the log is back)
        inflight = int(taken.get(schema.INFLIGHT, 0))
        if not alive:
            pending, inflight = pending + inflight, 0
        return OutboxStats(
            pending=pending,
            inflight=inflight,
            dead=int(taken.get(schema.DEAD, 0)),
            dropped=int(dropped or 0) + self._unrecorded_drops,
            oldest_pending_age_s=max(0.0, time.time() - head[1]) if head else None,
            file_bytes=file_bytes(self.path),
            path=self.path,
            uploader_alive=alive,
            uploader_pid=holder[0],
            uploader_host=holder[1],
            uploader_stopped=holder_stopped(*holder),
            head_attempts=head[2] or 0 if head else 0,
            head_last_status=head[3] if head else None,
            head_last_error=head[4] if head else None,
            head_next_attempt_at=head[5] if head else None,
            wal_pinned_since=pinned_since,
            wal_bytes=log_bytes,
        )

    def rows(self, state: str = "pending", limit: int | None = None) -> Iterator[Row]:
        """Yield stored rows of one state ("pending", "inflight", "dead" or "all") in order.

        Streams in pages, so a million rows never sit in memory at once.
        """
        if state not in schema.STATE_WHERE:
            raise ValueError(f"state must be one of {sorted(schema.STATE_WHERE)}, got {state!r}")
        where = schema.STATE_WHERE[state]
        orphans = state == "pending" and self.lease_is_free()
        if orphans:  # left in flight by an uploader that ended: pending, as stats() counts them
            where = f"({where} OR {INFLIGHT_WHERE})"
        after, remaining = 0, limit
        while remaining is None or remaining > 0:
            page = 500 if remaining is None else min(500, remaining)
            raws = self._db.rows(
                f"SELECT {schema.ROW_COLUMNS} FROM {TABLE}"
                f" WHERE {where} AND _id > ? ORDER BY _id LIMIT ?",
                (after, page),
            )
            for raw in raws:
                row = schema.readable_row(raw)
                yield row._replace(state="pending") if orphans else row
            if len(raws) < page:
                return
            after = raws[-1][0]
            if remaining is not None:
                remaining -= len(raws)

    def in_call_here(self) -> bool:
        """Whether this thread is inside a call on the file (a signal handler's caller)."""
        return self._db.in_call_here()

    @property
    def database(self) -> Database:
        """The connection, for the storage package's maintenance functions."""
        return self._db


def _resolve(path: str | os.PathLike[str]) -> str:
    """The real path of an outbox file; a clear error for paths that cannot be one."""
    text = os.fspath(path)
    if not text:
        raise OutboxUnavailable("the outbox path is empty", repr(text))
    resolved = os.path.realpath(text)
    if os.path.isdir(resolved):
        raise OutboxUnavailable("the outbox path is a directory", resolved)
    return resolved


def _mismatch(name: str, recorded_host: Any, host: str) -> str:
    """What differs, in words: the key is never shown, a host is (without credentials)."""
    if name == "owner_key":
        return "another write key"
    if recorded_host is None:  # bound before hosts were recorded
        return f"another host (not recorded in this file), not {display_url(host)}"
    if recorded_host == display_url(host):  # the same server, another path
        return f"host {recorded_host} with another path than the one given"
    return f"host {recorded_host}, not {display_url(host)}"


def _read_owner_host(conn: sqlite3.Connection) -> str | None:
    shown = schema.read_meta(conn, OWNER_HOST_URL)
    return None if shown is None else str(shown)


def _fingerprint(salt: str, value: str) -> str:
    return "sha256-" + hashlib.sha256(f"{salt}\n{value}".encode()).hexdigest()


def _note_wal_pinned(conn: sqlite3.Connection, pinned: bool) -> None:
    if pinned:
        schema.write_meta(conn, _WAL_PINNED_KEY, int(time.time()))
    else:
        conn.execute("DELETE FROM outbox_meta WHERE key = ?", (_WAL_PINNED_KEY,))


def wal_bytes(path: str) -> int:
    try:
        return os.path.getsize(path + "-wal")
    except OSError:
        return 0


def file_bytes(path: str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(path + suffix)
    return total


_live_outboxes: weakref.WeakSet[Outbox] = weakref.WeakSet()


_owing_drops: set[Outbox] = set()  # outboxes whose file does not count all their drops yet


def record_drops_at_exit() -> None:
    """At this process's exit: every outbox's drops not yet counted in its file, counted."""
    for outbox in list(_owing_drops):
        outbox.record_drops()


def _forget_in_new_process() -> None:
    # Drops not yet recorded are the parent's to record; a child starts at zero,
    # with a lock of its own (a parent's thread may have held this one).
    # The group commit resets itself (group_commit.py).
    for outbox in list(_live_outboxes):
        outbox._unrecorded_drops = 0
        outbox._drops_lock = threading.RLock()
    _owing_drops.clear()


process.on_new_process(_forget_in_new_process)
