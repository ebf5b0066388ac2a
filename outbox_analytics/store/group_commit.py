"""Group commit: with fsync=True, one sync covers the appends of every thread waiting.

A synced commit costs one disk flush (a fraction of a millisecond to
milliseconds), whatever it holds. Threads appending at once would each wait
for a flush of their own, one after another; instead the first one in leads:
it commits the rows of every thread that arrived meanwhile in one
transaction, and each of them returns once that transaction is on disk
(measured with 8 threads: benchmarks/fsync.py). A single thread pays only a
lock and a list: it always leads a group of one.

Each call still returns only after its own rows are committed, or raises the
error that stopped them; the rows of a call interrupted before a leader took
them are never stored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

Row = TypeVar("Row")


class _Request(Generic[Row]):
    __slots__ = ("done", "error", "last_id", "lead", "rows")

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows
        self.done = threading.Event()  # set when committed, failed, or asked to lead
        self.lead = False
        self.last_id = 0
        self.error: BaseException | None = None


class GroupCommit(Generic[Row]):
    """Runs `commit(rows) -> last row id` for the rows of every waiting caller at once."""

    def __init__(self, commit: Callable[[Sequence[Row]], int]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        self._waiting: list[_Request[Row]] = []
        self._leading = False  # a thread is committing a group now

    def store(self, rows: Sequence[Row]) -> int:
        """Commit `rows` (with whatever other threads are storing); the last row id of ours."""
        request = _Request(rows)
        with self._lock:
            self._waiting.append(request)
            request.lead = not self._leading
            self._leading = True
        while not request.lead:
            try:
                request.done.wait()
            except BaseException:
                self._withdraw(request)
                raise
            if request.lead or request.error is not None or request.last_id:
                break
        if request.lead:
            self._lead()
        if request.error is not None:
            raise request.error
        return request.last_id

    def _lead(self) -> None:
        """Commit everything waiting, then hand the lead to whoever arrived meanwhile."""
        with self._lock:
            group, self._waiting = self._waiting, []
        try:
            last_id = self._commit([row for request in group for row in request.rows])
        except Exception as exc:
            for request in group:
                request.error = exc
        except BaseException:
            # Interrupted (KeyboardInterrupt in the leading thread): the
            # transaction was rolled back (see connection.py), so the others
            # go to the next group. Only an interrupt landing after COMMIT
            # itself would store their rows twice, with the same messageIds.
            with self._lock:
                self._waiting[:0] = [r for r in group if not r.lead]
            self._pass_the_lead()
            raise
        else:
            for request in reversed(group):  # one transaction: consecutive ids
                request.last_id = last_id
                last_id -= len(request.rows)
        for request in group:
            request.done.set()
        self._pass_the_lead()

    def _pass_the_lead(self) -> None:
        with self._lock:
            if not self._waiting:
                self._leading = False
                return
            successor = self._waiting[0]
            successor.lead = True
        successor.done.set()

    def _withdraw(self, request: _Request[Row]) -> None:
        """A waiting caller was interrupted: unstored rows leave; a lead passed to it moves on."""
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
            handed_over = request.lead
        if handed_over:
            self._pass_the_lead()
