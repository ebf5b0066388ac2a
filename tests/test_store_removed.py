"""A removed outbox file is noticed before a call that stored into it returns.

The file removed under a live job (an operator's rm, a tmp cleaner under
/tmp, a deploy script), with or without its -wal and -shm: every event whose
call succeeded after the removal is in the file the next run opens at the
path; a call that cannot make it so returns (False, msg). Real files, real
clients, a real second process killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from outbox_analytics import Client
from outbox_analytics.store import Outbox

from .conftest import start_python

SIDECARS = ("-wal", "-shm")


def remove(path: Path, with_sidecars: bool) -> None:
    os.remove(path)
    if with_sidecars:
        for suffix in SIDECARS:
            os.remove(str(path) + suffix)


def stored_ids(path: Path) -> set[str]:
    """The messageIds the next run finds at the path."""
    with Outbox(path, readonly=True) as outbox:
        return {row.message["messageId"] for row in outbox.rows("all")}


@pytest.fixture(params=[False, True], ids=["file only", "with -wal and -shm"])
def with_sidecars(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_events_tracked_after_a_removal_are_in_the_next_runs_file(
    tmp_path: Path, with_sidecars: bool
) -> None:
    path = tmp_path / "outbox.sqlite3"
    client = Client("key", outbox_path=str(path), upload=False)
    try:
        for n in range(5):
            assert client.track("u", "Before", {"n": n})[0]
        remove(path, with_sidecars)
        acknowledged = set()
        for n in range(200):
            ok, message = client.track("u", "After", {"n": n})
            assert ok, message
            acknowledged.add(message["messageId"])
        # The next run, while this one still lives, and once it has ended.
        assert acknowledged <= stored_ids(path)
    finally:
        client.shutdown()
    assert acknowledged <= stored_ids(path)
    assert client.outbox.unrecorded_drops == 0


def test_group_commit_threads_after_a_removal(tmp_path: Path, with_sidecars: bool) -> None:
    """fsync=True: a leader commits for several threads; its check covers all of them."""
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path, fsync=True)
    outbox.append(b"\x80")
    remove(path, with_sidecars)
    acknowledged: list[int] = []
    start = threading.Barrier(4)

    def append() -> None:
        start.wait()
        for _ in range(25):
            outbox.append(b"\x80")
            acknowledged.append(1)

    threads = [threading.Thread(target=append) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outbox.close()
    with Outbox(path, readonly=True) as fresh:
        assert fresh.stats().pending == len(acknowledged) == 100


def test_a_call_that_cannot_follow_the_file_fails(tmp_path: Path) -> None:
    """No file at the path can keep the event: the call says so, (False, msg), a counted drop."""
    path = tmp_path / "outbox.sqlite3"
    client = Client("key", outbox_path=str(path), upload=False)
    try:
        assert client.track("u", "Before")[0]
        os.remove(path)
        os.mkdir(path)  # (root may write anywhere: a directory is what no one can open)
        ok, message = client.track("u", "Refused")
        assert not ok, message
        assert client.outbox.unrecorded_drops == 1
        os.rmdir(path)
        ok, message = client.track("u", "After")  # a file can be made again: it is
        assert ok, message
        assert client.stats().dropped == 1  # the drop, counted in the new file
        assert {row.message["event"] for row in client.outbox.rows()} == {"After"}
    finally:
        client.shutdown()


def test_a_file_moved_and_linked_back_is_still_the_one_written(tmp_path: Path) -> None:
    """An operator moving the outbox to another disk, with a link at the old path."""
    path = tmp_path / "outbox.sqlite3"
    elsewhere = tmp_path / "bigger-disk.sqlite3"
    client = Client("key", outbox_path=str(path), upload=False)
    try:
        assert client.track("u", "Before")[0]
        os.rename(path, elsewhere)
        os.symlink(elsewhere, path)
        for _ in range(20):
            assert client.track("u", "After")[0]
    finally:
        client.shutdown()
    assert client.outbox.unrecorded_drops == 0
    with Outbox(elsewhere, readonly=True) as outbox:
        assert outbox.stats().pending == 21


WRITER = """
import signal, sys
from outbox_analytics import Client

removed = False
def note(*_):
    global removed
    removed = True
signal.signal(signal.SIGUSR1, note)
client = Client("key", outbox_path=sys.argv[1], upload=False)
print("ready", flush=True)
while True:
    seen = removed  # read before the call: an event acknowledged after the removal
    ok, message = client.track("u", "E")
    if ok and seen:
        print(message["messageId"], flush=True)
"""


def test_a_second_process_writing_while_the_file_is_removed(
    tmp_path: Path, with_sidecars: bool
) -> None:
    path = tmp_path / "outbox.sqlite3"
    writer = start_python(WRITER, str(path))
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        remove(path, with_sidecars)
        writer.send_signal(signal.SIGUSR1)
        acknowledged = {writer.stdout.readline().strip() for _ in range(300)}
        writer.send_signal(signal.SIGKILL)  # no shutdown: committed means kept
        writer.wait(timeout=10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert acknowledged <= stored_ids(path)
