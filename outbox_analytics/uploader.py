"""The uploader: sends the outbox's rows in order, acknowledging only after a 2xx.

One background thread per client, a thin loop around `step()`, which decides
whether to send now and calls `run_once()`: claim the oldest rows, send them,
acknowledge, dead-letter or release them. Tests, `sync_mode` and the CLI call
these steps directly. This is the only module that uses both the outbox and
the requester.

Failures never leave the outbox:
- a retryable failure (network, timeout, 5xx, 429...) is retried with the
  tenacity policy; when retries run out the rows go back to pending, in place,
  with their attempts and last error, and the head waits before the next try;
- a rejection (400, 413...) splits the batch until the offending events are
  found; only they move to the dead-letter state, the rest is delivered in order.
  When every event is rejected alike, the rejection is about the endpoint (a
  wrong host, path or key), not the events: they stay pending (EndpointRejected).

sync_mode works next to anything on the same file (threads, background
clients, other processes): a caller sends when its process can hold the
lease, one thread at a time, and otherwise sleeps while the holder sends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import tenacity

from .errors import (
    APIError,
    DeliveryError,
    EndpointRejected,
    OutboxDamaged,
    OutboxError,
    RetryableError,
)
from .request import (
    MAX_BATCH_BYTES,
    MAX_RETRY_AFTER,
    Requester,
    encode_batch,
    encode_messages,
)
from .store import Outbox, Row, UploadLease
from .store.maintenance import find
from .utils import RateLimitedLog, utc_now_iso

__all__ = ["DEFAULT_RETRY_WAIT", "FlushResult", "Uploader"]

log = logging.getLogger("outbox_analytics")

# Segment-like: 0.5 s, 1 s, 2 s ... capped at a minute, plus up to 1 s of jitter
# so that many clients recovering from one outage do not retry in step.
DEFAULT_RETRY_WAIT: tenacity.wait.wait_base = tenacity.wait_exponential(
    multiplier=0.5, max=60
) + tenacity.wait_random(0, 1)
# How often an idle uploader looks for pending rows behind the claim cursor.
_STRANDED_CHECK_INTERVAL = 60.0
# The body without its messages: {"batch":[],"sentAt":"...","writeKey":...}.
_BODY_OVERHEAD = 64


@dataclasses.dataclass(frozen=True)
class FlushResult:
    """What a flush achieved.

    `sent` and `dead`: rows this process delivered or dead-lettered meanwhile;
    `pending`: rows that were pending when the flush began and still are.
    """

    sent: int
    dead: int
    pending: int


class _Stopping(Exception):
    """Raised inside a send when the uploader is asked to stop: not a failure."""


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
        self.requester_factory = requester_factory
        self.upload_size = upload_size
        self.upload_interval = upload_interval
        self.max_retries = max_retries
        self.retry_wait = retry_wait
        self.max_total_backoff_duration = max_total_backoff_duration
        self.on_error = on_error
        self.sent = 0  # rows acknowledged by the server, by this process
        self.dead = 0  # rows this process moved to the dead-letter state
        self.failed_rounds = 0  # times retries ran out
        self.loop_errors = 0  # unexpected failures of a step (logged, then retried)
        self.stranded_found = 0  # times pending rows were found behind the claim cursor
        self.last_failure: RetryableError | None = None  # of the last round that gave up
        self._rejections = _rejections_of(outbox.path)  # shared by the file's clients here
        self._reset_process_state()
        _uploaders.add(self)

    def _reset_process_state(self) -> None:
        """Everything that must not cross a fork: thread, events, HTTP session."""
        self._pid = os.getpid()
        self._lease: UploadLease | None = None  # the parent's lease is not ours
        self._requester: Requester | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Only the thread of the current generation loops, and one step at a
        # time: a start interrupted halfway (KeyboardInterrupt) can leave a
        # thread that looked dead when it was only starting.
        self._generation = 0
        self._step_lock = threading.Lock()
        self._idle = False  # in a wait longer than upload_interval: new events wake it
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._urgent = 0  # flushes waiting: skip the fill and backoff waits
        self._urgent_lock = threading.Lock()
        self._flush_started = 0.0
        self._consecutive_failures = 0
        self._longest_wait = 0.0  # of the retry policy, in the current batch
        # The batch after the one being sent, claimed while its request was on
        # the wire (see _prefetch); with the lease it was claimed under.
        self._prefetched: tuple[UploadLease, list[Row]] | None = None
        self.paused_until = 0.0  # monotonic time: a server's Retry-After pauses everything
        self.gave_up_at = 0.0  # unix time retries last ran out
        self._warn_exhausted = RateLimitedLog()
        self._warn_dead = RateLimitedLog()
        self._warn_loop = RateLimitedLog()

    @property
    def requester(self) -> Requester:
        if self._requester is None:
            self._requester = self.requester_factory()
        return self._requester

    # -- the thread ---------------------------------------------------------------

    def ensure_running(self) -> None:
        """Start the thread if it is not running: at first, in a forked child, after it died.

        Under a lock: threads making a client's first calls together start one thread.
        """
        if self._pid != os.getpid():
            self._reset_process_state()  # the parent's thread does not exist here
        thread = self._thread
        if thread is not None and thread.is_alive():
            if self._idle:
                self._wake.set()  # new events: no need to sleep out a long wait
            return
        with self._start_lock:
            thread = self._thread
            if (thread is None or not thread.is_alive()) and not self._stopping.is_set():
                if thread is not None:
                    log.error("outbox-analytics uploader thread had ended; starting a new one")
                self._generation += 1
                self._thread = threading.Thread(
                    target=self._loop,
                    args=(self._generation,),
                    name="outbox-analytics-uploader",
                    daemon=True,
                )
                self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()

    def _loop(self, generation: int) -> None:
        # Step aside first: Thread.start() returns only once this thread has
        # run, and while it keeps the GIL the starting thread (a caller's
        # first track()) waits out the 5 ms switch interval.
        time.sleep(0.001)
        while not self._stopping.is_set() and generation == self._generation:
            try:
                with self._step_lock:
                    if generation != self._generation:
                        break  # a newer thread took over
                    delay = self.step()
            except OutboxDamaged as damage:  # found by a claim or an ack: recover, go on
                self._recover(damage)
                delay = max(self.upload_interval, 0.1)
            except BaseException:  # the loop outlives every failure; each one is counted
                self.loop_errors += 1
                suppressed = self._warn_loop.ready()  # and logged, at most every 10 s
                if suppressed is not None:
                    log.exception(
                        "outbox-analytics uploader failed; trying again shortly"
                        " (%d more failures since the last report)",
                        suppressed,
                    )
                delay = max(self.upload_interval, 0.1)
                self._take_back_inflight()
            if delay > 0:
                # Bounded: a clock far ahead must never make a wait that
                # overflows, or one that outlasts the longest backoff.
                self._idle = delay > self.upload_interval
                self._wake.wait(min(delay, MAX_RETRY_AFTER))
                self._idle = False
                self._wake.clear()
        if self._stopping.is_set():
            # stop() may have stopped waiting for us (a request in flight):
            # the lease goes back now, not when the process exits.
            self._give_up_lease()
        self._notify()

    def _recover(self, damage: OutboxDamaged) -> None:
        """The file is damaged: give up the lease, and let the outbox move it aside and salvage it.

        Rows we had in flight are salvaged as pending: they are sent again
        (at least once), with the same messageIds.
        """
        self._give_up_lease()
        try:
            self.outbox.recover(damage)
        except Exception:
            self.loop_errors += 1
            log.exception("outbox-analytics: the outbox is damaged and could not be recovered")

    def _take_back_inflight(self) -> None:
        """After a failure mid-batch (a full disk, say), rows may be left in flight.

        We hold the lease, so every in-flight row is ours: make them pending
        again, or they would wait for the next process to start.
        """
        self._prefetched = None  # (reclaimed with the rest)
        try:
            if self._lease is not None:
                self._lease.reclaim()
        except Exception:
            log.debug("could not take back in-flight rows yet", exc_info=True)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop after the batch in flight; True if the thread ended within `timeout`."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                return False  # a request still in flight: the thread gives the lease back after it
        self._give_up_lease()
        if self._requester is not None:
            self._requester.close()
            self._requester = None
        return True

    @property
    def holds_lease(self) -> bool:
        return self._lease is not None

    def _take_lease(self) -> UploadLease | None:
        """The upload lease: kept while valid, else taken again if nobody holds it."""
        if self._lease is not None and not self._lease.valid:
            self._give_up_lease()  # the file was moved aside, or we were forked
        if self._lease is None:
            self._lease = self.outbox.try_lease()
        return self._lease

    def _give_up_lease(self) -> None:
        self._release_prefetched()
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.close()

    def _notify(self) -> None:
        with self._progress:
            self._progress.notify_all()

    # -- one step -----------------------------------------------------------------

    def step(self) -> float:
        """Send one batch if one is due; return how long to wait before the next step."""
        if self._take_lease() is None:
            return max(self.upload_interval, 0.5)  # another process uploads; check again later
        paused = self.paused_until - time.monotonic()
        if paused > 0:
            return paused
        if self._prefetched is not None:  # the next batch is claimed: it goes now
            self.run_once(prefetch=True)
            return 0.0
        now = time.time()
        head = self.outbox.head(self.upload_size)
        if head.pending == 0:
            if self._found_stranded_rows():
                return 0.0
            return self.upload_interval  # wake up for rows that other processes append
        # A flush sends at once, and retries a head that failed before it began.
        flushing = self._urgent > 0
        retry_now = flushing and self.gave_up_at < self._flush_started
        wait = _wall_clock_wait(head.next_attempt_at, now)
        if wait > 0 and not retry_now:
            return wait
        # Rows stored while the clock was ahead look young: count them as old enough.
        age = now - (head.oldest_enqueued_at or now)
        if age < 0:
            age = self.upload_interval
        if head.pending < self.upload_size and age < self.upload_interval and not flushing:
            return self.upload_interval - age  # let the batch fill up
        self.run_once(prefetch=True)
        return 0.0

    def _found_stranded_rows(self) -> bool:
        """With nothing to send: whether pending rows hid below the claim cursor (now found).

        Only another program can put them there (see UploadLease.find_stranded);
        looking reads every row below the cursor, so it is done when idle:
        once per lease, then at most once a minute.
        """
        lease = self._lease
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

    def run_once(self, deadline: float | None = None, prefetch: bool = False) -> int:
        """Claim the oldest rows and deliver them. Returns how many rows were claimed.

        Raises nothing for delivery failures: they are recorded in the outbox,
        logged and reported to `on_error`. `deadline` (monotonic time) bounds
        the retries, for sync_mode. With `prefetch` (the background thread),
        the next batch is claimed while this one's request is on the wire.
        """
        lease = self._lease
        if lease is None:
            return 0
        rows = self._take_prefetched(lease) or lease.claim(
            self.upload_size, max_bytes=MAX_BATCH_BYTES
        )
        if not rows:
            return 0
        batch = _Batch(lease, rows, prefetch=prefetch)
        self._longest_wait = 0.0
        try:
            self._fit_body(batch)
            self._deliver(batch, batch.rows, deadline)
        except _Stopping:
            self._release(batch, None)
        except RetryableError as exc:
            self._give_up_for_now(batch, exc)
        except BaseException:
            self._release(batch, None)
            raise
        finally:
            if batch.released_any or len(batch.finished) < len(batch.rows):
                self._release_prefetched()  # it must not overtake what goes back to pending
            self._notify()
        return len(rows)

    def _prefetch(self) -> None:
        """While a batch is on the wire, claim the next one (on the uploading thread).

        The receiver's work on one batch then overlaps ours on the next (claim,
        decode), instead of each waiting for the other: measured, a restart
        drain went from 15,500 to 21,700 events/s. Order holds: the next batch goes
        only once this one is done, and goes back to pending (released in
        place) if any of this one does.
        """
        lease = self._lease
        if self._prefetched is not None or lease is None:
            return
        try:
            rows = lease.claim(self.upload_size, max_bytes=MAX_BATCH_BYTES)
        except Exception:  # (a busy or damaged file): the next run_once claims as usual
            log.debug("could not claim the next batch ahead", exc_info=True)
            return
        if rows:
            self._prefetched = (lease, rows)

    def _take_prefetched(self, lease: UploadLease) -> list[Row]:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None:
            return []
        if prefetched[0] is not lease:  # claimed under a lease since lost: reclaimed by its holder
            return []
        return prefetched[1]

    def _release_prefetched(self) -> None:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None:
            return
        lease, rows = prefetched
        try:
            lease.release([row.id for row in rows], attempts=0)
        except Exception:  # left in flight: the next holder of the lease reclaims them
            log.debug("could not put back the batch claimed ahead", exc_info=True)

    def _fit_body(self, batch: _Batch) -> None:
        """Keep the JSON body under the hard limit; put back the rows that do not fit.

        JSON is at most 8 bytes per stored msgpack byte (see client.py), so a
        batch whose stored size is under an eighth of the limit needs no
        measuring; otherwise each message is measured as JSON.
        """
        budget = MAX_BATCH_BYTES - _BODY_OVERHEAD - len(self.requester.write_key)
        if 8 * sum(row.size for row in batch.rows) <= budget:
            return
        total = 0
        for index, row in enumerate(batch.rows):
            total += len(encode_messages([row.message])) - 1  # less [], plus a comma
            if total > budget:
                rest = batch.rows[index:]
                if index == 0:  # alone too large: it can never be sent
                    error = APIError(413, "too_large", "message larger than the batch limit")
                    self._bury(batch, [row], error)
                    rest = batch.rows[1:]
                batch.lease.release([r.id for r in rest], attempts=0)  # next batch
                batch.rows = batch.rows[:index]
                return

    def _deliver(
        self,
        batch: _Batch,
        rows: Sequence[Row],
        deadline: float | None,
        endpoint_judges_events: bool = False,
    ) -> None:
        """Send `rows`; on a rejection, split them until the offending ones are found.

        Rejected rows are dead-lettered once the whole batch is done, and only
        when the rejection is about them. Every row rejected alike means the
        endpoint is wrong (a host, path or key answering 4xx to anything): the
        rows stay pending and EndpointRejected is raised. A lone row cannot
        tell; the second lone row in a row rejected alike can.
        `endpoint_judges_events`: another event was just accepted (or rejected
        otherwise), so every rejection is about its event.
        """
        rows = list(rows)
        memory = self._rejections
        if memory.is_same_head(rows) and not endpoint_judges_events:
            self._resend_same_head(batch, rows, deadline)
            return
        rejected: list[tuple[Row, APIError]] = []
        self._send_or_split(batch, rows, deadline, rejected)
        if not rejected:
            return
        keys = {_rejection_key(exc) for _, exc in rejected}
        if len(rejected) == len(rows) and len(keys) == 1 and not endpoint_judges_events:
            key = keys.pop()
            if len(rows) > 1 or key == memory.lone:
                memory.endpoint = (key, rows[0].id, rows[-1].id)
                raise _endpoint_error(rejected[0][1])
            memory.lone = key
        for same in _by_rejection(rejected):
            self._bury(batch, [row for row, _ in same], same[0][1])

    def _resend_same_head(self, batch: _Batch, rows: list[Row], deadline: float | None) -> None:
        """The rows that were each rejected alike last time: still so, and is the endpoint to blame?

        Sent once, whole; rejected alike again, the next pending event is sent
        alone. Accepted (or rejected otherwise), it proves the endpoint judges
        events: the head is split again, and only its events rejected now move
        to the dead-letter state (the endpoint may have recovered meanwhile;
        those then arrive after the one that was asked about). Rejected alike,
        all stay pending.
        """
        assert self._rejections.endpoint is not None
        batch.prefetch = False  # the event after the head is the one to ask about
        key = self._rejections.endpoint[0]
        try:
            self._send(batch, rows, deadline)
        except APIError as exc:
            if _rejection_key(exc) != key:
                self._rejections.endpoint = None  # the answer changed: find out anew
                self._deliver(batch, rows, deadline)
                return
            self._ask_about_the_next_event(batch, rows, exc, deadline)
            return
        self._acknowledge(batch, rows)

    def _ask_about_the_next_event(
        self, batch: _Batch, head: list[Row], exc: APIError, deadline: float | None
    ) -> None:
        following = batch.lease.claim(1)
        if not following:
            raise _endpoint_error(exc)
        probe = following[0]
        batch.rows.append(probe)
        batch.attempts[probe.id] = 0
        try:
            self._send(batch, [probe], deadline)
        except APIError as other:
            if _rejection_key(other) == _rejection_key(exc):
                raise _endpoint_error(exc) from None
            self._bury(batch, [probe], other)
        else:
            self._acknowledge(batch, [probe])
        self._rejections.forget()
        self._deliver(batch, head, deadline, endpoint_judges_events=True)

    def _send_or_split(
        self,
        batch: _Batch,
        rows: Sequence[Row],
        deadline: float | None,
        rejected: list[tuple[Row, APIError]],
    ) -> None:
        """Send `rows`; acknowledge them, or split a rejected batch, noting rejected rows."""
        try:
            self._send(batch, rows, deadline)
        except APIError as exc:
            if len(rows) == 1:
                rejected.append((rows[0], exc))
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise RetryableError(
                    f"timed out while finding which events were rejected ({_error_text(exc)})",
                    status=exc.status,
                ) from None
            middle = len(rows) // 2
            self._send_or_split(batch, rows[:middle], deadline, rejected)
            self._send_or_split(batch, rows[middle:], deadline, rejected)
            return
        self._acknowledge(batch, rows)

    def _acknowledge(self, batch: _Batch, rows: Sequence[Row]) -> None:
        ids = [row.id for row in rows]
        batch.lease.ack(ids)
        batch.finished.update(ids)
        self.sent += len(ids)
        self._consecutive_failures = 0
        self._rejections.forget()  # the endpoint accepts events

    def _send(self, batch: _Batch, rows: Sequence[Row], deadline: float | None) -> None:
        """One sub-batch, retried by tenacity until a 2xx, a rejection, or the budget ends."""
        messages = encode_messages([row.message for row in rows])  # once for all attempts
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(self.max_retries + 1)
        wait: Callable[[tenacity.RetryCallState], float] = self._wait
        if deadline is not None:
            stop = stop | _stop_at(deadline)

            def wait(state: tenacity.RetryCallState) -> float:
                return max(0.0, min(self._wait(state), deadline - time.monotonic()))

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetryableError),
            stop=stop,
            wait=wait,
            sleep=tenacity.nap.sleep_using_event(self._stopping),  # shutdown cuts a wait short
            before_sleep=_log_retry,
            reraise=True,
        )
        last_failure: RetryableError | None = None
        for attempt in retrying:
            with attempt:
                if self._stopping.is_set() and deadline is None:
                    raise _Stopping()
                if deadline is not None and time.monotonic() >= deadline:
                    # The cause to report is the last real failure, not the deadline.
                    raise last_failure or RetryableError("the deadline passed before the request")
                for row in rows:
                    batch.attempts[row.id] += 1
                number = attempt.retry_state.attempt_number
                body = encode_batch(messages, utc_now_iso(), self.requester.write_key)
                # The messages only: the body also holds the write key.
                if log.isEnabledFor(logging.DEBUG):
                    text = messages.decode()
                    log.debug("sending %d messages (attempt %d): %s", len(rows), number, text)
                # Claiming the next batch meanwhile: only while the whole batch
                # goes out (not the halves of a rejected one), and once.
                ahead = batch.prefetch and number == 1 and len(rows) == len(batch.rows)
                try:
                    self.requester.send(
                        body,
                        retry_count=number - 1,
                        deadline=deadline,
                        meanwhile=self._prefetch if ahead else None,
                    )
                except RetryableError as failure:
                    last_failure = failure
                    raise

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """The retry policy's wait, floored by the server's Retry-After (which pauses all)."""
        wait = self.retry_wait(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            self.paused_until = max(self.paused_until, time.monotonic() + retry_after)
        wait = max(wait, self.paused_until - time.monotonic())
        self._longest_wait = max(self._longest_wait, wait)
        return wait

    # -- outcomes -----------------------------------------------------------------

    def _bury(self, batch: _Batch, rows: Sequence[Row], exc: DeliveryError) -> None:
        ids = [row.id for row in rows]
        for attempts, same in _by_attempts(batch, ids).items():
            batch.lease.dead_letter(
                same,
                attempts=attempts,
                status=exc.status,
                error=_error_text(exc),
                first_attempt_at=batch.claimed_at,
            )
        batch.finished.update(ids)
        self.dead += len(ids)
        suppressed = self._warn_dead.ready()
        if suppressed is not None:
            log.error(
                "%d event(s) rejected and moved to the dead-letter state: %s"
                " (%d more since the last report)",
                len(ids), _error_text(exc), suppressed,
            )  # fmt: skip
        self._report(exc, rows)

    def _give_up_for_now(self, batch: _Batch, exc: RetryableError) -> None:
        """Retries ran out: put the rows back, in place, and make the head wait."""
        self.failed_rounds += 1
        self._consecutive_failures += 1
        self.last_failure = exc
        self.gave_up_at = time.time()
        too_old = [
            row
            for row in batch.rows
            if row.id not in batch.finished
            and row.first_attempt_at is not None
            and self.gave_up_at - row.first_attempt_at >= self.max_total_backoff_duration
        ]
        if too_old:
            expired = RetryableError(
                f"gave up after {self.max_total_backoff_duration:.0f}s of retries:"
                f" {_error_text(exc)}",
                status=exc.status,
            )
            self._bury(batch, too_old, expired)
        unfinished = [row for row in batch.rows if row.id not in batch.finished]
        self._release(batch, exc)
        suppressed = self._warn_exhausted.ready()
        if suppressed is not None:
            log.warning(
                "could not deliver %d event(s) after %d attempts: %s; they stay in the"
                " outbox and will be retried (%d more such reports suppressed)",
                len(unfinished), self.max_retries + 1, _error_text(exc), suppressed,
            )  # fmt: skip
        self._report(exc, unfinished)

    def _release(self, batch: _Batch, exc: RetryableError | None) -> None:
        """Return every row of the batch not yet finished to pending."""
        now = time.time()
        backoff = self._head_backoff()
        unfinished = [row.id for row in batch.rows if row.id not in batch.finished]
        batch.released_any = batch.released_any or bool(unfinished)
        for attempts, ids in _by_attempts(batch, unfinished).items():
            batch.lease.release(
                ids,
                attempts=attempts,
                status=exc.status if exc else None,
                error=_error_text(exc) if exc else None,
                next_attempt_at=now + backoff if exc else None,
                first_attempt_at=batch.claimed_at,
            )
        batch.finished.update(row.id for row in batch.rows)

    def _head_backoff(self) -> float:
        """How long the head waits after a whole round of retries failed.

        Derived from the retry policy (its longest wait in the round), doubling
        with each round that fails in a row, capped like Retry-After.
        """
        base = max(self._longest_wait, self.upload_interval, 0.01)
        return min(MAX_RETRY_AFTER, base * 2.0 ** min(self._consecutive_failures, 16))

    def _report(self, exc: Exception, rows: Sequence[Row]) -> None:
        if self.on_error is None:
            return
        try:
            self.on_error(exc, [row.message for row in rows])
        except BaseException:  # even SystemExit: the callback must not stop delivery
            log.exception("on_error raised; delivery goes on")

    # -- flushing -----------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until every row pending now is delivered or dead, retries ran out, or timeout.

        Works whichever process holds the upload lease: progress is read from
        the file. Without a running uploader here it does not wait for one.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        mark = self.outbox.last_id()
        started = time.time()
        sent, dead = self.sent, self.dead
        with self._hurry(started):
            while self.outbox.unfinished(mark):
                if not self.running or self.gave_up_at >= started or self._other_gave_up():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                with self._progress:
                    self._progress.wait(0.05 if left is None else min(0.05, left))
        left = self.outbox.count_unfinished(mark)
        return FlushResult(sent=self.sent - sent, dead=self.dead - dead, pending=left)

    def drain(self, timeout: float | None = None) -> FlushResult:
        """Send what is pending now from the calling thread; return when done or stuck.

        Returns when every row pending at the call is delivered or dead, when
        a round of retries ran out, or at `timeout` (no request outlives it).
        While another process holds the lease, waits for it instead, as flush()
        does. However it ends (KeyboardInterrupt included), this thread's rows
        in flight go back to pending and, unless the background thread goes
        on with it, the lease is given back.
        """
        if self._pid != os.getpid():
            self._reset_process_state()
        deadline = None if timeout is None else time.monotonic() + timeout
        mark = self.outbox.last_id()
        started = time.time()
        sent, dead = self.sent, self.dead
        try:
            while self.outbox.unfinished(mark) and self.gave_up_at < started:
                wait = self._drain_step(deadline)
                left = None if deadline is None else deadline - time.monotonic()
                if wait is None or (left is not None and wait >= left):
                    break  # the other uploader is backing off, or a pause outlasts the timeout
                time.sleep(wait)
        finally:
            if not self.running:
                self._take_back_inflight()
                self._give_up_lease()
        left = self.outbox.count_unfinished(mark)
        return FlushResult(sent=self.sent - sent, dead=self.dead - dead, pending=left)

    def _drain_step(self, deadline: float | None) -> float | None:
        """Send one batch if this process can; else how long to wait (None: stop waiting)."""
        with self._step_lock:
            if deadline is not None and time.monotonic() >= deadline:
                return 0.0  # the caller sees the timeout
            if self._take_lease() is None:
                return None if self._other_gave_up() else 0.05
            paused = self.paused_until - time.monotonic()
            if paused > 0:
                return paused  # a server's Retry-After
            try:
                self.run_once(deadline)
            except OutboxDamaged as damage:  # as the thread does: move it aside, salvage, go on
                self._recover(damage)
            return 0.0

    @contextlib.contextmanager
    def _hurry(self, started: float) -> Iterator[None]:
        """While inside: send at once (no fill wait); retry a head that failed before `started`."""
        with self._urgent_lock:
            self._urgent += 1
            self._flush_started = started
        self._wake.set()
        try:
            yield
        finally:
            with self._urgent_lock:
                self._urgent -= 1

    def _other_gave_up(self) -> bool:
        """Another process uploads, and it is backing off: waiting here would not help."""
        if self._lease is not None:
            return False
        next_attempt = self.outbox.head(1).next_attempt_at
        return next_attempt is not None and next_attempt > time.time()

    # -- sync_mode ------------------------------------------------------------------

    def deliver_now(self, row_id: int, timeout: float) -> None:
        """sync_mode: return once row `row_id` and every row before it are delivered.

        Raises DeliveryError, and no other error, when that fails or takes
        longer than `timeout`; the event then stays in the outbox. Whoever can
        send does: this thread when its process can hold the file's lease (the
        threads of a client take turns), else the holder (another client of
        this process, hurried, or another process) while this thread sleeps.
        The lease is given back after the call, so that background clients and
        other processes can send between calls.
        """
        if self._pid != os.getpid():
            self._reset_process_state()
        deadline = time.monotonic() + timeout
        started = time.time()
        try:
            with contextlib.ExitStack() as hurried:
                for other in _uploaders_of(self.outbox.path, but=self):
                    hurried.enter_context(other._hurry(started))
                self._wait_until_delivered(row_id, deadline, timeout, started)
            dead = find(self.outbox, row_id)
        except DeliveryError:
            raise
        except OutboxError as exc:
            raise RetryableError(f"{exc}; the event stays in the outbox") from exc
        except Exception as exc:  # a bug of ours or of a transport: still a delivery failure
            log.exception("outbox-analytics: sending in sync_mode failed")
            raise RetryableError(f"delivery failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._let_go_of_lease()
        if dead is not None and dead.state == "dead":
            status = dead.last_status or 400
            raise APIError(status, "rejected", f"the event was dead-lettered: {dead.last_error}")

    def _wait_until_delivered(
        self, row_id: int, deadline: float, timeout: float, started: float
    ) -> None:
        pause = 0.002  # polls of the file while another sender works: sleeps, growing to 50 ms
        while self.outbox.unfinished(row_id):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RetryableError(
                    f"not delivered within {timeout}s; the event stays in the outbox"
                )
            if self._send_in_turn(row_id, deadline):
                pause = 0.002
                continue
            self._raise_if_sender_failing(started)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)

    def _send_in_turn(self, row_id: int, deadline: float) -> bool:
        """Send one batch once the other threads of this client are done, if this process can."""
        if not self._step_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            if time.monotonic() >= deadline:
                return False  # our turn came too late: the caller raises its timeout
            if not self.outbox.unfinished(row_id):
                return True  # another thread's batch carried it
            if self._take_lease() is None:
                return False
            failures = self.failed_rounds
            if not self.run_once(deadline):
                return False
            if self.failed_rounds != failures and self.last_failure is not None:
                raise _for_caller(self.last_failure)
            return True
        finally:
            self._step_lock.release()

    def _raise_if_sender_failing(self, started: float) -> None:
        """Another client or process sends: stop waiting once its delivery fails."""
        for other in _uploaders_of(self.outbox.path, but=self):
            if other.holds_lease:
                if other.gave_up_at >= started and other.last_failure is not None:
                    raise _for_caller(other.last_failure)
                return
        head = self.outbox.head(1)
        if _wall_clock_wait(head.next_attempt_at, time.time()) > 0:
            first = next(self.outbox.rows("pending", limit=1), None)
            error = first.last_error if first is not None else None
            raise RetryableError(
                f"not delivered: the uploading process is backing off ({error});"
                " the event stays in the outbox",
                status=first.last_status if first is not None else None,
            )

    def _let_go_of_lease(self) -> None:
        """After a sync call: give the lease back unless another thread is sending with it."""
        if self._step_lock.acquire(blocking=False):
            try:
                self._give_up_lease()
            finally:
                self._step_lock.release()


_uploaders: weakref.WeakSet[Uploader] = weakref.WeakSet()  # every uploader of this process


def _uploaders_of(path: str, but: Uploader) -> list[Uploader]:
    """The other uploaders of this process that send from the file at `path`."""
    return [other for other in list(_uploaders) if other is not but and other.outbox.path == path]


def _for_caller(failure: RetryableError) -> RetryableError:
    """The error a sync_mode caller gets for a failed round: same kind, its own object."""
    kind = EndpointRejected if isinstance(failure, EndpointRejected) else RetryableError
    return kind(
        f"not delivered: {_error_text(failure)}; the event stays in the outbox",
        status=failure.status,
        body=failure.body,
    )


class _Batch:
    """The rows of one claim and what happened to each."""

    def __init__(self, lease: UploadLease, rows: list[Row], prefetch: bool = False) -> None:
        self.lease = lease
        self.rows = rows
        self.prefetch = prefetch  # claim the next batch while this one is on the wire
        self.attempts = {row.id: 0 for row in rows}
        self.finished: set[int] = set()  # acknowledged, dead or released
        self.released_any = False  # some rows went back to pending
        self.claimed_at = time.time()


def _by_attempts(batch: _Batch, ids: Sequence[int]) -> dict[int, list[int]]:
    """Group row ids by how many sends they were part of (one UPDATE per group)."""
    groups: dict[int, list[int]] = {}
    for row_id in ids:
        groups.setdefault(batch.attempts[row_id], []).append(row_id)
    return groups


_RejectionKey = tuple[Optional[int], str]  # run time on 3.9: no `int | None` here


@dataclasses.dataclass
class _Rejections:
    """What the endpoint answered lately, per file, to tell a wrong endpoint from bad events."""

    # A head whose events were each rejected alike: (answer, first id, last id).
    endpoint: tuple[_RejectionKey, int, int] | None = None
    lone: _RejectionKey | None = None  # the last batch of one event, rejected

    def is_same_head(self, rows: Sequence[Row]) -> bool:
        """The batch is (part of) the remembered head: no event in it was judged since."""
        if self.endpoint is None:
            return False
        return rows[0].id == self.endpoint[1] and rows[-1].id <= self.endpoint[2]

    def forget(self) -> None:
        self.endpoint = self.lone = None


_rejections_by_file: dict[str, _Rejections] = {}


def _rejections_of(path: str) -> _Rejections:
    return _rejections_by_file.setdefault(path, _Rejections())


def _rejection_key(exc: APIError) -> _RejectionKey:
    """What makes two rejections alike: the status and the server's words."""
    return exc.status, exc.body or str(exc)


