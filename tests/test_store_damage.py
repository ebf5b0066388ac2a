"""What counts as a damaged outbox, and what happens to one (outbox_analytics/store/recovery.py).

- A locked file is not a damaged one: an exclusive lock held by another process
  makes `Outbox(wait=...)` raise OutboxBusy and a `Client` wait, never move anything.
- Errors that are not damage never rename: a damaged or healthy outbox on a
  read-only mount raises an OutboxError subclass and nothing is created or moved.
- Damage is what SQLite says: a damaged file is moved aside once, under a unique
  name, every time; a file that is not SQLite raises NotAnOutbox and stays as it was.
- Damage found while opening (counting, binding the key, reclaiming) is recovered.
- Sixteen processes meeting one damaged file at once: one moves it aside, all
  write the same fresh file, and as many rows are salvaged as by a lone process.
- The recovery log line gives honest counts ("up to M rows unreadable").
- Raw sqlite3 errors never reach the caller: `track()` says False, `stats()` works.

Every file is a real SQLite file, damaged by writing its bytes; every other
process is a real one; read-only and full disks are real tmpfs mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

import outbox_analytics
from outbox_analytics import Client

from .conftest import outbox_with

# The checkout this process imported: other processes import the same one.
CODE = Path(outbox_analytics.__file__).resolve().parents[1]


def _start_python(code: str, *args: str) -> subprocess.Popen[str]:
    """Run `code` in a fresh interpreter importing the same package (as conftest's start_python)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(CODE)),
    )


# -- building and damaging real outbox files ------------------------------------------


def _outbox_with(path: Path, count: int) -> None:
    outbox_with(path, count)
    # The last connection closed: every commit is in the main file, no WAL is left.
    assert not os.path.exists(f"{path}-wal")


def _btree_pages(path: Path) -> dict[str, tuple[list[int], list[int]]]:
    """Each b-tree's (interior pages, leaf pages), leaves in key order (oldest row first).

    Read from the file's bytes (not `dbstat`, which not every SQLite build has).
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        roots = dict(conn.execute("SELECT name, rootpage FROM sqlite_master WHERE rootpage > 0"))
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    data = path.read_bytes()

    def walk(page: int, interior: list[int], leaves: list[int]) -> None:
        base = (page - 1) * page_size
        header = base + (100 if page == 1 else 0)
        if data[header] in (0x0D, 0x0A):  # table leaf, index leaf
            leaves.append(page)
            return
        assert data[header] in (0x05, 0x02), f"page {page} is not a b-tree page"
        interior.append(page)
        cells = int.from_bytes(data[header + 3 : header + 5], "big")
        for cell in range(cells):
            at = header + 12 + 2 * cell
            offset = int.from_bytes(data[at : at + 2], "big")
            walk(int.from_bytes(data[base + offset : base + offset + 4], "big"), interior, leaves)
        walk(int.from_bytes(data[header + 8 : header + 12], "big"), interior, leaves)

    trees: dict[str, tuple[list[int], list[int]]] = {}
    for name, root in roots.items():
        interior: list[int] = []
        leaves: list[int] = []
        walk(root, interior, leaves)
        trees[name] = (interior, leaves)
    return trees


def _page_size(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


def _zero_pages(path: Path, pages: list[int]) -> None:
    page_size = _page_size(path)
    with open(path, "r+b") as file:
        for page in pages:
            file.seek((page - 1) * page_size)
            file.write(bytes(page_size))


def _truncate(path: Path, keep: float) -> bytes:
    """Cut the file to `keep` of its length (a disk that lost the end); its new bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path.read_bytes()


def _aside(directory: Path) -> list[Path]:
    """The damaged files moved aside (main files only, not their -wal and -shm)."""
    return sorted(p for p in directory.glob("*.corrupt-*") if not p.name.endswith(("-wal", "-shm")))


def _listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _stored_messages(path: Path) -> list[dict]:
    """Every message in an outbox file, read with sqlite3 and msgpack (not with our code)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT data FROM ack_queue_default ORDER BY _id").fetchall()
    finally:
        conn.close()
    return [msgpack.unpackb(data, raw=False) for (data,) in rows]


@contextlib.contextmanager
def _tmpfs(directory: Path, size: str = "16m") -> Iterator[Path]:
    """A real tmpfs mounted at `directory` (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr!r}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def _leave_side_files(path: Path) -> None:
    """A process that had the outbox open is killed: its -wal and -shm stay behind."""
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sqlite3, sys\n"
            "conn = sqlite3.connect(sys.argv[1])\n"
            "conn.execute('SELECT count(*) FROM ack_queue_default').fetchall()\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
            str(path),
        ],
        capture_output=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(CODE)),
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert os.path.exists(f"{path}-shm") and os.path.exists(f"{path}-wal")


