"""Messages built by the six calls: shape, cleaning and validation, against Segment 2.4.0."""

from __future__ import annotations

import copy
import enum
import json
import os
import re
import shutil
import tempfile
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segment import analytics as segment

import outbox_analytics
import outbox_analytics as analytics
from outbox_analytics import Client

LIBRARY = {"name": "outbox-analytics", "version": outbox_analytics.VERSION}
WHEN = datetime(2021, 6, 1, 12, 30, 45, 123456, tzinfo=timezone(timedelta(hours=2)))
WHEN_TEXT = "2021-06-01T12:30:45.123+02:00"
ISO_MILLIS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
MAX_MESSAGE_BYTES = 32 * 1024


# -- helpers and fixtures -------------------------------------------------------


@pytest.fixture
def client() -> Client:
    """Validates and builds messages, stores nothing (Segment's send=False)."""
    return Client("test-key", send=False)


@pytest.fixture
def stored_client(tmp_path: Path):
    """Stores every message in a real SQLite file and uploads nothing."""
    client = Client("test-key", outbox_path=tmp_path / "o.db", upload=False)
    yield client
    client.shutdown()


def stored_messages(client: Client) -> list[dict[str, Any]]:
    assert client.outbox is not None
    return [row.message for row in client.outbox.rows("pending")]


