"""Interrupts inside storage calls: no transaction is ever left open, nothing hangs.

A KeyboardInterrupt, a SystemExit or any exception raised by a signal handler
may arrive at any point of a storage call (a single `track()`, or the
commit of a `batch()` while it waits for another process's write lock).
Afterwards no transaction may be left open: the interrupted batch stored all
of its events or none, and the very next `track()` is committed, visible from
another connection as soon as it returns. Covered three ways:

- deterministically, by raising from a profile function at the 1st, 2nd,
  3rd... point of one call where a signal handler could run in the storage
  code (entering or leaving a function, a C call returning), until the call
  runs to its end uninterrupted;
- with a real SIGALRM whose handler raises while the commit of a batch waits
  for a writer in another process (the bug this file was written for);
- with a SIGALRM handler that itself calls `track()`, fired over and over
  while the main thread tracks: it must never hang, and every call either
  stores its event or returns False with the drop counted.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import msgpack
import pytest

import outbox_analytics
from outbox_analytics import Client

from .conftest import hold_write_lock, start_python

PACKAGE_DIR = Path(outbox_analytics.__file__).parent
# The storage code: the package outbox_analytics/store/ (or, before it was
# split, the module outbox_analytics/outbox.py), so the tests run on both.
STORAGE_PREFIXES = tuple(
    str(package / name)
    for package in {PACKAGE_DIR, PACKAGE_DIR.resolve()}
    for name in ("store" + os.sep, "outbox.py")
)


def is_storage(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(STORAGE_PREFIXES)


MAX_POINTS = 400  # far more points than one storage call passes
HANG_LIMIT = 60.0  # the last resort: faulthandler ends the run past this
CALL_LIMIT = 10.0  # one storage call that takes longer is reported as hung


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """Whatever `returns_within` cannot interrupt ends the run instead of blocking CI forever."""
    faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class Hung(Exception):
    """A storage call did not return in time (a lock left held, a deadlock)."""


@contextlib.contextmanager
def returns_within(seconds: float, what: str) -> Iterator[None]:
    """Fail (rather than hang) if the block takes longer: SIGALRM interrupts a lock wait."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"{what} did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Reader:
    """A separate SQLite connection: it sees only what the client has committed."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10
        )

    def events(self) -> list[str]:
        rows = self.conn.execute("SELECT data FROM ack_queue_default ORDER BY _id").fetchall()
        return [msgpack.unpackb(row[0], raw=False)["event"] for row in rows]

    def close(self) -> None:
        self.conn.close()


def client_connection(client: Client) -> sqlite3.Connection | None:
    """The client's SQLite connection (the storage package's, or the old Outbox's)."""
    outbox: Any = client.outbox
    holder = getattr(outbox, "database", outbox)
    conn: sqlite3.Connection | None = holder._conn
    return conn


_SWALLOWING = {"_weakrefset.py", "weakref.py"}


class Interrupter:
    """Raises `error` at the `at`-th point of the storage code where a signal handler could run.

    CPython runs a signal handler (which may raise) only when it checks for
    pending calls: on entering a function and after a call returns (and on a
    loop's jump back). A profile function sees exactly those moments in our
    frames, and an exception raised from it surfaces where a handler's would:

    - "call": entering a storage function (or a function it calls);
    - "return": a Python call made by storage code returning (including a
      generator's yield), or a storage function returning to its caller;
    - "c_return": a C function called by storage code returning (SQLite's
      `execute` of BEGIN IMMEDIATE or COMMIT, a lock's `__exit__`, `time.sleep`).

    Line events of a trace function are not used: raising at the start of a
    line also hits places no interrupt can reach (a `try:` or `pass`, whose
    NOP CPython leaves outside the exception table, python/cpython#148278; a
    `with` block's exit call; the first store of a `finally`), where even a
    `with lock:` would be skipped.
    """

    def __init__(self, at: int, error: type[BaseException]) -> None:
        self.at = at
        self.error = error
        self.seen = 0
        self.where: str | None = None
        self.on_sleep: Callable[[], None] | None = None  # called when storage code first sleeps

    def profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "c_return":
            ours = is_storage(frame)
        elif event in ("call", "return"):
            ours = is_storage(frame) or (frame.f_back is not None and is_storage(frame.f_back))
        else:
            ours = False
        # Weak reference callbacks run when the garbage collector strikes, and
        # CPython prints and swallows what they raise: not a point of ours.
        if not ours or Path(frame.f_code.co_filename).name in _SWALLOWING:
            return
        if self.on_sleep is not None and event == "c_return" and arg is time.sleep:
            self.on_sleep()
            self.on_sleep = None
        self.seen += 1
        if self.seen == self.at:
            name = Path(frame.f_code.co_filename).name
            what = f" of {getattr(arg, '__qualname__', arg)}" if event == "c_return" else ""
            self.where = f"{event}{what} at {name}:{frame.f_lineno} in {frame.f_code.co_name}"
            # Raising from a profile function also turns profiling off.
            raise self.error(f"interrupted: {self.where}")

    def start(self) -> None:
        sys.setprofile(self.profile)


