"""flush() and drain(): deliver what is pending now, waiting for the thread or sending here.

`flush()` waits for whoever sends (this process's thread, or the process
holding the lease), hurrying it; `drain()` sends from the calling thread,
for programs that exist to deliver. Both read progress from the file, so
they work whichever process uploads, and both measure time on the
monotonic clock only. Both say, in `FlushResult.last_error`, why rows are
still pending, so a caller (the CLI's `drain`) needs no uploader internals.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import process, servers
from ..errors import OutboxDamaged, RetryableError
from ..store.lease import describe_holder
from .schedule import stored_wait

if TYPE_CHECKING:
    from ..store import OutboxStats
    from .uploader import Uploader

__all__ = ["STOPPED", "TIMED_OUT", "FlushResult", "drain", "flush", "other_gave_up"]

# `last_error` when nothing failed: the time given ran out first (the CLI names its --timeout).
TIMED_OUT = "the timeout ran out before the server answered"
STOPPED = "the uploader was stopped (join() or shutdown()) before they were sent"


@dataclasses.dataclass(frozen=True)
class FlushResult:
    """What a flush achieved.

    `sent` and `dead`: rows this process delivered or dead-lettered meanwhile;
    `pending`: rows that were pending when the flush began and still are;
    `last_error`: why they are, in the server's or the network's words
    (None when nothing is left pending).
    """

    sent: int
    dead: int
    pending: int
    last_error: str | None = None


def flush(uploader: Uploader, timeout: float | None = None) -> FlushResult:
    """Wait until every row pending now is delivered or dead, retries ran out, or timeout.

    Works whichever process holds the upload lease: progress is read from
    the file. After `stop()` it sends from the calling thread, as
    `drain()` does; where the server allows no thread (a uWSGI master),
    or from a signal handler whose thread was inside a call on the file (the
    sender needs the lock that thread holds), it sends nothing and returns
    at once.
    """
    if uploader.outbox.in_call_here():
        return _as_it_is(uploader, _IN_A_CALL)  # from a signal handler: the thread needs our lock
    uploader.ensure_running()
    if not uploader.running:
        if servers.background_thread_allowed():
            return drain(uploader, timeout)
        # A uWSGI master sends nothing (a request of its own could be on
        # the wire when it forks); its workers send what it stored.
        return _as_it_is(uploader, "a uWSGI master sends nothing: its workers send what it stored")
    deadline = None if timeout is None else time.monotonic() + timeout
    mark = uploader.outbox.last_id()
    started = time.monotonic()
    counts = _Counts(uploader, mark, deadline=deadline, by_the_thread=True)
    with uploader.hurry(started):
        while uploader.outbox.unfinished(mark):
            if not uploader.running or uploader.schedule.gave_up_at >= started:
                break
            if other_gave_up(uploader):
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            _wait_for_progress_past(
                uploader, mark, started, 0.05 if left is None else min(0.05, left)
            )
    _wait_for_reports(uploader, deadline)
    return counts.result(explain=True)


def _wait_for_reports(uploader: Uploader, deadline: float | None) -> None:
    """Until a failure the file shows was reported to on_error, within the flush's time.

    Code that flushes, then looks at what its on_error collected, finds it
    there (a slow callback made the flush return first).
    """
    wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
    if uploader.holder.reporting.acquire(timeout=wait):
        uploader.holder.reporting.release()


def _wait_for_progress_past(uploader: Uploader, mark: int, started: float, seconds: float) -> None:
    """Wait up to `seconds`, or until a batch settled may have taken the rows up to `mark`.

    A flush wakes after every batch; while this process's uploader has not
    yet claimed past `mark`, rows up to it are still to send, and reading
    the file to learn so took the uploader's lock and interpreter from it
    (a restart drain ran 5 to 10% faster without those reads).
    """
    until = time.monotonic() + seconds
    while True:
        uploader.wait_for_progress(until - time.monotonic())
        if time.monotonic() >= until or not uploader.running:
            return
        if uploader.schedule.gave_up_at >= started or not uploader.holder.claimed_below(mark):
            return


def drain(
    uploader: Uploader,
    timeout: float | None = None,
    progress: Callable[[FlushResult], None] | None = None,
) -> FlushResult:
    """Send what is pending now from the calling thread; return when done or stuck.

    Returns when every row pending at the call is delivered or dead, when
    a round of retries ran out, or at `timeout` (no request outlives it).
    While another process holds the lease, waits for it instead, as flush()
    does. However it ends (KeyboardInterrupt included), this thread's rows
    in flight go back to pending and, unless the background thread goes
    on with it, the lease is given back.

    `progress`, if given, is called on this thread with the counts so far
    (a FlushResult without `last_error`) after each batch sent here, and
    once more as the drain ends if they changed since, an interruption
    included: its last call says what got through.
    """
    process.current_pid()
    if uploader.outbox.in_call_here():
        return _as_it_is(uploader, _IN_A_CALL)  # from a signal handler: we hold the file's lock
    deadline = None if timeout is None else time.monotonic() + timeout
    mark = uploader.outbox.last_id()
    started = time.monotonic()
    counts = _Counts(uploader, mark, progress, deadline)
    try:
        while uploader.outbox.unfinished(mark) and uploader.schedule.gave_up_at < started:
            wait = _drain_step(uploader, deadline)
            if wait == _SENT:
                counts.report()
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if wait is None or (left is not None and wait >= left):
                break  # the other uploader is backing off, or a pause outlasts the timeout
            time.sleep(wait)
    finally:
        if not uploader.running:  # nobody goes on: the lease and the request thread go
            _give_back(uploader, deadline)
        counts.report_if_changed()  # (on an interruption too: what got through)
    return counts.result(explain=True)


def _give_back(uploader: Uploader, deadline: float | None) -> None:
    """A drain ends with no thread to go on: rows in flight pending again, the lease given back.

    Unless another thread of ours is sending in a drain of its own (it holds
    the turn, and gives everything back as its drain ends): never waited for
    past the deadline.
    """
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    with uploader.holder.turn(left) as mine:
        if not mine:
            return
        uploader.holder.reclaim()
        uploader.holder.give_up()
    uploader.sender.close()


_IN_A_CALL = "not sent: called from inside a call on the outbox (a signal handler?)"
_TURN_WAIT = 0.05  # seconds a drain step waits for the turn before looking again
_SENT = -1.0  # _drain_step ran a batch: go on at once


class _Counts:
    """What one flush or drain did so far: this process's tally since it began."""

    def __init__(
        self,
        uploader: Uploader,
        mark: int,
        progress: Callable[[FlushResult], None] | None = None,
        deadline: float | None = None,
        by_the_thread: bool = False,
    ) -> None:
        self.uploader, self.mark, self.progress = uploader, mark, progress
        self.deadline = deadline
        self.by_the_thread = by_the_thread  # a flush waiting for the background thread
        tally = uploader.tally
        self.sent, self.dead, self.failed_rounds = tally.sent, tally.dead, tally.failed_rounds
        self.failed_attempts = tally.failed_attempts
        self.reported: FlushResult | None = None

    def result(self, explain: bool = False) -> FlushResult:
        tally, holder = self.uploader.tally, self.uploader.holder
        with holder.deleting:  # (no batch half counted as sent, half deleted)
            sent, dead = tally.sent - self.sent, tally.dead - self.dead
            pending = self.uploader.outbox.count_unfinished(self.mark)
        why = self._why_pending() if explain and pending else None
        return FlushResult(sent, dead, pending, why)

    def report(self) -> None:
        if self.progress is None:
            return
        # Recorded before the call: a callback that raises is not called again.
        self.reported = self.result()
        self.progress(self.reported)

    def report_if_changed(self) -> None:
        if self.progress is not None and self.result() != self.reported:
            self.report()

    def _why_pending(self) -> str:
        """Why rows are left: this call's last failure (with the server's body), else the file's."""
        paused = self.uploader.schedule.pause_reason(time.monotonic())
        if paused is not None:
            return paused  # the server asked us to wait longer than this call's time
        tally = self.uploader.tally
        if tally.last_failure is not None and tally.failed_rounds != self.failed_rounds:
            return _in_words(tally.last_failure)
        retried = tally.last_attempt_failure
        if retried is not None and tally.failed_attempts != self.failed_attempts:
            return f"{_in_words(retried)} (still being retried)"  # the time ran out meanwhile
        if self.by_the_thread and not self.uploader.running:
            return STOPPED
        stats = self.uploader.outbox.stats()
        if stats.uploader_alive and not self.uploader.holder.holds:
            return another_holder(stats)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return TIMED_OUT  # this call's time ran out: an earlier run's error would mislead
        return stats.head_last_error or TIMED_OUT


