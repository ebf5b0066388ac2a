"""A real uWSGI serving an app that tracks at import and on every request.

uWSGI's default mode imports the app in the master, then forks the workers
with a C fork(): no Python fork hook runs. A thread of ours started in the
master (by a track at import, or by a backlog the client found pending) held
the GIL, or one of our locks, in the workers it forked: they hung at their
first Python call, and `uwsgi --stop` waited out its 60 s mercy and killed
them. Each scenario here runs uWSGI on 127.0.0.1 with the test receiver, a
backlog left pending in the outbox before the start and a track at import,
drives a bounded number of HTTP requests, and checks:

- no worker hangs: every request is answered 200 within its timeout (a 200
  means the request's track() returned), and `uwsgi --stop` ends it all
  within a bound, with exit code 0 (no mercy waited out, no SIGKILL);
- every acknowledged event reaches the receiver (while uWSGI runs when it has
  threads; without threads, at the workers' exit or by a later drain);
- no two distinct events share a messageId (each call arrives under one id).

A hang shows as a failure within seconds (request timeouts, a bounded stop),
never as a hung test run; a failed test kills what it started.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from outbox_analytics import Client

from .test_recipes import assert_one_message_id_per_call, kill_session, live_processes, wait_until


def _find_uwsgi() -> str | None:
    """The uwsgi of this interpreter's environment (pip puts it beside python), else on PATH."""
    beside = Path(sys.executable).with_name("uwsgi")
    return str(beside) if beside.is_file() else shutil.which("uwsgi")


UWSGI = _find_uwsgi()
# A uWSGI older than 2.0.27 (which turned threads on by default), to run the
# threads-off scenario for real: `pip install uwsgi==2.0.26` in another venv.
OLD_UWSGI = os.environ.get("OUTBOX_ANALYTICS_TEST_OLD_UWSGI")

pytestmark = [
    pytest.mark.skipif(
        UWSGI is None, reason="uWSGI is not installed (pip install uwsgi: the test extras have it)"
    ),
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="finds uWSGI's processes through /proc"
    ),
]

REPO = Path(__file__).resolve().parents[1]
WRITE_KEY = "test-write-key"
BACKLOG = 30  # events left pending in the outbox before uWSGI starts
REQUEST_TIMEOUT = 5.0  # a request not answered by then: a hung worker
STOP_BOUND = 15.0  # uWSGI's own mercy for a stuck worker is 60 s
THREADS_OFF_WARNING = "uWSGI runs this process without Python threads"

