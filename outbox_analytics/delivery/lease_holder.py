"""The lease holder: one client's upload lease, the batch claimed ahead, and whose turn it is.

Three callers deliver for a client: its background thread, `drain()` and
sync_mode sends, on any number of threads. They take turns: `turn()` is the
one lock, and the lease and the batch claimed ahead change only inside a
turn. Everything here belongs to one process: in a forked child (whatever
forked it) the parent's lease is not ours, its rows in flight are not ours
to release, and its lock may be held by a thread that does not exist here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator

from .. import process
from ..store import Claimed, Outbox, UploadLease

__all__ = ["LeaseHolder"]

log = logging.getLogger("outbox_analytics")


class LeaseHolder:
    """Takes, keeps and gives back one outbox's upload lease for one client."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._forget_parent()
        _holders.add(self)

    def _forget_parent(self) -> None:
        self._turn = threading.Lock()
        self._lease: UploadLease | None = None
        self._ahead: tuple[UploadLease, list[Claimed]] | None = None
        # Held while delivered rows are counted and deleted, and while a flush
        # counts what is left: it then sees each batch once, as sent or as left.
        self.deleting = threading.RLock()
        # Held from a failure's write to the file until on_error has been
        # called: a flush that saw the failure waits for it (see
        # flushing._wait_for_reports), as Segment's flush waits for its queue.
        self.reporting = threading.RLock()
        self._pid = process.known_pid()

    @property
    def holds(self) -> bool:
        return self._lease is not None and self._pid == process.known_pid()

    @property
    def lease(self) -> UploadLease | None:
        """The lease, if held (inside a turn)."""
        return self._lease

    @contextlib.contextmanager
    def turn(self, timeout: float | None = None) -> Iterator[bool]:
        """Hold the turn inside the block; yields False if it did not come within `timeout`."""
        if self._pid != process.current_pid():
            self._forget_parent()
        got = self._turn.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
        try:
            yield got
        finally:
            if got:
                self._turn.release()

    def try_turn(self) -> bool:
        """Take the turn if free (release it with `end_turn`)."""
        return self._turn.acquire(blocking=False)

    def end_turn(self) -> None:
        self._turn.release()

    # -- inside a turn --------------------------------------------------------------

    def take(self) -> UploadLease | None:
        """The lease: kept while valid, else taken again if no one holds it."""
        if self._lease is not None and not self._lease.valid:
            self.give_up()  # the file was moved aside
        if self._lease is None:
            self._lease = self.outbox.try_lease()
        return self._lease

    def give_up(self) -> None:
        """Give the lease back, with the batch claimed ahead."""
        self.release_ahead()
        # Held until closed: a flush asking meanwhile must not take the lease,
        # still locked, for another process's.
        lease = self._lease
        try:
            if lease is not None:
                lease.close()
        finally:
            self._lease = None

    def reclaim(self) -> None:
        """After a failure mid-batch: every row in flight is ours (the lease is held): pending."""
        self._ahead = None  # (reclaimed with the rest)
        if self._lease is None:
            return
        try:
            self._lease.reclaim()
        except Exception:
            log.debug("could not take back in-flight rows yet", exc_info=True)

    def claim(self, count: int, max_bytes: int) -> list[Claimed]:
        """The batch claimed ahead if there is one, else the oldest pending rows."""
        lease = self._lease
        if lease is None:
            return []
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is lease:
            return ahead[1]
        return lease.claim(count, max_bytes=max_bytes)

    @property
    def has_ahead(self) -> bool:
        return self._ahead is not None

    def claim_ahead(self, count: int, max_bytes: int) -> None:
        """Claim the next batch while one is on the wire (never raises: it is only a head start).

        Only a full one: rows that trickle in while a batch is on the wire
        wait for the batch to fill up (see schedule.next_delay), instead of
        going at once as a batch of a few.
        """
        lease = self._lease
        if self._ahead is not None or lease is None:
            return
        try:
            rows = lease.claim(count, max_bytes=max_bytes, whole=True)
        except Exception:  # (a busy or damaged file): the next batch is claimed as usual
            log.debug("could not claim the next batch ahead", exc_info=True)
            return
        if rows:
            self._ahead = (lease, rows)

    def release_ahead(self) -> None:
        """Put back the batch claimed ahead: it must not overtake rows going back to pending."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        lease, rows = ahead
        try:
            lease.release([row.id for row in rows], attempts=0)
        except Exception:  # left in flight: the next holder of the lease reclaims them
            log.debug("could not put back the batch claimed ahead", exc_info=True)

    def claimed_below(self, row_id: int) -> bool:
        """Whether this process holds the lease and has claimed no row as far as `row_id` yet."""
        lease = self._lease
        return self.holds and lease is not None and lease.claimed_through < row_id


_holders: weakref.WeakSet[LeaseHolder] = weakref.WeakSet()


def _forget_parents() -> None:
    for holder in list(_holders):
        holder._forget_parent()


process.on_new_process(_forget_parents)
