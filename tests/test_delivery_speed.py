"""Delivery at the receiver's speed, without giving up a guarantee (issue 25).

Full batches under steady load, and the rules a faster uploader must keep.
"""

from __future__ import annotations

import time
from pathlib import Path

from outbox_analytics.store import Outbox

from .conftest import outbox_with


def test_a_whole_claim_takes_a_full_batch_or_nothing(outbox_file: Path) -> None:
    outbox_with(outbox_file, 6)
    with Outbox(str(outbox_file)) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        assert lease.claim(10, whole=True) == []  # 6 pending: not a full batch
        assert outbox.stats().inflight == 0  # and nothing was taken
        full = lease.claim(4, whole=True)
        assert [row.message["properties"]["n"] for row in full] == [0, 1, 2, 3]
        # the byte limit makes a batch full too (2 pending: it takes the first)
        assert len(lease.claim(10, max_bytes=1, whole=True)) == 1
        lease.close()


def test_a_claim_marks_only_the_pending_rows_it_takes(outbox_file: Path) -> None:
    """Claims mark their rows by range: a dead row inside the range stays dead."""
    outbox_with(outbox_file, 6)
    with Outbox(str(outbox_file)) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        first, second = lease.claim(2)
        lease.dead_letter([second.id], status=400, error="rejected")
        lease.release([first.id], attempts=0)  # back before the dead row
        taken = lease.claim(10)
        assert [row.id for row in taken] == [first.id] + [second.id + n for n in range(1, 5)]
        assert [row.id for row in outbox.rows("dead")] == [second.id]
        assert outbox.stats().inflight == 5
        lease.close()


def test_batches_are_full_under_steady_load(make_client, receiver) -> None:
    """Events arriving steadily (about 4,000/s) go in full batches, not in what
    happened to be there while the previous batch was on the wire."""
    client = make_client(upload_size=20, upload_interval=0.5)
    started = time.perf_counter()
    for n in range(1200):
        client.track("user-1", "Steady", {"n": n})
        if n % 10 == 9:  # paced: the uploader keeps up, a backlog never builds
            time.sleep(max(0.0, started + (n + 1) / 4000 - time.perf_counter()))
    sizes = [len(request.batch) for request in receiver.requests]
    assert client.flush(timeout=10).pending == 0
    assert len(sizes) >= 5, sizes  # (the load was steady: it was being delivered meanwhile)
    assert sum(sizes) / len(sizes) >= 18, sizes  # full, but for one cut short by a stall
