"""The operator's command line: parse, make one library call, print.

Data goes to stdout (tables for people, `--json` for programs: one JSON
document; `--jsonl` where a stream of lines is wanted), diagnostics to
stderr. Reading commands and `--dry-run` open the file read-only and change
nothing. Exit codes:

    0    success
    1    a check failed or a problem was found: `status --check` over a
         threshold, `check` found problems, a damaged outbox, ids that are not
         there, a declined prompt, `demo` lost events, `drain` had events
         rejected (dead-lettered) and left none pending
    2    bad usage or bad input: nothing was changed
    75   try again later: `drain` left events pending, the file is busy
    130  interrupted (SIGINT); 143 terminated (SIGTERM)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import IO, Any, NoReturn, TypeVar

from . import operations
from .client import Client
from .config import DEFAULT_HOST, KILL_SWITCH_ENV, check_host, client_host, kill_switch_on
from .delivery.flushing import TIMED_OUT, FlushResult
from .delivery.rounds import DEAD_LETTERED
from .errors import (
    OutboxAnalyticsError,
    OutboxBusy,
    OutboxDamaged,
    OutboxMismatch,
)
from .messages import MESSAGE_TYPES
from .metrics import prometheus_text
from .store import Outbox, OutboxStats, Row, maintenance
from .store.lease import describe_holder
from .utils import printable
from .version import VERSION

__all__ = ["main"]

T = TypeVar("T")

EXIT_OK, EXIT_PROBLEM, EXIT_BAD_INPUT, EXIT_TEMPFAIL = 0, 1, 2, 75
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
EXIT_BROKEN_PIPE = 141  # as a shell reports a process ended by SIGPIPE
WRITE_KEY_ENV = "OUTBOX_ANALYTICS_WRITE_KEY"
SEGMENT_WRITE_KEY_ENV = "SEGMENT_WRITE_KEY"  # where a Segment user's deployment may have it
_WRITE_KEY_HELP = f"the write key (default: ${WRITE_KEY_ENV}, then ${SEGMENT_WRITE_KEY_ENV})"


class UsageError(Exception):
    """Bad input on the command line: one line on stderr, exit 2, nothing changed."""


class Problem(Exception):
    """Something the operator must know: one line on stderr, exit 1."""


class Terminated(BaseException):
    """SIGTERM arrived during `drain` (a BaseException, like KeyboardInterrupt)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (Problem, maintenance.NotDead) as exc:
        return _fail(EXIT_PROBLEM, str(exc))
    except OutboxDamaged as exc:
        return _fail(
            EXIT_PROBLEM,
            f"{exc} (reading commands leave it as it is; the next client or writing command"
            " moves it aside and salvages what it can)",
        )
    except OutboxBusy as exc:
        return _fail(EXIT_TEMPFAIL, str(exc))
    except (UsageError, OutboxAnalyticsError, ValueError, TypeError, AssertionError) as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        return _fail(EXIT_BAD_INPUT, f"{exc.strerror or exc}: {exc.filename or ''}")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Terminated:
        return EXIT_TERMINATED


def _fail(code: int, message: str) -> int:
    print(f"outbox-analytics: error: {printable(message)}", file=sys.stderr)
    return code


# -- the parser -------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the usage is a --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {printable(message)} (see --help)\n")


@dataclasses.dataclass(frozen=True)
class _Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the command's arguments
    run: Callable[[argparse.Namespace], int]


_COMMANDS: dict[str, _Command] = {}

# The order --help lists the commands in.
_HELP_ORDER = (
    "status", "list", "show", "export", "import", "requeue", "purge", "ls", "drain",
    "vacuum", "check", *MESSAGE_TYPES, "collector", "demo",
)  # fmt: skip


def _command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register a command: its name, its help line and what adds its arguments."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS[name] = _Command(help, arguments, run)
        return run

    return register


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="outbox-analytics",
        description="Inspect, repair and drain outbox-analytics outbox files.",
        epilog="Exit codes: 0 ok, 1 a check failed or a problem was found (drain: events were"
        " dead-lettered), 2 bad input"
        " (nothing changed), 75 try again later (drain left events pending),"
        " 130/143 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"outbox-analytics {VERSION}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for name in sorted(_COMMANDS, key=_HELP_ORDER.index):  # (ValueError: add it to the order)
        command = _COMMANDS[name]
        sub = commands.add_parser(name, help=command.help, description=command.help)
        command.arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the outbox file")


def _json_flags(parser: argparse.ArgumentParser, lines: bool = False) -> None:
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON document")
    if lines:
        output.add_argument("--jsonl", action="store_true", help="one JSON object per line")


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


