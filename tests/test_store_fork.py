"""fork() while threads of ours are inside SQLite: children never hang, drop or lose events.

Covers the fork handlers of the storage package: before fork() no thread of
ours is inside SQLite, after it the parent carries on and the child opens its
own connection instead of touching an inherited one.

- a stress run in a fresh interpreter: 6 tracking threads and an uploader
  replaying a backlog, 1,000 children forked one after another, each tracking
  5 events: none blocked over 1 s, nothing dropped, every event delivered;
- 100 forks while another thread tracks in a tight loop (what hung before);
- drops counted in a forked child reach the file (cap reached, full disk), and
  drops the parent had not yet recorded are never counted by the child too;
- a child starts without a connection, opens its own, and its events are
  committed where the parent reads them; children exiting normally (finalizers,
  atexit) leave the parent's file intact; a running child keeps its committed
  events when the parent closes its last connection (no inherited SQLite lock
  bookkeeping, which let that close delete the WAL under the child).

Forking runs in a fresh interpreter where the parent has threads of its own
(so the pytest process is never forked with its threads), and in the pytest
process where it has none. Every wait is bounded: a stuck child is killed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import outbox_analytics
from outbox_analytics import Client

# The package under test, whichever tree pytest imported it from (a copy of the old code too).
PACKAGE_ROOT = Path(outbox_analytics.__file__).resolve().parents[1]


def run_python(code: str, *args: str, timeout: float) -> tuple[int | None, str, str]:
    """Run `code` in a fresh interpreter importing the package under test; never hangs.

    Returns (exit code, or None if it had to be killed at `timeout`; stdout; stderr).
    """
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # so that a hang is killed with every child it forked
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def reader(path: Path) -> Any:
    """A read-only Outbox on `path` (the old code kept it in outbox_analytics.outbox)."""
    try:
        from outbox_analytics.store import Outbox
    except ImportError:  # the code before the storage package
        from outbox_analytics.outbox import Outbox  # type: ignore[no-redef]
    return Outbox(path, readonly=True)


def database_of(client: Client) -> Any:
    """The object holding the outbox's connection in `_conn` (the Outbox itself before)."""
    assert client.outbox is not None
    return getattr(client.outbox, "database", client.outbox)


def fork_child(body: Callable[[], tuple[bool, dict[str, Any]]], timeout: float = 10.0) -> Any:
    """Fork the pytest process; run `body` in the child and return what it reported.

    The child leaves with os._exit(0 if its first result is True else 1) and
    sends the rest as JSON through a pipe. A child still running after
    `timeout` is killed and the test fails.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 2
        try:
            os.close(read_end)
            good, report = body()
            os.write(write_end, json.dumps(report).encode())
            code = 0 if good else 1
        except BaseException as exc:  # reported, then the child leaves
            os.write(write_end, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    status: int | None = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            pytest.fail(f"the forked child was still running after {timeout}s")
        else:
            time.sleep(0.002)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, report
    return report


# -- 1. the stress run --------------------------------------------------------------------

STRESS = """
import json, os, signal, sys, threading, time
import tenacity
from outbox_analytics import Client

url, work = sys.argv[1], sys.argv[2]
CHILDREN, BACKLOG, THREADS, PAUSE = 1000, 3000, 6, 0.002
path = os.path.join(work, "outbox.sqlite3")
expected = {}  # tag -> messageId of every event a call said was stored

# A backlog left by an earlier run that did not upload (as after a crash).
writer = Client("stress-key", outbox_path=path, upload=False)
with writer.batch():
    for n in range(BACKLOG):
        ok, msg = writer.track("backlog", "Backlog", {"tag": f"b{n}"})
        assert ok
        expected[f"b{n}"] = msg["messageId"]
writer.shutdown()
del writer

client = Client(
    "stress-key", host=url, outbox_path=path, upload_interval=0.05,
    max_retries=50, retry_wait=tenacity.wait_fixed(0.01),
)
replaying = client.uploader is not None and client.uploader.running
pending_at_start = client.stats().pending

