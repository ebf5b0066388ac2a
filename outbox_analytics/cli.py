"""Operator commands on an outbox file: a thin layer over public library calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence

from .client import Client
from .outbox import Outbox

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return int(args.command(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox-analytics",
        description="Inspect and operate outbox-analytics outbox files.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="counts of an outbox file")
    status.add_argument("path", help="the outbox file")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(command=_status)

    demo = commands.add_parser("demo", help="track a few events into an outbox and show its stats")
    demo.add_argument("--path", help="outbox file (default: a new temporary file)")
    demo.add_argument("--events", type=int, default=1000, help="how many events to track")
    demo.set_defaults(command=_demo)
    return parser


def _status(args: argparse.Namespace) -> int:
    with Outbox(args.path) as outbox:
        stats = outbox.stats().as_dict()
    if args.json:
        print(json.dumps(stats, sort_keys=True))
    else:
        for key, value in stats.items():
            print(f"{key:22} {value}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    path = args.path or os.path.join(tempfile.mkdtemp(prefix="outbox-demo-"), "outbox.sqlite3")
    # upload=False: store durably, send nothing; `drain` (or a later run) sends.
    client = Client("demo-write-key", outbox_path=path, upload=False)
    client.identify("user-1", {"email": "ada@example.com", "plan": "pro"})
    with client.batch():
        for number in range(args.events):
            client.track("user-1", "Report Exported", {"number": number, "format": "csv"})
    client.page("user-1", "Docs", "Quickstart")
    stats = client.stats()
    client.shutdown()
    print(f"tracked {args.events + 2} events into {path}", file=sys.stderr)
    print(json.dumps(stats.as_dict() if stats else {}, sort_keys=True))
    return 0
