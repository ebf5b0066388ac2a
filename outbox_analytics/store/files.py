"""The outbox's files on disk: created private, and refused when they are not ours.

Every file and directory the store creates is this user's alone (0600 and
0700): the outbox holds the application's events.
"""

from __future__ import annotations

import contextlib
import os

from ..errors import OutboxUnavailable

__all__ = ["create_private_file"]


def create_private_file(path: str) -> None:
    """Create the file (and its directory) readable by this user only.

    SQLite gives the -wal and -shm sidecars the mode of the database file, so
    they are private too. An existing file is never truncated or replaced.
    """
    try:
        _make_private_dirs(os.path.dirname(path))
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        os.close(fd)  # a new, empty file: SQLite holds no lock on it yet
    except FileExistsError:
        if os.path.isdir(path):
            raise OutboxUnavailable("the outbox path is a directory", path) from None
    except OSError as exc:
        raise OutboxUnavailable(f"cannot create the outbox ({exc.strerror})", path) from exc


def _make_private_dirs(folder: str) -> None:
    """Create `folder` and its missing parents, each 0700 (os.makedirs gives parents 0777)."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            os.mkdir(each, 0o700)
