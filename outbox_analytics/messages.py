"""Building Segment's six messages, and checking built ones: no client, no file, no thread.

Each builder takes the arguments of the `Client` method of the same name
(the client's methods are made from them: see `client.sends`), checks them,
raising at the caller's line as Segment does (AssertionError for a wrong
type), and returns the message completed (timestamp, messageId, library)
and cleaned: a deep copy made of JSON- and msgpack-safe values only, so the
caller's dicts are never modified. `encode()` gives its stored form.
`validate_message()` checks a message someone else built (the CLI's
`import`).
"""

from __future__ import annotations

import json
import numbers
from datetime import datetime
from typing import Any

from .store import encode_message
from .utils import (
    clean,
    guess_timezone,
    new_message_id,
    require,
    stringify_id,
    utc_now_iso,
)
from .version import VERSION

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MESSAGE_TYPES",
    "alias",
    "encode",
    "group",
    "identify",
    "page",
    "screen",
    "track",
    "validate_message",
]

MAX_MESSAGE_BYTES = 32 << 10  # Segment's limit on one message as JSON
# JSON (ASCII-escaped, as sent) is at most 7 bytes per stored msgpack byte:
# the worst case is a list of False ("false, " for 1 byte); control characters
# ("\u0001") and None ("null, ") give 6. A payload under an eighth of the
# limit cannot be over it, so the costly JSON measure is only taken for large
# messages.
_SURELY_UNDER_LIMIT = MAX_MESSAGE_BYTES // 8
ID_TYPES = (str, numbers.Number)  # str first: isinstance() stops at the first match
LIBRARY = {"name": "outbox-analytics", "version": VERSION}
MESSAGE_TYPES = ("track", "identify", "page", "screen", "group", "alias")

Message = dict[str, Any]


def identify(
    user_id: Any = None,
    traits: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Any = None,
    integrations: dict[str, Any] | None = None,
    message_id: Any = None,
) -> Message:
    """Who the user is: `traits` (a dict) describe them."""
    traits = traits or {}
    require("user_id or anonymous_id", user_id or anonymous_id, ID_TYPES)
    require("traits", traits, dict)
    return _complete(
        {
            "integrations": integrations or {},
            "anonymousId": anonymous_id,
            "timestamp": timestamp,
            "context": context or {},
            "type": "identify",
            "userId": user_id,
            "traits": traits,
            "messageId": message_id,
        }
    )


def track(
    user_id: Any = None,
    event: str | None = None,
    properties: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Any = None,
    integrations: dict[str, Any] | None = None,
    message_id: Any = None,
) -> Message:
    """What the user did: the `event`'s name, and `properties` (a dict) of it."""
    properties = properties or {}
    require("user_id or anonymous_id", user_id or anonymous_id, ID_TYPES)
    require("properties", properties, dict)
    require("event", event, str)
    return _complete(
        {
            "integrations": integrations or {},
            "anonymousId": anonymous_id,
            "properties": properties,
            "timestamp": timestamp,
            "context": context or {},
            "userId": user_id,
            "type": "track",
            "event": event,
            "messageId": message_id,
        }
    )


def alias(
    previous_id: Any = None,
    user_id: Any = None,
    context: dict[str, Any] | None = None,
    timestamp: datetime | None = None,
    integrations: dict[str, Any] | None = None,
    message_id: Any = None,
) -> Message:
    """`previous_id` and `user_id` are the same user."""
    require("previous_id", previous_id, ID_TYPES)
    require("user_id", user_id, ID_TYPES)
    return _complete(
        {
            "integrations": integrations or {},
            "previousId": stringify_id(previous_id),
            "timestamp": timestamp,
            "context": context or {},
            "userId": user_id,
            "type": "alias",
            "messageId": message_id,
        }
    )


def group(
    user_id: Any = None,
    group_id: Any = None,
    traits: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Any = None,
    integrations: dict[str, Any] | None = None,
    message_id: Any = None,
) -> Message:
    """The user belongs to the group `group_id`, which `traits` (a dict) describe."""
    traits = traits or {}
    require("user_id or anonymous_id", user_id or anonymous_id, ID_TYPES)
    require("group_id", group_id, ID_TYPES)
    require("traits", traits, dict)
    return _complete(
        {
            "integrations": integrations or {},
            "anonymousId": anonymous_id,
            "timestamp": timestamp,
            "groupId": stringify_id(group_id),
            "context": context or {},
            "userId": user_id,
            "traits": traits,
            "type": "group",
            "messageId": message_id,
        }
    )


def page(
    user_id: Any = None,
    category: str | None = None,
    name: str | None = None,
    properties: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Any = None,
    integrations: dict[str, Any] | None = None,
    message_id: Any = None,
) -> Message:
    """The user saw a web page: its `name`, `category` and `properties`."""
    return _page_or_screen("page", locals())


