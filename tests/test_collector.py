"""The local collector, served for real on 127.0.0.1 and spoken to over real HTTP."""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from outbox_analytics import Client
from outbox_analytics.collector import MAX_BODY_BYTES, Collector

BASIC = "Basic " + base64.b64encode(b"write-key:").decode()
BEARER = "Bearer some.jwt.token"


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as server:
        yield server


def message(message_id: str, event: str = "Ran") -> dict[str, Any]:
    return {"type": "track", "messageId": message_id, "userId": "u1", "event": event}


def encode(batch: Any, **extra: Any) -> bytes:
    return json.dumps({"batch": batch, "sentAt": "2024-01-01T00:00:00Z", **extra}).encode()


def post(
    collector: Collector,
    body: bytes | Iterator[bytes],
    authorization: str | None = BASIC,
    path: str = "/v1/batch",
    **headers: str,
) -> requests.Response:
    headers = {"Content-Type": "application/json", **headers}
    if authorization is not None:
        headers["Authorization"] = authorization
    return requests.post(collector.url + path, data=body, headers=headers, timeout=5)


def test_binds_loopback_on_a_free_port_by_default(collector: Collector) -> None:
    assert collector.url.startswith("http://127.0.0.1:")
    port = int(collector.url.rsplit(":", 1)[1])
    assert port > 0
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def test_a_plain_batch_with_basic_auth_is_accepted(collector: Collector) -> None:
    batch = [message("m1", "A"), message("m2", "B")]
    response = post(collector, encode(batch, writeKey="write-key"))
    assert response.status_code == 200
    assert response.json() == {"success": True}
    assert collector.messages() == batch
    assert collector.counts() == {
        "received": 2,
        "unique": 2,
        "duplicates": 0,
        "requests": 1,
        "rejected": 0,
    }