stop = threading.Event()
tracked = [{} for _ in range(THREADS)]
refused = []

def track_continuously(k):
    n = 0
    while not stop.is_set():
        ok, msg = client.track(f"thread-{k}", "Thread", {"tag": f"t{k}-{n}"})
        if ok:
            tracked[k][f"t{k}-{n}"] = msg["messageId"]
        else:
            refused.append(f"t{k}-{n}")
        n += 1
        time.sleep(PAUSE)

threads = [threading.Thread(target=track_continuously, args=(k,)) for k in range(THREADS)]
for thread in threads:
    thread.start()
time.sleep(0.2)  # every thread under way

took, lifetimes, fork_calls, codes, killed, children_ids = [], [], [], [], 0, {}
started = time.monotonic()
for i in range(CHILDREN):
    read_end, write_end = os.pipe()
    before = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.close(read_end)
            began = time.monotonic()
            results = [client.track(f"child-{i}", "Child", {"tag": f"c{i}-{j}"}) for j in range(5)]
            spent = time.monotonic() - began
            report = {
                "took": spent,
                "ok": [ok for ok, _ in results],
                "ids": {m["properties"]["tag"]: m["messageId"] for ok, m in results if ok},
            }
            os.write(write_end, json.dumps(report).encode())
            code = 0 if all(ok for ok, _ in results) else 1
        finally:
            os._exit(code)
    fork_calls.append(time.monotonic() - before)
    os.close(write_end)
    deadline = before + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes.append(os.waitstatus_to_exitcode(status))
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            codes.append("killed")
            killed += 1
            break
        time.sleep(0.0005)
    lifetimes.append(time.monotonic() - before)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    report = json.loads(data) if data else {"took": None, "ids": {}}
    took.append(report["took"])
    children_ids.update(report["ids"])
    if killed >= 3:
        break  # failed already: do not spend 10 s on each of the others
forking = time.monotonic() - started

stop.set()
for thread in threads:
    thread.join(10)
for ids in tracked:
    expected.update(ids)
expected.update(children_ids)
flushed = client.flush(timeout=30)
stats = client.stats()
with open(os.path.join(work, "expected.json"), "w") as out:
    json.dump(expected, out)
measured = [t for t in took if t is not None]
print(json.dumps({
    "replaying_at_start": replaying,
    "pending_at_start": pending_at_start,
    "children": len(codes),
    "forking_s": round(forking, 2),
    "max_child_s": max(measured) if measured else None,
    "children_over_1s": sum(1 for t in measured if t > 1.0) + killed,
    "children_killed": killed,
    "no_report": sum(1 for t in took if t is None),
    "max_fork_call_s": max(fork_calls),
    "max_fork_to_exit_s": max(lifetimes),
    "exit_codes": {str(c): codes.count(c) for c in set(codes)},
    "dropped": stats.dropped,
    "refused_in_threads": len(refused),
    "thread_events": sum(len(ids) for ids in tracked),
    "child_events": len(children_ids),
    "expected": len(expected),
    "left_after_flush": flushed.pending,
    "pending": stats.pending,
    "threads_alive": sum(1 for thread in threads if thread.is_alive()),
}), flush=True)
client.shutdown(timeout=5)
"""


@pytest.mark.slow
def test_a_thousand_forks_while_threads_track_and_the_uploader_replays(
    tmp_path: Path, receiver: Any
) -> None:
    started = time.monotonic()
    code, out, err = run_python(STRESS, receiver.url, str(tmp_path), timeout=120)
    elapsed = time.monotonic() - started
    assert code == 0, f"stress run {'hung' if code is None else f'exited {code}'}: {err[-3000:]}"
    summary = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({**summary, "run_s": round(elapsed, 1)}))
    # (the uploader may have sent a batch or two already when it is counted)
    assert summary["replaying_at_start"] and summary["pending_at_start"] >= 1000
    assert summary["children_over_1s"] == 0, summary
    assert summary["children"] == 1000
    assert summary["exit_codes"] == {"0": 1000}, summary
    assert summary["max_fork_call_s"] < 1.0, summary
    assert summary["dropped"] == 0 and summary["refused_in_threads"] == 0, summary
    assert summary["threads_alive"] == 0
    assert summary["child_events"] == 5000

    expected: dict[str, str] = json.loads((tmp_path / "expected.json").read_text())
    assert len(expected) == summary["expected"] >= 3000 + 5000 + 6
    delivered = receiver.wait_for(len(expected), timeout=10)
    ids_of: dict[str, set[str]] = {}
    for message in delivered:
        ids_of.setdefault(message["properties"]["tag"], set()).add(message["messageId"])
    missing = sorted(set(expected) - set(ids_of))
    assert not missing, f"{len(missing)} events never delivered, e.g. {missing[:5]}"
    assert set(ids_of) == set(expected), "events nobody tracked were delivered"
    # A duplicate (at least once) must carry the messageId the call returned.
    changed = {tag: ids for tag, ids in ids_of.items() if ids != {expected[tag]}}
    assert not changed, f"{len(changed)} events delivered under another messageId"
    assert summary["left_after_flush"] == 0 and summary["pending"] == 0


# -- 2. what hung before: a fork while another thread is inside track() ----------------------

TIGHT_LOOP = """
import json, os, signal, sys, threading, time
from outbox_analytics import Client

