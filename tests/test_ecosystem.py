"""Fitting into users' code and tests: the pytest fixture, the kill switch, before_send."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import outbox_analytics
import outbox_analytics.testing
from outbox_analytics import Client, MemoryTransport

ROOT = Path(__file__).resolve().parents[1]

USER_TESTS = """
import threading

import pytest

import outbox_analytics as analytics
from outbox_analytics import Client

analytics.write_key = "live-write-key"  # as an application would, at import


def signup(email, plan):
    analytics.identify(email, {"plan": plan})
    analytics.track(email, "Signed Up", {"plan": plan})


def export_report(client):
    client.track("ops", "Report Exported", {"rows": 10})


def test_signup_is_tracked(analytics_events):
    signup("ada@example.com", "pro")
    event = analytics_events.assert_tracked("Signed Up", plan="pro")
    assert event["userId"] == "ada@example.com"
    assert [m["type"] for m in analytics_events.messages] == ["identify", "track"]


def test_explicit_clients_are_captured_too(analytics_events):
    client = Client("another-key")
    export_report(client)
    assert analytics_events.tracks("Report Exported", rows=10)
    assert threading.active_count() == 1  # no uploader thread was started


def test_nothing_sent(analytics_events):
    analytics_events.assert_nothing_sent()


def test_a_wrong_expectation_fails_with_what_was_sent(analytics_events):
    signup("bob@example.com", "free")
    with pytest.raises(AssertionError, match="Signed Up"):
        analytics_events.assert_tracked("Signed Up", plan="pro")
"""


def test_a_users_test_suite_uses_the_fixture(tmp_path: Path) -> None:
    (tmp_path / "test_user_app.py").write_text(USER_TESTS)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HOME": str(home),
        "XDG_STATE_HOME": str(home / "state"),
    }
    env.pop("OUTBOX_ANALYTICS_PATH", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user_app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
    left_behind = [
        p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    assert left_behind == []  # no outbox file, no lock file, anywhere


KILL_SWITCH = """
import threading
import outbox_analytics as analytics
from outbox_analytics import Client

ok, msg = analytics.track("u", "Event", {"a": 1})  # no write key at all
assert ok and msg["event"] == "Event"
client = Client(None, outbox_path="never.db")
assert client.track("u", "Event")[0]
assert client.flush().pending == 0 and client.stats() is None
try:
    client.track("u", 42)
except AssertionError:
    pass  # still validated
else:
    raise SystemExit("bad input was not refused")
assert threading.active_count() == 1
print("ok")
"""


def test_the_kill_switch_stores_and_sends_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUTBOX_ANALYTICS_DISABLED": "1"}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILL_SWITCH)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.stdout.strip() == "ok", result.stderr
    assert list(tmp_path.rglob("*")) == []


def test_before_send_can_change_drop_or_fail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def scrub(message: dict) -> dict | None:
        if message["event"] == "Internal":
            return None
        if message["event"] == "Broken":
            raise KeyError("oops")
        message["properties"].pop("email", None)
        return message

    client = Client("k", outbox_path=str(tmp_path / "o.db"), upload=False, before_send=scrub)
    ok, kept = client.track("u", "Signed Up", {"email": "ada@example.com", "plan": "pro"})
    assert ok and kept["properties"] == {"plan": "pro"}
    assert client.track("u", "Internal")[0] is False
    assert client.track("u", "Broken")[0] is False  # the caller is not broken
    assert client.dropped_by_before_send == 2
    assert [r.message for r in client.outbox.rows()] == [kept]  # scrubbed before it was stored
    assert any("before_send failed" in r.getMessage() for r in caplog.records)
    client.shutdown()


def test_before_send_returning_something_unsendable_drops_the_event(tmp_path: Path) -> None:
    client = Client(
        "k",
        outbox_path=str(tmp_path / "o.db"),
        upload=False,
        before_send=lambda m: {**m, "properties": {("a", 1): "a key JSON cannot have"}},
    )
    assert client.track("u", "E")[0] is False
    assert client.stats().pending == 0
    client.shutdown()


def test_memory_transport_behind_a_real_outbox(tmp_path: Path) -> None:
    transport = MemoryTransport()
    client = Client("k", outbox_path=str(tmp_path / "o.db"), transport=transport, gzip=True)
    sent = [client.track("u", "E", {"n": n})[1] for n in range(5)]
    assert client.flush(timeout=10).sent == 5
    assert transport.messages == sent
    assert [m["properties"]["n"] for m in transport.tracks("E")] == [0, 1, 2, 3, 4]
    client.shutdown()


def test_many_clients_add_no_handler() -> None:
    # (What import configures is checked in a fresh interpreter in test_client_options.)
    logger = logging.getLogger("outbox_analytics")
    before = list(logger.handlers)
    for _ in range(5):
        Client("k", send=False)
    assert logger.handlers == before
    assert not [h for h in logger.handlers if type(h).__name__ == "NullHandler"]


def test_the_public_surface_is_pinned() -> None:
    assert sorted(outbox_analytics.__all__) == sorted(
        [
            "APIError", "Client", "ClientConfig", "DeliveryError", "EndpointRejected",
            "FlushResult", "MemoryTransport", "NotAnOutbox", "OutboxAnalyticsError", "OutboxBusy",
            "OutboxDamaged",
            "OutboxError", "OutboxFull", "OutboxMismatch", "OutboxStats", "OutboxUnavailable",
            "RetryableError", "VERSION", "alias", "batch", "default_client",
            "default_outbox_path", "flush", "group", "identify", "join", "page",
            "screen", "shutdown", "stats", "track",
        ]
    )  # fmt: skip
    for name in outbox_analytics.__all__:
        assert hasattr(outbox_analytics, name), name


def test_a_client_built_under_a_capture_says_so_when_used_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with outbox_analytics.testing.capture():
        client = Client("key")  # offline: it has no outbox
    with caplog.at_level(logging.WARNING, logger="outbox_analytics"):
        ok, message = client.track("u", "After The Capture")
    assert ok is False and message["event"] == "After The Capture"
    assert "built while a test capture was on" in caplog.text


def test_a_captured_batch_records_its_events_only_when_it_ends_well(store_only) -> None:
    with outbox_analytics.testing.capture() as events:
        with pytest.raises(KeyError), store_only.batch():
            store_only.track("u", "Lost")
            with store_only.batch():  # nested: the outer block decides
                store_only.track("u", "Lost Too")
            raise KeyError("the job failed")
        assert events.messages == []
        with store_only.batch():
            store_only.track("u", "Kept", {"n": 1})
            store_only.track("u", "Kept", {"n": 2})
            assert events.messages == []  # not before the block ends
        assert [m["properties"]["n"] for m in events.tracks("Kept")] == [1, 2]
    stats = store_only.stats()
    assert stats is not None and stats.pending == 0  # a capture stores nothing


def test_a_transport_double_without_its_own_file_is_captured(tmp_path: Path, monkeypatch) -> None:
    """It would otherwise open, and drain, the application's real outbox."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("OUTBOX_ANALYTICS_PATH", raising=False)
    transport = MemoryTransport()
    with outbox_analytics.testing.capture() as events:
        client = Client("key", transport=transport)
        client.track("u", "Captured")
    assert [m["event"] for m in events.messages] == ["Captured"]
    assert transport.messages == [] and client.outbox is None
    assert not (tmp_path / "state").exists()
