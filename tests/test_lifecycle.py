"""Processes that die, exit, fork and share a file, delivering to a real server on 127.0.0.1."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from pathlib import Path

import pytest

from outbox_analytics import Client, exit_delivery
from outbox_analytics.store import Outbox

from .conftest import start_python
from .receiver import Received, Reply, SenderSpans

PRODUCER = """
import sys, time, tenacity
from outbox_analytics import Client

url, path, source, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = Client(
    "k", host=url, outbox_path=path, upload_size=10, upload_interval=0.05,
    max_retries=3, retry_wait=tenacity.wait_fixed(0.05), gzip=source == "first",
)
for n in range(count):
    client.track("user", "Numbered", {"n": n, "source": source})
print("stored", flush=True)
result = client.flush(timeout=float(sys.argv[5]) if len(sys.argv) > 5 else 30)
print("flushed", result.pending, flush=True)
if len(sys.argv) > 6:
    time.sleep(float(sys.argv[6]))
"""


def test_a_kill_during_an_upload_then_a_restart_delivers_everything(
    receiver, outbox_file: Path
) -> None:
    in_flight = threading.Event()

    def hang_on_the_third(request: Received) -> Reply:
        if len(receiver.requests) == 3:
            in_flight.set()
            return Reply(delay=3)  # answered after the sender is dead: lost on the wire
        return Reply()

    receiver.responder = hang_on_the_third
    first = start_python(PRODUCER, receiver.url, str(outbox_file), "k", "100")
    assert in_flight.wait(20)
    # Every event stored before the kill (tracking goes on while a batch hangs).
    assert first.stdout is not None and select.select([first.stdout], [], [], 20)[0]
    assert first.stdout.readline().strip() == "stored"
    first.send_signal(signal.SIGKILL)
    first.wait()
    hung_batch = [m["messageId"] for m in receiver.requests[2].batch]

    receiver.responder = lambda request: Reply()
    second = start_python(PRODUCER, receiver.url, str(outbox_file), "k", "0")
    out, err = second.communicate(timeout=60)
    assert "flushed 0" in out, err

    accepted = receiver.accepted()
    assert [m["properties"]["n"] for m in accepted] == list(range(100))  # once each, in order
    everything = [m["messageId"] for r in receiver.requests for m in r.batch]
    duplicated = {mid for mid in everything if everything.count(mid) > 1}
    assert duplicated == set(hung_batch)  # only the batch that was in flight, same ids
    with Outbox(outbox_file) as outbox:
        assert outbox.stats().pending == outbox.stats().inflight == 0


def test_two_processes_on_one_file_upload_one_at_a_time(receiver, outbox_file: Path) -> None:
    spans = SenderSpans(delay=0.02)
    receiver.responder = spans
    # The first holds the lease, then exits; the second must take over.
    first = start_python(PRODUCER, receiver.url, str(outbox_file), "first", "150", "30", "1")
    assert first.stdout is not None and first.stdout.readline().strip() == "stored"
    second = start_python(PRODUCER, receiver.url, str(outbox_file), "second", "150", "30")
    out_second, err_second = second.communicate(timeout=90)
    out_first, err_first = first.communicate(timeout=90)
    assert "flushed 0" in out_first, err_first
    assert "flushed 0" in out_second, err_second

    accepted = receiver.accepted()
    for source in ("first", "second"):
        mine = [m["properties"]["n"] for m in accepted if m["properties"]["source"] == source]
        assert mine == list(range(150)), source  # each once, in order
    assert spans.assert_one_at_a_time() <= 1  # and the lease changed hands once


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_childs_events_are_delivered(make_client, receiver) -> None:
    client = make_client()
    client.track("parent", "Before fork")
    assert client.flush(timeout=10).sent == 1
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            for n in range(20):
                client.track("child", "In child", {"n": n})
            code = 0 if client.flush(timeout=20).pending == 0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    client.track("parent", "After fork")
    client.flush(timeout=10)
    events = [m["event"] for m in receiver.accepted()]
    assert events.count("In child") == 20
    assert events[0] == "Before fork" and events[-1] == "After fork"


EXITER = """
import sys, time
from outbox_analytics import Client

