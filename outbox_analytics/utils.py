"""Value cleaning, validation and time helpers.

Cleaning follows segment-analytics-python 2.x: Decimal to float, set and
tuple to list, Enum to its value, bytes to text, dates to ISO strings, dict
keys that are numbers, booleans or None to the text json.dumps writes for
them; a value with no JSON form is dropped, never raising at the call. What
differs, so that every stored event can be sent as valid JSON and stored as
msgpack:

- NaN and the infinities are sent as null (Segment writes `NaN`, which is
  not JSON: a receiver refuses the whole batch);
- an unsupported object is left out of its dict (as Segment does) or of its
  list (Segment drops the whole list); a UUID is sent as its text, and a
  numbers.Integral (numpy.int64) as its exact int;
- an integer wider than 64 bits (msgpack's limit) is sent as the float a
  JSON reader makes of Segment's digits (null beyond the float range);
- text with lone surrogates, and bytes that are not UTF-8 (Segment raises
  for these), are sent with U+FFFD in place of the bad part;
- a cycle, or nesting deeper than 100 levels, is left out where it passes
  the limit (Segment raises RecursionError for a cycle).

Each change logs a warning naming where the value sat
(`properties.items[2].price`), rate-limited per kind of change. Only a dict
key JSON cannot have (a tuple, say) raises TypeError at the call, as
Segment's json.dumps does.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import re
import reprlib
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar
from uuid import UUID

from . import process

__all__ = [
    "clean",
    "display_url",
    "guess_timezone",
    "new_message_id",
    "printable",
    "utc_now_iso",
    "require",
    "stringify_id",
    "RateLimitedLog",
]

log = logging.getLogger("outbox_analytics")

# msgpack stores integers of at most 64 bits; anything wider cannot be kept
# exactly, and most JSON parsers on the server side would round it anyway.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
# Deeper nesting than this is almost certainly a bug (or a cycle) in the caller;
# stopping here also keeps us far from Python's recursion limit.
_MAX_DEPTH = 100


def require(name: str, value: Any, data_type: Any) -> None:
    """Raise AssertionError, as Segment's client does, when `value` has the wrong type."""
    if not isinstance(value, data_type):
        raise AssertionError(f"{name} must be {_type_names(data_type)}, got {_shown(name, value)}")


_TYPE_NAMES = {
    str: "a string",
    numbers.Number: "a number",
    dict: "a dict",
    bytes: "bytes",
    datetime: "a datetime",
    os.PathLike: "a path",
}


def _type_names(data_type: Any) -> str:
    """`(str, numbers.Number)` as "a string or a number"."""
    kinds = data_type if isinstance(data_type, tuple) else (data_type,)
    return " or ".join(_TYPE_NAMES.get(kind, f"a {kind.__name__}") for kind in kinds)


def _shown(name: str, value: Any) -> str:
    if value is None:
        return "None"
    if "key" in name:  # a key's value would reach logs and tracebacks: its type only
        return f"a value of type {type(value).__name__}"
    return f"{reprlib.repr(value)} ({type(value).__name__})"


def stringify_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value)


def new_message_id() -> str:
    """A random (version 4) UUID as text: what `str(uuid.uuid4())` gives, at a fifth of the cost.

    It runs on every track(), where uuid.UUID's object construction shows;
    the random bytes are drawn 64 ids at a time, per thread (one system call
    instead of 64). A pool belongs to the process that drew it: a forked
    child, made by Python or by a C-level fork that runs no hook, never
    hands out ids its parent also holds.
    """
    pid = process.current_pid()
    pool: list[str] | None = getattr(_id_pools, "ids", None)
    if not pool or _id_pools.pid != pid:
        pool = _id_pools.ids = _random_ids(64)
        _id_pools.pid = pid
    return pool.pop()


def _random_ids(count: int) -> list[str]:
    """`count` version 4 UUIDs, their version and variant bits set by two int operations."""
    keep, version_bits = _uuid4_bits(count)
    bits = int.from_bytes(os.urandom(16 * count), "big") & keep | version_bits
    digits = bits.to_bytes(16 * count, "big").hex()
    return ["-".join(groups) for groups in _UUID_GROUPS.findall(digits)]


