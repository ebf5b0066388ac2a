"""The command line, run as real subprocesses on real outbox files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from outbox_analytics import Client
from outbox_analytics.collector import Collector
from outbox_analytics.store import Outbox, encode_message

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 60):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "outbox_analytics", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


@pytest.fixture
def populated(outbox_file: Path) -> Path:
    """An outbox with 6 pending, 2 in-flight (no live uploader) and 2 dead rows."""
    client = Client("k", outbox_path=str(outbox_file), upload=False)
    for n in range(8):
        client.track("user", "Clicked" if n % 2 else "Viewed", {"n": n})
    client.identify("user", {"plan": "pro"})
    client.page("user", "Docs", "Intro")
    client.shutdown()
    with Outbox(outbox_file) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        rows = lease.claim(4)
        lease.dead_letter([rows[0].id, rows[1].id], status=400, error="bad event: price")
        lease.close()
    return outbox_file


def test_status_table_and_json(populated: Path) -> None:
    table = cli("status", str(populated))
    assert table.returncode == 0, table.stderr
    assert "pending" in table.stdout and "dead" in table.stdout
    result = cli("status", str(populated), "--json")
    stats = json.loads(result.stdout)
    assert (stats["pending"], stats["inflight"], stats["dead"], stats["dropped"]) == (6, 2, 2, 0)
    assert stats["file_bytes"] > 0 and stats["oldest_pending_age_s"] >= 0
    assert stats["uploader_alive"] is False


def test_status_check_thresholds(populated: Path) -> None:
    ok = cli("status", str(populated), "--check", "--max-pending", "10", "--max-dead", "5")
    assert ok.returncode == 0
    over = cli("status", str(populated), "--check", "--max-dead", "1", "--json")
    assert over.returncode == 1
    assert "2 events dead (max 1)" in over.stderr
    assert json.loads(over.stdout)["exceeded"] == ["2 events dead (max 1)"]
    old = cli("status", str(populated), "--check", "--max-age", "0s")
    assert old.returncode == 1


def test_list_filters_and_json(populated: Path) -> None:
    result = cli("list", str(populated), "--json", "--state", "all", "--type", "track")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 8 and all(m["type"] == "track" for m in lines)
    dead = cli("list", str(populated), "--state", "dead", "--json")
    dead_rows = [json.loads(line) for line in dead.stdout.splitlines()]
    assert [m["_outbox"]["last_status"] for m in dead_rows] == [400, 400]
    assert dead_rows[0]["_outbox"]["last_error"] == "bad event: price"
    clicked = cli("list", str(populated), "--state", "all", "--event", "Clicked", "--limit", "2")
    assert clicked.returncode == 0 and clicked.stdout.count("Clicked") == 2


def test_show_by_id_and_by_message_id(populated: Path) -> None:
    listed = json.loads(cli("list", str(populated), "--json", "--limit", "1").stdout)
    by_id = json.loads(cli("show", str(populated), str(listed["_outbox"]["id"])).stdout)
    by_message_id = json.loads(cli("show", str(populated), listed["messageId"]).stdout)
    assert by_id == by_message_id == listed
    missing = cli("show", str(populated), "no-such-message")
    assert missing.returncode == 2 and "no message" in missing.stderr


def test_requeue_and_purge_are_careful(populated: Path) -> None:
    dry = cli("requeue", str(populated), "--all", "--dry-run")
    assert json.loads(dry.stdout) == {"would_requeue": 2}
    refused = cli("requeue", str(populated), "--all")  # not a terminal, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert json.loads(cli("status", str(populated), "--json").stdout)["dead"] == 2

    dead_ids = [
        json.loads(line)["_outbox"]["id"]
        for line in cli("list", str(populated), "--state", "dead", "--json").stdout.splitlines()
    ]
    one = cli("requeue", str(populated), "--id", str(dead_ids[0]), "--yes")
    assert json.loads(one.stdout) == {"requeued": 1}
    purge_dry = cli("purge", str(populated), "--state", "dead", "--dry-run")
    assert json.loads(purge_dry.stdout) == {"would_purge": 1}
    young = cli("purge", str(populated), "--state", "dead", "--older-than", "1h", "--yes")
    assert json.loads(young.stdout) == {"purged": 0}
    purged = cli("purge", str(populated), "--state", "dead", "--yes")
    assert json.loads(purged.stdout) == {"purged": 1}
    stats = json.loads(cli("status", str(populated), "--json").stdout)
    assert (stats["pending"], stats["dead"]) == (7, 0)


def test_export_import_round_trip(populated: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export.jsonl"
    result = cli("export", str(populated), "-o", str(exported))
    assert result.returncode == 0 and "exported 10" in result.stderr
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(lines) == 10 and {m["_outbox"]["state"] for m in lines} == {
        "pending",
        "inflight",
        "dead",
    }

    fresh = tmp_path / "fresh.db"
    imported = cli("import", str(fresh), str(exported))
    assert json.loads(imported.stdout) == {"imported": 10, "skipped": 0}
    again = cli("import", str(fresh), str(exported))
    assert json.loads(again.stdout) == {"imported": 0, "skipped": 10}
    with Outbox(fresh) as outbox:
        stored = [row.message for row in outbox.rows()]
    originals = [{k: v for k, v in m.items() if k != "_outbox"} for m in lines]
    assert stored == originals  # messageId and timestamp kept, order kept
    piped = cli("import", str(tmp_path / "piped.db"), "-", stdin=exported.read_text())
    assert json.loads(piped.stdout) == {"imported": 10, "skipped": 0}


def test_import_of_bad_lines_changes_nothing(populated: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"type": "track", "event": "E", "messageId": "m-1", "userId": "u"})
    bad.write_text(good + "\n{not json\n")
    before = populated.read_bytes()
    result = cli("import", str(populated), str(bad))
    assert result.returncode == 2 and "bad.jsonl:2: not JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(cli("status", str(populated), "--json").stdout)["pending"] == 6
    assert populated.read_bytes() == before


@pytest.mark.parametrize(
    "args",
    [
        ("status", "{missing}"),
        ("status", "{notes}"),
        ("list", "{outbox}", "--state", "nowhere"),
        ("track", "{outbox}", "--write-key", "k", "--user-id", "u", "--event", "E",
         "--properties", "{{oops"),
        ("track", "{outbox}", "--write-key", "k", "--user-id", "u", "--event", "E",
         "--properties", "[1, 2]"),
        ("drain", "{outbox}"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(populated: Path, tmp_path: Path, args) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an outbox")
    paths = {"missing": tmp_path / "missing.db", "notes": notes, "outbox": populated}
    before = {path: path.read_bytes() for path in (notes, populated)}
    result = cli(*(arg.format(**paths) for arg in args), env={"OUTBOX_ANALYTICS_WRITE_KEY": ""})
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line
    assert not (tmp_path / "missing.db").exists()
    assert {path: path.read_bytes() for path in (notes, populated)} == before


def test_every_command_has_help() -> None:
    commands = [
        "status", "list", "show", "export", "import", "requeue", "purge", "drain", "vacuum",
        "check", "track", "identify", "page", "screen", "group", "alias", "collector", "demo",
    ]  # fmt: skip
    for command in commands:
        result = cli(command, "--help")
        assert result.returncode == 0 and "usage: outbox-analytics" in result.stdout, command
    assert "Exit codes" in cli("--help").stdout


def test_append_commands_store_events_for_a_later_drain(tmp_path: Path) -> None:
    path = str(tmp_path / "shell.db")
    env = {"OUTBOX_ANALYTICS_WRITE_KEY": "shell-key"}
    tracked = cli(
        "track", path, "--user-id", "u1", "--event", "Backup Done",
        "--properties", '{"bytes": 123}', "--timestamp", "2026-01-02T03:04:05Z", env=env,
    )  # fmt: skip
    assert tracked.returncode == 0, tracked.stderr
    message = json.loads(tracked.stdout)
    assert message["properties"] == {"bytes": 123}
    assert message["timestamp"] == "2026-01-02T03:04:05.000+00:00"
    assert "shell-key" not in tracked.stdout + tracked.stderr
    for args in (
        ("identify", path, "--user-id", "u1", "--traits", '{"plan": "pro"}'),
        ("page", path, "--user-id", "u1", "--category", "Docs", "--name", "Intro"),
        ("screen", path, "--anonymous-id", "a1", "--name", "Home"),
        ("group", path, "--user-id", "u1", "--group-id", "g1"),
        ("alias", path, "--previous-id", "a1", "--user-id", "u1"),
    ):
        assert cli(*args, env=env).returncode == 0, args
    with Outbox(path) as outbox:
        types = [row.message["type"] for row in outbox.rows()]
    assert types == ["track", "identify", "page", "screen", "group", "alias"]


def test_drain_delivers_to_the_collector(populated: Path) -> None:
    with Collector() as collector:
        result = cli(
            "drain", str(populated), "--host", collector.url,
            env={"OUTBOX_ANALYTICS_WRITE_KEY": "k"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary == {"sent": 8, "dead": 0, "pending": 0}  # 6 pending + 2 reclaimed
        assert collector.counts()["unique"] == 8
        assert "drain-key" not in result.stdout + result.stderr


def test_drain_exits_75_when_events_remain(populated: Path) -> None:
    result = cli(
        "drain", str(populated), "--write-key", "k", "--host", "http://127.0.0.1:9",
        "--max-retries", "1", "--timeout", "10",
    )  # fmt: skip
    assert result.returncode == 75, result.stderr
    assert json.loads(result.stdout)["pending"] == 8


def test_check_and_vacuum(populated: Path) -> None:
    healthy = cli("check", str(populated), "--json")
    report = json.loads(healthy.stdout)
    # The in-flight rows of a dead uploader are reported (they will be reclaimed).
    assert report["problems"] == [
        "rows in flight with no uploader alive (the next uploader reclaims them)"
    ]
    assert healthy.returncode == 1
    with Outbox(populated) as outbox:
        outbox.append(b"\xc1 garbage")
    broken = json.loads(cli("check", str(populated), "--json").stdout)
    assert "1 row(s) whose payload cannot be decoded" in broken["problems"]
    vacuumed = json.loads(cli("vacuum", str(populated)).stdout)
    assert vacuumed["bytes_after"] > 0
    assert json.loads(cli("status", str(populated), "--json").stdout)["pending"] == 7


def test_read_commands_do_not_block_a_writer(populated: Path) -> None:
    writer = Client("k", outbox_path=str(populated), upload=False)
    with writer.batch():  # no write lock is held by a batch until it ends
        writer.track("user", "During")
        for command in ("status", "list", "check", "export"):
            assert cli(command, str(populated)).returncode in (0, 1)
    started = time.monotonic()
    writer.track("user", "After")  # the readers never held the write lock
    assert time.monotonic() - started < 1
    writer.shutdown()


def _export_peak_rss_mb(tmp_path: Path, rows: int) -> tuple[float, float]:
    """Peak RSS of a process exporting `rows` rows, and the size of what it wrote."""
    path = tmp_path / f"large-{rows}.db"
    with Outbox(path, max_pending=rows) as outbox, outbox.batch():
        blob = "x" * 400
        for n in range(rows):
            outbox.append(encode_message({"type": "track", "messageId": f"m{n}", "blob": blob}))
    output = tmp_path / f"out-{rows}.jsonl"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    code = (
        "import sys; from outbox_analytics.cli import main;"
        "main(['export', sys.argv[1], '-o', sys.argv[2]]);"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path), str(output)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    with open(output) as exported:
        assert sum(1 for _ in exported) == rows
    return int(result.stdout.split()[-1]) / 1024, output.stat().st_size / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM")
def test_export_of_a_large_outbox_streams(tmp_path: Path) -> None:
    small_peak, small_size = _export_peak_rss_mb(tmp_path, 10_000)
    large_peak, large_size = _export_peak_rss_mb(tmp_path, 80_000)
    assert large_size - small_size > 25  # 70,000 more rows: over 25 MB more output ...
    assert large_peak - small_peak < 10  # ... and hardly any more memory


def test_collector_command_writes_json_lines(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "outbox_analytics", "collector", "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stderr is not None
    url = process.stderr.readline().split()[-1]
    assert url.startswith("http://127.0.0.1:")
    client = Client("k", host=url, outbox_path=str(tmp_path / "o.db"), upload_interval=0.05)
    for n in range(5):
        client.track("user", "E", {"n": n})
    assert client.flush(timeout=10).sent == 5
    client.shutdown()
    process.send_signal(2)  # SIGINT: stop and print the counts
    _, err = process.communicate(timeout=10)
    assert json.loads(err.strip().splitlines()[-1])["unique"] == 5
    assert [json.loads(line)["properties"]["n"] for line in out.read_text().splitlines()] == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = cli("demo", "--events", "1500", "--dir", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost                       0" in result.stdout
    assert str(tmp_path / "outbox.sqlite3") in result.stdout


def test_drain_shows_progress_on_a_terminal(populated: Path) -> None:
    import pty

    with Collector() as collector:
        leader, follower = pty.openpty()  # stderr is a terminal, stdout is not
        process = subprocess.Popen(
            [sys.executable, "-m", "outbox_analytics", "drain", str(populated),
             "--host", collector.url, "--write-key", "k"],
            stdout=subprocess.PIPE,
            stderr=follower,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        os.close(follower)
        out, _ = process.communicate(timeout=60)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
        os.close(leader)
    assert process.returncode == 0
    assert json.loads(out) == {"sent": 8, "dead": 0, "pending": 0}
    assert b"/8" in shown and b"[" in shown  # a progress line, on the terminal only
