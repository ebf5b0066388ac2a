"""Reliability under failure: crash points, hostile files, a model-checked outbox, crash loops."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from outbox_analytics import Client
from outbox_analytics.collector import Collector
from outbox_analytics.store import Outbox, encode_message, maintenance

from .conftest import outbox_with, start_python
from .receiver import Received, Reply, SenderSpans

ROOT = Path(__file__).resolve().parents[1]

# -- crash points: the process dies at one step of the pipeline -------------------

# Each child stores 30 events, then delivers with one step of the pipeline
# replaced by the same step followed (or preceded) by a real SIGKILL.
CRASHER = """
import os, signal, sys, tenacity
from outbox_analytics import Client
from outbox_analytics import request as request_module
from outbox_analytics.store import connection as connection_module, lease as lease_module
from outbox_analytics.store import outbox as outbox_module

url, path, point = sys.argv[1], sys.argv[2], sys.argv[3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def patch(owner, name, wrapper):
    original = getattr(owner, name)
    setattr(owner, name, lambda *args, **kwargs: wrapper(original, *args, **kwargs))

# Die inside the next write transaction of an armed operation: its statements
# ran, the commit never happens.
armed = []

def arm(original, *args, **kwargs):
    armed.append(True)
    return original(*args, **kwargs)

def attempt(original, self, work, begin):
    if armed and begin == "BEGIN IMMEDIATE":
        conn = self._connection()
        conn.execute(begin)
        work(conn)
        die()
    return original(self, work, begin)

patch(connection_module.Database, "_attempt", attempt)

if point == "append":
    client = Client("k", host=url, outbox_path=path, upload=False)
    client.track("user", "Before")
    patch(outbox_module.Outbox, "_store", arm)
    with client.batch():
        for n in range(30):
            client.track("user", "In batch", {"n": n})
    raise SystemExit("should have died")

client = Client("k", host=url, outbox_path=path, upload=False)
for n in range(30):
    client.track("user", "Numbered", {"n": n, "poison": n == 3})
client.shutdown()

if point == "after_claim":
    patch(request_module.Requester, "send", lambda original, *a, **k: die())
elif point == "after_2xx":
    def send_then_die(original, *args, **kwargs):
        original(*args, **kwargs)
        die()
    patch(request_module.Requester, "send", send_then_die)
elif point == "release":
    patch(lease_module.UploadLease, "release", arm)
elif point == "dead_letter":
    patch(lease_module.UploadLease, "dead_letter", arm)

uploader = Client(
    "k", host=url, outbox_path=path, max_retries=0, upload_interval=0.01,
    retry_wait=tenacity.wait_fixed(0.01), upload_size=10,
)
uploader.flush(timeout=30)
raise SystemExit("should have died")
"""


@pytest.mark.parametrize("point", ["append", "after_claim", "after_2xx", "release", "dead_letter"])
def test_each_crash_point_leaves_a_file_the_next_start_recovers(
    receiver, outbox_file: Path, point: str
) -> None:
    def answer(request: Received) -> Reply:
        if point == "release" and len(receiver.requests) == 1:
            return Reply(503)  # the first batch fails: its rows are released
        if any(m.get("properties", {}).get("poison") for m in request.batch):
            return Reply(400, body='{"code": "invalid", "message": "poison"}')
        return Reply()

    receiver.responder = answer
    child = start_python(CRASHER, receiver.url, str(outbox_file), point)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the child did not die at {point}"

    with Outbox(outbox_file) as outbox:
        assert maintenance.check(outbox) == []  # rows left in flight are pending, no problem
    client = Client("k", host=receiver.url, outbox_path=str(outbox_file), upload_interval=0.01)
    result = client.flush(timeout=30)
    stats = client.stats()
    client.shutdown()
    assert (stats.pending, stats.inflight) == (0, 0), (point, result)

    delivered = receiver.accepted()
    if point == "append":  # the batch never committed: only what came before it
        assert [m["event"] for m in delivered] == ["Before"]
        return
    numbers = [m["properties"]["n"] for m in delivered]
    assert sorted(set(numbers)) == [n for n in range(30) if n != 3]  # nothing lost
    assert stats.dead == 1  # the poison event, and only it
    first_seen = list(dict.fromkeys(numbers))
    assert first_seen == sorted(first_seen)  # order kept
    by_number: dict[int, set[str]] = {}
    for message in delivered:
        by_number.setdefault(message["properties"]["n"], set()).add(message["messageId"])
    assert all(len(ids) == 1 for ids in by_number.values())  # a duplicate is the same message
    if point == "after_2xx":  # the server had the batch; the ack never committed
        assert len(numbers) > len(set(numbers))


# -- hostile files ----------------------------------------------------------------


def _hostile_outbox(path: Path) -> None:
    """An outbox holding good rows between rows no writer of ours would ever make."""
    with Outbox(path) as outbox:
        outbox.append(encode_message({"type": "track", "messageId": "good-1", "event": "Good"}))
    with sqlite3.connect(path) as conn:
        insert = "INSERT INTO ack_queue_default (data, timestamp, status) VALUES (?, ?, ?)"
        conn.execute(insert, ("'); DROP TABLE ack_queue_default; --", time.time(), 0))
        conn.execute(insert, (42, time.time(), 0))
        conn.execute(insert, (None, "yesterday", 0))
        conn.execute(insert, (msgpack.packb([1, 2, 3]), time.time(), 0))
        conn.execute(insert, (msgpack.packb({"type": "track", "event": "x" * 3_000_000}), 0, 0))
        sql_message = {"type": "track", "messageId": "good-2", "event": "'; DROP TABLE x; --"}
        conn.execute(insert, (msgpack.packb(sql_message), time.time(), 0))
        conn.execute(insert, (msgpack.packb({"messageId": "odd"}), time.time(), 7))


def test_a_hostile_outbox_neither_crashes_nor_runs_anything(tmp_path: Path) -> None:
    path = tmp_path / "hostile.db"
    _hostile_outbox(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in (["status"], ["list", "--state", "all"], ["export"], ["check"]):
        result = subprocess.run(
            [sys.executable, "-m", "outbox_analytics", command[0], str(path), *command[1:]],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode in (0, 1), (command, result.stderr)
        assert "Traceback" not in result.stderr, command

    with Collector() as collector:
        client = Client("k", host=collector.url, outbox_path=str(path), upload_interval=0.01)
        client.flush(timeout=20)
        stats = client.stats()
        client.shutdown()
        delivered = [m["messageId"] for m in collector.messages()]
    assert delivered == ["good-1", "good-2"]  # in order, around the bad rows
    assert stats.pending == 0 and stats.dead == 5  # the bad rows are kept, not lost
    with sqlite3.connect(path) as conn:  # and nothing was executed from the data
        assert conn.execute("SELECT count(*) FROM ack_queue_default").fetchone()[0] == 6


# -- the outbox against a model -----------------------------------------------------


class OutboxModel(RuleBasedStateMachine):
    """Appends, claims, acks, releases, dead letters, crashes: compared with a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"model-{os.getpid()}"
        self.directory.mkdir(exist_ok=True)
        self.path = self.directory / f"{random.getrandbits(64):x}.db"
        self.outbox = Outbox(self.path)
        self.lease = self.outbox.try_lease()
        assert self.lease is not None
        self.next_number = 0
        self.pending: list[int] = []  # numbers, in the order they must be sent
        self.inflight: list[int] = []
        self.dead: list[int] = []
        self.ids: dict[int, int] = {}  # number -> row id

    def teardown(self) -> None:
        self.lease.close()
        self.outbox.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    @rule(count=st.integers(1, 5))
    def append(self, count: int) -> None:
        for _ in range(count):
            self.outbox.append(encode_message({"n": self.next_number}))
            self.pending.append(self.next_number)
            self.next_number += 1

    @rule(count=st.integers(1, 4))
    def claim(self, count: int) -> None:
        rows = self.lease.claim(count)
        expected = sorted(self.pending)[:count]
        assert [row.message["n"] for row in rows] == expected
        for row in rows:
            self.ids[row.message["n"]] = row.id
            self.pending.remove(row.message["n"])
            self.inflight.append(row.message["n"])

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def finish_some(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(self.inflight), min_size=1, unique=True))
        how = data.draw(st.sampled_from(["ack", "release", "dead"]))
        ids = [self.ids[number] for number in chosen]
        if how == "ack":
            assert self.lease.ack(ids) == len(ids)
        elif how == "release":
            self.lease.release(ids, status=503, error="down")
            self.pending += chosen
        else:
            self.lease.dead_letter(ids, status=400, error="bad")
            self.dead += chosen
        for number in chosen:
            self.inflight.remove(number)

    @precondition(lambda self: self.dead)
    @rule()
    def requeue_all(self) -> None:
        assert maintenance.requeue(self.outbox) == len(self.dead)
        self.pending += self.dead
        self.dead = []

    @rule()
    def crash_and_reopen(self) -> None:
        # A dead uploader: its connection and lease vanish; the next one reclaims.
        self.lease.close()
        self.outbox.close()
        self.outbox = Outbox(self.path)
        lease = self.outbox.try_lease()
        assert lease is not None
        self.lease = lease
        self.pending += self.inflight
        self.inflight = []

    @invariant()
    def counts_match(self) -> None:
        stats = self.outbox.stats()
        assert (stats.pending, stats.inflight, stats.dead) == (
            len(self.pending),
            len(self.inflight),
            len(self.dead),
        )
        stored = [row.message["n"] for row in self.outbox.rows("pending")]
        assert stored == sorted(self.pending)  # no loss, no phantom, order by commit