def _duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90s, 15m, 2h, 7d)")
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * factor


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _count(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return value


def _demo_events(text: str) -> int:
    value = _whole(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"the demo needs at least 2 events, got {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


# -- reading ----------------------------------------------------------------------


def _reader(path: str) -> Outbox:
    """The outbox, opened read-only: nothing is created, migrated or moved."""
    if not os.path.isfile(path):
        raise UsageError(f"no outbox file at {path}")
    return Outbox(path, readonly=True)


def _read_stats(path: str) -> OutboxStats:
    with _reader(path) as outbox:
        return outbox.stats()


def _status_arguments(status: argparse.ArgumentParser) -> None:
    _path(status)
    output = status.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON document")
    output.add_argument(
        "--prometheus",
        action="store_true",
        help="Prometheus text format (for node_exporter's textfile collector)",
    )
    output.add_argument(
        "--watch",
        type=_seconds,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until interrupted",
    )
    status.add_argument("--check", action="store_true", help="exit 1 if a threshold is exceeded")
    status.add_argument("--max-age", type=_duration, help="oldest pending event (e.g. 90s, 15m)")
    status.add_argument("--max-pending", type=_count, help="pending events")
    status.add_argument("--max-dead", type=_count, help="dead-lettered events")


@_command("status", "counts of an outbox, for people and monitoring", _status_arguments)
def _status(args: argparse.Namespace) -> int:
    thresholds = (args.max_age, args.max_pending, args.max_dead)
    if not args.check and any(value is not None for value in thresholds):
        raise UsageError("--max-age, --max-pending and --max-dead need --check")
    if args.watch is not None:
        if args.check:
            raise UsageError("--watch shows the status; --check is for a single look")
        return _watch(args.path, args.watch)
    stats = _read_stats(args.path)
    exceeded = _exceeded(args, stats) if args.check else []
    if args.prometheus:
        print(prometheus_text([stats]), end="")
    elif args.json:
        document = stats.as_dict()
        if args.check:
            document["exceeded"] = exceeded
        print(json.dumps(document, sort_keys=True))
    else:
        print(_status_table(stats))
    for line in exceeded:
        print(f"outbox-analytics: {line}", file=sys.stderr)
    return EXIT_PROBLEM if exceeded else EXIT_OK


def _watch(path: str, every: float) -> int:
    """Redraw the status every `every` seconds until interrupted (Ctrl-C ends it, exit 0)."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            table = _status_table(_read_stats(path))
            stamp = time.strftime("%H:%M:%S")
            print(f"{clear}{stamp}  every {every:g}s, Ctrl-C to stop\n{table}\n", flush=True)
            time.sleep(every)
    except KeyboardInterrupt:
        return EXIT_OK


def _exceeded(args: argparse.Namespace, stats: OutboxStats) -> list[str]:
    found = []
    age = stats.oldest_pending_age_s or 0.0
    if args.max_age is not None and age > args.max_age:
        found.append(f"oldest pending event is {age:.0f}s old (max {args.max_age:.0f}s)")
    if args.max_pending is not None and stats.pending > args.max_pending:
        found.append(f"{stats.pending} events pending (max {args.max_pending})")
    if args.max_dead is not None and stats.dead > args.max_dead:
        found.append(f"{stats.dead} events dead (max {args.max_dead})")
    return found


def _uploader(stats: OutboxStats) -> str:
    if not stats.uploader_alive:
        return "no"
    return f"yes ({describe_holder(stats)})"


def _status_table(stats: OutboxStats) -> str:
    age = stats.oldest_pending_age_s
    lines = [
        ("file", stats.path),
        ("size", _sizes(stats)),
        ("pending", stats.pending),
        ("in flight", stats.inflight),
        ("dead", stats.dead),
        ("dropped", stats.dropped),
        ("oldest pending", "-" if age is None else f"{age:.1f}s ago"),
        ("uploader alive", _uploader(stats)),
    ]
    if stats.wal_pinned_since is not None:
        held = f"{max(0.0, time.time() - stats.wal_pinned_since):.0f}s"
        lines.append(("log pinned", f"for {held} by a reader's open transaction (WAL over bound)"))
    if stats.head_last_error:
        lines.append(("head failing", f"{stats.head_attempts} attempts"))
        lines.append(("last error", _one_line(stats.head_last_error, 200)))
        retry = stats.head_next_attempt_at
        if retry:
            lines.append(("next retry", f"in {max(0.0, retry - time.time()):.0f}s"))
    return "\n".join(f"{name:16} {printable(str(value))}" for name, value in lines)


def _sizes(stats: OutboxStats) -> str:
    """The database's size, and the write-ahead log's apart (up to 20 MB, emptied when copied)."""
    database = max(0, stats.file_bytes - stats.wal_bytes)
    if not stats.wal_bytes:
        return f"{database:,} bytes"
    return f"{database:,} bytes, and {stats.wal_bytes:,} in the write-ahead log"


def _ls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "places",
        nargs="*",
        metavar="PATH",
        help="directories or files (default: where clients"
        " put outbox files: the state directory and the fallback under the temp directory)",
    )
    _json_flags(parser)


@_command("ls", "the outbox files in the default places, and whose", _ls_arguments)
def _ls(args: argparse.Namespace) -> int:
    """One line per outbox file found: whose (the host), what waits, and whether it is sent."""
    places = args.places or operations.default_places()
    listed = operations.find_outboxes(places)
    if args.json:
        print(json.dumps(listed, indent=2))
    elif listed:
        print(f"{'pending':>8} {'dead':>6} {'oldest':>8}  {'uploader':8} {'host':32} file")
        for entry in listed:
            print(_ls_line(entry))
    if not listed:
        print(f"outbox-analytics: no outbox files in {', '.join(places)}", file=sys.stderr)
    return EXIT_OK


def _ls_line(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return printable(f"{'?':>8} {'?':>6} {'?':>8}  {'?':8} {entry['error']:32} {entry['path']}")
    age = entry["oldest_pending_age_s"]
    oldest = "-" if age is None else _short_age(age)
    alive = "alive" if entry["uploader_alive"] else "none"
    host = entry["host"] or "(not recorded)"
    return printable(
        f"{entry['pending']:>8} {entry['dead']:>6} {oldest:>8}  {alive:8} {host:32} {entry['path']}"
    )


def _short_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    _path(parser)
    _state(parser)
    parser.add_argument("--type", choices=MESSAGE_TYPES, help="only messages of this type")
    parser.add_argument("--event", help="only track events with this name")
    parser.add_argument("--limit", type=_positive_int, default=50, help="at most N (default 50)")
    _json_flags(parser, lines=True)


@_command("list", "the stored messages, as they will be sent", _list_arguments)
def _list(args: argparse.Namespace) -> int:
    with _reader(args.path) as outbox:
        matching = _matching(outbox.rows(args.state), args.type, args.event)
        rows = list(itertools.islice(matching, args.limit + 1))
    more = len(rows) > args.limit
    rows = rows[: args.limit]
    if args.json:
        print(json.dumps([_exported(row) for row in rows], indent=2))
    elif args.jsonl:
        for row in rows:
            print(json.dumps(_exported(row)))
    else:
        print(f"{'id':>8}  {'state':8} {'type':8} {'event/name':24} {'attempts':>8}  last error")
        for row in rows:
            message = row.message
            kind = printable(str(message.get("type", "?")))
            what = printable(str(message.get("event") or message.get("name") or ""))
            print(
                f"{row.id:>8}  {row.state:8} {kind:8} {what[:24]:24}"
                f" {row.attempts:>8}  {_one_line(row.last_error or '', 60)}"
            )
    if more:
        print(
            f"outbox-analytics: showing the first {args.limit}; more match (raise --limit)",
            file=sys.stderr,
        )
    return EXIT_OK


def _matching(rows: Iterator[Row], kind: str | None, event: str | None) -> Iterator[Row]:
    for row in rows:
        if kind and row.message.get("type") != kind:
            continue
        if event and row.message.get("event") != event:
            continue
        yield row


def _show_arguments(parser: argparse.ArgumentParser) -> None:
    _path(parser)
    parser.add_argument("key", metavar="ID|MESSAGE_ID")


@_command("show", "one message, by row id or messageId, as JSON", _show_arguments)
def _show(args: argparse.Namespace) -> int:
    with _reader(args.path) as outbox:
        row = maintenance.find(outbox, args.key)
    if row is None:
        raise Problem(f"no message {args.key!r} in {args.path}")
    print(json.dumps(_exported(row), indent=2))
    return EXIT_OK


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    _path(parser)
    _state(parser, default="all")
    parser.add_argument("-o", "--output", help="file to write (default: stdout)")


@_command("export", "write messages as JSON Lines, streamed", _export_arguments)
def _export(args: argparse.Namespace) -> int:
    with _reader(args.path) as outbox:
        target: IO[str] = _private_file(args.output) if args.output else sys.stdout
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


def _private_file(path: str, append: bool = False) -> IO[str]:
    """A file for events we write out, readable by its owner only, as the outbox is.

    An existing regular file is made private too: what goes in it is events.
    As for the outbox, what others control is refused before anything is
    written (root running an export must not write where another user
    points it): see `_resolved_checked`, and a file, FIFO or device another
    user owns (they could read the events). A FIFO nobody reads is an error,
    not a hang. `-o /dev/stdout` writes to what the shell opened, as it is.
    """
    where, opened_by_the_shell = _resolved_checked(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    if not opened_by_the_shell:
        flags |= os.O_NOFOLLOW  # every link on the way was checked: none may appear now
    fd = _open(path, where, flags | (os.O_APPEND if append else 0))
    try:
        info = os.fstat(fd)
        _refuse_unless_ours(path, info)
        os.set_blocking(fd, True)
        if stat.S_ISREG(info.st_mode) and not opened_by_the_shell:
            os.fchmod(fd, 0o600)
            if not append:
                os.ftruncate(fd, 0)  # only now that it is known to be ours
    except OSError as exc:
        os.close(fd)
        raise Problem(f"cannot make {path} private (mode 0600): {exc.strerror}") from None
    except Problem:
        os.close(fd)
        raise
    return os.fdopen(fd, "a" if append else "w")


_MAX_LINKS = 40  # as the kernel's own limit on links followed in one path


def _resolved_checked(path: str) -> tuple[str, bool]:
    """`path` resolved one step at a time, each link and directory on the way checked.

    A link another user made, or a directory they own (or anyone may write,
    not sticky), could change where the path leads between our checks and
    the write: refused. Resolved by hand because the kernel follows links
    without asking whose they are, and a textual clean-up of "a/../b" skips
    the link "a" that decides where ".." goes. Returns the path to open,
    and whether it is one of /proc's links to a file already open (what
    /dev/stdout leads to), which only the kernel can follow.
    """
    me = os.geteuid()
    todo = _parts(os.path.join(os.getcwd(), path))
    here, links = "/", 0
    while todo:
        step = os.path.join(here, todo.pop())
        if os.path.basename(step) == "..":
            here = os.path.dirname(here)  # (`here` is real: its parent is too)
            continue
        try:
            info = os.lstat(step)
        except FileNotFoundError:
            if todo:
                raise Problem(f"cannot write {path}: {step} does not exist") from None
            return step, False  # the file to make, in a directory checked
        except OSError as exc:
            raise Problem(f"cannot write {path}: {step}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            _refuse_others(path, step, info, me)
            if step.startswith("/proc/"):
                return os.path.join(step, *reversed(todo)), True
            links += 1
            if links > _MAX_LINKS:
                raise Problem(f"cannot write {path}: too many symbolic links")
            try:
                target = os.readlink(step)
            except OSError as exc:  # (changed since the lstat)
                raise Problem(f"cannot write {path}: {step}: {exc.strerror}") from None
            here = "/" if target.startswith("/") else here
            todo += _parts(target)
        elif todo:  # a directory on the way
            if stat.S_ISDIR(info.st_mode):
                _refuse_others(path, step, info, me)
            here = step
        else:
            return step, False
    return here, False


def _parts(path: str) -> list[str]:
    """The names in `path`, last first (a stack), "." left out."""
    return [part for part in reversed(path.split("/")) if part not in ("", ".")]


def _refuse_others(path: str, step: str, info: os.stat_result, me: int) -> None:
    """A link or directory another user owns, or a directory anyone may write (not sticky)."""
    open_to_all = info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX
    if info.st_uid in (0, me) and not (stat.S_ISDIR(info.st_mode) and open_to_all):
        return
    if stat.S_ISLNK(info.st_mode):
        whose = f"the symbolic link {step} was made by another user (uid {info.st_uid})"
    else:
        mode = f"mode {stat.S_IMODE(info.st_mode):04o}"
        whose = f"the directory {step} may be changed by another user (uid {info.st_uid}, {mode})"
    raise Problem(
        f"refusing to write {path}: {whose}, who could change where the path leads: choose"
        " a path only you or root may change"
    )


def _refuse_unless_ours(path: str, info: os.stat_result) -> None:
    """A regular file must be ours; a FIFO or device, ours or root's (not another user's tty)."""
    me = os.geteuid()
    allowed = (me,) if stat.S_ISREG(info.st_mode) else (0, me)
    if info.st_uid not in allowed:
        raise Problem(
            f"refusing to write {path}: it is owned by uid {info.st_uid}, not by you"
            f" (uid {me}), and its owner could read the events: remove it or choose"
            " another name"
        )


def _open(path: str, where: str, flags: int) -> int:
    """Open `where`; one of this process's descriptors (/dev/stdout) is used as it is."""
    ours = re.fullmatch(rf"/proc/(?:self|thread-self|{os.getpid()})/fd/(\d+)", where)
    try:
        if ours:  # opened anew it would write from the start, not where the shell's does
            return os.dup(int(ours.group(1)))
        return os.open(where, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # O_NONBLOCK on a FIFO nobody reads
            raise Problem(f"cannot write {path}: a FIFO with no reader") from None
        if exc.errno == errno.ELOOP:
            raise Problem(
                f"refusing to write {path}: it became a symbolic link meanwhile"
            ) from None
        raise Problem(f"cannot write {path}: {exc.strerror}") from None


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


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    _path(parser)
    _json_flags(parser)


@_command("check", "SQLite's integrity check and the outbox's invariants", _check_arguments)
def _check(args: argparse.Namespace) -> int:
    try:
        with _reader(args.path) as outbox:
            problems = maintenance.check(outbox)
    except OutboxDamaged as exc:  # damaged beyond opening: that is the finding
        problems = [str(exc)]
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}))
    else:
        print("ok" if not problems else "\n".join(map(printable, problems)))
    return EXIT_PROBLEM if problems else EXIT_OK


