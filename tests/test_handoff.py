"""The exit hand-off (handoff.py): a script's last events reach the server without a further run.

Real processes throughout: a script that tracks and exits, the detached
sender it starts, a real receiver on 127.0.0.1 and the real outbox file.
Each test marks its processes with an environment variable of its own (the
sender inherits it), so senders are found in /proc without mistaking
another test's.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from outbox_analytics.client import EXIT_BUDGET
from outbox_analytics.store import Outbox

from .receiver import Reply, SenderSpans

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

REPO = Path(__file__).resolve().parents[1]
MARK = "OUTBOX_ANALYTICS_TEST_MARK"
HANDOFF_ENV = "OUTBOX_ANALYTICS_HANDOFF"  # "0" turns it off
KEY = "wk-" + uuid.uuid4().hex  # a write key to look for where it must not be

# A CLI: module-level API, N events, then a normal exit.
SCRIPT = """
import sys, time
import outbox_analytics as analytics
try:
    import outbox_analytics.handoff as handoff
    handoff.SENDER_LIFETIME = float(sys.argv[5])
except ImportError:  # a version without the hand-off: the tests show what it lacks
    pass
analytics.write_key, analytics.host, analytics.outbox_path = sys.argv[1:4]
count = int(sys.argv[4])
analytics.gzip = sys.argv[6] == "gzip"
{setup}
with analytics.batch():
    for n in range(count):
        analytics.track("user-1", "Exported", {{"n": n}})
print("tracked", time.monotonic(), flush=True)
"""


def run_cli(
    path: Path,
    host: str,
    count: int,
    *,
    mark: str,
    lifetime: float = 600,
    gzip: bool = False,
    setup: str = "",
    env: dict[str, str] | None = None,
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run the CLI to its end; how long its exit took (from its last event to its pipes closing)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), MARK: mark}
    environment.pop(HANDOFF_ENV, None)  # set by our pytest plugin for the whole run
    environment.pop("OUTBOX_ANALYTICS_DISABLED", None)
    environment.update(env or {})
    args = [KEY, host, str(path), str(count), str(lifetime), "gzip" if gzip else "plain"]
    code = SCRIPT.format(setup=textwrap.dedent(setup))
    ran = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    tracked_at = float(ran.stdout.split()[1])
    return time.monotonic() - tracked_at, ran


def senders(mark: str) -> list[int]:
    """Pids of the live hand-off senders started by this test's processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"outbox_analytics.handoff" in cmdline and f"{MARK}={mark}".encode() in environ:
            assert state != "Z", "a sender was left a zombie"
            found.append(int(entry.name))
    return found


def wait_for_senders_to_end(mark: str, timeout: float) -> float:
    """Seconds until no sender of this test is left (fails after `timeout`)."""
    started = time.monotonic()
    while senders(mark):
        assert time.monotonic() - started < timeout, "a sender outlived its bound"
        time.sleep(0.05)
    return time.monotonic() - started


def pending(path: Path) -> tuple[int, int]:
    with Outbox(path) as outbox:
        stats = outbox.stats()
    return stats.pending, stats.inflight


def numbers_received(receiver) -> set[int]:
    return {message["properties"]["n"] for message in receiver.accepted()}


