from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from outbox_analytics import Client


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
