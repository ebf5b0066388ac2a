"""Damaged outboxes: moved aside under a lock, replaced by a fresh file, salvaged into it.

Only a file that SQLite itself calls corrupt (SQLITE_CORRUPT, SQLITE_NOTADB)
and whose header says SQLite is ours to recover; a locked, unreadable or
read-only file raises a clear error and is never moved. Nothing is ever
deleted: the damaged file stays as `<name>.corrupt-<time>-<pid>[-n]`.

Many processes may meet the same damaged file at once. Recovery runs under
an exclusive lock on the file's directory, and the first thing done under it
is to look again: if another process already put a fresh outbox at the path,
we simply open that. So exactly one process moves the file aside and
salvages it, and every process ends up writing the same fresh outbox. Writers
open the file under a shared lock on the directory, so none of them opens
the path between the move and the fresh file.

The damaged file is read where it lies, read-only: no copy of it is made,
so a disk with little room left needs room only for the rows salvaged. If
even that runs out (or the process dies), the salvage stops cleanly: the
file moved aside keeps a `<aside>.unsalvaged` mark beside it, the fresh
outbox's metadata notes the last id copied (in the transaction that copied
it), and every writer that opens the outbox later goes on from there, under
the same lock, until the mark can be removed. No row is copied twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import OutboxDamaged, OutboxError, OutboxUnavailable
from . import files, schema
from .connection import Database, Identity, file_handle, file_identity, translate
from .files import create_private_file

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["finish_salvages", "has_sqlite_header", "opening", "recover"]

log = logging.getLogger("outbox_analytics")

_SIDE_FILES = ("-wal", "-shm", "")  # the WAL first: a fresh file must never meet a stale one
# Beside a damaged file whose readable rows are not all in the outbox yet.
_UNSALVAGED = ".unsalvaged"
# Beside a damaged file: the scratch copy an earlier version salvaged from. Left
# behind, it means that salvage failed (the copy filled the disk): do it again.
_OLD_SCRATCH = ".salvage"
_SALVAGE_CHUNK = 500
_SINGLE_STEPS = 64  # ids stepped over one at a time before the steps double


def has_sqlite_header(db: Database) -> bool:
    """Whether the file starts as an SQLite database does (read through our kept descriptor)."""
    try:
        fd = file_handle(db.path, db.identity)
        return os.pread(fd, 16, 0) == b"SQLite format 3\x00"
    except (OSError, OutboxError):
        return False


def recover(
    path: str, damage: OutboxDamaged, damaged: Identity, reopen: Callable[[], Database]
) -> Database:
    """Move the damaged file at `path` aside, open a fresh outbox there, salvage into it.

    `damaged` is the identity of the file found damaged: if another file is
    at the path by the time we hold the lock, another process recovered it,
    and we open that one (going on with its salvage if that stopped). If the
    fresh outbox cannot be made (a full disk), its error is raised: the file
    moved aside is marked, and the next open salvages it.
    """
    directory = os.path.dirname(path)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutboxDamaged(
            f"the outbox is damaged and cannot be moved aside (directory not writable): {damage}",
            path,
        )
    with _directory_locked(directory, path):
        if _identity_at(path) != damaged:
            fresh = reopen()  # another process recovered it while we waited
            _finish_salvages(path, fresh)
            return fresh
        Database(path, wait=1.0).keep_writers_out()
        aside = _move_aside(path)
        create_private_file(path)
        fresh = reopen()
        salvaged = _salvage(aside, fresh)
        log.error(
            "outbox %s was damaged (%s); moved aside to %s; %s", path, damage, aside, salvaged
        )
        if salvaged.stopped is None:  # (else there is no room for older ones either)
            _finish_salvages(path, fresh)
    return fresh


def finish_salvages(path: str, into: Database) -> None:
    """Go on with the salvages into the outbox at `path` that stopped before their end.

    Every writer calls this once it has opened the outbox (not under the
    shared lock of `opening`: this takes the exclusive one). When there is
    nothing to do, it costs one listing of the directory. Never raises
    OutboxError: a salvage that stops again goes on at the next open.
    """
    if not _unsalvaged(path):
        return
    try:
        with _directory_locked(os.path.dirname(path), path):
            _finish_salvages(path, into)
    except OutboxError as exc:
        log.error("outbox %s: cannot go on with a salvage that stopped: %s", path, exc)


def _finish_salvages(path: str, into: Database) -> None:
    """Under the directory's exclusive lock: salvage what is still marked, oldest first."""
    for aside in _unsalvaged(path):  # again: another process may have finished meanwhile
        refused = _not_ours(aside)
        if refused:  # planted by another user: its rows would be sent under our key
            log.error("outbox %s: not salvaging %s: %s", path, aside, refused)
            continue
        salvaged = _salvage(aside, into)
        if salvaged.gone:
            log.error(
                "outbox %s: the damaged file %s is gone before its salvage finished;"
                " the rows not salvaged from it are lost",
                path, aside,
            )  # fmt: skip
            continue
        log.log(
            logging.ERROR if salvaged.stopped else logging.WARNING,
            "outbox %s: the salvage of %s (damaged earlier) resumed; %s", path, aside, salvaged,
        )  # fmt: skip
        if salvaged.stopped is not None:
            return


