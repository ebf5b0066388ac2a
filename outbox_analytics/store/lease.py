"""The upload lease: the one object that may claim, acknowledge, release, dead-letter or reclaim.

Any number of processes append to one outbox file; exactly one at a time
uploads from it. The lease is an OS lock that dies with its holder, however
it dies, so rows left in flight by a dead holder can be reclaimed and those
of a live holder never are.

On Linux the lock is an open-file-description lock (F_OFD_SETLK) on one byte
of the database file itself, far beyond the bytes SQLite locks: it belongs to
the file (its device and inode), not to a path, so a symlink, a relative path
or a deleted side file can never make a second holder.

Elsewhere (macOS, BSD) it is a POSIX record lock (`fcntl.lockf`) on one byte
of `<real path>.lock`, checked against the file at that path when taken and
whenever the lease is used. A record lock belongs to the process: a forked
child never inherits it (an flock, which belongs to the open file, was kept
alive by every child after its holder died, and nobody uploaded), but the
process drops it when it closes *any* descriptor of the lock file. So each
process opens a lock file once, keeps that one descriptor while the process
lives, and nothing else of ours opens or closes it; a child closes the
descriptors it inherited (it holds no lock on them). Its limits: deleting or
replacing the lock file while its holder lives lets a second holder in (the
first gives up its lease at its next use), and every process on a file must
use the same kind of lock.

Testing switch: `OUTBOX_ANALYTICS_LEASE_LOCK=file` in the environment makes
Linux use the lock file too (read whenever the lease is taken or asked
about), so that the tests and CI run that path. It is not meant for
production: processes on one file with and without it would not see each
other's lease.

Within a process the lease is shared by every client of the file: the first
to take it holds it until it gives it back. Its state here (who holds what,
the lock files' descriptors) belongs to one process: a new one, whether made
by Python's fork or a C-level one, forgets it (see `process.on_new_process`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import process
from ..errors import OutboxError, OutboxUnavailable
from . import schema
from .connection import FLOCK_FORMAT, Database, Identity, file_handle, file_identity, flock_request
from .schema import DEAD, INFLIGHT, INFLIGHT_WHERE, ROW_COLUMNS, TABLE, Claimed

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process per file
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LEASE_LOCK_ENV",
    "UploadLease",
    "describe_holder",
    "holder_stopped",
    "lease_held_here",
    "lease_is_free",
    "mark_writer",
    "other_writers",
    "read_holder",
    "try_lease",
    "unmark_writer",
]

log = logging.getLogger("outbox_analytics")

_OFD = fcntl is not None and hasattr(fcntl, "F_OFD_SETLK")
# SQLite locks bytes 0x40000000 to 0x400001FF; these are far from them.
_LEASE_BYTE = 1 << 40
_WRITERS_BYTE = _LEASE_BYTE + 1
_ID_CHUNK = 500  # stays far below SQLite's limit on bound parameters
# The testing switch (see above): "file" makes Linux use the lock file.
LEASE_LOCK_ENV = "OUTBOX_ANALYTICS_LEASE_LOCK"


class UploadLease:
    """The right to upload from one outbox file, held by this process until `close()`."""

    def __init__(
        self,
        db: Database,
        release_lock: Callable[[], object],
        lock_in_place: Callable[[], bool] | None = None,
    ) -> None:
        """`lock_in_place()`: whether the lock is still on the file that other takers lock."""
        self._db = db
        self._release_lock = release_lock
        self._lock_in_place = lock_in_place
        self._pid = process.current_pid()
        self._closed = False
        # Rows dead-lettered by claims because they cannot be sent (see take_unsendable).
        self._unsendable = 0
        self.claimed_through = 0  # the highest id claimed by this lease so far
        # Monotonic time of the uploader's next look for stranded rows (see find_stranded).
        self.next_stranded_check = 0.0

    @property
    def valid(self) -> bool:
        """Held, in this process, on the file that is still at the outbox's path."""
        if self._closed or self._pid != process.current_pid():
            return False
        try:
            if file_identity(self._db.path) != self._db.identity:
                return False
        except (OSError, OutboxError):
            return False
        return self._lock_in_place is None or self._lock_in_place()

    def close(self) -> None:
        """Give the lease back (another process, or client, may take it)."""
        process.current_pid()  # in a new process: the parent's lease was forgotten
        with _guard:
            if self._closed:
                return
            self._closed = True
            if _held.get(self._db.identity) is self:
                del _held[self._db.identity]
            if self._pid == process.known_pid():
                self._release_lock()

    # -- the rows -----------------------------------------------------------------

    def claim(
        self, max_count: int, max_bytes: int | None = None, *, whole: bool = False
    ) -> list[Claimed]:
        """Mark the oldest pending rows in flight and return them, in order.

        At most `max_count` rows whose stored sizes add up to at most
        `max_bytes` (but always at least one row, so an oversized row cannot
        stall the queue). With `whole`, only a full batch (either limit
        reached) is claimed, else nothing: a batch claimed ahead while one is
        on the wire must not be cut short by taking what happens to be there.
        A row whose payload cannot be decoded, or sent as JSON, is moved to
        the dead-letter state instead. Nothing is claimed once the lease is
        no longer valid.
        """
        if not self.valid:
            return []

        def take(conn: Any) -> list[Any]:
            stranded = schema.read_meta(conn, schema.STRANDED_FROM)
            if stranded is not None:  # made pending below the cursor by another program
                schema.lower_cursor(conn, stranded)
            candidates = conn.execute(
                f"SELECT {ROW_COLUMNS} {schema.FIRST_PENDING} LIMIT ?", (max_count,)
            ).fetchall()
            chosen: list[Any] = []
            total = 0
            full = len(candidates) == max_count
            for raw in candidates:
                if chosen and max_bytes is not None and total + raw[9] > max_bytes:
                    full = True
                    break
                chosen.append(raw)
                total += raw[9]
            if whole and not full:
                return []
            if chosen:
                # The pending rows from the first chosen to the last are exactly
                # those chosen (read in id order, in this transaction): marked
                # by their range, not by a list of ids (measured: ~20% faster).
                first, last = chosen[0][0], chosen[-1][0]
                conn.execute(
                    f"UPDATE {TABLE} SET status = {INFLIGHT}"
                    f" WHERE _id BETWEEN ? AND ? AND {schema.PENDING_WHERE}",
                    (first, last),
                )
                # every row up to the last one taken is now in flight, dead or gone
                schema.move_cursor(conn, last + 1)
                schema.record_highest_id(conn)
            return chosen

        chosen = self._db.write(take, "claim rows")
        if chosen:
            self.claimed_through = max(self.claimed_through, chosen[-1][0])
        # Decoded after the commit: appends wait on the file lock as briefly as possible.
        taken: list[Claimed] = []
        unsendable: dict[str, list[int]] = {}
        for raw in chosen:
            try:
                taken.append(schema.to_claimed(raw))
            except schema.NotJSON as exc:
                unsendable.setdefault(str(exc), []).append(raw[0])
            except ValueError:
                unsendable.setdefault("the stored payload cannot be decoded", []).append(raw[0])
        for error, ids in unsendable.items():
            self.dead_letter(ids, attempts=0, status=None, error=error)
            self._unsendable += len(ids)
            log.error(
                "outbox-analytics: %d row(s) moved to the dead-letter state: %s", len(ids), error
            )
        return taken

    def take_unsendable(self) -> int:
        """How many rows claims dead-lettered since the last call (for the uploader's counts)."""
        count, self._unsendable = self._unsendable, 0
        return count

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered rows (only rows still in flight). Returns how many."""
        chosen = list(ids)

        def delete(conn: Any) -> int:
            deleted = 0
            for chunk in _chunks(chosen):
                marks = ",".join("?" * len(chunk))
                where = f"_id IN ({marks}) AND status = {INFLIGHT}"
                deleted += schema.delete_rows(conn, where, chunk, highest=max(chunk))
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
        if attempts or error is not None or next_attempt_at is not None:
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

    def note_failure(
        self,
        ids: Iterable[int],
        *,
        attempts: int,
        status: int | None,
        error: str,
        first_attempt_at: float | None = None,
    ) -> None:
        """Count failed sends of in-flight rows, with the last cause; they stay in flight."""
        chosen = list(ids)
        assignments = (
            "attempts = attempts + ?, last_status = ?, last_error = ?,"
            " first_attempt_at = coalesce(first_attempt_at, ?)"
        )
        params = (attempts, status, error, first_attempt_at or time.time())
        self._db.write(lambda conn: _update(conn, assignments, params, chosen), "note a failure")

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

    def take_over(self) -> int:
        """Just taken: reclaim, and note who holds the lease now, in the same transaction.

        The lock itself does not say who holds it (an open-file lock has no
        pid), and "another process is sending them" is not enough for an
        operator whose events wait on a process that was stopped. On a full
        disk the note gives way (a reclaim with nothing to reclaim needs no
        room): the lease is held all the same.
        """
        holder = f"{self._pid} {socket.gethostname()}"

        def work(conn: sqlite3.Connection) -> int:
            if schema.read_meta(conn, _HOLDER_KEY) != holder:
                schema.write_meta(conn, _HOLDER_KEY, holder)
            return schema.make_pending(conn, INFLIGHT_WHERE)

        try:
            return int(self._db.write(work, "take the upload lease"))
        except OutboxUnavailable as exc:
            log.debug("could not note who holds the upload lease: %s", exc)
            return self.reclaim()

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
    process.current_pid()  # in a new process, the parent's state is forgotten first
    with _guard:
        if db.identity in _held:
            return None  # another client of this process uploads this file
        taken = _lock(db)
        if taken is None:
            return None
        lease = UploadLease(db, *taken)
        _held[db.identity] = lease
    try:
        lease.take_over()
    except BaseException:
        lease.close()
        raise
    return lease


# Who took the lease last: "<pid> <host name>" (see UploadLease.take_over).
_HOLDER_KEY = "lease_holder"


def read_holder(conn: sqlite3.Connection) -> tuple[int | None, str | None]:
    """The pid and host of the process that took the lease last (meaningful while it is held).

    (None, None) if not known: no note (an older release took it), or the
    note of a holder of this host that is gone (its taker could not write).
    """
    pid, _, host = str(schema.read_meta(conn, _HOLDER_KEY) or "").partition(" ")
    if not pid.isdigit() or (_on_this_host(host) and not _alive(int(pid))):
        return None, None
    return int(pid), host or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True


def describe_holder(stats: schema.OutboxStats) -> str:
    """The lease holder for people: "pid 1234", "pid 1234, stopped", "pid 1234 on db-2"."""
    pid, host = stats.uploader_pid, stats.uploader_host
    if pid is None:
        return "a process whose pid is not known: an older release, or a lock on the file"
    if not _on_this_host(host):
        return f"pid {pid} on {host}"
    return f"pid {pid}, stopped" if stats.uploader_stopped else f"pid {pid}"


def holder_stopped(pid: int | None, host: str | None) -> bool:
    """Whether the lease holder is stopped (SIGSTOP, Ctrl-Z, a debugger): seen on Linux only.

    Such a holder keeps the lease (its lock lives as long as it does) and
    sends nothing until it runs again.
    """
    return pid is not None and _on_this_host(host) and _is_stopped(pid)


def _on_this_host(host: str | None) -> bool:
    return not host or host == socket.gethostname()


def _is_stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The state follows "(name)", and a name may hold spaces and parentheses.
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return False
    return bool(fields) and fields[0] in (b"T", b"t")


def lease_held_here(db: Database) -> bool:
    """Whether a client of this process holds the lease (taken, maybe not yet in hand)."""
    process.current_pid()  # (a forked child holds none of its parent's)
    with _guard:
        return db.identity in _held


def lease_is_free(db: Database) -> bool:
    """Whether no process holds the file's lease right now (without taking it)."""
    process.current_pid()
    with _guard:
        if db.identity in _held:
            return False
        if _uses_lock_file():
            return _lock_file_is_free(db.path + ".lock")
    if _OFD:
        fd = file_handle(db.path, db.identity)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK))
        return bool(struct.unpack(FLOCK_FORMAT, answer)[0] == fcntl.F_UNLCK)
    return True  # pragma: no cover - Windows: no lock, one process per file


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
    process.current_pid()
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
    process.current_pid()
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


