"""The client's parts: options written once, messages without a client, sinks, exit delivery."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import outbox_analytics
from outbox_analytics import Client, ClientConfig, exit_delivery, messages, testing
from outbox_analytics.config import option_names
from outbox_analytics.store import Outbox

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.every_python
def test_the_options_are_written_once_and_everything_else_derives_from_them() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(ClientConfig)}
    parameters = inspect.signature(Client).parameters
    assert list(parameters) == list(fields) == option_names()
    assert {name: p.default for name, p in parameters.items()} == fields
    for name, default in fields.items():  # each is a module setting, with its default
        expected = True if name == "hand_off_at_exit" else default
        assert getattr(outbox_analytics, name) is expected, name
        assert getattr(Client.DefaultConfig, name) is default  # Segment's name for them


@pytest.mark.analytics_live
def test_every_module_setting_reaches_the_default_client(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def before_send(msg: dict) -> dict:
        return {**msg, "properties": {"changed": True}}

    settings = {
        "write_key": "k", "outbox_path": str(tmp_path / "o.sqlite3"), "upload": False,
        "upload_size": 7, "max_rate_limit_duration": 5.0, "before_send": before_send,
    }  # fmt: skip
    for name, value in settings.items():
        monkeypatch.setattr(outbox_analytics, name, value)
    monkeypatch.setattr(outbox_analytics, "default_client", None)
    ok, msg = outbox_analytics.track("u", "E", {"n": 1})
    client = outbox_analytics.default_client
    assert ok and client is not None
    assert client.config.upload_size == 7 and client.config.max_rate_limit_duration == 5.0
    assert msg["properties"] == {"changed": True}  # the module's before_send ran
    client.shutdown(timeout=0)


def test_a_config_shows_no_secret() -> None:
    config = ClientConfig(
        "wk-SECRET", proxies={"https": "http://user:PROXYPASS@127.0.0.1:1"}, send=False
    )
    assert "SECRET" not in repr(config) and "PROXYPASS" not in repr(config)
    assert config.host == outbox_analytics.config.DEFAULT_HOST  # as the client uses it
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.send = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"upload_size": 0}, "upload_size must be an integer >= 1"),
        ({"timeout": 0}, "timeout must be a number > 0"),
        ({"host": "ftp://x"}, r"host must be an http\(s\) URL"),
        ({"before_send": 3}, "before_send must be callable"),
        ({"oauth_client_id": "id"}, "OAuth needs all three"),
    ],
)
def test_a_bad_option_fails_at_the_call_with_its_name(options: dict, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        Client("k", send=False, **options)


def test_messages_are_built_and_checked_without_a_client() -> None:
    built = messages.track("u1", "Signed Up", {"plan": "pro"}, message_id=7)
    assert built["type"] == "track" and built["messageId"] == "7"
    assert built["context"]["library"]["name"] == "outbox-analytics"
    assert messages.validate_message(built) == built
    with pytest.raises(AssertionError, match="event must be"):
        messages.track("u1", 3)  # type: ignore[arg-type]
    ok, from_client = Client("k", send=False).track("u1", "Signed Up", {"plan": "pro"})
    assert ok and from_client.keys() == built.keys()


@pytest.mark.every_python
def test_client_methods_have_their_builders_parameters() -> None:
    for name in messages.MESSAGE_TYPES:
        built = inspect.signature(getattr(messages, name)).parameters
        method = inspect.signature(getattr(Client, name)).parameters
        assert list(method) == ["self", *built], name


@pytest.mark.analytics_live
def test_a_capture_repoints_a_client_made_before_it_and_hands_it_back(tmp_path: Path) -> None:
    client = Client("k", outbox_path=str(tmp_path / "o.sqlite3"), upload=False)
    with testing.capture() as events:
        assert client.track("u", "Captured")[0]
    assert [m["event"] for m in events.messages] == ["Captured"]
    assert client.track("u", "Stored")[0]
    with Outbox(tmp_path / "o.sqlite3") as outbox:
        assert [row.message["event"] for row in outbox.rows("pending")] == ["Stored"]
    client.shutdown(timeout=0)


def test_the_package_never_imports_persist_queue() -> None:
    tomllib = pytest.importorskip("tomllib")  # 3.11+; the full suite runs on 3.11
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(dep.startswith("persist-queue") for dep in runtime)
    code = (
        "import sys, outbox_analytics as a; c = a.Client('k', send=False); c.track('u', 'E');"
        " from outbox_analytics import cli, store; print('persistqueue' in sys.modules)"
    )
    job = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert job.stdout.strip() == "False", job.stderr


EXITING_JOB = """
import sys, outbox_analytics as analytics
from outbox_analytics import exit_delivery
analytics.write_key = "k"
analytics.host = "http://127.0.0.1:9"   # nothing listens: every attempt fails at once
analytics.outbox_path = sys.argv[1]
analytics.max_retries = 100
analytics.track("u", "Left Behind")
if sys.argv[2] == "off":
    exit_delivery.turn_off()