# -- changing -------------------------------------------------------------------


def _confirm(args: argparse.Namespace, question: str) -> None:
    """Go on only if the operator says yes (or gave --yes); otherwise exit 1, nothing changed."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("not on a terminal: add --yes to confirm, or --dry-run to look first")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)  # stdout is for data
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise Problem("not confirmed; nothing was changed")


def _requeue_arguments(parser: argparse.ArgumentParser) -> None:
    _path(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=_positive_int, nargs="+", dest="ids", help="row ids")
    which.add_argument("--all", action="store_true", help="every dead message")
    _destructive(parser)


@_command("requeue", "move dead messages back to pending", _requeue_arguments)
def _requeue(args: argparse.Namespace) -> int:
    ids = None if args.all else args.ids
    return _change_dead_rows(
        args,
        "requeue",
        count=lambda outbox: maintenance.count_dead(outbox, ids),  # NotDead: exit 1
        change=lambda outbox: maintenance.requeue(outbox, ids),
        question="Move {} dead message(s) back to pending?",
    )


def _purge_arguments(parser: argparse.ArgumentParser) -> None:
    _path(parser)
    parser.add_argument("--state", choices=["dead"], help="dead rows")
    parser.add_argument("--older-than", type=_duration, help="enqueued longer ago than this")
    parser.add_argument(
        "--user-id", action="append", default=[], help="a person's pending and dead events"
    )
    parser.add_argument(
        "--anonymous-id", action="append", default=[], help="the same, by anonymousId"
    )
    _destructive(parser)


@_command(
    "purge", "delete dead messages, or a person's events (erasure), for good", _purge_arguments
)
def _purge(args: argparse.Namespace) -> int:
    person = args.user_id or args.anonymous_id
    if person and (args.state or args.older_than is not None):
        raise UsageError("--user-id/--anonymous-id erase a person's events: not with --state")
    if person:
        return _erase(args)
    if args.state is None:
        raise UsageError("say what to purge: --state dead, --user-id ID or --anonymous-id ID")
    older_than = args.older_than
    return _change_dead_rows(
        args,
        "purge",
        count=lambda outbox: maintenance.purge(outbox, older_than=older_than, dry_run=True),
        change=lambda outbox: maintenance.purge(outbox, older_than=older_than),
        question="Delete {} dead message(s) for good?",
    )


def _change_dead_rows(
    args: argparse.Namespace,
    verb: str,
    *,
    count: Callable[[Outbox], int],
    change: Callable[[Outbox], int],
    question: str,
) -> int:
    """Count read-only, print what --dry-run would do or ask, then change; prints the result."""
    found = _count_before_change(args, count)
    if args.dry_run:
        print(json.dumps({f"would_{verb}": found}))
        return EXIT_OK
    changed = 0
    if found:
        _confirm(args, question.format(found))
        changed = operations.change(args.path, change)
    print(json.dumps({f"{verb}d": changed}))
    return EXIT_OK


def _erase(args: argparse.Namespace) -> int:
    """Delete a person's pending and dead events; say what a live uploader has in flight."""
    if any(not person for person in (*args.user_id, *args.anonymous_id)):
        raise UsageError("an empty id names nobody")
    people = {"user_ids": args.user_id, "anonymous_ids": args.anonymous_id}
    if args.dry_run:
        erased = _read_only(args.path, lambda o: maintenance.erase(o, **people, dry_run=True))
        print(json.dumps({"would_purge": erased.removed, "in_flight": erased.in_flight}))
    else:
        found = _count_before_change(
            args, lambda outbox: maintenance.erase(outbox, **people, dry_run=True).removed
        )
        if found:
            _confirm(args, f"Delete {found} event(s) of this person for good?")
        erased = operations.change(args.path, lambda outbox: maintenance.erase(outbox, **people))
        print(json.dumps({"purged": erased.removed, "in_flight": erased.in_flight}))
    if erased.in_flight:
        print(
            f"outbox-analytics: {erased.in_flight} of this person's events are in flight with"
            " a live uploader and were left alone: they may be on the wire already, so the"
            " destination may receive them; include this person in the deletion request"
            " you send it",
            file=sys.stderr,
        )
    return EXIT_OK


