"""The Python versions we claim are the ones we test, and the API's typing works on each.

pyproject.toml (requires-python, classifiers, ruff's and mypy's targets) and
tox.ini's envlist each name the versions; the first test keeps them from
drifting apart. The others run on every claimed version (tox's pyXY
environments): annotations such as `str | None` are evaluated by
typing.get_type_hints(), which users' tools (pydantic, typer, IDEs) call.
"""

from __future__ import annotations

import configparser
import inspect
import re
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import outbox_analytics

ROOT = Path(__file__).resolve().parents[1]


def tox_versions() -> set[tuple[int, int]]:
    """The versions of tox.ini's pyXY environments: (3, 10) for py310."""
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    names = re.split(r"[\s,]+", tox["tox"]["envlist"].strip())
    return {(int(name[2]), int(name[3:])) for name in names if re.fullmatch(r"py3\d+", name)}


def test_pyproject_and_tox_claim_the_same_versions() -> None:
    tomllib = pytest.importorskip("tomllib")  # 3.11+; the full suite runs on 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    classified = {
        (int(major), int(minor))
        for major, minor in (
            re.fullmatch(r"Programming Language :: Python :: (\d)\.(\d+)", classifier).groups()
            for classifier in project["classifiers"]
            if re.fullmatch(r"Programming Language :: Python :: \d\.\d+", classifier)
        )
    }
    tested = tox_versions()
    assert tested, "tox.ini's envlist names no pyXY environment"
    assert classified == tested, "pyproject's classifiers and tox.ini's envlist differ"
    oldest = min(tested)
    assert project["requires-python"] == ">={}.{}".format(*oldest)
    assert pyproject["tool"]["mypy"]["python_version"] == "{}.{}".format(*oldest)
    assert pyproject["tool"]["ruff"]["target-version"] == "py{}{}".format(*oldest)
    # No gap: every version from the oldest to the newest is tested.
    assert tested == {(3, minor) for minor in range(oldest[1], max(tested)[1] + 1)}


@pytest.mark.every_python
def test_this_python_is_one_we_claim() -> None:
    assert sys.version_info[:2] in tox_versions()


def public_callables() -> Iterator[tuple[str, Callable[..., object]]]:
    """The package's public functions, and the public methods of its public classes."""
    for name in outbox_analytics.__all__:
        value = getattr(outbox_analytics, name)
        if inspect.isfunction(value):
            yield name, value
        elif inspect.isclass(value) and value.__module__.startswith("outbox_analytics"):
            yield name, value  # its attributes' annotations (dataclass fields)
            for method_name, method in vars(value).items():
                if inspect.isfunction(method) and (
                    not method_name.startswith("_") or method_name == "__init__"
                ):
                    yield f"{name}.{method_name}", method


@pytest.mark.every_python
def test_type_hints_resolve_on_every_public_function_and_method() -> None:
    checked = dict(public_callables())
    assert {"track", "flush", "Client.__init__", "Client.track", "Client.drain"} <= set(checked)
    for name, function in checked.items():
        hints = typing.get_type_hints(function)  # raises where an annotation cannot be evaluated
        if inspect.isclass(function):
            continue
        parameters = inspect.signature(function).parameters
        empty = inspect.Parameter.empty
        annotated = {p for p, value in parameters.items() if value.annotation is not empty}
        assert annotated <= set(hints), name