"""


@pytest.mark.parametrize("switch", ["on", "off"])
def test_turning_exit_delivery_off_sends_and_says_nothing_at_exit(
    tmp_path: Path, switch: str
) -> None:
    path = tmp_path / "o.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUTBOX_ANALYTICS_HANDOFF": "0"}
    env.pop("OUTBOX_ANALYTICS_DISABLED", None)
    started = time.monotonic()
    job = subprocess.run(
        [sys.executable, "-c", EXITING_JOB, str(path), switch],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    took = time.monotonic() - started
    assert job.returncode == 0, job.stderr
    said = "not sent yet stay in" in job.stderr
    assert said == (switch == "on"), job.stderr  # the exit line, only when delivery is on
    assert exit_delivery.EXIT_BUDGET < 5  # (what "quick" below is measured against)
    if switch == "off":
        assert took < 10  # no budget spent retrying an unreachable server
    with Outbox(path) as outbox:  # nothing lost either way: the event waits for the next run
        assert outbox.stats().pending == 1


# -- from a README-only tester's attack on the rework --------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"host": "ftp://user:hunter2@example.com"},
        {"host": "http://user:hunter2@127.0.0.1:99999"},
        {"host": "http://user:hunter2@[::1"},
        {"proxies": "http://u:hunter2@proxy:3128"},
        {"proxies": ["http://bob:hunter2@proxy:3128"]},
        {"proxies": {"https": 5}},
        {"oauth_auth_server": "gopher://id:hunter2@auth"},
    ],
)
def test_an_option_refused_never_quotes_its_password(options: dict) -> None:
    with pytest.raises((ValueError, TypeError, AssertionError)) as refused:
        Client("k", send=False, **options)
    assert "hunter2" not in str(refused.value) and "r2@" not in str(refused.value)
    assert next(iter(options)) in str(refused.value)  # the option is named


@pytest.mark.parametrize(
    "options",
    [
        {"send": "false"}, {"sync_mode": "false"}, {"upload": "no"}, {"fsync": None},
        {"gzip": "no"}, {"debug": "yes"},
        {"timeout": float("nan")}, {"timeout": float("inf")}, {"upload_interval": float("nan")},
        {"max_total_backoff_duration": float("nan")}, {"max_rate_limit_duration": float("nan")},
        {"transport": "x"}, {"log_handler": logging.getLogger("x")},
        {"oauth_auth_server": "notaurl"}, {"oauth_auth_server": 1}, {"oauth_scope": None},
    ],
)  # fmt: skip
def test_a_wrong_option_fails_at_client_naming_it(options: dict, tmp_path: Path) -> None:
    with pytest.raises((ValueError, TypeError, AssertionError), match=next(iter(options))):
        Client("k", outbox_path=str(tmp_path / "o.sqlite3"), upload=False, **options)
    assert not (tmp_path / "o.sqlite3").exists()  # refused before any file is made


def test_options_cannot_be_changed_after_client_the_key_least_of_all(tmp_path: Path) -> None:
    client = Client("KEY_A", outbox_path=str(tmp_path / "o.sqlite3"), upload=False)
    for name, value in (("write_key", "KEY_B"), ("host", "http://127.0.0.1:1"), ("send", False)):
        with pytest.raises(AttributeError, match=f"client.{name} is read only"):
            setattr(client, name, value)
    assert client.write_key == "KEY_A" and client.send is True
    client.shutdown(timeout=0)


def test_what_a_client_accepts_export_and_import_carry(tmp_path: Path) -> None:
    from outbox_analytics import cli

    source, copy = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    client = Client("k", outbox_path=str(source), upload=False)
    for event in ("Good", "", "Also Good"):  # Segment takes an empty event name too
        client.track("u", event)
    client.shutdown(timeout=0)
    exported = tmp_path / "e.jsonl"
    assert cli.main(["export", str(source), "-o", str(exported)]) == 0
    assert cli.main(["import", str(copy), str(exported)]) == 0
    with Outbox(copy) as outbox:
        assert [r.message["event"] for r in outbox.rows("pending")] == ["Good", "", "Also Good"]
    with pytest.raises(ValueError, match="needs event, a text"):
        messages.validate_message({**messages.track("u", "E"), "event": 5})


def test_a_drain_cut_by_its_timeout_says_so_not_an_earlier_runs_error(
    make_client, receiver
) -> None:
    from .receiver import Reply

    receiver.responder = lambda request: Reply(status=503, body='{"error": "down"}')
    first = make_client(max_retries=0)
    first.track("u", "E")
    assert first.flush(timeout=5).last_error is not None  # the 503, stored on the row
    first.shutdown(timeout=0)
    receiver.responder = lambda request: Reply(delay=3)  # now slow
    second = make_client(sync_mode=True, timeout=10)
    result = second.drain(timeout=0.5)
    assert (
        result.pending == 1
        and result.last_error == "the timeout ran out before the server answered"
    )


SPAWN_POOL = """
import multiprocessing, sys
import outbox_analytics as analytics
analytics.write_key = "k"
analytics.host = sys.argv[1]
analytics.outbox_path = sys.argv[2]

def work(n):
    analytics.track("u", "Worked", {"n": n})

if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(work, range(6))
        pool.close()
        pool.join()
"""


def test_a_spawn_pools_workers_never_say_events_are_left_that_the_other_sends(
    receiver, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUTBOX_ANALYTICS_HANDOFF": "0"}
    env.pop("OUTBOX_ANALYTICS_DISABLED", None)
    script = tmp_path / "pool.py"  # (spawn workers import the main module from a file)
    script.write_text(SPAWN_POOL)
    for run in range(4):  # the race showed in about two runs of three
        path = tmp_path / f"o{run}.sqlite3"
        job = subprocess.run(
            [sys.executable, str(script), receiver.url, str(path)],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert job.returncode == 0, job.stderr
        with Outbox(path) as outbox:
            left = outbox.stats().pending
        assert left == 0 and "not sent yet" not in job.stderr, job.stderr
    assert len(receiver.accepted()) == 24
