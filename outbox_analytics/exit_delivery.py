"""What happens to pending events when the process exits: all of it, in one place.

At interpreter exit (atexit; in a multiprocessing fork worker, which leaves
through os._exit(), multiprocessing's own finalizers), within `EXIT_BUDGET`
seconds for all clients together:

1. the module-level API delivers what its worker processes left in the
   outbox, even if this process tracked nothing (see `before_exit`);
2. every client with a background uploader (or, in a uWSGI worker without
   threads, its registered delivery: servers.py) sends what it can, unless another
   live process holds the file's upload lease (it sends them);
3. a client with `hand_off_at_exit` hands what is left to a detached
   sender process (handoff.py), so a short CLI's events arrive after it;
4. one line says what is still pending, where, and the command that sends it,
   unless what is left is another process's (see `deliver`'s verdict).

`turn_off()` stops all of it for the rest of the process: events stay in
the outbox for the next run. The pytest plugin uses it, so that a test run
never sends what the application's real runs left pending.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import sys
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import handoff, process, servers
from .delivery.flushing import another_holder
from .store import OutboxStats, record_drops_at_exit
from .utils import printable

if TYPE_CHECKING:
    from .client import Client
    from .store import Outbox

__all__ = ["EXIT_BUDGET", "before_exit", "deliver", "forked_child", "turn_off", "turned_off"]

log = logging.getLogger("outbox_analytics")

EXIT_BUDGET = servers.EXIT_BUDGET


class _ExitState:
    """This process's exit delivery: whether it is on, and whom it concerns."""

    def __init__(self) -> None:
        self.on = True
        self.clients: weakref.WeakSet[Client] = weakref.WeakSet()
        self.first_steps: list[Callable[[], None]] = []
        self.forked_child = False  # made by fork(): exit may come through os._exit()
        self.finalizer_pid: int | None = None  # where multiprocessing's finalizer is set
        self.finalizer: Any = None  # that multiprocessing.util.Finalize
        self.celery_pid: int | None = None  # where Celery's process-end signal is connected
        self.exited_in: int | None = None  # the process whose exit delivery ran
        self.outboxes = False  # a client of this process has an outbox (its drops count at exit)

    def new_process(self) -> None:
        self.forked_child = True
        # Inherited clients deliver, and inherited outboxes count their drops,
        # at the worker's exit too.
        if self.clients or self.outboxes:
            _register_with_pools()


_state = _ExitState()
process.on_new_process(_state.new_process)


def turn_off() -> None:
    """Send nothing at this process's exit, for good: no flush, no hand-off, no line.

    Pending events stay in the outbox; the next run (or `outbox-analytics
    drain`) sends them. Clients stay usable until then.
    """
    _state.on = False


def turned_off() -> bool:
    """Whether `turn_off()` was called in this process."""
    return not _state.on


def forked_child() -> bool:
    """Whether this process was made by fork() (a pool worker, a server's worker)."""
    return _state.forked_child


def before_exit(step: Callable[[], None]) -> None:
    """Run `step` at exit before the clients deliver (it may make one that then delivers)."""
    _state.first_steps.append(step)


def keep_count_of_drops() -> None:
    """A client has an outbox: its drops are counted at this process's exit, a worker's too."""
    _state.outboxes = True
    _register_with_pools()


def enroll(client: Client) -> None:
    """`client` (with a background uploader) delivers at this process's exit."""
    _state.clients.add(client)
    _register_with_pools()


@atexit.register
def _at_exit() -> None:
    """Send what can be sent within EXIT_BUDGET (for all clients), never waiting longer.

    The uploader threads are daemons: whatever is still in flight when the
    budget ends stays in the outbox, and the next run sends it.
    """
    if _state.exited_in == os.getpid():
        return  # (both atexit and a finalizer, or an inherited finalizer and ours)
    _state.exited_in = os.getpid()
    record_drops_at_exit()  # (nothing is sent: even when turned off)
    if not _state.on:
        return
    deadline = time.monotonic() + EXIT_BUDGET
    for step in _state.first_steps:
        try:
            step()
        except Exception:
            log.exception("outbox-analytics: a step of exit delivery failed")
    servers.deliver_registered()  # a uWSGI worker without threads (its own share of the budget)
    clients = list(_state.clients)
    verdicts = [deliver(client, max(0.0, deadline - time.monotonic())) for client in clients]
    for client, verdict in zip(clients, verdicts, strict=True):
        if verdict is not _SETTLED:
            _say_what_is_left(client)


def _register_with_pools() -> None:
    """In a pool worker, deliver where its pool ends it (neither pool runs atexit)."""
    _register_with_multiprocessing()
    _register_with_celery()


def _register_with_celery() -> None:
    """In a Celery pool process, deliver when Celery says the process ends (once per process).

    billiard's pool processes leave through os._exit() (with
    --max-tasks-per-child, after every N tasks), and billiard runs no
    finalizer of ours: Celery's worker_process_shutdown is sent in the
    process just before. Without it, each short-lived worker took the
    lease, sent the oldest batch, and died before the answer: the next
    one sent the same batch again, and nothing after it went out.
    Connected wherever Celery is imported, whether this package came before
    the fork or first in a task: only pool processes send the signal.
    """
    if _state.celery_pid == os.getpid():
        return
    signals = sys.modules.get("celery.signals")
    if signals is None:
        return  # not a Celery worker (its pool processes have it imported)
    _state.celery_pid = os.getpid()
    signals.worker_process_shutdown.connect(_at_celery_process_end, weak=False)


