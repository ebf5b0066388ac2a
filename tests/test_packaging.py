"""Packaging: mypy sees the package through an editable install (`pip install -e`).

A user reported that after `pip install -e` of this repository mypy could not find
`outbox_analytics` ("import-not-found", and everything was `Any`). setuptools' editable
install is an import hook: a .pth file that runs code to install a meta path finder.
Python runs it, but type checkers (mypy, pyright) only read the plain paths in .pth files,
so for them the package is not installed. The build backend is hatchling for that reason:
its editable install is a .pth file holding the repository's path.

The test does what the user did, offline: a new venv, an editable install of this
checkout with the build backend the test environment has (hatchling is in the `test`
extra), a user's file with a type error on a `Client` method, and mypy run from that
venv. mypy must report the type error (so it resolved the package to its real types)
and must have read the package from this checkout, not from some installed copy.
"""

from __future__ import annotations

import importlib.util
import os
import re
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INIT = REPO / "outbox_analytics" / "__init__.py"

USER_FILE = """
import outbox_analytics

outbox_analytics.Client("k").track("u", "E", properties=["not", "a", "dict"])  # line 3
"""
ERROR_LINE = 3

# What mypy says when it cannot resolve the package, or resolves it to Any.
NOT_RESOLVED = (
    "import-not-found",
    "import-untyped",
    "Cannot find implementation or library stub",
    "missing library stubs or py.typed marker",
)


def run(cwd: Path, env: dict[str, str], *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def pth_files(site_packages: Path) -> str:
    """The venv's .pth files and what they hold: what a failure is explained by."""
    return "\n".join(
        f"--- {pth.name}\n{pth.read_text().strip()}" for pth in sorted(site_packages.glob("*.pth"))
    )


@pytest.mark.slow
def test_mypy_sees_the_package_through_an_editable_install(tmp_path: Path) -> None:
    # Both come with the `test` extra; without them the offline editable install
    # below (no build isolation) or the mypy run cannot work.
    for needed in ("hatchling", "mypy"):
        assert importlib.util.find_spec(needed), f"{needed} is missing: install the test extra"

    # No PYTHONPATH (it would make the checkout importable whatever the install does),
    # no MYPYPATH, no user site (it could hold another copy of the package).
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MYPYPATH")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")

    venv = tmp_path / "venv"
    made = run(tmp_path, env, sys.executable, "-m", "venv", "--system-site-packages", str(venv))
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    purelib = run(
        tmp_path, env, python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
    )
    site_packages = Path(purelib.stdout.strip())

    # --system-site-packages gives the new venv the *base* interpreter's packages; when
    # the tests run in a venv (tox, a developer's venv) mypy and hatchling are in that
    # venv's site-packages instead. A .pth makes them importable in the new venv too.
    # Its name sorts after the editable install's .pth, so that the checkout comes
    # first on sys.path, ahead of the copy of the package the test environment may
    # have installed (tox installs a built one): mypy searches in sys.path order too.
    chain = "\n".join(site.getsitepackages()) + "\n"
    (site_packages / "zz_test_environment.pth").write_text(chain)

    # Offline: the build backend comes from the test environment, the dependencies too.
    pip_install = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    installed = run(tmp_path, env, *pip_install, "--no-index", "-e", str(REPO))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # An editable install leaves no copy of the package in the venv.
    assert not (site_packages / "outbox_analytics").exists(), pth_files(site_packages)

    # Python imports the package from the checkout...
    imported = run(tmp_path, env, python, "-c", "import outbox_analytics as p; print(p.__file__)")
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).resolve() == INIT, imported.stdout

    # ...and so must mypy, run the way a user runs it: from the venv, from a directory
    # with no mypy configuration (not the checkout, whose pyproject.toml configures mypy).
    (tmp_path / "user.py").write_text(textwrap.dedent(USER_FILE).lstrip("\n"))
    mypy = [python, "-m", "mypy", "--strict", "--no-incremental", "--verbose"]
    checked = run(tmp_path, env, *mypy, f"--cache-dir={tmp_path / 'mypy-cache'}", "user.py")
    report = checked.stdout
    explain = f"{report}\n.pth files of the venv:\n{pth_files(site_packages)}"
    for symptom in NOT_RESOLVED:
        assert symptom not in report, explain
    # A type error can only be found if mypy knows Client.track's real signature.
    errors = re.findall(r"^user\.py:(\d+): error: (.*)$", report, re.M)
    assert len(errors) == 1, explain
    line, message = errors[0]
    assert int(line) == ERROR_LINE and '"properties"' in message, explain
    assert message.endswith("[arg-type]"), explain

    # --verbose logs the file mypy parsed for each module: the checkout's, not a copy's.
    parsed = re.findall(r"Parsing (\S+) \(outbox_analytics\)$", checked.stderr, re.M)
    where = f"mypy read outbox_analytics from {parsed or 'nowhere'}, not {INIT}\n{explain}"
    assert [Path(path).resolve() for path in parsed] == [INIT], where
