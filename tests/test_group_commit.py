"""Group commit (fsync=True): one sync for every thread waiting, each call still its own.

The group must survive what a process meets: a signal handler raising in the
main thread at any point of the hand-over (Ctrl-C, a `signal.alarm` timeout),
a signal handler that itself appends, and a fork (also a C-level one) while
another thread holds the commit lock. Whatever could hang runs in a process
of its own, with a watchdog and a timeout: a hang is a failed test, never a
stuck run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from outbox_analytics.errors import OutboxUnavailable
from outbox_analytics.store import Outbox, encode_message
from outbox_analytics.store.group_commit import GroupCommit

from .conftest import start_python


class _Table:
    """A commit function over a list: ids are positions, like consecutive row ids."""

    def __init__(self, delay: float = 0.0) -> None:
        self.rows: list[str] = []
        self.groups: list[int] = []
        self.delay = delay
        self.fail_next: BaseException | None = None
        self.gate: threading.Event | None = None  # the next commit waits for it

    def commit(self, rows: Sequence[str]) -> int:
        gate, self.gate = self.gate, None
        failure, self.fail_next = self.fail_next, None
        if gate is not None:
            gate.wait(10)
        if failure is not None:
            raise failure
        time.sleep(self.delay)  # a sync: the others queue up meanwhile
        self.groups.append(len(rows))
        self.rows.extend(rows)
        return len(self.rows)


def _run_threads(group: GroupCommit[str], threads: int, calls: int) -> dict[str, int]:
    returned: dict[str, int] = {}

    def work(name: int) -> None:
        for number in range(calls):
            row = f"{name}-{number}"
            returned[row] = group.store([row])

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    return returned


def test_threads_share_commits_and_each_gets_its_own_row_id() -> None:
    table = _Table(delay=0.002)
    group: GroupCommit[str] = GroupCommit(table.commit)
    returned = _run_threads(group, threads=8, calls=50)
    assert len(table.rows) == 400 and sorted(table.rows) == sorted(returned)
    for row, row_id in returned.items():
        assert table.rows[row_id - 1] == row  # the id returned is the row's own
    assert len(table.groups) < 400 / 3  # most commits carried several threads' rows


def test_callers_coming_back_from_a_commit_join_the_next_one_together() -> None:
    # Without gathering, the first thread back from a commit of all 8 led at
    # once, alone: commits of 1 and of 7 by turns, twice the syncs.
    table = _Table(delay=0.002)
    group: GroupCommit[str] = GroupCommit(table.commit)
    _run_threads(group, threads=8, calls=40)
    assert len(table.rows) == 320
    assert sum(table.groups) / len(table.groups) >= 6


def test_a_failed_commit_fails_every_call_in_it_and_the_next_ones_go_on() -> None:
    table = _Table()
    group: GroupCommit[str] = GroupCommit(table.commit)
    table.fail_next = OutboxUnavailable("disk full", "/x")
    with pytest.raises(OutboxUnavailable):
        group.store(["lost"])
    assert group.store(["kept"]) == 1
    assert table.rows == ["kept"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, TimeoutError])
def test_an_interrupted_leader_hands_the_others_on_to_the_next_group(
    error: type[BaseException],
) -> None:
    """Whatever the leader's thread raises, but a failed commit, is its own: not the others'."""
    table = _Table()
    group: GroupCommit[str] = GroupCommit(table.commit)
    gate = table.gate = threading.Event()
    table.fail_next = error()  # in the leading thread, mid-commit (a TimeoutError: an alarm's)
    leader_raised: list[BaseException] = []

    def lead() -> None:
        try:
            group.store(["leader's"])
        except BaseException as exc:
            leader_raised.append(exc)

    leader = threading.Thread(target=lead)
    leader.start()
    time.sleep(0.05)  # the leader waits at the gate: the next ones queue behind it
    followers = _threads_storing(group, ["a", "b", "c"])
    time.sleep(0.05)  # one waits to lead next, with the others in its group
    second_gate = table.gate = threading.Event()  # ... and its commit fails too
    table.fail_next = error()
    gate.set()
    time.sleep(0.05)
    second_gate.set()
    leader.join(10)
    for follower in followers:
        follower.join(10)
    assert [type(exc) for exc in leader_raised] == [error]
    # The second leader (whichever of them took the lock first) raises its own
    # error; the others of its group do not: they lead in turn, and are stored.
    raised = [f.row for f in followers if isinstance(f.result, BaseException)]
    assert len(raised) == 1, [f.result for f in followers]
    assert type(next(f.result for f in followers if f.row in raised)) is error
    for follower in followers:
        if isinstance(follower.result, int):
            assert table.rows[follower.result - 1] == follower.row
    assert sorted(table.rows) == sorted({"a", "b", "c"} - set(raised))


class _Storing(threading.Thread):
    """A thread calling `group.store([row])`; `result` is the id returned or what it raised."""

    def __init__(self, group: GroupCommit[str], row: str) -> None:
        super().__init__(daemon=True)  # (a hung one must not keep the test run alive)
        self.group, self.row = group, row
        self.result: int | BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.group.store([self.row])
        except BaseException as exc:
            self.result = exc


def _threads_storing(group: GroupCommit[str], rows: list[str]) -> list[_Storing]:
    threads = [_Storing(group, row) for row in rows]
    for thread in threads:
        thread.start()
        time.sleep(0.01)  # in this order
    return threads


class _Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


def test_a_caller_interrupted_while_waiting_stores_nothing_and_blocks_nobody() -> None:
    table = _Table()
    group: GroupCommit[str] = GroupCommit(table.commit)
    gate = table.gate = threading.Event()
    leader = threading.Thread(target=group.store, args=(["first"],))
    leader.start()
    time.sleep(0.05)  # the leader waits at the gate with its own row only
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(_Interrupted):
            group.store(["interrupted"])  # this (main) thread waits as a follower
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    gate.set()
    leader.join(10)
    assert group.store(["after"]) == 2  # not stuck: the lead came back
    assert table.rows == ["first", "after"]


def test_fsync_appends_from_many_threads_are_all_stored_under_their_own_ids(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "outbox.sqlite3", fsync=True) as outbox:
        returned: dict[int, str] = {}

        def work(name: int) -> None:
            for number in range(40):
                message_id = f"{name}-{number}"
                row_id = outbox.append(encode_message({"messageId": message_id}))
                assert row_id is not None
                returned[row_id] = message_id

        workers = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        stored = {row.id: row.message["messageId"] for row in outbox.rows("pending")}
    assert len(stored) == 320
    assert stored == returned


def test_a_store_reentered_on_its_own_thread_commits_at_once() -> None:
    """As a signal handler's would: waiting for the outer call would be waiting for itself."""
    table = _Table()
    inner: list[int] = []

    def commit(rows: Sequence[str]) -> int:
        if rows == ["outer"]:  # the handler lands while its thread leads
            inner.append(group.store(["handler's"]))
        return table.commit(rows)

    group: GroupCommit[str] = GroupCommit(commit)
    outer = _Storing(group, "outer")
    outer.start()
    outer.join(5)
    assert not outer.is_alive(), "the re-entered store() waited for its own thread"
    assert inner == [1] and outer.result == 2
    assert table.rows == ["handler's", "outer"]


