"""The exit hand-off: what a process leaves pending goes to a detached sender.

A CLI or cron job that exits with events it could not send in its exit
budget (a slow network, a big last batch) would leave them for its next run,
a day later or never. With the hand-off (`Client(hand_off_at_exit=True)`, on
for the module-level client), the exit starts one short-lived process that
drains the outbox and exits on its own; the job returns at once.

The parent's side (`hand_off`), at the end of its exit flush:

- only when events are left and no other live process holds the upload lease
  (that one sends them), once per file per process;
- never in a forked child or a multiprocessing worker (their parent goes on),
  under uWSGI (its workers come and go; another one sends), after gevent
  patched `subprocess`, or with a client whose `transport` cannot cross a
  process boundary;
- the settings (write key, OAuth key...) go through a pipe, as one JSON line:
  never on a command line or in the environment, where `ps` and
  /proc/<pid>/environ show them;
- started through `/bin/sh`, which backgrounds the sender and exits at once:
  the sender is the child of init (or of a subreaper such as systemd's user
  manager) from the start, so it is never a zombie, whatever the parent does
  next, and the parent waits only for the shell (a few milliseconds);
- in a new session, with no terminal, stdin the pipe, stdout and stderr
  /dev/null (cron waits for its job's output to close: it would wait for the
  sender), working directory "/" (no mount held busy).

The sender (`python -c <import this module, run main()> <package dir>`):

- reads the settings, then takes the upload lease. If its parent's thread
  still holds it (a request was in flight when the budget ran out), it waits
  for the parent to exit: the pipe's write end stays open in the parent until
  its very end, so end-of-file on stdin says the parent is gone. If the lease
  is still held after that, another live uploader sends: it exits (one
  sender per file at a time);
- drains what is pending (and what arrives meanwhile) with few retries per
  round and a bounded lifetime: a server that is down ends it after one round
  of retries, a slow one after `SENDER_LIFETIME`; what is left stays pending
  for the next run;
- logs warnings and errors to `<outbox>.sender.log` (0600, rewritten by
  each sender) and prints nothing; SIGTERM (systemd stopping the unit) hands
  its rows in flight back to pending before it exits.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client

__all__ = [
    "HANDOFF_ENV",
    "SENDER_LIFETIME",
    "SENDER_MAX_RETRIES",
    "hand_off",
    "handed_off",
    "main",
]

log = logging.getLogger("outbox_analytics")

HANDOFF_ENV = "OUTBOX_ANALYTICS_HANDOFF"  # "0" (or false, no, off) turns the hand-off off
SENDER_LIFETIME = 600.0  # seconds a sender may run in all
SENDER_MAX_RETRIES = 3  # per batch and round: a server down for good ends the sender quickly
# After its parent exits, how long a sender tries for the lease before it
# concludes another uploader holds it (the OS drops the parent's locks as it
# closes its files: the pipe may close a moment before the database).
LEASE_GRACE = 1.0
# The settings must fit in the pipe's buffer: written before the sender
# starts, they never make the exit wait for it (Linux's buffer is 64 KiB).
_MAX_SETTINGS_BYTES = 60_000
# The shell starts the sender in the background, its stdin the pipe (a
# background job's stdin is /dev/null unless redirected), and exits.
_LAUNCH = 'exec 3<&0; "$0" -c "$1" "$2" <&3 3<&- &'
# The package's directory goes at the end of sys.path: a script may import the
# package from its own directory, and PYTHONPATH would put it before the stdlib.
_BOOT = (
    "import sys; sys.path.append(sys.argv[1]); import outbox_analytics.handoff as h;"
    " sys.exit(h.main())"
)

_handed_off: set[str] = set()  # outbox files this process handed off
_write_ends: list[int] = []  # open until this process exits: their EOF tells the senders


# -- the parent's side ----------------------------------------------------------------


def hand_off(client: Client) -> bool:
    """At exit: have a detached sender deliver what `client` leaves pending; True if started.

    Returns False when no sender was started (nothing left, another
    uploader alive, turned off, or not possible here: see the module's
    docstring). Never raises: a failure is logged, and the events stay in
    the outbox for the next run.
    """
    outbox = client.outbox
    if outbox is None or not _allowed_here(client):
        return False
    try:
        if outbox.path in _handed_off:
            return False
        if not (outbox.lease_held_here() or outbox.lease_is_free()):
            return False  # another live process uploads this file: it sends them
        if not outbox.unfinished(outbox.last_id()):
            return False
        _start_sender(_settings(client))
        _handed_off.add(outbox.path)
        return True
    except Exception as exc:
        log.warning(
            "outbox-analytics: could not hand pending events to a sender (%s);"
            " they stay in the outbox for the next run",
            exc,
        )
        return False


def handed_off(path: str) -> bool:
    """Whether this process handed the outbox at `path` to a sender (for the exit message)."""
    return path in _handed_off


def _allowed_here(client: Client) -> bool:
    from . import exit_delivery

    if os.environ.get(HANDOFF_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if os.name != "posix" or not os.path.exists("/bin/sh"):
        return False
    if not sys.executable or getattr(sys, "frozen", False):
        return False  # (a frozen app's executable is the app: it would run again)
    if client.config.transport is not None or client.uploader is None or client.config.sync_mode:
        return False
    if exit_delivery.forked_child() or "uwsgi" in sys.modules:
        return False
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is not None and multiprocessing.parent_process() is not None:
        return False
    monkey = sys.modules.get("gevent.monkey")
    return not (monkey is not None and monkey.is_module_patched("subprocess"))


# The options a sender takes from its client; callables (hooks, a transport)
# cannot cross to another process: the sender has the defaults there.
_SENT_OPTIONS = (
    "host", "gzip", "timeout", "proxies", "upload_size", "max_total_backoff_duration", "fsync",
    "oauth_client_id", "oauth_key_id", "oauth_auth_server", "oauth_scope",
)  # fmt: skip


def _settings(client: Client) -> dict[str, Any]:
    """What the sender needs to rebuild the client."""
    config = client.config
    key = config.oauth_client_key
    return {
        **{name: getattr(config, name) for name in _SENT_OPTIONS},
        "write_key": client.write_key,
        "outbox_path": client.outbox_path,
        "max_retries": min(config.max_retries, SENDER_MAX_RETRIES),
        "oauth_client_key_b64": None if key is None else base64.b64encode(_bytes(key)).decode(),
        "lifetime": SENDER_LIFETIME,
    }


def _bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _start_sender(settings: dict[str, Any]) -> None:
    data = json.dumps(settings).encode() + b"\n"
    if len(data) > _MAX_SETTINGS_BYTES:
        raise ValueError(f"the settings take {len(data)} bytes, over {_MAX_SETTINGS_BYTES}")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)  # into the pipe's buffer: nobody reads yet
        shell = subprocess.Popen(
            ["/bin/sh", "-c", _LAUNCH, sys.executable, _BOOT, _package_root()],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            close_fds=True,
            start_new_session=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    _write_ends.append(write_end)  # closed by the OS when this process ends
    shell.wait(5)  # it backgrounds the sender and exits: no zombie left behind


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the sender -------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM (systemd stopping the unit, a shutdown): stop, handing rows in flight back."""


