"""sync_mode: return once an event and every event before it are delivered, or raise.

It works next to anything on the same file (threads, background clients,
other processes): a caller sends when its process can hold the lease, one
thread at a time (the lease holder's turn), and otherwise sleeps while the
holder sends, hurrying it, and stops waiting once the holder's delivery
fails. Nothing here is cut short by a stop meant for the background thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from ..errors import APIError, DeliveryError, EndpointRejected, OutboxError, RetryableError
from ..store.maintenance import find
from . import peers
from .schedule import stored_wait
from .triage import error_text

if TYPE_CHECKING:
    from .uploader import Uploader

__all__ = ["deliver_now"]

log = logging.getLogger("outbox_analytics")


def deliver_now(uploader: Uploader, row_id: int, timeout: float) -> None:
    """Return once row `row_id` and every row before it are delivered.

    Raises DeliveryError, and no other error, when that fails or takes
    longer than `timeout`; the event then stays in the outbox. The lease is
    given back after the call, so that background clients and other
    processes can send between calls.
    """
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as hurried:
            for other in peers.peers_of(uploader):
                hurried.enter_context(other.hurry(started))
            _wait_until_delivered(uploader, row_id, deadline, timeout, started)
        dead = find(uploader.outbox, row_id)
    except DeliveryError:
        raise
    except OutboxError as exc:
        raise RetryableError(f"{exc}; the event stays in the outbox") from exc
    except Exception as exc:  # a bug of ours or of a transport: still a delivery failure
        log.exception("outbox-analytics: sending in sync_mode failed")
        raise RetryableError(f"delivery failed: {type(exc).__name__}: {exc}") from exc
    finally:
        _let_go_of_lease(uploader)
    if dead is not None and dead.state == "dead":
        status = dead.last_status or 400
        raise APIError(status, "rejected", f"the event was dead-lettered: {dead.last_error}")


def _wait_until_delivered(
    uploader: Uploader, row_id: int, deadline: float, timeout: float, started: float
) -> None:
    pause = 0.002  # polls of the file while another sender works: sleeps, growing to 50 ms
    tally = uploader.rounds.tally
    failed_attempts = tally.failed_attempts
    while uploader.outbox.unfinished(row_id):
        left = deadline - time.monotonic()
        if left <= 0:
            failure = tally.last_attempt_failure
            if failure is not None and tally.failed_attempts != failed_attempts:
                raise _for_caller(failure)  # the time ran out while retrying: say why
            raise RetryableError(f"not delivered within {timeout}s; the event stays in the outbox")
        if _send_in_turn(uploader, row_id, deadline):
            pause = 0.002
            continue
        _raise_if_sender_failing(uploader, started)
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


def _send_in_turn(uploader: Uploader, row_id: int, deadline: float) -> bool:
    """Send one batch once the other threads of this client are done, if this process can."""
    with uploader.holder.turn(timeout=deadline - time.monotonic()) as mine:
        if not mine or time.monotonic() >= deadline:
            return False  # our turn came too late: the caller raises its timeout
        if not uploader.outbox.unfinished(row_id):
            return True  # another thread's batch carried it
        if uploader.holder.take() is None:
            return False
        failures = uploader.rounds.tally.failed_rounds
        if not uploader.rounds.run(deadline=deadline):
            return False
        failure = uploader.rounds.tally.last_failure
        if uploader.rounds.tally.failed_rounds != failures and failure is not None:
            raise _for_caller(failure)
        return True


def _raise_if_sender_failing(uploader: Uploader, started: float) -> None:
    """Another client or process sends: stop waiting once its delivery fails."""
    for other in peers.peers_of(uploader):
        if other.holds_lease:
            failure = other.rounds.tally.last_failure
            if other.schedule.gave_up_at >= started and failure is not None:
                raise _for_caller(failure)
            return
    head = uploader.outbox.head(1)
    if stored_wait(head.next_attempt_at, uploader.rounds.clock.now()) > 0:
        first = next(uploader.outbox.rows("pending", limit=1), None)
        error = first.last_error if first is not None else None
        raise RetryableError(
            f"not delivered: the uploading process is backing off ({error});"
            " the event stays in the outbox",
            status=first.last_status if first is not None else None,
        )


def _let_go_of_lease(uploader: Uploader) -> None:
    """After a sync call: give the lease back unless another thread is sending with it."""
    if uploader.holder.try_turn():
        try:
            uploader.holder.give_up()
        finally:
            uploader.holder.end_turn()


def _for_caller(failure: RetryableError) -> RetryableError:
    """The error a sync_mode caller gets for a failed round: same kind, its own object."""
    kind = EndpointRejected if isinstance(failure, EndpointRejected) else RetryableError
    return kind(
        f"not delivered: {error_text(failure)}; the event stays in the outbox",
        status=failure.status,
        body=failure.body,
    )
