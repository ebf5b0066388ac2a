"""Which process is this: the one owner of the question, for all per-process state.

Connections, locks, the upload lease, message id pools, the group commit,
the uploader's thread and the requester's thread belong to the process that
made them. A forked child must never use them: the threads are gone (their
locks may be held for good), and the connections and locks would be the
parent's. Python's fork runs `os.register_at_fork` hooks; a C-level fork
(uWSGI forks its workers so, `ctypes.CDLL(None).fork()`) runs none. So each
module registers here what it must forget in a child (`on_new_process`), and
every way into the package that may run in a child calls `current_pid()`:
it compares the pid with the one it saw last (one `getpid()`, about 0.2 us)
and, in a new process, runs the registered resets before anything else. The
fork hook only does the same earlier.

Resets run in registration order (the store first: everything else uses it),
must be quick, must not raise, and must not use anything of the parent.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

__all__ = ["current_pid", "expect_forks_unseen", "forks_unseen", "known_pid", "on_new_process"]

log = logging.getLogger("outbox_analytics")

_resets: list[Callable[[], None]] = []
_pid = os.getpid()
# One lock per process for its resets: a lock made in the parent may be held
# for good in the child. dict.setdefault is atomic, so two threads of a fresh
# child that race here share one.
_resetting: dict[int, threading.Lock] = {}
_resetting_threads: set[int] = set()


def on_new_process(reset: Callable[[], None]) -> None:
    """Have `reset()` run once in every new process, before the package's first use there."""
    _resets.append(reset)


def expect_forks_unseen() -> None:
    """This process will fork children without running fork hooks (a uWSGI master).

    Until a new process begins, the store keeps no SQLite connection open
    between calls (see store/connection.py), and no thread is started.
    """
    global forks_unseen
    forks_unseen = True


# Whether `expect_forks_unseen()` was called in this process: a plain
# attribute, read on every append (a new process starts with False).
forks_unseen = False


def known_pid() -> int:
    """The pid of the last `current_pid()` (no system call): for code just behind a check."""
    return _pid


def current_pid() -> int:
    """This process's pid; in a process not seen before, the per-process state is reset first."""
    global _pid
    pid = os.getpid()
    if pid != _pid:
        _enter_new_process(pid)
    return pid


def _enter_new_process(pid: int) -> None:
    global _pid, forks_unseen
    me = threading.get_ident()
    if me in _resetting_threads:
        return  # a signal handler using the package while its thread resets: go on
    with _resetting.setdefault(pid, threading.Lock()):
        if _pid == pid:
            return  # another thread of this process reset everything meanwhile
        _resetting_threads.add(me)
        try:
            for old in [key for key in _resetting if key != pid]:
                _resetting.pop(old, None)
            forks_unseen = False  # said by the parent, of itself
            for reset in _resets:
                try:
                    reset()
                except Exception:  # a reset must not stop the others, nor the caller
                    log.exception("outbox-analytics: resetting state after a fork failed")
            _pid = pid
        finally:
            _resetting_threads.discard(me)


if hasattr(os, "register_at_fork"):
    # An optimisation only: the same resets, at once, in a child of Python's fork.
    os.register_at_fork(after_in_child=current_pid)
