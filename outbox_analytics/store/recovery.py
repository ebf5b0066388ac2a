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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import OutboxDamaged, OutboxError, OutboxUnavailable
from . import schema
from .connection import Database, Identity, file_handle, file_identity
from .files import create_private_file

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["has_sqlite_header", "recover", "salvage"]

log = logging.getLogger("outbox_analytics")

_SIDE_FILES = ("-wal", "-shm", "")  # the WAL first: a fresh file must never meet a stale one
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
    and we open that one.
    """
    directory = os.path.dirname(path)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutboxDamaged(
            f"the outbox is damaged and cannot be moved aside (directory not writable): {damage}",
            path,
        )
    with _directory_locked(directory, path):
        if _identity_at(path) != damaged:
            return reopen()  # another process recovered it while we waited
        Database(path, wait=1.0).keep_writers_out()
        aside = _move_aside(path)
        create_private_file(path)
        fresh = reopen()
        copied, unreadable, sure = salvage(aside, fresh)
    log.error(
        "outbox %s was damaged (%s); moved aside to %s; %d rows salvaged, %s",
        path, damage, aside, copied, _unreadable_text(unreadable, sure),
    )  # fmt: skip
    return fresh


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
        os.close(fd)  # a directory: no SQLite lock lives on it


def _move_aside(path: str) -> str:
    """Give the file (and its WAL and shared memory) a new, unused name; never overwrite."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for attempt in range(1000):
        aside = f"{path}.corrupt-{stamp}-{os.getpid()}" + (f"-{attempt}" if attempt else "")
        if not any(os.path.lexists(aside + suffix) for suffix in _SIDE_FILES):
            break
    linked: list[str] = []
    try:
        for suffix in _SIDE_FILES:
            if os.path.lexists(path + suffix):
                os.link(path + suffix, aside + suffix)  # fails rather than overwrite
                linked.append(suffix)
    except OSError as exc:
        for suffix in linked:
            with contextlib.suppress(OSError):
                os.unlink(aside + suffix)
        raise OutboxDamaged(
            f"the outbox is damaged and cannot be moved aside ({exc.strerror})", path
        ) from exc
    for suffix in linked:
        os.unlink(path + suffix)
    return aside


def _unreadable_text(unreadable: int, sure: bool) -> str:
    if sure:
        if not unreadable:
            return "no rows unreadable"
        return f"up to {unreadable} rows unreadable (estimated from the id range)"
    # The newest ids could not be read: rows may have followed the highest id noted.
    return f"at least {unreadable} rows unreadable (the newest ids cannot be read)"


def salvage(damaged: str, into: Database) -> tuple[int, int, bool]:
    """Copy the readable rows of a damaged outbox into `into`.

    Returns (copied, unreadable, sure): `sure` when the highest id could be
    read, making `unreadable` an upper bound; else it is a lower bound.

    In flight in a dead file means pending now; dead rows stay dead, with why.
    Rows that cannot be read are skipped in growing steps; how many there
    were is estimated from the ids skipped (an upper bound: some of those ids
    may have been delivered and deleted long ago).
    """
    copy = _readable_copy(damaged)
    try:
        source = Database(copy, wait=1.0)
    except OutboxError:
        return 0, 0, False
    try:
        return _copy_rows(source, into)
    finally:
        source.close()
        for suffix in _SIDE_FILES:
            with contextlib.suppress(OSError):
                os.unlink(copy + suffix)


def _copy_rows(source: Database, into: Database) -> tuple[int, int, bool]:
    highest, sure = _highest_id(source)
    copied = unreadable = 0
    last, step, chunk = 0, 1, _SALVAGE_CHUNK
    columns = "_id, data, timestamp, status, attempts, last_status, last_error"
    while True:
        try:
            rows = source.rows(
                f"SELECT {columns} FROM {schema.TABLE} WHERE _id > ? ORDER BY _id LIMIT ?",
                (last, chunk),
            )
        except OutboxError:
            if chunk > 1:  # the damage is somewhere in this chunk: go row by row up to it
                chunk = 1
                continue
            if last >= highest:
                break
            # Step over the damaged page: one id at a time at first (a leaf page
            # holds a few dozen rows), then in doubling steps (a damaged interior
            # page can hide a long range).
            skip = min(step, highest - last)
            last, unreadable = last + skip, unreadable + skip
            step = 1 if unreadable < _SINGLE_STEPS else step * 2
            continue
        if not rows:
            break
        copied += len(rows)
        into.write(functools.partial(_insert, rows=rows), "salvage rows")
        last, step = rows[-1][0], 1
        chunk = min(chunk * 2, _SALVAGE_CHUNK)  # past the damage: back to large reads
    return copied, unreadable, sure


def _highest_id(source: Database) -> tuple[int, bool]:
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


def _insert(conn: Any, rows: list[Any]) -> None:
    fresh = [
        (
            data,
            stamp,
            schema.DEAD if status == schema.DEAD else schema.READY,
            attempts or 0,
            code,
            error,
        )
        for _, data, stamp, status, attempts, code, error in rows
        if status != schema.ACKED  # a tombstone: the id it kept means nothing in a fresh file
    ]
    if not fresh:
        return
    conn.executemany(
        f"INSERT INTO {schema.TABLE} (data, timestamp, status, attempts, last_status, last_error)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        fresh,
    )


def _readable_copy(damaged: str) -> str:
    """A scratch copy of a damaged file that SQLite will open, for salvaging.

    A truncated file still claims its old size in its header (bytes 28-31),
    and SQLite then refuses even to read the schema: the copy claims the
    pages it really has. The damaged file itself is never written. (It was
    moved aside: no connection of ours uses it, so copying it cannot drop a
    lock SQLite relies on.)
    """
    copy = f"{damaged}.salvage"
    for suffix in _SIDE_FILES:  # what an interrupted salvage left
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy + suffix)
    for suffix in ("", "-wal"):  # a WAL may hold the latest commits
        if os.path.exists(damaged + suffix):
            shutil.copyfile(damaged + suffix, copy + suffix)
            os.chmod(copy + suffix, 0o600)
    if not os.path.exists(copy):
        create_private_file(copy)
    with open(copy, "r+b") as file:
        header = file.read(32)
        if len(header) == 32:
            page_size = int.from_bytes(header[16:18], "big")
            page_size = 65536 if page_size in (0, 1) else page_size  # 1 stands for 65536
            pages = os.path.getsize(copy) // page_size
            file.seek(28)
            file.write(pages.to_bytes(4, "big"))
    return copy
