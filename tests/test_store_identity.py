"""Which file an outbox is, and whose: one upload lease per real file, the owner's fingerprint.

- The upload lease belongs to the file itself, not to the path it was opened by:
  a symlink, a symlinked directory, a relative path or one with `..` never
  yields a second holder, nor does deleting or replacing a `*.lock` file; a
  second holder would reclaim the live holder's in-flight rows (duplicates,
  order inversions). Clients of one process on one file share one lease.
- The file records a salted fingerprint of its write key and host (never the
  key): a Client, or a drain, with another key or host is refused by name;
  `--force` makes the new key the owner; old files adopt the first key used.
- A bad `outbox_path` ("", a directory, a parent that cannot be created)
  fails at Client() with an OutboxError naming it, creating nothing anywhere.
- The table and status codes stay persist-queue's own.

Real files, real symlinks, real subprocesses killed with SIGKILL, a real HTTP
server on 127.0.0.1 (tests/receiver.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import persistqueue
import persistqueue.serializers.msgpack
import pytest
import tenacity

import outbox_analytics
from outbox_analytics import Client, OutboxError, cli

from .conftest import start_python
from .receiver import Receiver, Reply, SenderSpans

# -- helpers ----------------------------------------------------------------------


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Clients made by a test, shut down after it whatever happens."""
    made: list[Client] = []
    yield made
    for client in made:
        client.shutdown(timeout=2)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Subprocesses started by a test, killed after it if still alive."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def read_line(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """The next line the subprocess prints, waiting at most `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"no output within {timeout}s: {err}")
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"the subprocess ended early: {err}")
    return line.strip()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)


def sent_per_source(receiver: Receiver, source: str) -> list[int]:
    return [
        m["properties"]["n"] for m in receiver.accepted() if m["properties"]["source"] == source
    ]


def assert_no_message_sent_twice(receiver: Receiver) -> None:
    every = [m["messageId"] for r in receiver.requests for m in r.batch]
    assert len(every) == len(set(every)), "a message was sent twice"


def outbox_meta(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT key, value FROM outbox_meta").fetchall())
    finally:
        conn.close()


# -- one lease per real file ---------------------------------------------------------

CLAIMER = """
import sys, time
from outbox_analytics.store import Outbox

outbox = Outbox(sys.argv[1])
lease = outbox.try_lease()
rows = lease.claim(3) if lease is not None else []
print(" ".join(str(row.id) for row in rows), flush=True)
time.sleep(60)
"""


def test_every_path_to_the_file_meets_the_live_holders_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: list[subprocess.Popen[str]]
) -> None:
    from outbox_analytics.store import Outbox, encode_message

    real_dir = tmp_path / "real"
    (real_dir / "sub").mkdir(parents=True)
    real = real_dir / "outbox.sqlite3"
    (tmp_path / "link.sqlite3").symlink_to(real)
    (tmp_path / "linkdir").symlink_to(real_dir, target_is_directory=True)
    with Outbox(real) as outbox:
        for number in range(5):
            outbox.append(encode_message({"n": number}))

    holder = start_python(CLAIMER, str(real))  # holds the lease through the real path
    processes.append(holder)
    assert len(read_line(holder).split()) == 3

    monkeypatch.chdir(real_dir)
    aliases = [
        str(tmp_path / "link.sqlite3"),  # a symlink to the file
        str(tmp_path / "linkdir" / "outbox.sqlite3"),  # through a symlinked directory
        "outbox.sqlite3",  # relative
        "sub/../outbox.sqlite3",  # relative, with ..
        str(real_dir / "sub" / ".." / "outbox.sqlite3"),  # absolute, with ..
        "../link.sqlite3",  # a relative symlink
    ]
    for alias in aliases:
        with Outbox(alias) as outbox:
            assert outbox.try_lease() is None, alias
            assert not outbox.lease_is_free(), alias
            assert outbox.stats().inflight == 3, alias  # the live holder's rows stay its own
        # A Client reclaims rows left by a dead uploader when it starts: not these.
        client = Client("k", outbox_path=alias, upload=False)
        assert client.stats().inflight == 3, alias
        client.shutdown()

    kill(holder)
    with Outbox(tmp_path / "link.sqlite3") as outbox:
        lease = outbox.try_lease()  # the lease died with its holder: ours now
        assert lease is not None
        try:
            assert outbox.stats().inflight == 0  # taking it reclaimed the dead holder's rows
            assert [row.message["n"] for row in lease.claim(10)] == [0, 1, 2, 3, 4]
            # Now we hold it: no other path of ours, nor another process, gets it.
            for alias in aliases:
                with Outbox(alias) as other:
                    assert other.try_lease() is None, alias
            prober = start_python(CLAIMER, str(real))
            processes.append(prober)
            assert read_line(prober) == ""  # no lease: nothing claimed
            assert outbox.stats().inflight == 5  # and nothing of ours reclaimed
        finally:
            lease.close()


HOLDER = """
import sys, time
from outbox_analytics import Client

client = Client("k", host=sys.argv[1], outbox_path=sys.argv[2], upload_interval=0.01, timeout=30)
for n in range(5):
    client.track("u", "Held", {"source": "holder", "n": n})
client.flush(timeout=0.01)  # wakes the uploader, which sends at once
print("stored", flush=True)
time.sleep(60)
"""


def test_deleting_or_replacing_lock_files_never_makes_a_second_holder(
    tmp_path: Path,
    receiver: Receiver,
    clients: list[Client],
    processes: list[subprocess.Popen[str]],
) -> None:
    real = tmp_path / "outbox.sqlite3"
    # The holder's first request hangs, then fails: its 5 rows stay in flight meanwhile.
    receiver.script = [Reply(status=503, delay=8)]
    holder = start_python(HOLDER, receiver.url, str(real))
    processes.append(holder)
    assert read_line(holder) == "stored"
    assert wait_until(lambda: len(receiver.requests) == 1), "the holder sent nothing"

    probe = Client("k", outbox_path=str(real), upload=False)
    clients.append(probe)
    assert probe.stats().inflight == 5

    # Delete every lock file next to the outbox, then put fresh ones in their place.
    lock_names = {p.name for p in tmp_path.glob("*.lock")} | {real.name + ".lock"}
    for name in lock_names:
        (tmp_path / name).unlink(missing_ok=True)
    for name in lock_names:
        (tmp_path / name).write_bytes(b"")

    second = Client(
        "k",
        host=receiver.url,
        outbox_path=str(real),
        upload_interval=0.01,
        retry_wait=tenacity.wait_fixed(0.01),
    )
    clients.append(second)
    assert second.stats().inflight == 5  # Client() reclaimed nothing: the holder lives
    for n in range(3):
        second.track("u", "Second", {"source": "second", "n": n})
    time.sleep(1.0)  # the second's uploader tries the lease every 0.5 s
    assert len(receiver.requests) == 1  # nobody else sent anything
    assert second.stats().inflight == 5
    assert not second.uploader.holds_lease

    kill(holder)
    assert second.flush(timeout=15).pending == 0  # the lease passes on once its holder is dead
    assert second.uploader.holds_lease
    assert sent_per_source(receiver, "holder") == [0, 1, 2, 3, 4]  # each once, in order
    assert sent_per_source(receiver, "second") == [0, 1, 2]
    accepted = receiver.accepted()
    assert [m["properties"]["source"] for m in accepted] == ["holder"] * 5 + ["second"] * 3


PRODUCER = """
import os, sys, time, tenacity
from outbox_analytics import Client

url, path, source, encoding, go = sys.argv[1:6]
client = Client(
    "k", host=url, outbox_path=path, gzip=encoding == "gzip", upload_size=10,
    upload_interval=0.01, max_retries=3, retry_wait=tenacity.wait_fixed(0.01), timeout=30,
)
print("ready", flush=True)
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
for n in range(150):
    client.track("u", "Produced", {"source": source, "n": n})
    if n % 10 == 9:
        time.sleep(0.02)  # a trickle: every uploader that thinks it may upload, does
print("flushed", client.flush(timeout=60).pending, flush=True)
"""


def test_two_processes_through_a_symlink_and_the_real_path_upload_one_at_a_time(
    tmp_path: Path, receiver: Receiver, processes: list[subprocess.Popen[str]]
) -> None:
    spans = SenderSpans(delay=0.02)
    receiver.responder = spans
    real = tmp_path / "real" / "outbox.sqlite3"
    real.parent.mkdir()
    link = tmp_path / "link.sqlite3"
    link.symlink_to(real)
    Client("k", outbox_path=str(real), upload=False).shutdown()  # the file exists for both
    go = tmp_path / "go"

    by_link = start_python(PRODUCER, receiver.url, str(link), "link", "gzip", str(go))
    by_real = start_python(PRODUCER, receiver.url, str(real), "real", "plain", str(go))
    processes.extend([by_link, by_real])
    assert read_line(by_link) == read_line(by_real) == "ready"
    go.write_text("")
    assert read_line(by_link, 90) == "flushed 0"
    assert read_line(by_real, 90) == "flushed 0"

    for source in ("link", "real"):
        assert sent_per_source(receiver, source) == list(range(150)), source  # once, in order
    assert_no_message_sent_twice(receiver)
    assert spans.assert_one_at_a_time() <= 1  # one uploader; it changed at most once (an exit)


def holds_lease(client: Client) -> bool:
    assert client.uploader is not None
    return client.uploader.holds_lease


def test_clients_of_one_process_share_one_lease_and_deliver_everything(
    tmp_path: Path, receiver: Receiver, clients: list[Client]
) -> None:
    spans = SenderSpans(delay=0.005)
    receiver.responder = spans
    real = tmp_path / "outbox.sqlite3"
    link = tmp_path / "link.sqlite3"
    link.symlink_to(real)
    options: dict[str, Any] = {
        "host": receiver.url,
        "upload_size": 5,
        "upload_interval": 0.01,
        "retry_wait": tenacity.wait_fixed(0.01),
    }
    first = Client("k", outbox_path=str(real), gzip=True, **options)
    second = Client("k", outbox_path=str(link), gzip=False, **options)
    clients.extend([first, second])

    both: list[float] = []
    held: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def watch() -> None:
        # One client held it before and after the other was seen holding it: at once.
        # (Two plain reads could straddle a hand-over and see both.)
        try:
            while not stop.is_set():
                a1, b1 = holds_lease(first), holds_lease(second)
                a2, b2 = holds_lease(first), holds_lease(second)
                if (a1 and b1 and a2) or (b1 and a2 and b2):
                    both.append(time.monotonic())
                held.update(name for name, holds in (("first", a1), ("second", b1)) if holds)
                time.sleep(0.0005)
        except BaseException as exc:
            errors.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for n in range(60):
            first.track("u", "E", {"source": "first", "n": n})
            second.track("u", "E", {"source": "second", "n": n})
            if n % 10 == 9:
                time.sleep(0.01)
        assert first.flush(timeout=20).pending == 0
        assert second.flush(timeout=20).pending == 0

        # The holder stops: the other client of this process takes the lease over.
        holder, other = (first, second) if holds_lease(first) else (second, first)
        holder.shutdown(timeout=5)
        source = "first" if other is first else "second"
        for n in range(60, 70):
            other.track("u", "E", {"source": source, "n": n})
        assert other.flush(timeout=20).pending == 0
        assert holds_lease(other)
    finally:
        stop.set()
        watcher.join(5)

    assert not errors, errors
    assert both == [], "both clients held the lease at once"
    assert held, "neither client ever held the lease"
    assert sent_per_source(receiver, source) == list(range(70))
    other_source = "second" if source == "first" else "first"
    assert sent_per_source(receiver, other_source) == list(range(60))
    assert_no_message_sent_twice(receiver)
    spans.assert_one_at_a_time()


# -- the owner's fingerprint ---------------------------------------------------------

SECRET = "wk-Secret-7f3a9c1e5b"


def test_the_write_key_never_reaches_the_file(
    outbox_file: Path, receiver: Receiver, clients: list[Client]
) -> None:
    storer = Client(SECRET, outbox_path=str(outbox_file), upload=False)
    clients.append(storer)
    for n in range(20):
        storer.track("u", "E", {"n": n})
    sender = Client(SECRET, host=receiver.url, outbox_path=str(outbox_file), upload_interval=0.01)
    clients.append(sender)
    assert sender.flush(timeout=10).pending == 0
    assert receiver.accepted()[0]["properties"]["n"] == 0

    def file_bytes() -> bytes:
        parts = [outbox_file, Path(f"{outbox_file}-wal"), Path(f"{outbox_file}-shm")]
        return b"".join(part.read_bytes() for part in parts if part.exists())

    for form in (SECRET, SECRET.lower(), SECRET.upper()):
        assert form.encode() not in file_bytes()
        assert form.encode("utf-16-le") not in file_bytes()
    storer.shutdown()
    sender.shutdown()
    assert SECRET.encode() not in file_bytes()  # nor after the last checkpoint


def test_the_file_records_a_salted_fingerprint_of_its_key_and_host(
    tmp_path: Path, receiver: Receiver, clients: list[Client]
) -> None:
    paths = [tmp_path / "one.sqlite3", tmp_path / "two.sqlite3"]
    for path in paths:
        clients.append(Client(SECRET, host=receiver.url, outbox_path=str(path)))
    metas = [outbox_meta(path) for path in paths]
    for meta in metas:
        assert {"owner_salt", "owner_key", "owner_host"} <= set(meta)
        for value in (meta["owner_key"], meta["owner_host"]):
            assert SECRET not in str(value) and receiver.url not in str(value)
            assert hashlib.sha256(SECRET.encode()).hexdigest() not in str(value)  # not unsalted
    # The same key, salted differently per file: a fingerprint gives nothing away.
    assert metas[0]["owner_key"] != metas[1]["owner_key"]
    assert metas[0]["owner_salt"] != metas[1]["owner_salt"]


def test_another_write_key_is_refused_without_naming_either_key(
    outbox_file: Path, clients: list[Client]
) -> None:
    owner = Client("key-Alpha", outbox_path=str(outbox_file), upload=False)
    clients.append(owner)
    owner.track("u", "Mine")
    for upload in (False, True):
        with pytest.raises(OutboxError) as caught:
            clients.append(Client("key-Bravo", outbox_path=str(outbox_file), upload=upload))
        assert isinstance(caught.value, outbox_analytics.OutboxMismatch)
        message = str(caught.value)
        assert "write key" in message and str(outbox_file) in message
        assert "key-Alpha" not in message and "key-Bravo" not in message
        assert "Alpha" not in repr(caught.value.args) and "Bravo" not in repr(caught.value.args)
    # The owner still uses it, and nothing of the refused clients was stored.
    again = Client("key-Alpha", outbox_path=str(outbox_file), upload=False)
    clients.append(again)
    assert [row.message["event"] for row in again.outbox.rows("all")] == ["Mine"]


def test_another_host_is_refused_when_uploading(
    outbox_file: Path, receiver: Receiver, clients: list[Client]
) -> None:
    clients.append(Client("key-A", host=receiver.url, outbox_path=str(outbox_file)))
    with pytest.raises(OutboxError) as caught:
        clients.append(Client("key-A", host="http://127.0.0.1:9", outbox_path=str(outbox_file)))
    assert isinstance(caught.value, outbox_analytics.OutboxMismatch)
    message = str(caught.value)
    assert "host" in message and str(outbox_file) in message
    assert "another write key" not in message  # it says which one differs
    assert "key-A" not in message
    # A store-only client never sends, so the host is none of its business.
    clients.append(
        Client("key-A", host="http://127.0.0.1:9", outbox_path=str(outbox_file), upload=False)
    )


def test_a_store_only_client_leaves_the_host_to_the_first_uploader(
    outbox_file: Path, receiver: Receiver, clients: list[Client]
) -> None:
    storer = Client("key-A", host="http://127.0.0.1:9", outbox_path=str(outbox_file), upload=False)
    clients.append(storer)
    storer.track("u", "Stored first")
    assert "owner_host" not in outbox_meta(outbox_file)
    sender = Client("key-A", host=receiver.url, outbox_path=str(outbox_file), upload_interval=0.01)
    clients.append(sender)
    assert sender.flush(timeout=10).pending == 0
    assert [m["event"] for m in receiver.accepted()] == ["Stored first"]
    with pytest.raises(OutboxError, match="host"):
        clients.append(Client("key-A", host="http://127.0.0.1:9", outbox_path=str(outbox_file)))


def make_persist_queue_file(path: Path) -> None:
    queue = persistqueue.SQLiteAckQueue(
        str(path.parent),
        db_file_name=path.name,
        serializer=persistqueue.serializers.msgpack,
        auto_resume=False,
    )
    for number in range(3):
        queue.put({"type": "track", "event": "Old", "messageId": f"old-{number}", "n": number})
    del queue


def make_outbox_without_owner(path: Path) -> None:
    client = Client("key-Z", outbox_path=str(path), upload=False)
    for number in range(3):
        client.track("u", "Old", {"n": number})
    client.shutdown()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM outbox_meta WHERE key LIKE 'owner%'")
    conn.close()


@pytest.mark.parametrize("make_old_file", [make_persist_queue_file, make_outbox_without_owner])
def test_an_old_file_without_a_fingerprint_adopts_the_first_key(
    outbox_file: Path,
    receiver: Receiver,
    clients: list[Client],
    make_old_file: Callable[[Path], None],
) -> None:
    make_old_file(outbox_file)
    first = Client("key-B", host=receiver.url, outbox_path=str(outbox_file), upload_interval=0.01)
    clients.append(first)
    assert first.flush(timeout=10).pending == 0
    accepted = receiver.accepted()
    assert [m["event"] for m in accepted] == ["Old"] * 3
    assert {r.body["writeKey"] for r in receiver.requests} == {"key-B"}
    with pytest.raises(OutboxError, match="write key"):
        clients.append(Client("key-Z", outbox_path=str(outbox_file), upload=False))


def test_drain_with_another_key_refuses_unless_forced(
    outbox_file: Path,
    receiver: Receiver,
    clients: list[Client],
    capsys: pytest.CaptureFixture[str],
) -> None:
    owner = Client("key-A", outbox_path=str(outbox_file), upload=False)
    for n in range(5):
        owner.track("u", "Pending", {"n": n})
    owner.shutdown()

    args = ["drain", str(outbox_file), "--write-key", "other", "--host", receiver.url]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "write key" in err
    assert "key-A" not in err and not re.search(r"\bother\b", err)  # neither key shown
    assert receiver.requests == []  # nothing was sent with the wrong key

    assert cli.main([*args, "--force"]) == 0
    assert [m["properties"]["n"] for m in receiver.accepted()] == [0, 1, 2, 3, 4]
    assert {r.body["writeKey"] for r in receiver.requests} == {"other"}
    # Forced: the events, and the file, are the new key's now.
    with pytest.raises(OutboxError, match="write key"):
        clients.append(Client("key-A", outbox_path=str(outbox_file), upload=False))
    clients.append(Client("other", outbox_path=str(outbox_file), upload=False))


# -- bad settings fail at Client() ---------------------------------------------------


def files_under(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*"))


def test_an_empty_outbox_path_fails_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, state, cwd = tmp_path / "home", tmp_path / "state", tmp_path / "cwd"
    for directory in (home, state, cwd):
        directory.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.delenv("OUTBOX_ANALYTICS_PATH", raising=False)
    monkeypatch.chdir(cwd)
    for upload in (False, True):
        with pytest.raises(OutboxError, match="empty"):
            Client("k", outbox_path="", upload=upload).shutdown()
    assert files_under(tmp_path) == [cwd, home, state]  # no default file was made instead


def test_a_directory_as_outbox_path_fails(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    link = tmp_path / "link-to-directory"
    link.symlink_to(directory, target_is_directory=True)
    for path in (directory, link):
        with pytest.raises(OutboxError) as caught:
            Client("k", outbox_path=str(path), upload=False).shutdown()
        message = str(caught.value)
        assert str(path) in message or str(directory) in message  # as given, or resolved
        assert "directory" in message
    assert files_under(directory) == []


def test_a_path_whose_directory_cannot_be_made_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for path in (blocker / "outbox.sqlite3", blocker / "deeper" / "outbox.sqlite3"):
        with pytest.raises(OutboxError) as caught:
            Client("k", outbox_path=str(path), upload=False).shutdown()
        assert str(path) in str(caught.value)
    assert blocker.read_text() == "not a directory"


def test_a_path_on_a_read_only_disk_fails(tmp_path: Path) -> None:
    disk = tmp_path / "ro"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for path in (disk / "outbox.sqlite3", disk / "sub" / "outbox.sqlite3"):
            with pytest.raises(OutboxError) as caught:
                Client("k", outbox_path=str(path), upload=False).shutdown()
            assert str(path) in str(caught.value)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -- persist-queue's table ---------------------------------------------------------


def test_the_table_has_persist_queues_columns_without_autoincrement(tmp_path: Path) -> None:
    from outbox_analytics.store import Outbox, schema

    queue_class = persistqueue.SQLiteAckQueue
    table = f"`{queue_class._TABLE_NAME}_default`"  # persist-queue quotes its table names
    assert table == schema.TABLE
    assert queue_class._KEY_COLUMN == "_id"
    theirs = sqlite3.connect(":memory:")
    theirs.execute(queue_class._SQL_CREATE.format(table_name=table, key_column="_id"))
    Outbox(tmp_path / "ours.sqlite3").close()
    ours = sqlite3.connect(tmp_path / "ours.sqlite3")

    def columns(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
        info = conn.execute(f"PRAGMA table_info({table})").fetchall()
        return [(name, kind, pk) for _, name, kind, _, _, pk in info]

    assert columns(ours)[:4] == columns(theirs)  # then our own columns
    # A plain rowid key: appends do not write sqlite_sequence (ids are kept by a tombstone).
    create = ours.execute("SELECT sql FROM sqlite_master WHERE name = ?", (schema.TABLE_NAME,))
    assert "AUTOINCREMENT" not in create.fetchone()[0].upper()


def test_the_status_codes_are_persist_queues() -> None:
    from persistqueue.sqlackqueue import AckStatus

    from outbox_analytics.store import schema

    assert int(AckStatus.inited) == schema.NEW
    assert int(AckStatus.ready) == schema.READY
    assert int(AckStatus.unack) == schema.INFLIGHT
    assert int(AckStatus.ack_failed) == schema.DEAD


def test_rows_in_each_persist_queue_state_are_read_as_that_state(outbox_file: Path) -> None:
    from outbox_analytics.store import Outbox

    queue = persistqueue.SQLiteAckQueue(
        str(outbox_file.parent),
        db_file_name=outbox_file.name,
        serializer=persistqueue.serializers.msgpack,
        auto_resume=False,
    )
    for number in range(4):
        queue.put({"type": "track", "event": "E", "messageId": f"m-{number}", "n": number})
    taken = [queue.get(block=False) for _ in range(3)]  # 0, 1, 2: unack (in flight)
    queue.nack(taken[0])  # 0: ready (released)
    queue.ack_failed(taken[1])  # 1: ack_failed
    del queue  # 2 stays unack, 3 inited

    with Outbox(outbox_file) as outbox:  # opened, not leased: nothing reclaimed
        stats = outbox.stats()
        # Row 2's uploader (persist-queue's) is gone: it is sent again, so it counts as pending.
        assert (stats.pending, stats.inflight, stats.dead) == (3, 0, 1)
        assert [row.message["n"] for row in outbox.rows("pending")] == [0, 2, 3]  # as counted
        assert [row.message["n"] for row in outbox.rows("dead")] == [1]
        assert [row.message["n"] for row in outbox.rows("inflight")] == [2]
