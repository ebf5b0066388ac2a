"""Delivery against a real HTTP server on 127.0.0.1: format, outcomes, order, limits."""

from __future__ import annotations

import base64
import socket
import threading
import time
from email.utils import formatdate

import pytest
import tenacity

from outbox_analytics import VERSION, APIError, Client, FlushResult, RetryableError
from outbox_analytics.request import MAX_BATCH_BYTES, parse_retry_after

from .receiver import Received, Reply


def track_numbered(client, count: int, start: int = 0, **properties) -> list[dict]:
    return [
        client.track("user", "Numbered", {"n": n, **properties})[1]
        for n in range(start, start + count)
    ]


def numbers(messages) -> list[int]:
    return [m["properties"]["n"] for m in messages]


@pytest.mark.parametrize("gzip", [False, True])
@pytest.mark.every_python
def test_request_format(make_client, receiver, gzip: bool) -> None:
    client = make_client(gzip=gzip)
    sent = track_numbered(client, 3)
    assert client.flush(timeout=10).sent == 3

    (request,) = receiver.requests
    assert request.path == "/v1/batch"
    assert request.body["batch"] == sent
    assert request.body["writeKey"] == "test-write-key"
    assert set(request.body) == {"batch", "sentAt", "writeKey"}
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == f"outbox-analytics/{VERSION}"
    assert headers["authorization"] == "Basic " + base64.b64encode(b"test-write-key:").decode()
    assert "x-retry-count" not in headers
    assert (headers.get("content-encoding") == "gzip") is gzip
    assert client.stats().pending == 0


def test_retries_keep_message_ids_and_set_sent_at_and_retry_count(make_client, receiver) -> None:
    receiver.script = [Reply(500), Reply(503)]
    client = make_client()
    sent = track_numbered(client, 2)
    assert client.flush(timeout=10).sent == 2

    assert [r.batch for r in receiver.requests] == [sent, sent, sent]  # same ids, same timestamps
    assert [r.headers.get("X-Retry-Count") for r in receiver.requests] == [None, "1", "2"]
    sent_at = [r.body["sentAt"] for r in receiver.requests]
    assert len(set(sent_at)) == 3  # set per attempt


@pytest.mark.parametrize("status", [408, 410, 429, 460, 500, 502, 503, 504, 401, 403, 404])
def test_retryable_statuses_are_retried_and_lose_nothing(make_client, receiver, status) -> None:
    receiver.script = [Reply(status)]
    client = make_client()
    sent = track_numbered(client, 5)
    result = client.flush(timeout=10)
    assert (result.sent, result.dead, result.pending) == (5, 0, 0)
    assert receiver.accepted() == sent
    assert len(receiver.requests) == 2


def test_network_errors_are_retried(make_client, receiver) -> None:
    receiver.script = [Reply(drop=True)]
    client = make_client()
    sent = track_numbered(client, 4)
    assert client.flush(timeout=10).sent == 4
    assert receiver.accepted() == sent


@pytest.mark.parametrize("status", [400, 413, 422, 501, 505])
def test_a_poison_event_is_isolated_and_the_rest_delivered_in_order(
    make_client, receiver, status
) -> None:
    def reject_poison(request: Received) -> Reply:
        if any(m["properties"].get("poison") for m in request.batch):
            return Reply(status, body='{"code": "invalid", "message": "bad event"}')
        return Reply()

    receiver.responder = reject_poison
    errors: list[tuple[Exception, list[dict]]] = []
    client = make_client(on_error=lambda exc, batch: errors.append((exc, batch)), upload_size=20)
    sent = track_numbered(client, 8)
    poison = client.track("user", "Numbered", {"n": 8, "poison": True})[1]
    sent += track_numbered(client, 11, start=9)

    result = client.flush(timeout=10)
    assert (result.sent, result.dead, result.pending) == (19, 1, 0)
    assert numbers(receiver.accepted()) == [n for n in range(20) if n != 8]
    (dead,) = list(client.outbox.rows("dead"))
    assert dead.message == poison
    assert dead.last_status == status and "bad event" in dead.last_error
    ((exc, batch),) = errors
    assert isinstance(exc, APIError) and exc.status == status
    assert batch == [poison]


def test_retry_after_in_seconds_pauses_the_pipeline(make_client, receiver) -> None:
    receiver.script = [Reply(429, headers={"Retry-After": "1"})]
    client = make_client()
    track_numbered(client, 3)
    assert client.flush(timeout=10).sent == 3
    first, second = receiver.requests
    assert second.at - first.at >= 0.95  # the server's wait, not the policy's 0.01 s


