"""Salvaging a damaged outbox when the disk has no room for it (outbox_analytics/store/recovery.py).

- The damaged file is read where it lies: no copy of it is made, so none can
  be left behind, half written, eating the space that is short.
- A salvage that runs out of room stops cleanly (Client() works, errors stay
  OutboxError subclasses) and goes on at a later open, from where it stopped:
  once there is room, every readable event is in the outbox, once.
- A disk too full even for a fresh outbox: Client() raises OutboxUnavailable,
  and the next open, with room, salvages everything.
- A salvage copy left by an earlier version (its copy failed on a full disk)
  is removed, and the file it was for is salvaged.

Two real ways to run out of room: a small tmpfs (needs root to mount), and
RLIMIT_FSIZE in a child process (anywhere: a write past the limit fails with
EFBIG, SIGXFSZ ignored), which SQLite reports as an I/O error, not as full.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import outbox_analytics
from outbox_analytics import Client

from .test_store_damage import (
    CODE,
    _btree_pages,
    _outbox_with,
    _salvaged,
    _stored_messages,
    _tmpfs,
    _zero_pages,
)

ROWS = 2000


def _damaged_outbox(path: Path) -> bytes:
    """An outbox of ROWS events with a bad leaf page a quarter in; its bytes.

    Its metadata is damaged too, so that opening finds the damage (as Client()
    did in the report); the events after the bad page are three quarters.
    """
    _outbox_with(path, ROWS)
    pages = _btree_pages(path)
    leaves = pages["ack_queue_default"][1]
    _zero_pages(
        path, [leaves[len(leaves) // 4], *pages["outbox_meta"][0], *pages["outbox_meta"][1]]
    )
    return path.read_bytes()


def _salvaged_with_room(tmp_path: Path, damaged: bytes) -> list[int]:
    """What a recovery on a roomy disk salvages from the same bytes: the events expected."""
    roomy = tmp_path / "roomy"
    roomy.mkdir()
    (roomy / "outbox.sqlite3").write_bytes(damaged)
    Client("k", outbox_path=str(roomy / "outbox.sqlite3"), upload=False).shutdown()
    expected = _salvaged(roomy / "outbox.sqlite3")
    assert ROWS // 2 < len(expected) < ROWS  # the bad page lost some, the rest was read
    return expected


def _leftovers(directory: Path) -> list[str]:
    """Scratch files: an old salvage copy, or a marker of a salvage not yet finished."""
    return sorted(
        p.name for p in directory.iterdir() if ".salvage" in p.name or ".unsalvaged" in p.name
    )


def _open_and_kill(path: Path) -> None:
    """A process that had the outbox open is killed: its -wal and -shm stay behind."""
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sqlite3, sys\n"
            "conn = sqlite3.connect(sys.argv[1])\n"
            "conn.execute('SELECT count(*) FROM sqlite_master').fetchall()\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
            str(path),
        ],
        capture_output=True,
        timeout=30,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert os.path.exists(f"{path}-shm") and os.path.exists(f"{path}-wal")


# A Client() in a process that may not write past `limit` bytes in any file.
LIMITED = """
import json, logging, resource, signal, sys
logging.basicConfig()  # the library's log lines, on stderr
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
import outbox_analytics
try:
    client = outbox_analytics.Client("k", outbox_path=sys.argv[1], upload=False)
except outbox_analytics.OutboxError as exc:
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc)}))
except Exception as exc:
    print(json.dumps({"raised": "raw " + type(exc).__name__, "message": str(exc)}))
else:
    client.shutdown(timeout=1)
    print(json.dumps({"raised": None, "pending": client.stats().pending}))
