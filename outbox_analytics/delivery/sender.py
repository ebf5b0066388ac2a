"""The sender: one batch body to the server, retried by the tenacity policy until an answer.

Its caller says what may cut it short: the background thread passes its stop
`Interruption` (a shutdown should not wait out a minute of backoff); `drain()` and
sync sends pass none, or their own deadline. So a stop meant for the thread
never ends someone else's send.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import tenacity

from .. import process
from ..errors import RetryableError
from ..request import CallerDeadline, Requester, encode_batch
from ..utils import printable, utc_now_iso
from .schedule import Schedule

__all__ = ["DEFAULT_RETRY_WAIT", "Interrupted", "Interruption", "Sender"]

log = logging.getLogger("outbox_analytics")

# Segment-like: 0.5 s, 1 s, 2 s ... capped at a minute, plus up to 1 s of jitter
# so that many clients recovering from one outage do not retry in step.
DEFAULT_RETRY_WAIT: tenacity.wait.wait_base = tenacity.wait_exponential(
    multiplier=0.5, max=60
) + tenacity.wait_random(0, 1)


class Interrupted(Exception):
    """The caller's interruption was set, or its deadline passed before retries ran out.

    Not a failure of the batch: its rows go back to pending as they were
    (each failed attempt was noted as it came: see `after_failure`).
    """


class Interruption:
    """Set once, for good; cuts a retry wait short.

    Like threading.Event, but on a raw lock (held until set): setting it
    takes no lock in Python code that a KeyboardInterrupt could leave held.
    """

    def __init__(self) -> None:
        self._set = False
        self._unset = threading.Lock()
        self._unset.acquire()

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(RuntimeError):  # set already
            self._unset.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`, or until set."""
        if self._unset.acquire(timeout=max(0.0, seconds)):
            self._unset.release()  # stays set for every later wait


class Sender:
    """Sends batch bodies through this process's requester, with retries."""

    def __init__(
        self,
        requester_factory: Callable[[], Requester],
        schedule: Schedule,
        *,
        max_retries: int,
        retry_wait: Callable[[tenacity.RetryCallState], float],
    ) -> None:
        self._requester_factory = requester_factory
        self._schedule = schedule
        self.max_retries = max_retries
        self.retry_wait = retry_wait
        self._requester: Requester | None = None
        self._pid = 0
        self.attempts_made = 0  # requests made by the last send (for its give-up report)

    @property
    def requester(self) -> Requester:
        """This process's requester (a parent's session and threads are not ours)."""
        pid = process.known_pid()
        if self._requester is None or self._pid != pid:
            self._requester, self._pid = self._requester_factory(), pid
        return self._requester

    def close(self) -> None:
        requester, self._requester = self._requester, None
        if requester is not None and self._pid == process.known_pid():
            requester.close()

    def send(
        self,
        messages: bytes,
        *,
        deadline: float | None,
        interrupt: Interruption | None,
        before_attempt: Callable[[int], Callable[[], None] | None],
        after_failure: Callable[[RetryableError], None] | None = None,
    ) -> None:
        """POST `messages` (a JSON array) until a 2xx; else APIError, RetryableError, Interrupted.

        RetryableError: the retries ran out. `deadline` (monotonic) bounds the
        retries and each request: reached first, it is Interrupted, not a
        failed round. `before_attempt(number)` runs before each attempt and
        may return a function to run while that request is on the wire;
        `after_failure(exc)` runs after each failed attempt but the last of a
        round that runs out.
        """
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(self.max_retries + 1)
        if deadline is not None:
            stop = stop | _stop_at(deadline)
        sleep = time.sleep if interrupt is None else interrupt.wait
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetryableError),
            stop=stop,
            wait=lambda state: self._wait(state, deadline),
            sleep=sleep,
            before_sleep=lambda state: _after_failure(state, after_failure),
            reraise=True,
        )
        self.attempts_made = 0
        try:
            for attempt in retrying:
                with attempt:
                    if interrupt is not None and interrupt.is_set():
                        raise Interrupted()
                    if deadline is not None and time.monotonic() >= deadline:
                        raise Interrupted()  # (the failures so far were noted)
                    number = attempt.retry_state.attempt_number
                    meanwhile = before_attempt(number)
                    requester = self.requester
                    body = encode_batch(messages, utc_now_iso(), requester.write_key)
                    self.attempts_made = number
                    try:
                        requester.send(
                            body, retry_count=number - 1, deadline=deadline, meanwhile=meanwhile
                        )
                    except CallerDeadline:
                        raise Interrupted() from None
        except RetryableError as failure:
            if self.attempts_made > self.max_retries:
                raise  # the retries ran out: a failed round
            # The caller's time ran out first: a failure noted like any other, no round lost.
            if after_failure is not None:
                after_failure(failure)
            raise Interrupted() from failure

    def _wait(self, state: tenacity.RetryCallState, deadline: float | None) -> float:
        """The retry policy's wait, floored by the server's Retry-After (which pauses all)."""
        now = time.monotonic()
        wait = self.retry_wait(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            self._schedule.pause(now, retry_after, printable(str(exc)))
        wait = max(wait, self._schedule.paused_until - now)
        self._schedule.longest_wait = max(self._schedule.longest_wait, wait)
        if deadline is not None:
            wait = min(wait, deadline - now)
        return max(0.0, wait)


def _stop_at(deadline: float) -> tenacity.stop.stop_base:
    class _StopAtDeadline(tenacity.stop.stop_base):
        def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
            return time.monotonic() >= deadline

    return _StopAtDeadline()


def _after_failure(
    state: tenacity.RetryCallState, then: Callable[[RetryableError], None] | None
) -> None:
    _log_retry(state)
    exc = state.outcome.exception() if state.outcome else None
    if then is not None and isinstance(exc, RetryableError):
        then(exc)


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    said = printable(str(exc))  # a server's words may hold escape sequences
    log.debug("attempt %d failed (%s); retrying in %.2fs", state.attempt_number, said, wait)