def test_retry_after_as_an_http_date_pauses_the_pipeline(make_client, receiver) -> None:
    receiver.script = [
        Reply(503, headers={"Retry-After": formatdate(time.time() + 2, usegmt=True)})
    ]
    client = make_client()
    track_numbered(client, 3)
    assert client.flush(timeout=10).sent == 3
    first, second = receiver.requests
    assert second.at - first.at >= 0.9  # HTTP dates have whole seconds


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("5", now) == 5
    assert parse_retry_after("0", now) is None
    assert parse_retry_after("100000", now) == 300  # capped
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_batches_respect_upload_size(make_client, receiver) -> None:
    client = make_client(upload_size=7)
    with client.batch():
        track_numbered(client, 30)
    assert client.flush(timeout=10).sent == 30
    assert [len(r.batch) for r in receiver.requests] == [7, 7, 7, 7, 2]
    assert numbers(receiver.accepted()) == list(range(30))


def test_bodies_stay_under_500kb(make_client, receiver) -> None:
    client = make_client(upload_size=100)
    with client.batch():
        track_numbered(client, 60, blob="x" * 30_000)  # 60 x 30 KB = 1.8 MB
    assert client.flush(timeout=20).sent == 60
    sizes = [len(r.batch) for r in receiver.requests]
    assert all(r.raw_length < MAX_BATCH_BYTES for r in receiver.requests)
    assert sum(sizes) == 60 and len(sizes) >= 4
    assert numbers(receiver.accepted()) == list(range(60))


@pytest.mark.every_python
def test_server_down_then_up_loses_nothing_and_keeps_order(make_client, receiver) -> None:
    down_until = time.monotonic() + 1.0
    receiver.responder = lambda r: Reply(503) if time.monotonic() < down_until else Reply()
    client = make_client(max_retries=2, upload_size=10)
    for n in range(50):
        client.track("user", "Numbered", {"n": n})
        time.sleep(0.01)
    # Each flush returns when a round of retries runs out: flush until it is over.
    deadline = time.monotonic() + 20
    while client.flush(timeout=5).pending and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.stats().pending == 0
    delivered = numbers(receiver.accepted())
    assert delivered == list(range(50))  # each once, in order


def test_exhausted_retries_put_rows_back_with_their_history(make_client, receiver) -> None:
    receiver.responder = lambda r: Reply(503, body="down for maintenance")
    errors = []
    client = make_client(max_retries=2, on_error=lambda exc, batch: errors.append((exc, batch)))
    sent = track_numbered(client, 3)
    result = client.flush(timeout=10)
    assert (result.sent, result.dead, result.pending) == (0, 0, 3)
    rows = list(client.outbox.rows("pending"))
    assert [r.message for r in rows] == sent  # unchanged: no sentAt was ever stored
    assert all("sentAt" not in r.message for r in rows)
    assert all(r.attempts == 3 and r.last_status == 503 for r in rows)
    assert "down for maintenance" in rows[0].last_error
    assert rows[0].next_attempt_at > time.time()
    assert len(receiver.requests) == 3
    ((exc, batch),) = errors
    assert isinstance(exc, RetryableError) and batch == sent


def test_flush_returns_on_time_with_the_server_hanging(make_client, receiver) -> None:
    receiver.responder = lambda r: Reply(delay=5)
    client = make_client(timeout=10)
    track_numbered(client, 2)
    started = time.monotonic()
    result = client.flush(timeout=0.5)
    assert time.monotonic() - started < 1.0
    assert result.pending == 2


def test_on_error_raising_never_stops_the_uploader(make_client, receiver) -> None:
    def reject_first(request: Received) -> Reply:
        return Reply(400) if request.batch[0]["properties"]["n"] == 0 else Reply()

    def explode(exc, batch):
        raise RuntimeError("callback bug")

    receiver.responder = reject_first
    client = make_client(on_error=explode, upload_size=1)
    track_numbered(client, 3)
    result = client.flush(timeout=10)
    assert (result.sent, result.dead) == (2, 1)
    assert client.uploader.running