def segment_message(method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """What segment-analytics-python 2.4.0 builds for the same call.

    Segment writes context.library into the caller's context: give it copies.
    """
    reference = segment.Client("test-key", send=False)
    ok, msg = getattr(reference, method)(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    assert ok is True
    return msg


def without_library(msg: dict[str, Any]) -> dict[str, Any]:
    msg = copy.deepcopy(msg)
    del msg["context"]["library"]
    return msg


def mutable_ids(value: Any) -> set[int]:
    """The ids of every dict and list inside `value`, itself included."""
    found: set[int] = set()

    def walk(item: Any) -> None:
        if isinstance(item, dict):
            found.add(id(item))
            for child in item.values():
                walk(child)
        elif isinstance(item, list):
            found.add(id(item))
            for child in item:
                walk(child)

    walk(value)
    return found


def assert_generated_fields(msg: dict[str, Any]) -> None:
    """messageId is a fresh uuid4; timestamp is now, with milliseconds and an offset."""
    assert uuid.UUID(msg["messageId"]).version == 4
    assert str(uuid.UUID(msg["messageId"])) == msg["messageId"]
    assert ISO_MILLIS.match(msg["timestamp"]), msg["timestamp"]
    age = datetime.now(timezone.utc) - datetime.fromisoformat(msg["timestamp"])
    assert timedelta(0) <= age < timedelta(seconds=5)


# -- 1. message shape -------------------------------------------------------------

COMMON_ARGS = {
    "context": {"ip": "203.0.113.9", "locale": "fr-FR"},
    "timestamp": WHEN,
    "integrations": {"All": False, "Mixpanel": True},
    "message_id": 1234,
}
COMMON_EXPECTED = {
    "context": {"ip": "203.0.113.9", "locale": "fr-FR", "library": LIBRARY},
    "timestamp": WHEN_TEXT,
    "integrations": {"All": False, "Mixpanel": True},
    "messageId": "1234",
}

FULL_CALLS = [
    pytest.param(
        "identify",
        {"user_id": 42, "anonymous_id": 7, "traits": {"plan": "pro", "seats": 3}},
        {
            "type": "identify",
            "userId": "42",
            "anonymousId": "7",
            "traits": {"plan": "pro", "seats": 3},
        },
        id="identify",
    ),
    pytest.param(
        "track",
        {
            "user_id": "user-1",
            "anonymous_id": "anon-1",
            "event": "Signed Up",
            "properties": {"plan": "pro", "price": 9.5},
        },
        {
            "type": "track",
            "userId": "user-1",
            "anonymousId": "anon-1",
            "event": "Signed Up",
            "properties": {"plan": "pro", "price": 9.5},
        },
        id="track",
    ),
    pytest.param(
        "alias",
        {"previous_id": 17, "user_id": 42},
        {"type": "alias", "previousId": "17", "userId": "42", "anonymousId": None},
        id="alias",
    ),
    pytest.param(
        "group",
        {"user_id": 42, "group_id": 500, "traits": {"name": "Initech"}},
        {
            "type": "group",
            "userId": "42",
            "anonymousId": None,
            "groupId": "500",
            "traits": {"name": "Initech"},
        },
        id="group",
    ),
    pytest.param(
        "page",
        {"user_id": "user-1", "category": "Docs", "name": "Intro", "properties": {"path": "/"}},
        {
            "type": "page",
            "userId": "user-1",
            "anonymousId": None,
            "category": "Docs",
            "name": "Intro",
            "properties": {"path": "/"},
        },
        id="page",
    ),
    pytest.param(
        "screen",
        {"anonymous_id": 99, "name": "Home", "properties": {"tab": 2}},
        {
            "type": "screen",
            "userId": None,
            "anonymousId": "99",
            "category": None,
            "name": "Home",
            "properties": {"tab": 2},
        },
        id="screen",
    ),
]


@pytest.mark.parametrize(("method", "kwargs", "expected"), FULL_CALLS)
def test_full_message_shape(client, method, kwargs, expected):
    kwargs = {**kwargs, **COMMON_ARGS}
    ok, msg = getattr(client, method)(**kwargs)

    assert ok is True
    assert msg == {**expected, **COMMON_EXPECTED}
    assert msg.keys() == segment_message(method, **kwargs).keys()


MINIMAL_CALLS = [
    pytest.param(
        "identify",
        ("u1",),
        {"type": "identify", "userId": "u1", "anonymousId": None, "traits": {}},
        id="identify",
    ),
    pytest.param(
        "track",
        ("u1", "Clicked"),
        {
            "type": "track",
            "userId": "u1",
            "anonymousId": None,
            "event": "Clicked",
            "properties": {},
        },
        id="track",
    ),
    pytest.param(
        "alias",
        ("old", "new"),
        {"type": "alias", "previousId": "old", "userId": "new", "anonymousId": None},
        id="alias",
    ),
    pytest.param(
        "group",
        ("u1", "g1"),
        {"type": "group", "userId": "u1", "anonymousId": None, "groupId": "g1", "traits": {}},
        id="group",
    ),
    pytest.param(
        "page",
        ("u1",),
        {
            "type": "page",
            "userId": "u1",
            "anonymousId": None,
            "category": None,
            "name": None,
            "properties": {},
        },
        id="page",
    ),
    pytest.param(
        "screen",
        ("u1",),
        {
            "type": "screen",
            "userId": "u1",
            "anonymousId": None,
            "category": None,
            "name": None,
            "properties": {},
        },
        id="screen",
    ),
]


@pytest.mark.parametrize(("method", "args", "expected"), MINIMAL_CALLS)
def test_minimal_message_defaults(client, method, args, expected):
    ok, msg = getattr(client, method)(*args)

    assert ok is True
    assert msg.keys() == segment_message(method, *args).keys()
    assert_generated_fields(msg)
    rest = {key: value for key, value in msg.items() if key not in ("messageId", "timestamp")}
    assert rest == {**expected, "context": {"library": LIBRARY}, "integrations": {}}


POSITIONAL_CALLS = [
    pytest.param(
        "identify",
        (42, {"plan": "pro"}, {"ip": "203.0.113.9"}, WHEN, "anon-1", {"All": True}, "m-1"),
        id="identify",
    ),
    pytest.param(
        "track",
        ("u1", "Bought", {"sku": "A1"}, {"ip": "203.0.113.9"}, WHEN, 5, {"All": True}, "m-1"),
        id="track",
    ),
    pytest.param(
        "alias",
        ("old", 42, {"ip": "203.0.113.9"}, WHEN, {"All": True}, "m-1"),
        id="alias",
    ),
    pytest.param(
        "group",
        ("u1", "g7", {"name": "Acme"}, {"ip": "203.0.113.9"}, WHEN, "anon-1", {"All": True}, 8),
        id="group",
    ),
    pytest.param(
        "page",
        ("u1", "Docs", "Intro", {"path": "/"}, {"ip": "1.2.3.4"}, WHEN, "a1", {"X": 1}, "m"),
        id="page",
    ),
    pytest.param(
        "screen",
        ("u1", "Game", "Level 1", {"hp": 3}, {"ip": "1.2.3.4"}, WHEN, "a1", {"X": 1}, "m"),
        id="screen",
    ),
]


@pytest.mark.parametrize(("method", "args"), POSITIONAL_CALLS)
def test_positional_calls_build_what_segment_builds(client, method, args):
    # previousId and groupId are given as text: Segment leaves them as given, we stringify.
    _, msg = getattr(client, method)(*args)
    reference = segment_message(method, *args)

    assert msg["context"]["library"] == LIBRARY
    assert without_library(msg) == without_library(reference)


@pytest.mark.parametrize("method", ["page", "screen"])
def test_page_and_screen_positional_order(client, method):
    ok, msg = getattr(client, method)(
        "user-1", "Docs", "Intro", {"path": "/intro"}, {"ip": "203.0.113.9"}, WHEN, "anon-1",
        {"All": False}, "mid-1",
    )  # fmt: skip

    assert ok is True
    assert msg == {
        "type": method,
        "userId": "user-1",
        "anonymousId": "anon-1",
        "category": "Docs",
        "name": "Intro",
        "properties": {"path": "/intro"},
        "context": {"ip": "203.0.113.9", "library": LIBRARY},
        "timestamp": WHEN_TEXT,
        "integrations": {"All": False},
        "messageId": "mid-1",
    }


def test_context_library_replaces_a_caller_supplied_one(client):
    _, msg = client.track("u1", "e", context={"library": {"name": "mine"}, "ip": "1.2.3.4"})

    assert msg["context"] == {"library": LIBRARY, "ip": "1.2.3.4"}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (1234, "1234"),
        ("custom-id", "custom-id"),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (Decimal("1.5"), "1.5"),
    ],
)
def test_given_message_id_is_stringified(client, given, expected):
    _, msg = client.track("u1", "e", message_id=given)

    assert msg["messageId"] == expected


