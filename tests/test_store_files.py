"""Outbox files are ours or refused (outbox_analytics/store/files.py), like ssh with its keys.

A file another local user made first at the outbox's path (in /tmp, a shared
state directory), one others may write, a -wal, -shm or -journal planted
beside it, a symbolic link planted at its name, a directory anyone may write:
a writer refuses them with OutboxUnavailable naming the path and the fix, and
changes nothing. Readers (the CLI's status, list, export) still read them.

Real files with real modes; "owned by another user" is made with chown when
the tests run as root (as CI does), and is otherwise checked on the decision
function with a stat result.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from outbox_analytics import Client, OutboxUnavailable
from outbox_analytics.store import Outbox
from outbox_analytics.store.connection import Database
from outbox_analytics.store.files import check_directories, create_private_file, refusal

from .conftest import outbox_with

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
as_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="only root can give a file to another user; test_the_decision covers the rule",
)


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file in the folder: owner, mode and content (to see that nothing changed)."""
    found = {}
    for each in sorted(folder.iterdir()):
        info = os.lstat(each)
        content = each.read_bytes() if stat.S_ISREG(info.st_mode) else os.readlink(each).encode()
        found[each.name] = (info.st_uid, stat.S_IMODE(info.st_mode), content)
    return found


def refused(path: Path) -> str:
    """The message of the OutboxUnavailable that opening `path` for writing raises."""
    with pytest.raises(OutboxUnavailable) as caught:
        Outbox(path)
    return str(caught.value)


