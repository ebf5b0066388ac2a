"""Rejection triage: is a rejection about the events, or about the endpoint?

A batch the server rejects (400, 413...) is split until the offending events
are found, and only those are dead-lettered. But a wrong host, path or key
rejects every event alike: dead-lettering a whole outbox for a typo in a
setting would serve no one. So when every event of a batch is rejected with
the same answer, the endpoint is to blame and the events stay pending. One
event alone cannot tell; the second lone event in a row rejected alike can.

`Rejections` remembers the last such verdict for one file (shared by the
clients of this process on that file); `judge()` is a pure decision on what
a split found. Nothing here sends, stores or reads a clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional, Union

from ..errors import APIError, EndpointRejected
from ..store import Row

__all__ = ["BuryThem", "EndpointToBlame", "Rejections", "endpoint_error", "error_text", "judge"]

RejectionKey = tuple[Optional[int], str]  # run time on 3.9: no `int | None` here


def rejection_key(exc: APIError) -> RejectionKey:
    """What makes two rejections alike: the status and the server's words."""
    return exc.status, exc.body or str(exc)


@dataclasses.dataclass
class Rejections:
    """What the endpoint answered lately, for one file."""

    # A head whose events were each rejected alike: (answer, first id, last id).
    endpoint: tuple[RejectionKey, int, int] | None = None
    lone: RejectionKey | None = None  # the last batch of one event, rejected

    def is_same_head(self, rows: Sequence[Row]) -> bool:
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

    groups: list[tuple[list[Row], APIError]]


Verdict = Union[EndpointToBlame, BuryThem]


def judge(
    memory: Rejections,
    rows: Sequence[Row],
    rejected: Sequence[tuple[Row, APIError]],
    endpoint_judges_events: bool,
) -> Verdict:
    """What to do with the rows a split of `rows` found rejected (remembered in `memory`).

    `endpoint_judges_events`: another event was just accepted (or rejected
    otherwise), so every rejection is about its event.
    """
    keys = {rejection_key(exc) for _, exc in rejected}
    if len(rejected) == len(rows) and len(keys) == 1 and not endpoint_judges_events:
        key = next(iter(keys))
        if len(rows) > 1 or key == memory.lone:
            memory.endpoint = (key, rows[0].id, rows[-1].id)
            return EndpointToBlame(endpoint_error(rejected[0][1]))
        memory.lone = key
    groups: dict[RejectionKey, tuple[list[Row], APIError]] = {}
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
    """An error with the server's words, for logs, on_error and the file's last_error."""
    body = getattr(exc, "body", "")
    text = str(exc)
    return f"{text}: {body}" if body and body not in text else text
