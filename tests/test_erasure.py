"""Erasure reaches the outbox: `purge --user-id` / `--anonymous-id` removes a person's events."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox_analytics import Client
from outbox_analytics.store import Outbox

from . import test_cli
from .test_cli import row_states

cli = test_cli.cli  # the fixture


def people(path: Path) -> list[tuple[object, object]]:
    """(userId, anonymousId) of every row left, pending, in flight or dead."""
    with Outbox(path, readonly=True) as outbox:
        return [(r.message.get("userId"), r.message.get("anonymousId")) for r in outbox.rows("all")]


@pytest.fixture
def mixed(outbox_file: Path) -> Path:
    """alice: 3 tracks (one dead), an identify and an alias from her anonymous id; bob: 2 tracks."""
    client = Client("k", outbox_path=str(outbox_file), upload=False)
    client.track("alice", "Viewed")
    client.track("bob", "Viewed")
    client.track("alice", "Clicked")
    client.track(anonymous_id="anon-a", event="Landed")
    client.identify("alice", {"email": "a@example.com"})
    client.alias("anon-a", "alice")
    client.track("bob", "Clicked")
    client.track("alice", "Paid")
    client.shutdown()
    with Outbox(outbox_file) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        first = lease.claim(1)  # alice's first event, rejected
        lease.dead_letter([first[0].id], status=400, error="bad event")
        lease.close()
    return outbox_file


def test_purge_by_user_id_removes_that_persons_pending_and_dead_events(cli, mixed: Path) -> None:
    looked = cli("purge", mixed, "--user-id", "alice", "--dry-run")
    assert looked.code == 0, looked.err
    assert looked.json() == {"would_purge": 5, "in_flight": 0}  # 3 tracks, identify, alias
    assert len(people(mixed)) == 8  # a dry run changes nothing
    done = cli("purge", mixed, "--user-id", "alice", "--yes")
    assert done.code == 0, done.err
    assert done.json() == {"purged": 5, "in_flight": 0}
    assert people(mixed) == [("bob", None), (None, "anon-a"), ("bob", None)]
    assert row_states(mixed) == {"pending": 3, "inflight": 0, "dead": 0}


def test_purge_by_user_and_anonymous_id_removes_both(cli, mixed: Path) -> None:
    done = cli("purge", mixed, "--user-id", "alice", "--anonymous-id", "anon-a", "--yes")
    assert done.json() == {"purged": 6, "in_flight": 0}
    assert people(mixed) == [("bob", None), ("bob", None)]


def test_purge_by_anonymous_id_alone(cli, mixed: Path) -> None:
    done = cli("purge", mixed, "--anonymous-id", "anon-a", "--yes")
    assert done.json() == {"purged": 2, "in_flight": 0}  # the track, and the alias naming it


def test_a_numeric_user_id_is_matched_by_its_text(cli, outbox_file: Path) -> None:
    client = Client("k", outbox_path=str(outbox_file), upload=False)
    client.track(42, "Viewed")
    client.track("42", "Viewed")
    client.track(420, "Viewed")
    client.shutdown()
    assert cli("purge", outbox_file, "--user-id", "42", "--yes").json()["purged"] == 2


def test_rows_a_dead_uploader_left_in_flight_are_erased(cli, mixed: Path) -> None:
    with Outbox(mixed) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        lease.claim(3)  # bob, alice, anon-a: in flight, then their uploader is gone
        lease.close()
    done = cli("purge", mixed, "--user-id", "alice", "--yes")
    assert done.json() == {"purged": 5, "in_flight": 0}
    assert all(user != "alice" for user, _ in people(mixed))


def test_rows_a_live_uploader_has_in_flight_are_left_and_said(cli, mixed: Path) -> None:
    with Outbox(mixed) as outbox:
        lease = outbox.try_lease()
        assert lease is not None
        lease.claim(2)  # bob's and alice's second event: on the wire now
        looked = cli("purge", mixed, "--user-id", "alice", "--dry-run")
        done = cli("purge", mixed, "--user-id", "alice", "--yes")
        lease.close()
    assert looked.json() == {"would_purge": 4, "in_flight": 1}
    assert done.json() == {"purged": 4, "in_flight": 1}
    assert "1 of this person's events are in flight" in done.err
    assert "on the wire" in done.err
    assert [user for user, _ in people(mixed)].count("alice") == 1


def test_erasure_of_many_rows_spans_transactions(cli, outbox_file: Path) -> None:
    client = Client("k", outbox_path=str(outbox_file), upload=False)
    with client.batch():
        for n in range(12_000):  # over two transactions' worth (5,000 each)
            client.track("alice" if n % 4 else "bob", "Stored", {"n": n})
    client.shutdown()
    done = cli("purge", outbox_file, "--user-id", "alice", "--yes")
    assert done.json() == {"purged": 9_000, "in_flight": 0}
    assert row_states(outbox_file) == {"pending": 3_000, "inflight": 0, "dead": 0}


@pytest.mark.parametrize(
    "args",
    [
        ("--user-id", "alice", "--state", "dead"),
        ("--anonymous-id", "a", "--older-than", "1d"),
        ("--user-id", ""),
        (),
    ],
)
def test_purge_wants_one_clear_selection(cli, mixed: Path, args) -> None:
    result = cli("purge", mixed, *args, "--yes")
    assert result.code == 2, result
    assert result.err.count("\n") == 1
    assert len(people(mixed)) == 8


def test_purge_asks_before_erasing(cli, mixed: Path) -> None:
    result = cli("purge", mixed, "--user-id", "alice")  # not a terminal, no --yes
    assert result.code == 2 and "--yes" in result.err
    assert len(people(mixed)) == 8