APP = """
import json
import logging
import os
import sys
import uuid
from urllib.parse import parse_qs

if os.environ.get("TEST_THREADS_OFF"):
    # uWSGI 2.0.27 and later always run Python with threads: make this one
    # say it has none, as an older uWSGI started without --enable-threads does.
    import uwsgi

    uwsgi.has_threads = 0

logging.basicConfig(stream=sys.stderr, format="[pid %(process)d] %(levelname)s %(message)s")

HOOKS = os.environ.get("TEST_HOOKS")  # uwsgidecorators' import: before or after our first track


def note(what):
    with open(os.environ["TEST_NOTES"], "a") as file:
        file.write(f"{what} {os.getpid()}\\n")


if HOOKS == "before":
    import uwsgidecorators

    @uwsgidecorators.postfork
    def decorated():
        note("decorated")


import outbox_analytics as analytics

if os.environ.get("TEST_EXIT_BUDGET"):
    # Without threads, the workers deliver at their exit: a loaded test
    # machine may need more than the one second users get.
    import outbox_analytics.servers

    outbox_analytics.servers.EXIT_BUDGET = float(os.environ["TEST_EXIT_BUDGET"])

analytics.write_key = "test-write-key"
analytics.host = os.environ["TEST_RECEIVER"]
analytics.outbox_path = os.environ["TEST_OUTBOX"]

# At import: in the master (default mode), or in each worker (--lazy-apps).
BOOT = uuid.uuid4().hex
assert analytics.track("app", "Imported", {"boot": BOOT, "pid": os.getpid()})[0]

if HOOKS == "after":
    import uwsgidecorators  # sets uwsgi.post_fork_hook anew, to run its @postfork list

    @uwsgidecorators.postfork
    def decorated():
        note("decorated")


if HOOKS:
    import uwsgi

    wrapped = uwsgi.post_fork_hook  # the application's hook (uwsgidecorators'), wrapped by hand

    def wrapper():
        wrapped()
        note("wrapped")

    uwsgi.post_fork_hook = wrapper


def application(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    n = int(query["n"][0])
    ok, message = analytics.track("web", "Request", {"n": n, "pid": os.getpid()})
    if not ok:
        start_response("500 Internal Server Error", [("Content-Length", "0")])
        return [b""]
    body = json.dumps({"n": n, "pid": os.getpid(), "messageId": message["messageId"]})
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode()]
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """One uWSGI instance (a master), its log, and its processes (a session of their own)."""

    def __init__(
        self, tmp_path: Path, receiver_url: str, options: tuple[str, ...], binary: str, **env: str
    ) -> None:
        self.binary = binary
        self.log = tmp_path / "uwsgi.log"
        self.pidfile = tmp_path / "uwsgi.pid"
        self.url = f"http://127.0.0.1:{free_port()}"
        (tmp_path / "app.py").write_text(textwrap.dedent(APP))
        # uWSGI takes UWSGI_* variables as options: a developer's own stay out.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("UWSGI_")}
        for name in ("OUTBOX_ANALYTICS_DISABLED", "OUTBOX_ANALYTICS_DISABLED_BY_PYTEST"):
            self.env.pop(name, None)  # the app stores and sends for real
        self.env.update(
            env,
            # The repository, and this environment's packages for a uWSGI built elsewhere.
            PYTHONPATH=os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]]),
            TEST_RECEIVER=receiver_url,
            TEST_OUTBOX=str(tmp_path / "outbox.sqlite3"),
        )
        command = [
            *(binary, "--master", "--http-socket", self.url.removeprefix("http://")),
            *("--wsgi-file", str(tmp_path / "app.py"), "--pidfile", str(self.pidfile), *options),
        ]
        with self.log.open("wb") as out:
            self.master = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> list[int]:
        return live_processes(lambda fields: int(fields[1]) == self.master.pid)

    def wait_for_workers(self, count: int, but: Iterable[int] = ()) -> list[int]:
        """`count` workers, none of them in `but` (those a reload replaced)."""
        old = set(but)

        def ready() -> list[int] | None:
            log = self.log_text()
            assert self.master.poll() is None and "unable to load app" not in log, log[-3000:]
            workers = [pid for pid in self.workers() if pid not in old]
            return workers if len(workers) == count else None

        found: list[int] = wait_until(ready, 30, f"{count} uWSGI workers")
        return found

    def threads_of_master(self) -> int:
        return len(os.listdir(f"/proc/{self.master.pid}/task"))

    def stop(self) -> None:
        """`uwsgi --stop` (SIGINT to the master): all of it ends within the bound, exit code 0."""
        subprocess.run([self.binary, "--stop", str(self.pidfile)], env=self.env, timeout=10)
        try:
            code = self.master.wait(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"uWSGI still running {STOP_BOUND}s after --stop: a worker hangs")
        assert code == 0, self.log_text()[-3000:]
        left = live_processes(lambda fields: int(fields[3]) == self.master.pid)
        assert left == [], f"uWSGI processes left behind: {left}"

    def kill(self) -> None:
        kill_session(self.master)


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    """The app's outbox, with a backlog an earlier run left pending: found by the app's client."""
    path = tmp_path / "outbox.sqlite3"
    client = Client(WRITE_KEY, outbox_path=str(path), upload=False)
    with client.batch():
        for n in range(BACKLOG):
            assert client.track("earlier-run", "Backlog", {"n": n})[0]
    client.shutdown()
    return path


@pytest.fixture
def start_uwsgi(tmp_path: Path, receiver, outbox: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*options: str, binary: str | None = None, **env: str) -> Server:
        assert UWSGI is not None
        server = Server(tmp_path, receiver.url, options, binary or UWSGI, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.master.poll() is None:
            print(server.log_text()[-5000:])  # shown with the failure
        server.kill()  # nothing is left running after a failure


def drive(url: str, numbers: range, threads: int = 4) -> list[dict[str, Any]]:
    """GET /?n=N for each number, from a few threads; the first failure stops them all.

    Every request must be answered 200 within REQUEST_TIMEOUT: a worker that
    hangs fails the test here, within seconds.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    failed = threading.Event()

    def get(n: int) -> dict[str, Any]:
        if failed.is_set():
            raise RuntimeError("not sent: an earlier request failed")
        try:
            with opener.open(f"{url}/?n={n}", timeout=REQUEST_TIMEOUT) as response:
                answer: dict[str, Any] = json.load(response)
                return answer
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failed.set()
            raise AssertionError(f"request {n} not answered 200: {exc!r}") from exc

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(get, n) for n in numbers]
        errors = [future.exception() for future in futures]
    failed_requests = [error for error in errors if isinstance(error, AssertionError)]
    not_sent = sum(isinstance(error, RuntimeError) for error in errors)
    assert not failed_requests, (
        f"{len(failed_requests)} requests failed ({failed_requests[0]}), {not_sent} not sent"
    )
    return [future.result() for future in futures]