# -- real signals, real files, in processes of their own ---------------------------------


def _run(code: str, *args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run `code` in a fresh interpreter; (exit code, stdout, stderr). A hang fails the test."""
    process = start_python(code, *args)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"still running after {timeout} s:\n{err[-6000:]}")
    return process.returncode, out, err


# The main thread appends while a timer signal raises `error` at random points
# of its calls (its handler runs in the main thread only), three other threads
# append meanwhile; then every thread stores once more. A watchdog reports a
# hang with every thread's stack.
STORM = """
import json, os, random, signal, sys, threading, time, traceback
from outbox_analytics.store import Outbox, encode_message

path, error_name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
error = {"KeyboardInterrupt": KeyboardInterrupt, "TimeoutError": TimeoutError}[error_name]
finished = threading.Event()

def watchdog():
    if finished.wait(seconds + 5):
        return
    print("HUNG; every thread's innermost calls:", file=sys.stderr)
    for ident, frame in sys._current_frames().items():
        print("".join(traceback.format_stack(frame)[-8:]), file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)

threading.Thread(target=watchdog, daemon=True).start()
outbox = Outbox(path, fsync=True)
stop = threading.Event()
returned, raised, final = {}, [], []

def append(message_id):
    return outbox.append(encode_message({"messageId": message_id}))

def work(name):
    n = 0
    while not stop.is_set():
        n += 1
        try:
            returned[append(f"{name}-{n}")] = f"{name}-{n}"
        except BaseException as exc:
            raised.append(f"{name}-{n}: {exc!r}")
            stop.set()
    final.append(append(f"{name}-final"))

def interrupt(signum, frame):
    raise error("the main thread's")

workers = [threading.Thread(target=work, args=(f"w{n}",), daemon=True) for n in range(3)]
for worker in workers:
    worker.start()
signal.signal(signal.SIGALRM, interrupt)
interrupts = calls = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and not stop.is_set():
    calls += 1
    try:
        signal.setitimer(signal.ITIMER_REAL, random.uniform(0.00005, 0.002))
        append(f"main-{calls}")
        signal.setitimer(signal.ITIMER_REAL, 0)
    except error:
        interrupts += 1
signal.setitimer(signal.ITIMER_REAL, 0)
signal.signal(signal.SIGALRM, signal.SIG_IGN)
stop.set()
final.append(append("main-final"))
for worker in workers:
    worker.join()
finished.set()
print(json.dumps({"returned": returned, "raised": raised, "final": final,
                  "interrupts": interrupts, "calls": calls}))
"""


def _storm(path: Path, error: str) -> dict[str, Any]:
    code, out, err = _run(STORM, str(path), error, "1.0")
    assert code == 0, f"the storm hung or failed (exit {code}):\n{err[-6000:]}"
    result: dict[str, Any] = json.loads(out)
    assert result["raised"] == [], "a worker's store() raised the main thread's exception"
    assert result["interrupts"] >= 20, f"too few interrupts to exercise anything: {result}"
    return result


def _stored(path: Path) -> dict[int, str]:
    with Outbox(path, readonly=True) as outbox:
        return {row.id: row.message["messageId"] for row in outbox.rows("all")}


def test_interrupts_at_any_point_of_the_hand_over_never_wedge_later_calls(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite3"
    result = _storm(path, "KeyboardInterrupt")
    # Every thread stored once more after the storm (the watchdog bounded the wait).
    stored = _stored(path)
    assert sorted(stored[row_id] for row_id in result["final"]) == [
        "main-final",
        "w0-final",
        "w1-final",
        "w2-final",
    ]


def test_the_main_threads_exception_is_never_another_threads(tmp_path: Path) -> None:
    """A signal.alarm handler's TimeoutError in the leading main thread stays there."""
    path = tmp_path / "outbox.sqlite3"
    result = _storm(path, "TimeoutError")
    stored = _stored(path)
    for row_id, message_id in result["returned"].items():
        assert stored.get(int(row_id)) == message_id, f"{message_id}: returned {row_id}"
    # Nothing of theirs was stored without their knowing (twice at most: at-least-once).
    workers = {message_id for message_id in stored.values() if message_id.startswith("w")}
    finals = {f"w{n}-final" for n in range(3)}
    assert workers == set(result["returned"].values()) | finals


# A SIGTERM handler that tracks, then exits: sent while the main thread leads
# a group commit, so that the handler's track() re-enters store().
SIGTERM_TRACKER = """
import faulthandler, json, os, signal, sys, threading, time
from outbox_analytics import Client

faulthandler.dump_traceback_later(5, exit=True)  # hung: exit 1, with every stack
client = Client("test-write-key", outbox_path=sys.argv[1], upload=False, fsync=True)
main = threading.main_thread().ident

def inside(frame, function):
    while frame is not None:
        code = frame.f_code
        if code.co_name == function and code.co_filename.endswith("group_commit.py"):
            return True
        frame = frame.f_back
    return False

def on_sigterm(signum, frame):
    leading = inside(frame, "_lead")
    ok, _ = client.track("system", "Job Terminated")
    print(json.dumps({"leading": leading, "ok": ok,
                      "unrecorded_drops": client.outbox.unrecorded_drops}), flush=True)
    sys.exit(143)

def terminate_while_the_main_thread_leads():
    time.sleep(0.1)
    while not inside(sys._current_frames()[main], "_lead"):
        time.sleep(0.0002)
    os.kill(os.getpid(), signal.SIGTERM)

def other():
    while True:
        client.track("user", "Other")

signal.signal(signal.SIGTERM, on_sigterm)
threading.Thread(target=other, daemon=True).start()
threading.Thread(target=terminate_while_the_main_thread_leads, daemon=True).start()
while True:
    client.track("user", "Work")
"""


def test_a_sigterm_handler_that_tracks_inside_a_store_exits_promptly(outbox_file: Path) -> None:
    started = time.monotonic()
    code, out, err = _run(SIGTERM_TRACKER, str(outbox_file), timeout=20)
    assert code == 143, (
        f"the process did not exit through its handler (exit {code}):\n{err[-6000:]}"
    )
    assert time.monotonic() - started < 10
    handler = json.loads(out.splitlines()[-1])
    assert handler["leading"], "the signal landed outside store(): nothing was tested"
    if handler["ok"]:
        with Outbox(outbox_file, readonly=True) as outbox:
            assert "Job Terminated" in [row.message["event"] for row in outbox.rows()]
    else:  # refused (OutboxBusy: the main thread was inside SQLite), and counted
        assert handler["unrecorded_drops"] == 1


# A thread of the parent holds the commit lock (its commit waits) when the
# process forks: the child's store() must not wait for a thread it does not have.
FORK = """
import ctypes, json, os, signal, sys, threading, time
from outbox_analytics.store.group_commit import GroupCommit

stored = []
entered, gate = threading.Event(), threading.Event()

def commit(rows):
    if "parent's" in rows:
        entered.set()
        gate.wait(30)
    stored.extend(rows)
    return len(stored)

group = GroupCommit(commit)
holder = threading.Thread(target=group.store, args=(["parent's"],))
holder.start()
entered.wait(10)
# A C-level fork (as uWSGI's) runs none of Python's fork hooks.
pid = os.fork() if sys.argv[1] == "os.fork" else ctypes.CDLL(None).fork()
if pid == 0:
    signal.alarm(5)  # hung: SIGALRM's default action ends the child
    try:
        ok = group.store(["child's"]) == 1 and stored == ["child's"]
    except BaseException:
        os._exit(2)
    os._exit(0 if ok else 1)
deadline = time.monotonic() + 10
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done or time.monotonic() > deadline:
        break
    time.sleep(0.01)
gate.set()
holder.join(10)
print(json.dumps({"child": os.waitstatus_to_exitcode(status) if done else "hung",
                  "parent": stored}))
"""


@pytest.mark.parametrize("fork", ["os.fork", "C-level fork"])
def test_a_child_stores_though_a_parents_thread_held_the_commit_lock(fork: str) -> None:
    code, out, err = _run(FORK, fork, timeout=30)
    assert code == 0, err[-6000:]
    result = json.loads(out)
    # (-14: SIGALRM ended the child, hung behind the parent's thread)
    assert result == {"child": 0, "parent": ["parent's"]}