def test_generated_message_ids_are_distinct_uuid4(client):
    ids = [client.track("u1", "e")[1]["messageId"] for _ in range(200)]

    assert len(set(ids)) == 200
    for message_id in ids:
        parsed = uuid.UUID(message_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (WHEN, WHEN_TEXT),
        (datetime(2020, 1, 2, 3, 4, 5, 678901), "2020-01-02T03:04:05.678+00:00"),
        (datetime(2020, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "2020-01-02T03:04:05.000+00:00"),
        (
            datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(-timedelta(hours=5))),
            "1999-12-31T23:59:59.999-05:00",
        ),
    ],
)
def test_given_timestamp_format(client, given, expected):
    _, msg = client.track("u1", "e", timestamp=given)

    assert msg["timestamp"] == expected
    assert segment_message("track", "u1", "e", timestamp=given)["timestamp"] == expected


def test_naive_timestamp_of_now_is_local_time_like_segment(client):
    now = datetime.now()
    _, msg = client.track("u1", "e", timestamp=now)

    assert ISO_MILLIS.match(msg["timestamp"])
    assert msg["timestamp"] == segment_message("track", "u1", "e", timestamp=now)["timestamp"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [(42, "42"), (3.5, "3.5"), ("abc", "abc"), (Decimal("7"), "7")],
)
def test_ids_are_stringified(client, given, expected):
    assert client.identify(given)[1]["userId"] == expected
    assert client.identify(anonymous_id=given)[1]["anonymousId"] == expected
    assert client.alias(given, "u1")[1]["previousId"] == expected
    assert client.alias("p", given)[1]["userId"] == expected
    assert client.group("u1", given)[1]["groupId"] == expected