@pytest.mark.parametrize("answer", [400, 503])  # moved to the dead-letter state; retries ran out
def test_on_error_has_been_called_when_the_flush_that_saw_the_failure_returns(
    make_client, receiver, answer: int
) -> None:
    # As with Segment's flush (it waits for the queue, and on_error runs
    # first): code that flushes then looks at what on_error collected must
    # find it there. A slow callback made the flush return before it.
    reported: list[int] = []

    def slow_on_error(exc, batch):
        time.sleep(0.5)
        reported.append(len(batch))

    receiver.responder = lambda request: Reply(answer)
    client = make_client(on_error=slow_on_error, max_retries=0)
    track_numbered(client, 1)
    result = client.flush(timeout=10)
    assert (result.dead, result.pending) == ((1, 0) if answer == 400 else (0, 1))
    assert reported == [1]


def test_a_slow_on_error_does_not_hold_a_flush_past_its_timeout(make_client, receiver) -> None:
    called = threading.Event()

    def slower_on_error(exc, batch):
        called.set()
        time.sleep(3)

    receiver.responder = lambda request: Reply(400)
    client = make_client(on_error=slower_on_error, max_retries=0)
    track_numbered(client, 1)
    started = time.monotonic()
    client.flush(timeout=1)
    assert called.is_set()  # the failure came within the flush's time ...
    assert time.monotonic() - started < 2.5  # ... and its callback did not hold it to 3 s


def test_pending_rows_of_an_earlier_run_go_first(make_client, receiver, outbox_file) -> None:
    from outbox_analytics import Client

    earlier = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    old = [earlier.track("user", "Old", {"n": n})[1] for n in range(5)]
    earlier.shutdown()

    client = make_client()
    new = track_numbered(client, 3, start=5)
    assert client.flush(timeout=10).sent == 8
    assert receiver.accepted() == old + new


def test_rows_retried_too_long_are_dead_lettered_not_deleted(make_client, receiver) -> None:
    receiver.responder = lambda r: Reply(503)
    client = make_client(max_retries=0, max_total_backoff_duration=0.3)
    sent = track_numbered(client, 2)
    client.flush(timeout=5)  # first round: released, first attempt recorded
    time.sleep(0.4)
    client.flush(timeout=5)  # second round: too old now
    dead = list(client.outbox.rows("dead"))
    assert [r.message for r in dead] == sent
    assert "gave up after" in dead[0].last_error


def test_rows_retried_too_long_by_drains_cut_short_are_dead_lettered(
    make_client, receiver, outbox_file
) -> None:
    """A drain whose timeout comes between retries gives no round up: the rows must
    still expire after max_total_backoff_duration (a cron job's short drains)."""
    receiver.responder = lambda r: Reply(503)
    stored(outbox_file, 2)
    client = make_client(
        sync_mode=True, max_retries=100, retry_wait=tenacity.wait_fixed(0.05),
        max_total_backoff_duration=0.3,
    )  # fmt: skip
    first = client.drain(timeout=0.2)
    assert first.pending == 2 and "still being retried" in first.last_error
    time.sleep(0.3)
    second = client.drain(timeout=0.2)
    assert second.dead == 2 and second.pending == 0
    assert "gave up after" in next(client.outbox.rows("dead")).last_error


@pytest.mark.every_python
def test_sync_mode_delivers_on_the_callers_thread(make_client, receiver) -> None:
    client = make_client(sync_mode=True)
    ok, msg = client.track("user", "Now")
    assert ok and receiver.accepted() == [msg]
    assert client.stats().pending == 0
    assert client.uploader is not None and not client.uploader.running  # no thread


def test_sync_mode_raises_on_failure_and_keeps_the_event(make_client, receiver) -> None:
    receiver.responder = lambda r: Reply(503)
    client = make_client(sync_mode=True, max_retries=1, timeout=2)
    with pytest.raises(RetryableError):
        client.track("user", "Now")
    assert client.stats().pending == 1

    receiver.responder = lambda r: Reply()
    ok, _ = client.track("user", "Later")
    assert ok
    assert [m["event"] for m in receiver.accepted()] == ["Now", "Later"]


def test_timeout_reaches_requests(make_client, receiver) -> None:
    receiver.script = [Reply(delay=2)]
    client = make_client(timeout=0.3)
    track_numbered(client, 1)
    started = time.monotonic()
    assert client.flush(timeout=10).sent == 1
    assert time.monotonic() - started < 1.9  # the first attempt timed out, not waited out
    assert len(receiver.requests) == 2


