"""drain()'s progress callback and FlushResult.last_error: what the CLI's drain is built on.

Real clients, real outbox files, a real HTTP receiver on 127.0.0.1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from outbox_analytics import Client
from outbox_analytics.cli import main
from outbox_analytics.delivery.flushing import FlushResult

from .receiver import Reply

CLI_SOURCE = Path(__file__).parent.parent / "outbox_analytics" / "cli.py"


def stored(path: Path, count: int) -> None:
    """`count` events stored by a client that sends none (as a crashed program leaves them)."""
    client = Client("test-write-key", outbox_path=str(path), upload=False)
    for n in range(count):
        client.track("user", "Viewed" if n % 2 else "Clicked", {"n": n})
    client.shutdown()


def no_viewed(request) -> Reply:
    """Rejects the batches that hold a Viewed event (a server that rejects all is not trusted)."""
    if any(message.get("event") == "Viewed" for message in request.batch):
        return Reply(400, body='{"message": "no Viewed here"}')
    return Reply()


def test_drain_reports_the_counts_so_far_after_each_batch(
    outbox_file: Path, make_client, receiver
) -> None:
    stored(outbox_file, 7)
    client = make_client(upload_size=2, sync_mode=True)
    reports: list[FlushResult] = []

    result = client.drain(timeout=10, progress=reports.append)

    assert [(r.sent, r.dead, r.pending) for r in reports] == [
        (2, 0, 5), (4, 0, 3), (6, 0, 1), (7, 0, 0),
    ]  # fmt: skip
    assert len(receiver.requests) == 4  # one report per batch, in order
    assert reports[-1] == result and result.last_error is None


def test_a_progress_callback_that_raises_stops_the_drain_and_is_not_called_again(
    outbox_file: Path, make_client, receiver
) -> None:
    stored(outbox_file, 6)
    client = make_client(upload_size=2, sync_mode=True)
    calls: list[FlushResult] = []

    def stop(counts: FlushResult) -> None:
        calls.append(counts)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.drain(timeout=10, progress=stop)
    assert len(calls) == 1 and calls[0].sent == 2
    assert client.stats().pending == 4  # the rest is still there, pending


def test_last_error_quotes_the_servers_status_and_words(
    outbox_file: Path, make_client, receiver
) -> None:
    receiver.responder = lambda request: Reply(503, body="down for maintenance until 10:00")
    stored(outbox_file, 3)
    client = make_client(sync_mode=True, max_retries=0)

    result = client.drain(timeout=10)

    assert result.pending == 3 and result.sent == 0
    assert result.last_error is not None
    assert "503" in result.last_error and "down for maintenance until 10:00" in result.last_error


def test_flush_fills_last_error_too(outbox_file: Path, make_client, receiver) -> None:
    receiver.responder = lambda request: Reply(503, body="down for maintenance until 10:00")
    stored(outbox_file, 3)
    client = make_client(max_retries=0)

    result = client.flush(timeout=10)

    assert result.pending == 3
    assert result.last_error is not None and "down for maintenance" in result.last_error


def test_cli_reads_no_uploader_internals() -> None:
    assert "client.uploader" not in CLI_SOURCE.read_text()  # drain() and its results say it all


def test_cli_drain_says_what_was_dead_lettered_once(
    outbox_file: Path, receiver, capsys: pytest.CaptureFixture[str], caplog
) -> None:
    """The CLI prints its summary; the library's own log line (for library users) is left out."""
    stored(outbox_file, 4)
    receiver.responder = no_viewed

    with caplog.at_level(logging.ERROR, logger="outbox_analytics"):
        code = main(
            ["drain", str(outbox_file), "--host", receiver.url, "--write-key", "test-write-key"]
        )

    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("rejected") == 1 and "events were rejected and dead-lettered" in err, err
    assert not [r for r in caplog.records if "dead-letter" in r.getMessage()]
    assert not logging.getLogger("outbox_analytics").filters  # gone with the drain


def test_a_library_drain_still_logs_what_it_dead_lettered(
    outbox_file: Path, make_client, receiver, caplog
) -> None:
    receiver.responder = no_viewed
    stored(outbox_file, 4)
    client = make_client(sync_mode=True, upload_size=1)
    with caplog.at_level(logging.ERROR, logger="outbox_analytics"):
        assert client.drain(timeout=10).dead == 2
    assert any("dead-letter state" in record.getMessage() for record in caplog.records)
