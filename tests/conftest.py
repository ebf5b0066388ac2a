from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from outbox_analytics import Client

# Started in the background by a shell without job control (nohup, a CI
# runner's script), this process ignores SIGINT, and so would every process
# it starts: the tests that interrupt a child with SIGINT would wait for good.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def no_network_by_accident(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client built without a host must never reach the real Segment API from a test."""
    monkeypatch.setattr("outbox_analytics.config.DEFAULT_HOST", "http://127.0.0.1:9")


@pytest.fixture
def outbox_file(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


@pytest.fixture
def store_only(outbox_file: Path):
    """A client that stores durably and sends nothing."""
    client = Client("test-write-key", outbox_path=str(outbox_file), upload=False)
    yield client
    client.shutdown()


def start_python(code: str, *args: str) -> subprocess.Popen[str]:
    """Run `code` in a fresh interpreter, with the repository importable."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def hold_write_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the file's write lock for `seconds` (returns once it holds it)."""
    holder = start_python(LOCK_HOLDER, str(path), str(seconds))
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def outbox_with(path: Path, count: int) -> None:
    """A real outbox holding `count` pending events ("Stored", properties.n = 0..count-1)."""
    client = Client("k", outbox_path=str(path), upload=False)
    with client.batch():
        for n in range(count):
            client.track("u", "Stored", {"n": n, "pad": "p" * 200})
    client.shutdown()


@pytest.fixture
def receiver():
    from .receiver import Receiver

    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def make_client(outbox_file: Path, receiver):
    """Clients that send to the test receiver, with quick retries; shut down after the test."""
    import tenacity

    clients: list[Client] = []

    def make(**options) -> Client:
        settings = {
            "host": receiver.url,
            "outbox_path": str(outbox_file),
            "upload_interval": 0.05,
            "max_retries": 3,
            "retry_wait": tenacity.wait_fixed(0.01),
            **options,
        }
        client = Client("test-write-key", **settings)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.shutdown(timeout=2)


@pytest.fixture(scope="session")
def key_pem() -> str:
    """An RSA private key (PEM, PKCS#8) for OAuth settings: made once, it takes a moment."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