@functools.lru_cache(maxsize=4)
def _uuid4_bits(count: int) -> tuple[int, int]:
    """Masks over `count` 16-byte ids: the bits kept from the random ones, and those set.

    Each id's version nibble (bits 76-79 of its 128) is 4, and the two high
    bits of its byte 8 (bits 62-63) are "10", as RFC 4122 says.
    """
    keep = version_bits = 0
    for _ in range(count):
        keep = keep << 128 | ((1 << 128) - 1) ^ (0xF << 76) ^ (0x3 << 62)
        version_bits = version_bits << 128 | 0x4 << 76 | 0x2 << 62
    return keep, version_bits


_UUID_GROUPS = re.compile("([0-9a-f]{8})([0-9a-f]{4})([0-9a-f]{4})([0-9a-f]{4})([0-9a-f]{12})")
_id_pools = threading.local()


_second_text: tuple[int, str] = (0, "")
_millisecond_text: tuple[int, str] = (0, "")


def utc_now_iso() -> str:
    """The current time as Segment writes it: ISO 8601, milliseconds, "+00:00".

    Same text as `datetime.now(timezone.utc).isoformat(timespec="milliseconds")`
    at a fraction of the cost: the text is made once per millisecond (a
    busy job tracks many events in one), its date and time once per second.
    Each cache is one tuple, swapped atomically.
    """
    global _millisecond_text
    millisecond = int(time.time() * 1000)
    cached_millisecond, text = _millisecond_text
    if millisecond != cached_millisecond:
        second, part = divmod(millisecond, 1000)
        text = f"{_date_and_time(second)}.{part:03d}+00:00"
        _millisecond_text = (millisecond, text)
    return text


def _date_and_time(second: int) -> str:
    global _second_text
    cached_second, text = _second_text
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_text = (second, text)
    return text


def guess_timezone(dt: datetime) -> datetime:
    """Give a naive datetime a zone: local if it looks like `datetime.now()`, else UTC.

    This is Segment's heuristic, kept so that timestamps come out the same.
    """
    if dt.tzinfo is not None and dt.tzinfo.utcoffset(dt) is not None:
        return dt
    if abs(datetime.now() - dt) < timedelta(seconds=5):
        return dt.astimezone()  # interprets the naive value as local time
    return dt.replace(tzinfo=timezone.utc)


def clean(value: Any) -> Any:
    """Return a copy of `value` made only of JSON- and msgpack-safe types.

    Never raises for a value (Segment's clean does not either), except for a
    dict key JSON cannot have, which Segment's json.dumps refuses too: a
    value that has no JSON form is replaced or left out as described in the
    module docstring, with a rate-limited warning naming where it sat (for
    example ``properties.items[2]``). This runs on every track(): a value
    with nothing to change is copied by `_copy_plain`; only otherwise is it
    cleaned again by `_clean`, which keeps track of paths for the warnings.
    """
    try:
        return _copy_plain(value, 0)
    except (_NotPlain, UnicodeEncodeError):  # something to change: again, with the paths
        pass
    cleaned = _clean(value, 0, None, None)
    return None if cleaned is _LEFT_OUT else cleaned


class _NotPlain(Exception):
    """A value that `_copy_plain` cannot copy as it is."""


def _copy_plain(value: Any, depth: int) -> Any:
    """A copy of `value` made of plain JSON types only, that needs no change; else _NotPlain.

    The path of every clean(): almost every event is made of dicts, lists,
    text, numbers, booleans and None. Copied here with no bookkeeping of
    where each value sits (which only a warning needs), and a dict's text,
    numbers, booleans and None checked inline, not in a call each. Anything
    else, or anything to change, raises, and `_clean` does it all again.
    """
    if depth >= _MAX_DEPTH:
        raise _NotPlain
    kind = type(value)
    if kind is dict:
        copy = {}
        for key, item in value.items():
            if type(key) is not str or not key.isascii():
                raise _NotPlain
            kind = type(item)
            if kind is str:
                if not item.isascii():
                    item.encode("utf-8")  # raises UnicodeEncodeError for lone surrogates
            elif kind is dict or kind is list:
                item = _copy_plain(item, depth + 1)
            elif kind is float:
                if item - item != 0.0:  # true for NaN and the infinities only
                    raise _NotPlain
            elif kind is int:
                if not _INT_MIN <= item <= _INT_MAX:
                    raise _NotPlain
            elif item is not None and kind is not bool:
                raise _NotPlain
            copy[key] = item
        return copy
    if kind is list:
        return [_copy_plain(item, depth + 1) for item in value]
    if kind is str:
        if not value.isascii():
            value.encode("utf-8")  # as above
        return value
    if kind is float:
        if value - value != 0.0:
            raise _NotPlain
        return value
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise _NotPlain
        return value
    if value is None or kind is bool:
        return value
    raise _NotPlain