_Taken = tuple[Callable[[], object], Callable[[], bool] | None]


def _uses_lock_file() -> bool:
    """Whether the lease is the lock file's (see the module docstring), read at each use."""
    return fcntl is not None and (not _OFD or os.environ.get(LEASE_LOCK_ENV) == "file")


def _lock(db: Database) -> _Taken | None:
    """Lock the file's lease without waiting (under `_guard`), or None if it is held.

    Returns a function that unlocks it, and one that says whether the lock
    is still on the file that other takers lock (None: always).
    """
    if fcntl is None:  # pragma: no cover - Windows
        return (lambda: None), None
    if _uses_lock_file():
        return _lock_file(db.path + ".lock")
    fd = file_handle(db.path, db.identity)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
    except OSError:
        return None
    return (lambda: fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK))), None


# -- the lock file (macOS, BSD; Linux with the testing switch) ----------------------
# POSIX record locks belong to a process and a file (not to a descriptor), are
# never inherited by a child, and are all dropped when the process closes any
# descriptor of the file. Hence one descriptor per lock file and process,
# opened at its first use and kept (closing it would drop the lock: a client
# that gives the lease back only unlocks), and every lock file's state here
# read and changed under `_guard` only. Two clients of one process never lock
# one file twice: `_held` keeps the second out, and `held` below keeps out
# a client of a file that replaced the holder's at the same path.


