"""What the CLI's commands do to files, callable without the CLI.

Functions here take paths or open files and return data or raise
(ValueError for bad input); printing, prompts and exit codes stay in cli.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, TypeVar

from .errors import NotAnOutbox, OutboxAnalyticsError, OutboxDamaged
from .messages import validate_message
from .store import Outbox
from .store.outbox import PATH_ENV, default_directories, wal_bytes

__all__ = [
    "change", "default_places", "existing_outbox", "find_outboxes", "new_or_outbox",
    "read_messages", "summarize",
]  # fmt: skip

T = TypeVar("T")

# Files beside an outbox that are its own, or its past: never listed as outboxes.
_NOT_OUTBOXES = re.compile(r"(-wal|-shm|-journal|\.lock|\.unsalvaged)$|\.corrupt-")


def default_places() -> list[str]:
    """Where clients put outbox files unless told otherwise.

    The state directory, the fallback directory under the system's temp
    directory, and $OUTBOX_ANALYTICS_PATH's file when it is set.
    """
    places = default_directories()
    override = os.environ.get(PATH_ENV)
    return [*places, override] if override else places


def find_outboxes(places: Sequence[str]) -> list[dict[str, Any]]:
    """A summary (see `summarize`) of each outbox file in `places` (directories or files)."""
    found = (summarize(path) for path in _candidate_files(places))
    return [summary for summary in found if summary is not None]


def _candidate_files(places: Sequence[str]) -> Iterator[str]:
    for place in places:
        if os.path.isfile(place):
            yield place
        elif os.path.isdir(place):
            for name in sorted(os.listdir(place)):
                path = os.path.join(place, name)
                if not _NOT_OUTBOXES.search(name) and os.path.isfile(path):
                    yield path


def summarize(path: str) -> dict[str, Any] | None:
    """Whose one file is (its host), what waits in it, and whether an uploader sends it.

    Read-only. None if it is not an outbox (or is gone); a file that cannot
    be read gives {"path", "error"}.
    """
    if not os.path.isfile(path):
        return None  # removed since it was listed
    try:
        with Outbox(path, readonly=True) as outbox:
            stats, host = outbox.stats(), outbox.owner_host()
    except NotAnOutbox:
        return None
    except OutboxDamaged as exc:
        return {"path": path, "error": f"damaged: {exc}"}
    except (OutboxAnalyticsError, OSError) as exc:
        return {"path": path, "error": str(exc)}
    return {
        "path": stats.path,
        "host": host,
        "pending": stats.pending,
        "inflight": stats.inflight,
        "dead": stats.dead,
        "oldest_pending_age_s": stats.oldest_pending_age_s,
        "uploader_alive": stats.uploader_alive,
    }


def read_messages(source: IO[str], name: str) -> Iterator[dict[str, Any]]:
    """The messages of JSON Lines (as `export` writes them), each validated.

    Blank lines are skipped and what export adds (`_outbox`) is dropped; a
    bad line raises ValueError naming `name` and its line number.
    """
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}:{number}: not JSON ({exc.msg})") from None
        if isinstance(message, dict):
            message.pop("_outbox", None)
        try:
            yield validate_message(message)
        except ValueError as exc:
            raise ValueError(f"{name}:{number}: {exc}") from None


def change(path: str, work: Callable[[Outbox], T], create: bool = False) -> T:
    """Run `work` on the outbox opened for writing; a damaged file is salvaged, as a client does.

    With `create`, a missing file becomes a new outbox; an existing one must
    be an outbox (see `existing_outbox`).
    """
    with Outbox(new_or_outbox(path) if create else existing_outbox(path)) as outbox:
        try:
            return work(outbox)
        except OutboxDamaged as damage:
            outbox.recover(damage)  # moved aside, its readable rows copied to a fresh file
            return work(outbox)


def existing_outbox(path: str) -> str:
    """`path`, if an outbox is there, else ValueError: writing makes no outbox of a wrong path.

    An empty file or database is refused as reading commands refuse it (a
    client would make it an outbox); a damaged one passes, to be salvaged.
    """
    if not os.path.isfile(path):
        raise ValueError(f"no outbox file at {path}")
    if os.path.getsize(path) == 0 and wal_bytes(path) == 0:
        raise ValueError(f"{path} is an empty file, not an outbox (is the path right?)")
    with contextlib.suppress(OutboxDamaged):
        Outbox(path, readonly=True).close()  # NotAnOutbox for an empty database
    return path


def new_or_outbox(path: str) -> str:
    """`path`, to be made an outbox if nothing is there; an existing file must be one."""
    return existing_outbox(path) if os.path.exists(path) else path