# Where a value sits: (the node of its container, its key or index there);
# the message itself is (None, None). Built once per container, and for a
# leaf only when it needs a warning.
_Node = tuple[Any, Any]

_T = TypeVar("_T")
_LEFT_OUT: Any = object()  # an unsupported value: left out of its dict or list


def _clean(value: Any, depth: int, parent: _Node | None, key: Any) -> Any:
    kind = type(value)
    if kind is str:
        return value if value.isascii() else _valid_text(value, (parent, key))
    if kind is dict:
        return _clean_mapping(value, depth, (parent, key))
    if kind is float:
        if value - value != 0.0:  # true for NaN and the infinities only
            return _changed("not finite", (parent, key), f"{value} has no JSON form", None)
        return value
    if kind is int:
        return value if _INT_MIN <= value <= _INT_MAX else _wide_integer(value, (parent, key))
    if value is None or kind is bool:
        return value
    if kind is list:
        return _clean_sequence(value, depth, (parent, key))
    return _clean_other(value, depth, parent, key)


def _clean_mapping(mapping: Mapping[Any, Any], depth: int, node: _Node) -> Any:
    if depth >= _MAX_DEPTH:
        return _too_deep(node)
    cleaned: dict[str, Any] = {}
    for key, item in mapping.items():
        name = key if type(key) is str and key.isascii() else _key_name(key, mapping, node)
        # Plain ASCII text needs no work: keep it without a call (the hot path).
        if type(item) is str and item.isascii():
            cleaned[name] = item
            continue
        item = _clean(item, depth + 1, node, name)
        if item is not _LEFT_OUT:
            cleaned[name] = item
    return cleaned


def _clean_sequence(items: Iterable[Any], depth: int, node: _Node) -> Any:
    if depth >= _MAX_DEPTH:
        return _too_deep(node)
    cleaned = []
    for index, item in enumerate(items):
        item = _clean(item, depth + 1, node, index)
        if item is not _LEFT_OUT:
            cleaned.append(item)
    return cleaned


def _clean_other(value: Any, depth: int, parent: _Node | None, key: Any) -> Any:
    """Everything but the exact built-in JSON types: subclasses and conversions."""
    if isinstance(value, Enum):  # before str and int: a (str, Enum) sends its value
        return _clean(value.value, depth, parent, key)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return _clean(str.__str__(value), depth, parent, key)  # its text, not its __str__
    if isinstance(value, int):
        return _clean(int(value), depth, parent, key)
    if isinstance(value, float):
        return _clean(float(value), depth, parent, key)
    if isinstance(value, Mapping):
        return _clean_mapping(value, depth, (parent, key))
    if isinstance(value, (list, tuple, set, frozenset)):
        return _clean_sequence(value, depth, (parent, key))
    if isinstance(value, Decimal):
        return _to_float(value, (parent, key))
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decoded(bytes(value), (parent, key))
    if isinstance(value, numbers.Integral):  # numpy.int64 and the like: exactly
        return _clean(int(value), depth, parent, key)
    if isinstance(value, numbers.Real):  # Fraction and other real numbers
        return _to_float(value, (parent, key))
    return _changed(
        "unsupported",
        (parent, key),
        f"a value of type {type(value).__name__} has no JSON form",
        _LEFT_OUT,
    )


def _to_float(number: Any, node: _Node) -> float | None:
    try:
        value = float(number)  # Decimal("1e400") gives inf, Decimal("NaN") nan
    except (OverflowError, ValueError):  # 10**400 as a Fraction, sNaN
        return _changed("not finite", node, f"{reprlib.repr(number)} has no JSON number", None)
    if value - value != 0.0:
        return _changed("not finite", node, f"{reprlib.repr(number)} has no JSON form", None)
    return value


def _wide_integer(value: int, node: _Node) -> float | None:
    """An integer msgpack cannot store: the float a JSON reader would make of Segment's digits.

    Segment writes every digit; JavaScript, most JSON libraries and
    warehouses read a number that long as a double, which is this float.
    """
    shown = str(value) if value.bit_length() <= 256 else f"of {value.bit_length()} bits"
    try:
        as_float = float(value)
    except OverflowError:  # beyond 1.8e308: no double holds it, a reader would fail
        return _changed("integer", node, f"integer {shown} fits no JSON number", None)
    return _changed(
        "integer",
        node,
        f"integer {shown} is wider than 64 bits",
        as_float,
        f"sent as the float {as_float!r}",
    )


