"""The command line, run in-process (`main([...])`) on real outbox files.

Real processes only where they matter: signals and exit codes of `drain`,
`status --watch`, the installed entry point, a terminal, memory use.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from outbox_analytics import Client
from outbox_analytics.cli import main
from outbox_analytics.collector import Collector
from outbox_analytics.store import Outbox, encode_message
from outbox_analytics.version import VERSION

from .receiver import Reply

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run the command line in this process: `cli("status", path, env={...}, stdin="...")`."""

    def run(*args: object, env: dict[str, str] | None = None, stdin: str | None = None) -> Ran:
        capsys.readouterr()
        with monkeypatch.context() as patched:
            for name, value in (env or {}).items():
                patched.setenv(name, value)
            if stdin is not None:
                patched.setattr(sys, "stdin", io.StringIO(stdin))
            try:
                code = main([str(arg) for arg in args])
            except SystemExit as exc:  # argparse: --help, --version, usage errors
                code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


def cli_process(*args: str, env: dict | None = None, timeout: float = 60):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "outbox_analytics", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


@pytest.fixture
def populated(outbox_file: Path) -> Path:
    """6 pending rows, 2 left in flight by an uploader that is gone, 2 dead."""
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
        lease.close()  # rows 3 and 4 stay in flight, their uploader gone
    return outbox_file


def row_states(path: Path) -> dict[str, int]:
    """How many rows the file really holds in each state (not what stats() concludes)."""
    with Outbox(path, readonly=True) as outbox:
        states = [row.state for row in outbox.rows("all")]
    return {state: states.count(state) for state in ("pending", "inflight", "dead")}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a directory (names and bytes): what a reading command must leave alone."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# -- status -------------------------------------------------------------------------


def test_status_counts_rows_of_a_dead_uploader_as_pending(cli, populated: Path) -> None:
    stats = cli("status", populated, "--json").json()
    assert (stats["pending"], stats["inflight"], stats["dead"], stats["dropped"]) == (8, 0, 2, 0)
    assert stats["uploader_alive"] is False
    table = cli("status", populated)
    assert table.code == 0
    assert "pending          8" in table.out and "uploader alive   no" in table.out


def test_status_counts_rows_of_a_live_uploader_as_in_flight(cli, populated: Path) -> None:
    with Outbox(populated) as outbox:
        lease = outbox.try_lease()  # an uploader alive: it reclaims the orphans and sends 3
        assert lease is not None
        lease.claim(3)
        stats = cli("status", populated, "--json").json()
        lease.close()
    assert (stats["pending"], stats["inflight"], stats["uploader_alive"]) == (5, 3, True)


def test_check_alerts_on_rows_stranded_in_flight(cli, outbox_file: Path) -> None:
    """A killed job's batch: nothing "pending" in the file, all of it in flight."""
    client = Client("k", outbox_path=str(outbox_file), upload=False)
    for n in range(5):
        client.track("user", "E", {"n": n})
    client.shutdown()
    with Outbox(outbox_file) as outbox:
        lease = outbox.try_lease()
        assert lease is not None and len(lease.claim(10)) == 5
        lease.close()
    assert row_states(outbox_file) == {"pending": 0, "inflight": 5, "dead": 0}
    time.sleep(0.05)
    too_many = cli("status", outbox_file, "--check", "--max-pending", "0")
    assert too_many.code == 1 and "5 events pending (max 0)" in too_many.err
    too_old = cli("status", outbox_file, "--check", "--max-age", "0.01s")
    assert too_old.code == 1 and "oldest pending event" in too_old.err


def test_status_check_thresholds(cli, populated: Path) -> None:
    assert cli("status", populated, "--check", "--max-pending", "10", "--max-dead", "5").code == 0
    over = cli("status", populated, "--check", "--max-dead", "1", "--json")
    assert over.code == 1
    assert "2 events dead (max 1)" in over.err
    assert over.json()["exceeded"] == ["2 events dead (max 1)"]
    assert cli("status", populated, "--check", "--max-age", "0s").code == 1


@pytest.mark.parametrize(
    "args",
    [
        ("--max-pending", "3"),  # a threshold without --check would never alert
        ("--max-dead", "0"),
        ("--check", "--max-pending", "-1"),
        ("--check", "--max-age", "-5s"),
        ("--watch", "0"),
        ("--json", "--prometheus"),
    ],
)
def test_status_refuses_thresholds_it_would_ignore(cli, populated: Path, args) -> None:
    result = cli("status", populated, *args)
    assert result.code == 2 and result.out == ""
    assert result.err.count("\n") == 1