client = Client("fork-key", outbox_path=sys.argv[1], upload=False)
stop = threading.Event()
tracked = [0]

def track_in_a_tight_loop():
    while not stop.is_set():
        assert client.track("parent", "Loop")[0]
        tracked[0] += 1

thread = threading.Thread(target=track_in_a_tight_loop, daemon=True)
thread.start()
while tracked[0] < 50:
    time.sleep(0.001)
took, hung, failed = [], 0, 0
for i in range(100):
    read_end, write_end = os.pipe()
    before = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.close(read_end)
            began = time.monotonic()
            good = all(client.track(f"child-{i}", "Child", {"n": j})[0] for j in range(5))
            os.write(write_end, str(time.monotonic() - began).encode())
            code = 0 if good else 1
        finally:
            os._exit(code)
    os.close(write_end)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            failed += os.waitstatus_to_exitcode(status) != 0
            break
        if time.monotonic() - before > 3:  # far over the 1 s allowed: it hangs
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            hung += 1
            break
        time.sleep(0.0005)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    took.append(float(data) if data else None)
    if hung >= 2:
        break  # failed already; keep the run short
stop.set()
thread.join(5)
measured = [t for t in took if t is not None]
print(json.dumps({
    "children": len(took),
    "hung": hung,
    "failed": failed,
    "over_1s": sum(1 for t in measured if t > 1.0),
    "max_s": max(measured) if measured else None,
    "parent_tracked": tracked[0],
    "parent_thread_alive": thread.is_alive(),
}), flush=True)
"""


def test_a_hundred_forks_while_another_thread_tracks_in_a_tight_loop(tmp_path: Path) -> None:
    code, out, err = run_python(TIGHT_LOOP, str(tmp_path / "outbox.sqlite3"), timeout=45)
    assert code == 0, f"run {'hung' if code is None else f'exited {code}'}: {err[-3000:]}"
    summary = json.loads(out.strip().splitlines()[-1])
    print(summary)
    assert summary["hung"] == 0, summary
    assert summary["children"] == 100
    assert summary["failed"] == 0 and summary["over_1s"] == 0, summary
    assert not summary["parent_thread_alive"]  # the parent's thread went on, and then ended
    stats = reader(tmp_path / "outbox.sqlite3").stats()
    assert stats.pending == summary["parent_tracked"] + 500
    assert stats.dropped == 0


# -- 3. drops counted in a forked child reach the file, once ---------------------------------


def test_a_childs_drops_at_the_cap_are_counted_in_the_file(outbox_file: Path) -> None:
    client = Client("fork-key", outbox_path=str(outbox_file), upload=False, max_queue_size=5)
    for n in range(5):
        assert client.track("parent", "Stored", {"n": n})[0]

    def child() -> tuple[bool, dict[str, Any]]:
        results = [client.track("child", "Over the cap", {"n": n})[0] for n in range(3)]
        stats = client.stats()
        assert stats is not None
        return results == [False] * 3, {"results": results, "dropped": stats.dropped}

    report = fork_child(child)
    assert report == {"results": [False] * 3, "dropped": 3}
    # The child left with os._exit: what it counted is in the file, not in its memory.
    assert reader(outbox_file).stats().dropped == 3
    assert client.stats().dropped == 3
    assert reader(outbox_file).stats().pending == 5
    client.shutdown()


def _mount_small_disk(directory: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    directory.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True
    )


def _fill(client: Client, limit: int = 5000) -> int:
    """Track big events until one is refused (the disk is full); how many were stored."""
    for n in range(limit):
        if not client.track("filler", "Big", {"n": n, "blob": "x" * 2000})[0]:
            return n
    pytest.fail(f"the disk never filled up after {limit} events")


def test_a_childs_unrecorded_drops_reach_the_file_and_the_parents_are_not_counted_twice(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "small"
    _mount_small_disk(disk, "400k")
    path = disk / "outbox.sqlite3"
    try:
        client = Client("fork-key", outbox_path=str(path), upload=False)
        _fill(client)  # the parent's drop could not be written: the disk is full
        parent_stats = client.stats()
        assert parent_stats is not None
        assert parent_stats.dropped == 1  # counted in memory ...
        assert reader(path).stats().dropped == 0  # ... not yet in the file

        def child() -> tuple[bool, dict[str, Any]]:
            stored_in_child = _fill(client)  # the child meets the full disk too
            before = client.stats()
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
            ok = client.track("child", "After space came back")[0]
            after = client.stats()
            assert before is not None and after is not None
            return ok, {
                "stored": stored_in_child,
                "dropped_before": before.dropped,
                "dropped_after": after.dropped,
            }

        report = fork_child(child)
        # The child's own drop only: the parent's unrecorded one is the parent's to write.
        assert report["dropped_before"] == 1 and report["dropped_after"] == 1, report
        assert reader(path).stats().dropped == 1
        assert client.stats().dropped == 2  # the file's 1 + the parent's own, not yet written
        # The parent's next write records its own drop, once.
        assert client.track("parent", "After the child")[0]
        assert reader(path).stats().dropped == 2
        assert client.stats().dropped == 2
        client.shutdown()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# -- 4. a child opens its own connection ----------------------------------------------------


@pytest.mark.every_python
def test_a_child_never_uses_an_inherited_connection(outbox_file: Path) -> None:
    client = Client("fork-key", outbox_path=str(outbox_file), upload=False)
    ok, first = client.track("parent", "Before the fork")
    assert ok
    database = database_of(client)
    inherited = database._conn
    assert inherited is not None
    watcher = reader(outbox_file)  # a second connection to the file, read-only
    assert watcher.stats().pending == 1
    watcher_db = getattr(watcher, "database", watcher)
    watcher_inherited = watcher_db._conn

    def child() -> tuple[bool, dict[str, Any]]:
        before = database._conn, watcher_db._conn
        results = [client.track("child", "In the child", {"n": n}) for n in range(5)]
        seen = watcher.stats().pending
        after = database._conn, watcher_db._conn
        return all(ok for ok, _ in results), {
            "none_before_first_call": before == (None, None),
            "own_connections": after[0] is not None
            and after[0] is not inherited
            and after[1] is not None
            and after[1] is not watcher_inherited,
            "watcher_sees": seen,
            "ids": [msg["messageId"] for _, msg in results],
        }

    report = fork_child(child)
    assert report["none_before_first_call"], "the child had a connection before its first call"
    assert report["own_connections"], "the child used a connection opened by the parent"
    assert report["watcher_sees"] == 6
    # The child's events are committed: the parent (and any reader) sees them.
    stored = [row.message["messageId"] for row in reader(outbox_file).rows("pending")]
    assert stored == [first["messageId"], *report["ids"]]
    assert watcher.stats().pending == 6
    # And the parent's own connection still works after the child left.
    assert client.track("parent", "After the fork")[0]
    assert reader(outbox_file).stats().pending == 7
    client.shutdown()


NORMAL_EXIT = """
import gc, os, sys, threading
from outbox_analytics import Client

