"""multiprocessing pools: what workers track is delivered by the time the job ends.

Fork workers leave through os._exit() (no atexit); short-lived workers
(maxtasksperchild=1) each start and stop; the parent may have tracked
nothing. Real pools, real processes, the test receiver on 127.0.0.1.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

JOB = """
import sys
import outbox_analytics as analytics
import outbox_analytics.client

def configure(url, path):
    # What is tested is that the exit hooks run and deliver, in every kind of
    # process; a loaded test machine may need more than the one second users get.
    analytics.client.EXIT_BUDGET = 10.0
    analytics.write_key = "test-write-key"
    analytics.host = url
    analytics.outbox_path = path

def task(number):
    for n in range(5):
        ok, _ = analytics.track("worker", "Task", {"task": number, "n": n})
        assert ok
    return number

def main(method, url, path, tasks, per_child, parent_tracks):
    import multiprocessing
    configure(url, path)
    if parent_tracks:
        analytics.track("parent", "Start")
    context = multiprocessing.get_context(method)
    pool = context.Pool(4, initializer=configure, initargs=(url, path),
                        maxtasksperchild=per_child or None)
    assert sorted(pool.map(task, range(tasks), chunksize=1)) == list(range(tasks))
    pool.close()
    pool.join()

if __name__ == "__main__":
    method, url, path, tasks, per_child, parent_tracks = sys.argv[1:]
    main(method, url, path, int(tasks), int(per_child), parent_tracks == "yes")
"""


def run_job(tmp_path: Path, receiver_url: str, *args: str) -> None:
    (tmp_path / "job.py").write_text(textwrap.dedent(JOB))
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{tmp_path}")
    outbox = str(tmp_path / "outbox.sqlite3")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "job.py"), args[0], receiver_url, outbox, *args[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def delivered(receiver) -> collections.Counter[tuple[int, int]]:
    return collections.Counter(
        (m["properties"]["task"], m["properties"]["n"])
        for r in receiver.requests
        for m in r.batch
        if m["event"] == "Task"
    )


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("parent_tracks", ["yes", "no"])
def test_events_of_pool_workers_are_delivered_when_the_job_ends(
    receiver, tmp_path: Path, method: str, parent_tracks: str
) -> None:
    run_job(tmp_path, receiver.url, method, "200", "0", parent_tracks)
    counts = delivered(receiver)
    assert set(counts) == {(task, n) for task in range(200) for n in range(5)}
    ids = [m["messageId"] for r in receiver.requests for m in r.batch]
    assert len(ids) == len(set(ids)) or max(collections.Counter(ids).values()) <= 2


@pytest.mark.slow
def test_short_lived_workers_start_no_storm(receiver, tmp_path: Path) -> None:
    # 600 workers, each tracking and leaving: a storm (every worker's exit
    # waiting, sending or starting uploaders) shows long before that; 2,000
    # took a fifth of CI (about 100 s).
    run_job(tmp_path, receiver.url, "fork", "600", "1", "no")
    counts = delivered(receiver)
    assert set(counts) == {(task, n) for task in range(600) for n in range(5)}
    ids = collections.Counter(m["messageId"] for r in receiver.requests for m in r.batch)
    assert max(ids.values()) <= 2, ids.most_common(3)


FORK_WHILE_BUILDING = """
import os, signal, sys, threading
import outbox_analytics as analytics

analytics.write_key = "test-write-key"
analytics.host = sys.argv[1]
analytics.outbox_path = sys.argv[2]
# Another thread is inside the first module-level call, building the default
# client, at the moment of the fork: it holds the module's lock.
analytics._default.lock.acquire()
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a hang would end the child with SIGALRM
    ok = analytics.track("child", "First call in the child")[0]
    analytics.flush(timeout=10)
    os._exit(0 if ok else 1)
analytics._default.lock.release()
_, status = os.waitpid(pid, 0)
print(status, flush=True)
"""


def test_a_child_forked_while_the_default_client_is_built_does_not_hang(
    receiver, tmp_path: Path
) -> None:
    from .conftest import start_python

    process = start_python(FORK_WHILE_BUILDING, receiver.url, str(tmp_path / "o.sqlite3"))
    out, err = process.communicate(timeout=30)
    assert out.strip() == "0", err  # exit status 0: no SIGALRM, the event stored
    assert [m["event"] for m in receiver.accepted()] == ["First call in the child"]


WORKERS_ALONE = """
import multiprocessing, sys
from outbox_analytics import Client, exit_delivery
exit_delivery.EXIT_BUDGET = 10.0  # (a loaded test machine)
url, path = sys.argv[1:]
client = Client("test-write-key", host=url, outbox_path=path, upload_interval=60)

def task(number):
    for n in range(5):
        assert client.track("worker", "Task", {"task": number, "n": n})[0]
    return number

if __name__ == "__main__":
    pool = multiprocessing.get_context("fork").Pool(2)
    assert sorted(pool.map(task, range(4), chunksize=1)) == [0, 1, 2, 3]
    pool.close()
    pool.join()
    exit_delivery.turn_off()  # what arrives, the workers sent
"""


def test_fork_pool_workers_deliver_at_their_own_exit(receiver, tmp_path: Path) -> None:
    """A fork worker's exit delivery was registered with multiprocessing's finalizers
    in the fork hook, and multiprocessing cleared them right after: workers sent
    nothing at exit, and a parent that exited at once left it all to the next run."""
    result = subprocess.run(
        [sys.executable, "-c", WORKERS_ALONE, receiver.url, str(tmp_path / "o.db")],
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(delivered(receiver)) == {(task, n) for task in range(4) for n in range(5)}


IMPORTED_IN_THE_TASK = """
import multiprocessing, sys

def task(number):
    from outbox_analytics import Client, exit_delivery  # first import: in the worker

    exit_delivery.EXIT_BUDGET = 10.0  # (a loaded test machine)
    url, path = sys.argv[1:]
    client = Client("test-write-key", host=url, outbox_path=path, upload_interval=60)
    for n in range(5):
        assert client.track("worker", "Task", {"task": number, "n": n})[0]
    return number

if __name__ == "__main__":
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "fork"
    for start in ("fork", method):
        pool = multiprocessing.get_context(start).Pool(1, maxtasksperchild=1)
        assert sorted(pool.map(task, range(2), chunksize=1)) == [0, 1]
        pool.close()
        pool.join()
    assert "outbox_analytics" not in sys.modules  # what arrives, the workers sent
"""


def test_pool_workers_that_import_the_package_in_a_task_deliver_at_exit(
    receiver, tmp_path: Path
) -> None:
    """A worker that imported the package first in a task is no forked child of
    ours, and its exit delivery was never registered: it left through os._exit()
    with its events pending, and no line said so."""
    script = tmp_path / "job.py"  # a file: forkserver's workers import the main module
    script.write_text(IMPORTED_IN_THE_TASK)
    result = subprocess.run(
        [sys.executable, str(script), receiver.url, str(tmp_path / "o.db")],
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sent = delivered(receiver)
    assert set(sent) == {(task, n) for task in range(2) for n in range(5)}
    assert set(sent.values()) == {2}, sent  # once from each pool (same task numbers)
