"""The README's recipes run for real: gunicorn --preload, and a multiprocessing fork Pool.

The README says both need nothing beyond the module-level settings: every
process appends to one outbox, one of them uploads, and a SIGKILLed process
loses no event whose call returned. Each test runs the recipe in real
processes against the test receiver on 127.0.0.1, SIGKILLs every worker at
once midway, stops the job, "restarts" (a fresh process flushes the same
outbox), then checks what the receiver got:

- the job delivered while it ran (the one process holding the upload lease
  sent the others' events: gunicorn's master, one of the pool's workers);
- every event whose track() returned arrived, those of the killed requests
  and tasks included (they had tracked, then died before answering);
- a delivery the library repeated kept its messageId. The caller of a killed
  request or task retries it, and that retry is a new track() with its own
  messageId (an application-level duplicate, expected). So each call is
  named by (number, attempt), and each name must arrive under one messageId.

The kills are synchronised so that they land where they hurt, on every run:
after track() and before the answer, and (in the pool) while the worker that
uploads has a batch on the wire. From the kill on, the receiver answers more
slowly than the 1 s exit budget, so that each job ends with a backlog and a
batch on the wire: the restart has work to do, and a batch to send again.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .conftest import start_python
from .receiver import Received, Reply

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds and kills worker processes through /proc"
)

REPO = Path(__file__).resolve().parents[1]

# -- processes -----------------------------------------------------------------------


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, session...)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses


def live_processes(where: Callable[[list[str]], bool]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = proc_stat(int(entry))
        except (OSError, IndexError):
            continue  # it ended while we looked
        if fields[0] != "Z" and where(fields):
            found.append(int(entry))
    return sorted(found)


def children_of(pid: int) -> list[int]:
    return live_processes(lambda fields: int(fields[1]) == pid)


def kill_session(leader: subprocess.Popen[Any]) -> None:
    """SIGKILL what is left of a process started with start_new_session=True, and its children.

    A failed test must leave no gunicorn or pool worker behind; they all share
    the session the leader opened (its pid), and nothing else does.
    """
    if leader.poll() is None:
        leader.kill()
    for pid in live_processes(lambda fields: int(fields[3]) == leader.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    leader.wait(timeout=10)


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def python_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("GUNICORN_CMD_ARGS", None)  # a developer's own gunicorn options stay out
    return env


# -- the restart, and what the receiver got ------------------------------------------

RESTART = """
import json, sys
import outbox_analytics as analytics

analytics.write_key = "test-write-key"
analytics.host, analytics.outbox_path = sys.argv[1], sys.argv[2]
result = analytics.flush(timeout=60)
stats = analytics.stats()
left = stats.pending + stats.inflight
print(json.dumps({"sent": result.sent, "left": left, "dead": stats.dead, "dropped": stats.dropped}))
"""


def restart_and_deliver(receiver_url: str, outbox: Path) -> dict[str, int]:
    """The next run: a fresh process on the same outbox, sending what the job left."""
    process = start_python(RESTART, receiver_url, str(outbox))
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, err[-3000:]
    result: dict[str, int] = json.loads(out)
    # Nothing left, dead, or dropped: a track() that returned False (the app
    # answers 500 then, and the driver retries) is counted in the file.
    assert result["left"] == result["dead"] == result["dropped"] == 0, result
    return result


def received(receiver, event: str) -> list[dict[str, Any]]:
    """Every message of `event` the receiver read, answered or not (a sender killed meanwhile)."""
    return [m for r in receiver.requests for m in r.batch if m.get("event") == event]


def accepted_ids(receiver, event: str) -> set[str]:
    """The messageIds of `event` that arrived: answered 2xx, as Segment would have kept them."""
    return {m["messageId"] for m in receiver.accepted() if m.get("event") == event}


def assert_one_message_id_per_call(messages: list[dict[str, Any]], name: Callable) -> None:
    """Each call (named by its number, attempt...) arrives under one messageId, used by no other."""
    ids_of: dict[Any, set[str]] = collections.defaultdict(set)
    calls_of: dict[str, set[Any]] = collections.defaultdict(set)
    for message in messages:
        ids_of[name(message)].add(message["messageId"])
        calls_of[message["messageId"]].add(name(message))
    assert {call: ids for call, ids in ids_of.items() if len(ids) > 1} == {}
    assert {mid: calls for mid, calls in calls_of.items() if len(calls) > 1} == {}


class SlowDownAtTheKill:
    """The receiver's answers: after `before` seconds until the kill, after 5 s from then on.

    5 s is beyond the 1 s exit budget: what the job tracks after the kill
    piles up, and its last process exits with a batch on the wire, which the
    restart must send again. With `released`, an answer after the kill waits
    for that event instead (up to 60 s), so a slow machine cannot deliver the
    backlog before the job ends. Each arrival is counted in `arrivals`, a file
    a job can watch.
    """

    def __init__(
        self,
        arrivals: Path,
        killed: Callable[[], bool],
        before: float,
        released: threading.Event | None = None,
    ) -> None:
        self.arrivals, self.killed, self.before = arrivals, killed, before
        self.released = released
        self.count = itertools.count(1)

    def __call__(self, request: Received) -> Reply:
        note = self.arrivals.with_suffix(".tmp")
        note.write_text(str(next(self.count)))
        note.replace(self.arrivals)
        if not self.killed():
            return Reply(delay=self.before)
        if self.released is None:
            return Reply(delay=5.0)
        self.released.wait(60)
        return Reply()


# -- gunicorn --preload --------------------------------------------------------------

APP = """
import json
import os
import time
from urllib.parse import parse_qs

