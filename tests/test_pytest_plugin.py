"""The pytest plugin keeps a user's test run offline, as a user's project meets it.

A small application tracks at import (as real ones do, with the write key
set at the top of a module) and its conftest tracks too; its test suite runs
under pytest in a subprocess whose HOME and XDG directories are temporary,
with an audit hook that records every name lookup and connection to
anything but the loopback interface. With the plugin active nothing may
reach the user's state directory or the network, plain and under xdist;
opting in (a marker, the ini option) must give the real pipeline back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Loaded by every interpreter of the run (pytest, xdist's workers): appends
# each lookup or connection that is not loopback to $AUDIT_LOG.
SITECUSTOMIZE = """
import os, sys

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

def _audit(event, args):
    if event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    if host is not None and str(host) not in LOOPBACK:
        with open(os.environ["AUDIT_LOG"], "a") as log:
            log.write(f"{event} {host}\\n")

sys.addaudithook(_audit)
"""

APP = """
import atexit
import os
import outbox_analytics as analytics

analytics.write_key = "live-write-key"  # at import, before any fixture runs
if os.environ.get("APP_ANALYTICS_HOST"):
    analytics.host = os.environ["APP_ANALYTICS_HOST"]
analytics.track("app", "App Imported")
# After pytest has ended, before the process exits: must stay offline too.
atexit.register(lambda: analytics.track("app", "App Exiting"))


def signup(email):
    analytics.identify(email, {"plan": "pro"})
    analytics.track(email, "Signed Up", {"plan": "pro"})
"""

CONFTEST = """
import app  # noqa: F401 - sets the write key, and tracks at import
import outbox_analytics as analytics

analytics.track("conftest", "Conftest Loaded")
"""

TESTS = """
import os
import subprocess
import sys

import pytest

import app
import outbox_analytics as analytics
from outbox_analytics import Client, MemoryTransport


def test_signup_is_tracked(analytics_events):
    app.signup("ada@example.com")
    analytics_events.assert_tracked("Signed Up", plan="pro")


def test_a_test_that_does_not_ask_stays_offline():
    if os.environ.get("EXPECT_LIVE"):
        pytest.skip("live: Client() would send to Segment")
    assert app.signup("bob@example.com") is None
    assert Client("another-key").track("u", "Explicit Client")[0]


def test_a_process_the_test_starts_stays_offline():
    # The application run as a command, as tests of CLIs do: it tracks at import.
    subprocess.run([sys.executable, "-c", "import app"], check=True, timeout=60)


def test_the_session_saw_what_was_tracked_at_import(analytics_session_events):
    if os.environ.get("EXPECT_LIVE"):
        assert analytics_session_events.messages == []
        return
    events = {m.get("event") for m in analytics_session_events.messages}
    assert {"App Imported", "Conftest Loaded"} <= events


def test_a_batch_that_raises_records_nothing(analytics_events):
    with pytest.raises(ValueError):
        with analytics.batch():
            analytics.track("u", "Row Exported", {"row": 1})
            raise ValueError("bad row")
    analytics_events.assert_nothing_sent()
    with analytics.batch():
        analytics.track("u", "Row Exported", {"row": 2})
    assert [m["properties"]["row"] for m in analytics_events.tracks("Row Exported")] == [2]


def test_a_client_with_a_transport_keeps_its_pipeline(tmp_path, analytics_events):
    transport = MemoryTransport()
    client = Client("KEY", outbox_path=str(tmp_path / "o.sqlite3"), transport=transport)
    client.track("user-1", "Report Exported", {"format": "csv"})
    if os.environ.get("USERS_OWN_KILL_SWITCH") == "1":  # it wins: nothing stored or sent
        assert client.flush(timeout=5).sent == 0 and transport.messages == []
    else:
        assert client.flush(timeout=5).sent == 1
        transport.assert_tracked("Report Exported", format="csv")
    client.shutdown()
    analytics_events.assert_nothing_sent()


@pytest.mark.parametrize("n", range(4))
def test_many(analytics_events, n):
    app.signup(f"user{n}@example.com")
    assert len(analytics_events.tracks("Signed Up")) == 1


@pytest.mark.analytics_live
def test_opting_in_sends_for_real(tmp_path):
    if not os.environ.get("LIVE_URL"):
        pytest.skip("no receiver given")
    client = Client("key", host=os.environ["LIVE_URL"], outbox_path=str(tmp_path / "o.db"))
    client.track("u", "Live Event")
    assert client.flush(10).sent == 1
    client.shutdown()