def wait_for_numbers(receiver, count: int, timeout: float) -> set[int]:
    """Events 0..count-1 received (a batch in flight at exit may come twice: counted once)."""
    deadline = time.monotonic() + timeout
    while len(received := numbers_received(receiver)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return received


def test_a_cli_exits_within_its_budget_and_every_event_arrives_with_no_further_run(
    tmp_path: Path, receiver
) -> None:
    """Issue 23's test: 10,000 events, a slow server; the CLI exits within its budget."""
    receiver.responder = lambda request: Reply(delay=0.05)  # 100 batches: 5 s of answers
    path, mark = tmp_path / "outbox.sqlite3", uuid.uuid4().hex
    exit_took, ran = run_cli(path, receiver.url, 10_000, mark=mark)

    assert exit_took < EXIT_BUDGET + 0.5  # pipes closed: the sender holds none of them
    assert ran.stdout.startswith("tracked") and "Traceback" not in ran.stderr
    assert len(numbers_received(receiver)) < 10_000  # what the budget did not send...
    started = time.monotonic()
    received = wait_for_numbers(receiver, 10_000, timeout=30)
    assert received == set(range(10_000))  # ...arrived, with no further run
    assert time.monotonic() - started + exit_took < 30
    wait_for_senders_to_end(mark, timeout=5)  # it exits on its own once done
    assert pending(path) == (0, 0)


def test_the_write_key_and_oauth_key_never_reach_a_command_line_or_the_environment(
    tmp_path: Path, receiver, key_pem: str
) -> None:
    receiver.responder = lambda request: Reply(status=503, delay=0.2)  # keeps the sender busy
    path, mark = tmp_path / "outbox.sqlite3", uuid.uuid4().hex
    pem_line = key_pem.splitlines()[5]
    setup = f"""
    analytics.oauth_client_id, analytics.oauth_key_id = "client-id", "key-id"
    analytics.oauth_auth_server = analytics.host
    analytics.oauth_client_key = {key_pem!r}
    """
    run_cli(path, receiver.url, 50, mark=mark, lifetime=1.5, setup=setup)
    deadline = time.monotonic() + 5
    while not senders(mark):
        assert time.monotonic() < deadline, "no sender started"
        time.sleep(0.02)
    for pid in senders(mark):
        for name in ("cmdline", "environ"):
            seen = Path(f"/proc/{pid}/{name}").read_bytes()
            assert KEY.encode() not in seen and pem_line.encode() not in seen, name
    wait_for_senders_to_end(mark, timeout=10)


def test_a_server_that_is_down_ends_the_sender_within_its_lifetime_and_events_stay_pending(
    tmp_path: Path,
) -> None:
    path, mark = tmp_path / "outbox.sqlite3", uuid.uuid4().hex
    _, ran = run_cli(path, "http://127.0.0.1:9", 300, mark=mark, lifetime=2)  # no one listens
    assert senders(mark), "no sender started"
    # The script still says why, in one line (it said nothing, run after run).
    (line,) = [line for line in ran.stderr.splitlines() if "handed to a background sender" in line]
    assert "connection refused" in line and f"{path}.sender.log" in line
    took = wait_for_senders_to_end(mark, timeout=8)  # its lifetime, start and shutdown
    assert took < 6
    assert pending(path) == (300, 0)  # nothing lost, nothing left in flight
    assert not (tmp_path / "outbox.sqlite3.sender.log").read_text().count("Traceback")


@pytest.mark.parametrize(
    ("setup", "env", "hands_off"),
    [
        ("", {}, True),  # the module-level client: on by default (the control)
        ("analytics.hand_off_at_exit = False", {}, False),
        ("", {HANDOFF_ENV: "0"}, False),
        ("analytics.default_client = analytics.Client(analytics.write_key, host=analytics.host,"
         " outbox_path=analytics.outbox_path)", {}, False),  # Client(): off by default
    ],
    ids=["module-default", "setting", "env", "client-default"],
)  # fmt: skip
def test_the_hand_off_is_on_for_the_module_api_and_turns_off(
    tmp_path: Path, setup: str, env: dict[str, str], hands_off: bool
) -> None:
    path, mark = tmp_path / "outbox.sqlite3", uuid.uuid4().hex
    run_cli(path, "http://127.0.0.1:9", 20, mark=mark, lifetime=1, setup=setup, env=env)
    assert bool(senders(mark)) is hands_off
    wait_for_senders_to_end(mark, timeout=6)
    assert pending(path) == (20, 0)


def test_one_sender_per_file_a_second_one_exits_without_sending(tmp_path: Path, receiver) -> None:
    from outbox_analytics import Client

    path = tmp_path / "outbox.sqlite3"
    client = Client(KEY, host=receiver.url, outbox_path=str(path), upload=False)
    for n in range(30):
        client.track("user-1", "Exported", {"n": n})
    client.shutdown()
    settings = {
        "write_key": KEY, "host": receiver.url, "outbox_path": str(path), "gzip": False,
        "timeout": 5, "proxies": None, "max_retries": 1, "upload_size": 100,
        "max_total_backoff_duration": 43200, "fsync": False, "oauth_client_id": None,
        "oauth_client_key_b64": None, "oauth_key_id": None,
        "oauth_auth_server": "https://oauth2.segment.io", "oauth_scope": "x", "lifetime": 20,
    }  # fmt: skip

    def start_sender() -> subprocess.Popen[bytes]:
        sender = subprocess.Popen(
            [sys.executable, "-m", "outbox_analytics.handoff"],
            stdin=subprocess.PIPE,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert sender.stdin is not None
        sender.stdin.write(json.dumps(settings).encode() + b"\n")
        sender.stdin.close()  # its parent "exits"
        return sender

    with Outbox(path) as outbox:
        lease = outbox.try_lease()  # another live uploader holds the file
        assert lease is not None
        second = start_sender()
        assert second.wait(timeout=10) == 0
        lease.close()
    assert receiver.requests == [] and pending(path) == (30, 0)
    first = start_sender()  # the lease free: it sends everything, then exits
    assert first.wait(timeout=15) == 0
    assert numbers_received(receiver) == set(range(30)) and pending(path) == (0, 0)


def test_two_clis_exiting_together_hand_off_to_one_sender_at_a_time(
    tmp_path: Path, receiver
) -> None:
    spans = SenderSpans(delay=0.03)  # gzip tells the two CLIs' (and their senders') requests apart
    receiver.responder = spans
    path, mark = tmp_path / "outbox.sqlite3", uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(run_cli, path, receiver.url, 3_000, mark=mark, gzip=gzip)
            for gzip in (True, False)
        ]
        for run in runs:
            assert run.result()[0] < EXIT_BUDGET + 0.5
    deadline = time.monotonic() + 25
    while len(ids := {m["messageId"] for m in receiver.accepted()}) < 6_000:
        assert time.monotonic() < deadline, len(ids)
        time.sleep(0.05)
    spans.assert_one_at_a_time()
    wait_for_senders_to_end(mark, timeout=5)
    assert pending(path) == (0, 0)


def test_the_pytest_plugin_turns_the_hand_off_off(tmp_path: Path) -> None:
    """A suite's live test and the CLI it runs leave no sender behind (the plugin sets the env)."""
    path, mark = tmp_path / "outbox.sqlite3", uuid.uuid4().hex
    script = tmp_path / "cli.py"
    script.write_text(SCRIPT.format(setup=""))
    (tmp_path / "test_app.py").write_text(
        textwrap.dedent(f"""
        import subprocess, sys
        import pytest
        import outbox_analytics as analytics

        @pytest.mark.analytics_live
        def test_tracks():
            import os
            assert os.environ[{HANDOFF_ENV!r}] == "0"  # for this process and its children
            analytics.write_key, analytics.host = {KEY!r}, "http://127.0.0.1:9"
            analytics.outbox_path = {str(path)!r}
            assert analytics.track("user-1", "Exported", {{"n": -1}})[0]
            args = [{KEY!r}, "http://127.0.0.1:9", {str(path)!r}, "5", "1", "plain"]
            subprocess.run([sys.executable, {str(script)!r}, *args], check=True)
        """)
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO), MARK: mark}
    environment.pop(HANDOFF_ENV, None)
    environment.pop("OUTBOX_ANALYTICS_DISABLED", None)
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, env=environment, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    time.sleep(0.3)
    assert senders(mark) == []
    assert pending(path) == (6, 0)


def test_sigterm_stops_the_sender_with_its_rows_in_flight_back_to_pending(
    tmp_path: Path, receiver
) -> None:
    """systemd stopping the unit (KillMode=control-group) terminates the sender: nothing is lost."""
    receiver.responder = lambda request: Reply(delay=1.0)
    path, mark = tmp_path / "outbox.sqlite3", uuid.uuid4().hex
    run_cli(path, receiver.url, 300, mark=mark)
    deadline = time.monotonic() + 5
    while not (found := senders(mark)) or len(receiver.requests) < 3:
        assert time.monotonic() < deadline, "no sender sending"
        time.sleep(0.02)
    for pid in found:
        os.kill(pid, signal.SIGTERM)
    wait_for_senders_to_end(mark, timeout=3)
    left, inflight = pending(path)
    assert inflight == 0 and left >= 300 - len(numbers_received(receiver))  # nothing lost
