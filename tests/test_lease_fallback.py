"""The upload lease's lock file (macOS, BSD; forced here on Linux): it dies with its holder.

The lock on `<path>.lock` must never outlive the process that took it, even
through a child: an flock (the old lock) belongs to the open file, which a
forked child shares, so a child kept a dead parent's lease and nobody
uploaded again. Here, with `OUTBOX_ANALYTICS_LEASE_LOCK=file`:

- one process holds the lease, a second cannot take it; once the first is
  SIGKILLed the second can, and reclaims the rows left in flight;
- a child forked from the holder (by Python's fork, or by a C-level fork that
  runs no fork hook) that stays alive and never uses the library again: once
  the holder is SIGKILLed, a third process takes the lease;
- the child never sees the parent's lease as its own, cannot take it while
  the parent holds it (its forgetting the parent's state leaves the parent's
  lock alone), and takes it once the parent gives it back;
- lease_is_free() for free, held here, held elsewhere, by asking (F_GETLK)
  and by taking a shared lock; two outboxes of one process on one file take
  and give back the lease without dropping each other's lock.

Real outbox files in tmp_path, real processes, real SIGKILL. Every wait is
bounded; every helper runs in its own session and is killed after the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import outbox_analytics
from outbox_analytics.store import Outbox, encode_message

from .test_store_identity import wait_until

# The switch, spelled out: these tests also run against code that predates the constant.
LEASE_LOCK_ENV = "OUTBOX_ANALYTICS_LEASE_LOCK"
# The package under test, whichever tree pytest imported it from.
PACKAGE_ROOT = Path(outbox_analytics.__file__).resolve().parents[1]
WAIT = 10.0  # the longest any single wait may take

fcntl = pytest.importorskip("fcntl", reason="POSIX processes and locks")


@pytest.fixture(autouse=True)
def lock_file_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process and every helper it starts use the lock file."""
    monkeypatch.setenv(LEASE_LOCK_ENV, "file")


class Helper:
    """A fresh interpreter running a script: lines in, lines out, every read bounded."""

    def __init__(self, code: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its children too are killed at the end
        )

    def line(self, timeout: float = WAIT) -> str:
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        text = out.readline() if ready else ""
        if not text:
            raise AssertionError(f"no line from the helper within {timeout}s: {self.stop()}")
        return text.strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def sigkill(self) -> None:
        """SIGKILL the helper alone (not its children), and reap it."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT)

    def stop(self) -> str:
        """Kill the helper and everything it started (its session); what it wrote to stderr."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            _, err = self.proc.communicate(timeout=WAIT)
        except (ValueError, OSError):  # stopped before: its streams are closed
            self.proc.wait(timeout=WAIT)
            return ""
        return err or ""


@pytest.fixture
def helpers() -> Iterator[Callable[..., Helper]]:
    started: list[Helper] = []

    def start(code: str, *args: str) -> Helper:
        helper = Helper(code, *args)
        started.append(helper)
        return helper

    yield start
    for helper in started:
        helper.stop()


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: its lock, if any, is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def outbox_with(path: Path, count: int) -> Outbox:
    outbox = Outbox(path)
    for n in range(count):
        outbox.append(encode_message({"type": "track", "event": "Stored", "n": n}))
    return outbox


# -- one holder at a time -----------------------------------------------------------

HOLDER = """
import os, sys
from outbox_analytics.store import Outbox

outbox = Outbox(sys.argv[1])
lease = outbox.try_lease()
assert lease is not None, "the helper could not take the lease"
rows = lease.claim(int(sys.argv[2]))
print("held", os.getpid(), " ".join(str(row.id) for row in rows), flush=True)
sys.stdin.readline()  # until the test says, or kills it
lease.close()
print("released", flush=True)
sys.stdin.readline()
"""


