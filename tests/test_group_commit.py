"""Group commit (fsync=True): one sync for every thread waiting, each call still its own."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from outbox_analytics.errors import OutboxUnavailable
from outbox_analytics.store import Outbox, encode_message
from outbox_analytics.store.group_commit import GroupCommit


class _Table:
    """A commit function over a list: ids are positions, like consecutive row ids."""

    def __init__(self, delay: float = 0.0) -> None:
        self.rows: list[str] = []
        self.groups: list[int] = []
        self.delay = delay
        self.fail_next: BaseException | None = None
        self.gate: threading.Event | None = None  # the next commit waits for it

    def commit(self, rows: Sequence[str]) -> int:
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.wait(10)
        failure, self.fail_next = self.fail_next, None
        if failure is not None:
            raise failure
        time.sleep(self.delay)  # a sync: the others queue up meanwhile
        self.groups.append(len(rows))
        self.rows.extend(rows)
        return len(self.rows)


def _run_threads(group: GroupCommit[str], threads: int, calls: int) -> dict[str, int]:
    returned: dict[str, int] = {}

    def work(name: int) -> None:
        for number in range(calls):
            row = f"{name}-{number}"
            returned[row] = group.store([row])

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    return returned


def test_threads_share_commits_and_each_gets_its_own_row_id() -> None:
    table = _Table(delay=0.002)
    group: GroupCommit[str] = GroupCommit(table.commit)
    returned = _run_threads(group, threads=8, calls=50)
    assert len(table.rows) == 400 and sorted(table.rows) == sorted(returned)
    for row, row_id in returned.items():
        assert table.rows[row_id - 1] == row  # the id returned is the row's own
    assert len(table.groups) < 400 / 3  # most commits carried several threads' rows


def test_a_failed_commit_fails_every_call_in_it_and_the_next_ones_go_on() -> None:
    table = _Table()
    group: GroupCommit[str] = GroupCommit(table.commit)
    table.fail_next = OutboxUnavailable("disk full", "/x")
    with pytest.raises(OutboxUnavailable):
        group.store(["lost"])
    assert group.store(["kept"]) == 1
    assert table.rows == ["kept"]


def test_an_interrupted_leader_hands_the_others_on_to_the_next_group() -> None:
    table = _Table()
    group: GroupCommit[str] = GroupCommit(table.commit)
    gate = table.gate = threading.Event()
    table.fail_next = KeyboardInterrupt()  # in the leading thread, mid-commit
    leader_raised: list[BaseException] = []

    def lead() -> None:
        try:
            group.store(["leader's"])
        except BaseException as exc:
            leader_raised.append(exc)

    leader = threading.Thread(target=lead)
    leader.start()
    time.sleep(0.05)  # the leader waits at the gate: these two queue behind it
    followers = _threads_storing(group, ["a", "b"])
    time.sleep(0.05)
    gate.set()
    leader.join(10)
    for follower in followers:
        follower.join(10)
    assert isinstance(leader_raised[0], KeyboardInterrupt)
    assert sorted(table.rows) == ["a", "b"]  # stored by the next leader; the leader's not


def _threads_storing(group: GroupCommit[str], rows: list[str]) -> list[threading.Thread]:
    threads = [threading.Thread(target=group.store, args=([row],)) for row in rows]
    for thread in threads:
        thread.start()
    return threads


class _Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


def test_a_caller_interrupted_while_waiting_stores_nothing_and_blocks_nobody() -> None:
    table = _Table()
    group: GroupCommit[str] = GroupCommit(table.commit)
    gate = table.gate = threading.Event()
    leader = threading.Thread(target=group.store, args=(["first"],))
    leader.start()
    time.sleep(0.05)  # the leader waits at the gate with its own row only
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(_Interrupted):
            group.store(["interrupted"])  # this (main) thread waits as a follower
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    gate.set()
    leader.join(10)
    assert group.store(["after"]) == 2  # not stuck: the lead came back
    assert table.rows == ["first", "after"]


def test_fsync_appends_from_many_threads_are_all_stored_under_their_own_ids(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "outbox.sqlite3", fsync=True) as outbox:
        returned: dict[int, str] = {}

        def work(name: int) -> None:
            for number in range(40):
                message_id = f"{name}-{number}"
                row_id = outbox.append(encode_message({"messageId": message_id}))
                assert row_id is not None
                returned[row_id] = message_id

        workers = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        stored = {row.id: row.message["messageId"] for row in outbox.rows("pending")}
    assert len(stored) == 320
    assert stored == returned
