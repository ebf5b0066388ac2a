"""What the command line prints for people cannot drive the operator's terminal.

Event fields, a server's error text and paths are shown with control, bidi
and invisible characters escaped (`\\x1b`, `\\u202e`), so that no screen is
cleared, no title set and no line rewritten by data; JSON output keeps the
exact strings. Real outboxes, a real HTTP server on 127.0.0.1, the command
line run in-process.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from pathlib import Path

import pytest

from outbox_analytics import Client
from outbox_analytics.cli import main, printable
from outbox_analytics.store import Outbox, encode_message

from .receiver import Reply
from .test_cli import Ran

# What must never reach a terminal raw: C0 controls but the line breaks and
# tabs our own tables use, DEL, C1 controls, bidi embeddings/overrides/isolates.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

CLEAR, TITLE, CSI, RTL = "\x1b[2J", "\x1b]0;title\x07", "\x9b", "\u202e"
# Short event names, one trick each, so that each fits the list's 24 columns escaped.
EVENTS = {
    f"A{CLEAR}": r"A\x1b[2J",
    f"B{TITLE}": r"B\x1b]0;title\x07",
    "C\rall good": r"C\rall good",
    f"D{CSI}1m": r"D\x9b1m",
    f"E{RTL}cba": r"E\u202ecba",
    "F\nG\tH": r"F\nG\tH",
}
USER = f"user{CLEAR}{RTL}\r"
PROPERTIES = {f"k{TITLE}": f"v{CSI}\n{RTL}", "plain": "ok"}
# A server's answer that would clear the screen, claim all is well and retitle the window.
SERVER_TEXT = f"{CLEAR}all good, nothing pending{TITLE}{CSI}2K{RTL}"
SERVER_SHOWN = r"\x1b[2Jall good, nothing pending\x1b]0;title\x07\x9b2K\u202e"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run the command line in this process: `cli("status", path)`."""

    def run(*args: object) -> Ran:
        capsys.readouterr()
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


def assert_safe(ran: Ran) -> None:
    for name, text in (("stdout", ran.out), ("stderr", ran.err)):
        found = RAW.search(text)
        assert found is None, f"{name} carries {found.group()!r} raw: {text!r}"


def drain(cli, path: Path, url: str) -> Ran:
    return cli("drain", path, "--host", url, "--max-retries", "0", "--write-key", "k")


@dataclasses.dataclass
class Hostile:
    path: Path
    unavailable: Ran  # the drain a 503 answered: its message quotes the server


@pytest.fixture
def hostile(tmp_path: Path, cli, receiver) -> Hostile:
    """Rejected events (dead, the server's text as last error), then the same still pending."""
    path = tmp_path / "outbox.db"
    track_all(path, "Fine")
    receiver.responder = reject_all_but("Fine")
    assert drain(cli, path, receiver.url).json() == {"sent": 1, "dead": 7, "pending": 0}
    track_all(path)
    receiver.responder = lambda request: Reply(503, body=SERVER_TEXT)
    unavailable = drain(cli, path, receiver.url)
    assert unavailable.code == 75 and unavailable.json()["pending"] == 7
    return Hostile(path, unavailable)


def track_all(path: Path, *more: str) -> None:
    """Each hostile event and a page, then plain events named `more`."""
    client = Client("k", outbox_path=str(path), upload=False)
    for event in [*EVENTS, *more]:
        client.track(USER, event, PROPERTIES)
    client.page(USER, name=f"Docs{CLEAR}")
    client.shutdown()


def reject_all_but(event: str):
    """A server that rejects every batch holding an event other than `event`, in SERVER_TEXT.

    (It accepts one: a server that rejects all alike is taken for the wrong
    endpoint, and the events stay pending.)
    """

    def answer(request) -> Reply:
        if all(message.get("event") == event for message in request.batch):
            return Reply()
        return Reply(400, body=SERVER_TEXT)

    return answer


def test_drain_quotes_the_server_escaped(hostile: Hostile) -> None:
    assert_safe(hostile.unavailable)  # "... 7 events still pending: HTTP 503: ..."
    assert SERVER_SHOWN in hostile.unavailable.err


def test_list_shows_event_names_and_server_text_escaped(cli, hostile: Hostile) -> None:
    listed = cli("list", hostile.path, "--state", "all")
    assert listed.code == 0
    assert_safe(listed)
    lines = listed.out.splitlines()
    assert len(lines) == 1 + 2 * (len(EVENTS) + 1)  # a newline in a name broke no row
    for escaped in EVENTS.values():
        assert sum(escaped in line for line in lines) == 2  # dead and pending
    assert sum(r"Docs\x1b[2J" in line for line in lines) == 2
    dead = [line for line in lines if " dead " in line]
    assert all(r"\x1b[2Jall good, nothing pending\x1b]0;" in line for line in dead)


def test_status_shows_the_servers_text_escaped(cli, hostile: Hostile) -> None:
    status = cli("status", hostile.path)
    assert status.code == 0
    assert_safe(status)
    assert SERVER_SHOWN in status.out


