"""Interrupts inside storage calls: no transaction is ever left open, nothing hangs.

A KeyboardInterrupt, a SystemExit or any exception raised by a signal handler
may arrive at any statement of a storage call (a single `track()`, or the
commit of a `batch()` while it waits for another process's write lock).
Afterwards no transaction may be left open: the interrupted batch stored all
of its events or none, and the very next `track()` is committed, visible from
another connection as soon as it returns. Covered three ways:

- deterministically, by raising from a trace function at the 1st, 2nd, 3rd...
  line executed in the storage modules during one call, until the call runs
  to its end uninterrupted;
- with a real SIGALRM whose handler raises while the commit of a batch waits
  for a writer in another process (the bug this file was written for);
- with a SIGALRM handler that itself calls `track()`, fired over and over
  while the main thread tracks: it must never hang, and every call either
  stores its event or returns False with the drop counted.
"""

from __future__ import annotations

import dis
import faulthandler
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import msgpack
import pytest

import outbox_analytics
from outbox_analytics import Client

from .conftest import start_python

PACKAGE_DIR = Path(outbox_analytics.__file__).resolve().parent
# The storage code: the package outbox_analytics/store/ (or, before it was
# split, the module outbox_analytics/outbox.py), so the tests run on both.
STORAGE_PREFIXES = (str(PACKAGE_DIR / "store") + os.sep, str(PACKAGE_DIR / "outbox.py"))
# A line whose code is a NOP (`try:`, `pass`, a `return` duplicated into a
# finally) is skipped: no signal handler runs there, and CPython's compiler
# leaves NOPs outside the exception table, so an exception raised there by a
# trace function would bypass every enclosing `with` and `finally`
# (python/cpython#148278), something no real interrupt can do.
NOP = dis.opmap["NOP"]
MAX_POINTS = 400  # far more lines than one storage call runs
HANG_LIMIT = 60.0  # faulthandler kills the run (with every thread's traceback) past this


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A call that hangs fails the run with a traceback instead of blocking CI forever."""
    faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


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


class Interrupter:
    """Raises `error` at the `at`-th line executed in the storage code while it is active."""

    def __init__(self, at: int, error: type[BaseException]) -> None:
        self.at = at
        self.error = error
        self.seen = 0
        self.where: str | None = None

    def global_trace(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "call" and frame.f_code.co_filename.startswith(STORAGE_PREFIXES):
            return self.local_trace
        return None

    def local_trace(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and frame.f_code.co_code[frame.f_lasti] != NOP:
            self.seen += 1
            if self.seen == self.at:
                name = Path(frame.f_code.co_filename).name
                self.where = f"{name}:{frame.f_lineno} in {frame.f_code.co_name}"
                # Raising from a trace function also turns tracing off.
                raise self.error(f"interrupted at {self.where}")
        return self.local_trace

    def start(self) -> None:
        sys.settrace(self.global_trace)


def check_after_interrupt(
    client: Client, reader: Reader, label: str, where: str, expected: list[str]
) -> list[str]:
    """The next track() is committed at once, and nothing else changed: the new events list."""
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
    """Interrupt `operation` at each line (every `step`-th); the number of points covered.

    `operation(label, interrupter)` must start the interrupter just before the
    storage work to be interrupted, and store `size` events named `label ...`.
    """
    expected = reader.events()
    for at in range(1, MAX_POINTS + 1, step):
        label = f"{error.__name__}-{at}"
        interrupter = Interrupter(at, error)
        try:
            operation(label, interrupter)
        except error as exc:
            assert interrupter.where is not None, f"{exc!r} raised, but not by the interrupter"
            where = interrupter.where
        else:
            where = ""
        finally:
            sys.settrace(None)
        events = reader.events()
        mine = [event for event in events[len(expected) :] if event.startswith(f"{label} ")]
        if not where:  # ran to its end: everything is stored
            assert len(mine) == size, f"uninterrupted, yet {len(mine)} of {size} events stored"
            return at
        assert len(mine) in (0, size), (
            f"interrupted at {where}: {len(mine)} of {size} events of one batch stored"
        )
        expected = check_after_interrupt(client, reader, label, where, events)
    pytest.fail(f"the operation was still interrupted after {MAX_POINTS} lines")


@pytest.fixture
def client_and_reader(outbox_file: Path) -> Iterator[tuple[Client, Reader]]:
    client = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    client.track("user", "First")
    reader = Reader(outbox_file)
    try:
        yield client, reader
    finally:
        reader.close()
        client.shutdown(timeout=5)


def one_track(client: Client) -> Callable[[str, Interrupter], None]:
    def operation(label: str, interrupter: Interrupter) -> None:
        interrupter.start()
        client.track("user", f"{label} single")

    return operation


def batch_commit(client: Client, size: int) -> Callable[[str, Interrupter], None]:
    def operation(label: str, interrupter: Interrupter) -> None:
        with client.batch():
            for n in range(size):
                client.track("user", f"{label} batched", {"n": n})
            interrupter.start()  # interrupt only the commit at the end of the block

    return operation


def assert_still_works(client: Client, reader: Reader) -> None:
    ok, _ = client.track("user", "Last")
    assert ok
    events = reader.events()
    assert events[-1] == "Last"
    stats = client.stats()
    assert stats is not None and stats.pending == len(events)
    client.flush(timeout=1)


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_interrupt_at_each_line_of_a_track_leaves_no_transaction_open(
    client_and_reader: tuple[Client, Reader], error: type[BaseException]
) -> None:
    client, reader = client_and_reader
    covered = sweep(client, reader, error, one_track(client), size=1)
    assert covered > 5  # the sweep really went through the storage code
    assert_still_works(client, reader)


def test_keyboard_interrupt_at_each_line_of_a_batch_commit_stores_all_or_nothing(
    client_and_reader: tuple[Client, Reader],
) -> None:
    client, reader = client_and_reader
    covered = sweep(client, reader, KeyboardInterrupt, batch_commit(client, 5), size=5)
    assert covered > 5
    assert_still_works(client, reader)


def test_system_exit_at_every_other_line_of_a_batch_commit_stores_all_or_nothing(
    client_and_reader: tuple[Client, Reader],
) -> None:
    client, reader = client_and_reader
    covered = sweep(client, reader, SystemExit, batch_commit(client, 5), size=5, step=2)
    assert covered > 5
    assert_still_works(client, reader)


LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


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
        holder = start_python(LOCK_HOLDER, str(outbox_file), "0.4")
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        interrupted = False
        started = time.monotonic()
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with client.batch():
                for n in range(5):
                    client.track("user", "Batched", {"n": n})
            # The commit had to wait for the other writer: the timer must have fired.
            time.sleep(1.0)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        assert interrupted, "the timer did not interrupt the batch"
        assert time.monotonic() - started < 5
        assert holder.wait(timeout=10) == 0, holder.stderr.read() if holder.stderr else ""

        ok, _ = client.track("user", "After")
        assert ok
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
        assert reader.events()[-3:] == ["Later"] * 3
        stats = client.stats()
        assert stats is not None and stats.pending == len(reader.events())
    finally:
        signal.signal(signal.SIGALRM, previous)
        reader.close()
        client.shutdown(timeout=5)


# Run in a process of its own: a deadlock there is a failed test, not a stuck suite,
# and the signals go to that process's main thread.
REENTRANT = """
import faulthandler, json, signal, sys, time
faulthandler.dump_traceback_later(float(sys.argv[2]), exit=True)
from outbox_analytics import Client

client = Client("test-write-key", outbox_path=sys.argv[1], upload=False)
main_results, handler_results, handler_raised = [], [], []

def handler(signum, frame):
    try:
        ok, _ = client.track("user", "Handler", {"n": len(handler_results)})
    except BaseException as exc:
        handler_raised.append(repr(exc))
        return
    handler_results.append(ok)

signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
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
        [sys.executable, "-c", textwrap.dedent(REENTRANT), str(outbox_file), "15"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert process.returncode == 0, (
        f"the process hung or failed (exit {process.returncode}):\n{process.stderr[-6000:]}"
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
    assert events.count("Handler") == handler.count(True)
    assert result["dropped"] == handler.count(False)
    assert result["pending"] == len(events)
