"""Per-process state under forks nobody announces, clocks that step, and gevent.

- a C-level fork (no Python fork hook runs, as in uWSGI's workers) of a
  parent whose threads track and whose uploader is mid-request: children
  never hang or raise, and no two distinct events share a messageId;
- os.fork() on one thread while others track: no raw sqlite3 error escapes,
  and every event reported stored is in the file;
- the wall clock stepping back or forward by hours changes nothing but
  timestamps: flush() does not spin, retries are not cut short;
- under gevent, track() never yields to the hub;
- an idle uploader stands down around a fork and starts again after it.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
import tenacity

from .conftest import start_python
from .receiver import Reply
from .test_store_fork import run_python

C_FORK_FROM_A_BUSY_PARENT = r"""
import ctypes, json, os, sys, threading, time, traceback
from outbox_analytics import Client

path, host, report = sys.argv[1], sys.argv[2], sys.argv[3]
# PyDLL keeps the GIL during the call, as uWSGI's master does when it forks:
# the child runs no Python fork hook, and the parent's other threads are gone.
c_fork = ctypes.PyDLL(None).fork
client = Client("k", host=host, outbox_path=path, upload_interval=0.01)
client.track("parent-main", "M", {"k": -1})
client.flush(timeout=10)

# Every other thread of the parent is parked in C at each fork, as a server's
# are (a forked child of a process with threads running Python code can
# inherit CPython's own GIL held by a thread it does not have: no library can
# help that). Here: a thread inside a call on the file (holding its lock, as
# one waiting on SQLite does), three tracking threads waiting for that lock,
# and the uploader waiting for a slow answer.
file_lock = client.outbox.database._file.lock
parked, go_on = threading.Event(), threading.Event()


def inside_sqlite():
    with file_lock:
        parked.set()
        go_on.wait()


def track_some(n):
    for i in range(5):
        client.track("parent", "P", {"thread": n, "i": i})


holder = threading.Thread(target=inside_sqlite)
holder.start()
parked.wait()
trackers = [threading.Thread(target=track_some, args=(n,)) for n in range(3)]
for thread in trackers:
    thread.start()
time.sleep(0.2)  # they wait for the file lock now; the uploader waits for its answer
children = []
for k in range(12):
    client.outbox._pending_estimate = 0  # (no recount: the file lock is held)
    pid = c_fork()
    if pid == 0:
        code = 3
        try:
            stored = sum(client.track("child", "C", {"k": k, "i": i})[0] for i in range(20))
            code = 0 if stored == 20 else 4
        except BaseException:
            with open(f"{report}.{k}", "w") as out:
                out.write(traceback.format_exc())
        finally:
            os._exit(code)
    children.append(pid)
outcomes = {}
deadline = time.monotonic() + 20
for pid in children:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            outcomes[pid] = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            outcomes[pid] = "hung"
            break
        time.sleep(0.02)
go_on.set()
for thread in [holder, *trackers]:
    thread.join()
client.track("parent-main", "M", {"k": 99})
client.flush(timeout=20)
print(json.dumps(sorted(outcomes.values(), key=str)))
"""


def test_c_level_forks_of_a_busy_parent_never_hang_and_never_share_ids(
    tmp_path: Path, receiver
) -> None:
    receiver.responder = lambda request: Reply(delay=0.5)  # the uploader is mid-request
    report = tmp_path / "error"
    code, out, err = run_python(
        C_FORK_FROM_A_BUSY_PARENT,
        str(tmp_path / "outbox.db"),
        receiver.url,
        str(report),
        timeout=90,
    )
    assert code == 0, err[-3000:]
    errors = [p.read_text() for p in tmp_path.glob("error.*")]
    assert errors == []
    assert json.loads(out.splitlines()[-1]) == [0] * 12  # every child exited by itself, OK
    delivered = receiver.accepted()
    children = [m for m in delivered if m["event"] == "C"]
    assert len({(m["properties"]["k"], m["properties"]["i"]) for m in children}) == 12 * 20
    assert len([m for m in delivered if m["event"] == "P"]) >= 15
    # A resend carries its event's messageId; two distinct events never share one.
    events_of: dict[str, set[str]] = {}
    for message in delivered:
        event = json.dumps([message["event"], message["properties"]], sort_keys=True)
        events_of.setdefault(message["messageId"], set()).add(event)
    shared = {message_id: events for message_id, events in events_of.items() if len(events) > 1}
    assert shared == {}


FORK_WHILE_OTHERS_TRACK = r"""
import json, os, sqlite3, sys, threading
from outbox_analytics import Client

path = sys.argv[1]
client = Client("k", outbox_path=path, upload=False)
results, errors = [], []


def track_loop(n):
    for i in range(400):
        try:
            results.append(client.track("u", "E", {"thread": n, "i": i})[0])
        except BaseException as exc:
            errors.append(repr(exc))


def fork_loop():
    for _ in range(60):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