import outbox_analytics as analytics

analytics.write_key = "test-write-key"
analytics.host = os.environ["RECIPE_RECEIVER"]
analytics.outbox_path = os.environ["RECIPE_OUTBOX"]
HELD = os.environ["RECIPE_HELD"]

# At import: with --preload, in gunicorn's master, before the workers are forked.
assert analytics.track("master", "Preloaded", {"pid": os.getpid()})[0]


def hold(n, message):
    # Tracked, not answered: tell the test, then wait for its SIGKILL.
    note = os.path.join(HELD, str(n))
    with open(note + ".tmp", "w") as file:
        json.dump({"pid": os.getpid(), "messageId": message["messageId"]}, file)
    os.replace(note + ".tmp", note + ".json")
    time.sleep(20)  # killed long before; if not, the test says so


def app(environ, start_response):
    query = {key: values[0] for key, values in parse_qs(environ["QUERY_STRING"]).items()}
    n, attempt = int(query["n"]), int(query["attempt"])
    ok, message = analytics.track("web", "Request", {"n": n, "attempt": attempt})
    if not ok:
        start_response("500 Internal Server Error", [("Content-Length", "0")])
        return [b""]
    if "hold" in query:
        hold(n, message)
    body = json.dumps({"pid": os.getpid(), "messageId": message["messageId"]}).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""

REQUESTS = 500
# Midway, these requests track and then wait to be killed: three of the four
# workers are caught between track() and their answer, while the fourth goes
# on serving the other driver thread and is killed wherever it happens to be.
HELD = (250, 251, 252)


def start_gunicorn(tmp_path: Path, receiver_url: str) -> tuple[subprocess.Popen[bytes], Path]:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "held").mkdir()
    log = tmp_path / "gunicorn.log"
    env = dict(
        python_env(),
        RECIPE_RECEIVER=receiver_url,
        RECIPE_OUTBOX=str(tmp_path / "outbox.sqlite3"),
        RECIPE_HELD=str(tmp_path / "held"),
    )
    command = [
        *(sys.executable, "-m", "gunicorn", "--preload", "--workers", "4"),
        *("--worker-class", "sync", "--bind", "127.0.0.1:0", "--chdir", str(tmp_path)),
        # gunicorn 27 opens a control socket under ~/.gunicorn by default, shared by every run.
        *("--no-control-socket", "--graceful-timeout", "20", "app:app"),
    ]
    with log.open("wb") as stderr:
        master = subprocess.Popen(
            command, cwd=tmp_path, env=env, stderr=stderr, start_new_session=True
        )
    return master, log


def listening_url(master: subprocess.Popen[bytes], log: Path) -> str:
    """The port gunicorn took (bound to port 0: no race for a free one), from its log."""

    def port() -> str | None:
        assert master.poll() is None, log.read_text()[-3000:]
        found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log.read_text())
        return found and found.group(1)

    url = f"http://127.0.0.1:{wait_until(port, 30, 'gunicorn to listen')}"
    wait_until(lambda: four_workers(master.pid), 30, "gunicorn's four workers")
    return url