"""


def run_user_suite(
    tmp_path: Path, *pytest_args: str, ini: str = "", **extra_env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the user's suite in a subprocess; return it and the audit log's lines."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    for name, text in {"app.py": APP, "conftest.py": CONFTEST, "test_app.py": TESTS}.items():
        (project / name).write_text(text)
    (project / "pytest.ini").write_text(f"[pytest]\n{ini}\n")
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit_log = tmp_path / "audit.log"
    audit_log.write_text("")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OUTBOX_ANALYTICS", "PYTEST_"))
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(hooks), str(project), str(ROOT)]),
        HOME=str(home_of(tmp_path)),
        XDG_STATE_HOME=str(home_of(tmp_path) / "state"),
        XDG_CACHE_HOME=str(home_of(tmp_path) / "cache"),
        AUDIT_LOG=str(audit_log),
        **extra_env,
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return done, audit_log.read_text().splitlines()


def home_of(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return home


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "workers",
    [
        pytest.param([], id="plain", marks=pytest.mark.every_python),
        pytest.param(["-n", "2"], id="xdist"),
    ],
)
def test_a_users_suite_stays_offline(tmp_path: Path, workers: list[str]) -> None:
    done, audit = run_user_suite(tmp_path, *workers)
    assert audit == []  # no lookup of api.segment.io, no connection anywhere
    assert files_under(home_of(tmp_path)) == []  # no outbox in the state directory
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 passed, 1 skipped" in done.stdout, done.stdout


@pytest.mark.parametrize("switch", ["1", "0"])
def test_a_kill_switch_of_the_users_own(tmp_path: Path, switch: str) -> None:
    """On, the fixture still records; off ("0"), the run is offline all the same."""
    done, audit = run_user_suite(
        tmp_path, OUTBOX_ANALYTICS_DISABLED=switch, USERS_OWN_KILL_SWITCH=switch
    )
    assert audit == []
    assert files_under(home_of(tmp_path)) == []
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 passed, 1 skipped" in done.stdout, done.stdout


def test_what_real_runs_left_is_not_sent_at_the_end_of_a_test_run(tmp_path: Path) -> None:
    """The application's real runs left events pending in its default outbox."""
    state = home_of(tmp_path) / "state"
    leave_pending = (
        "import outbox_analytics as analytics\n"
        "analytics.write_key, analytics.upload = 'live-write-key', False\n"
        "analytics.track('app', 'From A Real Run')\n"
        "print(analytics.default_client.outbox_path)\n"
    )
    env = dict(os.environ, HOME=str(home_of(tmp_path)), XDG_STATE_HOME=str(state))
    env.pop("OUTBOX_ANALYTICS_PATH", None)
    made = subprocess.run(
        [sys.executable, "-c", leave_pending], env=env, capture_output=True, text=True, check=True
    )
    outbox = Path(made.stdout.strip())
    before = outbox.read_bytes()

    done, audit = run_user_suite(tmp_path)
    assert audit == []  # the exit hook did not try to deliver it
    assert files_under(home_of(tmp_path)) == [outbox]
    assert outbox.read_bytes() == before
    assert done.returncode == 0, done.stdout + done.stderr


def test_opting_in_gives_the_real_pipeline(tmp_path: Path, receiver) -> None:
    """The marker for one test; the ini option for the whole run."""
    done, audit = run_user_suite(tmp_path, "-k", "opting_in", LIVE_URL=receiver.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert [m["event"] for r in receiver.requests for m in r.batch] == ["Live Event"]

    live_run, audit = run_user_suite(
        tmp_path,
        ini="outbox_analytics_live = true",
        LIVE_URL=receiver.url,
        APP_ANALYTICS_HOST=receiver.url,
        EXPECT_LIVE="1",
    )
    assert live_run.returncode == 0, live_run.stdout + live_run.stderr
    assert audit == []
    received = [m["event"] for r in receiver.requests for m in r.batch]
    # The import-time and conftest events went through the real outbox, in the state directory.
    assert {"App Imported", "Conftest Loaded"} <= set(received), received
    assert any(p.suffix == ".sqlite3" for p in files_under(home_of(tmp_path) / "state"))


def test_the_plugin_can_be_switched_off(tmp_path: Path) -> None:
    done, audit = run_user_suite(
        tmp_path,
        "-p",
        "no:outbox_analytics",
        "-k",
        "signup_is_tracked",
        APP_ANALYTICS_HOST="http://127.0.0.1:9",  # nothing listens: a real client, offline
    )
    # Without the plugin its fixtures are unknown, and the import-time event is stored for real.
    assert "fixture 'analytics_events' not found" in done.stdout, done.stdout
    assert any(p.suffix == ".sqlite3" for p in files_under(home_of(tmp_path) / "state"))
    assert audit == []