def test_proxies_reach_requests(make_client, receiver) -> None:
    # The receiver plays the proxy: requests sends it the absolute URL. Nothing
    # leaves this machine: the name below is only text in the request line.
    client = make_client(host="http://analytics.invalid", proxies={"http": receiver.url})
    track_numbered(client, 1)
    assert client.flush(timeout=10).sent == 1
    assert receiver.requests[0].path == "http://analytics.invalid/v1/batch"


def test_send_false_and_upload_false_clients_flush_at_once(make_client) -> None:
    for client in (
        make_client(send=False),
        make_client(upload=False),
    ):
        client.track("user", "E")
        started = time.monotonic()
        client.flush()
        assert time.monotonic() - started < 0.5


def test_flush_and_drain_after_join_send_as_before(make_client, receiver, tmp_path) -> None:
    """join() stops the thread, not delivery: flush() and drain() still send (from the caller)."""
    for ending in ("join", "shutdown"):
        client = make_client(outbox_path=str(tmp_path / f"{ending}.db"))
        client.track("user", "Before")
        assert client.flush(timeout=10).sent == 1
        getattr(client, ending)()
        client.track("user", "Flushed")
        assert client.flush(timeout=10) == FlushResult(sent=1, dead=0, pending=0)
        client.track("user", "Drained")
        result: list[FlushResult] = []
        drainer = threading.Thread(target=_drain_into, args=(client, result), daemon=True)
        drainer.start()
        drainer.join(10)  # drain() without a timeout: it must come back by itself
        assert result == [FlushResult(sent=1, dead=0, pending=0)]
    assert [m["event"] for m in receiver.accepted()] == ["Before", "Flushed", "Drained"] * 2


def _drain_into(client, result: list[FlushResult]) -> None:
    result.append(client.drain())


def test_sync_sends_after_shutdown_still_back_off(make_client, receiver) -> None:
    receiver.responder = lambda r: Reply(status=503)
    client = make_client(sync_mode=True, max_retries=3, retry_wait=tenacity.wait_fixed(0.2))
    client.shutdown()
    started = time.monotonic()
    with pytest.raises(RetryableError):
        client.track("user", "E")
    assert len(receiver.requests) == 4
    assert time.monotonic() - started >= 0.55  # three waits of 0.2 s between four requests