def four_workers(master_pid: int) -> list[int] | None:
    workers = children_of(master_pid)
    return workers if len(workers) == 4 else None


class Driver:
    """Sends /?n=N&attempt=A until each n gets a 200, as a client that retries would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.sent: set[tuple[int, int]] = set()
        self.stopped = threading.Event()  # a failed test stops retrying at once
        self.deadline = time.monotonic() + 90

    def acknowledge(self, n: int) -> dict[str, Any]:
        attempt = 0
        while not self.stopped.is_set() and time.monotonic() < self.deadline:
            hold = "&hold=1" if n in HELD and attempt == 0 else ""
            self.sent.add((n, attempt))
            try:
                with self.opener.open(
                    f"{self.url}/?n={n}&attempt={attempt}{hold}", timeout=30
                ) as r:
                    return dict(json.load(r), n=n, attempt=attempt)
            except (OSError, http.client.HTTPException, ValueError):
                attempt += 1
                time.sleep(0.05)  # its worker was killed: the master starts another
        raise TimeoutError(f"request {n} never answered 200")


def held_requests(held_dir: Path) -> dict[int, dict[str, Any]]:
    return {int(p.stem): json.loads(p.read_text()) for p in held_dir.glob("*.json")}


def drive_and_kill(
    driver: Driver, master_pid: int, receiver, held_dir: Path, killed: threading.Event
) -> tuple[list[dict[str, Any]], list[int]]:
    """All requests, from four threads; once the held ones wait, SIGKILL every worker at once."""
    pool = ThreadPoolExecutor(4)
    try:
        futures = [pool.submit(driver.acknowledge, n) for n in range(REQUESTS)]
        wait_until(lambda: len(held_requests(held_dir)) == len(HELD), 60, "held requests")
        # The master delivers the workers' events while it runs, not only at the end.
        wait_until(lambda: accepted_ids(receiver, "Request"), 30, "a first delivery")
        victims = children_of(master_pid)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed.set()
        acks = [future.result(timeout=90) for future in futures]
    finally:
        # On a failure, stop retrying and do not wait: the caller kills gunicorn,
        # which ends the requests still open.
        driver.stopped.set()
        pool.shutdown(wait=False, cancel_futures=True)
    return acks, victims


def stop_gracefully(master: subprocess.Popen[bytes], log: Path) -> None:
    master.send_signal(signal.SIGTERM)
    assert master.wait(timeout=40) == 0, log.read_text()[-3000:]


def test_gunicorn_preload_workers_killed_midway_lose_nothing(receiver, tmp_path: Path) -> None:
    killed = threading.Event()  # the master uploads quickly until then
    stopped = threading.Event()  # and gets no answer from then until it has stopped
    receiver.responder = SlowDownAtTheKill(
        tmp_path / "arrivals", killed.is_set, before=0.0, released=stopped
    )
    master, log = start_gunicorn(tmp_path, receiver.url)
    try:
        driver = Driver(listening_url(master, log))
        acks, victims = drive_and_kill(driver, master.pid, receiver, tmp_path / "held", killed)
        respawned = wait_until(lambda: four_workers(master.pid), 30, "four workers again")
        stop_gracefully(master, log)
    finally:
        kill_session(master)
        stopped.set()
    receiver.responder = lambda request: Reply()  # the next run meets a quick server
    restart = restart_and_deliver(receiver.url, tmp_path / "outbox.sqlite3")

    # The kill happened, midway, to all four workers; the master replaced them.
    held = held_requests(tmp_path / "held")
    assert len(victims) == 4 and {h["pid"] for h in held.values()} < set(victims)
    assert len(respawned) == 4 and not set(respawned) & set(victims)
    by_n = {ack["n"]: ack for ack in acks}
    assert sorted(by_n) == list(range(REQUESTS))
    assert all(by_n[n]["attempt"] >= 1 and by_n[n]["pid"] not in victims for n in HELD)

    # Every event whose track() returned arrived: each acknowledged request's,
    # and those the killed workers had tracked without answering.
    arrived = accepted_ids(receiver, "Request")
    assert {ack["messageId"] for ack in acks} <= arrived
    assert {h["messageId"] for h in held.values()} <= arrived
    messages = received(receiver, "Request")
    names = {(m["properties"]["n"], m["properties"]["attempt"]) for m in messages}
    assert names <= driver.sent  # and nothing the driver did not ask for
    assert {n for n, _ in names} == set(range(REQUESTS))
    assert_one_message_id_per_call(
        messages, lambda m: (m["properties"]["n"], m["properties"]["attempt"])
    )

    # What the master tracked at import, before forking, arrived too (under one id).
    preloaded = received(receiver, "Preloaded")
    assert {m["properties"]["pid"] for m in preloaded} == {master.pid}
    assert len({m["messageId"] for m in preloaded}) == 1
    assert {m["messageId"] for m in preloaded} <= accepted_ids(receiver, "Preloaded")

    # The graceful stop left a backlog, and a batch on the wire: the restart
    # delivered them, the batch again, under the same ids (checked above).
    assert restart["sent"] > 0
    assert max(collections.Counter(m["messageId"] for m in messages).values()) >= 2


# -- a multiprocessing fork Pool -------------------------------------------------------

POOL_JOB = """
import json, multiprocessing, os, signal, sys, time
import outbox_analytics as analytics

