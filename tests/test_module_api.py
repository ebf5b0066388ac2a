"""The module-level API and Segment's `queue`/`consumers`, as code written for Segment uses them.

- The module functions take exactly `Client`'s parameters, checked at run
  time (`inspect.signature`) and by mypy on a user's file.
- `client.queue` answers `qsize()`, `empty()`, `full()` and `maxsize` from
  the outbox, and refuses `put`/`get` with an explanation;
  `client.consumers` holds the uploader, or nothing where Segment has none.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

import outbox_analytics
from outbox_analytics import Client

DELEGATES = (
    "track", "identify", "group", "alias", "page", "screen",
    "batch", "stats", "flush", "join", "shutdown",
)  # fmt: skip


@pytest.mark.parametrize("name", DELEGATES)
def test_module_functions_have_the_client_methods_signatures(name: str) -> None:
    method = inspect.signature(getattr(Client, name))
    without_self = method.replace(parameters=list(method.parameters.values())[1:])
    assert inspect.signature(getattr(outbox_analytics, name)) == without_self
    hints = typing.get_type_hints(getattr(Client, name))
    hints.pop("self", None)
    assert typing.get_type_hints(getattr(outbox_analytics, name)) == hints
    assert getattr(Client, name).__doc__ in (None, "") or getattr(outbox_analytics, name).__doc__


@pytest.fixture
def module_settings(monkeypatch, tmp_path: Path) -> Iterator[None]:
    """Module settings for a default client that stores in tmp_path and sends nothing."""
    monkeypatch.setattr(outbox_analytics, "write_key", "key")
    monkeypatch.setattr(outbox_analytics, "outbox_path", str(tmp_path / "outbox.sqlite3"))
    monkeypatch.setattr(outbox_analytics, "upload", False)
    monkeypatch.setattr(outbox_analytics, "default_client", None)
    yield
    if outbox_analytics.default_client is not None:
        outbox_analytics.default_client.shutdown()


def test_module_functions_reject_what_the_client_rejects(module_settings) -> None:
    with pytest.raises(TypeError, match="propertys"):
        outbox_analytics.track("u", "E", propertys={"a": 1})  # type: ignore[call-arg]
    ok, message = outbox_analytics.track("u", "E", {"a": 1})
    assert ok and message["properties"] == {"a": 1}
    with outbox_analytics.batch():
        outbox_analytics.page("u", "Docs", "Intro")
    stats = outbox_analytics.stats()
    assert stats is not None and stats.pending == 2


USER_FILE = """
import outbox_analytics as analytics

ok, message = analytics.track("u", "Signed Up", properties={"plan": "pro"})
reveal_type(analytics.track("u", "Signed Up"))
analytics.track("u", "Signed Up", propertys={"plan": "pro"})  # line 5: a wrong name
analytics.identify("u", traits=["x"])  # line 6: a list where a dict goes
analytics.page(123, 456, 789)  # line 7: numbers where texts and dicts go
with analytics.batch():
    analytics.flush(timeout="soon")  # line 9: a text where a number goes
"""


def test_mypy_checks_the_module_api_in_a_users_file(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(textwrap.dedent(USER_FILE).lstrip("\n"))
    # The package as the test environment has it installed; from tmp_path,
    # so that mypy reads none of the repository's own configuration.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "app.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = done.stdout
    assert "import-not-found" not in report and "import-untyped" not in report, report
    lines_with_errors = {int(n) for n in re.findall(r"^app\.py:(\d+): error", report, re.M)}
    assert lines_with_errors == {5, 6, 7, 9}, report
    builtin = r"(builtins\.)?"
    returned = rf"tuple\[{builtin}bool, {builtin}dict\[{builtin}str, Any\]\]"
    assert re.search(rf'^app\.py:4: note: Revealed type is "{returned}"', report, re.M), report


def test_the_queue_view_counts_undelivered_events(make_client, receiver) -> None:
    client = make_client(max_queue_size=5, upload=False)
    assert client.queue.maxsize == 5
    assert client.queue.empty() and client.queue.qsize() == 0 and not client.queue.full()
    for n in range(5):
        assert client.track("u", "E", {"n": n})[0]
    assert client.queue.qsize() == 5 and client.queue.full() and not client.queue.empty()
    assert client.track("u", "One too many")[0] is False  # full() said so

    sender = make_client()  # the same file, uploading to the receiver
    sender.flush(10)
    assert sender.queue.empty() and client.queue.qsize() == 0
    assert len(receiver.requests) == 1 and len(receiver.requests[0].batch) == 5


@pytest.mark.parametrize("method", ["put", "put_nowait", "get", "get_nowait", "task_done", "join"])
def test_the_queue_view_refuses_to_be_used_as_a_queue(store_only, method: str) -> None:
    args = ({"type": "track"},) if method.startswith("put") else ()
    with pytest.raises(TypeError, match="the outbox file is the queue"):
        getattr(store_only.queue, method)(*args)
    assert store_only.queue.qsize() == 0  # nothing was stored behind the caller's back


def test_the_queue_view_is_empty_when_nothing_is_stored(tmp_path: Path) -> None:
    client = Client("key", send=False, max_queue_size=7)
    client.track("u", "E")
    assert client.queue.empty() and client.queue.qsize() == 0 and client.queue.maxsize == 7


def test_consumers_hold_the_uploader_as_segment_has_its_consumer(make_client) -> None:
    client = make_client(timeout=3, max_retries=4)
    [consumer] = client.consumers
    assert (consumer.timeout, consumer.retries, consumer.upload_size) == (3, 4, 100)
    assert not consumer.is_alive()  # it starts with the first event
    client.track("u", "E")
    assert consumer.is_alive()
    client.shutdown()
    assert not consumer.is_alive()


@pytest.mark.parametrize(
    "options", [{"sync_mode": True}, {"send": False}, {"upload": False}], ids=str
)
def test_no_consumers_where_nothing_is_sent_in_the_background(make_client, options) -> None:
    assert make_client(**options).consumers == []


def test_the_default_clients_queue(module_settings) -> None:
    outbox_analytics.track("u", "E")
    client = outbox_analytics.default_client
    assert client is not None and client.queue.qsize() == 1
    assert client.queue.maxsize == outbox_analytics.max_queue_size


@pytest.mark.parametrize("method", ["flush", "join", "shutdown", "drain"])
@pytest.mark.parametrize(("timeout", "error"), [("soon", TypeError), (float("nan"), ValueError)])
def test_a_wrong_timeout_fails_at_the_call(
    store_only, method: str, timeout: object, error: type[Exception]
) -> None:
    store_only.track("u", "E")
    with pytest.raises(error, match="timeout must be a number"):
        getattr(store_only, method)(timeout)  # (nan acted as no timeout at all)
    stats = store_only.stats()
    assert stats is not None and stats.pending == 1  # nothing lost, the client still works
    assert store_only.track("u", "E")[0]


def test_values_segments_own_tests_use_are_accepted() -> None:
    client = Client("key", host="", on_error=False, send=False)  # type: ignore[arg-type]
    assert client.host == outbox_analytics.config.DEFAULT_HOST and client.on_error is None
