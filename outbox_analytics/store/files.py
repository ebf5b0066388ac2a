"""The outbox's files on disk: created private, and refused when they are not ours.

An outbox holds the application's events, and what it holds is sent under
the application's write key: no other local user may read it or slip events
into it. So, as ssh does with its keys, a writer uses only what is its own:

- The file, and each of its `-wal`, `-shm` and `-journal` sidecars that
  exists, must be a regular file owned by this user (root included: a job run
  by root writes no other user's outbox) that no one else may write. One that
  others may read is used, with a warning: only its owner can have chosen
  that mode, maybe to let a monitoring user run `status`.
- No directory on the way to it may be writable by every user, unless it is
  sticky and owned by this user or root (/tmp): anyone could swap the file
  in one between our checks and SQLite's opening it. A directory writable by
  its group is trusted, as its owner decided (Kubernetes volumes are).
- The file is created with O_EXCL and opened with O_NOFOLLOW: a symbolic link
  planted at its name is refused, never followed. After SQLite opened it, the
  name must still be the file checked, and the sidecars SQLite opened ours.
  In a directory others may write, an empty -journal of ours holds the name
  that SQLite would otherwise read a planted one from (see _claim_journal).

Readers (the CLI's reading commands) change nothing and are not checked: an
operator (root) may inspect any job's outbox.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator

from ..errors import OutboxUnavailable

__all__ = [
    "check_directories",
    "check_file",
    "check_sidecars",
    "create_outbox_file",
    "create_private_file",
    "make_own_directory",
    "refusal",
]

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("outbox_analytics")

SIDECARS = ("-wal", "-shm", "-journal")
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_READABLE_BY_OTHERS = stat.S_IRGRP | stat.S_IROTH
_warned_readable: set[str] = set()  # paths warned about once in this process
_CREATE_ATTEMPTS = 5


def create_private_file(path: str) -> None:
    """Create the file (and its directory) readable by this user only; refuse one not ours.

    SQLite gives the -wal and -shm sidecars the mode of the database file, so
    they are private too. An existing file is never truncated or replaced.
    """
    try:
        _make_private_dirs(os.path.dirname(path))
    except OSError as exc:
        raise OutboxUnavailable(f"cannot create the outbox ({exc.strerror})", path) from exc
    check_directories(path)
    # O_EXCL never follows a link at the name: it fails as for any existing name.
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_CREATE_ATTEMPTS):
        try:
            os.close(os.open(path, flags, 0o600))  # new and empty: SQLite holds no lock on it
            return
        except FileExistsError:
            if os.path.isdir(path):
                raise OutboxUnavailable("the outbox path is a directory", path) from None
        except OSError as exc:
            raise OutboxUnavailable(f"cannot create the outbox ({exc.strerror})", path) from exc
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue  # moved aside meanwhile by a recovery: make it, or find the fresh one
        except OSError as exc:
            raise OutboxUnavailable(f"cannot open the outbox ({exc.strerror})", path) from exc
        _refuse_unless_ours(info, path, "the outbox file")  # before anything reads it
        _warn_if_readable(info, path)
        return
    raise OutboxUnavailable("the outbox file vanishes each time it is made", path)


def create_outbox_file(path: str) -> None:
    """`create_private_file` for a writer about to open the outbox: stale -wal and -shm go first.

    A file removed under a live job (an operator's rm, a tmp cleaner) may
    leave its -wal and -shm behind, still used by the job's processes.
    SQLite would take them for the new file's: it would read another file's
    log, or, finding the -shm unused by others, truncate it under processes
    that still map it (they die of SIGBUS). With no file at the path they
    belong to no file to be opened, and are unlinked (their users keep them
    open). Under an exclusive lock on the directory, which writers hold
    shared while they open the file (recovery.opening), so that no writer
    opens a new file between our removing them and creating it.
    """
    if os.path.lexists(path):
        create_private_file(path)  # (only checks it)
        return
    try:
        _make_private_dirs(os.path.dirname(path))
    except OSError as exc:
        raise OutboxUnavailable(f"cannot create the outbox ({exc.strerror})", path) from exc
    with _directory_locked(path):
        if not os.path.lexists(path):
            for suffix in SIDECARS:
                _remove_if_there(path, suffix)
        create_private_file(path)


def _remove_if_there(path: str, suffix: str) -> None:
    try:
        os.unlink(path + suffix)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutboxUnavailable(f"cannot create the outbox ({exc.strerror})", path) from exc


@contextlib.contextmanager
def _directory_locked(path: str) -> Iterator[None]:
    """An exclusive flock on the file's directory (the lock recovery.py takes)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OutboxUnavailable(
            f"cannot lock the outbox's directory ({exc.strerror})", path
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Unlocked first: gevent (25.8+) closes a directory's descriptor later,
        # from its hub, and our next open would wait for that lock for good.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)  # a directory: no SQLite lock lives on it


def _make_private_dirs(folder: str) -> None:
    """Create `folder` and its missing parents, each 0700 (os.makedirs gives parents 0777)."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            os.mkdir(each, 0o700)


def refusal(info: os.stat_result, uid: int, what: str = "the outbox file") -> str | None:
    """Why a writer running as `uid` must not use a file of this `lstat()`, or None.

    The whole decision, on a stat result: see the module docstring.
    """
    if stat.S_ISLNK(info.st_mode):
        return f"{what} is a symbolic link, put there after the path was resolved"
    if not stat.S_ISREG(info.st_mode):
        return f"{what} is not a regular file"
    if info.st_uid != uid:
        return (
            f"{what} is owned by uid {info.st_uid}, not by you (uid {uid}): run as its owner,"
            " or remove it or choose another outbox_path if it is not meant for you"
        )
    if info.st_mode & _WRITABLE_BY_OTHERS:
        mode = stat.S_IMODE(info.st_mode)
        return f"{what} is writable by other users (mode {mode:04o}): chmod 600 it"
    return None


def make_own_directory(folder: str) -> None:
    """Make `folder` (0700), or refuse it unless it is a directory of ours no one else may write.

    For a directory at a name anyone can take first (the fallback under
    /tmp): another user who made it could put links or files in it.
    """
    _make_private_dirs(folder)
    try:
        info = os.lstat(folder)
    except OSError as exc:
        raise OutboxUnavailable(f"cannot make the directory ({exc.strerror})", folder) from exc
    uid = os.geteuid()
    if not stat.S_ISDIR(info.st_mode):
        raise OutboxUnavailable("refusing it: not a directory (a link or a file)", folder)
    if info.st_uid != uid or info.st_mode & 0o022:
        mode = stat.S_IMODE(info.st_mode)
        raise OutboxUnavailable(
            f"refusing the directory: owned by uid {info.st_uid} with mode {mode:04o}, not one"
            f" only you (uid {uid}) may write: remove it, or set outbox_path",
            folder,
        )


def check_file(path: str, what: str = "the outbox file") -> os.stat_result:
    """The file's lstat(), once it passed `refusal()`; else OutboxUnavailable naming it."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise OutboxUnavailable(f"cannot open the outbox ({exc.strerror})", path) from exc
    _refuse_unless_ours(info, path, what)
    _warn_if_readable(info, path)
    return info


def _refuse_unless_ours(info: os.stat_result, path: str, what: str) -> None:
    why = refusal(info, os.geteuid(), what)
    if why is not None:
        raise OutboxUnavailable(f"refusing to write to it: {why}", path)


def _warn_if_readable(info: os.stat_result, path: str) -> None:
    """(Not for the sidecars: SQLite gives them the file's mode.)"""
    if info.st_mode & _READABLE_BY_OTHERS and path not in _warned_readable:
        _warned_readable.add(path)
        log.warning(
            "%s is readable by other users (mode %04o): they can read its events, and"
            " hold locks on it that stall its writes (up to 60 s a call) and its delivery"
            " (for as long as they like); chmod 600 it unless that is meant",
            path,
            stat.S_IMODE(info.st_mode),
        )


def check_sidecars(path: str, *, wal_mode: bool = False) -> None:
    """Refuse a sidecar (-wal, -shm, -journal) of the outbox that is not ours.

    With `wal_mode` (a connection of ours has the file open in WAL mode),
    the -wal and -shm must exist: SQLite made or opened them, and one that
    is gone since was a planted file removed after SQLite opened it.
    """
    for suffix in SIDECARS:
        name = path + suffix
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            if wal_mode and suffix != "-journal":
                raise OutboxUnavailable(
                    f"refusing to write to it: its {suffix} file went away while open", path
                ) from None
            continue
        except OSError as exc:
            raise OutboxUnavailable(f"cannot check the outbox ({exc.strerror})", name) from exc
        _refuse_unless_ours(info, name, f"the outbox's {suffix} file")
    if not os.path.lexists(path + "-journal") and _others_may_write(os.path.dirname(path)):
        _claim_journal(path)


def _others_may_write(folder: str) -> bool:
    try:
        return bool(os.stat(folder).st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    except OSError:
        return False


def _claim_journal(path: str) -> None:
    """Make an empty -journal of ours, in a directory others may write (/tmp).

    SQLite looks for a "hot" -journal whenever a first connection opens the
    file, even in WAL mode, and copies its pages into the database: one
    planted between our check and SQLite's look would forge the outbox's
    content. An empty one of ours is never hot and, once the file holds a
    page, never removed by SQLite (it only uses a -wal from then on); no one
    else may remove or replace it in a sticky directory.
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.close(os.open(path + "-journal", flags, 0o600))
    except FileExistsError:  # made meanwhile: by whom?
        check_sidecars(path)
    except OSError:
        pass  # a read-only mount (tmpfs roots are 1777): no one can plant one either


def check_directories(path: str) -> None:
    """Refuse a directory on the way to `path` in which anyone could swap the file."""
    folder = os.path.dirname(path)
    me = os.geteuid()
    while True:
        try:
            info = os.stat(folder)
        except OSError as exc:
            raise OutboxUnavailable(f"cannot check {folder} ({exc.strerror})", path) from exc
        why = _directory_refusal(info, me)
        if why is not None:
            raise OutboxUnavailable(f"refusing to write to it: the directory {folder} {why}", path)
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _directory_refusal(info: os.stat_result, uid: int) -> str | None:
    if not info.st_mode & stat.S_IWOTH:
        return None
    if not info.st_mode & stat.S_ISVTX:
        return (
            "is writable by every user and not sticky: chmod o-w it, or choose another outbox_path"
        )
    if info.st_uid not in (uid, 0):  # a sticky directory's owner may remove anyone's files
        return (
            f"is writable by every user and owned by uid {info.st_uid}: choose another outbox_path"
        )
    return None
