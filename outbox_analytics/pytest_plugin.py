"""pytest plugin (registered through the `pytest11` entry point): tests that never send.

    def test_signup_is_tracked(analytics_events):
        signup("ada@example.com")
        analytics_events.assert_tracked("Signed Up", plan="pro")

Whenever pytest runs with the package installed, no client stores events or
sends them, from the moment pytest starts (before conftest.py files and test
modules are imported) until the process exits (atexit hooks included):

- `analytics_events` records what one test tracked;
- what is tracked anywhere else (at import, in a conftest, during
  collection, in a test that did not ask) is recorded in the session's
  capture, `analytics_session_events`;
- the kill switch (OUTBOX_ANALYTICS_DISABLED) does not hide events from them;
- nothing is delivered at exit, so no test run pays the exit budget or
  replays what the application's real runs left in their outbox;
- no process exits handing its events to a sender (OUTBOX_ANALYTICS_HANDOFF=0
  for the run and the processes it starts, live runs included);
- processes the tests start inherit the kill switch, so they stay offline.

Arguments are checked as outside pytest: `Client()` without a write key
raises AssertionError (Segment's own tests check it); only the module-level
API records without one, as the README's example does.

For integration tests that want the real pipeline: mark one test
`@pytest.mark.analytics_live`, or turn the plugin's isolation off for the
whole run with `outbox_analytics_live = true` in the ini file (or
`-p no:outbox_analytics`, which also removes the fixtures).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from . import exit_delivery
from .config import KILL_SWITCH_ENV, KILL_SWITCH_SETTER_ENV, kill_switch_on
from .handoff import HANDOFF_ENV
from .testing import capture, live
from .transport import MemoryTransport

__all__ = ["analytics_events", "analytics_session_events"]

LIVE_OPTION = "outbox_analytics_live"
LIVE_MARKER = "analytics_live"

# Each run's capture, from its start (see below) to its end, or to the
# process's exit for its last run. Per run: pytester runs pytest in pytest.
_SESSION = pytest.StashKey[tuple[contextlib.ExitStack, MemoryTransport]]()
_runs = 0  # runs capturing in this process now
_kept_to_the_end: list[contextlib.ExitStack] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        LIVE_OPTION,
        type="bool",
        default=False,
        help="outbox-analytics: let clients store and send for real in this run",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Start capturing before the first conftest.py, or its events would escape."""
    global _runs
    # Live or not: a test suite leaves no sender process behind, its own or
    # its subprocesses' (a test that wants one sets the variable itself).
    os.environ.setdefault(HANDOFF_ENV, "0")
    if early_config.getini(LIVE_OPTION):
        return
    # For good: a test run never sends, at its exit, what the application's
    # real runs left in their outbox, nor waits out the exit budget.
    exit_delivery.turn_off()
    stack = contextlib.ExitStack()
    early_config.stash[_SESSION] = stack, stack.enter_context(capture())
    _kill_switch_for_child_processes(stack)
    _runs += 1


def _kill_switch_for_child_processes(stack: contextlib.ExitStack) -> None:
    """Processes the tests start (a CLI run with subprocess, a spawn pool) stay offline too.

    They inherit the kill switch, with this process's pid as its setter: here
    the capture decides instead (see `kill_switch_on`), and a live test lifts
    it. A kill switch the user turned on is left as it is; one turned off
    ("0") is overridden for the run.
    """
    user_turned_it_on = kill_switch_on() and KILL_SWITCH_SETTER_ENV not in os.environ
    if user_turned_it_on:
        return
    before = {name: os.environ.get(name) for name in (KILL_SWITCH_ENV, KILL_SWITCH_SETTER_ENV)}
    os.environ[KILL_SWITCH_ENV] = "1"
    os.environ[KILL_SWITCH_SETTER_ENV] = str(os.getpid())

    def restore() -> None:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    stack.callback(restore)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{LIVE_MARKER}: outbox-analytics clients built in this test store and send for real",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    """End the run's capture, unless it is the process's last: it stays offline to its exit.

    Code that runs after pytest (atexit hooks, cleanups) must not send either.
    Only a run nested in another (pytester's in-process runs) hands back.
    """
    global _runs
    session = config.stash.get(_SESSION, None)
    if session is None:
        return
    del config.stash[_SESSION]
    _runs -= 1
    if _runs > 0:
        session[0].close()
    else:  # kept referenced: a capture's generator, once collected, would end it
        _kept_to_the_end.append(session[0])


@pytest.fixture
def analytics_events() -> Iterator[MemoryTransport]:
    """The messages the code under test sent, with find/tracks/assert_* helpers."""
    with capture() as events:
        yield events


@pytest.fixture(scope="session")
def analytics_session_events(pytestconfig: pytest.Config) -> MemoryTransport:
    """What was tracked outside the tests that asked for `analytics_events` (at import, say).

    Empty, and never filled, when the run is live (`outbox_analytics_live = true`).
    """
    session = pytestconfig.stash.get(_SESSION, None)
    return session[1] if session is not None else MemoryTransport()


@pytest.fixture(autouse=True)
def _analytics_live_when_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker(LIVE_MARKER) is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        if os.environ.get(KILL_SWITCH_SETTER_ENV) == str(os.getpid()):
            patch.delenv(KILL_SWITCH_ENV)  # for the processes it starts
            patch.delenv(KILL_SWITCH_SETTER_ENV)
        with live():
            yield
