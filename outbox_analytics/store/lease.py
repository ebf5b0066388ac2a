"""The upload lease: the one object that may claim, acknowledge, release, dead-letter or reclaim.

Any number of processes append to one outbox file; exactly one at a time
uploads from it. The lease is an OS lock that dies with its holder, however
it dies, so rows left in flight by a dead holder can be reclaimed and those
of a live holder never are.

On Linux the lock is an open-file-description lock (F_OFD_SETLK) on one byte
of the database file itself, far beyond the bytes SQLite locks: it belongs to
the file (its device and inode), not to a path, so a symlink, a relative path
or a deleted side file can never make a second holder. Elsewhere it is an
flock on `<real path>.lock`, checked against the file it was taken on.
Within a process the lease is shared by every client of the file: the first
to take it holds it until it gives it back.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import OutboxError
from . import schema
from .connection import FLOCK_FORMAT, Database, Identity, file_handle, file_identity, flock_request
from .schema import DEAD, INFLIGHT, INFLIGHT_WHERE, ROW_COLUMNS, TABLE, Row

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process per file
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "UploadLease",
    "lease_held_here",
    "lease_is_free",
    "mark_writer",
    "other_writers",
    "try_lease",
    "unmark_writer",
]

_OFD = fcntl is not None and hasattr(fcntl, "F_OFD_SETLK")
# SQLite locks bytes 0x40000000 to 0x400001FF; these are far from them.
_LEASE_BYTE = 1 << 40
_WRITERS_BYTE = _LEASE_BYTE + 1
_ID_CHUNK = 500  # stays far below SQLite's limit on bound parameters


class UploadLease:
    """The right to upload from one outbox file, held by this process until `close()`."""

    def __init__(self, db: Database, release_lock: Any) -> None:
        self._db = db
        self._release_lock = release_lock
        self._pid = os.getpid()
        self._closed = False
        # Monotonic time of the uploader's next look for stranded rows (see find_stranded).
        self.next_stranded_check = 0.0

    @property
    def valid(self) -> bool:
        """Held, in this process, on the file that is still at the outbox's path."""
        if self._closed or self._pid != os.getpid():
            return False
        try:
            return file_identity(self._db.path) == self._db.identity
        except OSError:
            return False

    def close(self) -> None:
        """Give the lease back (another process, or client, may take it)."""
        with _guard:
            if self._closed:
                return
            self._closed = True
            if _held.get(self._db.identity) is self:
                del _held[self._db.identity]
            if self._pid == os.getpid():
                self._release_lock()

    # -- the rows -----------------------------------------------------------------

    def claim(self, max_count: int, max_bytes: int | None = None) -> list[Row]:
        """Mark the oldest pending rows in flight and return them, in order.

        At most `max_count` rows whose stored sizes add up to at most
        `max_bytes` (but always at least one row, so an oversized row cannot
        stall the queue). A row whose payload cannot be decoded is moved to
        the dead-letter state instead. Nothing is claimed once the lease is
        no longer valid.
        """
        if not self.valid:
            return []

        def take(conn: Any) -> list[Any]:
            candidates = conn.execute(
                f"SELECT {ROW_COLUMNS} {schema.FIRST_PENDING} LIMIT ?", (max_count,)
            ).fetchall()
            chosen: list[Any] = []
            total = 0
            for raw in candidates:
                if chosen and max_bytes is not None and total + raw[9] > max_bytes:
                    break
                chosen.append(raw)
                total += raw[9]
            ids = [raw[0] for raw in chosen]
            _update(conn, f"status = {INFLIGHT}", (), ids, only=schema.PENDING_WHERE)
            if ids:  # every row up to the last one taken is now in flight, dead or gone
                schema.move_cursor(conn, ids[-1] + 1)
                schema.record_highest_id(conn)
            return chosen

        chosen = self._db.write(take, "claim rows")
        # Decoded after the commit: appends wait on the file lock as briefly as possible.
        taken: list[Row] = []
        undecodable: list[int] = []
        for raw in chosen:
            try:
                taken.append(schema.to_row(raw, "inflight"))
            except ValueError:
                undecodable.append(raw[0])
        if undecodable:
            self.dead_letter(
                undecodable, attempts=0, status=None, error="the stored payload cannot be decoded"
            )
        return taken

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered rows (only rows still in flight). Returns how many."""
        chosen = list(ids)

        def delete(conn: Any) -> int:
            deleted = 0
            for chunk in _chunks(chosen):
                marks = ",".join("?" * len(chunk))
                where = f"_id IN ({marks}) AND status = {INFLIGHT}"
                deleted += schema.delete_rows(conn, where, chunk)
            return deleted

        return self._db.write(delete, "acknowledge rows")

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
        chosen = list(ids)
        params: tuple[Any, ...] = ()
        assignments = ""
        if attempts:
            assignments = (
                ", attempts = attempts + ?,"
                " last_status = coalesce(?, last_status), last_error = coalesce(?, last_error),"
                " next_attempt_at = ?, first_attempt_at = coalesce(first_attempt_at, ?)"
            )
            params = (attempts, status, error, next_attempt_at, first_attempt_at or time.time())

        def make_pending(conn: Any) -> None:
            for chunk in _chunks(chosen):
                where = f"_id IN ({','.join('?' * len(chunk))}) AND status = {INFLIGHT}"
                schema.make_pending(conn, where, chunk, assignments, params)

        self._db.write(make_pending, "release rows")

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
        chosen = list(ids)
        assignments = (
            f"status = {DEAD}, attempts = attempts + ?, last_status = ?, last_error = ?,"
            " first_attempt_at = coalesce(first_attempt_at, ?)"
        )
        params = (attempts, status, error, first_attempt_at or time.time())
        self._db.write(lambda conn: _update(conn, assignments, params, chosen), "dead-letter rows")

    def reclaim(self) -> int:
        """Make every in-flight row pending again: with the lease held, they are all ours."""
        return int(
            self._db.write(lambda conn: schema.make_pending(conn, INFLIGHT_WHERE), "reclaim rows")
        )

    def find_stranded(self) -> int | None:
        """Make claims reach pending rows below the claim cursor; the first such row, or None.

        Only another program can strand rows there (see schema.first_stranded);
        the uploader looks when it has nothing to send, at most once a minute.
        """
        first = self._db.read(schema.first_stranded, "look for stranded rows")
        if first is not None:
            self._db.write(lambda conn: schema.lower_cursor(conn, first), "move the claim cursor")
        return first


def _update(
    conn: Any,
    assignments: str,
    params: tuple[Any, ...],
    ids: Sequence[int],
    only: str = f"status = {INFLIGHT}",
) -> int:
    """Change the rows among `ids` in one state (in flight by default); others are left alone."""
    changed = 0
    for chunk in _chunks(ids):
        marks = ",".join("?" * len(chunk))
        changed += conn.execute(
            f"UPDATE {TABLE} SET {assignments} WHERE _id IN ({marks}) AND {only}",
            (*params, *chunk),
        ).rowcount
    return changed


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for start in range(0, len(ids), _ID_CHUNK):
        yield ids[start : start + _ID_CHUNK]


# -- taking the lease -------------------------------------------------------------

_held: dict[Identity, UploadLease] = {}
_guard = threading.Lock()


def try_lease(db: Database) -> UploadLease | None:
    """Take the file's upload lease if nobody holds it; never blocks.

    Taking it reclaims the rows left in flight, which can only belong to a
    holder that died.
    """
    with _guard:
        if db.identity in _held:
            return None  # another client of this process uploads this file
        release_lock = _lock(db)
        if release_lock is None:
            return None
        lease = UploadLease(db, release_lock)
        _held[db.identity] = lease
    try:
        lease.reclaim()
    except BaseException:
        lease.close()
        raise
    return lease


def lease_held_here(db: Database) -> bool:
    """Whether a client of this process holds the lease (taken, maybe not yet in hand)."""
    with _guard:
        return db.identity in _held


def lease_is_free(db: Database) -> bool:
    """Whether no process holds the file's lease right now (without taking it)."""
    with _guard:
        if db.identity in _held:
            return False
    if _OFD:
        fd = file_handle(db.path, db.identity)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK))
        return bool(struct.unpack(FLOCK_FORMAT, answer)[0] == fcntl.F_UNLCK)
    release = _lock(db)  # pragma: no cover - other systems: try it and let go
    if release is None:  # pragma: no cover
        return False
    release()  # pragma: no cover
    return True  # pragma: no cover