def test_status_prometheus_parses_as_the_exposition_format(cli, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    folder = tmp_path / 'odd "name"\\dir'  # a label value that needs escaping
    folder.mkdir()
    path = folder / "outbox.db"
    client = Client("k", outbox_path=str(path), upload=False)
    for n in range(3):
        client.track("user", "E", {"n": n})
    client.shutdown()
    result = cli("status", path, "--prometheus")
    assert result.code == 0
    families = {family.name: family for family in text_string_to_metric_families(result.out)}
    expected_types = {
        "outbox_analytics_pending": "gauge",
        "outbox_analytics_inflight": "gauge",
        "outbox_analytics_dead": "gauge",
        "outbox_analytics_dropped": "counter",
        "outbox_analytics_oldest_pending_age_seconds": "gauge",
        "outbox_analytics_file_bytes": "gauge",
        "outbox_analytics_uploader_alive": "gauge",
    }
    assert {name: families[name].type for name in expected_types} == expected_types
    values = {name: family.samples[0] for name, family in families.items()}
    assert all(sample.labels == {"path": str(path)} for sample in values.values())
    assert values["outbox_analytics_pending"].value == 3
    assert values["outbox_analytics_dead"].value == 0
    assert values["outbox_analytics_uploader_alive"].value == 0
    assert values["outbox_analytics_file_bytes"].value == path.stat().st_size
    assert values["outbox_analytics_oldest_pending_age_seconds"].value > 0
    assert all(families[name].documentation for name in expected_types)


def test_status_watch_redraws_until_interrupted(populated: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "outbox_analytics", "status", str(populated), "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    seen = 0
    deadline = time.monotonic() + 20
    while seen < 3 and time.monotonic() < deadline:
        line = process.stdout.readline()
        seen += line.startswith("pending ")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=10)
    assert seen == 3
    assert process.returncode == 0 and "Traceback" not in err


# -- reading --------------------------------------------------------------------------


def test_version(cli) -> None:
    result = cli("--version")
    assert result.code == 0 and result.out.strip() == f"outbox-analytics {VERSION}"


def test_list_json_is_one_document_and_jsonl_streams(cli, populated: Path) -> None:
    everything = cli("list", populated, "--json", "--state", "all", "--type", "track")
    messages = everything.json()
    assert len(messages) == 8 and all(m["type"] == "track" for m in messages)
    dead = cli("list", populated, "--state", "dead", "--jsonl")
    dead_rows = [json.loads(line) for line in dead.out.splitlines()]
    assert [m["_outbox"]["last_status"] for m in dead_rows] == [400, 400]
    assert dead_rows[0]["_outbox"]["last_error"] == "bad event: price"


def test_list_says_when_the_limit_cut_it(cli, populated: Path) -> None:
    cut = cli("list", populated, "--state", "all", "--event", "Clicked", "--limit", "2")
    assert cut.code == 0 and cut.out.count("Clicked") == 2
    assert "showing the first 2" in cut.err
    whole = cli("list", populated, "--state", "all", "--event", "Clicked", "--limit", "4")
    assert whole.out.count("Clicked") == 4 and whole.err == ""
    assert cli("list", populated, "--limit", "0").code == 2


def test_show_by_id_and_by_message_id(cli, populated: Path) -> None:
    first = cli("list", populated, "--json", "--limit", "1").json()[0]
    by_id = cli("show", populated, first["_outbox"]["id"]).json()
    by_message_id = cli("show", populated, first["messageId"]).json()
    assert by_id == by_message_id == first
    missing = cli("show", populated, "no-such-message")
    assert missing.code == 1 and "no message 'no-such-message'" in missing.err


def test_an_export_file_is_private_like_the_outbox(cli, populated: Path, tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.jsonl"
        assert cli("export", populated, "-o", fresh).code == 0
        existing = tmp_path / "existing.jsonl"
        existing.write_text("old\n")
        existing.chmod(0o644)
        assert cli("export", populated, "-o", existing).code == 0
    finally:
        os.umask(old_umask)
    for exported in (fresh, existing):
        assert stat.S_IMODE(exported.stat().st_mode) == 0o600
        assert len(exported.read_text().splitlines()) == 10


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's link takes root")
def test_an_export_file_another_user_planted_is_refused(
    cli, populated: Path, tmp_path: Path
) -> None:
    rootonly = tmp_path / "rootonly"  # root's: what planted links lead root to overwrite
    (rootonly / "deep").mkdir(parents=True)
    precious = rootonly / "precious.conf"
    precious.write_text("keep me\n")
    precious.chmod(0o644)

    def untouched() -> bool:
        return precious.read_text() == "keep me\n" and precious.stat().st_mode & 0o777 == 0o644

    def theirs(link: Path, target: Path) -> Path:
        link.symlink_to(target)
        os.lchown(link, NOBODY, NOBODY)
        return link

    planted = theirs(tmp_path / "export.jsonl", precious)
    refused = cli("export", populated, "-o", planted)
    assert refused.code == 1 and f"symbolic link {planted} was made by another user" in refused.err
    assert untouched()
    collector = cli_process("collector", "--out", str(planted), timeout=30)  # before serving
    assert collector.returncode == 1 and f"uid {NOBODY}" in collector.stderr and untouched()

    # Their link anywhere on the way: behind one of ours, as a directory, or
    # the one that decides where ".." goes (a textual clean-up skips it).
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "out.jsonl").symlink_to(theirs(tmp_path / "their-out.jsonl", precious))
    (ours / "reports").symlink_to(theirs(tmp_path / "their-reports", rootonly))
    (ours / "sub").symlink_to(theirs(tmp_path / "their-sub", rootonly / "deep"))
    for target in ("out.jsonl", "reports/precious.conf", "sub/../precious.conf"):
        refused = cli("export", populated, "-o", ours / target)
        assert refused.code == 1 and "was made by another user" in refused.err, target
        assert untouched()

    # A directory on the way another user owns: they could swap what is in it.
    owned = tmp_path / "owned"
    owned.mkdir()
    os.chown(owned, NOBODY, NOBODY)
    refused = cli("export", populated, "-o", owned / "x.jsonl")
    assert refused.code == 1 and f"directory {owned} may be changed by another user" in refused.err
    assert list(owned.iterdir()) == []

    # Their file (its owner could read what root writes), their FIFO (read by them).
    their_file = tmp_path / "planted.jsonl"
    their_file.write_text("")
    os.chown(their_file, NOBODY, NOBODY)
    refused = cli("export", populated, "-o", their_file)
    assert refused.code == 1 and f"owned by uid {NOBODY}, not by you" in refused.err
    assert their_file.read_text() == "" and their_file.stat().st_uid == NOBODY
    fifo = tmp_path / "their.fifo"
    os.mkfifo(fifo)
    os.chown(fifo, NOBODY, NOBODY)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        refused = cli("export", populated, "-o", fifo)
        assert refused.code == 1 and f"owned by uid {NOBODY}, not by you" in refused.err
        assert os.read(reader, 100) == b""  # nothing was written (no writer left: the end)
    finally:
        os.close(reader)
    os.mkfifo(tmp_path / "our.fifo")  # ours, with no reader: an error, not a hang
    unread = cli("export", populated, "-o", tmp_path / "our.fifo")
    assert unread.code == 1 and "a FIFO with no reader" in unread.err

    mine = tmp_path / "mine.jsonl"  # a link we made ourselves is followed
    mine.symlink_to(tmp_path / "target.jsonl")
    assert cli("export", populated, "-o", mine).code == 0
    assert len((tmp_path / "target.jsonl").read_text().splitlines()) == 10


def test_export_to_dev_stdout_leaves_the_file_the_shell_opened_as_it_was(
    populated: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.txt"
    log.write_text("old\n")
    log.chmod(0o644)
    with log.open("a") as appended:  # as `>> log.txt` does
        exported = subprocess.run(
            [sys.executable, "-m", "outbox_analytics", "export", str(populated),
             "-o", "/dev/stdout"],
            stdout=appended, stderr=subprocess.PIPE, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "old" and len(lines) == 11  # not cut
    assert stat.S_IMODE(log.stat().st_mode) == 0o644  # nor made 0600: the shell's file


def test_export_import_round_trip(cli, populated: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export.jsonl"
    result = cli("export", populated, "-o", exported)
    assert result.code == 0 and "exported 10" in result.err
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(lines) == 10
    assert {m["_outbox"]["state"] for m in lines} == {"pending", "inflight", "dead"}

    fresh = tmp_path / "fresh.db"
    assert cli("import", fresh, exported).json() == {"imported": 10, "skipped": 0}
    assert cli("import", fresh, exported).json() == {"imported": 0, "skipped": 10}
    with Outbox(fresh) as outbox:
        stored = [row.message for row in outbox.rows()]
    originals = [{k: v for k, v in m.items() if k != "_outbox"} for m in lines]
    assert stored == originals  # messageId and timestamp kept, order kept
    piped = cli("import", tmp_path / "piped.db", "-", stdin=exported.read_text())
    assert piped.json() == {"imported": 10, "skipped": 0}


GOOD = {
    "type": "track",
    "event": "E",
    "userId": "u",
    "messageId": "m-1",
    "timestamp": "2026-01-02T03:04:05.000+00:00",
}


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("{not json", "not JSON"),
        ({"type": "track", "messageId": "abc"}, "a track message needs event"),
        ({**GOOD, "event": 5}, "a track message needs event, a text"),
        ({**GOOD, "userId": None}, "needs userId or anonymousId"),
        ({**GOOD, "timestamp": "yesterday"}, "timestamp is not ISO 8601"),
        ({**GOOD, "timestamp": "2026-01-02T03:04:05"}, "timestamp has no time zone"),
        ({k: v for k, v in GOOD.items() if k != "timestamp"}, "timestamp must be"),
        ({**GOOD, "messageId": ""}, "needs messageId"),
        ({**GOOD, "type": "purchase"}, "type must be one of"),
        ({**GOOD, "properties": [1]}, "properties must be a JSON object"),
        ({**GOOD, "properties": {"blob": "x" * 40_000}}, "over the 32 KB limit"),
        ({"type": "group", **{k: GOOD[k] for k in ("userId", "messageId", "timestamp")}},
         "a group message needs groupId"),
        ({"type": "alias", **{k: GOOD[k] for k in ("userId", "messageId", "timestamp")}},
         "an alias message needs previousId"),
        ([1, 2], "not a JSON object"),
    ],
)  # fmt: skip
def test_import_is_all_or_nothing_and_names_the_bad_line(
    cli, populated: Path, tmp_path: Path, bad, said
) -> None:
    source = tmp_path / "in.jsonl"
    good = [json.dumps({**GOOD, "messageId": f"m-{n}"}) for n in range(3)]
    source.write_text("\n".join([*good, bad if isinstance(bad, str) else json.dumps(bad)]) + "\n")
    before = snapshot(populated.parent)
    result = cli("import", populated, source)
    assert result.code == 2 and result.out == ""
    assert "in.jsonl:4: " in result.err and said in result.err
    assert snapshot(populated.parent) == before  # not a byte changed


def test_import_into_a_missing_file_validates_first(cli, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"type": "track", "messageId": "abc"}) + "\n")
    assert cli("import", tmp_path / "new.db", source).code == 2
    assert not (tmp_path / "new.db").exists()