def check_after_interrupt(
    client: Client, reader: Reader, label: str, where: str, expected: list[str]
) -> list[str]:
    """The next track() is committed at once, and nothing else changed: the new events list."""
    with returns_within(CALL_LIMIT, f"track() after an interrupt at {where}"):
        ok, _ = client.track("user", f"After {label}")
    assert ok, f"track() after an interrupt at {where} failed"
    events = reader.events()
    assert events == [*expected, f"After {label}"], (
        f"after an interrupt at {where}, the next track() returned True but the file"
        f" (seen from another connection) holds {events[len(expected) :]} past the"
        " events stored before"
    )
    conn = client_connection(client)
    assert conn is None or not conn.in_transaction, (
        f"a transaction is still open after the call that followed an interrupt at {where}"
    )
    return events


def sweep(
    client: Client,
    reader: Reader,
    error: type[BaseException],
    operation: Callable[[str, Interrupter], None],
    size: int,
    step: int = 1,
) -> int:
    """Interrupt `operation` at each point (every `step`-th); the number of points covered.

    `operation(label, interrupter)` must start the interrupter just before the
    storage work to be interrupted, and store `size` events named `label ...`.
    """
    expected = reader.events()
    for at in range(1, MAX_POINTS + 1, step):
        label = f"{error.__name__}-{at}"
        interrupter = Interrupter(at, error)
        try:
            with returns_within(CALL_LIMIT, f"the call to interrupt at its point {at}"):
                operation(label, interrupter)
        except error as exc:
            assert interrupter.where is not None, f"{exc!r} raised, but not by the interrupter"
            where = interrupter.where
        else:
            where = ""
        finally:
            sys.setprofile(None)
        events = reader.events()
        mine = [event for event in events[len(expected) :] if event.startswith(f"{label} ")]
        if not where:  # ran to its end: everything is stored
            assert interrupter.where is None, (
                f"the {error.__name__} raised at {interrupter.where} never reached the caller"
            )
            assert len(mine) == size, f"uninterrupted, yet {len(mine)} of {size} events stored"
            return at
        assert len(mine) in (0, size), (
            f"interrupted at {where}: {len(mine)} of {size} events of one batch stored"
        )
        expected = check_after_interrupt(client, reader, label, where, events)
    pytest.fail(f"the operation was still interrupted after {MAX_POINTS} points")


@pytest.fixture
def client_and_reader(outbox_file: Path) -> Iterator[tuple[Client, Reader]]:
    client = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    client.track("user", "First")
    reader = Reader(outbox_file)
    try:
        yield client, reader
    finally:
        reader.close()
        with returns_within(CALL_LIMIT, "shutdown()"):
            client.shutdown(timeout=5)


def one_track(client: Client) -> Callable[[str, Interrupter], None]:
    def operation(label: str, interrupter: Interrupter) -> None:
        interrupter.start()
        client.track("user", f"{label} single")

    return operation