def _flock(kind: int, byte: int = _LEASE_BYTE) -> bytes:
    return flock_request(kind, byte, 1)


# -- who writes the file ------------------------------------------------------------
# Every process with the outbox open for writing holds a shared lock on the
# byte after the lease's, for as long as it runs; an operator command that
# would block writers (a full VACUUM) asks whether anyone else holds it.


def mark_writer(db: Database) -> None:
    """Say that this process has the file open for writing, until `unmark_writer` (Linux only)."""
    if not _OFD or db.readonly:
        return
    with _guard:
        _writers[db.identity] = _writers.get(db.identity, 0) + 1
        try:
            fd = file_handle(db.path, db.identity)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, _WRITERS_BYTE))
        except (OSError, OutboxError):
            pass  # a read-only descriptor: this process cannot write it anyway


def unmark_writer(db: Database) -> None:
    """The outbox was closed: when it was this process's last one on the file, say so."""
    if not _OFD or db.readonly:
        return
    with _guard:
        count = _writers.get(db.identity, 0) - 1
        if count > 0:
            _writers[db.identity] = count
            return
        _writers.pop(db.identity, None)
        try:
            fd = file_handle(db.path, db.identity)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, _WRITERS_BYTE))
        except (OSError, OutboxError):
            pass


_writers: dict[Identity, int] = {}  # open writing outboxes of this process, per file


def other_writers(db: Database) -> bool:
    """Whether another process has this file open for writing (False where we cannot know)."""
    if not _OFD:
        return False  # pragma: no cover
    fd = file_handle(db.path, db.identity)
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, _WRITERS_BYTE))
    return bool(struct.unpack(FLOCK_FORMAT, answer)[0] != fcntl.F_UNLCK)


def _lock(db: Database) -> Any:
    """Lock the file's lease without waiting: a function that unlocks it, or None if held."""
    if fcntl is None:  # pragma: no cover
        return lambda: None
    if _OFD:
        fd = file_handle(db.path, db.identity)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
        except OSError:
            return None
        return lambda: fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK))
    return _lock_file(db)  # pragma: no cover


def _lock_file(db: Database) -> Any:  # pragma: no cover - systems without OFD locks
    path = db.path + ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != file_identity(path):
            raise OSError("the lock file was replaced")
    except OSError:
        os.close(fd)
        return None
    return lambda: os.close(fd)


def _after_fork_in_child() -> None:
    # The parent holds its leases; the child holds none (the descriptors were
    # closed by the connection module, leaving the parent's lock in place).
    global _guard
    _guard = threading.Lock()
    _held.clear()
    _writers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
