"""The README's Celery recipe runs for real: a prefork worker whose pool processes are recycled.

With --max-tasks-per-child, billiard ends each pool process through
os._exit() after its tasks: neither atexit nor multiprocessing's finalizers
run there, only Celery's worker_process_shutdown signal. Without exit
delivery at that signal, every short-lived process took the upload lease,
sent the oldest batch and died before the answer: the next one sent the same
batch again (15 to 17 copies of each of its events), and nothing after it
went out while the worker was busy.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .receiver import Reply
from .test_recipes import kill_session, wait_until

pytest.importorskip("celery")  # (the test extra has it)

REPO = Path(__file__).resolve().parents[1]
TASKS, EVENTS = 4, 5

TASKS_MODULE = """
import os
from pathlib import Path

from celery import Celery

BROKER = Path(os.environ["RECIPE_BROKER"])

app = Celery("tasks", broker="filesystem://")
app.conf.broker_transport_options = {
    "data_folder_in": str(BROKER), "data_folder_out": str(BROKER),
    "control_folder": str(BROKER.parent / "control"),
}
app.conf.worker_hijack_root_logger = False


def configured():
    import outbox_analytics as analytics

    analytics.write_key = "test-write-key"
    analytics.host = os.environ["RECIPE_RECEIVER"]
    analytics.outbox_path = os.environ["RECIPE_OUTBOX"]
    return analytics


if not os.environ.get("RECIPE_IMPORT_IN_TASK"):
    configured()  # in the worker's main process, before its pool forks


@app.task
def work(number):
    analytics = configured()
    ids = [analytics.track("worker", "Task", {"task": number, "i": i})[1]["messageId"]
           for i in range(5)]  # EVENTS
    done = BROKER.parent / "done"
    (done / f"{number}.tmp").write_text("\\n".join(ids))
    (done / f"{number}.tmp").rename(done / f"{number}.ids")
"""


@pytest.mark.parametrize("imported", ["at the top", "in the task"])
def test_recycled_celery_pool_processes_send_each_batch_once(
    receiver, tmp_path: Path, imported: str
) -> None:
    receiver.responder = lambda request: Reply(delay=0.3)  # well within the 1 s exit budget
    broker, done = tmp_path / "broker", tmp_path / "done"
    broker.mkdir()
    done.mkdir()
    (tmp_path / "tasks.py").write_text(TASKS_MODULE)
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}",
        RECIPE_RECEIVER=receiver.url,
        RECIPE_OUTBOX=str(tmp_path / "outbox.sqlite3"),
        RECIPE_BROKER=str(broker),
        RECIPE_IMPORT_IN_TASK="1" if imported == "in the task" else "",
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork",
         "--concurrency=1", "--max-tasks-per-child=1", "--loglevel=WARNING",
         "--without-heartbeat", "--without-mingle", "--without-gossip"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        from celery import Celery

        sender = Celery("tasks", broker="filesystem://")  # sends by name: no import of tasks
        sender.conf.broker_transport_options = {
            "data_folder_in": str(broker), "data_folder_out": str(broker),
            "control_folder": str(tmp_path / "control"),
        }  # fmt: skip
        for number in range(TASKS):
            sender.send_task("tasks.work", args=[number])
        wait_until(lambda: len(list(done.glob("*.ids"))) == TASKS, 90, "the tasks")
        tracked = {i for f in done.glob("*.ids") for i in f.read_text().split()}
        wait_until(lambda: tracked <= accepted(receiver), 30, "their events")
        time.sleep(1.5)  # what a process recycled last might still send again
        worker.send_signal(signal.SIGTERM)  # a warm shutdown
        _, err = worker.communicate(timeout=30)
    finally:
        kill_session(worker)
    assert worker.returncode == 0, err.decode()[-3000:]
    copies = collections.Counter(m["messageId"] for r in receiver.requests for m in r.batch)
    assert set(copies) == tracked and len(tracked) == TASKS * EVENTS
    # Each process sent the batch it had on the wire before it ended (on a
    # starved machine, one may have outlived the 1 s exit budget: once).
    assert sum(copies.values()) <= len(tracked) + EVENTS, copies.most_common(3)


def accepted(receiver) -> set[str]:
    return {m["messageId"] for m in receiver.accepted()}