def test_a_gzip_batch_with_bearer_auth_is_accepted(collector: Collector) -> None:
    batch = [message(f"m{i}") for i in range(50)]
    body = gzip.compress(encode(batch))
    response = post(collector, body, authorization=BEARER, **{"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert collector.messages() == batch


def test_import_path_is_accepted_like_batch(collector: Collector) -> None:
    response = post(collector, encode([message("m1")]), path="/v1/import")
    assert response.status_code == 200
    assert collector.counts()["received"] == 1


@pytest.mark.parametrize("authorization", [None, "", "Token abc", "Basic", "Bearer  ", "Digest x"])
def test_missing_or_odd_authorization_is_refused_with_401(
    collector: Collector, authorization: str | None
) -> None:
    response = post(collector, encode([message("m1")]), authorization=authorization)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert collector.counts()["received"] == 0
    assert collector.counts()["rejected"] == 1
    assert collector.messages() == []


BAD_BODIES = {
    "not json": b"this is not json",
    "empty": b"",
    "not an object": b"[1, 2, 3]",
    "no batch": b'{"sentAt": "2024-01-01T00:00:00Z"}',
    "batch is an object": b'{"batch": {"messageId": "m1"}}',
    "batch of numbers": b'{"batch": [1, 2]}',
    "batch mixing objects and strings": b'{"batch": [{"messageId": "m1"}, "m2"]}',
    "not utf-8": b'{"batch": ["\xff\xfe"]}',
    "nested too deep": b"[" * 200_000 + b"]" * 200_000,
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_a_bad_body_is_refused_with_400_and_the_server_keeps_serving(
    collector: Collector, body: bytes
) -> None:
    response = post(collector, body)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"
    assert response.json()["message"]
    assert post(collector, encode([message("m1")])).status_code == 200
    assert collector.counts() == {
        "received": 1,
        "unique": 1,
        "duplicates": 0,
        "requests": 1,
        "rejected": 1,
    }


@pytest.mark.parametrize(
    "body",
    [b"not gzip at all", gzip.compress(encode([message("m1")]), mtime=0)[:-12]],
    ids=["not-gzip", "truncated"],  # (a gzip header's time differed between xdist workers)
)
def test_a_broken_or_truncated_gzip_body_is_refused_with_400(
    collector: Collector, body: bytes
) -> None:
    response = post(collector, body, **{"Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"
    assert collector.counts()["received"] == 0


def test_an_invalid_content_length_is_refused_and_the_server_keeps_serving(
    collector: Collector,
) -> None:
    port = int(collector.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(
            b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + BASIC.encode()
            + b"\r\nContent-Length: lots\r\n\r\n{}"
        )
        answer = raw.makefile("rb").read()  # the server closes: the rest is unparseable
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in answer
    assert post(collector, encode([message("m1")])).status_code == 200


def test_a_chunked_body_is_refused_and_the_server_keeps_serving(collector: Collector) -> None:
    chunks = iter([encode([message("m1")])])  # requests sends an iterator chunked
    response = post(collector, chunks)
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert response.status_code == 400
    assert response.headers["Connection"] == "close"
    assert post(collector, encode([message("m2")])).status_code == 200
    assert [m["messageId"] for m in collector.messages()] == ["m2"]


def test_unknown_paths_get_404(collector: Collector) -> None:
    assert post(collector, encode([message("m1")]), path="/v1/track").status_code == 404
    assert post(collector, encode([message("m1")]), path="/").status_code == 404
    response = requests.get(collector.url + "/nothing", timeout=5)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert collector.counts()["received"] == 0
    assert collector.counts()["rejected"] == 3


def padded_body(size: int) -> bytes:
    """A valid batch body of exactly `size` bytes."""
    empty = encode([{"messageId": "big", "padding": ""}])
    body = encode([{"messageId": "big", "padding": "x" * (size - len(empty))}])
    assert len(body) == size
    return body


def test_a_body_at_the_limit_is_accepted(collector: Collector) -> None:
    assert post(collector, padded_body(MAX_BODY_BYTES)).status_code == 200
    assert collector.counts()["received"] == 1


def test_a_body_over_the_limit_gets_413_and_the_connection_stays_usable(
    collector: Collector,
) -> None:
    with requests.Session() as session:
        headers = {"Authorization": BASIC}
        url = collector.url + "/v1/batch"
        response = session.post(url, data=padded_body(MAX_BODY_BYTES + 1), headers=headers)
        assert response.status_code == 413
        assert response.json()["code"] == "request_too_large"
        response = session.post(url, data=encode([message("m1")]), headers=headers)
        assert response.status_code == 200
    assert collector.counts()["received"] == 1
    assert collector.counts()["rejected"] == 1


def test_a_gzip_body_inflating_past_the_limit_gets_413(collector: Collector) -> None:
    body = gzip.compress(padded_body(MAX_BODY_BYTES + 1))
    assert len(body) < 10_000  # small on the wire: the limit is on the inflated size
    response = post(collector, body, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert collector.counts()["received"] == 0


def test_a_gzip_body_far_over_the_limit_on_the_wire_gets_413(collector: Collector) -> None:
    body = gzip.compress(padded_body(3 * MAX_BODY_BYTES), compresslevel=0)
    response = post(collector, body, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413


def test_duplicates_are_counted_by_message_id_across_requests(collector: Collector) -> None:
    assert post(collector, encode([message("a"), message("b")])).status_code == 200
    assert post(collector, encode([message("a")])).status_code == 200
    assert collector.counts() == {
        "received": 3,
        "unique": 2,
        "duplicates": 1,
        "requests": 2,
        "rejected": 0,
    }
    assert [m["messageId"] for m in collector.messages()] == ["a", "b", "a"]


def test_messages_without_an_id_are_each_unique_and_ids_are_compared_by_value(
    collector: Collector,
) -> None:
    batch = [{"type": "track"}, {"type": "track"}, {"messageId": 1}, {"messageId": "1"}]
    assert post(collector, encode(batch)).status_code == 200
    assert post(collector, encode([{"messageId": 1}])).status_code == 200
    assert collector.counts()["unique"] == 4
    assert collector.counts()["duplicates"] == 1


def test_messages_returns_copies(collector: Collector) -> None:
    post(collector, encode([{"messageId": "m1", "properties": {"n": 1}}]))
    collector.messages()[0]["properties"]["n"] = 2
    assert collector.messages()[0]["properties"] == {"n": 1}


def test_messages_are_written_to_out_as_json_lines_in_order() -> None:
    out = io.StringIO()
    with Collector(out=out) as collector:
        post(collector, encode([message("m1", "A"), message("m2", "B")]))
        post(collector, encode([message("m3", "C")]))
        post(collector, b"not json")
        post(collector, encode([message("m4")]), authorization=None)
    lines = out.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [
        message("m1", "A"),
        message("m2", "B"),
        message("m3", "C"),
    ]
    assert out.getvalue().endswith("\n")


def test_json_lines_reach_a_real_file_before_the_collector_stops(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    with path.open("w", encoding="utf-8") as out, Collector(out=out) as collector:
        post(collector, encode([message("m1", "Ünïcode"), message("m2")]))
        post(collector, encode([message("m1", "Ünïcode")]))
        written = path.read_text(encoding="utf-8")  # flushed per request, still running
    lines = written.splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["messageId"] for line in lines] == ["m1", "m2", "m1"]
    assert json.loads(lines[0])["event"] == "Ünïcode"


def test_stats_and_messages_over_http(collector: Collector) -> None:
    batch = [message("a"), message("b")]
    post(collector, encode(batch))
    post(collector, encode(batch[:1]))
    post(collector, b"{}")
    stats = requests.get(collector.url + "/stats", timeout=5)
    assert stats.status_code == 200
    assert stats.headers["Content-Type"] == "application/json"
    assert stats.json() == {
        "received": 3,
        "unique": 2,
        "duplicates": 1,
        "requests": 2,
        "rejected": 1,
    }
    listed = requests.get(collector.url + "/messages", timeout=5)
    assert listed.json() == [message("a"), message("b"), message("a")]


def test_connections_are_kept_alive() -> None:
    with Collector() as collector:
        port = int(collector.url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        sockets = []
        for i in range(3):
            body = encode([message(f"m{i}")])
            connection.request("POST", "/v1/batch", body, {"Authorization": BASIC})
            response = connection.getresponse()
            assert response.status == 200
            assert response.read() == b'{"success": true}'
            sockets.append(connection.sock)
        connection.close()
    assert sockets[0] is not None
    assert sockets == [sockets[0]] * 3  # http.client drops the socket when told to close


def test_small_requests_are_not_delayed_by_nagle(collector: Collector) -> None:
    with requests.Session() as session:
        url, headers = collector.url + "/v1/batch", {"Authorization": BASIC}
        session.post(url, data=encode([]), headers=headers)
        started = time.monotonic()
        for i in range(20):
            session.post(url, data=encode([message(f"m{i}")]), headers=headers)
        elapsed = time.monotonic() - started
    # A 40 ms delayed ACK per response would take 0.8 s; without it this takes milliseconds.
    assert elapsed < 0.4
    assert collector.counts()["received"] == 20


def test_concurrent_requests_are_all_counted(collector: Collector) -> None:
    def send(worker: int) -> None:
        with requests.Session() as session:
            for request in range(10):
                batch = [message(f"w{worker}-r{request}-{i}") for i in range(5)]
                response = session.post(
                    collector.url + "/v1/batch",
                    data=encode(batch),
                    headers={"Authorization": BASIC},
                    timeout=5,
                )
                assert response.status_code == 200

    threads = [threading.Thread(target=send, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert collector.counts() == {
        "received": 400,
        "unique": 400,
        "duplicates": 0,
        "requests": 80,
        "rejected": 0,
    }


def test_leaving_the_context_stops_the_server_and_kept_alive_connections() -> None:
    with requests.Session() as session:
        with Collector() as collector:
            url = collector.url + "/v1/batch"
            response = session.post(url, data=encode([]), headers={"Authorization": BASIC})
            assert response.status_code == 200
        with pytest.raises(requests.ConnectionError):
            session.post(url, data=encode([]), headers={"Authorization": BASIC}, timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.get(collector.url + "/stats", timeout=5)


def test_stop_without_start_returns_and_stop_is_idempotent() -> None:
    collector = Collector()

    def stop_twice() -> None:
        collector.stop()
        collector.stop()

    stopper = threading.Thread(target=stop_twice)
    stopper.start()
    stopper.join(timeout=5)
    assert not stopper.is_alive()
    with pytest.raises(RuntimeError):
        collector.start()


def test_serve_forever_blocks_until_stopped_from_another_thread() -> None:
    collector = Collector()
    server = threading.Thread(target=collector.serve_forever)
    server.start()
    try:
        assert post(collector, encode([message("m1")])).status_code == 200
    finally:
        collector.stop()
    server.join(timeout=5)
    assert not server.is_alive()
    assert collector.counts()["received"] == 1


@pytest.mark.parametrize("gzip_bodies", [False, True])
def test_a_client_delivers_every_event_to_the_collector(
    collector: Collector, tmp_path: Path, gzip_bodies: bool
) -> None:
    client = Client(
        "k",
        host=collector.url,
        outbox_path=str(tmp_path / "o.db"),
        upload_interval=0.05,
        gzip=gzip_bodies,
    )
    try:
        for i in range(25):
            client.track(f"user-{i}", "Exported", {"row": i})
        client.flush(timeout=10)
        assert collector.counts()["unique"] == 25
        assert collector.counts()["rejected"] == 0
        rows = sorted(m["properties"]["row"] for m in collector.messages())
        assert rows == list(range(25))
    finally:
        client.shutdown()


def test_without_keeping_messages_the_counts_still_add_up() -> None:
    body = {"batch": [{"messageId": "a"}, {"messageId": "a"}, {"messageId": "b"}]}
    with Collector(keep_messages=False) as collector:
        reply = requests.post(
            collector.url + "/v1/batch", json=body, headers={"Authorization": "Basic eDo="}
        )
        assert reply.status_code == 200
        assert collector.counts()["received"] == 3
        assert collector.counts()["unique"] == 2
        assert collector.messages() == []
