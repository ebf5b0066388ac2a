"""A background thread that runs one step after another: start, wake, stop, restart.

The thread is a thin loop around `step() -> seconds to wait`; everything it
does is in the step, which tests and `drain()` call directly. This object
owns only the thread's lifecycle:

- it starts the thread when asked and it is not running: at first, after the
  thread died, or in a forked child (threads never survive a fork; the pid
  it was started in is compared on every call, so a C-level fork that runs
  no Python hook is noticed too);
- `is_running` reads a flag the thread clears as it ends, never
  `Thread.is_alive()`: under gevent that is a lock poll that yields to the
  hub, on every `track()`;
- `stop()` is for good: the step in progress finishes, no new one starts,
  and `ensure_running()` does not start another;
- before a Python fork, an idle thread stands down (joined within a few
  milliseconds) and starts again after, in the parent: Python 3.12+ warns
  on every fork of a process with threads ("use of fork() may lead to
  deadlocks"), and an idle uploader should not make a user's program warn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

from .. import process

__all__ = ["BackgroundWorker"]

log = logging.getLogger("outbox_analytics")

# The class of the interpreter's own main thread. At interpreter exit it is
# marked as ended before the exit hooks run (which still need the thread); a
# child forked from another thread has that thread, of another class, instead.
_MAIN_THREAD: type = getattr(threading, "_MainThread", type(None))
# How often a resting thread looks whether the process's main thread ended.
_WATCH_MAIN_THREAD = 1.0
# How long a fork waits for an idle thread to stand down before it goes on
# without (the thread is then inherited as nothing, as any other thread is).
_STAND_DOWN_WAIT = 0.05


class BackgroundWorker:
    """Runs `step()` on a daemon thread until stopped.

    `on_error(exc)` is called for whatever a step raises and says how long to
    rest; `on_exit()` runs on the thread once it ends after `stop()`.
    """

    def __init__(
        self,
        step: Callable[[], float],
        on_error: Callable[[BaseException], float],
        on_exit: Callable[[], None],
        name: str,
        short_rest: float = 0.0,
    ) -> None:
        """A rest of up to `short_rest` seconds is not cut short by `ensure_running()`."""
        self._step = step
        self._short_rest = short_rest
        self._on_error = on_error
        self._on_exit = on_exit
        self._name = name
        self._lock = threading.Lock()
        self._bell = _Bell()
        self._pid = process.known_pid()
        self._generation = 0  # only the thread of the current generation loops
        self._alive = False  # the current generation's thread has not ended
        self._idle = False  # resting: a flush or a fork may cut it short
        self._wakeable = False  # resting longer than a short rest: a new event cuts it short
        self._stopped = False
        self._resume_after_fork = False
        self._thread: threading.Thread | None = None
        _workers.add(self)

    @property
    def is_running(self) -> bool:
        return self._alive and self._pid == process.known_pid()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def ensure_running(self) -> None:
        """Start the thread if it is not running (unless stopped); wake it if it idles."""
        if self.is_running:
            if self._wakeable:
                self._bell.ring()  # new events: no need to sleep out a long wait
            return
        if self._pid != process.known_pid():
            self._forget_parent()
        with self._lock:
            if self._alive or self._stopped:
                return
            if self._thread is not None:
                log.error("outbox-analytics %s thread had ended; starting a new one", self._name)
            self._start_locked()

    def _start_locked(self) -> None:
        self._generation += 1
        thread = threading.Thread(
            target=self._loop,
            args=(self._generation,),
            name=f"outbox-analytics-{self._name}",
            daemon=True,
        )
        self._thread, self._alive = thread, True
        try:
            thread.start()
        except BaseException:
            self._alive = False  # (interrupted, or no thread can be started here)
            raise

    def wake(self) -> None:
        self._bell.ring()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop for good after the step in progress; True if the thread ended within `timeout`."""
        self._stopped = True
        return self._end_thread(timeout)

    def _end_thread(self, timeout: float | None) -> bool:
        with self._lock:
            self._generation += 1  # the running thread leaves after its step
            thread = self._thread
        self._bell.ring()
        if thread is None or thread is threading.current_thread() or self._pid != os.getpid():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _loop(self, generation: int) -> None:
        # Step aside first: Thread.start() returns only once this thread has
        # run, and while it keeps the GIL the starting thread (a caller's
        # first track()) waits out the 5 ms switch interval.
        time.sleep(0.001)
        try:
            while generation == self._generation and self._process_goes_on():
                try:
                    delay = self._step()
                except BaseException as exc:  # the loop outlives every failure of a step
                    delay = self._on_error(exc)
                if delay > 0 and generation == self._generation:
                    self._rest(delay)
        finally:
            if self._thread is threading.current_thread():
                self._alive = False  # (a newer thread, started after a stand-down, is alive)
            if self._stopped:
                self._on_exit()

    def _rest(self, delay: float) -> None:
        """Until rung, `delay` passed, or the process's main thread ended."""
        self._idle, self._wakeable = True, delay > self._short_rest
        try:
            end = time.monotonic() + delay
            while True:
                left = end - time.monotonic()
                if left <= 0 or self._bell.wait(min(left, _WATCH_MAIN_THREAD)):
                    return
                if not self._process_goes_on():
                    return
        finally:
            self._idle = self._wakeable = False

    def _process_goes_on(self) -> bool:
        """False once the main thread ended without ending the process.

        That is a child forked from another thread than the main one: its
        forking thread became its main thread, and when it ends,
        `sys.exit()` included, nothing finalizes the interpreter. The process
        ends with its last thread: this one must stop (for good) then.
        """
        main = threading.main_thread()
        if isinstance(main, _MAIN_THREAD) or main.is_alive():
            return True  # (the interpreter's own main thread: its exit finalizes all)
        self._stopped = True
        return False

    # -- per process ------------------------------------------------------------

    def _forget_parent(self) -> None:
        """In a new process: the parent's thread does not exist here, nor do its locks."""
        self._lock = threading.Lock()
        self._bell = _Bell()
        self._thread = None
        self._alive = self._idle = self._wakeable = self._resume_after_fork = False
        self._pid = process.known_pid()

    def _stand_down(self) -> None:
        """Before a fork: an idle thread ends (to start again after it); a busy one is left."""
        if not (self._alive and self._idle) or self._pid != os.getpid():
            return
        if not self._end_thread(_STAND_DOWN_WAIT):
            return
        with self._lock:
            if not self._alive:  # (a track() on another thread may have started one since)
                self._thread = None  # it did not die: nothing to report when it starts again
                self._resume_after_fork = True

    def _resume(self) -> None:
        if self._resume_after_fork:
            self._resume_after_fork = False
            if not self._stopped:
                self.ensure_running()


