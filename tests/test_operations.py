"""operations: what `ls` and `import` do, called without the CLI, on real files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from outbox_analytics import Client, operations

T = "2026-01-01T00:00:00Z"


def test_find_outboxes_lists_outboxes_only_with_their_counts(tmp_path: Path) -> None:
    outbox = tmp_path / "app.db"
    client = Client("k", host="http://127.0.0.1:9", outbox_path=str(outbox), upload=False)
    client.track("u", "E")
    (tmp_path / "notes.txt").write_text("not an outbox")
    (tmp_path / "broken.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)

    found = {Path(entry["path"]).name: entry for entry in operations.find_outboxes([str(tmp_path)])}
    client.shutdown()

    assert "notes.txt" not in found and "app.db-wal" not in found
    assert found["app.db"]["pending"] == 1 and found["app.db"]["uploader_alive"] is False
    assert "error" in found["broken.db"]  # unreadable: said, not skipped
    assert operations.summarize(str(tmp_path / "gone.db")) is None


def test_read_messages_validates_each_line_and_drops_what_export_added() -> None:
    lines = [
        json.dumps({"type": "track", "userId": "u", "event": "E", "messageId": "m1",
                    "timestamp": T, "_outbox": {"id": 1}}),
        "",
        json.dumps({"type": "identify", "userId": "u", "messageId": "m2", "timestamp": T}),
    ]  # fmt: skip
    messages = list(operations.read_messages(io.StringIO("\n".join(lines)), "in.jsonl"))
    assert [m["messageId"] for m in messages] == ["m1", "m2"]
    assert "_outbox" not in messages[0]


@pytest.mark.parametrize(
    ("line", "said"),
    [("{not json", "in.jsonl:2: not JSON"), ('{"type": "track", "userId": "u"}', "in.jsonl:2: ")],
)
def test_read_messages_names_the_bad_line(line: str, said: str) -> None:
    good = json.dumps({"type": "identify", "userId": "u", "messageId": "m", "timestamp": T})
    with pytest.raises(ValueError, match=said):
        list(operations.read_messages(io.StringIO(f"{good}\n{line}\n"), "in.jsonl"))


def test_change_refuses_what_is_not_an_outbox_and_creates_only_when_asked(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file, not an outbox"):
        operations.change(str(empty), lambda outbox: outbox.stats())
    with pytest.raises(ValueError, match="no outbox file at"):
        operations.change(str(tmp_path / "missing.db"), lambda outbox: outbox.stats())
    made = operations.change(str(tmp_path / "new.db"), lambda o: o.stats().pending, create=True)
    assert made == 0 and (tmp_path / "new.db").exists()