TestOutboxModel = OutboxModel.TestCase
TestOutboxModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# -- crash loops ------------------------------------------------------------------------

PRODUCER = """
import sys, time
from outbox_analytics import Client

client = Client("k", outbox_path=sys.argv[1], upload=False)
source = sys.argv[2]
for seq in range(100000):
    time.sleep(0.001)  # a job doing some work between events
    client.track("user", "Numbered", {"source": source, "seq": seq})
    print(seq, flush=True)
"""

UPLOADER = """
import sys, time, tenacity
from outbox_analytics import Client

client = Client(
    "k", host=sys.argv[1], outbox_path=sys.argv[2], upload_interval=0.02, upload_size=10,
    max_retries=3, retry_wait=tenacity.wait_fixed(0.02), timeout=2,
)
while True:
    client.flush(timeout=5)
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_crash_loops_with_faults_lose_nothing(
    receiver, outbox_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(20261127)
    faults = {"5xx": 0, "429": 0, "dropped": 0, "slow": 0}

    def faulty(request: Received) -> Reply:
        roll = rng.random()
        if roll < 0.10:
            faults["5xx"] += 1
            return Reply(503)
        if roll < 0.11:
            faults["429"] += 1
            return Reply(429, headers={"Retry-After": "1"})
        if roll < 0.20:
            faults["dropped"] += 1
            return Reply(drop=True)
        if roll < 0.28:
            faults["slow"] += 1
            return Reply(delay=0.3)
        return Reply()

    receiver.responder = faulty
    confirmed: dict[str, list[int]] = {}
    kills = 0
    for cycle in range(8):  # (12 took 30 s of CI's 10 minutes; 8 still kill 24 processes)
        producers = {f"c{cycle}p{i}": None for i in range(2)}
        processes = {
            source: start_python(PRODUCER, str(outbox_file), source) for source in producers
        }
        uploader = start_python(UPLOADER, receiver.url, str(outbox_file))
        time.sleep(rng.uniform(0.3, 1.2))
        for source, process in processes.items():
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert process.stdout is not None
            lines = process.stdout.read().split()
            confirmed[source] = [int(x) for x in lines[:-1]]  # the last may be cut short
            kills += 1
        uploader.send_signal(signal.SIGKILL)
        uploader.wait()
        kills += 1

    # The last run drains everything through the same faults.
    final = Client(
        "k",
        host=receiver.url,
        outbox_path=str(outbox_file),
        upload_interval=0.01,
        upload_size=10,
        retry_wait=tenacity.wait_fixed(0.02),
        timeout=2,
    )
    deadline = time.monotonic() + 180
    while final.flush(timeout=10).pending and time.monotonic() < deadline:
        pass
    stats = final.stats()
    final.shutdown()

    delivered = receiver.accepted()
    seen: dict[tuple[str, int], set[str]] = {}
    order: dict[str, list[int]] = {}
    for message in delivered:
        key = (message["properties"]["source"], message["properties"]["seq"])
        if key not in seen:
            order.setdefault(key[0], []).append(key[1])
        seen.setdefault(key, set()).add(message["messageId"])
    lost = [(s, n) for s, numbers in confirmed.items() for n in numbers if (s, n) not in seen]
    events = sum(len(numbers) for numbers in confirmed.values())
    duplicates = len(delivered) - len(seen)
    with capsys.disabled():  # the figures belong in the run's output
        print(
            f"\ncrash loop: {events} events confirmed, {len(delivered)} deliveries,"
            f" {kills} kills, faults {faults}, lost {len(lost)}, duplicates {duplicates}"
        )
    assert lost == []
    assert all(len(ids) == 1 for ids in seen.values())  # duplicates share their messageId
    for source, numbers in order.items():
        assert numbers == sorted(numbers), source  # per-source order
    assert (stats.pending, stats.inflight, stats.dead) == (0, 0, 0)
    # Enough of it happened, on a quiet machine or a loaded one (fewer events, as many faults
    # per request: about 28% are meant to fail).
    assert events > 200 and sum(faults.values()) > 0.15 * len(receiver.requests) > 10


# -- many processes, one file -------------------------------------------------------

THREADED_PRODUCER = """
import sys, threading
from outbox_analytics import Client

