"""README.md's python blocks run as written, each in a fresh interpreter, offline.

Every ```python block runs, unless the line just above its fence is
`<!-- snippet: not runnable -->` (for a block that cannot run on its own, such
as a bare signature). A block that defines `test_...` functions is run by
pytest, as a user would run it, so the `analytics_events` fixture is the one
the installed package provides.

Nothing reaches the network: snippets run in the test's tmp_path, with
OUTBOX_ANALYTICS_PATH there too, and with the HTTP(S) proxy set to a local
port that refuses connections, so an upload fails at once and its events stay
pending in the outbox.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from outbox_analytics.store import Outbox

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUNNABLE = "<!-- snippet: not runnable -->"
# The python blocks README.md holds. A fence broken by an edit (a misspelt
# language; a lost closing fence, which merges a block with the next) makes
# blocks vanish from the list: this count notices. Raise it when adding blocks.
MIN_BLOCKS = 6


class Block(NamedTuple):
    line: int  # the opening fence's line in README.md
    code: str
    runnable: bool


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, in order; other fenced blocks are skipped."""
    lines = text.splitlines()
    blocks = []
    opened: int | None = None  # index of the open fence's line
    language = ""
    for index, line in enumerate(lines):
        if opened is None:
            if line.startswith("```"):
                opened, language = index, line[3:].strip()
        elif line.rstrip() == "```":
            if language == "python":
                marked = opened > 0 and lines[opened - 1].strip() == NOT_RUNNABLE
                code = "\n".join(lines[opened + 1 : index]) + "\n"
                blocks.append(Block(opened + 1, code, not marked))
            opened = None
    if opened is not None:
        raise ValueError(f"README.md:{opened + 1}: this fence is never closed")
    return blocks


README_TEXT = README.read_text(encoding="utf-8")
BLOCKS = python_blocks(README_TEXT)
RUNNABLE = [block for block in BLOCKS if block.runnable]
# The first block (the README's opening example) has a test of its own, below.
OTHERS = [block for block in RUNNABLE if block not in BLOCKS[:1]]
# Rows an upload that failed leaves behind: pending, or in flight if the process
# exited during a retry (the next run reclaims those). Never delivered or dead.
KEPT = {"pending", "inflight"}


@pytest.fixture(scope="module")
def refusing_port() -> Iterator[int]:
    """A local port that is bound but never listens: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def outbox_env_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.sqlite3"


@pytest.fixture
def snippet_env(outbox_env_path: Path, refusing_port: int) -> dict[str, str]:
    proxy = f"http://127.0.0.1:{refusing_port}"
    env = {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in {"no_proxy", "all_proxy", "http_proxy", "https_proxy"}
        and not name.startswith("OUTBOX_ANALYTICS_")
    }
    env.update(
        PYTHONPATH=str(ROOT),
        OUTBOX_ANALYTICS_PATH=str(outbox_env_path),
        HTTPS_PROXY=proxy,
        HTTP_PROXY=proxy,
        https_proxy=proxy,
        http_proxy=proxy,
    )
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run one block the way a reader would: as a script, or with pytest if it holds tests."""
    if "def test_" in block.code:
        (cwd / "test_snippet.py").write_text(block.code, encoding="utf-8")
        command = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_snippet.py"]
    else:
        (cwd / "snippet.py").write_text(block.code, encoding="utf-8")
        command = ["snippet.py"]
    return subprocess.run(
        [sys.executable, *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def stored_rows(path: Path) -> list[tuple[str, dict]]:
    with Outbox(path, readonly=True) as outbox:
        return [(row.state, row.message) for row in outbox.rows("all")]


def test_the_readme_has_its_python_blocks() -> None:
    assert len(BLOCKS) >= MIN_BLOCKS, f"found {len(BLOCKS)} ```python blocks in README.md"
    assert RUNNABLE, "every block is marked not runnable"


def test_not_runnable_marks_sit_right_above_a_python_fence() -> None:
    lines = README_TEXT.splitlines()
    for index, line in enumerate(lines):
        if line.lstrip().startswith("<!--") and "snippet" in line:
            assert line.strip() == NOT_RUNNABLE, f"README.md:{index + 1}: {line!r}"
            following = lines[index + 1] if index + 1 < len(lines) else ""
            assert following.rstrip() == "```python", f"README.md:{index + 1}: not above a block"


def test_extraction() -> None:
    text = "\n".join(
        [
            "```sh",
            "echo not python",
            "```",
            "```python",
            "x = 1",
            "```",
            NOT_RUNNABLE,
            "```python",
            "def f(...)",
            "```",
        ]
    )
    assert python_blocks(text) == [Block(4, "x = 1\n", True), Block(8, "def f(...)\n", False)]
    with pytest.raises(ValueError, match=r"README\.md:1: this fence is never closed"):
        python_blocks("```python\nx = 1\n")


@pytest.mark.parametrize("block", OTHERS, ids=[f"README.md:{b.line}" for b in OTHERS])
def test_block_runs(
    block: Block, tmp_path: Path, snippet_env: dict[str, str], outbox_env_path: Path
) -> None:
    done = run_block(block, tmp_path, snippet_env)
    assert done.returncode == 0, (
        f"README.md:{block.line} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    tests = re.findall(r"^def (test_\w+)", block.code, flags=re.MULTILINE)
    if tests:
        assert f"{len(tests)} passed" in done.stdout, done.stdout
    if outbox_env_path.exists():
        # Whatever the block stored there is still kept: nothing left the machine.
        assert {state for state, _ in stored_rows(outbox_env_path)} <= KEPT


def test_first_block_stores_its_event_and_exits_at_once(
    tmp_path: Path, snippet_env: dict[str, str], outbox_env_path: Path
) -> None:
    """The README's first example, with the network unreachable: stored, kept, no hang."""
    first = BLOCKS[0]
    assert first.runnable
    start = time.monotonic()
    done = run_block(first, tmp_path, snippet_env)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s: the exit hook should give up within about 1 s"
    rows = stored_rows(outbox_env_path)
    assert len(rows) == 1, rows
    state, message = rows[0]
    assert state in KEPT
    assert message["type"] == "track"
    assert f'"{message["event"]}"' in first.code


def test_ci_runs_the_readmes_test_command_exactly() -> None:
    """The README's set-up is proven on every landing: CI runs its test command, verbatim."""
    text = README.read_text()
    fence = text.index("# the tests ")
    readme_command = text[fence:].splitlines()[1].strip()
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert readme_command.startswith("python3 -m pip install tox")
    assert ci_lines[-1].strip() == readme_command
