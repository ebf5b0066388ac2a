"""When to send: pure decisions on monotonic time, and a wall clock that never steps.

Nothing here reads a clock, starts a thread or touches the outbox: the
uploader passes `now` in, so every rule is table-tested. Decisions inside a
process use monotonic time only, so NTP or a VM restore stepping the wall
clock by hours changes nothing. The file still needs wall-clock times (a
retry time and a first attempt that other processes and later runs read):
those come from `SteadyWallClock`, the wall clock as it was when this process
started, advanced by monotonic time.
"""

from __future__ import annotations

import dataclasses
import math
import time

__all__ = [
    "MAX_WAIT",
    "Schedule",
    "SteadyWallClock",
    "head_backoff",
    "next_delay",
    "stored_wait",
]

# The longest wait anything may ask for (a server's Retry-After, a head's
# backoff): a clock far ahead must never make a wait of hours.
MAX_WAIT = 300.0
# A fill wait is never shorter: each look at the file costs a read.
_SHORTEST_FILL_WAIT = 0.002


class SteadyWallClock:
    """Unix time that moves with the monotonic clock: steps of the wall clock don't show."""

    def __init__(self) -> None:
        self._wall, self._monotonic = time.time(), time.monotonic()

    def at(self, monotonic: float) -> float:
        return self._wall + (monotonic - self._monotonic)

    def now(self) -> float:
        return self.at(time.monotonic())


@dataclasses.dataclass
class Schedule:
    """What the uploader remembers between batches, all in monotonic time."""

    paused_until: float = 0.0  # a server's Retry-After pauses every send
    paused_by: str = ""  # the answer that asked for the pause, as the failure says it
    consecutive_failures: int = 0  # whole rounds failed in a row
    gave_up_at: float = -math.inf  # when a round last gave up
    longest_wait: float = 0.0  # of the retry policy, in the current batch

    def pause(self, now: float, seconds: float, answer: str) -> None:
        until = now + min(seconds, MAX_WAIT)
        if until > self.paused_until:
            self.paused_until, self.paused_by = until, answer

    def pause_reason(self, now: float) -> str | None:
        """Why sends wait now, when a server asked for it (for a flush that ends meanwhile)."""
        if self.paused_until <= now:
            return None
        left = math.ceil(self.paused_until - now)  # (never "0s left")
        return f"{self.paused_by} (the server asked to wait: Retry-After, {left}s left)"

    def gave_up(self, now: float, upload_interval: float) -> float:
        """A round ran out of retries at `now`: how long the head waits before the next."""
        self.consecutive_failures += 1
        self.gave_up_at = now
        return head_backoff(self.longest_wait, upload_interval, self.consecutive_failures)


def head_backoff(longest_wait: float, upload_interval: float, failures: int) -> float:
    """How long the head waits after `failures` whole rounds failed in a row.

    The retry policy's longest wait in the round, doubled with each failed
    round, capped.
    """
    base = max(longest_wait, upload_interval, 0.01)
    return min(MAX_WAIT, base * 2.0 ** min(failures, 16))


def stored_wait(next_attempt_at: float | None, wall_now: float) -> float:
    """Seconds until a retry time stored in the file (by any process); 0 when due.

    One further ahead than the longest wait can only come from a clock that
    was ahead when it was stored: it is due now, rather than a wait of hours.
    """
    if next_attempt_at is None or next_attempt_at <= wall_now:
        return 0.0
    wait = next_attempt_at - wall_now
    return 0.0 if wait > MAX_WAIT else wait


def next_delay(
    schedule: Schedule,
    now: float,
    *,
    pending: int,
    oldest_age: float,
    upload_size: int,
    upload_interval: float,
    head_wait: float,
    flush_since: float | None,
) -> float:
    """Seconds to wait before sending the head; 0 means send now.

    `now` is monotonic. `pending`: rows pending, counted up to `upload_size`.
    `oldest_age`: seconds since the oldest was stored (a negative one comes
    from a stepped clock: old enough). `head_wait`: what the head's stored
    retry time asks for (see `stored_wait`). `flush_since`: when the latest
    flush waiting began, or None: a flush sends at once, and retries a head
    that gave up before it began.
    """
    if schedule.paused_until > now:
        return schedule.paused_until - now  # the server said so: a flush waits too
    if pending == 0:
        return upload_interval  # look again for rows that other processes append
    retry_now = flush_since is not None and schedule.gave_up_at < flush_since
    if head_wait > 0 and not retry_now:
        return min(head_wait, MAX_WAIT)
    if flush_since is not None or pending >= upload_size:
        return 0.0
    if 0 <= oldest_age < upload_interval:
        return min(upload_interval - oldest_age, _time_to_fill(pending, oldest_age, upload_size))
    return 0.0


def _time_to_fill(pending: int, oldest_age: float, upload_size: int) -> float:
    """About when a batch filling at the rate seen so far is full: look again then.

    The fill wait is not cut short by new events (a wake-up per track() would
    cost every caller), so under steady load it is guessed from the rate:
    waiting out the whole interval let hundreds pile up behind a batch that
    was full long before.
    """
    guess = (upload_size - pending) * oldest_age / pending
    return max(_SHORTEST_FILL_WAIT, guess)