def _not_ours(aside: str) -> str | None:
    """Why a damaged file found beside the outbox, or a mark of it, is not ours to salvage."""
    for name in (aside, *(aside + mark for mark in (_UNSALVAGED, _OLD_SCRATCH))):
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            continue  # (a damaged file gone is given up by _salvage)
        except OSError as exc:
            return f"cannot look at {name} ({exc.strerror})"
        why = files.refusal(info, os.geteuid(), name)
        if why is not None:
            return why
    return None


def _unsalvaged(path: str) -> list[str]:
    """The damaged files moved aside from `path` whose salvage has not finished, oldest first."""
    directory, name = os.path.split(path)
    try:
        names = os.listdir(directory)
    except OSError:
        return []  # (opening the outbox reports a directory it cannot use)
    found = {
        os.path.join(directory, each[: -len(mark)])
        for each in names
        if each.startswith(f"{name}.corrupt-")
        for mark in (_UNSALVAGED, _OLD_SCRATCH)
        if each.endswith(mark)
    }
    return sorted(found)  # (the names hold the time they were moved aside)


def _identity_at(path: str) -> Identity | None:
    try:
        return file_identity(path)
    except OutboxError:
        return None


def opening(path: str) -> contextlib.AbstractContextManager[None]:
    """A shared lock on the outbox's directory while a writer opens the file (see recover)."""
    return _directory_locked(os.path.dirname(path), path, shared=True)


@contextlib.contextmanager
def _directory_locked(directory: str, path: str, shared: bool = False) -> Iterator[None]:
    """An flock on the directory: exclusive for a recovery, shared for opening a file."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OutboxUnavailable(
            f"cannot lock the outbox's directory ({exc.strerror})", path
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        # Unlocked first: gevent (25.8+) closes a directory's descriptor later,
        # from its hub, and our next open would wait for that lock for good.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)  # a directory: no SQLite lock lives on it


def _move_aside(path: str) -> str:
    """Give the file (and its WAL and shared memory) a new, unused name; never overwrite.

    The new name is marked unsalvaged first: a file moved aside unmarked
    would never be salvaged if the process died before the salvage ended.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for attempt in range(1000):
        aside = f"{path}.corrupt-{stamp}-{os.getpid()}" + (f"-{attempt}" if attempt else "")
        if not any(os.path.lexists(aside + suffix) for suffix in (*_SIDE_FILES, _UNSALVAGED)):
            break
    made: list[str] = []
    try:
        _create_mark(aside + _UNSALVAGED)
        made.append(_UNSALVAGED)
        for suffix in _SIDE_FILES:
            if os.path.lexists(path + suffix):
                os.link(path + suffix, aside + suffix)  # fails rather than overwrite
                made.append(suffix)
    except OSError as exc:
        for suffix in made:
            with contextlib.suppress(OSError):
                os.unlink(aside + suffix)
        raise OutboxDamaged(
            f"the outbox is damaged and cannot be moved aside ({exc.strerror})", path
        ) from exc
    for suffix in made[1:]:
        os.unlink(path + suffix)
    return aside