# -- 1. a locked file is not a damaged one ------------------------------------------------

# Another program (the sqlite3 shell, a backup tool) takes the file exclusively
# and holds a write transaction; it rolls back and exits once `release` exists
# (or after `hold` seconds), so that nothing it did changes the file.
LOCKER = """
import os, sqlite3, sys, time
path, hold, release = sys.argv[1], float(sys.argv[2]), sys.argv[3]
conn = sqlite3.connect(path, isolation_level=None)
conn.execute("PRAGMA locking_mode=EXCLUSIVE")
conn.execute("BEGIN EXCLUSIVE")
conn.execute("UPDATE outbox_meta SET value = value WHERE key = 'dropped'")
print("locked", flush=True)
until = time.monotonic() + hold
while time.monotonic() < until and not os.path.exists(release):
    time.sleep(0.01)
conn.execute("ROLLBACK")
conn.close()
print("released", flush=True)
"""


def _lock_exclusively(path: Path, hold: float, release: Path) -> subprocess.Popen[str]:
    locker = _start_python(LOCKER, str(path), str(hold), str(release))
    assert locker.stdout is not None
    line = locker.stdout.readline().strip()
    if line != "locked":
        locker.kill()
        pytest.fail(f"the locker did not lock: {line!r} {locker.communicate()[1]}")
    return locker


def test_a_locked_outbox_raises_busy_and_nothing_is_moved(tmp_path: Path) -> None:
    from outbox_analytics.store import Outbox

    path = tmp_path / "outbox.sqlite3"
    _outbox_with(path, 20)
    original = path.read_bytes()
    release = tmp_path / "release"
    locker = _lock_exclusively(path, 30.0, release)
    try:
        before = _listing(tmp_path)
        started = time.monotonic()
        with pytest.raises(Exception) as raised:
            Outbox(path, wait=0.5)
        waited = time.monotonic() - started
        # Checked while the other process still holds the lock.
        assert _listing(tmp_path) == before  # nothing moved aside, created or removed
        assert not _aside(tmp_path)
        assert path.read_bytes() == original
        assert isinstance(raised.value, outbox_analytics.OutboxBusy), repr(raised.value)
        assert raised.value.path == os.path.realpath(path)
        assert str(path) in str(raised.value)
        assert 0.4 <= waited < 10  # it waited about `wait`, then gave up
    finally:
        release.touch()
        out, err = locker.communicate(timeout=30)
    assert locker.returncode == 0 and "released" in out, err
    with Outbox(path, wait=5) as outbox:  # the file was never damaged: it opens as it was
        assert outbox.stats().pending == 20
    assert not _aside(tmp_path)