client = Client("k", outbox_path=sys.argv[1], upload=False)
source, errors = sys.argv[2], []

def work(thread):
    for seq in range(300):
        try:
            ok, _ = client.track("user", "Numbered", {"source": f"{source}-{thread}", "seq": seq})
            assert ok
        except Exception as exc:  # any "database is locked" would land here
            errors.append(repr(exc))

threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print("errors", len(errors), errors[:3], flush=True)
"""

FLUSHER = """
import sys, time, tenacity
from outbox_analytics import Client

client = Client(
    "k", host=sys.argv[1], outbox_path=sys.argv[2], upload_interval=0.02,
    upload_size=20, retry_wait=tenacity.wait_fixed(0.02), gzip=sys.argv[3] == "gzip",
)
deadline = time.monotonic() + float(sys.argv[4])
while time.monotonic() < deadline:
    client.flush(timeout=1)
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_many_processes_and_threads_share_one_file(receiver, outbox_file: Path) -> None:
    spans = SenderSpans(delay=0.01)
    receiver.responder = spans
    Client("k", outbox_path=str(outbox_file), upload=False).shutdown()  # create it first
    uploaders = [
        start_python(FLUSHER, receiver.url, str(outbox_file), encoding, "25")
        for encoding in ("gzip", "plain")
    ]
    producers = [start_python(THREADED_PRODUCER, str(outbox_file), f"p{i}") for i in range(3)]
    for producer in producers:
        out, err = producer.communicate(timeout=120)
        assert out.startswith("errors 0 "), out + err
    received = receiver.wait_for(3 * 4 * 300, timeout=60)
    for uploader in uploaders:
        uploader.send_signal(signal.SIGKILL)
        uploader.wait()

    keys = [(m["properties"]["source"], m["properties"]["seq"]) for m in received]
    assert len(keys) == len(set(keys)) == 3600  # every event once: no row taken twice
    for source in {source for source, _ in keys}:
        assert [seq for s, seq in keys if s == source] == list(range(300))
    spans.assert_one_at_a_time()


