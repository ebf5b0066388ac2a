"""sync_mode next to anything on one file: threads, background clients, other processes.

A sync call returns once its event (and those before it) are delivered, or
raises a DeliveryError within `timeout`. Whoever holds the file's lease sends;
callers that cannot send sleep; rejections that are about the endpoint keep
the events pending.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import pytest

from outbox_analytics import APIError, Client, DeliveryError, EndpointRejected
from outbox_analytics.transport import Reply as TransportReply

from .conftest import start_python
from .receiver import Received, Reply


def non_overlapping(receiver) -> bool:
    """Whether no two requests were being answered at the same time."""
    spans = sorted((r.at, r.at + 0.03) for r in receiver.requests)
    return all(later[0] >= earlier[1] - 0.002 for earlier, later in itertools.pairwise(spans))


def test_sync_and_background_clients_share_one_file_in_one_process(
    make_client, receiver, outbox_file: Path
) -> None:
    # The background client waits long for batches to fill: a sync call next
    # to it must hurry it, not wait out its interval or raise.
    sync = make_client(sync_mode=True, timeout=10)
    background = make_client(upload_interval=2.0)
    took = []
    expected = []
    for round_ in range(5):
        started = time.monotonic()
        ok, msg = sync.track("u", "Sync", {"round": round_})
        took.append(time.monotonic() - started)
        assert ok
        expected.append(msg["messageId"])
        for n in range(3):
            expected.append(background.track("u", "Background", {"n": n})[1]["messageId"])
    assert background.flush(timeout=10).pending == 0
    delivered = [m["messageId"] for m in receiver.accepted()]
    assert delivered == expected  # each once, in commit order
    assert max(took) < 1.5, took  # the background uploader was hurried


def test_a_sync_caller_never_keeps_the_lease_from_a_background_client(
    make_client, receiver
) -> None:
    sync = make_client(sync_mode=True)
    sync.track("u", "Sync")  # took the lease to send: it must give it back
    background = make_client()
    background.track("u", "Background")
    assert background.flush(timeout=5).pending == 0
    assert [m["event"] for m in receiver.accepted()] == ["Sync", "Background"]


SYNC_AND_BACKGROUND = """
import json, sys, threading
from outbox_analytics import Client

path, host, tag = sys.argv[1:4]
background = Client("test-write-key", host=host, outbox_path=path, upload_interval=0.05)
sync = Client("test-write-key", host=host, outbox_path=path, sync_mode=True, timeout=30)
errors = []

def work(thread):
    for i in range(12):
        try:
            ok, _ = sync.track("u", "Sync", {"proc": tag, "thread": thread, "i": i})
            if not ok:
                errors.append("not stored")
        except Exception as exc:
            errors.append(repr(exc))
        background.track("u", "Background", {"proc": tag, "thread": thread, "i": i})

threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
result = background.flush(timeout=30)
print(json.dumps({"errors": errors, "pending": result.pending}))
"""


def test_sync_mode_in_two_processes_of_four_threads_with_a_background_client_each(
    receiver, outbox_file: Path
) -> None:
    receiver.responder = lambda request: Reply(delay=0.003)
    Client("test-write-key", outbox_path=str(outbox_file), upload=False).shutdown()  # create it
    children = [
        start_python(SYNC_AND_BACKGROUND, str(outbox_file), receiver.url, tag) for tag in "ab"
    ]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert json.loads(out)["errors"] == []

    accepted = receiver.wait_for(2 * 4 * 12 * 2)
    keys = [
        (m["event"], m["properties"]["proc"], m["properties"]["thread"], m["properties"]["i"])
        for m in accepted
    ]
    assert len(keys) == len(set(keys)) == 2 * 4 * 12 * 2  # every event, once
    # Each thread committed Sync i, Background i, Sync i+1...: the server saw that order.
    for proc in "ab":
        for thread in range(4):
            seen = [(k[0], k[3]) for k in keys if k[1] == proc and k[2] == thread]
            assert seen == [(e, i) for i in range(12) for e in ("Sync", "Background")]


HOLD_THE_LEASE = """
import sys, time
from outbox_analytics.store import Outbox
outbox = Outbox(sys.argv[1])
lease = outbox.try_lease()
print("held" if lease else "not held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_sync_caller_sleeps_while_another_process_holds_the_lease(
    make_client, receiver, outbox_file: Path
) -> None:
    client = make_client(sync_mode=True, timeout=1.0)
    holder = start_python(HOLD_THE_LEASE, str(outbox_file), "2.5")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        outcome: dict[str, object] = {}

        def call() -> None:
            cpu, started = time.thread_time(), time.monotonic()
            try:
                client.track("u", "Waiting")
            except DeliveryError as exc:
                outcome["error"] = exc
            outcome["cpu"] = time.thread_time() - cpu
            outcome["took"] = time.monotonic() - started

        caller = threading.Thread(target=call)
        caller.start()
        caller.join(10)
        assert isinstance(outcome.get("error"), DeliveryError)
        assert 0.9 <= outcome["took"] < 2.0  # waited for the holder, within timeout
        assert outcome["cpu"] < 0.3  # slept: it did not spin
        assert client.stats().pending == 1 and receiver.requests == []
    finally:
        holder.wait(10)
    ok, _ = client.track("u", "After")  # the holder is gone: this process sends both
    assert ok and [m["event"] for m in receiver.accepted()] == ["Waiting", "After"]