# -- 2. the caller's objects ----------------------------------------------------


def caller_inputs() -> dict[str, dict[str, Any]]:
    return {
        "context": {"ip": "1.2.3.4", "device": {"ids": [1, 2]}},
        "integrations": {"All": False, "Amplitude": {"session": [1]}},
        "properties": {"items": [{"sku": "A", "tags": ["x"]}], "meta": {"k": "v"}},
        "traits": {"address": {"city": "Lyon"}, "roles": ["admin"]},
    }


def call_with(client: Client, method: str, inputs: dict[str, dict[str, Any]]):
    common = {"context": inputs["context"], "integrations": inputs["integrations"]}
    if method == "identify":
        return client.identify("u1", inputs["traits"], **common)
    if method == "track":
        return client.track("u1", "e", inputs["properties"], **common)
    if method == "alias":
        return client.alias("old", "u1", **common)
    if method == "group":
        return client.group("u1", "g1", inputs["traits"], **common)
    return getattr(client, method)("u1", "Cat", "Name", inputs["properties"], **common)


SIX_CALLS = ["identify", "track", "alias", "group", "page", "screen"]


@pytest.mark.parametrize("method", SIX_CALLS)
def test_caller_dicts_are_not_mutated(client, method):
    inputs = caller_inputs()
    before = copy.deepcopy(inputs)

    call_with(client, method, inputs)

    assert inputs == before
    assert "library" not in inputs["context"]


@pytest.mark.parametrize("method", SIX_CALLS)
def test_message_shares_no_mutable_object_with_the_caller(client, method):
    inputs = caller_inputs()

    _, msg = call_with(client, method, inputs)

    assert mutable_ids(msg).isdisjoint(mutable_ids(inputs))


def test_changing_the_message_afterwards_leaves_the_caller_alone(client):
    properties = {"items": [{"sku": "A"}]}
    _, msg = client.track("u1", "e", properties)

    msg["properties"]["items"][0]["sku"] = "changed"
    msg["context"]["library"]["name"] = "changed"

    assert properties == {"items": [{"sku": "A"}]}
    assert client.track("u1", "e")[1]["context"]["library"] == LIBRARY


# -- 3. return value and storing ------------------------------------------------


def test_send_false_stores_nothing(client):
    assert client.track("u1", "e")[0] is True
    assert client.outbox is None
    assert client.stats() is None


@pytest.mark.parametrize("method", SIX_CALLS)
def test_stored_message_is_the_returned_message(stored_client, method):
    result = call_with(stored_client, method, caller_inputs())

    assert result[0] is True
    assert stored_messages(stored_client) == [result[1]]
    assert stored_client.stats().pending == 1


def test_all_six_calls_are_stored_in_order(stored_client):
    returned = [call_with(stored_client, method, caller_inputs())[1] for method in SIX_CALLS]

    assert stored_messages(stored_client) == returned
    assert [msg["type"] for msg in stored_messages(stored_client)] == SIX_CALLS


# -- 4. validation --------------------------------------------------------------