def another_holder(stats: OutboxStats) -> str:
    """Rows another process is to send: which one, and whether it can (a stopped one cannot)."""
    who = describe_holder(stats)
    if stats.uploader_stopped:
        return (
            f"another process ({who}) holds the upload lease: they are sent once it runs again"
            f" (kill -CONT {stats.uploader_pid}) or exits"
        )
    if stats.uploader_pid is None:  # it did not note itself, as ours do
        return (
            "another process holds the upload lease without saying which (an older release"
            " of this library, or a program holding a lock on the file): they are sent once"
            " it lets go"
        )
    return f"another process ({who}) holds the upload lease and is sending them"


def _in_words(failure: RetryableError) -> str:
    """A failure as the server or the network put it, with the server's answer."""
    body = failure.body if failure.body and failure.body not in str(failure) else ""
    return f"{failure}: {body}" if body else str(failure)


def _as_it_is(uploader: Uploader, why: str) -> FlushResult:
    """Nothing sent here: what is still to send."""
    pending = uploader.outbox.count_unfinished(uploader.outbox.last_id())
    return FlushResult(0, 0, pending, why if pending else None)


def _drain_step(uploader: Uploader, deadline: float | None) -> float | None:
    """Send one batch if this process can (_SENT); else how long to wait (None: stop waiting)."""
    # The turn is waited for briefly: this client's thread, sending, takes it
    # back batch after batch, and an unbounded wait outlived the timeout.
    left = _TURN_WAIT if deadline is None else min(_TURN_WAIT, deadline - time.monotonic())
    with uploader.holder.turn(left) as mine:
        if not mine:
            return 0.0  # the thread is sending: the caller looks at the file and the time again
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return 0.0  # the caller sees the timeout
        if uploader.holder.take() is None:
            return None if other_gave_up(uploader) else 0.05
        if uploader.schedule.paused_until > now:
            return uploader.schedule.paused_until - now  # a server's Retry-After
        try:
            claimed = uploader.rounds.run(deadline=deadline, claim_ahead=True)
        except OutboxDamaged as damage:  # as the thread does: move it aside, salvage, go on
            uploader.recover(damage)
            return 0.0
        finally:
            uploader.notify_progress()
        return _SENT if claimed else 0.0


def other_gave_up(uploader: Uploader) -> bool:
    """Another process uploads, and it is backing off: waiting here would not help."""
    if uploader.holder.holds or uploader.outbox.lease_is_free():
        return False  # (free: no one backs off; this process's thread is about to take it)
    head = uploader.outbox.head(1)
    return stored_wait(head.next_attempt_at, uploader.rounds.clock.now()) > 0