# -- reading never writes ------------------------------------------------------------

READING = [
    ("status",),
    ("status", "--json"),
    ("status", "--prometheus"),
    ("list", "--state", "all"),
    ("show", "1"),
    ("export",),
    ("check",),
    ("requeue", "--all", "--dry-run"),
    ("purge", "--state", "dead", "--dry-run"),
]


def persist_queue_file(path: Path) -> None:
    import persistqueue
    import persistqueue.serializers.msgpack

    queue = persistqueue.SQLiteAckQueue(
        str(path.parent),
        db_file_name=path.name,
        serializer=persistqueue.serializers.msgpack,
        auto_resume=False,
    )
    for n in range(3):
        queue.put({**GOOD, "messageId": f"pq-{n}"})
    queue.ack_failed(queue.get(block=False))
    del queue


@pytest.mark.parametrize("command", READING, ids=lambda c: " ".join(c))
def test_reading_changes_no_byte_of_an_outbox(cli, populated: Path, command) -> None:
    before = snapshot(populated.parent)
    assert cli(command[0], populated, *command[1:]).code in (0, 1)
    assert snapshot(populated.parent) == before  # no -wal or -shm left behind either


@pytest.mark.parametrize("command", READING, ids=lambda c: " ".join(c))
def test_reading_changes_no_byte_of_a_persist_queue_file(cli, tmp_path: Path, command) -> None:
    path = tmp_path / "pq.db"
    persist_queue_file(path)
    before = snapshot(tmp_path)
    result = cli(command[0], path, *command[1:])
    assert result.code in (0, 1), result.err
    assert snapshot(tmp_path) == before
    if command == ("status", "--json"):
        assert (result.json()["pending"], result.json()["dead"]) == (2, 1)


