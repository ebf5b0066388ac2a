"""The operator's command line: a thin layer over the library's public calls.

Data goes to stdout (tables for people, --json for programs), diagnostics to
stderr. Exit codes:

    0   success
    1   a check failed: `status --check` over a threshold, `check` found
        problems, `demo` lost events
    2   bad usage or bad input: a path that is not an outbox, malformed JSON,
        an unknown id; nothing was changed
    75  `drain` left events pending after transient errors (EX_TEMPFAIL)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any, NoReturn

from .client import DEFAULT_HOST, Client
from .errors import OutboxAnalyticsError, OutboxError
from .store import Outbox, Row, maintenance
from .utils import clean

__all__ = ["main"]

EXIT_OK, EXIT_FAILED_CHECK, EXIT_BAD_INPUT, EXIT_TEMPFAIL = 0, 1, 2, 75
WRITE_KEY_ENV = "OUTBOX_ANALYTICS_WRITE_KEY"
_CALLS = ("track", "identify", "page", "screen", "group", "alias")


class UsageError(Exception):
    """Bad input on the command line: one line on stderr, exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, OutboxAnalyticsError, ValueError, TypeError, AssertionError) as exc:
        print(f"outbox-analytics: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(
            f"outbox-analytics: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr
        )
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


# -- the parser -------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the usage is a --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="outbox-analytics",
        description="Inspect, repair and drain outbox-analytics outbox files.",
        epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input, 75 drain left events pending.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    status = command("status", _status, "counts of an outbox: pending, in flight, dead, dropped")
    _path(status)
    _json_flag(status)
    status.add_argument("--check", action="store_true", help="exit 1 if a threshold is exceeded")
    status.add_argument("--max-age", type=_duration, help="oldest pending event (e.g. 90s, 15m)")
    status.add_argument("--max-pending", type=int, help="pending events")
    status.add_argument("--max-dead", type=int, help="dead-lettered events")

    listing = command("list", _list, "the stored messages, as they will be sent")
    _path(listing)
    _state(listing)
    listing.add_argument("--type", choices=_CALLS, help="only messages of this type")
    listing.add_argument("--event", help="only track events with this name")
    listing.add_argument("--limit", type=int, default=50, help="at most N rows (default 50)")
    _json_flag(listing)

    show = command("show", _show, "one message, by row id or messageId, as JSON")
    _path(show)
    show.add_argument("key", metavar="ID|MESSAGE_ID")

    export = command("export", _export, "write messages as JSON Lines, streamed")
    _path(export)
    _state(export, default="all")
    export.add_argument("-o", "--output", help="file to write (default: stdout)")

    imports = command("import", _import, "enqueue exported messages, skipping those present")
    _path(imports, must_exist=False)
    imports.add_argument("file", help="JSON Lines written by export ('-' for stdin)")

    requeue = command("requeue", _requeue, "move dead messages back to pending")
    _path(requeue)
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, nargs="+", dest="ids", help="row ids")
    which.add_argument("--all", action="store_true", help="every dead message")
    _destructive(requeue)

    purge = command("purge", _purge, "delete dead messages for good")
    _path(purge)
    purge.add_argument("--state", choices=["dead"], required=True, help="only dead rows")
    purge.add_argument("--older-than", type=_duration, help="enqueued longer ago than this")
    _destructive(purge)

    drain = command("drain", _drain, "send what is pending now, then exit")
    _path(drain)
    drain.add_argument("--write-key", help=f"the write key (default: ${WRITE_KEY_ENV})")
    drain.add_argument("--host", help="the API's base URL (default: Segment's)")
    drain.add_argument("--timeout", type=float, help="give up after this many seconds")
    drain.add_argument("--max-retries", type=int, default=3, help="per batch (default 3)")
    drain.add_argument(
        "--force",
        action="store_true",
        help="send with this write key and host even if the outbox was made for others",
    )

    vacuum = command("vacuum", _vacuum, "give the space of delivered rows back to the disk")
    _path(vacuum)

    check = command("check", _check, "SQLite's integrity check and the outbox's invariants")
    _path(check)
    _json_flag(check)

    for call in _CALLS:
        _event_command(command(call, _append, f"store one {call} event durably (not sent)"), call)

    collector = command("collector", _collector, "a local Segment-compatible receiver")
    collector.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    collector.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    collector.add_argument("--out", help="append messages as JSON Lines here (default stdout)")

    demo = command("demo", _demo, "a crash, a replay and a count: no account, no network")
    demo.add_argument("--events", type=int, default=3000, help="events the job tracks")
    demo.add_argument("--dir", help="where to put the outbox (default: a new temporary dir)")
    return parser


