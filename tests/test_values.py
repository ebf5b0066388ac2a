"""Values with no JSON form never raise at track(), and never reach the outbox as invalid JSON.

Issue 23: one pandas NaN crashed a job migrated from segment-analytics-python,
whose clean() drops what it cannot send and whose json.dumps writes NaN (not
JSON). Here NaN and infinity are sent as null, unsupported objects are left
out as Segment leaves them out, wider integers become the float a JSON
reader makes of Segment's digits; each change logs a rate-limited warning
naming the value's path. What Segment itself refuses still raises. Every
check compares what is stored in a real outbox file with what the call
returned, and what Segment 2.4.0 builds where it builds valid JSON.
"""

from __future__ import annotations

import copy
import json
import logging
import numbers
import os
import subprocess
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from segment import analytics as segment
from segment.analytics.request import DatetimeSerializer

from outbox_analytics import Client, utils

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with every kind of warning ready (they are rate-limited per process)."""
    kinds = getattr(utils, "_warnings", {})
    monkeypatch.setattr(
        utils, "_warnings", {k: utils.RateLimitedLog() for k in kinds}, raising=False
    )


@pytest.fixture
def stored_client(tmp_path: Path):
    client = Client("test-key", outbox_path=tmp_path / "o.db", upload=False)
    yield client
    client.shutdown()


def stored(client: Client) -> list[dict[str, Any]]:
    assert client.outbox is not None
    return [row.message for row in client.outbox.rows("pending")]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "outbox_analytics" and r.levelno == logging.WARNING
    ]


def segment_wire(properties: dict[str, Any]) -> Any:
    """The properties segment-analytics-python 2.4.0 sends, as a JSON reader reads them."""
    client = segment.Client("test-key", send=False)
    _, msg = client.track("u1", "e", copy.deepcopy(properties))
    return json.loads(json.dumps(msg["properties"], cls=DatetimeSerializer))


def cycle_dict() -> dict[str, Any]:
    looped: dict[str, Any] = {"name": "loop"}
    looped["self"] = looped
    return looped


def cycle_list() -> list[Any]:
    looped: list[Any] = [1]
    looped.append(looped)
    return looped


class Int64:
    """Like numpy.int64: a numbers.Integral (registered), not an int subclass."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value


numbers.Integral.register(Int64)


CHANGED = [
    # properties, what is stored, the path the warning names, what it says became of it
    pytest.param({"a": {"b": NAN}}, {"a": {"b": None}}, "properties.a.b", "null", id="nan"),
    pytest.param({"x": float("inf")}, {"x": None}, "properties.x", "null", id="inf"),
    pytest.param({"x": [1, float("-inf")]}, {"x": [1, None]}, "properties.x[1]", "null", id="-inf"),
    pytest.param({"x": [Decimal("NaN")]}, {"x": [None]}, "properties.x[0]", "null", id="dec-nan"),
    pytest.param({"x": Decimal("sNaN")}, {"x": None}, "properties.x", "null", id="decimal-snan"),
    pytest.param({"x": Decimal("1e400")}, {"x": None}, "properties.x", "null", id="decimal-huge"),
    pytest.param({"x": Fraction(10**400)}, {"x": None}, "properties.x", "null", id="fraction-huge"),
    pytest.param({"n": 2**64}, {"n": float(2**64)}, "properties.n", "float", id="int-too-big"),
    pytest.param(
        {"n": [-(2**63) - 1]}, {"n": [float(-(2**63))]}, "properties.n[0]", "float", id="int-small"
    ),
    pytest.param({"n": 10**400}, {"n": None}, "properties.n", "null", id="int-beyond-float"),
    pytest.param(
        {"items": [{"price": 1}, {"price": object()}]},
        {"items": [{"price": 1}, {}]},
        "properties.items[1].price",
        "left out",
        id="object-in-dict",
    ),
    pytest.param(
        {"tags": ["a", object(), "c"]},
        {"tags": ["a", "c"]},
        "properties.tags[1]",
        "left out",
        id="object-in-list",
    ),
    pytest.param({"x": 1j}, {}, "properties.x", "left out", id="complex"),
    pytest.param({"x": b"\xffa"}, {"x": "\ufffda"}, "properties.x", "U+FFFD", id="bad-utf8"),
    pytest.param(
        {"x": {"y": "a\ud800b"}},
        {"x": {"y": "a\ufffdb"}},
        "properties.x.y",
        "U+FFFD",
        id="lone-surrogate",
    ),
    pytest.param({"k\udcff": 1}, {"k\ufffd": 1}, "properties.k", "U+FFFD", id="surrogate-key"),
    pytest.param(
        {"m": {1: "a", "1": "b"}}, {"m": {"1": "b"}}, "properties.m.1", "later", id="colliding-keys"
    ),
    pytest.param(
        {"loop": cycle_dict()}, None, "properties.loop.self.self", "left out", id="dict-cycle"
    ),
    pytest.param(
        {"loop": cycle_list()}, None, "properties.loop[1][1]", "left out", id="list-cycle"
    ),
]


@pytest.mark.parametrize(("properties", "expected", "path", "becomes"), CHANGED)
def test_a_value_with_no_json_form_is_stored_as_valid_json_with_a_warning_naming_it(
    stored_client: Client, caplog: pytest.LogCaptureFixture, properties, expected, path, becomes
) -> None:
    ok, msg = stored_client.track("u1", "e", properties)

    assert ok is True
    if expected is not None:
        assert msg["properties"] == expected
    assert stored(stored_client) == [msg]  # exactly what the call returned ...
    json.dumps(msg, allow_nan=False)  # ... and valid JSON, as the uploader sends it
    [warning] = warnings_of(caplog)
    assert f": {path}" in warning and becomes in warning, warning