def _read_only(path: str, work: Callable[[Outbox], T]) -> T:
    with _reader(path) as outbox:
        return work(outbox)


@_command("vacuum", "give the space of delivered rows back to the disk", _path)
def _vacuum(args: argparse.Namespace) -> int:
    before, after = operations.change(args.path, maintenance.vacuum)
    print(json.dumps({"bytes_before": before, "bytes_after": after}))
    return EXIT_OK


def _count_before_change(args: argparse.Namespace, count: Callable[[Outbox], int]) -> int:
    """Count what would change, read-only; a damaged file is first salvaged unless --dry-run."""
    try:
        with _reader(args.path) as outbox:
            return count(outbox)
    except OutboxDamaged:
        if args.dry_run:
            raise
    print("outbox-analytics: the outbox is damaged: salvaging it first", file=sys.stderr)
    operations.change(args.path, count)
    with _reader(args.path) as outbox:
        return count(outbox)


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    _path(parser)
    parser.add_argument("file", help="JSON Lines written by export ('-' for stdin)")


@_command(
    "import",
    "enqueue exported messages (every line checked before any is stored)",
    _import_arguments,
)
def _import(args: argparse.Namespace) -> int:
    """Validate every line first (nothing is opened before), then store them in transactions.

    Of 5,000 each: a run cut short keeps what it stored, and a re-run skips it.
    """
    with _seekable(args.file) as source:
        for _ in operations.read_messages(source, args.file):
            pass

        def store(outbox: Outbox) -> tuple[int, int]:
            source.seek(0)  # (again, if a damaged file was salvaged in between)
            return maintenance.import_messages(outbox, operations.read_messages(source, args.file))

        imported, skipped = operations.change(args.path, store, create=True)
    print(json.dumps({"imported": imported, "skipped": skipped}))
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