def test_a_client_started_on_a_locked_outbox_waits_then_works(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _outbox_with(path, 20)
    locker = _lock_exclusively(path, 1.0, tmp_path / "never")
    try:
        started = time.monotonic()
        client = Client("k", outbox_path=str(path), upload=False)
        oks = [client.track("u", "While locked", {"n": n}) for n in range(5)]
        waited = time.monotonic() - started
    finally:
        out, err = locker.communicate(timeout=30)
    assert locker.returncode == 0 and "released" in out, err
    assert 0.5 <= waited < 30  # it really met the lock, and waited it out
    assert [ok for ok, _ in oks] == [True] * 5
    assert client.stats().pending == 25 and client.stats().dropped == 0
    client.shutdown()
    assert not _aside(tmp_path)
    stored = _stored_messages(path)
    assert [m["properties"]["n"] for m in stored if m["event"] == "Stored"] == list(range(20))
    assert [m["messageId"] for m in stored[20:]] == [msg["messageId"] for _, msg in oks]


# -- 2. errors that are not damage never rename -------------------------------------------


@pytest.mark.parametrize("side_files", [True, False], ids=["wal-and-shm-left", "no-side-files"])
@pytest.mark.parametrize("state", ["damaged", "healthy"])
def test_an_outbox_on_a_read_only_mount_raises_and_nothing_moves(
    tmp_path: Path, state: str, side_files: bool
) -> None:
    source = tmp_path / "source.sqlite3"
    _outbox_with(source, 300)
    with _tmpfs(tmp_path / "ro") as mount:
        path = mount / "outbox.sqlite3"
        path.write_bytes(source.read_bytes())
        if side_files:
            _leave_side_files(path)
        if state == "damaged":
            _truncate(path, 0.7)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        before = _listing(mount)

        with pytest.raises(Exception) as raised:
            Client("k", outbox_path=str(path), upload=False)

        assert _listing(mount) == before  # nothing created, moved or changed
        error = raised.value
        assert isinstance(error, outbox_analytics.OutboxError), repr(error)
        assert error.path == os.path.realpath(path)
        if state == "healthy":
            assert not isinstance(
                error, (outbox_analytics.OutboxDamaged, outbox_analytics.NotAnOutbox)
            )
        elif side_files:  # SQLite can read it, and says it is damaged
            assert isinstance(error, outbox_analytics.OutboxDamaged), repr(error)
        else:  # SQLite cannot even open it (no -shm can be made): unavailable, or damaged
            assert isinstance(
                error, (outbox_analytics.OutboxDamaged, outbox_analytics.OutboxUnavailable)
            ), repr(error)


# -- 3. damage is what SQLite says ---------------------------------------------------------


def test_each_damaged_file_is_moved_aside_once_under_a_name_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _outbox_with(path, 300)
    kept: dict[Path, bytes] = {}
    for round_ in range(3):  # three recoveries within a second or so, in one process
        damaged = _truncate(path, 0.8)
        client = Client("k", outbox_path=str(path), upload=False)
        new = [p for p in _aside(tmp_path) if p not in kept]
        assert len(new) == 1, (round_, _aside(tmp_path))
        assert new[0].read_bytes() == damaged  # moved as it was, never written
        kept[new[0]] = damaged
        for aside, data in kept.items():  # the earlier ones are untouched
            assert aside.read_bytes() == data
        assert client.track("u", "After", {"round": round_})[0]
        assert client.stats().pending >= 1
        again = Client("k", outbox_path=str(path), upload=False)  # now healthy: moved no more
        assert again.track("u", "Again")[0]
        again.shutdown()
        assert len(_aside(tmp_path)) == round_ + 1
        with client.batch():  # enough rows that a cut at 80% cuts some
            for n in range(300):
                client.track("u", "Stored", {"n": n, "pad": "p" * 200})
        client.shutdown()
    assert len({p.name for p in kept}) == 3


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(os.urandom(50_000), id="random-bytes"),
        pytest.param(
            b"database disk image is malformed\nfile is not a database\ncorrupt\n" * 100,
            id="text",
        ),
        pytest.param(bytes(8192), id="zeros"),
    ],
)
def test_a_file_that_is_not_sqlite_raises_not_an_outbox_and_stays_as_it_was(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(content)
    with pytest.raises(Exception) as raised:
        Client("k", outbox_path=str(path), upload=False)
    assert _listing(tmp_path) == {path.name: content}  # byte-identical, nothing beside it
    assert isinstance(raised.value, outbox_analytics.NotAnOutbox), repr(raised.value)
    assert raised.value.path == os.path.realpath(path)


# -- damage found while opening -----------------------------------------------------------


@pytest.mark.parametrize(
    "tree",
    [
        pytest.param("outbox_meta", id="meta-table-found-when-binding-the-key"),
        pytest.param("outbox_taken", id="taken-index-found-when-reclaiming"),
    ],
)
def test_damage_found_while_opening_is_recovered(
    tmp_path: Path, tree: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every row is intact: only a small structure that opening reads is damaged."""
    path = tmp_path / "outbox.sqlite3"
    _outbox_with(path, 2000)
    interior, leaves = _btree_pages(path)[tree]
    _zero_pages(path, [*interior, *leaves])
    damaged = path.read_bytes()

    client = Client("k", outbox_path=str(path), upload=False)

    assert [p.read_bytes() for p in _aside(tmp_path)] == [damaged]
    assert client.stats().pending == 2000  # every row salvaged
    assert client.track("u", "After")[0]
    client.shutdown()
    assert [m["properties"]["n"] for m in _stored_messages(path)[:2000]] == list(range(2000))
    assert any("was damaged" in r.getMessage() for r in caplog.records)


# -- 4. many processes meet one damaged file ----------------------------------------------

CONCURRENT = """
import json, os, sys, time
from pathlib import Path
from outbox_analytics import Client
path, ready, start = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
deadline = time.monotonic() + 60
while not start.exists():
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.001)
client = Client("k", outbox_path=path, upload=False)
ids = []
for n in range(50):
    ok, msg = client.track("worker", "Concurrent", {"pid": os.getpid(), "n": n})
    if ok:
        ids.append(msg["messageId"])
client.shutdown()
print(json.dumps({"true": len(ids), "ids": ids}), flush=True)
"""


def _salvaged(path: Path) -> list[int]:
    return [m["properties"]["n"] for m in _stored_messages(path) if m["event"] == "Stored"]


def test_sixteen_processes_recover_one_damaged_file_once(tmp_path: Path) -> None:
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    alone.mkdir()
    shared.mkdir()
    _outbox_with(alone / "outbox.sqlite3", 2000)
    damaged = _truncate(alone / "outbox.sqlite3", 0.85)
    (shared / "outbox.sqlite3").write_bytes(damaged)

    # The reference: one process alone recovers a copy of the same damaged file.
    reference = Client("k", outbox_path=str(alone / "outbox.sqlite3"), upload=False)
    reference.shutdown()
    expected = _salvaged(alone / "outbox.sqlite3")
    assert 0 < len(expected) < 2000

    path = shared / "outbox.sqlite3"
    signals = tmp_path / "signals"
    signals.mkdir()
    workers = [
        _start_python(CONCURRENT, str(path), str(signals / f"ready-{i}"), str(signals / "go"))
        for i in range(16)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(signals.glob("ready-*"))) < 16:
            assert time.monotonic() < deadline, "the workers did not start"
            assert all(w.poll() is None for w in workers), "a worker died before the start"
            time.sleep(0.01)
        (signals / "go").touch()  # all 16 open the damaged file at the same moment
        results = [w.communicate(timeout=60) for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    failures = [
        (worker.returncode, err.strip().splitlines()[-1:])
        for worker, (_, err) in zip(workers, results, strict=True)
        if worker.returncode != 0
    ]
    assert not failures, failures
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]

    aside = _aside(shared)
    assert len(aside) == 1, sorted(p.name for p in shared.iterdir())
    assert aside[0].read_bytes() == damaged
    extra = {p.name for p in shared.iterdir()} - {
        path.name,
        f"{path.name}-wal",
        f"{path.name}-shm",
        aside[0].name,
        f"{aside[0].name}-wal",
        f"{aside[0].name}-shm",
    }
    assert not extra  # no second fresh file, no salvage copy left behind

    trues = sum(report["true"] for report in reports)
    assert trues == 800
    stored = _stored_messages(path)
    stored_ids = [m["messageId"] for m in stored if m["event"] == "Concurrent"]
    assert len(stored_ids) == trues  # every process wrote the same file, once per event
    assert set(stored_ids) == {i for report in reports for i in report["ids"]}
    assert _salvaged(path) == expected  # salvaged once, as a lone process salvages


# -- 5. honest counts in the log ----------------------------------------------------------

_LOG_LINE = re.compile(r"(\d+) rows salvaged, (?:up to|at least) (\d+) rows unreadable")


def _damage_newest_rows(path: Path) -> None:
    """Zero the leaf pages holding the newest third of the rows; every index stays intact."""
    leaves = _btree_pages(path)["ack_queue_default"][1]
    _zero_pages(path, leaves[len(leaves) * 2 // 3 :])


def _damage_middle_pages(path: Path) -> None:
    """Zero a range of pages in the middle of the file (table and index pages alike)."""
    pages = path.stat().st_size // _page_size(path)
    _zero_pages(path, list(range(pages * 2 // 5, pages * 3 // 5)))


def _damage_last_pages(path: Path) -> None:
    """Zero the last fifth of the file's pages: the newest rows, and the index over them."""
    pages = path.stat().st_size // _page_size(path)
    _zero_pages(path, list(range(pages * 4 // 5, pages + 1)))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_damage_newest_rows, id="newest-rows-found-when-appending"),
        pytest.param(_damage_middle_pages, id="middle-pages-found-when-opening"),
        pytest.param(_damage_last_pages, id="last-pages-found-when-opening"),
    ],
)
def test_the_log_gives_honest_counts_of_salvaged_and_lost_rows(
    tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    _outbox_with(path, 2000)
    assert len(_btree_pages(path)["ack_queue_default"][1]) > 100  # many pages
    damage(path)
    caplog.set_level("ERROR", logger="outbox_analytics")

    client = Client("k", outbox_path=str(path), upload=False)
    assert client.track("u", "After")[0]  # (damage to the newest rows is found here)
    client.shutdown()

    lines = [r.getMessage() for r in caplog.records if "was damaged" in r.getMessage()]
    assert len(lines) == 1, lines
    found = _LOG_LINE.search(lines[0])
    assert found, lines[0]
    salvaged, unreadable = int(found[1]), int(found[2])
    assert salvaged == len(_salvaged(path))  # the count logged is the count stored
    lost = 2000 - salvaged
    assert lost > 1  # the damage did lose rows
    assert unreadable > 1 and unreadable >= lost, lines[0]


# -- 6. raw sqlite3 errors never reach the caller --------------------------------------------


def _every_call_fails_cleanly(client: Client) -> None:
    calls = [
        lambda: client.track("u", "Lost"),
        lambda: client.identify("u", {"plan": "pro"}),
        lambda: client.group("u", "g"),
        lambda: client.alias("u", "v"),
        lambda: client.page("u", "Docs", "Home"),
        lambda: client.screen("u", "App", "Home"),
    ]
    for call in calls:
        ok, msg = call()  # raises nothing
        assert ok is False and msg["messageId"]
    with pytest.raises(outbox_analytics.OutboxError), client.batch():
        client.track("u", "Lost in a batch")
    stats = client.stats()  # reading still works
    assert stats is not None and stats.dropped >= len(calls) + 1


def test_a_connection_that_cannot_write_never_raises_sqlite_errors(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    client = Client("k", outbox_path=str(path), upload=False)
    assert client.track("u", "Before")[0]
    # A real SQLite failure: the connection can no longer write the file.
    client.outbox.database._conn = sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
    )
    _every_call_fails_cleanly(client)
    assert client.stats().pending == 1
    client.outbox.database._conn = None  # reconnect: writing works again
    assert client.track("u", "After")[0]
    assert client.stats().dropped == 7 and client.outbox.unrecorded_drops == 0
    client.shutdown()


def test_a_full_disk_never_raises_sqlite_errors(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "400k") as disk:
        client = Client("k", outbox_path=str(disk / "outbox.sqlite3"), upload=False)
        stored = 0
        while stored < 10_000 and client.track("u", "Big", {"blob": "x" * 2000})[0]:
            stored += 1
        while stored < 20_000 and client.track("u", "Small")[0]:  # the last free bytes
            stored += 1
        assert 0 < stored < 10_000  # the disk is full
        _every_call_fails_cleanly(client)
        assert client.stats().pending == stored
        client.shutdown(timeout=1)


STILL_WRITING = """
import json, os, sys, time
from outbox_analytics import Client

client = Client("k", outbox_path=sys.argv[1], upload=False)
stored = [client.track("u", "Before", {"n": n})[1]["messageId"] for n in range(10)]
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
deadline, n = time.monotonic() + 2, 0
while time.monotonic() < deadline:
    ok, message = client.track("u", "During", {"n": n})
    if ok:
        stored.append(message["messageId"])
    n += 1
    time.sleep(0.002)
print(json.dumps(stored), flush=True)
"""


def test_a_process_still_writing_the_damaged_file_follows_it_to_the_fresh_one(
    tmp_path: Path,
) -> None:
    """Damage its own appends never touch: another process recovers, and its events still land."""
    path = tmp_path / "outbox.sqlite3"
    _outbox_with(path, 50)
    writer = subprocess.Popen(
        [sys.executable, "-c", STILL_WRITING, str(path), str(tmp_path / "go")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(CODE)),
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        # The index of in-flight and dead rows: appends never read it, a new uploader does.
        interior, leaves = _btree_pages(path)["outbox_taken"]
        _zero_pages(path, interior + leaves)
        (tmp_path / "go").touch()
        time.sleep(0.2)  # the writer is appending into the damaged file now
        recovering = Client("k", outbox_path=str(path))  # its lease reclaims: finds the damage
        out, err = writer.communicate(timeout=30)
    finally:
        writer.kill()
    stored = json.loads(out.strip().splitlines()[-1])
    assert len(stored) > 60, err
    asides = [name for name in os.listdir(tmp_path) if re.search(r"\.corrupt-[^.]*$", name)]
    assert len([name for name in asides if not name.endswith(("-wal", "-shm"))]) == 1
    with outbox_analytics.store.Outbox(path, readonly=True) as fresh:
        kept = {row.message["messageId"] for row in fresh.rows("all")}
    assert set(stored) <= kept  # nothing stranded in the file put aside
    recovering.shutdown(timeout=1)
