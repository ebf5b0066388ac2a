"""A delivery round: claim the oldest rows, send them, and settle every one.

This is the only code that acknowledges, releases or dead-letters rows, and
each row of a round is settled exactly once:
- acknowledged after a 2xx for it (the only way a row leaves the outbox);
- dead-lettered when the server rejected it (found by splitting the batch,
  see triage.py), or when it has been retried for `max_total_backoff_duration`;
- released (pending again, in place, with its attempts and last error) when
  retries run out, the round is interrupted, or anything else goes wrong.
Rows released go back before the batch claimed ahead, which is then
released too: nothing overtakes a row that is still pending.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import APIError, DeliveryError, RetryableError, without_frames
from ..request import MAX_BATCH_BYTES, join_messages
from ..store import Claimed, UploadLease
from ..utils import RateLimitedLog, printable
from .lease_holder import LeaseHolder
from .schedule import Schedule, SteadyWallClock
from .sender import Interrupted, Interruption, Sender
from .triage import (
    EndpointToBlame,
    Rejections,
    about_the_endpoint,
    endpoint_error,
    error_text,
    judge,
    rejection_key,
)

__all__ = ["Rounds", "Tally"]

log = logging.getLogger("outbox_analytics")

# Set on the dead-letter log record (as `extra`), so a caller printing its own
# summary (the CLI's drain) can filter the line out.
DEAD_LETTERED = "outbox_analytics_dead_lettered"

# The body without its messages: {"batch":[],"sentAt":"...","writeKey":...}.
_BODY_OVERHEAD = 64


@dataclasses.dataclass
class Tally:
    """What this process's rounds did, for stats, flush results and the CLI."""

    sent: int = 0  # rows acknowledged by the server
    dead: int = 0  # rows moved to the dead-letter state
    failed_rounds: int = 0  # times retries ran out
    last_failure: RetryableError | None = None  # of the last round that gave up
    failed_attempts: int = 0  # sends that failed and were to be retried
    last_attempt_failure: RetryableError | None = None  # of the last of them


class _Batch:
    """The rows of one claim, what happened to each, and what may cut the round short."""

    def __init__(
        self,
        lease: UploadLease,
        rows: list[Claimed],
        claimed_at: float,
        deadline: float | None,
        interrupt: Interruption | None,
        claim_ahead: bool,
    ) -> None:
        self.lease = lease
        self.rows = rows
        self.claimed_at = claimed_at  # steady wall-clock time
        self.deadline = deadline
        self.interrupt = interrupt
        self.claim_ahead = claim_ahead  # claim the next batch while this one is on the wire
        self.attempts = {row.id: 0 for row in rows}  # sends not yet counted in the file
        self.finished: set[int] = set()  # acknowledged, dead or released
        self.released_any = False  # some rows went back to pending
        self.failure: RetryableError | None = None  # the last failed send of the round

    def by_attempts(self, ids: Sequence[int]) -> dict[int, list[int]]:
        """Row ids grouped by how many sends they were part of (one UPDATE per group)."""
        groups: dict[int, list[int]] = {}
        for row_id in ids:
            groups.setdefault(self.attempts[row_id], []).append(row_id)
        return groups