def _event_arguments(parser: argparse.ArgumentParser, call: str) -> None:
    _path(parser)
    parser.add_argument("--write-key", help=_WRITE_KEY_HELP)
    parser.add_argument("--user-id")
    if call != "alias":
        parser.add_argument("--anonymous-id")
    if call == "track":
        parser.add_argument("--event", required=True)
    if call in ("page", "screen"):
        parser.add_argument("--category")
        parser.add_argument("--name")
    if call == "group":
        parser.add_argument("--group-id", required=True)
    if call == "alias":
        parser.add_argument("--previous-id", required=True)
    objects = {"track": "properties", "page": "properties", "screen": "properties"}
    objects.update(identify="traits", group="traits")
    names = [objects[call]] if call in objects else []
    for name in [*names, "context", "integrations"]:
        parser.add_argument(f"--{name}", type=_json_object, help="a JSON object")
    parser.add_argument("--timestamp", type=_timestamp, help="ISO 8601 (default: now)")
    parser.add_argument("--message-id")
    parser.set_defaults(call=call)


def _append(args: argparse.Namespace) -> int:
    client = Client(_write_key(args), outbox_path=operations.new_or_outbox(args.path), upload=False)
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
    if client.disabled:
        print(f"outbox-analytics: {KILL_SWITCH_ENV} is set: nothing was stored", file=sys.stderr)
    elif not ok:
        print("outbox-analytics: the outbox is full; the event was not stored", file=sys.stderr)
        return EXIT_TEMPFAIL
    print(json.dumps(message))
    return EXIT_OK


