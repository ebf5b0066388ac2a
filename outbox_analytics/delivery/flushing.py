"""flush() and drain(): deliver what is pending now, waiting for the thread or sending here.

`flush()` waits for whoever sends (this process's thread, or the process
holding the lease), hurrying it; `drain()` sends from the calling thread,
for programs that exist to deliver. Both read progress from the file, so
they work whichever process uploads, and both measure time on the
monotonic clock only.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import process, servers
from ..errors import OutboxDamaged
from .schedule import stored_wait

if TYPE_CHECKING:
    from .uploader import Uploader

__all__ = ["FlushResult", "drain", "flush", "other_gave_up"]


@dataclasses.dataclass(frozen=True)
class FlushResult:
    """What a flush achieved.

    `sent` and `dead`: rows this process delivered or dead-lettered meanwhile;
    `pending`: rows that were pending when the flush began and still are.
    """

    sent: int
    dead: int
    pending: int


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
        return _as_it_is(uploader)  # from a signal handler: the thread needs our lock
    uploader.ensure_running()
    if not uploader.running:
        if servers.background_thread_allowed():
            return drain(uploader, timeout)
        # A uWSGI master sends nothing (a request of its own could be on
        # the wire when it forks); its workers send what it stored.
        return _as_it_is(uploader)
    deadline = None if timeout is None else time.monotonic() + timeout
    mark = uploader.outbox.last_id()
    started = time.monotonic()
    sent, dead = uploader.sent, uploader.dead
    with uploader.hurry(started):
        while uploader.outbox.unfinished(mark):
            if not uploader.running or uploader.schedule.gave_up_at >= started:
                break
            if other_gave_up(uploader):
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            uploader.wait_for_progress(0.05 if left is None else min(0.05, left))
    left = uploader.outbox.count_unfinished(mark)
    return FlushResult(sent=uploader.sent - sent, dead=uploader.dead - dead, pending=left)


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
    """
    process.current_pid()
    if uploader.outbox.in_call_here():
        return _as_it_is(uploader)  # from a signal handler: this thread holds the file's lock
    deadline = None if timeout is None else time.monotonic() + timeout
    mark = uploader.outbox.last_id()
    started = time.monotonic()
    sent, dead = uploader.sent, uploader.dead
    try:
        while uploader.outbox.unfinished(mark) and uploader.schedule.gave_up_at < started:
            wait = _drain_step(uploader, deadline)
            left = None if deadline is None else deadline - time.monotonic()
            if wait is None or (left is not None and wait >= left):
                break  # the other uploader is backing off, or a pause outlasts the timeout
            time.sleep(wait)
    finally:
        if not uploader.running:  # nobody goes on: the lease and the request thread go
            with uploader.holder.turn():
                uploader.holder.reclaim()
                uploader.holder.give_up()
            uploader.sender.close()
    left = uploader.outbox.count_unfinished(mark)
    return FlushResult(sent=uploader.sent - sent, dead=uploader.dead - dead, pending=left)


def _as_it_is(uploader: Uploader) -> FlushResult:
    """Nothing sent here: what is still to send."""
    return FlushResult(0, 0, uploader.outbox.count_unfinished(uploader.outbox.last_id()))


def _drain_step(uploader: Uploader, deadline: float | None) -> float | None:
    """Send one batch if this process can; else how long to wait (None: stop waiting)."""
    with uploader.holder.turn():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return 0.0  # the caller sees the timeout
        if uploader.holder.take() is None:
            return None if other_gave_up(uploader) else 0.05
        if uploader.schedule.paused_until > now:
            return uploader.schedule.paused_until - now  # a server's Retry-After
        try:
            uploader.rounds.run(deadline=deadline)
        except OutboxDamaged as damage:  # as the thread does: move it aside, salvage, go on
            uploader.recover(damage)
        finally:
            uploader.notify_progress()
        return 0.0


def other_gave_up(uploader: Uploader) -> bool:
    """Another process uploads, and it is backing off: waiting here would not help."""
    if uploader.holder.holds:
        return False
    head = uploader.outbox.head(1)
    return stored_wait(head.next_attempt_at, uploader.rounds.clock.now()) > 0
