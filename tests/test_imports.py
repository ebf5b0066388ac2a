"""What importing and using the library loads: nothing heavy before it is needed.

A short command pays for every module it imports. PyJWT and cryptography
(over 100 ms) are for OAuth only; requests (about 70 ms) for uploading only.
Each case runs in a fresh interpreter, since a module once imported stays.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("jwt", "cryptography", "requests", "urllib3")

REPORT = """
import json, sys
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[1:]))))
"""


def loaded_after(code: str, tmp_path: Path) -> list[str]:
    """The heavy packages loaded once `code` has run in a fresh interpreter."""
    script = textwrap.dedent(code).replace("OUTBOX", repr(str(tmp_path / "outbox.sqlite3")))
    done = subprocess.run(
        [sys.executable, "-c", script + REPORT, *HEAVY],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_import_loads_no_http_and_no_jwt(tmp_path: Path) -> None:
    assert loaded_after("import outbox_analytics", tmp_path) == []


def test_storing_and_reading_the_file_load_no_http(tmp_path: Path) -> None:
    code = """
    import outbox_analytics
    from outbox_analytics import cli
    client = outbox_analytics.Client("key", outbox_path=OUTBOX, upload=False)
    client.track("user", "Stored")
    client.shutdown()
    assert cli.main(["status", OUTBOX]) == 0
    """
    assert loaded_after(code, tmp_path) == []


def test_uploading_loads_requests_but_not_jwt(tmp_path: Path, receiver) -> None:
    code = f"""
    import outbox_analytics
    client = outbox_analytics.Client("key", host={receiver.url!r}, outbox_path=OUTBOX)
    client.track("user", "Sent")
    assert client.flush(10).sent == 1
    """
    assert loaded_after(code, tmp_path) == ["requests", "urllib3"]


@pytest.mark.parametrize("oauth_given", [False, True])
def test_jwt_loads_only_with_oauth_settings(tmp_path: Path, oauth_given: bool) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    oauth = f", oauth_client_id='id', oauth_key_id='kid', oauth_client_key={pem!r}"
    code = f"""
    import outbox_analytics
    client = outbox_analytics.Client("key", outbox_path=OUTBOX, upload=False{oauth * oauth_given})
    client.track("user", "Stored")
    """
    loaded = loaded_after(code, tmp_path)
    assert ("jwt" in loaded) is oauth_given
    assert ("cryptography" in loaded) is oauth_given