for _call in MESSAGE_TYPES:  # a command per message type, each stored by _append
    _command(
        _call,
        f"store one {_call} event durably (not sent)",
        functools.partial(_event_arguments, call=_call),
    )(_append)


def _write_key(args: argparse.Namespace) -> str:
    key = args.write_key or os.environ.get(WRITE_KEY_ENV) or os.environ.get(SEGMENT_WRITE_KEY_ENV)
    if not key:
        raise UsageError(f"give --write-key or set ${WRITE_KEY_ENV} (or ${SEGMENT_WRITE_KEY_ENV})")
    return str(key)


# -- sending ----------------------------------------------------------------------


def _drain_arguments(parser: argparse.ArgumentParser) -> None:
    _path(parser)
    parser.add_argument("--write-key", help=_WRITE_KEY_HELP)
    parser.add_argument(
        "--host", help="the API's base URL (default: the one the file records, else Segment's)"
    )
    parser.add_argument("--timeout", type=_seconds, help="give up after this many seconds in all")
    parser.add_argument("--max-retries", type=_count, default=3, help="per batch (default 3)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="send with this write key and host even if the outbox was made for others",
    )


@_command("drain", "send what is pending now, then exit", _drain_arguments)
def _drain(args: argparse.Namespace) -> int:
    if kill_switch_on():
        raise UsageError(f"{KILL_SWITCH_ENV} is set, so nothing can be sent: unset it to drain")
    path, key = operations.existing_outbox(args.path), _write_key(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    if args.host is not None:
        check_host(args.host)  # before --force records it as the file's owner
    host = args.host or _recorded_host(path)
    if args.force:  # the operator says these events are this key's now (a rotated key)
        with Outbox(path) as outbox:
            if args.host is None and host and not outbox.owned_by_host(client_host(host)):
                raise UsageError(
                    f"the file's host is {host} with a path it does not record: pass --host"
                )
            outbox.bind(key, client_host(host), force=True)
    try:
        client = _drain_client(args, path, key, host)
    except OutboxMismatch as exc:
        raise UsageError(f"{exc} ({_mismatch_advice(str(exc))})") from None
    if args.host is None:  # said once the file took this key and host, not before
        whose = "the file's host" if host else "the default: the file records no host"
        print(
            f"outbox-analytics: sending to {printable(host or DEFAULT_HOST)} ({whose})",
            file=sys.stderr,
        )
    bar = _ProgressBar(client.stats()) if sys.stderr.isatty() else None
    last = FlushResult(0, 0, 0)  # what got through so far, as the last progress call said

    def progress(counts: FlushResult) -> None:
        nonlocal last
        last = counts
        if bar is not None:
            bar.update(counts)

    with _signals_raise(), _quiet_dead_letter_log():
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = client.drain(left, progress)
        except (KeyboardInterrupt, Terminated) as exc:
            pending = _print_drained(path, last)  # the rest is pending again
            why = "terminated" if isinstance(exc, Terminated) else "interrupted"
            print(f"outbox-analytics: {why}; {pending} events pending", file=sys.stderr)
            raise
        finally:
            client.shutdown(timeout=0)
            if bar is not None:
                bar.end()
    pending = _print_drained(path, result)
    if result.dead:  # rejected for good: sending again changes nothing until someone looks
        print(
            f"outbox-analytics: {result.dead} events were rejected and dead-lettered"
            f"{_dead_reason(path)}; see them with `outbox-analytics list {path}"
            " --state dead`, send them again with `requeue`",
            file=sys.stderr,
        )
    if pending:
        why = printable(_why(result))
        print(f"outbox-analytics: {pending} events still pending: {why}", file=sys.stderr)
        return EXIT_TEMPFAIL
    return EXIT_PROBLEM if result.dead else EXIT_OK


def _recorded_host(path: str) -> str | None:
    """The host the file says its events go to (None: not recorded, or unreadable for now)."""
    try:
        with _reader(path) as outbox:
            host = outbox.owner_host()
    except OutboxDamaged:
        return None  # the drain's client salvages it; the host is then the default
    return host


def _dead_reason(path: str) -> str:
    """The latest dead row's error, to quote (the server's words), or ''."""
    error = _read_only(path, maintenance.latest_dead_error)
    return f" ({_one_line(error, 200)})" if error else ""


def _mismatch_advice(mismatch: str) -> str:
    if "another write key" in mismatch:
        return "give the key these events were stored with, or --force to make this key their owner"
    return "pass --host with the file's host, or --force to send them to this host"


def _drain_client(args: argparse.Namespace, path: str, key: str, host: str | None) -> Client:
    return Client(
        key,
        host=host,
        outbox_path=path,
        max_retries=args.max_retries,
        sync_mode=True,  # no background thread: drain() sends on this one
        timeout=min(15.0, args.timeout or 15.0),
    )


def _print_drained(path: str, drained: FlushResult) -> int:
    """Print {"sent", "dead", "pending"} (pending: in the whole file now); the pending count."""
    stats = _read_stats(path)
    pending = stats.pending + stats.inflight
    print(json.dumps({"sent": drained.sent, "dead": drained.dead, "pending": pending}), flush=True)
    return pending


def _why(drained: FlushResult) -> str:
    """Why events are still pending, in the server's or the network's words."""
    if drained.last_error is None:  # all that was pending at the start is done
        return "they were stored after the drain began: drain again"
    if drained.last_error == TIMED_OUT:
        return "--timeout ran out before the server answered"  # the deadline, named as given
    return drained.last_error


@contextlib.contextmanager
def _quiet_dead_letter_log() -> Iterator[None]:
    """Drop the library's dead-letter log line: drain prints its own summary, once."""

    def keep(record: logging.LogRecord) -> bool:
        return not hasattr(record, DEAD_LETTERED)

    library = logging.getLogger("outbox_analytics")
    library.addFilter(keep)
    try:
        yield
    finally:
        library.removeFilter(keep)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated (SIGINT already raises KeyboardInterrupt)."""

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ProgressBar:
    """A progress line on stderr, drawn from drain's progress calls, at most 5 times a second.

    A fast drain reports after every batch: thousands of redraws would
    flood a slow terminal.
    """

    WIDTH, EVERY = 30, 0.2

    def __init__(self, stats: OutboxStats | None) -> None:
        self.total = stats.pending if stats else 0
        self.sent = 0
        self.drawn_at = time.monotonic()  # the first line after EVERY, as a tick would

    def update(self, counts: FlushResult) -> None:
        self.sent = counts.sent
        if time.monotonic() - self.drawn_at >= self.EVERY:
            self.draw()

    def draw(self) -> None:
        self.drawn_at = time.monotonic()
        filled = min(self.WIDTH, self.WIDTH * self.sent // self.total) if self.total else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        print(f"\r[{bar}] {self.sent}/{self.total}", end="", file=sys.stderr, flush=True)

    def end(self) -> None:
        self.draw()  # the final count, whatever the last redraw showed
        print(file=sys.stderr)


def _collector_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=_count, default=0, help="port (default: a free one)")
    parser.add_argument("--out", help="append messages as JSON Lines here (default stdout)")
    parser.add_argument(
        "--report-every",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="print the counts on stderr this often, when they changed (default 10)",
    )


@_command("collector", "a local Segment-compatible receiver", _collector_arguments)
def _collector(args: argparse.Namespace) -> int:
    from .collector import Collector

    out: IO[str] = _private_file(args.out, append=True) if args.out else sys.stdout
    # Messages are streamed to `out`, never kept: memory stays bounded however many arrive.
    collector = Collector(args.host, args.port, out=out, keep_messages=False)
    print(f"collector listening on {collector.url}", file=sys.stderr, flush=True)
    stop_reporting = _report_counts(collector, args.report_every)
    try:
        collector.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop_reporting()
        collector.stop()
        print(json.dumps(collector.counts()), file=sys.stderr)
        if args.out:
            out.close()
    return EXIT_OK


def _report_counts(collector: Any, every: float) -> Callable[[], None]:
    """Print the collector's counts on stderr every `every` seconds when they changed."""
    done = threading.Event()

    def run() -> None:
        shown = None
        while not done.wait(every):
            counts = collector.counts()
            if counts != shown:
                words = ", ".join(f"{name} {value}" for name, value in counts.items())
                print(f"{time.strftime('%H:%M:%S')} {words}", file=sys.stderr, flush=True)
                shown = counts

    thread = threading.Thread(target=run, name="collector-counts", daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join()

    return stop


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=_demo_events, default=3000, help="events the job tracks")
    parser.add_argument("--dir", help="where to put the outbox (default: a new temporary dir)")


@_command("demo", "a crash, a replay and a count: no account, no network", _demo_arguments)
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.dir is not None and os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise UsageError(f"--dir must be a directory: {args.dir}")
    return EXIT_OK if run_demo(args.events, args.dir) else EXIT_PROBLEM


def _one_line(text: str, width: int) -> str:
    """A preview of a long text (a server's answer) on one line, at most `width` characters.

    Runs of whitespace, line breaks included, become one space (an HTML error
    page reads better so); what is left unprintable is escaped.
    """
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"