EVENTS, WORK, STALL = 5, 0.02, 1.5
# Shared with the workers, which are forked after they are made.
freeze = parked = PARKED = TASKS = None


def task(number, attempt):
    ids = []
    for i in range(EVENTS):
        properties = {"task": number, "attempt": attempt, "i": i}
        ok, message = analytics.track("worker", "Task", properties)
        assert ok
        ids.append(message["messageId"])
    if freeze.value:
        park(number, attempt, ids)
    time.sleep(WORK)  # the task's own work: tracking is not all a job does
    return number, attempt, ids


def park(number, attempt, ids):
    # Tracked (durable: the calls returned), never to answer: note it, wait to be killed.
    note = os.path.join(PARKED, f"{number}-{attempt}")
    with open(note + ".tmp", "w") as file:
        json.dump({"pid": os.getpid(), "ids": ids}, file)
    os.replace(note + ".tmp", note + ".json")
    with parked.get_lock():
        parked.value += 1
    time.sleep(30)  # killed long before; if not, the test says so


def wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def collect(pool, outstanding, acked, until, resubmit=False):
    # The results; with `resubmit`, tasks whose result never comes (their worker
    # was killed: multiprocessing loses them) are submitted again, as a job would.
    last = time.monotonic()
    deadline = last + 120
    again = []
    while len(acked) < until:
        for number, (attempt, result) in list(outstanding.items()):
            if result.ready():
                acked[number] = result.get()
                del outstanding[number]
                last = time.monotonic()
        if resubmit and time.monotonic() - last > STALL:
            for number, (attempt, _) in list(outstanding.items()):
                outstanding[number] = (attempt + 1, pool.apply_async(task, (number, attempt + 1)))
                again.append([number, attempt + 1])
            last = time.monotonic()
        assert time.monotonic() < deadline, "the pool made no progress"
        time.sleep(0.005)
    return again


def arrivals(path):
    try:
        return int(open(path).read() or 0)
    except (OSError, ValueError):
        return 0