def _path(parser: argparse.ArgumentParser, must_exist: bool = True) -> None:
    parser.add_argument("path", help="the outbox file")
    parser.set_defaults(must_exist=must_exist)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON for programs")


def _state(parser: argparse.ArgumentParser, default: str = "pending") -> None:
    parser.add_argument(
        "--state",
        default=default,
        choices=["pending", "inflight", "dead", "all"],
        help=f"which rows (default {default})",
    )


def _destructive(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="say what would change, change nothing"
    )
    parser.add_argument("--yes", action="store_true", help="do not ask (needed off a terminal)")


def _event_command(parser: argparse.ArgumentParser, call: str) -> None:
    _path(parser, must_exist=False)
    parser.add_argument("--write-key", help=f"the write key (default: ${WRITE_KEY_ENV})")
    parser.add_argument("--user-id")
    if call != "alias":
        parser.add_argument("--anonymous-id")
    json_options = {
        "track": ["properties"],
        "identify": ["traits"],
        "page": ["properties"],
        "screen": ["properties"],
        "group": ["traits"],
        "alias": [],
    }[call]
    if call == "track":
        parser.add_argument("--event", required=True)
    if call in ("page", "screen"):
        parser.add_argument("--category")
        parser.add_argument("--name")
    if call == "group":
        parser.add_argument("--group-id", required=True)
    if call == "alias":
        parser.add_argument("--previous-id", required=True)
    for name in [*json_options, "context", "integrations"]:
        parser.add_argument(f"--{name}", type=_json_object, help="a JSON object")
    parser.add_argument("--timestamp", type=_timestamp, help="ISO 8601 (default: now)")
    parser.add_argument("--message-id")
    parser.set_defaults(call=call)


def _duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90s, 15m, 2h, 7d)")
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * factor


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _timestamp(text: str) -> Any:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


# -- reading ----------------------------------------------------------------------


def _open(args: argparse.Namespace, readonly: bool = True) -> Outbox:
    if (readonly or args.must_exist) and not os.path.isfile(args.path):
        raise UsageError(f"no outbox file at {args.path}")
    return Outbox(args.path, readonly=readonly)


def _status(args: argparse.Namespace) -> int:
    with _open(args) as outbox:
        stats = outbox.stats().as_dict()
        stats["uploader_alive"] = not outbox.lease_is_free()
    exceeded = _exceeded(args, stats) if args.check else []
    if args.json:
        print(json.dumps({**stats, "exceeded": exceeded} if args.check else stats, sort_keys=True))
    else:
        _print_status(stats)
    for line in exceeded:
        print(f"outbox-analytics: {line}", file=sys.stderr)
    return EXIT_FAILED_CHECK if exceeded else EXIT_OK


def _exceeded(args: argparse.Namespace, stats: dict[str, Any]) -> list[str]:
    found = []
    age = stats["oldest_pending_age_s"] or 0.0
    if args.max_age is not None and age > args.max_age:
        found.append(f"oldest pending event is {age:.0f}s old (max {args.max_age:.0f}s)")
    if args.max_pending is not None and stats["pending"] > args.max_pending:
        found.append(f"{stats['pending']} events pending (max {args.max_pending})")
    if args.max_dead is not None and stats["dead"] > args.max_dead:
        found.append(f"{stats['dead']} events dead (max {args.max_dead})")
    return found


def _print_status(stats: dict[str, Any]) -> None:
    age = stats["oldest_pending_age_s"]
    lines = [
        ("file", stats["path"]),
        ("size", f"{stats['file_bytes']:,} bytes"),
        ("pending", stats["pending"]),
        ("in flight", stats["inflight"]),
        ("dead", stats["dead"]),
        ("dropped", stats["dropped"]),
        ("oldest pending", "-" if age is None else f"{age:.1f}s ago"),
        ("uploader alive", "yes" if stats["uploader_alive"] else "no"),
    ]
    if stats["head_last_error"]:
        retry = stats["head_next_attempt_at"]
        lines.append(("head failing", f"{stats['head_attempts']} attempts"))
        lines.append(("last error", _one_line(stats["head_last_error"], 200)))
        if retry:
            lines.append(("next retry", f"in {max(0.0, retry - time.time()):.0f}s"))
    for name, value in lines:
        print(f"{name:16} {value}")


