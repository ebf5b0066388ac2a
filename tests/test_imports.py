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


def test_a_client_that_will_upload_imports_requests_before_it_returns(
    tmp_path: Path, receiver
) -> None:
    """On the caller's thread, not the uploader's: see test_a_fork_while... below."""
    code = f"""
    import outbox_analytics
    client = outbox_analytics.Client("key", host={receiver.url!r}, outbox_path=OUTBOX)
    """
    assert loaded_after(code, tmp_path) == ["requests", "urllib3"]


def test_uploading_loads_requests_but_not_jwt(tmp_path: Path, receiver) -> None:
    code = f"""
    import outbox_analytics
    client = outbox_analytics.Client("key", host={receiver.url!r}, outbox_path=OUTBOX)
    client.track("user", "Sent")
    assert client.flush(10).sent == 1
    """
    assert loaded_after(code, tmp_path) == ["requests", "urllib3"]


@pytest.mark.parametrize("oauth_given", [False, True])
def test_jwt_loads_only_with_oauth_settings(
    tmp_path: Path, key_pem: str, oauth_given: bool
) -> None:
    oauth = f", oauth_client_id='id', oauth_key_id='kid', oauth_client_key={key_pem!r}"
    code = f"""
    import outbox_analytics
    client = outbox_analytics.Client("key", outbox_path=OUTBOX, upload=False{oauth * oauth_given})
    client.track("user", "Stored")
    """
    loaded = loaded_after(code, tmp_path)
    assert ("jwt" in loaded) is oauth_given
    assert ("cryptography" in loaded) is oauth_given


# requests made slow to import (a second inside its module body), and a fork
# as soon as its import has begun: had the uploader's thread been importing it
# (as it once did, lazily), the child would inherit its lock held by no thread
# and hang importing it, as a pool worker's code does.
FORK_DURING_IMPORT = """
import importlib.abc, importlib.machinery, os, signal, sys, time

class SlowRequests(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "requests":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module
        def exec_module(module):
            time.sleep(1.0)
            run_module(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, SlowRequests())
import outbox_analytics
client = outbox_analytics.Client("key", host=sys.argv[1], outbox_path=sys.argv[2],
                                 upload_interval=0)
client.track("user", "Before The Fork")
deadline = time.monotonic() + 10
while "requests" not in sys.modules:  # the uploader's thread has begun importing it
    assert time.monotonic() < deadline
    time.sleep(0.001)
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a hung import ends the child with SIGALRM
    import requests
    requests.Session()
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
client.flush(10)
"""


def test_a_fork_while_the_uploader_imports_requests_leaves_a_working_child(
    tmp_path: Path, receiver
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORK_DURING_IMPORT, receiver.url, str(tmp_path / "o.sqlite3")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["child", "0"]  # not -14 (SIGALRM): it did not hang
    assert [m["event"] for r in receiver.requests for m in r.batch] == ["Before The Fork"]
