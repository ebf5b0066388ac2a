"""Finding outbox files and draining one: `ls`, the host a file records, `drain PATH`."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest

from outbox_analytics import Client
from outbox_analytics.store import Outbox

from . import test_cli

cli = test_cli.cli  # the fixture


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OUTBOX_ANALYTICS_WRITE_KEY", "SEGMENT_WRITE_KEY", "OUTBOX_ANALYTICS_PATH"):
        monkeypatch.delenv(name, raising=False)


def stored_for(path: Path, host: str | None, count: int = 3, key: str = "k") -> None:
    """`count` pending events in `path`, bound to `key` and (if given) `host`."""
    client = Client(key, outbox_path=str(path), upload=False)
    for n in range(count):
        client.track("user", "Stored", {"n": n})
    client.shutdown()
    if host is not None:  # as a client that uploads would record it
        Client(key, host=host, outbox_path=str(path), sync_mode=True).shutdown()


# -- the host a file records --------------------------------------------------------


def test_a_file_records_its_host_without_credentials(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    host = "https://someone:s3cret-word@api.eu.segment.io:8443/base"
    Client("k", host=host, outbox_path=str(path), sync_mode=True).shutdown()
    with Outbox(path, readonly=True) as outbox:
        assert outbox.owner_host() == "https://api.eu.segment.io:8443"
    assert b"s3cret-word" not in path.read_bytes()


def test_a_file_bound_before_hosts_were_recorded_learns_its_host(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    Client("k", host="http://127.0.0.1:9", outbox_path=str(path), sync_mode=True).shutdown()
    with sqlite3.connect(path) as conn:  # as an earlier version left it: the hash only
        conn.execute("DELETE FROM outbox_meta WHERE key = 'owner_host_url'")
    with Outbox(path, readonly=True) as outbox:
        assert outbox.owner_host() is None
    Client("k", host="http://127.0.0.1:9", outbox_path=str(path), sync_mode=True).shutdown()
    with Outbox(path, readonly=True) as outbox:
        assert outbox.owner_host() == "http://127.0.0.1:9"


def test_a_client_for_another_host_is_told_which_host_the_file_has(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    Client("k", host="https://api.eu.segment.io", outbox_path=str(path), sync_mode=True).shutdown()
    with pytest.raises(Exception, match="another") as caught:
        Client("k", host="https://api.segment.io", outbox_path=str(path), sync_mode=True)
    said = str(caught.value)
    assert "host https://api.eu.segment.io, not https://api.segment.io" in said


# -- ls ---------------------------------------------------------------------------------


def test_ls_lists_outbox_files_with_host_and_counts(cli, tmp_path: Path) -> None:
    stored_for(tmp_path / "eu.sqlite3", "https://api.eu.segment.io", count=3)
    stored_for(tmp_path / "stored-only.sqlite3", None, count=2)
    (tmp_path / "notes.txt").write_text("not an outbox")
    (tmp_path / "empty.sqlite3").write_bytes(b"")
    result = cli("ls", tmp_path, "--json")
    assert result.code == 0, result.err
    listed = {Path(entry["path"]).name: entry for entry in result.json()}
    assert set(listed) == {"eu.sqlite3", "stored-only.sqlite3"}
    eu = listed["eu.sqlite3"]
    assert (eu["host"], eu["pending"], eu["dead"], eu["uploader_alive"]) == (
        "https://api.eu.segment.io",
        3,
        0,
        False,
    )
    assert eu["oldest_pending_age_s"] >= 0
    assert listed["stored-only.sqlite3"]["host"] is None
    table = cli("ls", tmp_path).out
    assert "https://api.eu.segment.io" in table and "(not recorded)" in table


def test_ls_looks_in_the_state_and_fallback_directories(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    state, temp = tmp_path / "state", tmp_path / "tmp"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    (state / "outbox-analytics").mkdir(parents=True)
    (temp / f"outbox-analytics-{os.getuid()}").mkdir(parents=True)
    stored_for(state / "outbox-analytics" / "outbox-0123456789abcdef.sqlite3", None)
    stored_for(temp / f"outbox-analytics-{os.getuid()}" / "outbox-fedcba9876543210.sqlite3", None)
    names = {Path(entry["path"]).name for entry in cli("ls", "--json").json()}
    assert names == {"outbox-0123456789abcdef.sqlite3", "outbox-fedcba9876543210.sqlite3"}


def test_ls_says_when_an_uploader_is_alive(cli, tmp_path: Path) -> None:
    path = tmp_path / "live.sqlite3"
    stored_for(path, "http://127.0.0.1:9")
    with Outbox(path) as outbox:
        lease = outbox.try_lease()  # an uploader at work
        assert lease is not None
        [entry] = cli("ls", tmp_path, "--json").json()
        lease.close()
    assert entry["uploader_alive"] is True
    [entry] = cli("ls", tmp_path, "--json").json()
    assert entry["uploader_alive"] is False


# -- drain PATH ------------------------------------------------------------------------


def test_drain_sends_to_the_host_the_file_records(cli, tmp_path: Path, receiver) -> None:
    path = tmp_path / "o.db"
    stored_for(path, receiver.url, count=4)
    result = cli("drain", path, env={"OUTBOX_ANALYTICS_WRITE_KEY": "k"})
    assert result.code == 0, result.err
    assert result.json() == {"sent": 4, "dead": 0, "pending": 0}
    assert len(receiver.accepted()) == 4
    assert receiver.url in result.err  # where they went, said


def test_drain_takes_the_key_from_segment_write_key(cli, tmp_path: Path, receiver) -> None:
    path = tmp_path / "o.db"
    stored_for(path, receiver.url, count=2)
    result = cli("drain", path, "--host", receiver.url, env={"SEGMENT_WRITE_KEY": "k"})
    assert result.code == 0, result.err
    assert len(receiver.accepted()) == 2


def test_a_host_mismatch_names_both_hosts(cli, tmp_path: Path, receiver) -> None:
    path = tmp_path / "o.db"
    stored_for(path, receiver.url)
    result = cli("drain", path, "--host", "http://127.0.0.1:9", env={"SEGMENT_WRITE_KEY": "k"})
    assert result.code == 2
    assert f"host {receiver.url}, not http://127.0.0.1:9" in result.err
    assert "--host" in result.err and "--force" in result.err
    assert receiver.requests == []


def test_a_key_mismatch_says_so_and_shows_no_key(cli, tmp_path: Path, receiver) -> None:
    path = tmp_path / "o.db"
    stored_for(path, receiver.url, key="old-key-123")
    result = cli("drain", path, env={"SEGMENT_WRITE_KEY": "new-key-456"})
    assert result.code == 2
    assert "another write key" in result.err and "--force" in result.err
    assert "old-key-123" not in result.err and "new-key-456" not in result.err


def test_drain_force_with_a_new_key_keeps_the_files_host(cli, tmp_path: Path, receiver) -> None:
    path = tmp_path / "o.db"
    stored_for(path, receiver.url, count=3, key="old-key")
    result = cli("drain", path, "--force", env={"SEGMENT_WRITE_KEY": "rotated-key"})
    assert result.code == 0, result.err
    assert len(receiver.accepted()) == 3


def test_a_host_with_a_path_is_never_guessed_from_the_file(cli, tmp_path: Path, receiver) -> None:
    """The file records scheme, host and port only: a path must be given, never dropped."""
    path = tmp_path / "o.db"
    stored_for(path, receiver.url + "/proxy/segment", count=2)
    plain = cli("drain", path, env={"SEGMENT_WRITE_KEY": "k"})
    assert plain.code == 2
    assert f"host {receiver.url} with another path" in plain.err and "--host" in plain.err
    forced = cli("drain", path, "--force", env={"SEGMENT_WRITE_KEY": "k"})
    assert forced.code == 2 and "a path it does not record: pass --host" in forced.err
    assert receiver.requests == []
    with Outbox(path, readonly=True) as outbox:  # --force refused: the owner is unchanged
        assert outbox.owned_by_host(receiver.url + "/proxy/segment")