# -- a full disk ---------------------------------------------------------------------


def _mount_small_disk(directory: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
    )
    return mounted.returncode == 0


def test_a_full_disk_fails_cleanly_and_recovers(tmp_path: Path) -> None:
    disk = tmp_path / "small"
    if not _mount_small_disk(disk, "400k"):
        pytest.skip("needs root to mount a small tmpfs (test_outbox injects the failure)")
    try:
        client = Client("k", outbox_path=str(disk / "o.db"), upload=False)
        stored = 0
        while stored < 10_000:
            ok, _ = client.track("u", "Big", {"n": stored, "blob": "x" * 2000})
            if not ok:
                break
            stored += 1
        while stored < 20_000 and client.track("u", "Small", {"n": stored})[0]:
            stored += 1  # the last free bytes
        assert 0 < stored < 10_000  # the disk filled up, and the call said so
        assert client.stats().dropped >= 1
        with pytest.raises(Exception, match="full"), client.batch():
            client.track("u", "In a batch")
        assert client.stats().pending == stored  # every earlier row intact
        capped = Client("k", outbox_path=str(disk / "o.db"), upload=False, max_queue_size=stored)
        assert capped.track("u", "Over the cap")[0] is False  # full twice over: still no raise
        assert capped.stats().dropped >= 1
        capped.shutdown()

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert client.track("u", "After", {"n": -1})[0]  # space is back: so is appending
        assert client.stats().pending == stored + 1
        assert maintenance.check(client.outbox) == []
        client.shutdown()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# -- damaged files ---------------------------------------------------------------------