def _by_rejection(rejected: list[tuple[Row, APIError]]) -> list[list[tuple[Row, APIError]]]:
    groups: dict[_RejectionKey, list[tuple[Row, APIError]]] = {}
    for row, exc in rejected:
        groups.setdefault(_rejection_key(exc), []).append((row, exc))
    return list(groups.values())


def _endpoint_error(exc: APIError) -> EndpointRejected:
    return EndpointRejected(
        f"the server rejects every event alike ({_error_text(exc)}): check the host,"
        " its path and the write key; the events stay pending",
        status=exc.status,
        body=exc.body,
    )


def _wall_clock_wait(at: float | None, now: float) -> float:
    """Seconds until a stored (wall-clock) retry time; 0 when due.

    A time further ahead than the longest backoff can only come from a clock
    that jumped back since it was stored (or a row from a clock ahead): it is
    due now, rather than a wait of hours.
    """
    if at is None or at <= now or at - now > MAX_RETRY_AFTER:
        return 0.0
    return at - now


def _stop_at(deadline: float) -> tenacity.stop.stop_base:
    class _StopAtDeadline(tenacity.stop.stop_base):
        def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
            return time.monotonic() >= deadline

    return _StopAtDeadline()


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.debug("attempt %d failed (%s); retrying in %.2fs", state.attempt_number, exc, wait)


def _error_text(exc: BaseException) -> str:
    body = getattr(exc, "body", "")
    text = str(exc)
    return f"{text}: {body}" if body and body not in text else text