INVALID_CALLS = [
    pytest.param("identify", (), {}, id="identify-no-ids"),
    pytest.param("identify", (), {"traits": {"a": 1}}, id="identify-no-ids-with-traits"),
    pytest.param("track", (), {"event": "e"}, id="track-no-ids"),
    pytest.param("track", (None, "e"), {"anonymous_id": None}, id="track-none-ids"),
    pytest.param("page", (), {}, id="page-no-ids"),
    pytest.param("screen", (), {"name": "Home"}, id="screen-no-ids"),
    pytest.param("group", (), {"group_id": "g"}, id="group-no-ids"),
    pytest.param("track", ("u1",), {}, id="track-no-event"),
    pytest.param("track", ("u1", 5), {}, id="track-int-event"),
    pytest.param("track", ("u1", b"e"), {}, id="track-bytes-event"),
    pytest.param("track", ("u1", "e", [1]), {}, id="properties-list"),
    pytest.param("track", ("u1", "e", "x"), {}, id="properties-str"),
    pytest.param("page", ("u1",), {"properties": [("a", 1)]}, id="page-properties-list"),
    pytest.param("identify", ("u1", "x"), {}, id="traits-str"),
    pytest.param("group", ("u1", "g", [1]), {}, id="group-traits-list"),
    pytest.param("track", ("u1", "e"), {"context": "x"}, id="context-str"),
    pytest.param("alias", ("a", "b"), {"context": [1]}, id="alias-context-list"),
    pytest.param("track", ("u1", "e"), {"integrations": [1]}, id="integrations-list"),
    pytest.param("identify", ("u1",), {"integrations": "All"}, id="identify-integrations"),
    pytest.param("track", ("u1", "e"), {"timestamp": "2020-01-01"}, id="timestamp-str"),
    pytest.param("track", ("u1", "e"), {"timestamp": date(2020, 1, 1)}, id="timestamp-date"),
    pytest.param("track", ("u1", "e"), {"timestamp": 1577836800}, id="timestamp-int"),
    pytest.param("group", ("u1",), {}, id="group-no-group-id"),
    pytest.param("group", ("u1", ["g"]), {}, id="group-list-group-id"),
    pytest.param("alias", (), {"user_id": "u1"}, id="alias-no-previous-id"),
    pytest.param("alias", ("old",), {}, id="alias-no-user-id"),
    pytest.param("page", ("u1",), {"name": 5}, id="page-int-name"),
    pytest.param("page", ("u1",), {"category": ["Docs"]}, id="page-list-category"),
    pytest.param("screen", ("u1",), {"name": b"Home"}, id="screen-bytes-name"),
    pytest.param("screen", ("u1",), {"category": 3.5}, id="screen-float-category"),
]


@pytest.mark.parametrize(("method", "args", "kwargs"), INVALID_CALLS)
def test_invalid_call_raises_assertion_error_and_stores_nothing(
    stored_client, method, args, kwargs
):
    with pytest.raises(AssertionError):
        getattr(stored_client, method)(*args, **kwargs)
    with pytest.raises(AssertionError):
        segment_message(method, *args, **kwargs)

    assert stored_client.stats().pending == 0
    assert stored_messages(stored_client) == []


def test_message_over_32kb_raises_and_stores_nothing(stored_client):
    properties = {"blob": "x" * 40_000}

    with pytest.raises(RuntimeError, match="32kb"):
        stored_client.track("u1", "e", properties)
    with pytest.raises(RuntimeError):
        segment_message("track", "u1", "e", properties)

    assert stored_client.stats().pending == 0


def test_message_just_under_32kb_is_stored(stored_client):
    ok, msg = stored_client.track("u1", "e", {"blob": "x" * 30_000})

    assert ok is True
    assert 30_000 < len(json.dumps(msg)) <= MAX_MESSAGE_BYTES
    assert stored_messages(stored_client) == [msg]


def test_size_is_measured_as_ascii_escaped_json(stored_client):
    properties = {"text": "é" * 6_000}  # 12 KB as UTF-8, 36 KB as "\u00e9" escapes
    assert len(json.dumps(properties, ensure_ascii=False).encode()) < MAX_MESSAGE_BYTES

    with pytest.raises(RuntimeError):
        stored_client.track("u1", "e", properties)
    with pytest.raises(RuntimeError):
        segment_message("track", "u1", "e", properties)

    assert stored_client.stats().pending == 0