def _list(args: argparse.Namespace) -> int:
    with _open(args) as outbox:
        rows = _matching(outbox.rows(args.state), args.type, args.event)
        if args.json:
            for row in _limited(rows, args.limit):
                print(json.dumps(_exported(row)))
            return EXIT_OK
        print(f"{'id':>8}  {'state':8} {'type':8} {'event/name':24} {'attempts':>8}  last error")
        for row in _limited(rows, args.limit):
            message = row.message
            what = message.get("event") or message.get("name") or ""
            print(
                f"{row.id:>8}  {row.state:8} {message.get('type', '?'):8} {what[:24]:24}"
                f" {row.attempts:>8}  {_one_line(row.last_error or '', 60)}"
            )
    return EXIT_OK


def _matching(rows: Iterator[Row], kind: str | None, event: str | None) -> Iterator[Row]:
    for row in rows:
        if kind and row.message.get("type") != kind:
            continue
        if event and row.message.get("event") != event:
            continue
        yield row


def _limited(rows: Iterator[Row], limit: int) -> Iterator[Row]:
    for count, row in enumerate(rows):
        if count >= limit:
            return
        yield row


def _show(args: argparse.Namespace) -> int:
    with _open(args) as outbox:
        row = maintenance.find(outbox, args.key)
    if row is None:
        raise UsageError(f"no message {args.key!r} in {args.path}")
    print(json.dumps(_exported(row), indent=2))
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    with _open(args) as outbox:
        target: IO[str] = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115
        try:
            count = 0
            for row in outbox.rows(args.state):
                target.write(json.dumps(_exported(row)) + "\n")
                count += 1
        finally:
            if args.output:
                target.close()
    print(f"exported {count} messages", file=sys.stderr)
    return EXIT_OK


def _exported(row: Row) -> dict[str, Any]:
    """A message as it will be sent, plus what the outbox knows of it under `_outbox`."""
    return {
        **row.message,
        "_outbox": {
            "id": row.id,
            "state": row.state,
            "attempts": row.attempts,
            "last_status": row.last_status,
            "last_error": row.last_error,
            "enqueued_at": row.enqueued_at,
        },
    }


def _check(args: argparse.Namespace) -> int:
    try:
        with _open(args) as outbox:
            problems = maintenance.check(outbox)
    except OutboxError as exc:  # damaged beyond opening: that is the finding
        problems = [str(exc)]
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}))
    else:
        print("ok" if not problems else "\n".join(problems))
    return EXIT_FAILED_CHECK if problems else EXIT_OK


# -- changing -------------------------------------------------------------------


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError("not on a terminal: add --yes to confirm, or --dry-run to look first")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _requeue(args: argparse.Namespace) -> int:
    with _open(args, readonly=False) as outbox:
        dead = [row.id for row in outbox.rows("dead")]
        chosen = dead if args.all else [row_id for row_id in args.ids if row_id in set(dead)]
        if not args.all and len(chosen) < len(args.ids):
            others = sorted(set(args.ids) - set(chosen))
            print(f"outbox-analytics: not dead, left alone: {others}", file=sys.stderr)
        if args.dry_run:
            print(json.dumps({"would_requeue": len(chosen)}))
            return EXIT_OK
        if chosen and not _confirm(args, f"Move {len(chosen)} dead message(s) back to pending?"):
            return EXIT_OK
        moved = maintenance.requeue(outbox, chosen) if chosen else 0
    print(json.dumps({"requeued": moved}))
    return EXIT_OK


def _purge(args: argparse.Namespace) -> int:
    with _open(args, readonly=False) as outbox:
        count = maintenance.purge(outbox, older_than=args.older_than, dry_run=True)
        if args.dry_run:
            print(json.dumps({"would_purge": count}))
            return EXIT_OK
        if count and not _confirm(args, f"Delete {count} dead message(s) for good?"):
            return EXIT_OK
        deleted = maintenance.purge(outbox, older_than=args.older_than) if count else 0
    print(json.dumps({"purged": deleted}))
    return EXIT_OK


def _vacuum(args: argparse.Namespace) -> int:
    with _open(args, readonly=False) as outbox:
        before, after = maintenance.vacuum(outbox)
    print(json.dumps({"bytes_before": before, "bytes_after": after}))
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    """Two streamed passes: validate every line, then store; memory holds only messageIds."""
    with _seekable(args.file) as source:
        for _ in _read_messages(source, args.file):  # a bad line stops us before any write
            pass
        source.seek(0)
        with Outbox(args.path) as outbox:
            present = maintenance.message_ids(outbox)
            counts = {"imported": 0, "skipped": 0}

            def fresh() -> Iterator[dict[str, Any]]:
                for message in _read_messages(source, args.file):
                    if message["messageId"] in present:
                        counts["skipped"] += 1
                        continue
                    present.add(message["messageId"])
                    counts["imported"] += 1
                    yield message

            maintenance.import_messages(outbox, fresh())
    print(json.dumps(counts))
    return EXIT_OK