def test_values_outside_properties_are_cleaned_too(
    stored_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    _, msg = stored_client.identify(
        "u1",
        {"tags": ["a", object()]},
        context={"c": NAN},
        integrations={"X": {"k": 2**70}},
    )

    assert msg["traits"] == {"tags": ["a"]}
    assert msg["context"]["c"] is None
    assert msg["integrations"] == {"X": {"k": float(2**70)}}
    assert stored(stored_client) == [msg]
    shown = "\n".join(warnings_of(caplog))
    for path in ("traits.tags[1]", "context.c", "integrations.X.k"):
        assert path in shown


@pytest.mark.parametrize(
    "properties",
    [
        pytest.param({"a": object(), "b": 1}, id="object-left-out"),
        pytest.param({"m": {True: 1, None: 2, 1.5: 3, 7: 4}}, id="keys-json-writes-as-text"),
        pytest.param({"m": {1: "a", "1": "b"}}, id="colliding-keys"),
        pytest.param({"t": ("a", Decimal("2.5"), {3})}, id="conversions"),
    ],
)
def test_what_segment_sends_as_valid_json_is_what_is_stored(
    stored_client: Client, properties: dict[str, Any]
) -> None:
    _, msg = stored_client.track("u1", "e", properties)

    assert msg["properties"] == segment_wire(properties)
    assert stored(stored_client) == [msg]


def test_an_integral_that_is_not_an_int_is_stored_exactly(stored_client: Client) -> None:
    """numpy.int64 is a numbers.Integral: its value must not go through a float."""
    _, msg = stored_client.track("u1", "e", {"id": Int64(2**62 + 1)})

    assert msg["properties"]["id"] == 2**62 + 1
    assert type(msg["properties"]["id"]) is int
    assert stored(stored_client) == [msg]


def test_warnings_are_rate_limited_per_kind_and_count_what_they_held_back(
    stored_client: Client, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with stored_client.batch():
        for n in range(500):  # a DataFrame's worth of rows, each with a NaN and an object
            stored_client.track("u1", "Row", {"price": NAN, "n": n, "obj": object()})

    assert stored_client.stats().pending == 500
    lines = warnings_of(caplog)
    assert len(lines) == 2, lines  # one per kind, not one per row
    assert any("properties.price" in line and "null" in line for line in lines)
    assert any("properties.obj" in line and "left out" in line for line in lines)

    # The next one let through says how many were held back.
    for limiter in utils._warnings.values():
        monkeypatch.setattr(limiter, "_last", float("-inf"))
    caplog.clear()
    stored_client.track("u1", "Row", {"price": NAN})
    [line] = warnings_of(caplog)
    assert "499 more such values since the last warning" in line


def test_a_nan_is_delivered_as_null(make_client, receiver) -> None:
    client = make_client()
    client.track("u1", "Priced", {"price": NAN, "qty": 2})

    assert client.flush(timeout=10).sent == 1
    [delivered] = receiver.accepted()
    assert delivered["properties"] == {"price": None, "qty": 2}


@pytest.mark.parametrize("key", [("a", 1), b"k", frozenset()], ids=["tuple", "bytes", "frozenset"])
def test_a_key_json_cannot_have_raises_as_in_segment(stored_client: Client, key: Any) -> None:
    properties = {"m": {key: 1}}
    with pytest.raises(TypeError):
        segment.Client("test-key", send=False).track("u1", "e", copy.deepcopy(properties))

    with pytest.raises(TypeError, match=r"properties\.m: key .* JSON keys are text"):
        stored_client.track("u1", "e", properties)
    assert stored_client.stats().pending == 0


# -- argument types: Segment's AssertionError, in words -------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda c: c.track(None, "e"),
            "user_id or anonymous_id must be a string or a number, got None",
        ),
        (lambda c: c.track("u1", 5), "event must be a string, got 5 (int)"),
        (lambda c: c.track("u1", "e", ["a"]), "properties must be a dict, got ['a'] (list)"),
        (lambda c: c.track("u1", "e", timestamp="now"), "timestamp must be a datetime, got 'now'"),
        (lambda c: c.alias("old", None), "user_id must be a string or a number, got None"),
    ],
)
def test_a_wrong_argument_type_reads_as_words(stored_client: Client, call, message: str) -> None:
    with pytest.raises(AssertionError) as raised:
        call(stored_client)

    assert str(raised.value).startswith(message), str(raised.value)
    assert "<class" not in str(raised.value)


def test_a_wrong_write_key_type_never_shows_the_key() -> None:
    with pytest.raises(AssertionError) as raised:
        Client(b"secret-write-key", send=False)  # type: ignore[arg-type]

    assert str(raised.value) == "write_key must be a string, got a value of type bytes"


# -- under the pytest plugin, Client() without a key raises as anywhere ---------------

USER_TESTS = """
import pytest

import outbox_analytics as analytics
from outbox_analytics import Client


def test_client_without_a_write_key_raises():  # Segment's own test_requires_write_key
    with pytest.raises(AssertionError, match="write_key must be a string, got None"):
        Client()


def test_the_module_api_without_a_key_is_still_recorded(analytics_events):
    analytics.track("u", "Keyless")  # the README's example sets no key
    analytics_events.assert_tracked("Keyless")


def test_a_client_with_a_key_is_still_captured(analytics_events):
    assert Client("k").track("u", "Keyed")[0]
    analytics_events.assert_tracked("Keyed")
"""


def test_client_without_a_write_key_raises_under_the_pytest_plugin(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_ANALYTICS", "PYTEST_"))}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout, done.stdout
    assert not (tmp_path / "state").exists()  # the capture stored nothing