class _LockFile:
    """This process's one descriptor of one lock file, and whether we hold its lock."""

    __slots__ = ("fd", "held", "identity", "path")

    def __init__(self, fd: int, identity: Identity, path: str) -> None:
        self.fd = fd
        self.identity = identity
        self.path = path
        self.held = False


_lock_files: dict[Identity, _LockFile] = {}  # by the lock file's own identity
# Descriptors of a lock file that another entry already names (the path
# changed under an open): kept, since closing one would drop that entry's lock.
_spare_fds: list[int] = []


def _lock_file(path: str) -> _Taken | None:
    entry = _lock_file_at(path, create=True)
    if entry is None or entry.held:
        return None  # a client of this process holds it (for a file since replaced)
    try:
        fcntl.lockf(entry.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError:
        return None  # another process holds it (or the file cannot be locked)
    if _identity_at(path) != entry.identity:  # replaced between our look and our lock
        _unlock(entry)
        return None
    entry.held = True

    def release() -> None:  # (under _guard: UploadLease.close)
        entry.held = False
        _unlock(entry)

    return release, lambda: _identity_at(path) == entry.identity


def _unlock(entry: _LockFile) -> None:
    with contextlib.suppress(OSError):
        fcntl.lockf(entry.fd, fcntl.LOCK_UN, 1, 0)


def _lock_file_is_free(path: str) -> bool:
    """Whether no process locks the lock file (under `_guard`); asked without taking it."""
    entry = _lock_file_at(path, create=False)
    if entry is None:
        return True  # no lock file: nobody holds it (a holder keeps it at its path)
    if entry.held:
        return False  # ours, for a file since replaced at the same path
    return not _locked_elsewhere(entry.fd)


def _locked_elsewhere(fd: int) -> bool:
    """Whether another process holds the lock: F_GETLK where we know `struct flock`.

    Elsewhere, or if the answer makes no sense, we take a shared lock and let
    go at once (a taker at that instant finds it held and tries again later).
    """
    if _POSIX_FLOCK is not None:
        request = _posix_flock(fcntl.F_RDLCK)  # only an exclusive lock (a holder's) conflicts
        try:
            kind = _posix_flock_type(fcntl.fcntl(fd, fcntl.F_GETLK, request))
        except OSError:
            kind = None
        if kind in (fcntl.F_UNLCK, fcntl.F_RDLCK, fcntl.F_WRLCK):
            return kind != fcntl.F_UNLCK
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 0)
    except OSError:
        return True
    with contextlib.suppress(OSError):
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
    return False