def test_a_killed_holders_lease_passes_to_the_next_process_which_reclaims_its_rows(
    tmp_path: Path, helpers: Callable[..., Helper]
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = outbox_with(path, 5)
    holder = helpers(HOLDER, str(path), "3")
    assert holder.line().split()[2:] == ["1", "2", "3"]

    lock_file = Path(str(path) + ".lock")
    assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
    assert outbox.try_lease() is None  # the holder lives
    assert not outbox.lease_is_free()
    assert not outbox.lease_held_here()
    stats = outbox.stats()
    assert (stats.pending, stats.inflight, stats.uploader_alive) == (2, 3, True)

    holder.sigkill()
    assert outbox.lease_is_free()
    assert outbox.stats().uploader_alive is False
    lease = outbox.try_lease()
    assert lease is not None
    try:
        assert outbox.lease_held_here()
        assert outbox.stats().inflight == 0  # the dead holder's rows were reclaimed
        assert [row.id for row in lease.claim(10)] == [1, 2, 3, 4, 5]  # in their order
    finally:
        lease.close()
    assert outbox.lease_is_free()
    outbox.close()


# -- a child of the holder -------------------------------------------------------------

FORKING_HOLDER = """
import ctypes, os, sys, time
from outbox_analytics.store import Outbox

path, how = sys.argv[1:3]
outbox = Outbox(path)
lease = outbox.try_lease()
assert lease is not None, "the helper could not take the lease"
lease.claim(2)
outbox.close()  # (the lease stays held: it is not the connection's)
pid = ctypes.CDLL(None).fork() if how == "C fork" else os.fork()
if pid == 0:
    # The child lives on and never uses the library again (a C-level fork
    # runs none of Python's fork hooks, so nothing was reset here).
    time.sleep(30)
    os._exit(0)
print("forked", pid, flush=True)
time.sleep(30)
"""

FORKS = ["os.fork", "C fork"]


@pytest.mark.parametrize("how", FORKS)
def test_a_child_that_outlives_the_holder_keeps_no_lease(
    tmp_path: Path, helpers: Callable[..., Helper], how: str
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = outbox_with(path, 4)
    holder = helpers(FORKING_HOLDER, str(path), how)
    child = int(holder.line().split()[1])
    try:
        assert outbox.try_lease() is None
        assert not outbox.lease_is_free()

        holder.sigkill()
        assert alive(child), "the forked child should still run"
        # (The old flock was still held here by the child, for as long as it ran.)
        assert wait_until(outbox.lease_is_free, 3.0), "the dead holder's child keeps its lease"
        lease = outbox.try_lease()
        assert lease is not None, "a third process cannot take the lease"
        assert alive(child)
        assert [row.id for row in lease.claim(10)] == [1, 2, 3, 4]  # the 2 in flight reclaimed
        lease.close()
    finally:
        kill_pid(child)
    outbox.close()


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 5.0)


PARENT_AND_CHILD = """
import ctypes, json, os, select, sys, time
from outbox_analytics.store import Outbox

path, how = sys.argv[1:3]
outbox = Outbox(path)
lease = outbox.try_lease()
assert lease is not None, "the helper could not take the lease"
if how == "C fork":
    outbox.close()  # no SQLite connection open across a fork that runs no hook
to_child, from_parent = os.pipe()
to_parent, from_child = os.pipe()

def wait_line(fd):
    ready, _, _ = select.select([fd], [], [], 10)
    if not ready:
        raise TimeoutError("no word within 10 s")
    return os.read(fd, 4096).decode()

from outbox_analytics.store import lease as lease_module

inherited = [entry.fd for entry in getattr(lease_module, "_lock_files", {}).values()]
pid = ctypes.CDLL(None).fork() if how == "C fork" else os.fork()
if pid == 0:
    code = 1
    try:
        held_here = outbox.lease_held_here()  # the first call: the parent's state is forgotten

        def is_closed(fd):
            try:
                os.fstat(fd)
            except OSError:
                return True
            return False

        report = {
            "inherited_closed": bool(inherited) and all(is_closed(fd) for fd in inherited),
            "held_here": held_here,
            "taken": outbox.try_lease() is not None,
            "free": outbox.lease_is_free(),
        }
        os.write(from_child, b"asked\\n")
        wait_line(to_child)  # the parent gave the lease back
        mine = outbox.try_lease()
        report["taken_later"] = mine is not None
        report["held_here_later"] = outbox.lease_held_here()
        report["claimed"] = [row.id for row in mine.claim(10)] if mine else []
        os.write(from_child, (json.dumps(report) + "\\n").encode())
        wait_line(to_child)  # the test looked: give it back and leave
        if mine is not None:
            mine.close()
        code = 0
    finally:
        os._exit(code)
print("child asked:", wait_line(to_parent).strip(), flush=True)
sys.stdin.readline()  # the test checked the lease is still ours
lease.close()
os.write(from_parent, b"released\\n")
print("child", wait_line(to_parent).strip(), flush=True)
sys.stdin.readline()
os.write(from_parent, b"leave\\n")
deadline = time.monotonic() + 10
while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
    time.sleep(0.01)
print("done", flush=True)
"""


@pytest.mark.parametrize("how", FORKS)
def test_a_child_never_holds_its_parents_lease_and_takes_it_once_given_back(
    tmp_path: Path, helpers: Callable[..., Helper], how: str
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = outbox_with(path, 3)
    helper = helpers(PARENT_AND_CHILD, str(path), how)
    assert helper.line() == "child asked: asked"
    # The child forgot the parent's state and closed what it inherited: the
    # parent's lock is untouched.
    assert outbox.try_lease() is None
    assert not outbox.lease_is_free()
    helper.send("checked")

    line = helper.line()
    assert line.startswith("child "), line
    report = json.loads(line[len("child ") :])
    assert report == {
        "inherited_closed": True,  # (holding no lock on it, the child closed it: no leak)
        "held_here": False,  # the parent's lease is not the child's
        "taken": False,  # nor can it take it while the parent holds it
        "free": False,
        "taken_later": True,  # once the parent gave it back, the child takes it
        "held_here_later": True,
        "claimed": [1, 2, 3],
    }
    assert outbox.try_lease() is None  # the child holds it now
    assert not outbox.lease_is_free()
    helper.send("leave")
    assert helper.line() == "done"
    assert wait_until(outbox.lease_is_free, 3.0)
    outbox.close()


# -- asking without taking; several outboxes of one process ---------------------------------


@pytest.mark.parametrize("asking", ["F_GETLK", "a shared lock"])
def test_lease_is_free_tells_free_held_here_and_held_elsewhere(
    tmp_path: Path,
    helpers: Callable[..., Helper],
    monkeypatch: pytest.MonkeyPatch,
    asking: str,
) -> None:
    if asking == "a shared lock":  # where struct flock's layout is not known
        monkeypatch.setattr("outbox_analytics.store.lease._POSIX_FLOCK", None)
    locks_taken: list[int] = []
    real_lockf = fcntl.lockf

    def lockf(fd: int, cmd: int, *args: int) -> Any:
        locks_taken.append(cmd)
        return real_lockf(fd, cmd, *args)

    monkeypatch.setattr(fcntl, "lockf", lockf)
    path = tmp_path / "outbox.sqlite3"
    lock_file = Path(str(path) + ".lock")
    outbox = outbox_with(path, 2)
    assert outbox.lease_is_free()
    assert not lock_file.exists()  # asking creates nothing

    lease = outbox.try_lease()
    assert lease is not None
    assert not outbox.lease_is_free()  # held here
    other = Outbox(path)  # another client of this process on the file
    assert not other.lease_is_free()
    assert other.try_lease() is None
    lease.close()
    assert outbox.lease_is_free() and other.lease_is_free()

    holder = helpers(HOLDER, str(path), "0")
    assert holder.line().startswith("held")
    assert not outbox.lease_is_free()  # held elsewhere
    assert not other.lease_is_free()
    assert outbox.try_lease() is None  # asking did not take it
    holder.send("release")
    assert holder.line() == "released"
    assert outbox.lease_is_free()
    assert outbox.lease_is_free()  # (and asking left nothing held)
    holder.send("exit")
    lease = outbox.try_lease()
    assert lease is not None
    lease.close()
    other.close()
    outbox.close()
    asked_by_locking = fcntl.LOCK_SH | fcntl.LOCK_NB in locks_taken
    assert asked_by_locking == (asking == "a shared lock")  # F_GETLK takes no lock


ASKER = """
import sys
from outbox_analytics.store import Outbox

outbox = Outbox(sys.argv[1])
for line in sys.stdin:
    free = outbox.lease_is_free()
    lease = outbox.try_lease()
    print("free" if free else "held", "taken" if lease else "refused", flush=True)
    if lease is not None:
        lease.close()
"""


def test_outboxes_of_one_process_never_drop_each_others_lock(
    tmp_path: Path, helpers: Callable[..., Helper]
) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = outbox_with(path, 2)
    second = Outbox(path)
    asker = helpers(ASKER, str(path))

    lease = first.try_lease()
    assert lease is not None
    assert second.try_lease() is None
    lease.close()  # given back: the lock file stays open in this process
    lease = second.try_lease()
    assert lease is not None
    first.close()  # closing an outbox, or another outbox's asking, drops nothing
    assert first.lease_is_free() is False
    third = Outbox(path)
    assert third.try_lease() is None
    third.close()
    asker.send("ask")
    assert asker.line() == "held refused"  # another process still meets the lock
    lease.close()
    asker.send("ask")
    assert asker.line() == "free taken"
    second.close()


def test_a_lease_on_a_replaced_lock_file_is_given_up(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = outbox_with(path, 1)
    lease = outbox.try_lease()
    assert lease is not None and lease.valid
    lock_file = Path(str(path) + ".lock")
    lock_file.unlink()
    lock_file.write_bytes(b"")  # another process could lock this one: ours is no longer the lease
    assert not lease.valid
    lease.close()
    lease = outbox.try_lease()  # on the new lock file
    assert lease is not None and lease.valid
    lease.close()
    outbox.close()


def test_the_lock_file_is_shared_by_the_file_that_replaced_the_holders(
    tmp_path: Path, helpers: Callable[..., Helper]
) -> None:
    """A file moved aside and replaced at the path: one holder for the path, in one process too."""
    path = tmp_path / "outbox.sqlite3"
    old = outbox_with(path, 1)
    lease = old.try_lease()
    assert lease is not None
    os.rename(path, tmp_path / "aside.sqlite3")
    new = Outbox(path)
    assert new.try_lease() is None  # the holder's lock file is the path's
    assert not new.lease_is_free()
    asker = helpers(ASKER, str(path))
    asker.send("ask")
    assert asker.line() == "held refused"  # asking here dropped nothing
    lease.close()
    fresh = new.try_lease()
    assert fresh is not None
    fresh.close()
    new.close()
    old.close()