@contextlib.contextmanager
def _seekable(path: str) -> Iterator[IO[str]]:
    """The file, or stdin spooled to a temporary file (so it can be read twice)."""
    if path != "-":
        with open(path) as source:
            yield source
        return
    with tempfile.TemporaryFile("w+") as spool:
        shutil.copyfileobj(sys.stdin, spool)
        spool.seek(0)
        yield spool


def _read_messages(source: IO[str], name: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{name}:{number}: not JSON ({exc.msg})") from None
        yield _importable(message, f"{name}:{number}")


def _importable(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise UsageError(f"{where}: not a JSON object")
    message.pop("_outbox", None)
    if message.get("type") not in _CALLS:
        raise UsageError(f"{where}: type must be one of {', '.join(_CALLS)}")
    if not isinstance(message.get("messageId"), str) or not message["messageId"]:
        raise UsageError(f"{where}: no messageId")
    cleaned: dict[str, Any] = clean(message)
    return cleaned


def _append(args: argparse.Namespace) -> int:
    client = Client(_write_key(args), outbox_path=args.path, upload=False)
    options = {
        name: getattr(args, name)
        for name in (
            "user_id", "anonymous_id", "event", "category", "name", "properties", "traits",
            "group_id", "previous_id", "context", "integrations", "timestamp",
        )
        if getattr(args, name, None) is not None
    }  # fmt: skip
    ok, message = getattr(client, args.call)(message_id=args.message_id, **options)
    client.shutdown()
    if not ok:
        print("outbox-analytics: the outbox is full; the event was not stored", file=sys.stderr)
        return EXIT_TEMPFAIL
    print(json.dumps(message))
    return EXIT_OK


def _write_key(args: argparse.Namespace) -> str:
    key = args.write_key or os.environ.get(WRITE_KEY_ENV)
    if not key:
        raise UsageError(f"give --write-key or set ${WRITE_KEY_ENV}")
    return str(key)


# -- sending ----------------------------------------------------------------------


def _drain(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.path):
        raise UsageError(f"no outbox file at {args.path}")
    key = _write_key(args)
    if args.force:  # the operator says these events are this key's now (a rotated key)
        with Outbox(args.path) as outbox:
            outbox.bind(key, (args.host or DEFAULT_HOST).rstrip("/"), force=True)
    with Outbox(args.path, readonly=True) as outbox:  # before our uploader starts
        before = outbox.stats()
    client = Client(
        key,
        host=args.host,
        outbox_path=args.path,
        max_retries=args.max_retries,
        upload_interval=0.05,
    )
    total = before.pending + before.inflight
    progress = _Progress(client, total) if sys.stderr.isatty() else None
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    sent = dead = 0
    try:
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = client.flush(left)
            sent, dead = sent + result.sent, dead + result.dead
            if result.pending == 0 or result.sent + result.dead == 0 or left == 0.0:
                break  # done, stuck (retries ran out), or out of time
    finally:
        if progress:
            progress.stop()
        client.shutdown(timeout=1)
    stats = client.stats()
    pending = stats.pending + stats.inflight if stats else 0
    print(json.dumps({"sent": sent, "dead": dead, "pending": pending}))
    return EXIT_OK if pending == 0 else EXIT_TEMPFAIL


class _Progress:
    """A progress line on stderr while a drain runs (only on a terminal)."""

    def __init__(self, client: Client, total: int) -> None:
        self.client = client
        self.total = total
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._show()
            if self._done.wait(0.2):
                return

    def _show(self) -> None:
        sent = self.client.uploader.sent if self.client.uploader else 0
        width = 30
        filled = min(width, int(width * sent / self.total)) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        print(f"\r[{bar}] {sent}/{self.total}", end="", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self._show()  # the final count, whatever the last tick showed
        print(file=sys.stderr)


def _collector(args: argparse.Namespace) -> int:
    from .collector import Collector

    out: IO[str] = open(args.out, "a") if args.out else sys.stdout  # noqa: SIM115
    collector = Collector(args.host, args.port, out=out)
    print(f"collector listening on {collector.url}", file=sys.stderr, flush=True)
    try:
        collector.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        collector.stop()
        print(json.dumps(collector.counts()), file=sys.stderr)
        if args.out:
            out.close()
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return EXIT_OK if run_demo(args.events, args.dir) else EXIT_FAILED_CHECK


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