def screen(
    user_id: Any = None,
    category: str | None = None,
    name: str | None = None,
    properties: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Any = None,
    integrations: dict[str, Any] | None = None,
    message_id: Any = None,
) -> Message:
    """The user saw a screen of an app: its `name`, `category` and `properties`."""
    return _page_or_screen("screen", locals())


def _page_or_screen(kind: str, given: dict[str, Any]) -> Message:
    properties = given["properties"] or {}
    user_id, anonymous_id = given["user_id"], given["anonymous_id"]
    name, category = given["name"], given["category"]
    require("user_id or anonymous_id", user_id or anonymous_id, ID_TYPES)
    require("properties", properties, dict)
    if name:
        require("name", name, str)
    if category:
        require("category", category, str)
    return _complete(
        {
            "integrations": given["integrations"] or {},
            "anonymousId": anonymous_id,
            "properties": properties,
            "timestamp": given["timestamp"],
            "category": category,
            "context": given["context"] or {},
            "userId": user_id,
            "type": kind,
            "name": name,
            "messageId": given["message_id"],
        }
    )


def _complete(msg: Message) -> Message:
    """Fill in the timestamp, messageId and library, and clean; raise if a field is bad."""
    timestamp = msg["timestamp"]
    if timestamp is None:
        msg["timestamp"] = utc_now_iso()
    else:
        require("timestamp", timestamp, datetime)
        msg["timestamp"] = guess_timezone(timestamp).isoformat(timespec="milliseconds")
    require("integrations", msg["integrations"], dict)
    require("context", msg["context"], dict)

    message_id = msg["messageId"]
    msg["messageId"] = new_message_id() if message_id is None else stringify_id(message_id)
    msg["userId"] = stringify_id(msg.get("userId"))
    msg["anonymousId"] = stringify_id(msg.get("anonymousId"))
    msg = clean(msg)  # a deep copy: the caller's dicts are never modified
    msg["context"]["library"] = dict(LIBRARY)
    return msg


def encode(msg: Message) -> bytes:
    """The stored form of a message; RuntimeError, as in Segment, if it is over 32 KB."""
    data = encode_message(msg)
    if len(data) > _SURELY_UNDER_LIMIT:
        # Segment's measure: ASCII-escaped JSON, so len() is the byte count.
        size = len(json.dumps(msg))
        if size > MAX_MESSAGE_BYTES:
            raise RuntimeError(
                f"Message exceeds {MAX_MESSAGE_BYTES // 1024}kb limit. ({size} bytes,"
                f" messageId {msg['messageId']})"
            )
    return data


# What each type needs beyond messageId and timestamp: all of the names in a
# tuple's first item, and one of those in its second (empty: none needed).
_NEEDED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "track": ((), ("userId", "anonymousId")),  # and an event name: any text, as a client takes
    "identify": ((), ("userId", "anonymousId")),
    "page": ((), ("userId", "anonymousId")),
    "screen": ((), ("userId", "anonymousId")),
    "group": (("groupId",), ("userId", "anonymousId")),
    "alias": (("previousId", "userId"), ()),
}
_OBJECTS = ("properties", "traits", "context", "integrations")


def validate_message(message: Any) -> Message:
    """A built message (as `export` writes it) checked as a client would have built it.

    Returns it cleaned; raises ValueError saying what is wrong: its type, a
    missing id, event or messageId, a timestamp that is not ISO 8601 with a
    time zone, a field that should be an object, or a size over Segment's limit.
    """
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        raise ValueError(f"type must be one of {', '.join(MESSAGE_TYPES)}, got {kind!r}")
    if not isinstance(message.get("messageId"), str):
        raise ValueError("messageId must be a non-empty text")
    all_of, one_of = _NEEDED[kind]
    a_kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} message"
    for name in ("messageId", *all_of):
        if not _given(message.get(name)):
            raise ValueError(f"{a_kind} needs {name}")
    if kind == "track" and not isinstance(message.get("event"), str):
        raise ValueError(f"a track message needs event, a text (got {message.get('event')!r})")
    if one_of and not any(_given(message.get(name)) for name in one_of):
        raise ValueError(f"{a_kind} needs {' or '.join(one_of)}")
    _check_timestamp(message.get("timestamp"))
    for name in _OBJECTS:
        if name in message and not isinstance(message[name], dict):
            raise ValueError(f"{name} must be a JSON object")
    cleaned: Message = clean(message)
    for name in ("userId", "anonymousId", "groupId", "previousId"):
        if name in cleaned:  # ids are text, as the client sends them
            cleaned[name] = stringify_id(cleaned[name])
    size = len(json.dumps(cleaned))
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"{size} bytes of JSON, over the {MAX_MESSAGE_BYTES // 1024} KB limit")
    return cleaned


def _given(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, str) and value != "") or isinstance(value, numbers.Number)


def _check_timestamp(value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError("timestamp must be an ISO 8601 text")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"timestamp is not ISO 8601: {value!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp has no time zone: {value!r}")