# -- what the receiver got ------------------------------------------------------------


def call_name(message: dict[str, Any]) -> tuple[Any, ...]:
    """Which call made a message: one name per event tracked."""
    properties = message.get("properties", {})
    return message.get("event"), properties.get("boot"), properties.get("n")


def check_delivery(receiver, answers: list[dict[str, Any]], imports: int, timeout: float) -> None:
    """Each acknowledged request's event, the backlog's and each import's arrived (a 2xx).

    Each call arrives under one messageId, and no messageId names two calls
    (a delivery repeated after a failure keeps its id).
    """
    wanted = {answer["messageId"] for answer in answers}

    def names() -> collections.Counter[str]:
        return collections.Counter(
            event for event, *_ in {call_name(m) for m in receiver.accepted()}
        )

    def arrived() -> bool:
        counts = names()
        done = counts["Backlog"] == BACKLOG and counts["Imported"] >= imports
        return done and wanted <= {m["messageId"] for m in receiver.accepted()}

    with contextlib.suppress(AssertionError):
        wait_until(arrived, timeout, "every event")
    missing = wanted - {m["messageId"] for m in receiver.accepted()}
    assert not missing, f"{len(missing)} of {len(wanted)} acknowledged requests' events missing"
    counts = names()
    assert (counts["Backlog"], counts["Imported"]) == (BACKLOG, imports), counts
    everything = [m for request in receiver.requests for m in request.batch]
    assert_one_message_id_per_call(everything, call_name)


def pids(answers: list[dict[str, Any]]) -> set[int]:
    return {answer["pid"] for answer in answers}


# -- the scenarios ----------------------------------------------------------------------


def test_default_mode_app_loaded_in_the_master(start_uwsgi, receiver) -> None:
    """Four workers forked from a master that tracked at import and found a backlog.

    `--enable-threads` is uWSGI's default since 2.0.27, and needed before it.
    """
    server = start_uwsgi("--processes", "4", "--enable-threads")
    workers = server.wait_for_workers(4)
    answers = drive(server.url, range(200))
    assert pids(answers) <= set(workers)
    # Sent by the workers while uWSGI runs: the master's event and the backlog too.
    check_delivery(receiver, answers, imports=1, timeout=20)
    assert server.threads_of_master() == 1  # no thread of ours in the master
    server.stop()


def test_lazy_apps_with_threaded_workers(start_uwsgi, receiver) -> None:
    """--lazy-apps: the app is imported in each worker, after the fork; --threads 2 each."""
    server = start_uwsgi("--processes", "2", "--lazy-apps", "--threads", "2")
    server.wait_for_workers(2)
    answers = drive(server.url, range(100))
    check_delivery(receiver, answers, imports=2, timeout=20)
    server.stop()


def test_max_requests_recycles_workers(start_uwsgi, receiver) -> None:
    """Workers replaced every 20 requests: each one forked anew from the master, as it runs."""
    server = start_uwsgi(
        *("--processes", "2", "--enable-threads", "--max-requests", "20"),
        *("--min-worker-lifetime", "0"),
    )
    server.wait_for_workers(2)
    answers = drive(server.url, range(80))
    assert len(pids(answers)) >= 4, "the workers were not recycled"
    check_delivery(receiver, answers, imports=1, timeout=20)
    assert server.threads_of_master() == 1
    server.stop()


