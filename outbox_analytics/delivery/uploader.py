"""The uploader: one client's delivery, put together from the parts of this package.

A thin facade with the surface the client uses: `ensure_running()` on every
event, `flush()`, `drain()`, `deliver_now()` (sync_mode), `stop()`, and the
counters stats and the CLI read. The work is done by:
- `BackgroundWorker` (worker.py): the thread, its start, stop and restarts;
- `LeaseHolder` (lease_holder.py): the lease, the batch claimed ahead, turns;
- `next_delay` (schedule.py): whether the head is due, in monotonic time;
- `Rounds` (rounds.py): one batch claimed, sent and settled;
- `Sender` (sender.py): one body, retried; `triage.py`: whom a rejection blames;
- `flushing.py`: flush() and drain(); `sync.py`: sync_mode;
- `peers.py`: the other clients of this process on the file.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import tenacity

from .. import process, servers
from ..errors import OutboxDamaged, RetryableError
from ..request import Requester
from ..store import Outbox
from ..utils import RateLimitedLog
from . import flushing, peers, sync
from .flushing import FlushResult
from .lease_holder import LeaseHolder
from .rounds import Rounds, Tally
from .schedule import Schedule, next_delay, stored_wait
from .sender import DEFAULT_RETRY_WAIT, Interruption, Sender
from .worker import BackgroundWorker

__all__ = ["FlushResult", "Uploader"]

log = logging.getLogger("outbox_analytics")

# How often an idle uploader looks for pending rows behind the claim cursor.
_STRANDED_CHECK_INTERVAL = 60.0


class Uploader:
    """Delivers one outbox file's rows, in order, from one process at a time."""

    def __init__(
        self,
        outbox: Outbox,
        requester_factory: Callable[[], Requester],
        *,
        upload_size: int = 100,
        upload_interval: float = 0.5,
        max_retries: int = 10,
        retry_wait: Callable[[tenacity.RetryCallState], float] = DEFAULT_RETRY_WAIT,
        max_total_backoff_duration: float = 43200,
        on_error: Callable[[Exception, list[dict[str, Any]]], Any] | None = None,
    ) -> None:
        self.outbox = outbox
        self.upload_size = upload_size
        self.upload_interval = upload_interval
        self.schedule = Schedule()
        self.holder = LeaseHolder(outbox)
        self.sender = Sender(
            requester_factory, self.schedule, max_retries=max_retries, retry_wait=retry_wait
        )
        self.rounds = Rounds(
            self.holder,
            self.sender,
            self.schedule,
            lambda: peers.rejections_of(outbox),
            upload_size=upload_size,
            upload_interval=upload_interval,
            max_total_backoff_duration=max_total_backoff_duration,
            on_error=on_error,
        )
        # A rest that only lets a batch fill up is not cut short by each new
        # event (a wake-up per track() costs every caller); a backoff is.
        self.worker = BackgroundWorker(
            self._thread_step,
            self._thread_failed,
            self._thread_ended,
            "uploader",
            short_rest=upload_interval,
        )
        self._stop_requested = Interruption()  # cuts the thread's retry waits short
        self.loop_errors = 0  # unexpected failures of a step (logged, then retried)
        self.stranded_found = 0  # times pending rows were found behind the claim cursor
        self._waiting_for_server = False  # registered to start once the server allows threads
        self._warn_loop = RateLimitedLog()
        self._forget_parent()
        _uploaders.add(self)
        peers.join(self)

    def _forget_parent(self) -> None:
        """Locks a parent's thread may have held at the fork are made anew."""
        self._progress = _Progress()
        self._urgent_lock = threading.Lock()
        self._urgent = 0  # flushes waiting: no fill wait, and a head that gave up goes again
        self._flush_started = 0.0  # monotonic

    # -- what stats, the CLI and tests read ---------------------------------------------

    @property
    def tally(self) -> Tally:
        return self.rounds.tally

    @property
    def sent(self) -> int:
        return self.rounds.tally.sent

    @property
    def dead(self) -> int:
        return self.rounds.tally.dead

    @property
    def failed_rounds(self) -> int:
        return self.rounds.tally.failed_rounds

    @property
    def last_failure(self) -> RetryableError | None:
        return self.rounds.tally.last_failure

    @property
    def running(self) -> bool:
        """Whether the background thread runs in this process."""
        return self.worker.is_running

    @property
    def holds_lease(self) -> bool:
        return self.holder.holds

    # -- the thread ----------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Start the thread if it is not running (not after `stop()`); wake it if it idles."""
        if not self.worker.is_running and not servers.background_thread_allowed():
            self._start_when_allowed()
            return
        self.worker.ensure_running()

    def _start_when_allowed(self) -> None:
        """No thread where the server forbids one (see servers.py).

        In a uWSGI master about to fork its workers, each worker starts the
        thread right after uWSGI forks it; where threads are off, events are
        sent at the process's exit.
        """
        if not self._waiting_for_server:
            self._waiting_for_server = True
            servers.start_after_fork(self.ensure_running)
            servers.deliver_at_exit(self.drain)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread for good after the batch in flight; True if it ended within `timeout`."""
        self._stop_requested.set()
        if self.outbox.in_call_here():  # a signal handler's: the thread may wait for our lock
            self.worker.stop(0)
            return False
        started = time.monotonic()
        if not self.worker.stop(timeout):
            return False  # a request still in flight: the thread gives the lease back after it
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        with self.holder.turn(left) as mine:
            if mine:
                self.holder.give_up()
        self.sender.close()
        return True

    def let_go_at_exit(self) -> None:
        """At exit, a request outlived the budget: its rows (and those claimed ahead) pending now.

        The process ends and its thread with it; left in flight, the rows
        would read as "in flight with no uploader alive" until the next run.
        If the thread still gets its answer before the end, those rows are
        sent again by the next run (same messageIds: the receiver drops them).
        """
        lease = self.holder.lease
        if lease is not None:
            lease.reclaim()

    def _thread_step(self) -> float:
        with self.holder.turn():
            return self.step()

    def _thread_failed(self, exc: BaseException) -> float:
        """A step raised: recover from damage, else count, log (rate-limited) and go on."""
        if isinstance(exc, OutboxDamaged):  # found by a claim or an ack: move it aside, go on
            with self.holder.turn():
                self.recover(exc)
        else:
            self.loop_errors += 1
            suppressed = self._warn_loop.ready()
            if suppressed is not None:
                log.error(
                    "outbox-analytics uploader failed; trying again shortly"
                    " (%d more failures since the last report)",
                    suppressed,
                    exc_info=exc,
                )
            with self.holder.turn():
                self.holder.reclaim()  # rows left in flight mid-batch are ours: pending again
        return max(self.upload_interval, 0.1)

    def _thread_ended(self) -> None:
        """After stop(): the lease goes back now, not when the process exits."""
        with self.holder.turn():
            self.holder.give_up()
        self.sender.close()  # (its request thread too)
        self.notify_progress()

    def recover(self, damage: OutboxDamaged) -> None:
        """Give up the lease, and let the outbox move the damaged file aside and salvage it.

        Inside a turn. Rows we had in flight are salvaged as pending: they
        are sent again (at least once), with the same messageIds.
        """
        self.holder.give_up()
        try:
            self.outbox.recover(damage)
        except Exception:
            self.loop_errors += 1
            log.exception("outbox-analytics: the outbox is damaged and could not be recovered")

    def notify_progress(self) -> None:
        """A batch was settled: flushes waiting look at the file again."""
        self._progress.notify()

    def wait_for_progress(self, seconds: float) -> None:
        self._progress.wait(seconds)

    # -- one step (inside a turn) ---------------------------------------------------------

    def step(self) -> float:
        """Send one batch if one is due; return how long to wait before the next step."""
        if self.holder.take() is None:
            return max(self.upload_interval, 0.5)  # another process uploads; check again later
        now = time.monotonic()
        if self.schedule.paused_until > now:
            return self.schedule.paused_until - now
        if not self.holder.has_ahead:  # (a batch claimed ahead goes at once)
            head = self.outbox.head(self.upload_size)
            if head.pending == 0 and self._found_stranded_rows():
                return 0.0
            wall = time.time()
            delay = next_delay(
                self.schedule,
                now,
                pending=head.pending,
                oldest_age=wall - (head.oldest_enqueued_at or wall),
                upload_size=self.upload_size,
                upload_interval=self.upload_interval,
                head_wait=stored_wait(head.next_attempt_at, self.rounds.clock.now()),
                flush_since=self._flush_started if self._urgent else None,
            )
            if delay > 0:
                return delay
        try:
            self.rounds.run(interrupt=self._stop_requested, claim_ahead=True)
        finally:
            self.notify_progress()
        return 0.0

    def _found_stranded_rows(self) -> bool:
        """With nothing to send: whether pending rows hid below the claim cursor (now found).

        Only another program can put them there (see UploadLease.find_stranded);
        looking reads every row below the cursor, so it is done when idle:
        once per lease, then at most once a minute.
        """
        lease = self.holder.lease
        now = time.monotonic()
        if lease is None or now < lease.next_stranded_check:
            return False
        lease.next_stranded_check = now + _STRANDED_CHECK_INTERVAL
        first = lease.find_stranded()
        if first is None:
            return False
        self.stranded_found += 1
        log.warning(
            "outbox-analytics: pending rows from id %d were behind the claim cursor (another"
            " program changed the outbox); sending them now",
            first,
        )
        return True

    # -- flushing (see flushing.py) -------------------------------------------------------

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until what is pending now is delivered or dead, retries ran out, or timeout."""
        return flushing.flush(self, timeout)

    def drain(
        self,
        timeout: float | None = None,
        progress: Callable[[FlushResult], None] | None = None,
    ) -> FlushResult:
        """Send what is pending now from the calling thread; return when done or stuck."""
        return flushing.drain(self, timeout, progress)

    @contextlib.contextmanager
    def hurry(self, started: float) -> Iterator[None]:
        """While inside: send at once (no fill wait); retry a head that gave up before `started`."""
        with self._urgent_lock:
            self._urgent += 1
            self._flush_started = started
        self.worker.wake()
        try:
            yield
        finally:
            with self._urgent_lock:
                self._urgent -= 1

    # -- sync_mode ------------------------------------------------------------------------

    def deliver_now(self, row_id: int, timeout: float) -> None:
        """sync_mode: return once row `row_id` and all before it are delivered (see sync.py)."""
        process.current_pid()
        sync.deliver_now(self, row_id, timeout)


class _Progress:
    """Wakes the flushes waiting for a batch to be settled.

    Raw locks only, as worker._Bell: a flush interrupted by Ctrl-C must not
    leave a lock held that the uploader's thread then waits on for good.
    """

    def __init__(self) -> None:
        self._waiting: set[threading.Lock] = set()

    def wait(self, seconds: float) -> None:
        bell = threading.Lock()
        bell.acquire()
        self._waiting.add(bell)
        try:
            bell.acquire(timeout=max(0.0, seconds))
        finally:
            self._waiting.discard(bell)

    def notify(self) -> None:
        for bell in list(self._waiting):
            with contextlib.suppress(RuntimeError):  # (woken already)
                bell.release()


_uploaders: weakref.WeakSet[Uploader] = weakref.WeakSet()


def _forget_parents() -> None:
    for uploader in list(_uploaders):
        uploader._forget_parent()


process.on_new_process(_forget_parents)
