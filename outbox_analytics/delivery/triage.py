"""Rejection triage: is a rejection about the events, or about the endpoint?

A batch the server rejects (400, 413...) is split until the offending events
are found, and only those are dead-lettered. But a wrong host, path or key
rejects every event alike: dead-lettering a whole outbox for a typo in a
setting would serve no one. So when every event of a batch is rejected with
answers that mean the same, the endpoint is to blame and the events stay
pending. One event alone cannot tell; the second lone event in a row rejected
alike can.

"Mean the same" is judged on what an answer says, not its bytes: real error
pages carry a request id, a trace id or a time (ASP.NET's traceId, Spring's
timestamp, Cloudflare's Ray ID). And some answers are about the endpoint
whatever the events: a web server's HTML page, 405 (wrong method: a wrong
path) and 415 (wrong media type: not the API). Those are not split at all.

`Rejections` remembers the last such verdict for one file (shared by the
clients of this process on that file); `judge()` is a pure decision on what
a split found. Nothing here sends, stores or reads a clock.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from ..errors import APIError, EndpointRejected
from ..store import Claimed

__all__ = [
    "BuryThem",
    "EndpointToBlame",
    "Rejections",
    "about_the_endpoint",
    "answer_meaning",
    "endpoint_error",
    "error_text",
    "judge",
]

RejectionKey = tuple[int | None, str]

# Parts of an answer that change from one response to the next: numbers,
# long hex runs and UUIDs (ids, times, trace ids).
_VARYING = re.compile(r"[0-9a-fA-F]{8,}(?:-[0-9a-fA-F]{4,})*|\d+")
# The fields of a JSON error that say what went wrong (not when, nor for which request).
_MEANING_FIELDS = ("code", "error", "type", "title", "message", "error_description", "detail")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
# Statuses about the request's form, the same for every event.
_ENDPOINT_STATUSES = frozenset({405, 415})


def rejection_key(exc: APIError) -> RejectionKey:
    """What makes two rejections alike: the status and what the server's answer means."""
    return exc.status, answer_meaning(exc.body or str(exc))


def answer_meaning(body: str) -> str:
    """An answer without what varies between responses: its kind and its words that matter."""
    text = body.strip()
    if looks_like_html(text):
        title = _TITLE.search(text)
        return "html:" + _VARYING.sub("#", title.group(1).strip() if title else "")
    try:
        payload: Any = json.loads(text)
    except ValueError:
        return "text:" + _VARYING.sub("#", text)
    if not isinstance(payload, dict):
        return "json:" + type(payload).__name__
    said = [f"{key}={payload[key]}" for key in _MEANING_FIELDS if isinstance(payload.get(key), str)]
    if not said:
        said = sorted(payload)
    return "json:" + _VARYING.sub("#", "|".join(said))


def looks_like_html(text: str) -> bool:
    return text.lstrip("\ufeff \t\r\n")[:1] == "<"  # (\ufeff: a byte order mark)


def about_the_endpoint(exc: APIError) -> bool:
    """A rejection that no event could have caused: it need not be split to be judged.

    A 413 is about the batch's size, even on a proxy's HTML page: splitting helps.
    """
    if exc.status == 413:
        return False
    return exc.status in _ENDPOINT_STATUSES or looks_like_html(exc.body)


@dataclasses.dataclass
class Rejections:
    """What the endpoint answered lately, for one file."""

    # A head whose events were each rejected alike: (answer, first id, last id).
    endpoint: tuple[RejectionKey, int, int] | None = None
    lone: RejectionKey | None = None  # the last batch of one event, rejected

    def is_same_head(self, rows: Sequence[Claimed]) -> bool:
        """The batch is (part of) the remembered head: no event in it was judged since."""
        if self.endpoint is None:
            return False
        return rows[0].id == self.endpoint[1] and rows[-1].id <= self.endpoint[2]

    def same_as_head(self, exc: APIError) -> bool:
        return self.endpoint is not None and rejection_key(exc) == self.endpoint[0]

    def forget(self) -> None:
        """The endpoint accepted (or judged) an event: it is not to blame."""
        self.endpoint = self.lone = None


@dataclasses.dataclass(frozen=True)
class EndpointToBlame:
    """Every event was rejected alike: keep them pending and raise `error`."""

    error: EndpointRejected


@dataclasses.dataclass(frozen=True)
class BuryThem:
    """The rejections are about these events: dead-letter each group with its error."""

    groups: list[tuple[list[Claimed], APIError]]


Verdict = EndpointToBlame | BuryThem


def judge(
    memory: Rejections,
    rows: Sequence[Claimed],
    rejected: Sequence[tuple[Claimed, APIError]],
    endpoint_judges_events: bool,
) -> Verdict:
    """What to do with the rows a split of `rows` found rejected (remembered in `memory`).

    `endpoint_judges_events`: another event was just accepted (or rejected
    otherwise), so every rejection is about its event.
    """
    keys = {rejection_key(exc) for _, exc in rejected}
    if len(rejected) == len(rows) and len(keys) == 1 and not endpoint_judges_events:
        key = next(iter(keys))
        if len(rows) > 1 or key == memory.lone or about_the_endpoint(rejected[0][1]):
            memory.endpoint = (key, rows[0].id, rows[-1].id)
            return EndpointToBlame(endpoint_error(rejected[0][1]))
        memory.lone = key
    groups: dict[RejectionKey, tuple[list[Claimed], APIError]] = {}
    for row, exc in rejected:
        groups.setdefault(rejection_key(exc), ([], exc))[0].append(row)
    return BuryThem(list(groups.values()))


def endpoint_error(exc: APIError) -> EndpointRejected:
    return EndpointRejected(
        f"the server rejects every event alike ({error_text(exc)}): check the host,"
        " its path and the write key; the events stay pending",
        status=exc.status,
        body=exc.body,
    )


def error_text(exc: BaseException) -> str:
    """An error with the server's words, for logs and the file's last_error (exact there)."""
    body = getattr(exc, "body", "")
    text = str(exc)
    return f"{text}: {body}" if body and body not in text else text
