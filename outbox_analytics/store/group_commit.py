"""Group commit: with fsync=True, one sync covers the appends of every thread waiting.

A synced commit costs one disk flush (a fraction of a millisecond to
milliseconds), whatever it holds. Threads appending at once would each wait
for a flush of their own, one after another; instead each caller puts its
rows on a waiting list, and whoever holds the commit lock leads: it commits
the rows of every caller waiting in one transaction, then wakes them
(measured with 8 threads: benchmarks/fsync.py). The first caller to arrive
after a leader took the list waits for the commit lock, to lead next; the
others wait to be woken, so that nobody whose rows are done waits behind
the next leader's commit. A leader lets the callers of the last group,
coming back with their next rows, join before it takes the list (`_gather`).
A caller that finds no other thread storing commits its rows alone, with no
list and no lock of its own (a single thread always does).

Each call still returns only after its own rows are committed, or raises.
What it raises, and what becomes of the rows:

- The commit failed (an `OutboxError`: the commit function raises one only
  when no row was stored): every caller of the group raises that error.
- Anything else raised in the leader's thread (Ctrl-C, a signal handler's
  exception, such as the main thread's TimeoutError from a `signal.alarm`
  handler) stays in that thread: the transaction was rolled back (see
  connection.py), and the other callers' rows go to the next leader. If it
  struck after the COMMIT itself, those rows are stored twice, with the same
  messageIds inside them: at-least-once, as the upload already is.
- A caller interrupted before a leader took its rows leaves, and its rows
  are never stored.

No interrupt, at any line, can leave the group without a leader: leading is
only ever holding the commit lock, which a `with` block always releases, and
a caller that nobody wakes (its leader was interrupted first) takes the
commit lock itself after `_WAKE_WAIT`.

A signal handler that appends on a thread already inside `store()` (a SIGTERM
handler tracking "Job Terminated") must not wait for that thread, which is
itself: such a call commits directly, bypassing the group, and the database
layer either commits it or raises OutboxBusy (the outer call is inside
SQLite).

The locks and the waiting list belong to the process that made them: a
forked child (even by a C-level fork, which runs no Python fork hook) starts
afresh, through `process.on_new_process`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from .. import process
from ..errors import OutboxError

__all__ = ["GroupCommit"]

Row = TypeVar("Row")


# How long a caller waits to be woken before it takes the commit lock itself:
# longer than a commit normally takes, so it matters only when a leader was
# interrupted before it could wake the others (after a slower commit, the
# caller finds its rows done once it has the lock).
_WAKE_WAIT = 0.05


class _Request(Generic[Row]):
    __slots__ = ("done", "error", "last_id", "rows", "wake")

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows
        self.done = False  # committed, or failed with `error`
        self.last_id = 0
        self.error: OutboxError | None = None
        self.wake = threading.Lock()  # released: done, or look again (a leader gave up)
        self.wake.acquire()


class GroupCommit(Generic[Row]):
    """Runs `commit(rows) -> last row id` for the rows of every waiting caller at once.

    `commit` raises an `OutboxError` only when it stored none of the rows.
    """

    def __init__(self, commit: Callable[[Sequence[Row]], int]) -> None:
        self._commit = commit
        self._forget()
        _live.add(self)

    def _forget(self) -> None:
        """Fresh locks and list: in a new process, the parent's threads may hold the old ones."""
        self._waiting_lock = threading.Lock()  # guards _waiting only, held for a few bytecodes
        self._commit_lock = threading.Lock()  # held by the leader for the whole commit
        self._waiting: list[_Request[Row]] = []
        self._last_group_size = 1  # callers in the last group led (not in a lone commit)
        # Threads inside store(): a signal handler's call on one of them must not
        # wait for it. Checked before any lock is taken (the thread may hold one).
        self._inside: set[int] = set()

    def store(self, rows: Sequence[Row]) -> int:
        """Commit `rows` (with whatever other threads are storing); the last row id of ours."""
        process.current_pid()  # in a new process, _forget() runs before any lock is used
        me = threading.get_ident()
        if me in self._inside:
            return self._commit(rows)  # re-entered from a signal handler: never wait for ourselves
        try:
            # (Inside the try: an interrupt right after the add must not leave us
            # marked as inside for good, which would bypass the group from then on.)
            self._inside.add(me)
            if len(self._inside) == 1 and not self._waiting and not self._commit_lock.locked():
                # No other thread storing: commit alone, without the list. (One
                # arriving meanwhile and taking the lock first only makes us
                # wait for it, as a leader would.) Not when others are inside:
                # the first back from a group would commit alone, ahead of the rest.
                with self._commit_lock:
                    return self._commit(rows)
            return self._store_in_group(rows)
        finally:
            self._inside.discard(me)

    def _store_in_group(self, rows: Sequence[Row]) -> int:
        request = _Request(rows)
        try:
            with self._waiting_lock:
                self._waiting.append(request)
                first = len(self._waiting) == 1
            # The first caller after a leader took the list leads next. The others
            # wait for a leader to wake them, not for the commit lock: a caller
            # whose rows are done must not wait behind the next leader's commit.
            # Only if nobody wakes them (a leader was interrupted) do they take
            # the commit lock themselves after a while.
            if first or not request.wake.acquire(timeout=_WAKE_WAIT) or not request.done:
                with self._commit_lock:  # the leader before us is done, one way or another
                    if not request.done:
                        self._lead(request)
        except BaseException:
            self._withdraw(request)
            raise
        if request.error is not None:
            raise request.error
        return request.last_id

    def _lead(self, own: _Request[Row]) -> None:
        """Commit every waiting request, ours too; under the commit lock."""
        group: list[_Request[Row]] = []
        try:
            self._gather()
            with self._waiting_lock:
                group, self._waiting = self._waiting, []
            self._last_group_size = len(group)
            if own not in group:  # taken by a leader that was interrupted: ours to commit now
                group.append(own)
            try:
                last_id = self._commit([row for request in group for row in request.rows])
            except OutboxError as error:  # nothing stored: every caller's error
                for request in group:
                    request.error = error
                    _finish(request, own)
                return
            for request in reversed(group):  # one transaction: consecutive ids
                request.last_id = last_id
                _finish(request, own)
                last_id -= len(request.rows)
        except BaseException:
            # Interrupted, or an error of this thread's own (never the others'):
            # the others' rows were rolled back, or (struck after COMMIT) are
            # stored once more by the callers, who now lead in turn.
            for request in group:
                if not request.done and request is not own:
                    _wake(request)
            raise

    def _gather(self) -> None:
        """Let the callers of the last group, on their way back with their next rows, join ours.

        Without this, the first of them to come back leads at once, alone, and
        the others wait for the group after: commits of one and of all the
        rest, by turns (measured with 8 threads: half the commits held one
        row). Each yield of the GIL lets one more caller append; we stop as
        soon as one brings nobody.
        """
        for _ in range(self._last_group_size):
            waiting = len(self._waiting)
            if waiting >= self._last_group_size:
                return
            time.sleep(0)  # (releases the GIL)
            if len(self._waiting) == waiting:
                return

    def _withdraw(self, request: _Request[Row]) -> None:
        """An interrupted caller: its rows leave unless a leader already took them."""
        with self._waiting_lock:
            if request not in self._waiting:
                return
            was_first = request is self._waiting[0]
            self._waiting.remove(request)
            successor = self._waiting[0] if was_first and self._waiting else None
        if successor is not None:  # it waits for us to lead: it leads instead
            _wake(successor)


def _finish(request: _Request[Row], leader: _Request[Row]) -> None:
    request.done = True
    if request is not leader:
        _wake(request)


def _wake(request: _Request[Row]) -> None:
    with contextlib.suppress(RuntimeError):  # woken already (to look again, then done)
        request.wake.release()


_live: weakref.WeakSet[GroupCommit[Any]] = weakref.WeakSet()


def _forget_in_new_process() -> None:
    for group in list(_live):
        group._forget()


process.on_new_process(_forget_in_new_process)
