"""What people see: warnings on stderr when nothing is configured, the cause at once, one exit line.

And what the file says after a normal exit: no row left in flight, every view
agreeing on what is pending.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from outbox_analytics import Client, cli
from outbox_analytics.store import Outbox

from .conftest import start_python
from .receiver import Reply

FAILING_JOB = """
import sys, tenacity
from outbox_analytics import Client
client = Client("k", host=sys.argv[1], outbox_path=sys.argv[2], max_retries=1,
                retry_wait=tenacity.wait_fixed(0.01))
for n in range(3):
    client.track("user", "E", {"n": n})
"""


def test_a_script_that_configured_no_logging_sees_failures_on_stderr_and_one_exit_line(
    receiver, outbox_file: Path
) -> None:
    receiver.responder = lambda request: Reply(503, body='{"message": "down for maintenance"}')
    job = start_python(FAILING_JOB, receiver.url, str(outbox_file))
    _, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert "down for maintenance" in err  # the rounds' warning, through the last-resort handler
    left = [line for line in err.splitlines() if "not sent yet" in line]
    assert len(left) == 1  # one line, not one per event
    assert "3 event(s)" in left[0] and str(outbox_file) in left[0]
    assert f"outbox-analytics drain {outbox_file}" in left[0]


def test_a_program_that_configured_logging_gets_only_what_it_asked_for(
    receiver, outbox_file: Path, tmp_path: Path
) -> None:
    receiver.responder = lambda request: Reply(503)
    logged = tmp_path / "app.log"
    configure = f"import logging; logging.basicConfig(filename={str(logged)!r})\n"
    job = start_python(configure + FAILING_JOB, receiver.url, str(outbox_file))
    _, err = job.communicate(timeout=30)
    assert job.returncode == 0 and err == ""
    assert "not sent yet" in logged.read_text()


def test_a_normal_exit_leaves_no_row_in_flight_and_every_view_agrees(
    receiver, outbox_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receiver.responder = lambda request: Reply(delay=5)  # still on the wire at the exit budget
    job = start_python(FAILING_JOB, receiver.url, str(outbox_file))
    _, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert cli.main(["check", str(outbox_file)]) == 0
    capsys.readouterr()
    assert cli.main(["status", "--json", str(outbox_file)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert cli.main(["list", "--json", str(outbox_file)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert status["pending"] == 3 and status["inflight"] == 0
    assert len(listed) == 3


def test_attempts_and_the_cause_are_in_the_file_at_the_first_failure(make_client, receiver) -> None:
    import tenacity

    receiver.responder = lambda request: Reply(503, body='{"message": "overloaded"}')
    client = make_client(max_retries=20, retry_wait=tenacity.wait_fixed(0.5))
    client.track("user", "E")
    deadline = time.monotonic() + 5
    stats = client.stats()
    while stats is not None and not stats.head_attempts and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = client.stats()
    assert stats is not None and stats.head_attempts >= 1  # during the round, not after it
    assert "overloaded" in (stats.head_last_error or "") and stats.head_last_status == 503
    assert len(receiver.requests) < 10  # still retrying: the round is far from its end
    out = subprocess.run(
        [sys.executable, "-m", "outbox_analytics", "status", "--json", client.outbox_path],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "overloaded" in json.loads(out)["head_last_error"]  # another process reads it too
    receiver.responder = lambda request: Reply()
    result = client.flush(timeout=10)
    assert result.pending == 0 and client.stats().head_attempts == 0


MODULE_API_JOB = """
import json, os, outbox_analytics
outbox_analytics.write_key = "k"
outbox_analytics.upload = False
ok, message = outbox_analytics.track("user", "E")
client = outbox_analytics.default_client
path = client.outbox_path if client else None
print(json.dumps({"ok": ok, "event": message["event"], "path": path}))
"""


def _run_with(env: dict[str, str], code: str) -> tuple[dict, str]:
    job = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env},
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    return json.loads(job.stdout), job.stderr


def test_the_module_api_falls_back_to_a_private_temp_directory(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"XDG_STATE_HOME": "/proc/no-state-here", "TMPDIR": str(temp)}
    result, err = _run_with(env, MODULE_API_JOB)
    assert result["ok"] and result["event"] == "E"
    assert Path(result["path"]).parent == temp / f"outbox-analytics-{os.getuid()}"
    assert (Path(result["path"]).parent.stat().st_mode & 0o777) == 0o700
    assert "OUTBOX_ANALYTICS_PATH" in err and "outbox_path" in err  # the warning says how to choose


def test_the_module_api_never_raises_where_nothing_can_be_stored(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    (temp / f"outbox-analytics-{os.getuid()}").write_text("not a directory")
    env = {"XDG_STATE_HOME": "/proc/no-state-here", "TMPDIR": str(temp)}
    result, err = _run_with(env, MODULE_API_JOB)
    assert result == {"ok": False, "event": "E", "path": None}
    assert "not stored" in err and "OUTBOX_ANALYTICS_PATH" in err


def test_an_outbox_path_given_still_fails_at_client() -> None:
    from outbox_analytics import Client, OutboxUnavailable

    with pytest.raises(OutboxUnavailable):
        Client("k", outbox_path="/proc/no-such-dir/outbox.sqlite3", upload=False)


def test_the_module_api_never_raises_where_nothing_can_be_stored_not_even_at_the_end(
    tmp_path: Path,
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    (temp / f"outbox-analytics-{os.getuid()}").write_text("not a directory")
    env = {"XDG_STATE_HOME": "/proc/no-state-here", "TMPDIR": str(temp)}
    code = (
        "import json, outbox_analytics as a; a.write_key = 'k'; a.track('u', 'E');"
        " print(json.dumps([str(a.flush()), a.stats(), a.join(), str(a.shutdown())]))"
    )
    job = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env},
    )  # fmt: skip
    assert job.returncode == 0, job.stderr  # a migrated script ending in flush() ends well
    nothing = "FlushResult(sent=0, dead=0, pending=0, last_error=None)"
    assert json.loads(job.stdout) == [nothing, None, None, nothing]


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")
@pytest.mark.parametrize("mode", [0o700, 0o755])
def test_a_fallback_directory_another_user_made_first_is_refused(tmp_path: Path, mode: int) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    planted = temp / f"outbox-analytics-{os.getuid()}"
    planted.mkdir(mode=mode)
    os.chown(planted, 65534, 65534)
    env = {"XDG_STATE_HOME": "/proc/no-state-here", "TMPDIR": str(temp)}
    result, err = _run_with(env, MODULE_API_JOB)
    assert result == {"ok": False, "event": "E", "path": None}
    assert "owned by uid 65534" in err and list(planted.iterdir()) == []
    assert "and the fallback, in the temp directory: refusing the directory" in err  # (was garbled)


def test_a_fallback_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    temp, elsewhere = tmp_path / "tmp", tmp_path / "elsewhere"
    temp.mkdir()
    elsewhere.mkdir(mode=0o700)
    (temp / f"outbox-analytics-{os.getuid()}").symlink_to(elsewhere)
    env = {"XDG_STATE_HOME": "/proc/no-state-here", "TMPDIR": str(temp)}
    result, _ = _run_with(env, MODULE_API_JOB)
    assert result["ok"] is False and list(elsewhere.iterdir()) == []


# A uid with no account and no $HOME (a container's): no home directory at all.
NO_HOME = "import pwd\npwd.getpwuid = lambda uid: {}[uid]\n"


def test_with_no_home_at_all_the_fallback_directory_is_checked_and_said(
    tmp_path: Path,
) -> None:
    """With no home, the fallback path was used directly: a directory planted there
    (a link elsewhere, another user's) was taken, and nothing was said."""
    temp, elsewhere = tmp_path / "tmp", tmp_path / "elsewhere"
    temp.mkdir()
    elsewhere.mkdir(mode=0o700)
    (temp / f"outbox-analytics-{os.getuid()}").symlink_to(elsewhere)
    env = {"TMPDIR": str(temp), "HOME": "", "XDG_STATE_HOME": ""}
    result, _ = _run_with(env, NO_HOME + MODULE_API_JOB)
    assert result["ok"] is False and list(elsewhere.iterdir()) == []

    (temp / f"outbox-analytics-{os.getuid()}").unlink()
    result, err = _run_with(env, NO_HOME + MODULE_API_JOB)
    assert result["ok"] and Path(result["path"]).parent == temp / f"outbox-analytics-{os.getuid()}"
    assert "no home directory" in err and "outbox_path" in err


def test_the_exit_line_is_there_every_time_the_server_is_down(outbox_file: Path) -> None:
    code = FAILING_JOB  # max_retries=1 against a refused connection: a round ends fast
    for _ in range(4):
        job = start_python(code, "http://127.0.0.1:9", str(outbox_file))
        _, err = job.communicate(timeout=30)
        left = [line for line in err.splitlines() if "not sent yet" in line]
        assert len(left) == 1, err  # it went missing in a third of runs (a race with the lease)


ONE_EVENT_AT_EXIT = """
import sys
from outbox_analytics import Client
client = Client("k", host=sys.argv[1], outbox_path=sys.argv[2], upload_interval=60, upload_size=1)
client.track("user", "Mine")  # sent by the exit delivery, as the one batch it waits for
"""


def test_rows_another_process_stored_during_the_exit_flush_get_no_false_line(
    receiver, outbox_file: Path
) -> None:
    # A pool's sibling (spawned, forked, or any writer) stores events while
    # this process's exit delivery sends its own: the budget did not run out
    # and they are not this process's to report (it said "the exit budget
    # ran out, drain them now" in 4 of 5 runs of four spawned children).
    err, pending = _exit_while_a_sibling_stores(receiver, outbox_file)
    assert "not sent yet" not in err and "budget" not in err, err
    sent = [m["event"] for r in receiver.requests for m in r.body["batch"]]
    # Theirs stay, but for the few batches (of 1) the thread may send before it stops.
    assert sent[0] == "Mine" and pending == 21 - len(sent) and pending >= 10, (sent, pending)


def _exit_while_a_sibling_stores(receiver, outbox_file: Path) -> tuple[str, int]:
    """Run ONE_EVENT_AT_EXIT; store 20 events while its exit delivery waits for an answer."""
    arrived, stored = threading.Event(), threading.Event()

    def answer_once_the_others_are_stored(request) -> Reply:
        arrived.set()
        stored.wait(10)
        return Reply()

    receiver.responder = answer_once_the_others_are_stored
    job = start_python(ONE_EVENT_AT_EXIT, receiver.url, str(outbox_file))
    assert arrived.wait(20), "the exit delivery sent nothing"
    sibling = Client("k", host=receiver.url, outbox_path=str(outbox_file), upload=False)
    for n in range(20):
        sibling.track("user", "Theirs", {"n": n})
    stored.set()
    _, err = job.communicate(timeout=30)
    sibling.shutdown()
    assert job.returncode == 0, err
    with Outbox(outbox_file) as outbox:
        return err, outbox.stats().pending


TRACKING_ON_IN_A_DAEMON_THREAD = """
import sys, threading, time
from outbox_analytics import Client
client = Client("k", host=sys.argv[1], outbox_path=sys.argv[2])

def keep_tracking():
    while True:
        client.track("user", "Tick")
        time.sleep(0.002)

threading.Thread(target=keep_tracking, daemon=True).start()
time.sleep(0.3)
"""


def test_events_a_daemon_thread_tracked_during_the_exit_delivery_are_said(
    receiver, outbox_file: Path
) -> None:
    # The exit flush settled what was pending when it began; what is left is
    # this process's own, and was left without a word.
    job = start_python(TRACKING_ON_IN_A_DAEMON_THREAD, receiver.url, str(outbox_file))
    _, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    with Outbox(outbox_file) as outbox:
        pending = outbox.stats().pending
    assert pending > 0  # (the thread tracks until the interpreter ends)
    left = [line for line in err.splitlines() if "not sent yet" in line]
    assert len(left) == 1, err


SIGTERMED_JOB = """
import sys, time
from outbox_analytics import Client
client = Client("k", host=sys.argv[1], outbox_path=sys.argv[2], upload_size=100)
for n in range(300):
    client.track("user", "E", {"n": n})
print("tracked", flush=True)
time.sleep(30)
"""


def test_a_sigterm_mid_request_leaves_views_that_agree_and_check_passes(
    receiver, outbox_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    receiver.responder = lambda request: Reply(delay=10)
    job = start_python(SIGTERMED_JOB, receiver.url, str(outbox_file))
    assert job.stdout is not None and job.stdout.readline().strip() == "tracked"
    deadline = time.monotonic() + 10
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)  # Python's default: no atexit, rows stay in flight
    job.communicate(timeout=30)
    assert cli.main(["check", str(outbox_file)]) == 0
    capsys.readouterr()
    cli.main(["status", "--json", str(outbox_file)])
    pending = json.loads(capsys.readouterr().out)["pending"]
    cli.main(["list", "--json", "--limit", "1000", str(outbox_file)])
    listed = len(json.loads(capsys.readouterr().out))
    cli.main(["export", str(outbox_file), "--state", "pending"])
    exported = len(capsys.readouterr().out.splitlines())
    assert pending == listed == exported == 300


LEASE_HOLDING_JOB = """
import sys, time
from outbox_analytics import Client
client = Client("test-write-key", host=sys.argv[1], outbox_path=sys.argv[2])
client.track("user", "First")
assert client.flush(timeout=20).pending == 0  # the uploader holds the lease from here on
print("holding", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stopped: seen in /proc")
def test_a_stopped_lease_holder_is_named_by_flush_and_status(
    receiver, outbox_file: Path, make_client, capsys: pytest.CaptureFixture[str]
) -> None:
    # A job stopped with Ctrl-Z (or a frozen Lambda sharing a file) keeps the
    # lease: the others' events wait for it. "Another process is sending
    # them" sent an operator looking for a slow server.
    import signal

    holder = start_python(LEASE_HOLDING_JOB, receiver.url, str(outbox_file))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        client = make_client(outbox_path=str(outbox_file))
        stats = client.stats()
        assert (stats.uploader_alive, stats.uploader_pid, stats.uploader_stopped) == (
            True,
            holder.pid,
            False,
        )
        cli.main(["status", str(outbox_file)])
        assert f"uploader alive   yes (pid {holder.pid})\n" in capsys.readouterr().out

        holder.send_signal(signal.SIGSTOP)
        client.track("user", "Waiting")
        result = client.flush(timeout=0.5)
        assert result.pending == 1
        assert result.last_error == (
            f"another process (pid {holder.pid}, stopped) holds the upload lease:"
            f" they are sent once it runs again (kill -CONT {holder.pid}) or exits"
        )
        cli.main(["status", str(outbox_file)])
        assert f"uploader alive   yes (pid {holder.pid}, stopped)\n" in capsys.readouterr().out
        cli.main(["status", "--json", str(outbox_file)])
        seen = json.loads(capsys.readouterr().out)
        assert (seen["uploader_pid"], seen["uploader_stopped"]) == (holder.pid, True)

        holder.send_signal(signal.SIGCONT)  # it runs again, and sends them
        assert client.flush(timeout=20).pending == 0
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.communicate(timeout=30)
    assert [m["event"] for m in receiver.accepted()] == ["First", "Waiting"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stopped: seen in /proc")
def test_a_script_exiting_while_the_lease_holder_is_stopped_says_so(
    receiver, outbox_file: Path
) -> None:
    # A stopped holder sends nothing: the events left are worth the line
    # (it said nothing, as for a holder that sends them).
    import signal

    holder = start_python(LEASE_HOLDING_JOB, receiver.url, str(outbox_file))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGSTOP)
        same_key = ONE_EVENT_AT_EXIT.replace('"k"', '"test-write-key"')
        job = start_python(same_key, receiver.url, str(outbox_file))
        _, err = job.communicate(timeout=30)
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.communicate(timeout=30)
    assert job.returncode == 0, err
    left = [line for line in err.splitlines() if "not sent yet" in line]
    assert len(left) == 1, err
    assert f"(pid {holder.pid}, stopped) holds the upload lease" in left[0]
    assert f"kill -CONT {holder.pid}" in left[0]


def test_a_holder_note_is_believed_only_while_its_process_lives(outbox_file: Path) -> None:
    # A taker that could not note itself (a full disk) leaves the last note
    # in place: a gone process of this host is never named as the holder.
    import socket
    import sqlite3

    from outbox_analytics import Client
    from outbox_analytics.store.lease import read_holder

    Client("k", outbox_path=str(outbox_file), upload=False).shutdown()  # an outbox file
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    here, elsewhere = socket.gethostname(), "not-" + socket.gethostname()
    conn = sqlite3.connect(outbox_file)
    try:
        for note, expected in [
            (f"{os.getpid()} {here}", (os.getpid(), here)),
            (f"{gone.stdout.strip()} {here}", (None, None)),
            (f"{gone.stdout.strip()} {elsewhere}", (int(gone.stdout), elsewhere)),  # unknowable
            ("garbage", (None, None)),
        ]:
            conn.execute("INSERT OR REPLACE INTO outbox_meta VALUES ('lease_holder', ?)", (note,))
            assert read_holder(conn) == expected, note
    finally:
        conn.close()


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="Linux's open file description locks")
def test_a_lease_lock_that_names_no_process_is_not_said_to_be_sending(
    receiver, outbox_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Anyone who can read the file can lock its lease byte (an older release
    # holding the lease does so too, without a note): nobody is sending then.
    writer = Client("k", host=receiver.url, outbox_path=str(outbox_file), upload=False)
    writer.track("user", "E")
    writer.shutdown()
    reader = os.open(outbox_file, os.O_RDONLY)
    try:
        lease_byte = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 1 << 40, 1, 0)
        fcntl.fcntl(reader, fcntl.F_OFD_SETLK, lease_byte)
        client = Client("k", host=receiver.url, outbox_path=str(outbox_file))
        result = client.flush(timeout=1)
        client.shutdown(timeout=0.5)
        assert cli.main(["status", str(outbox_file)]) == 0
    finally:
        os.close(reader)
    assert result.pending == 1 and receiver.requests == []
    assert result.last_error is not None and "without saying which" in result.last_error
    assert "is sending" not in result.last_error
    status = capsys.readouterr().out
    assert (
        "yes (a process whose pid is not known: an older release, or a lock on the file)" in status
    )
