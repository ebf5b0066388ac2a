"""Value cleaning, validation and time helpers.

Cleaning follows segment-analytics-python 2.x (Decimal to float, set/tuple to
list, Enum to its value, bytes to text, dates to ISO strings) with two fixes:
a UUID becomes its string instead of vanishing, and a value that cannot be
represented raises at the call site, naming where it sits, instead of being
dropped with a log line. Nothing is ever dropped silently.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from . import process

__all__ = [
    "clean",
    "guess_timezone",
    "new_message_id",
    "printable",
    "utc_now_iso",
    "require",
    "stringify_id",
    "RateLimitedLog",
]

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
        raise AssertionError(f"{name} must have {data_type}, got: {value!r}")


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
    ids = []
    randomness = os.urandom(16 * count).hex()
    for start in range(0, 32 * count, 32):
        h = randomness[start : start + 32]
        variant = "89ab"[int(h[16], 16) & 3]  # the two high bits of byte 8 are "10"
        ids.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}")
    return ids


_id_pools = threading.local()


_second_text: tuple[int, str] = (0, "")


def utc_now_iso() -> str:
    """The current time as Segment writes it: ISO 8601, milliseconds, "+00:00".

    Same text as `datetime.now(timezone.utc).isoformat(timespec="milliseconds")`
    at a third of the cost: the date and time of the current second are
    formatted once per second. The cache is one tuple, swapped atomically.
    """
    global _second_text
    now = time.time()
    second = int(now)
    cached_second, text = _second_text
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_text = (second, text)
    return f"{text}.{int((now - second) * 1000):03d}+00:00"


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

    Raises TypeError or ValueError naming where the offending value sits (for
    example ``'properties.items[2]'``). This runs on every track(): the
    common types are dispatched by exact type, and the path is only built
    when something is wrong.
    """
    try:
        return _clean(value, 0)
    except _Unrepresentable as exc:
        raise exc.error_class(f"{_where(exc.path)}: {exc.reason}") from exc.__cause__


class _Unrepresentable(Exception):
    """Carries a problem up the tree, collecting the path on the way."""

    def __init__(self, error_class: type[Exception], reason: str) -> None:
        super().__init__(reason)
        self.error_class = error_class
        self.reason = reason
        self.keys: list[str] = []

    @property
    def path(self) -> str:
        text = ""
        for key in reversed(self.keys):
            text += key if key.startswith("[") or not text else "." + key
        return text


def _clean(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_text(value)
        return value
    if kind is dict:
        return _clean_mapping(value, depth)
    if kind is float:
        if value - value != 0.0:  # true for NaN and the infinities only
            raise _Unrepresentable(
                ValueError, f"{value} is not a finite number and has no JSON form"
            )
        return value
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise _Unrepresentable(ValueError, f"integer {value} does not fit in 64 bits")
        return value
    if value is None or kind is bool:
        return value
    if kind is list:
        return _clean_sequence(value, depth)
    return _clean_other(value, depth)


def _clean_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    if depth >= _MAX_DEPTH:
        raise _Unrepresentable(ValueError, f"nested deeper than {_MAX_DEPTH} levels (a cycle?)")
    cleaned: dict[str, Any] = {}
    for key, item in mapping.items():
        name = key if type(key) is str and key.isascii() else _key_name(key, mapping)
        kind = type(item)
        # Plain ASCII text needs no work: keep it without a call (the hot path).
        if kind is str and item.isascii():
            cleaned[name] = item
            continue
        try:
            cleaned[name] = _clean(item, depth + 1)
        except _Unrepresentable as exc:
            exc.keys.append(name)
            raise
    return cleaned


def _clean_sequence(items: Iterable[Any], depth: int) -> list[Any]:
    if depth >= _MAX_DEPTH:
        raise _Unrepresentable(ValueError, f"nested deeper than {_MAX_DEPTH} levels (a cycle?)")
    cleaned = []
    for index, item in enumerate(items):
        try:
            cleaned.append(_clean(item, depth + 1))
        except _Unrepresentable as exc:
            exc.keys.append(f"[{index}]")
            raise
    return cleaned


def _clean_other(value: Any, depth: int) -> Any:
    """Everything but the exact built-in JSON types: subclasses and conversions."""
    if isinstance(value, Enum):  # before str and int: a (str, Enum) sends its value
        return _clean(value.value, depth)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return _clean(str(value), depth)
    if isinstance(value, int):
        return _clean(int(value), depth)
    if isinstance(value, float):
        return _clean(float(value), depth)
    if isinstance(value, Mapping):
        return _clean_mapping(value, depth)
    if isinstance(value, (list, tuple, set, frozenset)):
        return _clean_sequence(value, depth)
    if isinstance(value, Decimal):
        return _clean(_to_float(value), depth)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Unrepresentable(ValueError, "bytes are not valid UTF-8") from exc
    if isinstance(value, numbers.Real):  # Fraction and other real numbers
        return _clean(_to_float(value), depth)
    raise _Unrepresentable(
        TypeError, f"value of type {type(value).__name__} cannot be sent as JSON"
    )


def _to_float(number: Any) -> float:
    try:
        return float(number)
    except (OverflowError, ValueError) as exc:  # 10**400 as a Fraction, sNaN
        raise _Unrepresentable(ValueError, f"{number!r} has no JSON number form") from exc


def _key_name(key: Any, mapping: Mapping[Any, Any]) -> str:
    if isinstance(key, str):
        _check_text(key)
        return str(key)
    # JSON would turn an int key into its text anyway; do it now so that what
    # is stored is exactly what the server receives. If the text is also a
    # key of its own, one value would silently replace the other: refuse.
    if isinstance(key, int) and not isinstance(key, bool):
        name = str(int(key))
        if name in mapping:
            raise _Unrepresentable(ValueError, f"keys {key!r} and {name!r} would collide as text")
        return name
    raise _Unrepresentable(TypeError, f"key {key!r} of type {type(key).__name__} is not text")


def _check_text(text: str) -> None:
    # A lone surrogate cannot be encoded as UTF-8, so it could be neither
    # stored nor sent.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Unrepresentable(ValueError, f"text is not valid Unicode ({exc.reason})") from exc


def _where(path: str) -> str:
    return repr(path) if path else "message"


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