def test_a_truncated_outbox_is_moved_aside_and_salvaged(
    outbox_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox_with(outbox_file, 3000)
    original = outbox_file.read_bytes()
    outbox_file.write_bytes(original[: len(original) // 2])  # a disk that lost the end

    check = subprocess.run(
        [sys.executable, "-m", "outbox_analytics", "check", str(outbox_file)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert check.returncode == 1 and "damaged" in check.stdout + check.stderr

    client = Client("k", outbox_path=str(outbox_file), upload=False)  # no crash, no crash loop
    moved = list(outbox_file.parent.glob(f"{outbox_file.name}.corrupt-*"))
    assert [p.name for p in moved if not p.name.endswith(("-wal", "-shm"))]
    aside = next(p for p in moved if not p.name.endswith(("-wal", "-shm")))
    assert aside.read_bytes() == original[: len(original) // 2]  # kept as it was
    salvaged = [row.message["properties"]["n"] for row in client.outbox.rows()]
    assert salvaged == sorted(salvaged) and 0 < len(salvaged) < 3000
    assert any("was damaged" in r.getMessage() for r in caplog.records)
    assert client.track("u", "After")[0]  # and the outbox works again
    client.shutdown()


def test_garbage_at_the_end_of_the_wal_loses_nothing(outbox_file: Path) -> None:
    writer = start_python(
        """
        import sys, time
        from outbox_analytics import Client
        client = Client("k", outbox_path=sys.argv[1], upload=False)
        for n in range(200):
            client.track("u", "Stored", {"n": n})
        print("stored", flush=True)
        time.sleep(60)
        """,
        str(outbox_file),
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "stored"
    writer.send_signal(signal.SIGKILL)  # the WAL is left behind, not checkpointed
    writer.wait()
    wal = Path(f"{outbox_file}-wal")
    assert wal.stat().st_size > 0
    with open(wal, "ab") as file:
        file.write(os.urandom(50_000))
    with Outbox(outbox_file) as outbox:
        assert [row.message["properties"]["n"] for row in outbox.rows()] == list(range(200))
        assert maintenance.check(outbox) == []


def test_a_file_that_is_not_sqlite_is_refused_not_moved(outbox_file: Path) -> None:
    outbox_file.write_bytes(b"\x00" * 100 + b"someone's data")
    with pytest.raises(Exception, match="not an outbox"):
        Client("k", outbox_path=str(outbox_file))
    assert outbox_file.read_bytes() == b"\x00" * 100 + b"someone's data"
    assert not list(outbox_file.parent.glob("*.corrupt-*"))


# -- fuzzing what callers pass --------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # includes integers wider than 64 bits
    st.floats(),  # includes NaN and the infinities
    st.text(),  # includes lone surrogates
    st.binary(max_size=20),  # includes invalid UTF-8
    st.decimals(),
    st.datetimes(),
    st.uuids(),
    st.fractions(),
    st.builds(object),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.frozensets(st.integers(), max_size=3),
        st.dictionaries(st.one_of(st.text(), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(properties=st.dictionaries(st.text(max_size=5), _values, max_size=4))
def test_any_value_is_refused_at_the_call_or_stored_exactly_as_sent(
    fuzz_client: Client, properties: dict
) -> None:
    before = fuzz_client.stats().pending
    try:
        ok, message = fuzz_client.track("u", "Fuzzed", properties)
    except (TypeError, ValueError, RuntimeError) as exc:
        assert str(exc)  # a clear message ...
        assert fuzz_client.stats().pending == before  # ... and nothing stored
        return
    assert ok
    stored = list(fuzz_client.outbox.rows())[-1].message
    assert stored == message
    wire = json.loads(json.dumps(stored))  # what the uploader sends
    assert wire == stored


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("fuzz") / "o.db"
    client = Client("k", outbox_path=str(path), upload=False)
    yield client
    client.shutdown()


# -- TLS ---------------------------------------------------------------------------------


def test_tls_certificates_are_verified(tmp_path: Path) -> None:
    import datetime as dt
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}"
    errors = []
    client = Client(
        "k",
        host=url,
        outbox_path=str(tmp_path / "o.db"),
        max_retries=0,
        on_error=lambda exc, batch: errors.append(exc),
    )
    client.track("u", "Over TLS")
    result = client.flush(timeout=10)
    client.shutdown(timeout=2)
    server.shutdown()
    assert hits == []  # a self-signed certificate is refused: nothing was sent ...
    assert result.pending == 1  # ... and nothing lost
    assert "SSLError" in str(errors[0])