class WriteLockHolder:
    """Another connection holding the write lock, as another process's writer would."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(
            str(path), isolation_level=None, timeout=5, check_same_thread=False
        )
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def hold(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        # Released when the storage code first sleeps waiting for it (that is
        # deterministic), or else after a while (a writer that waits inside SQLite).
        self.timer = threading.Timer(0.3, self.release)
        self.timer.start()

    def release(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.release()
        self.conn.close()


def batch_commit(
    client: Client, size: int, holder: WriteLockHolder | None = None
) -> Callable[[str, Interrupter], None]:
    def operation(label: str, interrupter: Interrupter) -> None:
        try:
            with client.batch():
                for n in range(size):
                    client.track("user", f"{label} batched", {"n": n})
                if holder is not None:
                    holder.hold()
                    interrupter.on_sleep = holder.release
                interrupter.start()  # interrupt only the commit at the end of the block
        finally:
            sys.setprofile(None)
            if holder is not None:
                holder.release()

    return operation


READ_EVENTS = """
import json, sqlite3, sys, msgpack
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=10)
rows = conn.execute("SELECT data FROM ack_queue_default ORDER BY _id").fetchall()
print(json.dumps([msgpack.unpackb(row[0], raw=False)["event"] for row in rows]))
"""


def events_seen_by_another_process(path: Path) -> list[str]:
    reader = start_python(READ_EVENTS, str(path))
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    events: list[str] = json.loads(out)
    return events


def assert_still_works(client: Client, reader: Reader, path: Path) -> None:
    with returns_within(CALL_LIMIT, "track(), stats() and flush() after the sweep"):
        ok, _ = client.track("user", "Last")
        assert ok
        events = reader.events()
        assert events[-1] == "Last"
        stats = client.stats()
        assert stats is not None and stats.pending == len(events)
        client.flush(timeout=1)
    assert events_seen_by_another_process(path) == events


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_interrupt_at_each_point_of_a_track_leaves_no_transaction_open(
    client_and_reader: tuple[Client, Reader], error: type[BaseException], outbox_file: Path
) -> None:
    client, reader = client_and_reader
    covered = sweep(client, reader, error, one_track(client), size=1)
    assert covered > 5  # the sweep really went through the storage code
    assert_still_works(client, reader, outbox_file)


def test_keyboard_interrupt_at_each_point_of_a_batch_commit_stores_all_or_nothing(
    client_and_reader: tuple[Client, Reader], outbox_file: Path
) -> None:
    client, reader = client_and_reader
    covered = sweep(client, reader, KeyboardInterrupt, batch_commit(client, 5), size=5)
    assert covered > 5
    assert_still_works(client, reader, outbox_file)


def test_interrupt_at_each_point_of_a_batch_commit_waiting_for_a_writer(
    client_and_reader: tuple[Client, Reader], outbox_file: Path
) -> None:
    """The commit first finds the write lock taken, waits, then gets it: every point of that."""
    client, reader = client_and_reader
    holder = WriteLockHolder(outbox_file)
    try:
        operation = batch_commit(client, 5, holder)
        covered = sweep(client, reader, KeyboardInterrupt, operation, size=5)
    finally:
        holder.close()
    plain = sweep(client, reader, KeyboardInterrupt, batch_commit(client, 5), size=5)
    assert covered > plain  # the wait for the writer really was part of the sweep
    assert_still_works(client, reader, outbox_file)


def test_system_exit_at_every_other_point_of_a_batch_commit_stores_all_or_nothing(
    client_and_reader: tuple[Client, Reader], outbox_file: Path
) -> None:
    client, reader = client_and_reader
    covered = sweep(client, reader, SystemExit, batch_commit(client, 5), size=5, step=2)
    assert covered > 5
    assert_still_works(client, reader, outbox_file)


def test_ctrl_c_while_a_batch_commit_waits_for_another_writer_loses_no_later_event(
    outbox_file: Path,
) -> None:
    """The issue: SIGINT-like interrupt just as BEGIN IMMEDIATE got the lock."""
    client = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    reader = Reader(outbox_file)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt("Ctrl-C")

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        assert client.track("user", "Before")[0]
        holder = hold_write_lock(outbox_file, 0.4)
        interrupted = False
        started = time.monotonic()
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            # The commit waits for the other writer (0.4 s): the timer fires meanwhile.
            with client.batch():
                for n in range(5):
                    client.track("user", "Batched", {"n": n})
        except KeyboardInterrupt:
            interrupted = True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        assert interrupted, "the batch's commit was not interrupted, though it had to wait"
        assert time.monotonic() - started < 5
        assert holder.wait(timeout=10) == 0, holder.stderr.read() if holder.stderr else ""

        ok, _ = client.track("user", "After")
        assert ok, "track() after the interrupted batch failed"
        events = reader.events()
        assert events.count("Batched") in (0, 5), f"part of an interrupted batch stored: {events}"
        assert events[-1] == "After", (
            "track() returned True after the interrupted batch, but its event is not"
            f" committed (another connection sees {events}): a transaction was left open"
        )
        conn = client_connection(client)
        assert conn is None or not conn.in_transaction
        # And the next batch commits too.
        with client.batch():
            for n in range(3):
                client.track("user", "Later", {"n": n})
        events = reader.events()
        assert events[-3:] == ["Later"] * 3
        stats = client.stats()
        assert stats is not None and stats.pending == len(events)
        assert events_seen_by_another_process(outbox_file) == events
    finally:
        signal.signal(signal.SIGALRM, previous)
        reader.close()
        client.shutdown(timeout=5)


# Run in a process of its own: a deadlock there is a failed test, not a stuck suite,
# and the signals go to that process's main thread.
REENTRANT = """
import json, os, signal, sys, threading, time, traceback
from outbox_analytics import Client