def status(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox_analytics", "status", str(path), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )


# -- the decision -------------------------------------------------------------------


def a_stat(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


def test_the_decision() -> None:
    me = 1000
    assert refusal(a_stat(stat.S_IFREG | 0o600, me), me) is None
    assert refusal(a_stat(stat.S_IFREG | 0o644, me), me) is None  # readable: a warning only
    other = refusal(a_stat(stat.S_IFREG | 0o600, 1001), me)
    assert other is not None and "owned by uid 1001, not by you (uid 1000)" in other
    assert "run as its owner, or remove it or choose another outbox_path" in other
    # Root too uses only its own files for writing.
    assert refusal(a_stat(stat.S_IFREG | 0o600, 1001), 0) is not None
    for mode in (0o666, 0o620, 0o602):
        why = refusal(a_stat(stat.S_IFREG | mode, me), me)
        assert why is not None and f"mode {mode:04o}" in why and "chmod 600" in why
    link = refusal(a_stat(stat.S_IFLNK | 0o777, me), me)
    assert link is not None and "symbolic link" in link
    fifo = refusal(a_stat(stat.S_IFIFO | 0o600, me), me)
    assert fifo is not None and "not a regular file" in fifo


# -- the file -----------------------------------------------------------------------


@as_root
def test_a_file_another_user_made_first_is_refused_and_left_alone(tmp_path: Path) -> None:
    """The reported attack: an empty 0666 file made first by another user was adopted."""
    path = tmp_path / "outbox.sqlite3"
    path.touch(mode=0o666)
    os.chmod(path, 0o666)
    os.chown(path, NOBODY, NOBODY)
    before = snapshot(tmp_path)
    message = refused(path)
    assert f"owned by uid {NOBODY}, not by you (uid 0)" in message and str(path) in message
    with pytest.raises(OutboxUnavailable, match="owned by uid"):
        Client("key", outbox_path=str(path), upload=False)
    assert snapshot(tmp_path) == before  # nothing written, no -wal or -shm made


@as_root
def test_a_reader_may_read_another_users_outbox(tmp_path: Path) -> None:
    """An operator (root) inspecting a job's outbox: status, list, export read it."""
    path = tmp_path / "outbox.sqlite3"
    outbox_with(path, 3)
    os.chown(path, NOBODY, NOBODY)
    result = status(path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pending"] == 3
    with Outbox(path, readonly=True) as outbox:
        assert len(list(outbox.rows())) == 3
    assert "owned by uid" in refused(path)  # writing it stays refused


@pytest.mark.parametrize("mode", [0o666, 0o660, 0o606], ids=oct)
def test_a_file_others_may_write_is_refused_naming_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox_with(path, 2)
    os.chmod(path, mode)
    before = snapshot(tmp_path)
    message = refused(path)
    assert f"writable by other users (mode {mode:04o}): chmod 600 it" in message
    assert str(path) in message
    assert snapshot(tmp_path) == before
    os.chmod(path, 0o600)  # the fix it names
    with Outbox(path) as outbox:
        assert outbox.stats().pending == 2


def test_a_file_others_may_read_is_used_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only its owner can have made it 0644 (to let a monitoring user run status): kept."""
    path = tmp_path / "outbox.sqlite3"
    outbox_with(path, 1)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="outbox_analytics"):
        for _ in range(2):
            with Outbox(path) as outbox:
                outbox.append(b"\x80")
    warnings = [r.getMessage() for r in caplog.records]
    warnings = [text for text in warnings if "readable by other users" in text]
    assert len(warnings) == 1 and str(path) in warnings[0] and "0644" in warnings[0]


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_sidecar_others_may_write_is_refused(tmp_path: Path, suffix: str) -> None:
    """A -wal, -shm or -journal planted beside the outbox would get its events, or forge them."""
    path = tmp_path / "outbox.sqlite3"
    outbox_with(path, 1)  # closed: SQLite removed its -wal and -shm
    planted = Path(str(path) + suffix)
    planted.touch()
    os.chmod(planted, 0o666)
    if os.geteuid() == 0:
        os.chown(planted, NOBODY, NOBODY)
    before = snapshot(tmp_path)
    message = refused(path)
    assert f"the outbox's {suffix} file is" in message and str(planted) in message
    assert snapshot(tmp_path) == before


@as_root
def test_a_sidecar_of_another_user_is_refused_even_if_private(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox_with(path, 1)
    planted = Path(str(path) + "-wal")
    planted.touch(mode=0o600)
    os.chown(planted, NOBODY, NOBODY)
    assert f"-wal file is owned by uid {NOBODY}" in refused(path)


# -- links and swaps ---------------------------------------------------------------------


def test_a_link_planted_at_the_name_is_refused_not_followed(tmp_path: Path) -> None:
    """Planted after the path was resolved (here: right after the file was removed)."""
    path = tmp_path / "outbox.sqlite3"
    target = tmp_path / "elsewhere.sqlite3"
    outbox_with(target, 1)
    before = target.read_bytes()
    outbox = Outbox(path)
    outbox.append(b"\x80")
    for suffix in ("", "-wal", "-shm"):
        os.remove(str(path) + suffix)
    os.symlink(target, path)
    with pytest.raises(OutboxUnavailable, match="is a symbolic link") as caught:
        outbox.append(b"\x80")
    assert str(path) in str(caught.value)
    assert target.read_bytes() == before and not Path(str(target) + "-wal").exists()
    with pytest.raises(OutboxUnavailable, match="is a symbolic link"):
        create_private_file(str(path))
    with pytest.raises(OutboxUnavailable, match="is a symbolic link"):
        Database(str(path))


def test_a_file_swapped_in_before_sqlite_opens_it_is_refused(tmp_path: Path) -> None:
    """SQLite opens by name: what it opened must be the file that was checked."""
    path = tmp_path / "outbox.sqlite3"
    outbox_with(path, 1)
    other = tmp_path / "other.sqlite3"
    outbox_with(other, 5)
    db = Database(str(path))  # checked here; SQLite opens the file at the first call
    os.replace(other, path)
    with pytest.raises(OutboxUnavailable, match="replaced while it was opened"):
        db.scalar("SELECT count(*) FROM ack_queue_default")


# -- directories ------------------------------------------------------------------------


def test_a_directory_everyone_may_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    path = shared / "outbox.sqlite3"
    message = refused(path)
    assert f"the directory {shared} is writable by every user and not sticky" in message
    assert "chmod o-w it" in message and str(path) in message
    assert list(shared.iterdir()) == []  # nothing made there
    os.chmod(shared, 0o1777)  # sticky, like /tmp: no one may remove or rename our files
    with Outbox(path) as outbox:
        outbox.append(b"\x80")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_ancestor_everyone_may_write_is_refused(tmp_path: Path) -> None:
    """Anyone could rename the directories below it and put others in their place."""
    os.chmod(tmp_path, 0o777)
    try:
        with pytest.raises(OutboxUnavailable, match="writable by every user and not sticky"):
            Outbox(tmp_path / "private" / "outbox.sqlite3")
    finally:
        os.chmod(tmp_path, 0o700)


@as_root
def test_a_sticky_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """The owner of a sticky directory may still remove or rename anyone's files in it."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    os.chmod(shared, 0o1777)
    os.chown(shared, NOBODY, NOBODY)
    with pytest.raises(OutboxUnavailable, match=f"owned by uid {NOBODY}"):
        check_directories(str(shared / "outbox.sqlite3"))


def test_a_directory_its_group_may_write_is_trusted(tmp_path: Path) -> None:
    """As its owner decided (a Kubernetes volume with fsGroup is 2775)."""
    shared = tmp_path / "team"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    with Outbox(shared / "outbox.sqlite3") as outbox:
        outbox.append(b"\x80")
        assert outbox.stats().pending == 1


def test_in_a_directory_others_may_write_the_journal_name_is_held(tmp_path: Path) -> None:
    """SQLite copies a "hot" -journal into the file when a first connection opens it, even
    in WAL mode: in /tmp, an empty one of ours keeps another user from planting one."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    path = shared / "outbox.sqlite3"
    for _ in range(2):  # a new file (SQLite removes the name once), then an existing one
        with Outbox(path) as outbox:
            outbox.append(b"\x80")
    journal = os.lstat(str(path) + "-journal")
    assert (journal.st_uid, stat.S_IMODE(journal.st_mode), journal.st_size) == (
        os.geteuid(),
        0o600,
        0,
    )
    with Outbox(path, readonly=True) as outbox:
        assert outbox.stats().pending == 2
    private = tmp_path / "private.sqlite3"  # (elsewhere, nothing is added)
    with Outbox(private) as outbox:
        outbox.append(b"\x80")
    assert not Path(str(private) + "-journal").exists()