def _identity_at(path: str) -> Identity | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _lock_file_at(path: str, create: bool) -> _LockFile | None:
    """Our descriptor of the lock file now at `path` (under `_guard`), opened at its first use.

    None if there is none and `create` is false. Descriptors of lock files
    that were at this path before are closed, unless we hold their lock.
    """
    identity = _identity_at(path)
    entry = _lock_files.get(identity) if identity is not None else None
    if entry is None:
        fd = _open_lock_file(path, create)
        if fd is None:
            return None
        info = os.fstat(fd)
        identity = (info.st_dev, info.st_ino)
        entry = _lock_files.get(identity)
        if entry is not None:  # the path changed under us, back to a file we have open
            _spare_fds.append(fd)
        else:
            entry = _lock_files[identity] = _LockFile(fd, identity, path)
    for old in [e for e in _lock_files.values() if e.path == path and e is not entry]:
        if not old.held:  # we hold no lock on that file: closing drops nothing
            del _lock_files[old.identity]
            with contextlib.suppress(OSError):
                os.close(old.fd)
    return entry


def _open_lock_file(path: str, create: bool) -> int | None:
    flags = os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        try:
            return os.open(path, os.O_RDWR | flags, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # Read-only: enough to ask whether it is locked, not to lock it.
            return os.open(path, os.O_RDONLY | flags, 0o600)
    except FileNotFoundError:
        if create:
            raise OutboxUnavailable("cannot create the upload lease's lock file", path) from None
        return None
    except OSError as exc:
        message = f"cannot open the upload lease's lock file ({exc.strerror})"
        raise OutboxUnavailable(message, path) from exc


# `struct flock` for fcntl(F_GETLK) where we know its layout (fcntl.lockf cannot
# ask who holds a lock): its format and the names of its fields, in order.
_PosixFlock = tuple[str, tuple[str, ...]]
if sys.platform.startswith("linux"):
    _POSIX_FLOCK: _PosixFlock | None = (FLOCK_FORMAT, ("type", "whence", "start", "len", "pid"))
elif sys.platform == "darwin" or sys.platform.startswith(("openbsd", "netbsd", "dragonfly")):
    _POSIX_FLOCK = ("@qqihh", ("start", "len", "pid", "type", "whence"))
elif sys.platform.startswith("freebsd"):
    _POSIX_FLOCK = ("@qqihhi", ("start", "len", "pid", "type", "whence", "sysid"))
else:  # pragma: no cover - asked by taking a shared lock instead
    _POSIX_FLOCK = None


def _posix_flock(kind: int) -> bytes:
    """A request about the byte `_lock_file` locks (byte 0), for F_GETLK."""
    assert _POSIX_FLOCK is not None
    layout, fields = _POSIX_FLOCK
    values = {"type": kind, "whence": os.SEEK_SET, "start": 0, "len": 1}
    return struct.pack(layout, *(values.get(name, 0) for name in fields))


def _posix_flock_type(answer: bytes) -> int:
    assert _POSIX_FLOCK is not None
    layout, fields = _POSIX_FLOCK
    return int(struct.unpack(layout, answer)[fields.index("type")])


# -- a new process --------------------------------------------------------------------


def _forget_the_parents() -> None:
    """In a new process (see process.py): none of the parent's leases is ours. Quick, raise-free."""
    global _guard
    _guard = threading.Lock()  # a thread of the parent may have held it at the fork
    _held.clear()
    _writers.clear()
    # The parent's record locks stayed with it (a child never inherits them),
    # so this process holds none on these files: closing the descriptors it
    # inherited drops nothing of ours, leaves the parent's lock in place, and
    # stops them leaking. The next lease here opens its own.
    for fd in [*(entry.fd for entry in _lock_files.values()), *_spare_fds]:
        with contextlib.suppress(OSError):
            os.close(fd)
    _lock_files.clear()
    _spare_fds.clear()


process.on_new_process(_forget_the_parents)