def _at_celery_process_end(**_: Any) -> None:
    _at_exit()


def _register_with_multiprocessing() -> None:
    """In a forked child or a multiprocessing worker, have multiprocessing's finalizers deliver too.

    Its fork workers leave through os._exit(): atexit never runs there. A
    worker clears the finalizers it inherited after our fork hook ran, then
    runs its after-fork hooks: there the finalizer is set again.
    """
    if _state.finalizer_pid == os.getpid() or "multiprocessing.util" not in sys.modules:
        return  # (without it, a plain fork: its atexit hooks run as usual, or it chose os._exit)
    import multiprocessing.util

    if not _state.forked_child and multiprocessing.parent_process() is None:
        return  # the main process (a worker may have imported this package first in a task)

    _state.finalizer_pid = os.getpid()
    _set_finalizer()
    multiprocessing.util.register_after_fork(_state, lambda state: _set_finalizer())


def _set_finalizer() -> None:
    """Exit delivery among multiprocessing's finalizers of this process, unless there already."""
    import multiprocessing.util

    # (A parent's, still among this process's finalizers, runs the same _at_exit here.)
    if _state.finalizer is not None and _state.finalizer.still_active():
        return
    _state.finalizer = multiprocessing.util.Finalize(None, _at_exit, exitpriority=100)


# What deliver() found: every row pending at its start settled, or another live
# process sending them (either way, rows left are another process's to send
# or to report: a line from us would blame the exit budget for nothing).
_SETTLED = "settled"


def deliver(client: Client, budget: float) -> str | None:
    """Send `client`'s pending events for up to `budget` seconds, then stop its thread.

    _SETTLED when nothing is left for this process to report.
    """
    uploader = client.uploader
    if uploader is None or not uploader.running:
        return None
    started = time.monotonic()
    verdict = None
    try:
        # Another live process uploads this file: our events are on disk and
        # it sends them. Waiting for it would only slow every exit (a pool
        # of short-lived workers would pay a second each). The process's
        # own lease counts from the moment it is taken: the thread may not
        # have it in hand yet, and would otherwise be stopped mid-claim,
        # leaving the others' events for the next run.
        outbox = client.outbox
        stored = outbox.stored_here if outbox is not None else 0
        if outbox is None or outbox.lease_held_here() or outbox.lease_is_free():
            if uploader.flush(budget).pending == 0:
                verdict = _SETTLED
        elif _sending_elsewhere(outbox.stats()):
            verdict = _SETTLED
        if not uploader.stop(max(0.0, budget - (time.monotonic() - started))):
            uploader.let_go_at_exit()
            verdict = None  # a batch of ours outlived the budget
        if outbox is not None and outbox.stored_here != stored:
            verdict = None  # a thread of ours went on tracking: what is left may be ours
        if client.config.hand_off_at_exit:
            handoff.hand_off(client)
    except Exception:
        log.exception("outbox-analytics: flush at exit failed; events stay in the outbox")
        return None
    return verdict


def _say_what_is_left(client: Client) -> None:
    """One line for the events the file still holds, unless another process sends them.

    How many, where, why, and the command that sends them now: a job
    whose events all failed used to exit without a word.
    """
    outbox = client.outbox
    if outbox is None or client.uploader is None:
        return
    try:
        if not outbox.stats().pending or _another_process_sends(client, outbox):
            return
        # Read again once the lease is seen free: a process that just let go
        # of it (a pool's other worker, exiting too) sent what it could first.
        stats = outbox.stats()
    except Exception:
        return  # (an error about the file was logged when it happened)
    if not stats.pending:
        return
    if handoff.handed_off(outbox.path):
        if stats.head_last_error:  # a server failing: say so, or a cron job never would
            log.warning(
                "outbox-analytics: %d event(s) handed to a background sender, though sending"
                " failed (%s); its warnings go to %s",
                stats.pending, printable(stats.head_last_error[:300]), outbox.path + ".sender.log",
            )  # fmt: skip
        return  # otherwise a sender of ours goes on with them, quietly
    if stats.uploader_alive and not outbox.lease_held_here():
        why = another_holder(stats)  # stopped, or a lock that names no process
    else:
        why = stats.head_last_error or f"the exit budget ({EXIT_BUDGET:g}s) ran out"
    log.warning(
        "outbox-analytics: %d event(s) not sent yet stay in %s (%s); the next run sends"
        " them, or now: outbox-analytics drain %s",
        stats.pending, outbox.path, printable(why[:300]), shlex.quote(outbox.path),
    )  # fmt: skip


def _another_process_sends(client: Client, outbox: Outbox) -> bool:
    """Whether a live uploader of another process holds the file's lease, and can send.

    Our own thread may be giving the lease back at this very moment (a
    request outlived the exit budget): while it runs, the events are ours
    to report; once it ended, a lease still held is another process's.
    """
    assert client.uploader is not None
    for _ in range(2):
        if client.uploader.running or outbox.lease_held_here():
            return False
        if outbox.lease_is_free():
            return False
        time.sleep(0.05)  # (the lock may be on its way out with our thread)
    return _sending_elsewhere(outbox.stats())


def _sending_elsewhere(stats: OutboxStats) -> bool:
    """A holder that sends: one of ours that noted itself and is not stopped.

    A stopped holder sends nothing until it runs again, and a lock that
    names no process may be a reader's (see files.py): the events left are
    then worth a line.
    """
    return stats.uploader_alive and stats.uploader_pid is not None and not stats.uploader_stopped
