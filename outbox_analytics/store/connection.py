"""Connections to an outbox file: locking, transactions, fork safety, typed errors.

Every use of SQLite in this package goes through a `Database`, and so obeys
four rules that the rest of the package cannot break:

- A statement runs only while its thread holds the file's process-wide lock
  (one per file identity, shared by every `Database` on that file). Before a
  fork() every such lock is taken, so no thread of ours is inside SQLite when
  the child is made; the child gets fresh locks and never touches an
  inherited connection (it keeps them referenced: closing one could
  checkpoint and delete a WAL that the parent still uses).
- No thread waits on SQLite's busy handler for long while holding that lock:
  SQLite waits a few milliseconds, then we release the lock and sleep, so
  `stats()`, `flush()`, the exit hook and fork() are never stuck behind a
  writer waiting for another process.
- A transaction that is interrupted at any point (KeyboardInterrupt,
  SystemExit, a signal handler raising) is rolled back: at once when the
  cleanup runs, or else by the next call on the connection, before it runs.
- Every `sqlite3.Error` becomes an `OutboxError` subclass here, chosen by
  SQLite's result code, never by the words of its message.

Descriptors of database files are opened once per file and process and never
closed: POSIX drops all of a process's locks on a file when any descriptor of
it is closed, which would pull SQLite's own locks from under its feet.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import struct
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .. import process
from ..errors import OutboxBusy, OutboxDamaged, OutboxError, OutboxUnavailable
from . import files

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Database", "FileMoved", "Identity", "file_identity", "is_damage", "result_code"]

T = TypeVar("T")
Identity = tuple[int, int]  # (st_dev, st_ino): the file itself, whatever path names it

# SQLite's primary result codes that we tell apart.
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CORRUPT, SQLITE_NOTADB = 5, 6, 11, 26
# What sqlite3_errstr() says for each code: Python 3.10 gives only the
# message, and for these codes the message is this fixed text.
_CODE_OF_TEXT = {
    "database is locked": SQLITE_BUSY,
    "database table is locked": SQLITE_LOCKED,
}
# A commit that takes the WAL past this many pages copies it into the file
# (a checkpoint, with two syncs). SQLite's default of 1,000 pages (2 MB with
# our 2 KiB pages) did it every ~650 appends; at 10,000 a page rewritten by
# many appends (the table's last leaf) is copied once for all of them, and
# appends ran about 10% faster (measured with benchmarks/enqueue.py). The
# price: a WAL of up to 20 MB and a longer pause, every ~6,500 appends.
# Not with fsync=True: there every commit syncs the WAL, and a sync of a file
# that grew costs about twice one of a file rewritten in place; the default's
# small WAL is soon rewritten from its start.
_CHECKPOINT_PAGES = 10_000
# The write-ahead log's bound (the README's "up to 20 MB"): the checkpoints
# above keep it under this (10,000 frames of 2 KiB pages are 20.7 MB), and
# SQLite cuts it back to this size when it starts the log afresh after a
# checkpoint (journal_size_limit). Only a reader holding an old snapshot (the
# sqlite3 shell left in a transaction, a backup) makes it grow past: frames
# it may still read cannot be copied back (see checkpoint_if_over_bound).
WAL_LIMIT_BYTES = 20 << 20
_READER_MMAP_BYTES = 1 << 31
# How long SQLite itself waits for a lock before we release ours and retry.
_BUSY_SLICE = 0.01
_LONGEST_PAUSE = 0.05


class FileMoved(OutboxUnavailable):
    """The file was moved away from the path while we waited to write it."""


def result_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code for an error, or None when it cannot be known."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF  # an extended code's low byte is its primary code
    # Python 3.10 raises the base DatabaseError class for SQLITE_CORRUPT
    # and SQLITE_NOTADB only (and a few codes a file never produces);
    # every I/O, lock, permission or read-only error is an OperationalError.
    if type(exc) is sqlite3.DatabaseError:
        return SQLITE_CORRUPT
    return _CODE_OF_TEXT.get(str(exc))


def is_damage(exc: BaseException) -> bool:
    """Whether SQLite says the file is corrupt or not a database."""
    if isinstance(exc, OutboxDamaged):
        return True
    return isinstance(exc, sqlite3.Error) and result_code(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def _is_busy(exc: sqlite3.Error) -> bool:
    return result_code(exc) in (SQLITE_BUSY, SQLITE_LOCKED)


def translate(exc: sqlite3.Error, path: str, doing: str) -> OutboxError:
    """Our typed error for an SQLite error (the caller raises it `from exc`)."""
    if _is_busy(exc):
        return OutboxBusy(f"cannot {doing}: another connection keeps the file locked", path)
    if is_damage(exc):
        return OutboxDamaged(f"cannot {doing}: the file is damaged ({exc})", path)
    return OutboxUnavailable(f"cannot {doing} ({exc})", path)


def file_identity(path: str) -> Identity:
    try:
        info = os.stat(path)
    except OSError as exc:
        raise OutboxUnavailable(f"cannot open the outbox ({exc.strerror})", path) from exc
    return info.st_dev, info.st_ino


class Database:
    """One SQLite connection to one outbox file, used under the file's process-wide lock."""

    def __init__(
        self,
        path: str,
        *,
        readonly: bool = False,
        fsync: bool = False,
        wait: float = 60.0,
        on_connect: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """`path` must name an existing file; `wait` bounds how long a call waits for locks.

        `on_connect(conn)` runs on each new connection (they are reopened after a fork).
        """
        self.path = path
        self.on_connect = on_connect
        self.readonly = readonly
        self.fsync = fsync
        self.wait = wait
        if readonly:  # readers change nothing: they may read a file that is not ours
            self.identity = file_identity(path)
        else:
            info = files.check_file(path)  # (never a link: the path was resolved before)
            self.identity = info.st_dev, info.st_ino
        self._file = _lock_for(self.identity)
        self._conn: sqlite3.Connection | None = None
        self._made_sidecars = False  # a reader whose opening made the -wal and -shm
        process.current_pid()  # (a connection of a parent is never ours)
        _live_databases.add(self)

    # -- the three kinds of call ------------------------------------------------

    def read(self, work: Callable[[sqlite3.Connection], T], doing: str = "read the outbox") -> T:
        """Run `work(conn)` outside any transaction (each statement sees the latest commit)."""
        return self._call(work, None, doing, self.wait)

    def snapshot(
        self, work: Callable[[sqlite3.Connection], T], doing: str = "read the outbox"
    ) -> T:
        """Run `work(conn)` in a read transaction: one consistent view for several reads."""
        return self._call(work, "BEGIN", doing, self.wait)

    def write(
        self,
        work: Callable[[sqlite3.Connection], T],
        doing: str = "write to the outbox",
        wait: float | None = None,
    ) -> T:
        """Run `work(conn)` in one write transaction: all of it is committed, or none.

        The write lock is taken up front (BEGIN IMMEDIATE), so a read that
        turns into a write never fails halfway. `wait` (default: the
        database's) bounds how long another writer may keep us out.
        """
        return self._call(work, "BEGIN IMMEDIATE", doing, self.wait if wait is None else wait)

    def execute(
        self, sql: str, params: Any = (), doing: str = "write to the outbox"
    ) -> sqlite3.Cursor:
        """Run one statement on its own: SQLite makes a single statement atomic by itself.

        The cheapest write: no BEGIN and COMMIT round trips (measured: about
        10% faster appends than `write()` for one row).
        """
        # The hot path of every track(): the same rules as _call, without its
        # layers. Anything unusual (no connection yet, a transaction left open,
        # an error, busy) takes the full path; the statement did not apply then.
        # The caller checked the process (Outbox.append calls current_pid()):
        # in a new process, the parent's connection was dropped already.
        file, me = self._file, threading.get_ident()
        conn = self._conn
        if conn is not None and me not in file.inside:
            try:
                file.inside.add(me)
                with file.lock:
                    # Identity first: a fork on another thread may have closed
                    # `conn` while we waited, and a closed one raises on any use.
                    if conn is self._conn and not conn.in_transaction:
                        try:
                            return conn.execute(sql, params)
                        except sqlite3.Error:
                            self._end_transaction()
                        finally:
                            if process.forks_unseen:
                                self._close_locked()  # see _close_if_forks_unseen
            finally:
                file.inside.discard(me)
        return self._call(lambda conn: conn.execute(sql, params), None, doing, self.wait)

    @contextlib.contextmanager
    def memory_mapped(self) -> Iterator[None]:
        """For a reader about to read every page (a count): pages from a memory map.

        Counting a million rows takes 45-80 ms this way instead of 200-300,
        a read() per page. Readers only, and only meanwhile: an I/O error in
        a mapped page is a signal, not an error SQLite can report (a job must
        never die of one), and mapped pages count in the process's memory.
        """
        if not self.readonly:
            yield
            return
        self.read(lambda conn: conn.execute(f"PRAGMA mmap_size={_READER_MMAP_BYTES}"))
        try:
            yield
        finally:
            self.read(lambda conn: conn.execute("PRAGMA mmap_size=0"))

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self.read(lambda conn: conn.execute(sql, params).fetchall())

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """The first column of the first row of a read, or None."""
        row = self.read(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else row[0]

    def _call(
        self,
        work: Callable[[sqlite3.Connection], T],
        begin: str | None,
        doing: str,
        wait: float,
    ) -> T:
        process.current_pid()  # in a forked child, forget the parent's connection and locks first
        file, me = self._file, threading.get_ident()
        if me in file.inside:
            # A signal handler (or a callback) calling us while this thread is
            # inside a call on this file: waiting for the lock would hang for good.
            if begin != "BEGIN IMMEDIATE":
                return self._read_reentered(work, begin, doing)
            busy = OutboxBusy(f"cannot {doing}: called again while a call is under way", self.path)
            busy.reentered = True  # (see Client._enqueue: not an error of the outer call)
            raise busy
        try:
            file.inside.add(me)  # in the try: an interrupt can never leave it set
            return self._call_locked(file.lock, work, begin, doing, wait)
        finally:
            file.inside.discard(me)

    def _call_locked(
        self,
        lock: threading.Lock,
        work: Callable[[sqlite3.Connection], T],
        begin: str | None,
        doing: str,
        wait: float,
    ) -> T:
        deadline = None
        pause = 0.001
        while True:
            with lock:
                try:
                    return self._attempt(work, begin)
                except sqlite3.Error as exc:
                    if deadline is None:
                        deadline = time.monotonic() + wait
                    if not _is_busy(exc) or time.monotonic() >= deadline:
                        raise translate(exc, self.path, doing) from exc
                    if self.moved():  # put aside by a recovery, which keeps writers out of it
                        message = f"cannot {doing}: the file was moved aside"
                        raise FileMoved(message, self.path) from exc
                finally:
                    self._end_transaction()
                    self._close_if_forks_unseen()
            # Busy: another process holds the lock. Wait without ours.
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _LONGEST_PAUSE)

    def _attempt(self, work: Callable[[sqlite3.Connection], T], begin: str | None) -> T:
        conn = self._connection()
        if conn.in_transaction:
            conn.execute("ROLLBACK")  # left open by an interrupted call: none of it was committed
        if begin is None:
            return work(conn)
        conn.execute(begin)
        result = work(conn)
        conn.execute("COMMIT")
        return result

    def _read_reentered(
        self, work: Callable[[sqlite3.Connection], T], begin: str | None, doing: str
    ) -> T:
        """A read from a signal handler while its thread is inside a call on this file.

        The outer call is paused between two statements (a handler runs
        between bytecodes, never inside SQLite), maybe inside a transaction
        of its own connection: the read takes a connection of its own, and
        no lock (WAL readers never wait for a writer).
        """
        try:
            conn = self._open(readonly=True)
        except sqlite3.Error as exc:
            raise translate(exc, self.path, doing) from exc
        try:
            if begin is not None:
                conn.execute(begin)
            return work(conn)
        except sqlite3.Error as exc:
            raise translate(exc, self.path, doing) from exc
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def in_call_here(self) -> bool:
        """Whether this thread is inside a call on this file (a signal handler's caller is)."""
        return threading.get_ident() in self._file.inside

    def _close_if_forks_unseen(self) -> None:
        """In a process that will fork without telling us (a uWSGI master), keep no connection.

        A child made by a C-level fork runs no fork hook, so it cannot be
        handed a clean SQLite: it inherits SQLite's record of the locks this
        process's connections hold, believes it holds them too, and so would
        not take them for real (another process could then checkpoint and
        delete the WAL under it). With no connection open at the fork, there
        is no such record to inherit.
        """
        if process.forks_unseen:
            self._close_locked()

    def _end_transaction(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._drop_connection()  # unusable now: the next call opens a fresh one

    # -- the connection -----------------------------------------------------------

    def _open(self, readonly: bool) -> sqlite3.Connection:
        """A connection of its own, for a re-entered read (see _read_reentered)."""
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(self.path)}?mode={'ro' if readonly else 'rw'}",
            uri=True,
            timeout=_BUSY_SLICE,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA temp_store=MEMORY")
        if self.on_connect is not None:
            self.on_connect(conn)
        return conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            mode = "ro" if self.readonly else "rw"  # never "rwc": we create files ourselves
            if self.readonly and self._sidecars_missing():
                if _can_create_beside(self.path):
                    self._made_sidecars = True  # SQLite makes them: removed at close()
                else:
                    # No process can write a WAL database whose -wal it cannot
                    # create: the file cannot change under us, and SQLite need
                    # not make (and fail to make) files beside it.
                    mode += "&immutable=1"
            if not self.readonly:
                files.check_sidecars(self.path)  # before SQLite opens any of them
            conn = sqlite3.connect(
                f"file:{urllib.parse.quote(self.path)}?mode={mode}",
                uri=True,
                timeout=_BUSY_SLICE,
                isolation_level=None,  # we open transactions ourselves
                check_same_thread=False,  # guarded by the file lock
            )
            try:
                # NORMAL in WAL mode survives a crash or kill of the process; FULL
                # also syncs the WAL on each commit, which survives power loss.
                conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
                if not self.readonly and not self.fsync:
                    conn.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
                if self.readonly:  # views that fill in our columns live in memory
                    conn.execute("PRAGMA temp_store=MEMORY")
                else:
                    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
                    self._check_what_sqlite_opened(conn)
                if self.on_connect is not None:
                    self.on_connect(conn)
            except BaseException:
                if self.readonly:  # a reader changed nothing: closing it is safe
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                else:
                    _abandoned.append(conn)  # (see close(): never closed while in doubt)
                raise
            self._conn = conn
        return self._conn

    def _check_what_sqlite_opened(self, conn: sqlite3.Connection) -> None:
        """A writer's new connection uses our file and our sidecars, or is refused (abandoned).

        Checked before the connection writes anything. SQLite opens the name
        we checked: still our file there means it opened ours (no one else
        can swap a file in a directory that `files` accepted). Reading the
        header opens the -wal and -shm of a WAL database: they must be ours.
        """
        wal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        if not self.still_at_path():
            raise OutboxUnavailable("the outbox file was replaced while it was opened", self.path)
        files.check_sidecars(self.path, wal_mode=wal_mode)

    def checkpoint_if_over_bound(self) -> bool:
        """Cut back a write-ahead log grown past WAL_LIMIT_BYTES; whether a reader prevents it.

        For a writer that just committed. A PASSIVE checkpoint copies what it
        can without waiting for anyone; if it copied every frame, a TRUNCATE
        one empties the log (waiting a few milliseconds at most for readers
        of the newest frames). If frames are left, a reader holds a snapshot
        older than them: True, and the log stays until it is gone.
        """
        try:
            if os.stat(self.path + "-wal").st_size <= WAL_LIMIT_BYTES:
                return False
        except OSError:
            return False

        def checkpoint(conn: sqlite3.Connection) -> bool:
            _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if copied < frames:
                return True
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return False

        return self._call(checkpoint, None, "checkpoint the write-ahead log", _BUSY_SLICE)

    def _sidecars_missing(self) -> bool:
        """A WAL database with no -wal and -shm beside it (its last connection closed cleanly)."""
        if any(os.path.exists(self.path + suffix) for suffix in _SIDECARS):
            return False
        try:
            header = os.pread(file_handle(self.path, self.identity), 20, 0)
        except OSError:
            return False
        return len(header) == 20 and header[18] == 2  # read version 2: WAL

    def _remove_sidecars_we_made(self) -> None:
        """After a reader closed: remove the -wal and -shm that SQLite made for it, if unused.

        A reader must leave a directory as it found it. The files are removed
        only while we hold the lock SQLite's own last connection takes to
        remove them (an exclusive lock on its shared range), so no connection
        uses them, and only when the -wal is empty: a writer that came and went
        meanwhile may have left commits there, which are not ours to remove.
        """
        if not _OFD:
            return  # pragma: no cover - elsewhere the files stay
        fd = file_handle(self.path, self.identity)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _sqlite_shared_range(fcntl.F_WRLCK))
        except OSError:
            return  # another connection has the file open: the files are in use
        try:
            if os.path.getsize(self.path + "-wal") == 0:
                for suffix in _SIDECARS:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path + suffix)
        except OSError:
            pass
        finally:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _sqlite_shared_range(fcntl.F_UNLCK))

    def _drop_connection(self) -> None:
        if self._conn is not None:
            _abandoned.append(self._conn)
            self._conn = None

    def close(self) -> None:
        """Close the connection (a later call opens a new one).

        If the file was moved away from our path (a damaged file put aside),
        the connection is abandoned instead: closing the last connection to
        a WAL database deletes `<path>-wal` and `<path>-shm` by name, which
        by now are the fresh file's.
        """
        if self.in_call_here():
            return  # a signal handler's: this thread holds the lock; the connection stays
        with self._file.lock:
            self._close_locked()
            if self._made_sidecars and not self.moved():  # (a fresh file's are not ours)
                self._made_sidecars = False
                self._remove_sidecars_we_made()

    def _close_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.moved():
            _abandoned.append(conn)
            return
        try:
            conn.close()
        except sqlite3.Error:
            _abandoned.append(conn)

    def keep_writers_out(self) -> None:
        """Take the write lock and never give it back: the file is about to be moved aside.

        Other connections still on it then fail to write (busy), see that the
        file moved, and follow the path to the fresh one, instead of committing
        into a file nobody reads any more. A file too damaged even for that is
        left alone: writers then notice the move at their next recount.
        """
        with self._file.lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error:
                return
            self._conn = None
            _abandoned.append(conn)  # open for good, with its transaction: ends with the process

    def abandon(self) -> None:
        """Stop using this file without closing its connection (see `close`)."""
        with self._file.lock:
            self._drop_connection()

    def moved(self) -> bool:
        """Whether the file at our path is no longer the one this connection uses.

        Removed, moved away or replaced: a single stat (about a microsecond).
        """
        return not self.still_at_path()

    def still_at_path(self) -> bool:
        """Whether the path still leads to our file (through a link an operator made, too)."""
        try:
            info = os.stat(self.path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.identity

    def _forget_parent(self) -> None:
        """In a new process: the parent's connection is never used, nor closed (see close())."""
        self._file = _lock_for(self.identity)
        self._drop_connection()


_SIDECARS = ("-wal", "-shm")
_OFD = fcntl is not None and hasattr(fcntl, "F_OFD_SETLK")
# The bytes on which every SQLite connection to a WAL database holds a shared
# lock while it is open (SHARED_FIRST and SHARED_SIZE in SQLite's os_unix.c).
_SQLITE_SHARED_FIRST, _SQLITE_SHARED_SIZE = 0x40000002, 510


FLOCK_FORMAT = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid (0 for OFD)


def flock_request(kind: int, start: int, length: int) -> bytes:
    """A `struct flock` for fcntl's open-file-description locks."""
    return struct.pack(FLOCK_FORMAT, kind, os.SEEK_SET, start, length, 0)


def _sqlite_shared_range(kind: int) -> bytes:
    return flock_request(kind, _SQLITE_SHARED_FIRST, _SQLITE_SHARED_SIZE)


def _can_create_beside(path: str) -> bool:
    """Whether files can be made in the file's directory (False on a read-only mount)."""
    return os.access(os.path.dirname(path) or ".", os.W_OK)


# -- per-file state of this process ---------------------------------------------

_live_databases: weakref.WeakSet[Database] = weakref.WeakSet()
# Connections we must never use (inherited across fork, or broken) and never
# close or let the garbage collector close: see the module docstring.
_abandoned: list[sqlite3.Connection] = []


class _FileLock:
    """The per-process lock of one file, and the threads inside a call on it (refused re-entry)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside: set[int] = set()


_locks: dict[Identity, _FileLock] = {}
_handles: dict[Identity, int] = {}
_registry = threading.Lock()


def _lock_for(identity: Identity) -> _FileLock:
    with _registry:
        return _locks.setdefault(identity, _FileLock())


def file_handle(path: str, identity: Identity) -> int:
    """This process's descriptor of the file (opened once, never closed; see above)."""
    with _registry:
        fd = _handles.get(identity)
        if fd is not None:
            return fd
        try:
            fd = _open_descriptor(path)
        except OSError as exc:
            raise OutboxUnavailable(f"cannot open the outbox ({exc.strerror})", path) from exc
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != identity:
            # Replaced since it was looked at: keep the descriptor (closing
            # one of a database file is what we must not do) and refuse.
            _stray_handles.append(fd)
            raise OutboxUnavailable("the outbox file was replaced while it was opened", path)
        _handles[identity] = fd
        return fd


_stray_handles: list[int] = []


def _open_descriptor(path: str) -> int:
    """Read-write if we may (the lease's lock needs it), else read-only (a read-only mount)."""
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC  # a link planted at the name is never followed
    try:
        return os.open(path, os.O_RDWR | nofollow)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return os.open(path, os.O_RDONLY | nofollow)


_taken_for_fork: list[threading.Lock] = []
# A thread holds a file lock for one SQLite call (milliseconds); the bound
# only matters if fork() is called from a signal handler that interrupted a
# call of ours on the same thread, which must not hang the program.
_FORK_WAIT = 5.0


def _before_fork() -> None:
    for lock in [_registry, *(file.lock for file in list(_locks.values()))]:
        if lock.acquire(timeout=_FORK_WAIT):
            _taken_for_fork.append(lock)
    # Close our connections too (each reopens on its next call): SQLite keeps
    # per-file lock bookkeeping for the whole process, and a child that
    # inherits it believes it holds locks that only the parent holds.
    for database in list(_live_databases):
        if database._file.lock in _taken_for_fork:
            database._close_locked()


def _after_fork_in_parent() -> None:
    while _taken_for_fork:
        _taken_for_fork.pop().release()


def _forget_parent() -> None:
    """In a new process (after any fork, whether or not Python's hooks ran)."""
    global _registry
    _registry = threading.Lock()
    _locks.clear()
    _taken_for_fork.clear()
    # The inherited descriptors share their open file descriptions (and the
    # upload lease's lock) with the parent; this process has no locks of its
    # own yet, so closing them here is safe and leaves the parent's lock alone.
    for fd in [*_handles.values(), *_stray_handles]:
        with contextlib.suppress(OSError):
            os.close(fd)
    _handles.clear()
    _stray_handles.clear()
    for database in list(_live_databases):
        database._forget_parent()


process.on_new_process(_forget_parent)
if hasattr(os, "register_at_fork"):
    # Python's fork: no thread of ours is inside SQLite when the child is made
    # (see _before_fork). The child's reset runs through process.current_pid().
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)