def kill_workers_midway(pool, outstanding, acked, arrivals_file):
    collect(pool, outstanding, acked, TASKS // 2)
    # A second batch reached the receiver: the first was answered (one uploader
    # sends one batch at a time). The workers' events are delivered while the job runs.
    assert wait_until(lambda: arrivals(arrivals_file) >= 2, 30), "nothing delivered"
    # Every worker parks inside its next task: none holds the pool's queue
    # locks when killed (a worker killed in get() would wedge the others).
    freeze.value = 1
    assert wait_until(lambda: parked.value == 4, 30), "the workers did not park"
    freeze.value = 0
    victims = [process.pid for process in pool._pool]
    # Kill as a batch reaches the receiver, whose answer is slow: the worker
    # uploading dies with it on the wire, and the next uploader sends it again.
    seen = arrivals(arrivals_file)
    on_wire = wait_until(lambda: arrivals(arrivals_file) > seen, 15)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    open(arrivals_file + ".killed", "w").close()  # the receiver answers very slowly from now on
    return victims, on_wire


def main(tasks, url, path, arrivals_file, parked_dir, out):
    global freeze, parked, PARKED, TASKS
    TASKS = int(tasks)
    analytics.write_key = "test-write-key"
    analytics.host = url
    analytics.outbox_path = path  # and nothing tracked here: a worker uploads
    context = multiprocessing.get_context("fork")
    freeze, parked, PARKED = context.RawValue("b", 0), context.Value("i", 0), parked_dir
    pool = context.Pool(4)
    try:
        outstanding = {n: (0, pool.apply_async(task, (n, 0))) for n in range(TASKS)}
        acked = {}
        victims, on_wire = kill_workers_midway(pool, outstanding, acked, arrivals_file)
        again = collect(pool, outstanding, acked, TASKS, resubmit=True)
        replacements = [process.pid for process in pool._pool]
    finally:
        pool.terminate()  # lost tasks stay in its cache: close() and join() would wait forever
        pool.join()
    assert analytics.track("parent", "Job Finished", {"tasks": len(acked)})[0]
    report = {"acked": list(acked.values()), "victims": victims, "on_wire": on_wire,
              "replacements": replacements, "resubmitted": again}
    with open(out, "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
"""

POOL_TASKS = 300  # of five events each


def run_pool_job(tmp_path: Path, receiver_url: str) -> dict[str, Any]:
    (tmp_path / "job.py").write_text(textwrap.dedent(POOL_JOB))
    (tmp_path / "parked").mkdir()
    files = ("outbox.sqlite3", "arrivals", "parked", "report.json")
    args = [str(POOL_TASKS), receiver_url, *(str(tmp_path / name) for name in files)]
    job = subprocess.Popen(
        [sys.executable, str(tmp_path / "job.py"), *args],
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = job.communicate(timeout=150)
    finally:
        kill_session(job)
    assert job.returncode == 0, err[-3000:]
    report: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())
    return report


def parked_tasks(parked_dir: Path) -> Iterator[tuple[int, int, dict[str, Any]]]:
    for note in parked_dir.glob("*.json"):
        number, attempt = map(int, note.stem.split("-"))
        yield number, attempt, json.loads(note.read_text())


def task_name(message: dict[str, Any]) -> tuple[int, int, int]:
    properties = message["properties"]
    return properties["task"], properties["attempt"], properties["i"]


def test_fork_pool_workers_killed_midway_lose_nothing(receiver, tmp_path: Path) -> None:
    # Slow from the start (0.3 s an answer): the workers track faster than one
    # of them delivers, so the one uploading has a batch on the wire when killed.
    killed = (tmp_path / "arrivals.killed").exists
    receiver.responder = SlowDownAtTheKill(tmp_path / "arrivals", killed, before=0.3)
    report = run_pool_job(tmp_path, receiver.url)
    delivered_by_the_job = accepted_ids(receiver, "Task")
    receiver.responder = lambda request: Reply()  # the next run meets a quick server
    restart = restart_and_deliver(receiver.url, tmp_path / "outbox.sqlite3")

    # The kill happened midway, to the four workers, with a batch on the wire;
    # the pool replaced them and the job submitted the lost tasks again.
    parked = list(parked_tasks(tmp_path / "parked"))
    assert len(report["victims"]) == 4 and {p["pid"] for *_, p in parked} == set(report["victims"])
    assert not set(report["replacements"]) & set(report["victims"])
    assert report["on_wire"], "no batch reached the receiver while the workers were parked"
    assert {(n, a + 1) for n, a, _ in parked} <= {tuple(r) for r in report["resubmitted"]}
    assert sorted(number for number, _, _ in report["acked"]) == list(range(POOL_TASKS))

    # Every event whose track() returned arrived, the parked tasks' included.
    arrived = accepted_ids(receiver, "Task")
    assert {mid for *_, ids in report["acked"] for mid in ids} <= arrived
    assert {mid for *_, p in parked for mid in p["ids"]} <= arrived
    messages = received(receiver, "Task")
    assert {number for number, _, _ in map(task_name, messages)} == set(range(POOL_TASKS))
    assert_one_message_id_per_call(messages, task_name)
    # The job delivered while it ran; the batch on the wire at the kill was
    # sent again (at least once), same ids; the restart delivered the backlog.
    assert delivered_by_the_job
    assert max(collections.Counter(m["messageId"] for m in messages).values()) >= 2
    assert restart["sent"] > 0
    assert accepted_ids(receiver, "Job Finished")