def test_json_keeps_the_exact_strings(cli, hostile: Hostile) -> None:
    path = hostile.path
    documents = {
        "list --json": cli("list", path, "--state", "all", "--json").json(),
        "list --jsonl": lines_of(cli("list", path, "--state", "all", "--jsonl")),
        "export": lines_of(cli("export", path)),
    }
    for command, messages in documents.items():
        tracked = [m for m in messages if m["type"] == "track"]
        assert [m["event"] for m in tracked] == [*EVENTS, *EVENTS], command
        assert {m["userId"] for m in messages} == {USER}, command
        assert all(m["properties"] == PROPERTIES for m in tracked), command
        assert all(SERVER_TEXT in m["_outbox"]["last_error"] for m in messages), command
    first = documents["export"][0]
    shown = cli("show", path, first["messageId"])
    assert json.loads(shown.out) == first
    status = cli("status", path, "--json")
    assert SERVER_TEXT in status.json()["head_last_error"]
    for ran in (shown, status):
        assert_safe(ran)  # JSON escapes them itself (it is ASCII): exact, and still safe


def lines_of(ran: Ran) -> list[dict]:
    assert ran.code == 0
    assert_safe(ran)
    return [json.loads(line) for line in ran.out.splitlines()]


def test_a_file_path_is_shown_escaped(cli, tmp_path: Path) -> None:
    folder = tmp_path / f"jobs{CLEAR}{RTL}"
    folder.mkdir()
    path = folder / "outbox.db"
    client = Client("k", outbox_path=str(path), upload=False)
    client.shutdown()
    status = cli("status", path)
    assert_safe(status)
    assert r"jobs\x1b[2J\u202e" in status.out
    missing = cli("status", folder / f"gone{TITLE}")
    assert missing.code == 2
    assert_safe(missing)
    assert r"gone\x1b]0;title\x07" in missing.err
    assert cli("status", path, "--json").json()["path"] == str(path)


def test_usage_errors_quote_the_arguments_escaped(cli, tmp_path: Path) -> None:
    ran = cli("list", tmp_path / "o.db", f"--x{CLEAR}")
    assert ran.code == 2
    assert_safe(ran)
    assert r"--x\x1b[2J" in ran.err


def test_import_errors_quote_the_file_escaped(cli, tmp_path: Path) -> None:
    source = tmp_path / f"in{CLEAR}.jsonl"
    source.write_text(json.dumps({"type": f"t{TITLE}", "userId": "u"}) + "\n")
    ran = cli("import", tmp_path / "o.db", source)
    assert ran.code == 2
    assert_safe(ran)
    assert r"in\x1b[2J.jsonl:1:" in ran.err


def test_list_shows_fields_another_program_wrote_escaped(cli, tmp_path: Path) -> None:
    """No client would store this type (import refuses it too), but the file is anyone's."""
    path = tmp_path / "o.db"
    with Outbox(path) as outbox:
        outbox.append(encode_message({"type": f"{TITLE}x", "name": f"{RTL}n", "messageId": "m"}))
    listed = cli("list", path)
    assert_safe(listed)
    assert r"\x1b]0;title\x07x" in listed.out and r"\u202en" in listed.out
    assert cli("list", path, "--json").json()[0]["type"] == f"{TITLE}x"


def test_check_shows_what_another_program_wrote_escaped(cli, tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    client = Client("k", outbox_path=str(path), upload=False)
    client.track("u", "E")
    client.shutdown()
    with sqlite3.connect(path) as conn:  # a status no outbox writes, and text at that
        conn.execute("UPDATE ack_queue_default SET status = ?", (f"{CLEAR}ok",))
    conn.close()
    checked = cli("check", path)
    assert checked.code == 1
    assert_safe(checked)
    assert r"unknown status \x1b[2Jok" in checked.out
    problems = cli("check", path, "--json").json()["problems"]
    assert any(f"unknown status {CLEAR}ok" in problem for problem in problems)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Signed Up", "Signed Up"),
        ("日本語 ünïcode 👍 C:\\path", "日本語 ünïcode 👍 C:\\path"),  # printable: as it is
        ("a\nb\tc\rd\x00e\x1bf\x7fg", r"a\nb\tc\rd\x00e\x1bf\x7fg"),
        ("\x85\x9b\x9f", r"\x85\x9b\x9f"),  # C1: NEL, the 8-bit CSI
        (
            "\u202a\u202e\u2066\u2069\u200e\u200f\u061c",
            r"\u202a\u202e\u2066\u2069\u200e\u200f\u061c",
        ),
        ("Sign\u200bUp\u2060\ufeff\u00ad", r"Sign\u200bUp\u2060\ufeff\xad"),  # invisible
        ("Sign\xa0Up\u3000", r"Sign\xa0Up\u3000"),  # looks like a space, is not one
        ("\u2028\u2029", r"\u2028\u2029"),  # line and paragraph separators
        ("\U000e0041\U000e0042", r"\U000e0041\U000e0042"),  # tags: hidden ASCII
        ("\udc9b", r"\udc9b"),  # a byte that was not UTF-8 (surrogateescape)
    ],
)
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(text).isprintable()