def main() -> int:
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = json.loads(sys.stdin.buffer.readline())
    deadline = time.monotonic() + float(settings["lifetime"])
    try:
        client = _sender_client(settings)
    except Exception:
        return 1  # (the file went, or changed owner): nothing to send, nobody to tell
    try:
        if not _take_lease(client, deadline):
            return 0  # another live uploader sends this file's events
        _log_beside(client)
        _drain(client, deadline)
    except Terminated:
        return 143
    except Exception:
        log.exception("outbox-analytics sender failed; events stay in the outbox")
        return 1
    finally:
        client.shutdown(timeout=0)
    return 0


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _sender_client(settings: dict[str, Any]) -> Client:
    from .client import Client

    key = settings.pop("oauth_client_key_b64")
    settings.pop("lifetime")
    # The key as it was given, text or bytes (Client takes both; PEM or DER).
    oauth_client_key: Any = None if key is None else base64.b64decode(key)
    return Client(
        settings.pop("write_key"),
        **settings,
        oauth_client_key=oauth_client_key,
        sync_mode=True,  # no thread, no exit flush: drain() sends on this one
    )


def _take_lease(client: Client, deadline: float) -> bool:
    """The upload lease; waits for the parent to exit if it still holds it."""
    if _try_lease(client):
        return True
    _wait_for_parent_exit(deadline)
    grace_ends = time.monotonic() + LEASE_GRACE
    while time.monotonic() < grace_ends:
        time.sleep(0.05)
        if _try_lease(client):
            return True
    return False


def _try_lease(client: Client) -> bool:
    assert client.uploader is not None
    holder = client.uploader.holder
    with holder.turn():
        return holder.take() is not None


def _wait_for_parent_exit(deadline: float) -> None:
    """Until end-of-file on stdin: the parent's write end closes only when it exits."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        readable, _, _ = select.select([sys.stdin.buffer], [], [], left)
        if readable and not os.read(sys.stdin.buffer.fileno(), 4096):
            return


def _drain(client: Client, deadline: float) -> None:
    """Until nothing is pending (what arrives meanwhile included), a round of retries
    runs out, another uploader takes over, or the lifetime ends."""
    assert client.outbox is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        result = client.drain(left)
        if result.pending or not client.outbox.unfinished(client.outbox.last_id()):
            return
        if not _try_lease(client):
            return  # (drain gave it back) another process took it: it sends the rest


def _log_beside(client: Client) -> None:
    """Warnings and errors to `<outbox>.sender.log`: nothing else would see them."""
    assert client.outbox_path is not None
    path = client.outbox_path + ".sender.log"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        return  # (a link planted there, a read-only directory): no log, the file still says why
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        return
    handler = logging.StreamHandler(os.fdopen(fd, "w", encoding="utf-8"))
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