def _create_mark(path: str) -> None:
    """An empty file of this user's (it needs no room on the disk, only a directory entry)."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))


def _unreadable_text(unreadable: int, sure: bool) -> str:
    if sure:
        if not unreadable:
            return "no rows unreadable"
        return f"up to {unreadable} rows unreadable (estimated from the id range)"
    # The newest ids could not be read: rows may have followed the highest id noted.
    return f"at least {unreadable} rows unreadable (the newest ids cannot be read)"


@dataclasses.dataclass
class _Salvaged:
    """What one salvage run did, as the log says it."""

    copied: int = 0
    unreadable: int = 0
    sure: bool = True  # the highest id was read: `unreadable` is an upper bound, else a lower one
    stopped: OutboxError | None = None  # why it stopped before the end (it goes on later)
    gone: bool = False  # the damaged file is no longer there

    def __str__(self) -> str:
        if self.stopped is None:
            return f"{self.copied} rows salvaged, {_unreadable_text(self.unreadable, self.sure)}"
        return (
            f"{self.copied} rows salvaged so far; the salvage stopped ({self.stopped})"
            " and goes on when the outbox is next opened"
        )


def _salvage(aside: str, into: Database) -> _Salvaged:
    """Copy the readable rows of the damaged file `aside` into `into`, from where it stopped.

    Rows that cannot be read are skipped in growing steps; how many there
    were is estimated from the ids skipped (an upper bound: some of those ids
    may have been delivered and deleted long ago). Once every row is read,
    the mark beside the file goes.
    """
    if not os.path.lexists(aside):  # the operator removed it: nothing more can be had
        _unmark(aside, into)
        return _Salvaged(gone=True)
    progress = f"salvaged_up_to {os.path.basename(aside)}"
    try:
        start = into.read(lambda conn: schema.read_meta(conn, progress), "salvage rows")
    except OutboxError as exc:
        return _Salvaged(stopped=exc)
    source = _DamagedFile(aside)
    try:
        salvaged = _copy_rows(source, into, progress, start if isinstance(start, int) else 0)
    finally:
        source.close()
    if salvaged.stopped is None:
        _unmark(aside, into)
    return salvaged


class _DamagedFile:
    """A read-only connection to a damaged file moved aside, for its salvage only.

    Not a `Database`: the pragmas a Database sets on connecting read the
    schema, and SQLite refuses the schema of a truncated file (whose header
    still claims its old size, bytes 28-31) unless writable_schema is on
    first; then it believes the file's real size. Nothing can be written
    through a read-only connection, the schema included. Used by the
    salvaging thread alone, under the directory's lock, and closed after.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise translate(exc, self.path, "read the damaged outbox") from exc

    def scalar(self, sql: str) -> Any:
        rows = self.rows(sql)
        return rows[0][0] if rows else None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # With no WAL to read, SQLite needs nothing beside the file
            # (immutable): on a full disk it could not make the -shm.
            mode = "ro" if _has_commits_in_wal(self.path) else "ro&immutable=1"
            self._conn = sqlite3.connect(
                f"file:{urllib.parse.quote(self.path)}?mode={mode}",
                uri=True,
                timeout=1.0,
                isolation_level=None,
            )
            self._conn.execute("PRAGMA writable_schema=ON")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None


def _has_commits_in_wal(path: str) -> bool:
    try:
        return os.path.getsize(path + "-wal") > 0
    except OSError:
        return False


def _unmark(aside: str, into: Database) -> None:
    """The salvage of `aside` is over: its marks go, then the note of how far it got."""
    try:
        for mark in (*(_OLD_SCRATCH + suffix for suffix in _SIDE_FILES), _UNSALVAGED):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside + mark)
    except OSError as exc:  # the note stays: the next open copies nothing twice, and tries again
        log.warning("cannot remove the mark of a finished salvage (%s): %s", exc.strerror, aside)
        return
    progress = f"salvaged_up_to {os.path.basename(aside)}"
    with contextlib.suppress(OutboxError):  # (a note left behind does no harm)
        into.write(
            lambda conn: conn.execute("DELETE FROM outbox_meta WHERE key = ?", (progress,)),
            "salvage rows",
        )