threads = [threading.Thread(target=track_loop, args=(n,)) for n in range(4)]
threads.append(threading.Thread(target=fork_loop))
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
client.shutdown()
stored = sqlite3.connect(path).execute("SELECT count(*) FROM ack_queue_default").fetchone()[0]
print(json.dumps({"true": results.count(True), "errors": errors, "stored": stored}))
"""


def test_a_fork_on_one_thread_never_makes_another_threads_track_raise(tmp_path: Path) -> None:
    code, out, err = run_python(FORK_WHILE_OTHERS_TRACK, str(tmp_path / "o.db"), timeout=60)
    assert code == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    assert result["errors"] == []
    assert result["true"] == result["stored"] == 1600


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    """The process's wall clock, made to step like NTP or a VM restore does."""

    class SteppingClock:
        offset = 0.0

        def step(self, seconds: float) -> None:
            self.offset += seconds

    stepping = SteppingClock()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + stepping.offset)
    return stepping


@pytest.mark.parametrize("hours", [-2, 2])
def test_a_stepped_wall_clock_neither_spins_a_flush_nor_cuts_retries_short(
    make_client, receiver, clock, hours: int
) -> None:
    def outage(request) -> Reply:
        if len(receiver.requests) == 1:
            clock.step(hours * 3600)  # mid-round, while a flush waits
        return Reply(status=503)

    receiver.responder = outage
    client = make_client(
        max_retries=2, retry_wait=tenacity.wait_fixed(0.05), max_total_backoff_duration=3600
    )
    client.track("user", "E")
    for round_ in (1, 2):  # the second round's rows carry the first's first-attempt time
        started = time.monotonic()
        result = client.flush(timeout=20)
        assert time.monotonic() - started < 5  # one round of three requests gave up: no spin
        assert result.pending == 1
        assert len(receiver.requests) == 3 * round_
    stats = client.stats()
    assert stats is not None and stats.dead == 0  # two hours of "retrying" never happened
    assert stats.head_attempts == 6


GEVENT_TRACKS = r"""
from gevent import monkey

monkey.patch_all()
import json, sys, time
import greenlet
from outbox_analytics import Client

client = Client("k", host=sys.argv[2], outbox_path=sys.argv[1], upload_interval=0.2)
client.track("u", "Start")
client.flush(timeout=10)
switches = []
greenlet.settrace(lambda event, args: switches.append(event))
for i in range(300):
    client.track("u", "E", {"i": i})
greenlet.settrace(None)
print(json.dumps({"switches": len(switches), "sent": client.flush(timeout=10).sent}))
"""


def test_under_gevent_track_never_yields_to_the_hub(tmp_path: Path, receiver) -> None:
    pytest.importorskip("gevent")
    code, out, err = run_python(GEVENT_TRACKS, str(tmp_path / "o.db"), receiver.url, timeout=60)
    assert code == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    assert result["switches"] == 0
    assert result["sent"] == 300


STAND_DOWN_AROUND_FORK = r"""
import json, os, sys, threading, time, warnings
from outbox_analytics import Client

client = Client("k", host=sys.argv[2], outbox_path=sys.argv[1], upload_interval=0.05)
client.track("u", "Before")
client.flush(timeout=10)
time.sleep(0.1)  # idle now
before = [t for t in threading.enumerate() if t.name.startswith("outbox-analytics")]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
os.waitpid(pid, 0)
after = [t for t in threading.enumerate() if t.name == "outbox-analytics-uploader"]
client.track("u", "After")
print(json.dumps({
    "before": [t.name for t in before],
    "restarted": bool(after) and after[0] not in before,
    "warnings": [str(w.message) for w in caught],
    "sent": client.flush(timeout=10).sent,
}))
"""


def test_an_idle_uploader_stands_down_for_a_fork_and_comes_back(tmp_path: Path, receiver) -> None:
    code, out, err = run_python(
        STAND_DOWN_AROUND_FORK, str(tmp_path / "o.db"), receiver.url, timeout=60
    )
    assert code == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    assert "outbox-analytics-uploader" in result["before"]
    assert result["restarted"] and result["sent"] == 1
    if sys.version_info >= (3, 12):  # "This process is multi-threaded, use of fork() ..."
        assert result["warnings"] == []


INTERRUPTED_WAKES = r"""
import json, random, signal, sys, time
from outbox_analytics import Client

client = Client("k", host=sys.argv[2], outbox_path=sys.argv[1], upload_interval=5)
client.track("u", "Start")
client.flush(timeout=10)  # the thread now rests: every track() wakes it
armed = [False]


def interrupt(*_):
    if armed[0]:
        armed[0] = False
        raise KeyboardInterrupt


signal.signal(signal.SIGALRM, interrupt)
stored = 0
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    signal.setitimer(signal.ITIMER_REAL, random.uniform(0, 0.0005))
    try:
        armed[0] = True
        stored += client.track("u", "E")[0]
    except KeyboardInterrupt:
        pass
    finally:
        armed[0] = False
signal.setitimer(signal.ITIMER_REAL, 0)
print(json.dumps({"stored": stored, "flush": client.flush(timeout=10).pending}), flush=True)
"""