@pytest.mark.parametrize("command", READING, ids=lambda c: " ".join(c))
def test_reading_a_damaged_outbox_says_so_and_moves_nothing(cli, populated: Path, command) -> None:
    data = bytearray(populated.read_bytes())
    data[100:4000] = b"\xff" * 3900  # the schema page and beyond
    populated.write_bytes(bytes(data))
    before = snapshot(populated.parent)
    result = cli(command[0], populated, *command[1:])
    assert result.code == 1, result
    assert "damaged" in (result.err + result.out)
    assert "Traceback" not in result.err
    assert snapshot(populated.parent) == before


def test_a_healthy_outbox_in_a_read_only_directory_is_readable(cli, populated: Path) -> None:
    folder = populated.parent
    with read_only(folder):
        before = snapshot(folder)
        for command in READING:
            result = cli(command[0], populated, *command[1:])
            assert "damaged" not in result.err and "readonly" not in result.err, command
            assert result.code in (0, 1), (command, result)
        assert cli("status", populated, "--json").json()["pending"] == 8
        assert snapshot(folder) == before


class read_only:
    """A directory made read-only for real: a read-only bind of it for root, else chmod."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> None:
        if os.geteuid() == 0:
            subprocess.run(["mount", "--bind", str(self.folder), str(self.folder)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(self.folder)], check=True)
        else:
            self.folder.chmod(0o500)
        assert not os.access(self.folder, os.W_OK)

    def __exit__(self, *exc: object) -> None:
        if os.geteuid() == 0:  # lazily: a descriptor still open must not keep it mounted
            subprocess.run(["umount", "--lazy", str(self.folder)], check=True)
        else:
            self.folder.chmod(0o700)


def test_reading_while_a_job_writes_leaves_its_files(cli, populated: Path) -> None:
    writer = Client("k", outbox_path=str(populated), upload=False)
    writer.track("user", "During")
    assert Path(f"{populated}-wal").exists()
    for command in READING:
        assert cli(command[0], populated, *command[1:]).code in (0, 1)
    writer.track("user", "After")
    assert Path(f"{populated}-wal").exists() and Path(f"{populated}-shm").exists()
    writer.shutdown()
    assert row_states(populated)["pending"] == 10  # (the client reclaimed the 2 orphans)


def test_read_commands_do_not_block_a_writer(cli, populated: Path) -> None:
    writer = Client("k", outbox_path=str(populated), upload=False)
    with writer.batch():
        writer.track("user", "During")
        for command in ("status", "list", "check", "export"):
            assert cli(command, populated).code in (0, 1)
    started = time.monotonic()
    writer.track("user", "After")  # the readers never held the write lock
    assert time.monotonic() - started < 1
    writer.shutdown()


# -- changing -------------------------------------------------------------------------


class Terminal(io.StringIO):
    """stdin as a terminal where the operator types `answer`."""

    def isatty(self) -> bool:
        return True


def test_requeue_asks_and_a_no_changes_nothing(cli, populated: Path, monkeypatch) -> None:
    assert cli("requeue", populated, "--all", "--dry-run").json() == {"would_requeue": 2}
    refused = cli("requeue", populated, "--all")  # not a terminal, no --yes
    assert refused.code == 2 and "--yes" in refused.err
    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    declined = cli("requeue", populated, "--all")
    assert declined.code == 1 and "not confirmed" in declined.err
    assert row_states(populated)["dead"] == 2
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    assert cli("requeue", populated, "--all").json() == {"requeued": 2}
    assert row_states(populated)["dead"] == 0


def test_requeue_of_missing_ids_names_them_and_changes_nothing(cli, populated: Path) -> None:
    dead_ids = [
        m["_outbox"]["id"] for m in cli("list", populated, "--state", "dead", "--json").json()
    ]
    before = snapshot(populated.parent)
    result = cli("requeue", populated, "--id", dead_ids[0], 99, 3, "--yes")
    assert result.code == 1
    assert "[3, 99]" in result.err  # 99 is not there, 3 is not dead
    assert snapshot(populated.parent) == before
    assert cli("requeue", populated, "--id", 99, "--dry-run").code == 1


def test_a_requeued_row_shows_as_fresh(cli, tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    client = Client("k", outbox_path=str(path), upload=False)
    client.track("user", "E")
    client.shutdown()
    with Outbox(path) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        lease.dead_letter([lease.claim(1)[0].id], status=400, error="bad: price")
        lease.close()
    assert cli("requeue", path, "--all", "--yes").json() == {"requeued": 1}
    table = cli("status", path).out
    assert "pending          1" in table
    # The file line names the path, which can hold "400" (pytest-1400): leave it out.
    rows = [line for line in table.splitlines() if not line.startswith("file ")]
    assert not any("head failing" in row or "400" in row for row in rows), table
    listed = cli("list", path, "--json").json()[0]["_outbox"]
    assert (listed["attempts"], listed["last_status"], listed["last_error"]) == (0, None, None)


def test_requeue_of_many_ids_is_quick(cli, tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as outbox:
        with outbox.batch():
            for n in range(20_000):
                outbox.append(encode_message({**GOOD, "messageId": f"m{n}"}))
        lease = outbox.try_lease()
        assert lease is not None
        ids = [row.id for row in lease.claim(20_000)]
        lease.dead_letter(ids, status=400, error="bad")
        lease.close()
    result = cli("requeue", path, "--id", *ids, "--yes")  # took minutes when quadratic
    assert result.json() == {"requeued": 20_000}


def test_purge(cli, populated: Path) -> None:
    dead_ids = [
        m["_outbox"]["id"] for m in cli("list", populated, "--state", "dead", "--json").json()
    ]
    assert cli("requeue", populated, "--id", dead_ids[0], "--yes").json() == {"requeued": 1}
    assert cli("purge", populated, "--state", "dead", "--dry-run").json() == {"would_purge": 1}
    young = cli("purge", populated, "--state", "dead", "--older-than", "1h", "--yes")
    assert young.json() == {"purged": 0}
    assert cli("purge", populated, "--state", "dead", "--yes").json() == {"purged": 1}
    assert row_states(populated) == {"pending": 7, "inflight": 2, "dead": 0}


def test_purge_dry_run_on_a_damaged_file_moves_nothing(cli, populated: Path) -> None:
    populated.write_bytes(b"SQLite format 3\x00" + b"\xff" * 8000)
    before = snapshot(populated.parent)
    result = cli("purge", populated, "--state", "dead", "--dry-run")
    assert result.code == 1 and "damaged" in result.err and result.out == ""
    assert snapshot(populated.parent) == before


def test_check_and_vacuum(cli, populated: Path) -> None:
    healthy = cli("check", populated, "--json")  # rows left in flight count as pending
    assert healthy.json()["problems"] == [] and healthy.code == 0
    with Outbox(populated) as outbox:
        outbox.append(b"\xc1 garbage")
    broken = cli("check", populated, "--json").json()
    assert "1 row(s) whose payload cannot be decoded" in broken["problems"]
    assert cli("vacuum", populated).json()["bytes_after"] > 0
    assert cli("status", populated, "--json").json()["pending"] == 9


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
        ("demo", "--events", "0"),
        ("demo", "--events", "-5"),
        ("demo", "--dir", "{notes}"),
        ("vacuum", "{missing}"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(cli, populated: Path, tmp_path: Path, args) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an outbox")
    paths = {"missing": tmp_path / "missing.db", "notes": notes, "outbox": populated}
    before = snapshot(tmp_path)
    result = cli(*(arg.format(**paths) for arg in args), env={"OUTBOX_ANALYTICS_WRITE_KEY": ""})
    assert result.code == 2, result
    assert "Traceback" not in result.err
    assert result.err.count("\n") == 1  # one line
    assert snapshot(tmp_path) == before


def test_every_command_has_help(cli) -> None:
    commands = [
        "status", "list", "show", "export", "import", "requeue", "purge", "drain", "vacuum",
        "check", "track", "identify", "page", "screen", "group", "alias", "collector", "demo", "ls",
    ]  # fmt: skip
    for command in commands:
        result = cli(command, "--help")
        assert result.code == 0 and "usage: outbox-analytics" in result.out, command
    assert "Exit codes" in cli("--help").out


def test_append_commands_store_events_for_a_later_drain(cli, tmp_path: Path) -> None:
    path = tmp_path / "shell.db"
    env = {"OUTBOX_ANALYTICS_WRITE_KEY": "shell-key"}
    tracked = cli(
        "track", path, "--user-id", "u1", "--event", "Backup Done",
        "--properties", '{"bytes": 123}', "--timestamp", "2026-01-02T03:04:05Z", env=env,
    )  # fmt: skip
    assert tracked.code == 0, tracked.err
    message = tracked.json()
    assert message["properties"] == {"bytes": 123}
    assert message["timestamp"] == "2026-01-02T03:04:05.000+00:00"
    assert "shell-key" not in tracked.out + tracked.err
    for args in (
        ("identify", path, "--user-id", "u1", "--traits", '{"plan": "pro"}'),
        ("page", path, "--user-id", "u1", "--category", "Docs", "--name", "Intro"),
        ("screen", path, "--anonymous-id", "a1", "--name", "Home"),
        ("group", path, "--user-id", "u1", "--group-id", "g1"),
        ("alias", path, "--previous-id", "a1", "--user-id", "u1"),
    ):
        assert cli(*args, env=env).code == 0, args
    with Outbox(path) as outbox:
        types = [row.message["type"] for row in outbox.rows()]
    assert types == ["track", "identify", "page", "screen", "group", "alias"]


def test_the_kill_switch_is_said_out_loud(cli, populated: Path, receiver) -> None:
    off = {"OUTBOX_ANALYTICS_DISABLED": "1", "OUTBOX_ANALYTICS_WRITE_KEY": "k"}
    before = snapshot(populated.parent)
    drained = cli("drain", populated, "--host", receiver.url, env=off)
    assert drained.code == 2 and drained.out == ""
    assert "OUTBOX_ANALYTICS_DISABLED" in drained.err
    assert receiver.requests == []
    tracked = cli("track", populated, "--user-id", "u", "--event", "E", env=off)
    assert tracked.code == 0
    assert "OUTBOX_ANALYTICS_DISABLED is set: nothing was stored" in tracked.err
    assert snapshot(populated.parent) == before


# -- drain ----------------------------------------------------------------------------


def drain(cli, path: Path, host: str, *more: object) -> Ran:
    return cli("drain", path, "--host", host, *more, env={"OUTBOX_ANALYTICS_WRITE_KEY": "k"})


def test_drain_says_where_it_sends_only_once_the_file_took_its_key(
    cli, outbox_file: Path, receiver
) -> None:
    owner = Client("k", host=receiver.url, outbox_path=str(outbox_file), upload_interval=60)
    owner.track("user", "E")
    owner.shutdown(timeout=5)
    wrong = cli("drain", outbox_file, env={"OUTBOX_ANALYTICS_WRITE_KEY": "other-key"})
    assert wrong.code == 2 and "write key" in wrong.err
    assert "sending to" not in wrong.err  # it sends nowhere
    right = cli("drain", outbox_file, env={"OUTBOX_ANALYTICS_WRITE_KEY": "k"})
    assert right.code == 0 and f"sending to {receiver.url} (the file's host)" in right.err


def test_drain_says_it_sends_to_the_default_host_when_the_file_records_none(
    cli, tmp_path: Path
) -> None:
    path = tmp_path / "written-offline.db"
    Client("k", outbox_path=str(path), upload=False).shutdown()  # (nothing pending: no request)
    drained = cli("drain", path, env={"OUTBOX_ANALYTICS_WRITE_KEY": "k"})
    assert drained.code == 0 and drained.json() == {"sent": 0, "dead": 0, "pending": 0}
    assert (
        "sending to https://api.segment.io (the default: the file records no host)" in drained.err
    )


def test_drain_delivers_everything_pending(cli, populated: Path, receiver) -> None:
    result = drain(cli, populated, receiver.url)
    assert result.code == 0, result.err
    assert result.json() == {"sent": 8, "dead": 0, "pending": 0}  # 6 pending + 2 reclaimed
    assert len({m["messageId"] for m in receiver.accepted()}) == 8
    assert "k" not in result.err


def test_drain_names_a_refused_connection(cli, populated: Path) -> None:
    result = drain(cli, populated, "http://127.0.0.1:9", "--max-retries", "1", "--timeout", "20")
    assert result.code == 75
    assert result.json()["pending"] == 8
    said = "8 events still pending: request failed: connection refused by http://127.0.0.1:9"
    assert said in result.err


def test_drain_names_the_status_and_the_servers_words(cli, populated: Path, receiver) -> None:
    receiver.responder = lambda request: Reply(503, body="maintenance until 10:00")
    result = drain(cli, populated, receiver.url, "--max-retries", "1")
    assert result.code == 75
    assert "503" in result.err and "maintenance until 10:00" in result.err


def test_drain_names_a_redirect_and_its_target(cli, populated: Path, receiver) -> None:
    receiver.responder = lambda r: Reply(301, headers={"Location": "http://127.0.0.1:9/login"})
    result = drain(cli, populated, receiver.url, "--max-retries", "0")
    assert result.code == 75
    assert "301" in result.err and "http://127.0.0.1:9/login" in result.err
    assert row_states(populated) == {"pending": 8, "inflight": 0, "dead": 2}


def test_drain_timeout_is_a_deadline_for_everything(cli, populated: Path, receiver) -> None:
    receiver.responder = lambda r: Reply(delay=30)  # a server that never answers in time
    started = time.monotonic()
    result = drain(cli, populated, receiver.url, "--timeout", "1.5")
    took = time.monotonic() - started
    assert result.code == 75
    assert took < 3.0, took
    assert "--timeout ran out" in result.err  # the deadline that cut the request, named
    assert row_states(populated) == {"pending": 8, "inflight": 0, "dead": 2}


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_drain_hands_its_rows_back(populated: Path, receiver, sig, code) -> None:
    receiver.responder = lambda r: Reply(delay=30)
    process = subprocess.Popen(
        [sys.executable, "-m", "outbox_analytics", "drain", str(populated),
         "--host", receiver.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OUTBOX_ANALYTICS_WRITE_KEY": "k"},
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.requests, "drain never sent"
    process.send_signal(sig)
    out, err = process.communicate(timeout=20)
    assert process.returncode == code, err
    assert json.loads(out) == {"sent": 0, "dead": 0, "pending": 8}
    assert "events pending" in err and "Traceback" not in err
    assert row_states(populated) == {"pending": 8, "inflight": 0, "dead": 2}


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


# -- the other commands ----------------------------------------------------------------


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
    process.send_signal(signal.SIGINT)  # stop and print the counts
    _, err = process.communicate(timeout=10)
    assert json.loads(err.strip().splitlines()[-1])["unique"] == 5
    received = [json.loads(line)["properties"]["n"] for line in out.read_text().splitlines()]
    assert received == [0, 1, 2, 3, 4]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = cli_process("demo", "--events", "1500", "--dir", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost                       0" in result.stdout
    assert str(tmp_path / "outbox.sqlite3") in result.stdout


# -- found by a tester who had only the README ----------------------------------------


def damage_page(path: Path, page: int) -> None:
    with open(path, "r+b") as file:
        file.seek(2048 * page)
        file.write(b"\xde\xad" * 1024)


@pytest.fixture
def bigger(outbox_file: Path) -> Path:
    client = Client("k", outbox_path=str(outbox_file), upload=False)
    for n in range(300):
        client.track("user", "E", {"n": n, "pad": "p" * 40})
    client.shutdown()
    return outbox_file


def test_drain_salvages_a_file_with_a_bad_data_page(cli, bigger: Path, receiver) -> None:
    damage_page(bigger, 10)
    result = drain(cli, bigger, receiver.url)
    assert result.code in (0, 75), result.err
    delivered = {m["messageId"] for m in receiver.accepted()}
    assert len(delivered) > 250  # everything that could still be read
    assert list(bigger.parent.glob("*.corrupt-*"))  # the damaged file, kept aside


@pytest.mark.parametrize(
    "command",
    [("requeue", "--all", "--yes"), ("purge", "--state", "dead", "--yes"), ("vacuum",)],
)
def test_writing_commands_salvage_a_damaged_file(cli, bigger: Path, command) -> None:
    damage_page(bigger, 2)  # the third page: the index of in-flight and dead rows
    result = cli(command[0], bigger, *command[1:])
    assert result.code == 0, result.err
    assert list(bigger.parent.glob("*.corrupt-*"))
    assert cli("check", bigger).code == 0


@pytest.mark.parametrize("page", [1, 3, 5, 10])
def test_reading_a_damaged_page_leaves_no_sidecars(cli, bigger: Path, page: int) -> None:
    damage_page(bigger, page)
    before = snapshot(bigger.parent)
    for command in READING:
        assert cli(command[0], bigger, *command[1:]).code in (0, 1, 2), command
    assert snapshot(bigger.parent) == before


def test_a_deadline_keeps_the_real_cause(cli, populated: Path, receiver) -> None:
    receiver.responder = lambda r: Reply(301, headers={"Location": "http://127.0.0.1:9/login"})
    result = drain(cli, populated, receiver.url, "--timeout", "1.5")
    assert result.code == 75
    assert "301" in result.err and "http://127.0.0.1:9/login" in result.err
    assert "301" in cli("status", populated).out


@pytest.mark.parametrize(
    "host", ["http://[::1", "127.0.0.1:18200", "ftp://127.0.0.1", "", "http://", "http://h:99999"]
)
def test_a_bad_host_is_refused_and_changes_nothing(cli, populated: Path, host: str) -> None:
    before = snapshot(populated.parent)
    for force in ((), ("--force",)):
        result = drain(cli, populated, host, *force)
        assert result.code == 2 and "host" in result.err, result
    assert snapshot(populated.parent) == before


def test_import_wants_text_ids(cli, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({**GOOD, "messageId": 12345}) + "\n")
    result = cli("import", tmp_path / "o.db", source)
    assert result.code == 2 and "messageId must be" in result.err
    source.write_text(json.dumps({**GOOD, "userId": 5}) + "\n")
    assert cli("import", tmp_path / "o.db", source).json() == {"imported": 1, "skipped": 0}
    assert cli("list", tmp_path / "o.db", "--json").json()[0]["userId"] == "5"


def test_a_closed_pipe_ends_export_quietly(bigger: Path) -> None:
    export = subprocess.Popen(
        [sys.executable, "-m", "outbox_analytics", "export", str(bigger)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert export.stdout is not None and export.stderr is not None
    export.stdout.read(10)
    export.stdout.close()  # as `| head -c 10` does
    err = export.stderr.read().decode()
    assert export.wait(timeout=30) == 141
    assert "Traceback" not in err and "error" not in err