BACKGROUND_HOLDER = """
import sys, time
from outbox_analytics import Client
client = Client("test-write-key", host=sys.argv[2], outbox_path=sys.argv[1], upload_interval=0.2)
client.track("u", "Holder")
client.flush(timeout=5)
print("holding" if client.uploader.holds_lease else "not holding", flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_a_sync_caller_is_served_by_a_background_uploader_in_another_process(
    make_client, receiver, outbox_file: Path
) -> None:
    Client("test-write-key", outbox_path=str(outbox_file), upload=False).shutdown()
    holder = start_python(BACKGROUND_HOLDER, str(outbox_file), receiver.url, "4")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        client = make_client(sync_mode=True, timeout=5)
        started = time.monotonic()
        ok, _ = client.track("u", "Sync")
        assert ok and time.monotonic() - started < 2.0
        assert [m["event"] for m in receiver.accepted()] == ["Holder", "Sync"]
    finally:
        holder.kill()
        holder.wait(10)


def test_threads_of_one_sync_client_take_turns_in_commit_order(make_client, receiver) -> None:
    receiver.responder = lambda request: Reply(delay=0.03)
    client = make_client(sync_mode=True, timeout=30)
    cpu: list[float] = []
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        started = time.thread_time()
        for i in range(8):
            try:
                client.track("u", "Turn", {"thread": thread, "i": i})
            except BaseException as exc:
                errors.append(exc)
        cpu.append(time.thread_time() - started)

    wall = time.monotonic()
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wall = time.monotonic() - wall
    assert errors == []
    accepted = receiver.accepted()
    assert len(accepted) == 32 and len({m["messageId"] for m in accepted}) == 32
    for thread in range(4):
        order = [m["properties"]["i"] for m in accepted if m["properties"]["thread"] == thread]
        assert order == list(range(8))
    assert non_overlapping(receiver)  # one POST at a time
    assert sum(cpu) < 0.5 * wall, (cpu, wall)  # waiting threads sleep


def test_sync_mode_timeout_holds_while_the_server_rejects_everything(
    make_client, receiver, store_only
) -> None:
    with store_only.batch():
        for n in range(100):
            store_only.track("u", "Backlog", {"n": n})
    receiver.responder = lambda request: Reply(400, body='{"message": "no such"}', delay=0.01)
    client = make_client(sync_mode=True, timeout=0.3, max_retries=0)
    started = time.monotonic()
    with pytest.raises(DeliveryError):
        client.track("u", "Now")
    assert time.monotonic() - started < 1.5
    assert len(receiver.requests) < 40  # the split stopped at the deadline
    stats = client.stats()
    assert (stats.pending, stats.dead) == (101, 0)


def test_an_endpoint_that_rejects_everything_keeps_the_backlog_pending(
    make_client, receiver
) -> None:
    receiver.responder = lambda request: Reply(400, body='{"message": "unknown write key"}')
    errors: list[Exception] = []
    client = make_client(
        upload_size=30, on_error=lambda exc, batch: errors.append(exc), max_retries=0
    )
    with client.batch():
        for n in range(30):
            client.track("u", "Backlog", {"n": n})

    first = client.flush(timeout=10)
    assert (first.sent, first.dead, first.pending) == (0, 0, 30)
    assert len(receiver.requests) <= 2 * 30 - 1  # one split, down to each event
    assert isinstance(errors[-1], EndpointRejected) and errors[-1].status == 400
    assert "unknown write key" in str(errors[-1])

    asked = len(receiver.requests)
    again = client.flush(timeout=10)
    assert again.dead == 0 and len(receiver.requests) == asked + 1  # the same head: no new split

    receiver.responder = lambda request: Reply()
    assert client.flush(timeout=10).sent == 30
    assert [m["properties"]["n"] for m in receiver.accepted()] == list(range(30))
    assert client.stats().dead == 0


def test_two_lone_events_rejected_alike_mean_the_endpoint(make_client, receiver) -> None:
    receiver.responder = lambda request: Reply(400, body='{"message": "rejected"}')
    client = make_client(sync_mode=True, max_retries=0)
    with pytest.raises(APIError) as first:
        client.track("u", "First")  # alone: about the event, as far as anyone can tell
    assert first.value.status == 400 and '"rejected"' in str(first.value)  # the server's words
    with pytest.raises(EndpointRejected):
        client.track("u", "Second")  # rejected alike again: the endpoint
    stats = client.stats()
    assert (stats.dead, stats.pending) == (1, 1)
    receiver.responder = lambda request: Reply()
    assert client.track("u", "Third")[0]
    assert [m["event"] for m in receiver.accepted()] == ["Second", "Third"]


def test_bad_events_side_by_side_are_still_dead_lettered(make_client, receiver) -> None:
    def reject_poison(request: Received) -> Reply:
        if any(m["properties"].get("poison") for m in request.batch):
            return Reply(400, body='{"message": "bad event"}')
        return Reply()

    receiver.responder = reject_poison
    client = make_client(upload_size=20)
    with client.batch():
        for n in range(20):
            client.track("u", "Mixed", {"n": n, "poison": n in (10, 11)})
    result = client.flush(timeout=10)
    assert (result.sent, result.dead, result.pending) == (18, 2, 0)
    dead = sorted(row.message["properties"]["n"] for row in client.outbox.rows("dead"))
    assert dead == [10, 11]


class ExplodingTransport:
    def post(self, url: str, body: bytes, headers: dict, timeout: float) -> TransportReply:
        raise ValueError("a transport bug")


def test_sync_mode_raises_nothing_but_delivery_errors(outbox_file: Path) -> None:
    client = Client(
        "k", outbox_path=str(outbox_file), sync_mode=True, transport=ExplodingTransport()
    )
    with pytest.raises(DeliveryError, match="a transport bug"):
        client.track("u", "Event")
    assert client.stats().pending == 1
    client.shutdown()


def reject_bad(request: Received) -> Reply:
    if any(m["properties"].get("bad") for m in request.batch):
        return Reply(400, body='{"message": "invalid event"}')
    return Reply()


def test_lone_bad_events_never_block_the_good_ones_behind_them(make_client, receiver) -> None:
    receiver.responder = reject_bad
    client = make_client(max_retries=0)
    for n in (1, 2):  # each alone in its batch: the second looks like a wrong endpoint
        client.track("u", "Lone", {"n": n, "bad": True})
        client.flush(timeout=5)
    for n in range(3, 8):
        client.track("u", "Lone", {"n": n})
    for _ in range(3):  # each round is one flush: a few rounds, not a backoff of hours
        client.flush(timeout=5)
    assert [m["properties"]["n"] for m in receiver.accepted()] == [3, 4, 5, 6, 7]
    assert (client.stats().pending, client.stats().dead) == (0, 2)


def test_a_whole_batch_of_bad_events_at_the_head_is_told_from_a_wrong_endpoint(
    make_client, receiver
) -> None:
    receiver.responder = reject_bad
    client = make_client(upload_size=10, max_retries=0)
    with client.batch():
        for n in range(20):
            client.track("u", "Head", {"n": n, "bad": n < 10})
    first = client.flush(timeout=5)  # ten events, each rejected alike: maybe the endpoint
    assert (first.sent, first.dead) == (0, 0)
    for _ in range(3):  # the same head again, then the next event alone: it is accepted
        client.flush(timeout=5)
    assert [m["properties"]["n"] for m in receiver.accepted()] == list(range(10, 20))
    assert (client.stats().pending, client.stats().dead) == (0, 10)


def test_the_clients_of_one_file_share_what_the_endpoint_answered(make_client, receiver) -> None:
    receiver.responder = lambda request: Reply(400, body='{"message": "wrong path"}')
    clients = [make_client(sync_mode=True, max_retries=0) for _ in range(2)]
    outcomes = []
    for n in range(4):
        try:
            clients[n % 2].track("u", "Alternating", {"n": n})
            outcomes.append("ok")
        except DeliveryError as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes == ["APIError"] + ["EndpointRejected"] * 3
    assert (clients[0].stats().dead, clients[0].stats().pending) == (1, 3)


def test_a_join_that_times_out_mid_request_gives_the_lease_back_after_it(
    make_client, receiver
) -> None:
    receiver.script = [Reply(delay=1.0)]
    first = make_client()
    first.track("u", "Slow")
    deadline = time.monotonic() + 5
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    first.join(timeout=0.2)  # returns while the request is still in flight
    second = make_client()
    second.track("u", "Next")
    assert second.flush(timeout=5).pending == 0  # the first thread let the lease go
    assert [m["event"] for m in receiver.accepted()][-1] == "Next"


def test_good_events_survive_an_endpoint_that_recovers_between_rounds(
    make_client, receiver
) -> None:
    refusals = [Reply(400, body='{"message": "down for maintenance"}')] * 4
    receiver.script = list(refusals)  # then every request is accepted
    client = make_client(upload_size=2, max_retries=0)
    with client.batch():
        for n in range(6):
            client.track("u", "Recovering", {"n": n})
    for _ in range(4):
        client.flush(timeout=5)
    assert (client.stats().pending, client.stats().dead) == (0, 0)
    assert sorted(m["properties"]["n"] for m in receiver.accepted()) == list(range(6))