def test_interrupts_inside_track_never_wedge_the_uploader_or_later_calls(
    tmp_path: Path, receiver
) -> None:
    """A KeyboardInterrupt landing while track() wakes the thread (what hung a CI run)."""
    code, out, err = run_python(
        INTERRUPTED_WAKES, str(tmp_path / "o.db"), receiver.url, "3", timeout=60
    )
    assert code == 0, f"hung or failed ({code}): {err[-2000:]}"
    result = json.loads(out.splitlines()[-1])
    assert result["stored"] > 100 and result["flush"] == 0


SIGTERM_HANDLER_USES_THE_CLIENT = r"""
import signal, sys
from outbox_analytics import Client

client = Client("k", host=sys.argv[2], outbox_path=sys.argv[1], max_retries=0)
what = sys.argv[3]


def terminate(signum, frame):
    # It lands inside a track() of the loop below, almost always.
    if what == "stats":
        client.stats()
    elif what == "flush":
        client.flush()
    elif what == "shutdown":
        client.shutdown()
    sys.exit(143)


signal.signal(signal.SIGTERM, terminate)
print("ready", flush=True)
i = 0
while True:
    client.track("job", "Row", {"i": i})
    i += 1
"""


@pytest.mark.parametrize("what", ["stats", "flush", "shutdown"])
def test_a_sigterm_handler_that_uses_the_client_still_ends_the_job(
    tmp_path: Path, receiver, what: str
) -> None:
    """Its call came back into the library while track() was inside it: it must work, not hang,
    and its outcome must never be swallowed by the interrupted track()."""
    for trial in range(3):
        job = start_python(
            SIGTERM_HANDLER_USES_THE_CLIENT, str(tmp_path / f"{trial}.db"), receiver.url, what
        )
        try:
            assert job.stdout is not None and job.stdout.readline().strip() == "ready"
            time.sleep(0.3)
            job.send_signal(signal.SIGTERM)
            _, err = job.communicate(timeout=10)
        finally:
            job.kill()
            job.wait()
        assert job.returncode == 143, err[-2000:]


CHILD_OF_A_THREAD = r"""
import os, sys, threading, time
from outbox_analytics import Client

client = Client("k", host=sys.argv[2], outbox_path=sys.argv[1])
children = []


def fork_and_track():
    pid = os.fork()
    if pid == 0:
        client.track("child", "E")
        sys.exit(0)  # ends this thread, the child's only one but the uploader's
    children.append(pid)


thread = threading.Thread(target=fork_and_track)
thread.start()
thread.join()
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    done, status = os.waitpid(children[0], os.WNOHANG)
    if done:
        print("exited", os.waitstatus_to_exitcode(status), flush=True)
        break
    time.sleep(0.05)
else:
    os.kill(children[0], 9)
    print("still running", flush=True)
"""


def test_a_child_forked_from_a_thread_ends_when_its_thread_does(tmp_path: Path, receiver) -> None:
    code, out, err = run_python(CHILD_OF_A_THREAD, str(tmp_path / "o.db"), receiver.url, timeout=60)
    assert code == 0, err[-2000:]
    assert out.strip() == "exited 0"


FORK_DURING_ON_ERROR = """
import os, sys, threading, time
from outbox_analytics import Client

in_callback = threading.Event()

def slow_on_error(exc, batch):
    in_callback.set()
    time.sleep(3)

client = Client("test-write-key", host=sys.argv[1], outbox_path=sys.argv[2],
                on_error=slow_on_error, max_retries=0)
client.track("u", "Rejected")
assert in_callback.wait(20)
pid = os.fork()  # the uploader thread is inside on_error, its failure in the file
if pid == 0:
    client.track("u", "Child")
    result = client.flush()  # no timeout: it ends when the event is sent
    os._exit(0 if result.pending == 0 else 3)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print(os.waitstatus_to_exitcode(status), flush=True)
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("the child's flush hung", flush=True)
client.shutdown()
"""


def test_a_fork_while_on_error_runs_leaves_the_child_free_to_flush(
    receiver, tmp_path: Path
) -> None:
    # A flush waits until the failure it saw was reported to on_error; the
    # child of a fork made meanwhile must not wait for the parent's thread.
    answers = iter([Reply(400)])
    receiver.responder = lambda request: next(answers, Reply())
    code, out, err = run_python(
        FORK_DURING_ON_ERROR, receiver.url, str(tmp_path / "outbox.sqlite3"), timeout=60
    )
    assert (code, out.strip()) == (0, "0"), err[-2000:]
    assert [m["event"] for m in receiver.accepted()] == ["Child"]