"""


def _client_with_file_size_limit(path: Path, limit: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LIMITED), str(path), str(limit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(CODE)),
    )
    assert done.returncode == 0, done.stderr
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    result["log"] = done.stderr
    return result


def test_a_salvage_cut_short_by_a_file_size_limit_goes_on_at_the_next_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    damaged = _damaged_outbox(path)
    expected = _salvaged_with_room(tmp_path, damaged)

    # Room for a fresh outbox and some rows, not for a copy of the damaged file.
    limited = _client_with_file_size_limit(path, len(damaged) // 3)
    assert limited["raised"] is None, limited  # the job starts: the salvage waits
    assert 0 < limited["pending"] < len(expected)  # some rows salvaged, not all
    assert "salvage stopped" in limited["log"]
    assert [name.endswith(".unsalvaged") for name in _leftovers(tmp_path)] == [True]
    stored_meanwhile = len(_salvaged(path))

    caplog.set_level("WARNING", logger="outbox_analytics")
    client = Client("k", outbox_path=str(path), upload=False)  # no limit: room enough
    client.shutdown()
    assert _salvaged(path) == expected  # every readable event, each once, in order
    assert stored_meanwhile == limited["pending"]
    assert _leftovers(tmp_path) == []
    assert any("resumed" in r.getMessage() for r in caplog.records)
    again = Client("k", outbox_path=str(path), upload=False)  # done: nothing is copied again
    again.shutdown()
    assert _salvaged(path) == expected


def test_a_disk_too_full_for_a_fresh_outbox_raises_an_outbox_error_and_loses_nothing(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source.sqlite3"
    damaged = _damaged_outbox(source)
    expected = _salvaged_with_room(tmp_path, damaged)
    with _tmpfs(tmp_path / "small", f"{len(damaged) * 3 // 1024}k") as disk:
        path = disk / "outbox.sqlite3"
        path.write_bytes(damaged)
        _open_and_kill(path)  # a killed job's -wal and -shm: opening needs no room then
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as fill, contextlib.suppress(OSError):
            while True:
                fill.write(bytes(4096))

        with pytest.raises(outbox_analytics.OutboxError) as raised:
            Client("k", outbox_path=str(path), upload=False)
        assert isinstance(raised.value, outbox_analytics.OutboxUnavailable), repr(raised.value)
        assert raised.value.path == str(path)
        assert [name.endswith(".unsalvaged") for name in _leftovers(disk)] == [True]

        filler.unlink()
        client = Client("k", outbox_path=str(path), upload=False)
        client.shutdown()
        assert _salvaged(path) == expected
        assert _leftovers(disk) == []


def test_a_salvage_on_a_full_disk_goes_on_once_there_is_room(tmp_path: Path) -> None:
    source = tmp_path / "source.sqlite3"
    damaged = _damaged_outbox(source)
    expected = _salvaged_with_room(tmp_path, damaged)
    # The damaged file fits, with less room left than its own size.
    with _tmpfs(tmp_path / "small", f"{len(damaged) * 3 // 2 // 1024}k") as disk:
        path = disk / "outbox.sqlite3"
        path.write_bytes(damaged)
        assert shutil.disk_usage(disk).free < len(damaged)

        client = Client("k", outbox_path=str(path), upload=False)  # no OSError escapes
        partial = client.stats().pending
        assert 0 < partial < len(expected)
        ok, _ = client.track("u", "On a full disk")
        client.shutdown(timeout=1)
        assert [name.endswith(".unsalvaged") for name in _leftovers(disk)] == [True]
        assert not [p for p in disk.iterdir() if p.name.endswith(".salvage")]

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        client = Client("k", outbox_path=str(path), upload=False)
        assert client.track("u", "With room")[0]
        client.shutdown()
        assert _salvaged(path) == expected
        assert _leftovers(disk) == []
        events = [m["event"] for m in _stored_messages(path)]
        assert events.count("With room") == 1 and events.count("On a full disk") == int(ok)


def test_a_salvage_copy_left_by_an_earlier_version_is_removed_and_its_file_salvaged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite3"
    damaged = _damaged_outbox(path)
    expected = _salvaged_with_room(tmp_path, damaged)
    # What 0.2's salvage left when its copy failed on a full disk: the damaged
    # file aside, a partial copy of it, an empty outbox at the path.
    aside = tmp_path / "outbox.sqlite3.corrupt-20261201T000000-4242"
    path.rename(aside)
    (tmp_path / f"{aside.name}.salvage").write_bytes(damaged[: len(damaged) // 3])
    path.touch()

    client = Client("k", outbox_path=str(path), upload=False)
    client.shutdown()
    assert _salvaged(path) == expected
    assert _leftovers(tmp_path) == []
    assert aside.read_bytes() == damaged  # never written


def test_a_damaged_file_removed_before_its_salvage_finished_is_given_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    damaged = _damaged_outbox(path)
    limited = _client_with_file_size_limit(path, len(damaged) // 3)
    assert limited["raised"] is None, limited
    (marker,) = _leftovers(tmp_path)
    for aside in tmp_path.glob(marker.removesuffix(".unsalvaged") + "*"):
        if aside.name != marker:
            aside.unlink()  # the operator deleted the damaged file

    caplog.set_level("ERROR", logger="outbox_analytics")
    client = Client("k", outbox_path=str(path), upload=False)
    assert client.track("u", "After")[0]
    client.shutdown()
    assert _leftovers(tmp_path) == []
    assert len(_salvaged(path)) == limited["pending"]  # what was salvaged stays
    assert any("is gone" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("planted", ["symlink", "other-user"])
def test_a_damaged_file_planted_by_someone_else_is_not_salvaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, planted: str
) -> None:
    """Its rows would be sent under this outbox's write key: they never enter the outbox."""
    path = tmp_path / "outbox.sqlite3"
    Client("k", outbox_path=str(path), upload=False).shutdown()
    elsewhere = tmp_path / "elsewhere.sqlite3"
    _outbox_with(elsewhere, 5)
    aside = tmp_path / "outbox.sqlite3.corrupt-20261201T000000-4242"
    mark = tmp_path / f"{aside.name}.unsalvaged"
    if planted == "symlink":
        aside.symlink_to(elsewhere)
        mark.touch()
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give files to another user")
        shutil.copyfile(elsewhere, aside)
        mark.touch()
        for name in (aside, mark):
            os.chown(name, 65534, 65534)

    caplog.set_level("ERROR", logger="outbox_analytics")
    client = Client("k", outbox_path=str(path), upload=False)
    assert client.stats().pending == 0
    client.shutdown()
    assert _salvaged(path) == []
    assert mark.exists()  # left for its owner (or the operator) to deal with
    assert any("not salvaging" in r.getMessage() for r in caplog.records)