client = Client("k", host=sys.argv[1], outbox_path=sys.argv[2], timeout=30)
for n in range(10):
    client.track("user", "Numbered", {"n": n})
print(time.monotonic(), flush=True)
# no flush, no shutdown: the exit hook has to cope
"""


@pytest.mark.parametrize("server", ["refusing", "hanging"])
def test_exit_with_the_server_unreachable_is_prompt_and_loses_nothing(
    receiver, outbox_file: Path, server: str
) -> None:
    if server == "hanging":
        receiver.responder = lambda request: Reply(delay=20)
        url = receiver.url
    else:
        url = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused
    process = start_python(EXITER, url, str(outbox_file))
    out, err = process.communicate(timeout=30)
    ended = time.monotonic()
    assert process.returncode == 0, err
    assert ended - float(out.split()[0]) < 3.0  # EXIT_BUDGET is 1 s; the rest is teardown

    client = Client("k", outbox_path=str(outbox_file), upload=False)
    assert client.stats().pending == 10  # in-flight rows of the dead process are pending again
    client.shutdown()


BACKING_OFF = """
import sys, time, tenacity
from outbox_analytics import Client

client = Client(
    "k", host=sys.argv[1], outbox_path=sys.argv[2], max_retries=1,
    retry_wait=tenacity.wait_fixed(0.01), upload_interval=0.5,
)
for n in range(5):
    client.track("user", "Numbered", {"n": n})
client.flush(timeout=10)  # the server is down: retries run out, the head backs off
print("backing off", flush=True)
time.sleep(60)
"""


def test_flush_without_the_lease_returns_when_the_uploader_backs_off(
    receiver, outbox_file: Path
) -> None:
    receiver.responder = lambda request: Reply(503)
    holder = start_python(BACKING_OFF, receiver.url, str(outbox_file))
    assert holder.stdout is not None and holder.stdout.readline().strip() == "backing off"
    try:
        client = Client("k", host=receiver.url, outbox_path=str(outbox_file))
        client.track("user", "From the second process")
        started = time.monotonic()
        result = client.flush()  # no timeout: it must still come back
        assert time.monotonic() - started < 5
        assert result.pending == 6
        client.shutdown(timeout=1)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_the_exit_flush_waits_for_a_lease_taken_but_not_yet_in_hand(
    receiver, outbox_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uploader thread has taken the lease and is reclaiming when the process exits.

    It must be flushed, not stopped: stopped mid-claim, it hands the rows
    back, and events no other process will send wait for the next run.
    """
    from outbox_analytics.store.lease import UploadLease

    stored = Client("k", outbox_path=str(outbox_file), upload=False)
    for n in range(20):
        stored.track("u", "Before exit", {"n": n})
    stored.shutdown()
    take_over, go_on = UploadLease.take_over, threading.Event()

    def slow_take_over(lease: UploadLease) -> int:  # (a busy file makes it this slow)
        if threading.current_thread() is not threading.main_thread():  # the uploader's take
            go_on.wait(10)
        return take_over(lease)

    monkeypatch.setattr(UploadLease, "take_over", slow_take_over)
    client = Client("k", host=receiver.url, outbox_path=str(outbox_file))
    assert client.uploader is not None and client.outbox is not None
    deadline = time.monotonic() + 5
    while not client.outbox.lease_held_here() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert client.outbox.lease_held_here() and not client.uploader.holds_lease
    threading.Timer(0.3, go_on.set).start()
    exit_delivery.deliver(client, 5.0)  # what the exit hook runs
    assert sorted(m["properties"]["n"] for m in receiver.accepted()) == list(range(20))
