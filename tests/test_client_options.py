"""Client construction: Segment's options and defaults, ours, and bad values."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest
from segment.analytics import Client as SegmentClient

import outbox_analytics
from outbox_analytics import Client


def test_every_segment_option_is_accepted_with_segment_defaults() -> None:
    ours = inspect.signature(Client).parameters
    theirs = inspect.signature(SegmentClient).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        if name != "max_queue_size":  # ours bounds a disk file, not memory
            assert ours[name].default == parameter.default, name
    # Positional order is Segment's too, so positional calls keep working.
    assert list(ours)[: len(theirs)] == list(theirs)
    assert {"outbox_path", "fsync", "upload"} <= set(ours)


def test_module_settings_mirror_segments() -> None:
    import segment.analytics as segment_module

    for name in [
        "write_key",
        "host",
        "on_error",
        "debug",
        "send",
        "sync_mode",
        "max_queue_size",
        "gzip",
        "timeout",
        "max_retries",
        "oauth_client_id",
        "oauth_client_key",
        "oauth_key_id",
        "oauth_auth_server",
        "oauth_scope",
        "log_handler",
    ]:
        assert hasattr(outbox_analytics, name), name
        if name != "max_queue_size":
            assert getattr(outbox_analytics, name) == getattr(segment_module, name), name
    for name in ("outbox_path", "fsync", "upload", "default_client"):
        assert hasattr(outbox_analytics, name), name


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"write_key": None}, AssertionError),
        ({"write_key": 123}, AssertionError),
        ({"max_queue_size": 0}, ValueError),
        ({"max_queue_size": "10"}, ValueError),
        ({"max_retries": -1}, ValueError),
        ({"upload_size": 0}, ValueError),
        ({"thread": 0}, ValueError),
        ({"timeout": -1}, ValueError),
        ({"upload_interval": "fast"}, ValueError),
        ({"max_total_backoff_duration": -5}, ValueError),
        ({"on_error": "print"}, TypeError),
        ({"host": 42}, AssertionError),
        ({"proxies": "http://proxy"}, AssertionError),
        ({"outbox_path": 7}, AssertionError),
    ],
)
def test_bad_options_fail_at_construction_and_create_nothing(
    tmp_path: Path, options: dict, error: type[Exception]
) -> None:
    arguments = {"write_key": "k", "outbox_path": str(tmp_path / "o.db"), **options}
    with pytest.raises(error):
        Client(**arguments)
    assert list(tmp_path.iterdir()) == []


def test_host_loses_its_trailing_slash_and_defaults_to_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # conftest points the default host at 127.0.0.1 for safety
    path = str(tmp_path / "o.db")
    assert Client("k", outbox_path=path, send=False).host == "https://api.segment.io"
    assert Client("k", host="http://127.0.0.1:9/", send=False).host == "http://127.0.0.1:9"


def test_relative_outbox_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    client = Client("k", outbox_path="rel.db", upload=False)
    assert client.outbox_path == str(tmp_path / "rel.db")
    client.shutdown()


def test_debug_and_log_handler_do_not_stack_handlers(tmp_path: Path) -> None:
    logger = logging.getLogger("outbox_analytics")
    before = list(logger.handlers)
    handler = logging.NullHandler()
    try:
        for _ in range(3):
            Client("k", send=False, debug=True)
            Client("k", send=False, log_handler=handler)
        added = [h for h in logger.handlers if h not in before]
        assert handler in added
        assert len(added) == 2  # one debug stream handler, one given handler
        assert logger.level == logging.DEBUG
    finally:
        for extra in [h for h in logger.handlers if h not in before]:
            logger.removeHandler(extra)
        logger.setLevel(logging.NOTSET)


def test_import_adds_no_handler_not_even_a_null_one() -> None:
    import subprocess
    import sys

    code = (
        "import logging, outbox_analytics;"
        "h = logging.getLogger('outbox_analytics').handlers;"
        "print([type(x).__name__ for x in h], logging.getLogger().handlers)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[] []"  # a NullHandler would silence the last-resort handler


def test_a_closed_client_still_stores_rather_than_lose_an_event(tmp_path: Path) -> None:
    client = Client("k", outbox_path=str(tmp_path / "o.db"), upload=False)
    client.shutdown()
    assert client.track("u", "After shutdown")[0]
    assert [r.message["event"] for r in client.outbox.rows()] == ["After shutdown"]
    client.shutdown()
