"""The command line's smaller promises: empty files, dead letters, the WAL, the collector."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from outbox_analytics import Client

from . import test_cli
from .receiver import Reply
from .test_cli import ROOT, snapshot

cli, populated = test_cli.cli, test_cli.populated  # the fixtures

KEY = {"OUTBOX_ANALYTICS_WRITE_KEY": "k"}

WRITING = [
    ("drain", "{path}", "--host", "http://127.0.0.1:9", "--timeout", "2"),
    ("requeue", "{path}", "--all", "--yes"),
    ("purge", "{path}", "--state", "dead", "--yes"),
    ("purge", "{path}", "--user-id", "u", "--yes"),
    ("vacuum", "{path}"),
    ("import", "{path}", "{events}"),
    ("track", "{path}", "--user-id", "u", "--event", "E"),
]


@pytest.mark.parametrize("args", WRITING)
@pytest.mark.parametrize("kind", ["empty file", "empty database"])
def test_writing_commands_refuse_what_is_not_an_outbox(
    cli, tmp_path: Path, args, kind: str
) -> None:
    """A wrong path is an error, as reading commands say, never a new outbox made of it."""
    path = tmp_path / "wrong.db"
    if kind == "empty file":
        path.write_bytes(b"")
    else:
        sqlite3.connect(path).execute("PRAGMA user_version = 7").connection.close()
    events = tmp_path / "events.jsonl"
    message = {"type": "track", "userId": "u", "event": "E", "messageId": "m1"}
    message["timestamp"] = "2026-01-01T00:00:00+00:00"
    events.write_text(json.dumps(message) + "\n")
    before = snapshot(tmp_path)
    result = cli(*(arg.format(path=path, events=events) for arg in args), env=KEY)
    assert result.code == 2, result
    assert "not an outbox" in result.err
    assert snapshot(tmp_path) == before


@pytest.mark.every_python
def test_import_and_track_still_make_a_missing_file(cli, tmp_path: Path) -> None:
    tracked = cli("track", tmp_path / "new.db", "--user-id", "u", "--event", "E", env=KEY)
    assert tracked.code == 0, tracked.err
    assert cli("status", tmp_path / "new.db", "--json").json()["pending"] == 1


@pytest.mark.every_python
def test_drain_fails_when_what_it_sent_was_dead_lettered(cli, populated: Path, receiver) -> None:
    """Viewed events are rejected (400, the server's words), the rest accepted: exit 1, said."""

    def answer(request) -> Reply:
        if any(message.get("event") == "Viewed" for message in request.batch):
            return Reply(400, body='{"code": "invalid", "message": "no Viewed here"}')
        return Reply()

    receiver.responder = answer
    result = cli("drain", populated, "--host", receiver.url, env=KEY)
    assert result.code == 1, result
    drained = result.json()
    assert drained["dead"] > 0 and drained["pending"] == 0
    said = f"{drained['dead']} events were rejected and dead-lettered"
    assert said in result.err and "no Viewed here" in result.err
    assert "--state dead" in result.err and "requeue" in result.err


def test_status_shows_the_write_ahead_log_apart(cli, tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    client = Client("k", outbox_path=str(path), upload=False)
    try:
        for n in range(50):  # a writer still open: its log is not copied back yet
            client.track("u", "E", {"n": n})
        wal = os.path.getsize(f"{path}-wal")
        database = os.path.getsize(path)
        assert wal > 0
        stats = cli("status", path, "--json").json()
        table = cli("status", path).out
    finally:
        client.shutdown()
    assert stats["wal_bytes"] == wal and stats["file_bytes"] == database + wal
    assert f"size             {database:,} bytes, and {wal:,} in the write-ahead log" in table


# -- the collector ------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _post(url: str, batch: list[dict]) -> None:
    request = urllib.request.Request(
        url + "/v1/batch",
        data=json.dumps({"batch": batch}).encode(),
        headers={"Authorization": "Basic eDo=", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_collector_streams_messages_and_reports_counts_as_it_goes(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "outbox_analytics", "collector", "--out", str(out),
         "--report-every", "0.2"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert process.stderr is not None
        url = process.stderr.readline().split()[-1]
        _post(url, [{"type": "track", "messageId": "warm-up", "event": "E"}])
        before = _rss_mb(process.pid)
        pad = "p" * 1000
        for start in range(0, 30_000, 400):  # 30 MB of messages
            batch = [
                {"type": "track", "messageId": f"m{n}", "event": "E", "properties": {"pad": pad}}
                for n in range(start, start + 400)
            ]
            _post(url, batch)
        grown = _rss_mb(process.pid) - before
        deadline = time.monotonic() + 5
        line = ""
        while "received 30001" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()  # a count line, while it runs
        assert "received 30001, unique 30001, duplicates 0" in line
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/messages", timeout=10)
        assert refused.value.code == 404
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
    assert json.loads(err.strip().splitlines()[-1])["unique"] == 30_001
    assert sum(1 for _ in out.open()) == 30_001
    assert grown < 15, grown  # kept whole, 30,000 such messages take over 40 MB


def test_a_collector_that_keeps_no_messages_still_counts_duplicates() -> None:
    from outbox_analytics.collector import Collector

    with Collector(keep_messages=False) as collector:
        _post(collector.url, [{"messageId": "a"}, {"messageId": "b"}, {"messageId": "a"}])
        _post(collector.url, [{"messageId": {"nested": 1}}, {"messageId": {"nested": 1}}])
        assert collector.counts()["unique"] == 3
        assert collector.counts()["duplicates"] == 2
        assert collector.messages() == []