class _Bell:
    """Wakes one waiting thread; safe to ring from any line a signal may interrupt.

    A threading.Event would do, but its lock is taken in Python code
    (Condition.__enter__): a KeyboardInterrupt landing there, in a track()
    that wakes the thread, leaves it held for good and every later track()
    hangs. Ringing here is one C call on a raw lock, held while not rung.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def ring(self) -> None:
        with contextlib.suppress(RuntimeError):  # rung already
            self._lock.release()

    def wait(self, seconds: float) -> bool:
        """Until rung (since the last wait: True) or `seconds` passed (False)."""
        return self._lock.acquire(timeout=max(0.0, seconds))  # rung: taken back, unrung


_workers: weakref.WeakSet[BackgroundWorker] = weakref.WeakSet()


def _forget_parents() -> None:
    for worker in list(_workers):
        worker._forget_parent()


def _stand_down_all() -> None:
    for worker in list(_workers):
        try:
            worker._stand_down()
        except Exception:  # a fork must go on whatever happens here
            log.debug("could not stand the uploader down for a fork", exc_info=True)


def _resume_all() -> None:
    for worker in list(_workers):
        try:
            worker._resume()
        except Exception:
            log.exception("outbox-analytics: could not restart the uploader after a fork")


process.on_new_process(_forget_parents)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_stand_down_all, after_in_parent=_resume_all)