def test_proxy_settings_from_the_environment_are_honoured(
    make_client, receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", receiver.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = make_client(host="http://analytics.invalid")
    track_numbered(client, 1)
    assert client.flush(timeout=10).sent == 1
    assert receiver.requests[0].path == "http://analytics.invalid/v1/batch"


def test_logging_is_quiet_on_recovered_retries_and_never_shows_the_write_key(
    make_client, receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="outbox_analytics")
    receiver.script = [Reply(503), Reply(drop=True)]
    client = make_client()
    track_numbered(client, 3)
    assert client.flush(timeout=10).sent == 3
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert any("sending 3 messages" in r.getMessage() for r in caplog.records)  # payloads at DEBUG

    receiver.script = [Reply(503)] * 4  # max_retries is 3: one whole round fails
    receiver.responder = lambda r: Reply(400)  # and the next round is rejected
    track_numbered(client, 1, start=3)
    client.flush(timeout=10)  # retries run out: one warning
    client.flush(timeout=10)  # rejected: one error
    levels = [r.levelname for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert levels == ["WARNING", "ERROR"]

    text = "\n".join(r.getMessage() for r in caplog.records)
    authorization = base64.b64encode(b"test-write-key:").decode()
    assert "test-write-key" not in text and authorization not in text


def test_flush_returns_on_time_while_retries_back_off(make_client, receiver) -> None:
    import tenacity

    receiver.responder = lambda r: Reply(503)
    client = make_client(retry_wait=tenacity.wait_fixed(30), max_retries=10)
    track_numbered(client, 2)
    started = time.monotonic()
    result = client.flush(timeout=1)
    assert time.monotonic() - started < 1.5
    assert result.pending == 2
    started = time.monotonic()
    client.shutdown(timeout=1)  # cuts the 30 s backoff short
    assert time.monotonic() - started < 1.5
    assert client.stats().pending == 2


def test_a_storage_failure_mid_batch_strands_no_rows(make_client, receiver, monkeypatch) -> None:
    from outbox_analytics import OutboxUnavailable
    from outbox_analytics.store import UploadLease

    client = make_client()
    real_ack = UploadLease.ack
    calls: list[int] = []

    def ack_failing_once(self, ids):  # the disk was full at the moment of the ack
        calls.append(1)
        if len(calls) == 1:
            raise OutboxUnavailable("cannot acknowledge rows (database or disk is full)", "x")
        return real_ack(self, ids)

    monkeypatch.setattr(UploadLease, "ack", ack_failing_once)
    sent = track_numbered(client, 3)
    deadline = time.monotonic() + 10
    while client.flush(timeout=2).pending and time.monotonic() < deadline:
        pass
    stats = client.stats()
    assert (stats.pending, stats.inflight) == (0, 0)
    assert client.uploader.loop_errors == 1
    delivered = receiver.accepted()
    assert {m["messageId"] for m in delivered} == {m["messageId"] for m in sent}
    assert len(delivered) == 6  # sent twice (the first ack failed), same messages


def test_a_message_too_large_for_any_batch_is_dead_and_blocks_nothing(
    make_client, receiver, outbox_file
) -> None:
    from outbox_analytics.store import Outbox, encode_message

    with Outbox(outbox_file) as outbox:  # written by something else: no 32 KB check
        huge = {"type": "track", "messageId": "huge", "event": "x" * 600_000}  # over the 500 KB
        outbox.append(encode_message(huge))
        for n in range(3):
            outbox.append(encode_message({"type": "track", "messageId": f"m{n}", "event": "E"}))
    client = make_client()
    result = client.flush(timeout=10)
    assert (result.sent, result.dead, result.pending) == (3, 1, 0)
    assert [m["messageId"] for m in receiver.accepted()] == ["m0", "m1", "m2"]
    (dead,) = list(client.outbox.rows("dead"))
    assert dead.last_status == 413 and "larger than the batch limit" in dead.last_error


# -- client.drain(): sending on the caller's thread ---------------------------------


def stored(outbox_file, count: int) -> None:
    from outbox_analytics import Client

    client = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    with client.batch():
        track_numbered(client, count)
    client.shutdown()


def in_flight(outbox_file) -> int:
    from outbox_analytics.store import Outbox

    with Outbox(outbox_file, readonly=True) as outbox:
        return sum(1 for _ in outbox.rows("inflight"))


def test_drain_sends_on_the_callers_thread_in_order(make_client, receiver, outbox_file) -> None:
    stored(outbox_file, 250)
    client = make_client(sync_mode=True)  # sync_mode: no background thread at all
    result = client.drain()
    assert (result.sent, result.dead, result.pending) == (250, 0, 0)
    assert numbers(receiver.accepted()) == list(range(250))
    assert not client.uploader.running
    assert client.outbox.try_lease() is not None  # the lease was given back


def test_drain_returns_when_a_round_of_retries_ran_out(make_client, receiver, outbox_file):
    stored(outbox_file, 5)
    receiver.responder = lambda request: Reply(503)
    client = make_client(sync_mode=True, max_retries=2)
    result = client.drain(timeout=30)
    assert (result.sent, result.pending) == (0, 5)
    assert len(receiver.requests) == 3
    assert in_flight(outbox_file) == 0


def test_drain_timeout_bounds_a_request_in_flight(make_client, receiver, outbox_file) -> None:
    stored(outbox_file, 5)
    receiver.responder = lambda request: Reply(delay=20)
    client = make_client(sync_mode=True)
    started = time.monotonic()
    result = client.drain(timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert result.pending == 5 and in_flight(outbox_file) == 0


def test_an_interrupted_drain_puts_its_rows_back(make_client, receiver, outbox_file) -> None:
    import signal

    stored(outbox_file, 5)
    receiver.responder = lambda request: Reply(delay=20)
    client = make_client(sync_mode=True)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            client.drain()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert receiver.requests  # it was inside a request when interrupted
    assert in_flight(outbox_file) == 0 and client.stats().pending == 5
    assert client.outbox.try_lease() is not None  # and the lease is free


def test_drain_keeps_its_timeout_while_the_clients_own_thread_is_sending(
    make_client, receiver, outbox_file
) -> None:
    """drain() waited for its turn with no bound: the client's thread took the
    turn back batch after batch, and a drain(timeout=8) took 10 to 33 s."""
    stored(outbox_file, 3000)
    receiver.responder = lambda request: Reply(delay=0.3)
    client = make_client()
    deadline = time.monotonic() + 5
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.uploader.running and receiver.requests  # the thread is sending
    started = time.monotonic()
    result = client.drain(timeout=1)
    assert time.monotonic() - started < 1.6
    assert result.pending > 0


def test_drain_keeps_its_timeout_while_another_thread_drains(
    make_client, receiver, outbox_file
) -> None:
    """With the thread stopped, a drain's last step (giving the lease back) waited
    for the turn with no bound, behind another thread's slow request."""
    stored(outbox_file, 5)
    receiver.responder = lambda request: Reply(delay=2)
    client = make_client(sync_mode=True)
    other = threading.Thread(target=client.drain, kwargs={"timeout": 10})
    other.start()
    deadline = time.monotonic() + 5
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    result = client.drain(timeout=0.2)
    took = time.monotonic() - started
    other.join()
    assert took < 0.8 and result.pending == 5


def test_drain_waits_for_the_client_that_holds_the_lease(make_client, receiver) -> None:
    sender = make_client()
    track_numbered(sender, 20)
    assert sender.uploader.running
    deadline = time.monotonic() + 5
    while not sender.uploader.holds_lease and time.monotonic() < deadline:
        time.sleep(0.01)
    drainer = make_client(sync_mode=True)
    result = drainer.drain(timeout=10)
    assert result.pending == 0
    assert numbers(receiver.accepted()) == list(range(20))


# -- the next batch, claimed while one is on the wire ----------------------------------


def _store_numbered(outbox_file, count: int) -> None:
    from outbox_analytics import Client

    client = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    with client.batch():
        for n in range(count):
            client.track("u", "Numbered", {"n": n})
    client.shutdown()


def _first_seen_order(receiver) -> list[int]:
    seen: list[int] = []
    for message in receiver.accepted():
        n = message["properties"]["n"]
        if n not in seen:
            seen.append(n)
    return seen


def test_the_next_batch_is_claimed_while_one_is_on_the_wire(
    make_client, receiver, outbox_file
) -> None:
    _store_numbered(outbox_file, 250)
    inflight_during_requests: list[int] = []
    client = None

    def slow(request):
        # The next batch is claimed on the uploader's thread while this request
        # is on its way here: look until it is (or for long enough that it
        # never will be), not only as the request arrives.
        deadline = time.monotonic() + 5
        while client is not None and 200 not in inflight_during_requests:
            inflight = client.stats().inflight
            if inflight >= 200 or time.monotonic() > deadline:
                inflight_during_requests.append(inflight)
                break
            time.sleep(0.02)
        return Reply()

    receiver.responder = slow
    client = make_client(upload_size=100)
    assert client.flush(timeout=30).pending == 0
    assert max(inflight_during_requests) == 200  # this batch and the next
    assert _first_seen_order(receiver) == list(range(250))


def test_a_batch_claimed_ahead_goes_back_when_the_one_before_it_fails(
    make_client, receiver, outbox_file
) -> None:
    import tenacity

    _store_numbered(outbox_file, 300)
    answers = iter([Reply(status=503, delay=0.2)])  # the first batch fails, once

    receiver.responder = lambda request: next(answers, Reply())
    client = make_client(upload_size=100, max_retries=0, retry_wait=tenacity.wait_fixed(0))
    deadline = time.monotonic() + 20
    while len(receiver.accepted()) < 300 and time.monotonic() < deadline:
        client.flush(timeout=5)
    assert _first_seen_order(receiver) == list(range(300))  # nothing overtook the first batch
    assert client.stats().pending == 0


def test_shutdown_puts_a_batch_claimed_ahead_back(make_client, receiver, outbox_file) -> None:
    from outbox_analytics import Client

    _store_numbered(outbox_file, 300)
    receiver.responder = lambda request: Reply(delay=0.5)
    client = make_client(upload_size=100)
    deadline = time.monotonic() + 10
    while client.stats().inflight < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    client.shutdown(timeout=5)
    reader = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    stats = reader.stats()
    reader.shutdown()
    assert stats is not None and stats.inflight == 0  # nothing left claimed by nobody
    assert stats.pending + len({m["messageId"] for m in receiver.accepted()}) == 300


def test_a_deadline_that_passes_before_any_answer_reports_no_failure(
    make_client, receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """drain(timeout=0.001) against a healthy server: no "retries ran out", no on_error."""
    reports: list[Exception] = []
    client = make_client(upload=True, on_error=lambda exc, messages: reports.append(exc))
    client.join()  # drain() alone sends
    track_numbered(client, 300)
    for _ in range(3):
        client.drain(timeout=0.001)
    assert reports == []
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    stats = client.stats()
    assert stats is not None and stats.head_attempts == 0 and stats.head_last_error is None
    assert client.drain(timeout=10).pending == 0


def test_a_send_cut_short_by_the_callers_deadline_is_not_counted_as_an_attempt(
    make_client, receiver
) -> None:
    """The rows go back as they were: no answer came, so no attempt failed (the
    test above passed or not by whether its send had begun before the deadline)."""
    receiver.responder = lambda request: Reply(delay=1.0)
    client = make_client(upload=True)
    client.join()  # drain() alone sends
    track_numbered(client, 5)
    assert client.drain(timeout=0.3).pending == 5
    assert len(receiver.requests) == 1  # (it was sent)
    stats = client.stats()
    assert stats is not None and stats.head_attempts == 0 and stats.head_last_error is None


def test_a_missing_ca_bundle_is_a_reported_failure_with_backoff(
    make_client, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """requests raises a plain OSError for it (not a RequestException): still retried, reported."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "no-such-bundle.pem"))
    reports: list[Exception] = []
    client = make_client(
        host=f"https://127.0.0.1:{listener.getsockname()[1]}",
        max_retries=2,
        on_error=lambda exc, messages: reports.append(exc),
    )
    client.track("user", "E")
    result: list[FlushResult] = []
    flusher = threading.Thread(target=lambda: result.append(client.flush()), daemon=True)
    flusher.start()
    flusher.join(15)  # flush() without a timeout: a round of retries gives up
    listener.close()
    assert result and result[0].pending == 1
    assert reports and isinstance(reports[0], RetryableError)
    assert "no-such-bundle" in str(reports[0])
    stats = client.stats()
    assert stats is not None and stats.head_attempts == 3


def test_a_timeout_of_zero_is_refused_at_the_call(tmp_path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        Client("k", outbox_path=str(tmp_path / "o.db"), timeout=0)


@pytest.mark.parametrize("call", ["flush", "drain"])
def test_a_retry_after_longer_than_the_timeout_is_the_reason_given(
    make_client, receiver, call: str, caplog
) -> None:
    receiver.script = [Reply(429, headers={"Retry-After": "30"}, body='{"error": "slow down"}')]
    client = make_client()
    track_numbered(client, 3)
    started = time.monotonic()
    result = getattr(client, call)(timeout=1)
    assert time.monotonic() - started < 5  # the 30 s pause is not waited out
    assert result.pending == 3 and result.sent == 0
    assert len(receiver.requests) == 1  # nothing is sent before the server's time
    assert result.last_error.startswith('HTTP 429: {"error": "slow down"} (the server asked')
    # One request was made, and the retries did not run out: no round was given up.
    assert not [r for r in caplog.records if "could not deliver" in r.getMessage()]


@pytest.mark.parametrize("call", ["flush", "drain"])
def test_a_timeout_during_retries_gives_the_last_failure(
    make_client, receiver, outbox_file, call: str
) -> None:
    """It said "the timeout ran out before the server answered" after several
    answers, each a 503 (or a refused connection); drain() gave the round up."""
    receiver.responder = lambda request: Reply(503, body="down for maintenance")
    stored(outbox_file, 2)
    client = make_client(
        max_retries=100, retry_wait=tenacity.wait_fixed(0.1), sync_mode=call == "drain"
    )  # (drain: no thread of its own)
    result = getattr(client, call)(timeout=1)
    assert result.pending == 2 and len(receiver.requests) >= 2
    assert result.last_error == "HTTP 503: down for maintenance (still being retried)"
    if call == "drain":  # (a thread may be inside its next attempt)
        head = next(client.outbox.rows("pending"))
        assert head.attempts == len(receiver.requests)  # every failed attempt noted in the file
        assert head.last_error.startswith("HTTP 503")


def test_a_sync_mode_timeout_during_retries_says_why(make_client, receiver) -> None:
    receiver.responder = lambda request: Reply(503, body="down for maintenance")
    client = make_client(
        sync_mode=True, timeout=1, max_retries=100, retry_wait=tenacity.wait_fixed(0.1)
    )
    with pytest.raises(RetryableError, match="not delivered: HTTP 503: down for maintenance"):
        client.track("u", "E")
    assert client.stats().pending == 1
