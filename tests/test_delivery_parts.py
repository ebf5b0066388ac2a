"""The pure parts of delivery, table-tested: when to send, and whom a rejection blames."""

from __future__ import annotations

import math

import pytest

from outbox_analytics import APIError, EndpointRejected
from outbox_analytics.delivery.schedule import (
    MAX_WAIT,
    Schedule,
    SteadyWallClock,
    head_backoff,
    next_delay,
    stored_wait,
)
from outbox_analytics.delivery.triage import BuryThem, EndpointToBlame, Rejections, judge
from outbox_analytics.store import Claimed

NOW = 1000.0  # monotonic
BASE = {
    "pending": 100,
    "oldest_age": 5.0,
    "upload_size": 100,
    "upload_interval": 0.5,
    "head_wait": 0.0,
    "flush_since": None,
}


@pytest.mark.parametrize(
    ("schedule", "situation", "delay"),
    [
        # a full batch is due at once
        (Schedule(), {}, 0.0),
        # nothing pending: look again after the interval
        (Schedule(), {"pending": 0}, 0.5),
        # a young, small batch waits to fill up, for the rest of the interval
        (Schedule(), {"pending": 3, "oldest_age": 0.2}, 0.3),
        # filling fast (half full in 10 ms): look again when it should be full, not in 490 ms
        (Schedule(), {"pending": 50, "oldest_age": 0.01}, 0.01),
        # filling slowly: the rest of the interval still bounds the wait
        (Schedule(), {"pending": 1, "oldest_age": 0.1}, 0.4),
        # an old small batch goes
        (Schedule(), {"pending": 3, "oldest_age": 0.7}, 0.0),
        # a stepped clock: an event "stored in the future" is old enough
        (Schedule(), {"pending": 3, "oldest_age": -7200.0}, 0.0),
        # a flush sends a small young batch at once
        (Schedule(), {"pending": 3, "oldest_age": 0.1, "flush_since": NOW}, 0.0),
        # the head's stored retry time
        (Schedule(), {"head_wait": 4.0}, 4.0),
        # a flush that began after the head gave up retries it at once
        (Schedule(gave_up_at=NOW - 10), {"head_wait": 4.0, "flush_since": NOW - 1}, 0.0),
        # but not a head that gave up during this very flush
        (Schedule(gave_up_at=NOW - 1), {"head_wait": 4.0, "flush_since": NOW - 2}, 4.0),
        # a server's Retry-After pauses everything, a flush too
        (Schedule(paused_until=NOW + 7), {"flush_since": NOW}, 7.0),
        # a pause that ended is no pause
        (Schedule(paused_until=NOW - 1), {}, 0.0),
    ],
)
def test_next_delay(schedule: Schedule, situation: dict, delay: float) -> None:
    assert next_delay(schedule, NOW, **{**BASE, **situation}) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("stored", "now", "wait"),
    [
        (None, 100.0, 0.0),
        (90.0, 100.0, 0.0),  # due
        (105.0, 100.0, 5.0),
        (100.0 + MAX_WAIT + 1, 100.0, 0.0),  # from a clock that was ahead: due now
    ],
)
def test_stored_wait(stored: float | None, now: float, wait: float) -> None:
    assert stored_wait(stored, now) == wait


@pytest.mark.parametrize(
    ("longest", "failures", "backoff"),
    [
        (0.0, 1, 1.0),  # at least the upload interval, doubled once
        (3.0, 1, 6.0),
        (3.0, 3, 24.0),
        (60.0, 5, MAX_WAIT),  # capped
        (1.0, 10_000, MAX_WAIT),  # never overflows
    ],
)
def test_head_backoff(longest: float, failures: int, backoff: float) -> None:
    assert head_backoff(longest, 0.5, failures) == backoff


def test_a_round_that_gives_up_doubles_the_next_backoff() -> None:
    schedule = Schedule(longest_wait=2.0)
    assert schedule.gave_up(NOW, 0.5) == 4.0
    assert schedule.gave_up(NOW + 5, 0.5) == 8.0
    assert schedule.gave_up_at == NOW + 5
    schedule.pause(NOW, 1e9, "HTTP 429")
    assert schedule.paused_until == NOW + MAX_WAIT


def test_the_steady_wall_clock_follows_the_monotonic_clock() -> None:
    clock = SteadyWallClock()
    first = clock.now()
    assert math.isclose(clock.at(clock._monotonic + 3600) - clock.at(clock._monotonic), 3600)
    assert clock.now() >= first


def rows(*ids: int) -> list[Claimed]:
    return [Claimed(i, b'{"n":%d}' % i, 0.0) for i in ids]


def rejected(batch: list[Claimed], status: int = 400, body: str = "bad") -> list:
    return [(row, APIError(status, "invalid", body, body=body)) for row in batch]


def test_every_event_rejected_alike_blames_the_endpoint() -> None:
    memory = Rejections()
    batch = rows(1, 2, 3)
    verdict = judge(memory, batch, rejected(batch), endpoint_judges_events=False)
    assert isinstance(verdict, EndpointToBlame)
    assert isinstance(verdict.error, EndpointRejected) and verdict.error.status == 400
    assert memory.is_same_head(rows(1, 2)) and not memory.is_same_head(rows(2, 3))


def test_some_events_rejected_are_buried_grouped_by_answer() -> None:
    memory = Rejections()
    batch = rows(1, 2, 3, 4)
    found = rejected(rows(1), body="a") + rejected(rows(3), status=422, body="b")
    verdict = judge(memory, batch, found, endpoint_judges_events=False)
    assert isinstance(verdict, BuryThem)
    assert [([row.id for row in group], exc.status) for group, exc in verdict.groups] == [
        ([1], 400),
        ([3], 422),
    ]
    assert memory.endpoint is None


def test_a_lone_event_is_buried_the_second_alike_blames_the_endpoint() -> None:
    memory = Rejections()
    first = judge(memory, rows(1), rejected(rows(1)), endpoint_judges_events=False)
    assert isinstance(first, BuryThem)
    second = judge(memory, rows(2), rejected(rows(2)), endpoint_judges_events=False)
    assert isinstance(second, EndpointToBlame)
    memory.forget()  # an event was accepted meanwhile: lone rejections judge events again
    third = judge(memory, rows(3), rejected(rows(3)), endpoint_judges_events=False)
    assert isinstance(third, BuryThem)


def test_when_the_endpoint_judges_events_all_rejected_are_buried() -> None:
    batch = rows(1, 2)
    verdict = judge(Rejections(), batch, rejected(batch), endpoint_judges_events=True)
    assert isinstance(verdict, BuryThem)