def test_list_of_false_over_32kb_as_json_raises(stored_client):
    properties = {"flags": [False] * 5_000}  # about 5 KB as msgpack, 35 KB as JSON
    with pytest.raises(RuntimeError):
        segment_message("track", "u1", "e", properties)

    with pytest.raises(RuntimeError):
        stored_client.track("u1", "e", properties)

    assert stored_client.stats().pending == 0


# -- 5. cleaning ----------------------------------------------------------------


class Plan(enum.Enum):
    PRO = "pro"


class Level(enum.IntEnum):
    HIGH = 3


class Color(str, enum.Enum):
    RED = "red"


SOME_UUID = uuid.UUID("9f1c3c2e-8a55-4c1e-9a8e-1d2b3c4d5e6f")

CLEANED_VALUES = [
    pytest.param(Decimal("2.50"), 2.5, float, id="decimal"),
    pytest.param({3}, [3], list, id="set"),
    pytest.param(frozenset({"a"}), ["a"], list, id="frozenset"),
    pytest.param((1, "a", None), [1, "a", None], list, id="tuple"),
    pytest.param(Plan.PRO, "pro", str, id="enum-str-value"),
    pytest.param(Level.HIGH, 3, int, id="int-enum"),
    pytest.param(b"caf\xc3\xa9", "café", str, id="bytes"),
    pytest.param(bytearray(b"abc"), "abc", str, id="bytearray"),
    pytest.param(date(2020, 1, 2), "2020-01-02", str, id="date"),
    pytest.param(
        datetime(2020, 1, 2, 3, 4, 5, 678901), "2020-01-02T03:04:05.678901", str, id="datetime"
    ),
    pytest.param(WHEN, "2021-06-01T12:30:45.123456+02:00", str, id="aware-datetime"),
    pytest.param(SOME_UUID, "9f1c3c2e-8a55-4c1e-9a8e-1d2b3c4d5e6f", str, id="uuid"),
    pytest.param({1: "a", 2: {3: "b"}}, {"1": "a", "2": {"3": "b"}}, dict, id="int-keys"),
    pytest.param(Fraction(1, 4), 0.25, float, id="fraction"),
    pytest.param(True, True, bool, id="true"),
    pytest.param(False, False, bool, id="false"),
    pytest.param(2**64 - 1, 2**64 - 1, int, id="uint64-max"),
    pytest.param(-(2**63), -(2**63), int, id="int64-min"),
    pytest.param("naïve ☃ 😀", "naïve ☃ 😀", str, id="non-ascii-text"),
    pytest.param(
        {"a": [{"b": (1, {Decimal("1.5")})}, [Plan.PRO, [date(2001, 2, 3)]]]},
        {"a": [{"b": [1, [1.5]]}, ["pro", ["2001-02-03"]]]},
        dict,
        id="nested",
    ),
]


@pytest.mark.parametrize(("value", "expected", "expected_type"), CLEANED_VALUES)
def test_property_value_is_cleaned(stored_client, value, expected, expected_type):
    _, msg = stored_client.track("u1", "e", {"v": value})

    assert msg["properties"] == {"v": expected}
    assert type(msg["properties"]["v"]) is expected_type
    assert stored_messages(stored_client) == [msg]


def test_bool_is_not_turned_into_int(client):
    _, msg = client.track("u1", "e", {"flags": [True, False], "nested": {"on": True}})

    assert [type(flag) for flag in msg["properties"]["flags"]] == [bool, bool]
    assert type(msg["properties"]["nested"]["on"]) is bool
    assert json.dumps(msg["properties"]) == '{"flags": [true, false], "nested": {"on": true}}'


def test_traits_context_and_integrations_are_cleaned_too(client):
    _, msg = client.identify(
        "u1",
        {"since": date(2020, 1, 2), "tags": ("a",)},
        context={"ids": {SOME_UUID}},
        integrations={"Amplitude": {"session": Decimal("3")}},
    )

    assert msg["traits"] == {"since": "2020-01-02", "tags": ["a"]}
    assert msg["context"] == {"ids": [str(SOME_UUID)], "library": LIBRARY}
    assert msg["integrations"] == {"Amplitude": {"session": 3.0}}