class Rounds:
    """Runs delivery rounds for one uploader, inside its lease holder's turn."""

    def __init__(
        self,
        holder: LeaseHolder,
        sender: Sender,
        schedule: Schedule,
        rejections: Callable[[], Rejections],
        *,
        upload_size: int,
        upload_interval: float,
        max_total_backoff_duration: float,
        on_error: Callable[[Exception, list[dict[str, Any]]], Any] | None,
    ) -> None:
        self.holder = holder
        self.sender = sender
        self.schedule = schedule
        self.rejections = rejections
        self.upload_size = upload_size
        self.upload_interval = upload_interval
        self.max_total_backoff_duration = max_total_backoff_duration
        self.on_error = on_error
        self.clock = SteadyWallClock()
        self.tally = Tally()
        self._warn_exhausted = RateLimitedLog()
        self._warn_dead = RateLimitedLog()

    def run(
        self,
        *,
        deadline: float | None = None,
        interrupt: Interruption | None = None,
        claim_ahead: bool = False,
    ) -> int:
        """Claim the oldest rows and deliver them; how many rows were claimed.

        Delivery failures raise nothing: they are recorded in the outbox,
        logged, counted in `tally` and reported to `on_error`. `deadline`
        (monotonic) bounds the retries; `interrupt` ends the round early, its
        rows pending again.
        """
        lease = self.holder.lease
        if lease is None:
            return 0
        rows = self.holder.claim(self.upload_size, MAX_BATCH_BYTES)
        self._count_unsendable(lease)
        if not rows:
            return 0
        batch = _Batch(lease, rows, self.clock.now(), deadline, interrupt, claim_ahead)
        self.schedule.longest_wait = 0.0
        try:
            self._fit_body(batch)
            self._deliver(batch, batch.rows)
        except Interrupted:  # cut short: failed sends were noted, one with no answer is none
            if batch.failure is not None:
                self._bury_expired(batch, batch.failure)
            batch.attempts = dict.fromkeys(batch.attempts, 0)
            self._release(batch, None)
        except RetryableError as exc:
            self._give_up_for_now(batch, exc)
        except BaseException:
            self._release(batch, None)
            raise
        finally:
            if batch.released_any or len(batch.finished) < len(batch.rows):
                self.holder.release_ahead()  # it must not overtake what goes back to pending
        return len(rows)

    def _fit_body(self, batch: _Batch) -> None:
        """Keep the JSON body under the hard limit; put back the rows that do not fit."""
        budget = MAX_BATCH_BYTES - _BODY_OVERHEAD - len(self.sender.requester.write_key)
        total = 0
        for index, row in enumerate(batch.rows):
            total += len(row.json) + 1  # and a comma
            if total > budget:
                rest = batch.rows[index:]
                if index == 0:  # alone too large: it can never be sent
                    error = APIError(413, "too_large", "message larger than the batch limit")
                    self._bury(batch, [row], error)
                    rest = batch.rows[1:]
                batch.lease.release([r.id for r in rest], attempts=0)  # next batch
                batch.rows = batch.rows[:index]
                return

    # -- sending and splitting -------------------------------------------------------

    def _deliver(
        self, batch: _Batch, rows: Sequence[Claimed], endpoint_judges_events: bool = False
    ) -> None:
        """Send `rows`; on a rejection, split them and let the triage judge what it found."""
        rows = list(rows)
        memory = self.rejections()
        if memory.is_same_head(rows) and not endpoint_judges_events:
            self._resend_same_head(batch, rows, memory)
            return
        rejected: list[tuple[Claimed, APIError]] = []
        self._send_or_split(batch, rows, rejected)
        if not rejected:
            return
        verdict = judge(memory, rows, rejected, endpoint_judges_events)
        if isinstance(verdict, EndpointToBlame):
            raise verdict.error
        for buried, exc in verdict.groups:
            self._bury(batch, buried, exc)

    def _resend_same_head(self, batch: _Batch, rows: list[Claimed], memory: Rejections) -> None:
        """The rows that were each rejected alike last time: still so, and is the endpoint to blame?

        Sent once, whole; rejected alike again, the next pending event is sent
        alone. Accepted (or rejected otherwise), it proves the endpoint judges
        events: the head is split again, and only its events rejected now move
        to the dead-letter state. Rejected alike, all stay pending.
        """
        batch.claim_ahead = False  # the event after the head is the one to ask about
        try:
            self._send(batch, rows)
        except APIError as exc:
            if not memory.same_as_head(exc):
                memory.endpoint = None  # the answer changed: find out anew
                self._deliver(batch, rows)
                return
            self._ask_about_the_next_event(batch, rows, exc, memory)
            return
        self._acknowledge(batch, rows)

    def _ask_about_the_next_event(
        self, batch: _Batch, head: list[Claimed], exc: APIError, memory: Rejections
    ) -> None:
        following = batch.lease.claim(1)
        self._count_unsendable(batch.lease)
        if not following:
            raise endpoint_error(exc)
        probe = following[0]
        batch.rows.append(probe)
        batch.attempts[probe.id] = 0
        try:
            self._send(batch, [probe])
        except APIError as other:
            if rejection_key(other) == rejection_key(exc):
                raise endpoint_error(exc) from None
            self._bury(batch, [probe], other)
        else:
            self._acknowledge(batch, [probe])
        memory.forget()
        self._deliver(batch, head, endpoint_judges_events=True)

    def _send_or_split(
        self, batch: _Batch, rows: Sequence[Claimed], rejected: list[tuple[Claimed, APIError]]
    ) -> None:
        """Send `rows`; acknowledge them, or split a rejected batch, noting rejected rows."""
        try:
            self._send(batch, rows)
        except APIError as exc:
            if len(rows) == 1 or about_the_endpoint(exc):
                rejected.extend((row, exc) for row in rows)  # each, alike: no split needed
                return
            if batch.deadline is not None and time.monotonic() >= batch.deadline:
                raise RetryableError(
                    f"timed out while finding which events were rejected ({error_text(exc)})",
                    status=exc.status,
                ) from None
            middle = len(rows) // 2
            self._send_or_split(batch, rows[:middle], rejected)
            self._send_or_split(batch, rows[middle:], rejected)
            return
        self._acknowledge(batch, rows)

    def _send(self, batch: _Batch, rows: Sequence[Claimed]) -> None:
        messages = join_messages([row.json for row in rows])  # once for all attempts
        whole = len(rows) == len(batch.rows)

        def before_attempt(number: int) -> Callable[[], None] | None:
            for row in rows:
                batch.attempts[row.id] += 1
            if log.isEnabledFor(logging.DEBUG):  # the messages only: the body holds the key
                text = messages.decode()
                log.debug("sending %d messages (attempt %d): %s", len(rows), number, text)
            # Claim the next batch meanwhile: only while the whole batch goes
            # out (not the halves of a rejected one), and once.
            if batch.claim_ahead and number == 1 and whole:
                return self._claim_next
            return None

        self.sender.send(
            messages,
            deadline=batch.deadline,
            interrupt=batch.interrupt,
            before_attempt=before_attempt,
            after_failure=lambda exc: self._note_failure(batch, rows, exc),
        )

    def _claim_next(self) -> None:
        """While a batch is on the wire (never raises: see LeaseHolder.claim_ahead)."""
        self.holder.claim_ahead(self.upload_size, MAX_BATCH_BYTES)
        self._count_unsendable(self.holder.lease)

    def _count_unsendable(self, lease: UploadLease | None) -> None:
        """Count the rows a claim moved to the dead-letter state (they cannot be sent)."""
        if lease is not None:
            self.tally.dead += lease.take_unsendable()

    def _note_failure(self, batch: _Batch, rows: Sequence[Claimed], exc: RetryableError) -> None:
        """A failed attempt, in the file at once (the rows stay claimed): status shows the cause.

        Without it, attempts and the error reached the file only when the
        round gave up, minutes of retries later.
        """
        self.tally.failed_attempts += 1
        self.tally.last_attempt_failure = batch.failure = exc
        ids = [row.id for row in rows]
        try:
            for attempts, same in batch.by_attempts(ids).items():
                batch.lease.note_failure(
                    same, attempts=attempts, status=exc.status, error=error_text(exc),
                    first_attempt_at=batch.claimed_at,
                )  # fmt: skip
        except Exception:  # noted at the end of the round instead
            log.debug("could not note a failed attempt yet", exc_info=True)
            return
        for row_id in ids:
            batch.attempts[row_id] = 0

    # -- settling rows -----------------------------------------------------------------

    def _acknowledge(self, batch: _Batch, rows: Sequence[Claimed]) -> None:
        ids = [row.id for row in rows]
        # Counted and deleted as one, for a flush counting meanwhile; counted
        # first, so that a Ctrl-C between the two leaves nothing delivered
        # out of what a drain reports as sent.
        with self.holder.deleting:
            self.tally.sent += len(ids)
            batch.lease.ack(ids)
        batch.finished.update(ids)
        self.schedule.consecutive_failures = 0
        self.rejections().forget()  # the endpoint accepts events

    def _bury(self, batch: _Batch, rows: Sequence[Claimed], exc: DeliveryError) -> None:
        ids = [row.id for row in rows]
        with self.holder.reporting:
            for attempts, same in batch.by_attempts(ids).items():
                batch.lease.dead_letter(
                    same,
                    attempts=attempts,
                    status=exc.status,
                    error=error_text(exc),
                    first_attempt_at=batch.claimed_at,
                )
            batch.finished.update(ids)
            self.tally.dead += len(ids)
            suppressed = self._warn_dead.ready()
            if suppressed is not None:
                log.error(
                    "%d event(s) rejected and moved to the dead-letter state: %s"
                    " (%d more since the last report)",
                    len(ids), printable(error_text(exc)), suppressed,
                    extra={DEAD_LETTERED: len(ids)},
                )  # fmt: skip
            self._report(exc, rows)

    def _give_up_for_now(self, batch: _Batch, exc: RetryableError) -> None:
        """Retries ran out: put the rows back, in place, and make the head wait."""
        with self.holder.reporting:
            self.tally.failed_rounds += 1
            self.tally.last_failure = exc
            backoff = self.schedule.gave_up(time.monotonic(), self.upload_interval)
            self._bury_expired(batch, exc)
            unfinished = [row for row in batch.rows if row.id not in batch.finished]
            self._release(batch, exc, backoff)
            suppressed = self._warn_exhausted.ready()
            if suppressed is not None:
                log.warning(
                    "could not deliver %d event(s) after %d attempt(s): %s; they stay in the"
                    " outbox and will be retried (%d more such reports suppressed)",
                    len(unfinished), self.sender.attempts_made, printable(error_text(exc)),
                    suppressed,
                )  # fmt: skip
            self._report(exc, unfinished)

    def _bury_expired(self, batch: _Batch, exc: RetryableError) -> None:
        """Rows retried for max_total_backoff_duration move to the dead-letter state."""
        now = self.clock.now()
        too_old = [
            row
            for row in batch.rows
            if row.id not in batch.finished
            and row.first_attempt_at is not None
            and now - row.first_attempt_at >= self.max_total_backoff_duration
        ]
        if too_old:
            expired = RetryableError(
                f"gave up after {self.max_total_backoff_duration:.0f}s of retries:"
                f" {error_text(exc)}",
                status=exc.status,
            )
            self._bury(batch, too_old, expired)

    def _release(self, batch: _Batch, exc: RetryableError | None, backoff: float = 0.0) -> None:
        """Return every row of the batch not yet finished to pending."""
        unfinished = [row.id for row in batch.rows if row.id not in batch.finished]
        batch.released_any = batch.released_any or bool(unfinished)
        now = self.clock.now()
        for attempts, ids in batch.by_attempts(unfinished).items():
            batch.lease.release(
                ids,
                attempts=attempts,
                status=exc.status if exc else None,
                error=error_text(exc) if exc else None,
                next_attempt_at=now + backoff if exc else None,
                first_attempt_at=batch.claimed_at,
            )
        batch.finished.update(row.id for row in batch.rows)

    def _report(self, exc: Exception, rows: Sequence[Claimed]) -> None:
        if self.on_error is None:
            return
        try:
            self.on_error(without_frames(exc), [row.message for row in rows])
        except BaseException:  # even SystemExit: the callback must not stop delivery
            log.exception("on_error raised; delivery goes on")