# A Client() whose process is killed (SIGKILL) after the salvage committed two
# transactions of rows: the third is under way.
KILLED = """
import os, signal, sys
from outbox_analytics.store import recovery

copies = []
real_insert = recovery._insert

def insert(conn, **kwargs):
    copies.append(1)
    if len(copies) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_insert(conn, **kwargs)

recovery._insert = insert
import outbox_analytics
outbox_analytics.Client("k", outbox_path=sys.argv[1], upload=False)
"""


def test_a_salvage_killed_midway_goes_on_without_copying_a_row_twice(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    damaged = _damaged_outbox(path)
    expected = _salvaged_with_room(tmp_path, damaged)
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED), str(path)],
        capture_output=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(CODE)),
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert 0 < len(_salvaged(path)) < len(expected)  # what the two transactions copied
    assert [name.endswith(".unsalvaged") for name in _leftovers(tmp_path)] == [True]

    Client("k", outbox_path=str(path), upload=False).shutdown()
    assert _salvaged(path) == expected
    assert _leftovers(tmp_path) == []


# Both jobs below: events refused while the file may not grow, then room again.
_REFUSED_THEN_ROOM = """
import json, resource, signal, sys
from outbox_analytics import Client

def refused_then_room(client, count):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    client.track("u", "First")
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
    refused = 0
    while refused < count:
        refused += not client.track("u", "Padded", {"pad": "x" * 200})[0]
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return refused
"""

_DROPS_THEN_ROOM = (
    _REFUSED_THEN_ROOM
    + """
client = Client("k", outbox_path=sys.argv[1], upload=False)
refused_then_room(client, 20)
print(json.dumps(client.stats().dropped))
if sys.argv[2] == "shutdown":
    client.shutdown()
"""
)


@pytest.mark.parametrize("ending", ["shutdown", "exit"])
def test_events_refused_on_a_full_disk_are_counted_in_the_file_at_the_end(
    tmp_path: Path, ending: str
) -> None:
    """The count waited for the next commit in the same process: with room back,
    neither shutdown() nor the exit wrote it, and every other process read 0."""
    path = tmp_path / "o.db"
    assert _drops_after(_DROPS_THEN_ROOM, path, ending) == (20, 20)


_DROPS_IN_A_POOL_WORKER = (
    _REFUSED_THEN_ROOM
    + """
import multiprocessing
path = sys.argv[1]

def work(_):
    client = Client("k", outbox_path=path, upload=False)  # made in the worker
    return refused_then_room(client, 5)

if __name__ == "__main__":
    pool = multiprocessing.get_context("fork").Pool(1)
    print(pool.map(work, [0])[0])
    pool.close()
    pool.join()
"""
)


def test_drops_in_a_fork_pool_worker_are_counted_at_its_exit(tmp_path: Path) -> None:
    """A worker leaves through os._exit(): only multiprocessing's finalizers run,
    and none was set for a client without an uploader (nor kept for one with)."""
    assert _drops_after(_DROPS_IN_A_POOL_WORKER, tmp_path / "o.db") == (5, 5)


def _drops_after(code: str, path: Path, *args: str) -> tuple[int, int]:
    """Run `code` in a child: the drops it saw, and those the file counts after it ended."""
    child = subprocess.run(
        [sys.executable, "-c", code, str(path), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    reader = Client("k", outbox_path=str(path), upload=False)
    stats = reader.stats()
    reader.shutdown()
    assert stats is not None
    return json.loads(child.stdout), stats.dropped