def test_reload_with_enable_threads(start_uwsgi, receiver) -> None:
    """`uwsgi --reload` (SIGHUP): the master re-executes itself and imports the app again."""
    server = start_uwsgi("--processes", "2", "--enable-threads")
    first = server.wait_for_workers(2)
    answers = drive(server.url, range(60))
    subprocess.run([server.binary, "--reload", str(server.pidfile)], env=server.env, timeout=10)
    server.wait_for_workers(2, but=first)
    answers += drive(server.url, range(60, 120))
    assert len(pids(answers)) == 4
    check_delivery(receiver, answers, imports=2, timeout=20)
    assert server.threads_of_master() == 1
    server.stop()


@pytest.mark.parametrize("order", ["before", "after"])
def test_the_applications_post_fork_hooks_keep_running(
    start_uwsgi, receiver, tmp_path: Path, order: str
) -> None:
    """The app's own post-fork hooks run once in each worker, and so does ours.

    uwsgidecorators' `@postfork`, imported before or after our first track
    (its import replaces `uwsgi.post_fork_hook`), then a hook that wraps the
    one it read; ours starts the uploader.
    """
    notes = tmp_path / "notes"
    server = start_uwsgi(
        "--processes", "2", "--enable-threads", TEST_HOOKS=order, TEST_NOTES=str(notes)
    )
    workers = server.wait_for_workers(2)
    # No request at all: the backlog and the import's event are sent by a
    # worker whose uploader our hook started right after the fork.
    check_delivery(receiver, [], imports=1, timeout=20)
    ran = collections.Counter(tuple(line.split()) for line in notes.read_text().splitlines())
    expected = {(what, str(pid)): 1 for what in ("decorated", "wrapped") for pid in workers}
    assert ran == expected
    server.stop()


@pytest.mark.parametrize("kind", ["told", "old"])
def test_threads_off(start_uwsgi, receiver, tmp_path: Path, kind: str) -> None:
    """Without Python threads: no thread, one warning per process, delivery at exit, then drain.

    uWSGI 2.0.27 and later always run Python with threads ("told": the app
    makes uWSGI's module say it has none); "old" runs a uWSGI before 2.0.27
    without --enable-threads, where a thread runs only while a request does.
    """
    if kind == "old" and not OLD_UWSGI:
        pytest.skip(
            "set OUTBOX_ANALYTICS_TEST_OLD_UWSGI to a uWSGI before 2.0.27"
            " (pip install uwsgi==2.0.26 in another venv) to run it without threads for real"
        )
    if kind == "old":
        server = start_uwsgi("--processes", "2", binary=OLD_UWSGI, TEST_EXIT_BUDGET="10")
    else:
        server = start_uwsgi("--processes", "2", TEST_EXIT_BUDGET="10", TEST_THREADS_OFF="1")
    workers = server.wait_for_workers(2)
    answers = drive(server.url, range(60))
    time.sleep(1.0)  # a thread, had one started, would have sent by now
    assert receiver.requests == [], "something was sent while uWSGI ran without threads"

    # The warning, once per process: the master (at the import's track) and each worker.
    warned = re.findall(rf"\[pid (\d+)\] WARNING (.*{THREADS_OFF_WARNING}.*)", server.log_text())
    by_pid = collections.Counter(int(pid) for pid, _ in warned)
    assert set(by_pid) == {server.master.pid, *workers}, by_pid
    assert set(by_pid.values()) == {1}, by_pid
    assert all("--enable-threads" in text and "drain" in text for _, text in warned)

    server.stop()  # the workers deliver at their exit
    at_exit = {m["messageId"] for m in receiver.accepted()}
    assert at_exit, "nothing was delivered at the workers' exit"

    drain = subprocess.run(
        [
            *(sys.executable, "-m", "outbox_analytics", "drain", str(tmp_path / "outbox.sqlite3")),
            *("--write-key", WRITE_KEY, "--host", receiver.url, "--timeout", "30"),
        ],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drain.returncode == 0, drain.stderr
    check_delivery(receiver, answers, imports=1, timeout=5)