def _valid_text(text: str, node: _Node) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    # Lone surrogates (from surrogateescape, or halves of a pair written as
    # two characters) cannot be UTF-8. Segment sends them as JSON escapes;
    # a receiver decodes a pair as its character and a lone one as U+FFFD,
    # which is what this does.
    repaired = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return _changed(
        "text", node, "text holds lone surrogates", repaired, "sent with U+FFFD in their place"
    )


def _decoded(data: bytes, node: _Node) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        repaired = data.decode("utf-8", "replace")
    return _changed(
        "text", node, "bytes are not UTF-8", repaired, "sent with U+FFFD in their place"
    )


def _too_deep(node: _Node) -> Any:
    return _changed(
        "too deep", node, f"nested deeper than {_MAX_DEPTH} levels (a cycle?)", _LEFT_OUT
    )


def _key_name(key: Any, mapping: Mapping[Any, Any], node: _Node) -> str:
    """A key as JSON writes it (json.dumps turns 1, 1.5, True and None into text)."""
    if isinstance(key, str):
        name = _valid_text(str.__str__(key), (node, key))
    elif isinstance(key, bool):
        name = "true" if key else "false"
    elif isinstance(key, int):
        name = int.__repr__(key)  # an IntEnum's number, as json.dumps writes it
    elif isinstance(key, float):
        name = json.dumps(float(key))  # "NaN" and "Infinity" too: JSON's way
    elif key is None:
        name = "null"
    else:  # Segment's json.dumps raises here too: a key is the caller's bug, not data
        raise TypeError(
            f"{_path(node)}: key {reprlib.repr(key)} is a {type(key).__name__}; JSON keys"
            " are text (or numbers, booleans and None, written as text)"
        )
    if name != key and name in mapping:
        # Segment sends both, and JSON readers keep the value that comes last.
        _changed(
            "key",
            (node, name),
            f"key {key!r} is the same as {name!r} in JSON",
            None,
            "the later value is kept",
        )
    return name


def _changed(problem: str, node: _Node, what: str, result: _T, becomes: str = "") -> _T:
    """Return `result` in place of a value, warning (rate-limited, per problem) where it sat."""
    suppressed = _warnings[problem].ready()
    if suppressed is not None:
        if not becomes:
            becomes = "left out" if result is _LEFT_OUT else "sent as null"
        more = f" ({suppressed} more such values since the last warning)" if suppressed else ""
        log.warning("outbox-analytics: %s: %s; %s%s", _path(node), what, becomes, more)
    return result


def _path(node: _Node | None) -> str:
    """`properties.items[2].price`, or `message` for the message itself; shortened if long."""
    keys = []
    while node is not None and node[0] is not None:
        node, key = node
        keys.append(key)
    text = ""
    for key in reversed(keys):
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            text += f".{key}" if text else str(key)
    text = printable(text)  # keys come from data: keep the log line one line
    if len(text) > 200:
        text = text[:200] + "..."
    return text or "message"


class RateLimitedLog:
    """Let a repeated log line through at most once per `interval` seconds.

    Returns how many calls were suppressed since the last one let through, so
    the line that does get logged can say so.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = -math.inf
        self._suppressed = 0

    def ready(self) -> int | None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return None
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


# One per kind of change, so that a flood of one kind hides no other.
_warnings = {
    problem: RateLimitedLog()
    for problem in ("not finite", "integer", "unsupported", "text", "too deep", "key")
}


def printable(text: str) -> str:
    """`text` for a terminal: every character a terminal acts on or a reader cannot see, escaped.

    For anything from a server, an event, a file or the environment in human
    output. Escaped (as Python writes them: \\n, \\x1b, \\u202e) is what
    str.isprintable() refuses: C0 and C1 controls and DEL (they clear the
    screen, move the cursor, set the window title; 0x9b is an 8-bit CSI), line
    and paragraph separators, bidi embeddings, overrides, isolates and marks
    (they reorder what the operator reads), zero-width and other format
    characters, spaces other than the ASCII one (they make two different
    values look the same), and bytes that were not UTF-8 (lone surrogates).
    So a value stays on its line and in its column. JSON output never comes
    through here: it keeps the exact strings (json.dumps escapes them itself).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def display_url(url: str) -> str:
    """`url` as scheme://host:port, the way it is shown in every text: no credentials, no path."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(an unreadable URL)"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")