client = Client("test-write-key", outbox_path=sys.argv[1], upload=False)
main_results, handler_results, handler_raised = [], [], []
finished = threading.Event()

def watchdog():
    if finished.wait(float(sys.argv[2])):
        return
    stack = traceback.format_stack(sys._current_frames()[threading.main_thread().ident])
    print("HUNG; the main thread, outermost calls first:", file=sys.stderr)
    print("".join(stack[:24]), "...", "".join(stack[-6:]), sep="\\n", file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)

threading.Thread(target=watchdog, daemon=True).start()

def handler(signum, frame):
    try:
        ok, _ = client.track("user", "Handler", {"n": len(handler_results)})
    except BaseException as exc:
        handler_raised.append(repr(exc))
        return
    handler_results.append(ok)

signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
deadline = time.monotonic() + 1.0
n = 0
while time.monotonic() < deadline:
    n += 1
    if n % 10:
        main_results.append(client.track("user", "Main", {"n": n})[0])
    else:
        with client.batch():
            for k in range(3):
                main_results.append(client.track("user", "Main", {"n": n, "k": k})[0])
    client.stats()
signal.setitimer(signal.ITIMER_REAL, 0)
signal.signal(signal.SIGALRM, signal.SIG_IGN)
finished.set()
stats = client.stats()
print(json.dumps({
    "main": main_results, "handler": handler_results, "raised": handler_raised,
    "dropped": stats.dropped, "pending": stats.pending,
}), flush=True)
client.shutdown(timeout=2)
"""


def test_a_signal_handler_that_tracks_during_a_storage_call_never_hangs(
    outbox_file: Path,
) -> None:
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR.parent))
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REENTRANT), str(outbox_file), "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert process.returncode == 0, (
        f"the process hung or failed (exit {process.returncode}):\n{process.stderr[-8000:]}"
    )
    result = json.loads(process.stdout.splitlines()[-1])
    assert result["raised"] == [], "track() raised out of a signal handler"
    main, handler = result["main"], result["handler"]
    assert len(main) > 50 and len(handler) > 50, "too few calls to exercise anything"
    assert all(main), "a track() of the main thread was refused"
    reader = Reader(outbox_file)
    try:
        events = reader.events()
    finally:
        reader.close()
    # Every call that returned True stored its event; every False was counted as dropped.
    assert events.count("Main") == len(main)
    assert events.count("Handler") == handler.count(True), "a handler's True event is missing"
    assert result["dropped"] == handler.count(False), (
        f"{handler.count(False)} calls from the handler returned False,"
        f" stats().dropped counts {result['dropped']}"
    )
    assert result["pending"] == len(events)