client = Client("fork-key", outbox_path=sys.argv[1], upload=False)
stop = threading.Event()
tracked = [0]

def track():
    while not stop.is_set():
        assert client.track("parent", "Loop")[0]
        tracked[0] += 1

thread = threading.Thread(target=track)
thread.start()
codes = []
for i in range(20):
    pid = os.fork()
    if pid == 0:
        ok = all(client.track("child", "Child")[0] for _ in range(5))
        del client
        gc.collect()  # whatever the child inherited is collected here
        sys.exit(0 if ok else 1)  # a normal exit: atexit hooks, finalizers
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
stop.set()
thread.join()
print(codes, tracked[0], flush=True)
"""


@pytest.mark.every_python
def test_children_that_exit_normally_leave_the_parents_file_intact(tmp_path: Path) -> None:
    """A child's exit collects what it inherited: it must not close the parent's file state."""
    path = tmp_path / "outbox.sqlite3"
    code, out, err = run_python(NORMAL_EXIT, str(path), timeout=20)
    assert code == 0, f"run {'hung' if code is None else f'exited {code}'}: {err[-3000:]}"
    codes, tracked = out.strip().rsplit(" ", 1)
    assert codes == str([0] * 20)
    # Before any reader of ours opens it: closing this connection drops the process's locks.
    assert check_integrity(path) == "ok"
    stats = reader(path).stats()
    assert stats.pending == int(tracked) + 100
    assert stats.dropped == 0


def check_integrity(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def _read_within(fd: int, timeout: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 65536) if ready else b""


def test_a_running_child_keeps_its_events_when_the_parent_closes_the_file(
    outbox_file: Path,
) -> None:
    """The child holds its own SQLite locks: the parent's last close must not delete its WAL.

    A child that inherited SQLite's per-process lock bookkeeping believes it
    holds locks that only the parent holds; the parent closing its last
    connection then checkpoints and deletes the WAL and shared memory under
    the running child, whose later commits go to a deleted file.
    """
    client = Client("fork-key", outbox_path=str(outbox_file), upload=False)
    assert client.track("parent", "Before the fork")[0]
    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            first = [client.track("child", "First", {"n": n}) for n in range(5)]
            os.write(to_parent, b"r")
            _read_within(from_parent, 10)  # until the parent has closed the file
            second = [client.track("child", "Second", {"n": n}) for n in range(5)]
            results = first + second
            os.write(to_parent, json.dumps([msg["messageId"] for _, msg in results]).encode())
            code = 0 if all(ok for ok, _ in results) else 1
        finally:
            os._exit(code)
    try:
        assert _read_within(from_child, 10) == b"r", "the child did not track in time"
        assert client.stats() is not None  # the parent has the file open again ...
        client.shutdown()  # ... and closes it: its last connection
        later = Client("fork-key", outbox_path=str(outbox_file), upload=False)
        assert later.track("parent", "After the close")[0]
        os.write(to_child, b"g")
        report = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child was still running after 10 s")
        report = _read_within(from_child, 1)
        assert os.waitstatus_to_exitcode(status) == 0, report
    finally:
        for fd in (to_child, from_parent, from_child, to_parent):
            os.close(fd)
    child_ids = json.loads(report)
    stored = [row.message["messageId"] for row in reader(outbox_file).rows("pending")]
    lost = [message_id for message_id in child_ids if message_id not in stored]
    assert not lost, f"{len(lost)} of the child's 10 committed events are not in the file"
    assert len(stored) == 12
    later.shutdown()