def test_str_mixin_enum_becomes_its_value(client):
    assert json.dumps(segment_message("track", "u1", "e", {"c": Color.RED})["properties"]) == (
        '{"c": "red"}'
    )

    _, msg = client.track("u1", "e", {"c": Color.RED})

    assert msg["properties"] == {"c": "red"}


# Values with no JSON form (NaN, objects, wide integers...): tests/test_values.py.


# -- 6. property-based: anything JSON-like is stored as returned ----------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
json_properties = st.dictionaries(st.text(max_size=8), json_values, max_size=6)


@pytest.fixture
def hypothesis_client():
    directory = tempfile.mkdtemp(prefix="test-messages-")
    client = Client("test-key", outbox_path=os.path.join(directory, "o.db"), upload=False)
    yield client
    client.shutdown()
    shutil.rmtree(directory)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(properties=json_properties)
def test_json_like_properties_are_stored_exactly_as_returned(hypothesis_client, properties):
    before = hypothesis_client.stats().pending
    try:
        ok, msg = hypothesis_client.track("u1", "Generated", properties)
    except (TypeError, ValueError, RuntimeError):
        assert hypothesis_client.stats().pending == before
        return

    assert ok is True
    assert msg["properties"] == properties
    assert hypothesis_client.stats().pending == before + 1
    stored = list(hypothesis_client.outbox.rows("pending"))[-1].message
    assert stored == msg
    assert json.loads(json.dumps(stored)) == stored


# -- 7. module-level API --------------------------------------------------------

MODULE_SETTINGS = ("write_key", "outbox_path", "upload", "default_client")


@pytest.fixture
def module_api(tmp_path: Path):
    saved = {name: getattr(analytics, name) for name in MODULE_SETTINGS}
    analytics.default_client = None
    analytics.write_key = "module-key"
    analytics.outbox_path = str(tmp_path / "module.db")
    analytics.upload = False
    yield analytics
    if analytics.default_client is not None:
        analytics.default_client.shutdown()
    for name, value in saved.items():
        setattr(analytics, name, value)


def test_module_level_calls_use_a_client_built_from_the_settings(module_api, tmp_path):
    ok, tracked = module_api.track("u1", "Signed Up", {"plan": "pro"})
    _, identified = module_api.identify("u1", {"email": "a@example.com"})

    client = module_api.default_client
    assert ok is True
    assert isinstance(client, Client)
    assert client.write_key == "module-key"
    assert client.outbox_path == str(tmp_path / "module.db")
    assert client.upload is False
    assert os.path.exists(tmp_path / "module.db")
    assert module_api.stats().pending == 2
    assert stored_messages(client) == [tracked, identified]
    assert tracked["properties"] == {"plan": "pro"}
    assert tracked["context"]["library"] == LIBRARY


def test_module_level_client_is_built_once(module_api):
    module_api.track("u1", "first")
    first = module_api.default_client
    module_api.page("u1", "Docs", "Intro")
    module_api.alias("old", "u1")

    assert module_api.default_client is first
    assert [msg["type"] for msg in stored_messages(first)] == ["track", "page", "alias"]


# -- message ids ---------------------------------------------------------------------


def test_message_ids_are_version_4_uuids_and_never_repeat() -> None:
    from outbox_analytics.utils import new_message_id

    ids = [new_message_id() for _ in range(1000)]  # several pools' worth
    assert len(set(ids)) == 1000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_never_hands_out_its_parents_next_message_ids() -> None:
    from outbox_analytics.utils import new_message_id

    new_message_id()  # this thread's pool now holds ids drawn before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave without cleanup
        os.close(read)
        os.write(write, ",".join(new_message_id() for _ in range(20)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    os.waitpid(pid, 0)
    parent = [new_message_id() for _ in range(20)]
    assert len(child) == 20 and not set(child) & set(parent)