def _copy_rows(source: _DamagedFile, into: Database, progress: str, start: int) -> _Salvaged:
    highest, sure = _highest_id(source)
    salvaged = _Salvaged(sure=sure)
    last, step, chunk = start, 1, _SALVAGE_CHUNK
    while True:
        try:
            rows = _rows_after(source, last, chunk)
        except OutboxDamaged:
            if chunk > 1:  # the damage is somewhere in this chunk: go row by row up to it
                chunk = 1
                continue
            if last >= highest:
                break
            # Step over the damaged page: one id at a time at first (a leaf page
            # holds a few dozen rows), then in doubling steps (a damaged interior
            # page can hide a long range).
            skip = min(step, highest - last)
            last, salvaged.unreadable = last + skip, salvaged.unreadable + skip
            step = 1 if salvaged.unreadable < _SINGLE_STEPS else step * 2
            continue
        except OutboxError as exc:  # not damage: an I/O error, no room for the -shm
            salvaged.stopped = exc
            break
        if not rows:
            break
        fresh, torn = _salvageable(rows)
        try:
            copy = functools.partial(_insert, fresh=fresh, up_to=rows[-1][0], progress=progress)
            into.write(copy, "salvage rows")
        except OutboxError as exc:  # no room left on the disk, most likely
            salvaged.stopped = exc
            break
        salvaged.copied, salvaged.unreadable = (
            salvaged.copied + len(fresh),
            salvaged.unreadable + torn,
        )
        last, step = rows[-1][0], 1
        chunk = min(chunk * 2, _SALVAGE_CHUNK)  # past the damage: back to large reads
    return salvaged


def _rows_after(source: _DamagedFile, last: int, limit: int) -> list[Any]:
    """Up to `limit` rows with ids above `last`, in order; OutboxDamaged if there are none.

    A damaged page can hand back rows whose ids go backwards (0, or below
    `last`): only the rows before that are taken, so that every read moves
    past `last` and the salvage ends.
    """
    rows = source.rows(
        "SELECT _id, data, timestamp, status, attempts, last_status, last_error"
        f" FROM {schema.TABLE} WHERE _id > ? ORDER BY _id LIMIT ?",
        (last, limit),
    )
    taken = 0
    for row_id, *_ in rows:
        if not isinstance(row_id, int) or row_id <= last:
            break
        last, taken = row_id, taken + 1
    if rows and not taken:
        raise OutboxDamaged("cannot read the damaged outbox: its ids go backwards", source.path)
    return rows[:taken]


def _highest_id(source: _DamagedFile) -> tuple[int, bool]:
    """The highest id the damaged file held, and whether that is sure.

    The table's own highest row when it can be read; otherwise the highest id
    noted in the metadata (by claims and at close) or by AUTOINCREMENT in an
    older file: newer rows may have followed it.
    """
    try:
        value = source.scalar(f"SELECT max(_id) FROM {schema.TABLE}")
        if isinstance(value, int):
            return value, True
    except OutboxError:
        pass
    noted = 0
    for sql in (
        "SELECT value FROM outbox_meta WHERE key = 'highest_id'",
        f"SELECT seq FROM sqlite_sequence WHERE name = '{schema.TABLE_NAME}'",
    ):
        try:
            value = source.scalar(sql)
        except OutboxError:
            continue
        if isinstance(value, int):
            noted = max(noted, value)
    return noted, False


def _salvageable(rows: list[Any]) -> tuple[list[tuple[Any, ...]], int]:
    """The rows to copy, as fresh rows, and how many hold no message that can be read.

    In flight in a dead file means pending now; dead rows stay dead, with why.
    A row can come back torn from a damaged page (the end of a truncated file
    reads as zeros): a payload that is not a message stays in the damaged
    file, counted unreadable. Tombstones stay too: the id they kept means
    nothing in a fresh file.
    """
    fresh, torn = [], 0
    for row_id, data, stamp, status, attempts, code, error in rows:
        if status == schema.ACKED:
            continue
        try:
            schema.decode_message(row_id, data)
        except ValueError:
            torn += 1
            continue
        state = schema.DEAD if status == schema.DEAD else schema.READY
        fresh.append((data, stamp, state, attempts or 0, code, error))
    return fresh, torn


def _insert(conn: Any, fresh: list[tuple[Any, ...]], up_to: int, progress: str) -> None:
    """Copy rows into the fresh outbox, noting the last id read in the same transaction."""
    conn.executemany(
        f"INSERT INTO {schema.TABLE} (data, timestamp, status, attempts, last_status, last_error)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        fresh,
    )
    schema.write_meta(conn, progress, up_to)
