"""What the hosting server allows: a background thread here or not, and a hook after its forks.

Outside uWSGI everything is allowed, and asking costs one dict lookup.

uWSGI, by default, imports the application in its master process and then
forks the workers with a C fork(): no Python fork hook runs there (unless
`--py-call-osafterfork`), and a thread of the master's that holds the GIL, or
a lock of ours, when a worker is forked holds it in that worker for good: the
worker hangs at its first Python call, and `uwsgi --stop` waits out its reload
mercy (60 s) before killing it. The master forks again each time it replaces a
worker (`--max-requests`, a reload, a crash). So no thread of ours runs in a
uWSGI process that has not become a worker (a mule, or the spooler) yet:
`start_after_fork()` runs callbacks (the uploader's start) in each worker right
after uWSGI forks it, through `uwsgi.post_fork_hook`, and what the master
tracked at import or found pending is sent from there. With `--lazy-apps`
the application is imported in each worker, after the fork: nothing to defer.

uWSGI before 2.0.27 runs Python without threads unless `--enable-threads`
(or `--threads N`): a thread then runs only while a request runs Python. No
thread starts there; a warning says so once per process; events stay in the
outbox and are sent when the worker exits (`deliver_at_exit()`: stop,
reload, `--max-requests`: uWSGI runs Python's atexit hooks in a worker that
exits, unless it is in a request, runs `--async`/`--gevent` cores, or was
started with `--skip-atexit` or `--skip-atexit-teardown`), or by any other
process that uses the outbox (`outbox-analytics drain`). Never on a
request's time.

This module imports nothing of the package but `process`, and `uwsgi` only
as uWSGI provides it (it is in `sys.modules` before the application runs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

from . import process

__all__ = [
    "EXIT_BUDGET",
    "background_thread_allowed",
    "deliver_at_exit",
    "deliver_registered",
    "start_after_fork",
]

log = logging.getLogger("outbox_analytics")

# At interpreter exit (a client's exit flush, and in a uWSGI worker without
# threads the deliveries registered with deliver_at_exit()), this long in all;
# what is left stays in the outbox. exit_delivery (and the client) export it.
EXIT_BUDGET = 1.0

_Ref = Callable[[], Callable[..., Any] | None]

# The pid where a background thread is known to be allowed for good (a
# worker stays a worker, threads stay as they are): asked again elsewhere.
_allowed_in: int | None = None
_warned_in: int | None = None  # the pid that said threads are off
_after_fork: dict[Any, _Ref] = {}  # start_after_fork()'s callbacks, in order
_at_exit: dict[Any, _Ref] = {}  # deliver_at_exit()'s callbacks, in order


def background_thread_allowed() -> bool:
    """Whether a background thread of ours may start in this process now.

    False in a uWSGI process that will fork workers (the master, or the first
    process of a uWSGI without a master, until it has forked the others), and
    in a uWSGI process whose Python has no threads; True everywhere else.
    """
    server = _uwsgi()
    if server is None:
        return True
    global _allowed_in
    pid = os.getpid()
    if _allowed_in == pid:
        return True
    if not _threads_on(server):
        _warn_threads_off(pid)
        return False
    if _will_fork(server):
        process.expect_forks_unseen()
        return False  # asked again: the same process may become a worker
    _allowed_in = pid
    return True


def start_after_fork(callback: Callable[[], object]) -> bool:
    """Have `callback()` run in each uWSGI worker (mule, spooler) right after uWSGI forks it.

    It runs after `process.current_pid()` (which resets the per-process
    state) and after the hook the application (or `uwsgidecorators.postfork`)
    set, before or after this call: theirs keeps running. A bound method is
    held weakly (its object may be collected in the master meanwhile), any
    other callable strongly; either is registered once. Returns False, and
    registers nothing, outside uWSGI.
    """
    server = _uwsgi()
    if server is None:
        return False
    _install_post_fork_hook(server)
    _register(_after_fork, callback)
    return True


def deliver_at_exit(deliver: Callable[[float], object]) -> bool:
    """Where threads are off: have `deliver(timeout)` run at this process's exit (a worker's).

    Registered in the master, it runs in each worker it forks. The calls
    share EXIT_BUDGET. Returns False, and registers nothing, outside uWSGI.
    """
    if _uwsgi() is None:
        return False
    _register(_at_exit, deliver)
    return True


# -- uWSGI ------------------------------------------------------------------------


def _uwsgi() -> Any:
    """uWSGI's embedded `uwsgi` module, or None outside uWSGI (nothing is imported)."""
    module = sys.modules.get("uwsgi")
    if module is None:
        return None
    # A module of the application's own named uwsgi, or a test's stand-in,
    # is not uWSGI: the real one is built in (no file) and answers these.
    if getattr(module, "__file__", None) is not None or not callable(
        getattr(module, "worker_id", None)
    ):
        return None
    return module


def _threads_on(server: Any) -> bool:
    return bool(getattr(server, "has_threads", True))


def _will_fork(server: Any) -> bool:
    """Not a worker, mule or spooler yet: the master, or a master-less uWSGI before its forks."""
    return not (server.worker_id() or _call(server, "mule_id") or _call(server, "i_am_the_spooler"))


def _call(server: Any, name: str) -> Any:
    function = getattr(server, name, None)
    return function() if callable(function) else None


def _warn_threads_off(pid: int) -> None:
    global _warned_in
    if _warned_in == pid:
        return
    _warned_in = pid
    log.warning(
        "outbox-analytics: uWSGI runs this process without Python threads"
        " (started without --enable-threads), so no thread can send events in the"
        " background: they are stored in the outbox, and sent when the worker exits"
        " (within %ss) or by any process that uses the outbox (`outbox-analytics"
        " drain PATH`, or another service's client). Start uWSGI with"
        " --enable-threads (or --threads N) to send them as they are tracked.",
        EXIT_BUDGET,
    )


class _PostForkHook:
    """What uWSGI calls after its forks once we are registered: the per-process
    reset, the application's own hook, then our callbacks.

    uWSGI looks `post_fork_hook` up in the `uwsgi` module's dict and calls it
    (no arguments) in each worker, mule and spooler it forks; uwsgidecorators
    sets it, when imported, to a function that runs its `@postfork` list.
    """

    def __init__(self, application_hook: Any) -> None:
        self.application_hook = application_hook  # the one it replaced, or a later one
        self._running_in: int | None = None

    def __call__(self) -> None:
        pid = os.getpid()
        if self._running_in == pid:
            return  # called back from the application's hook: once is enough
        self._running_in = pid
        try:
            process.current_pid()  # the parent's connections, locks, ids... are not ours
            hook = self.application_hook
            try:
                if hook is not None:
                    hook()  # its failure reaches uWSGI, which prints it, as without us
            finally:
                _run(_after_fork)
        finally:
            self._running_in = None


class _KeepsOurHook(types.ModuleType):
    """The `uwsgi` module's class once our hook is in.

    The module's dict (what uWSGI calls) keeps ours; the attribute is the
    application's own hook: `uwsgi.post_fork_hook = f` after us (the import
    of uwsgidecorators does it) sets the hook ours calls instead of replacing
    ours, and reading it gives the application's hook, so a hook that wraps
    the one it read still calls the right one. Other attributes are untouched.
    """

    @property
    def post_fork_hook(self) -> Any:
        found = self.__dict__.get("post_fork_hook")
        hook = found.application_hook if isinstance(found, _PostForkHook) else found
        if hook is None:
            raise AttributeError("module 'uwsgi' has no attribute 'post_fork_hook'")
        return hook

    @post_fork_hook.setter
    def post_fork_hook(self, hook: Any) -> None:
        ours = self.__dict__.get("post_fork_hook")
        if isinstance(ours, _PostForkHook) and not isinstance(hook, _PostForkHook):
            ours.application_hook = hook
        else:
            self.__dict__["post_fork_hook"] = hook

    @post_fork_hook.deleter
    def post_fork_hook(self) -> None:
        ours = self.__dict__.get("post_fork_hook")
        if isinstance(ours, _PostForkHook):
            ours.application_hook = None
        else:
            del self.__dict__["post_fork_hook"]


def _install_post_fork_hook(server: Any) -> None:
    """Ours in the module's dict, wrapping the application's; kept there if possible.

    Where the module's class cannot be ours (another library changed it), a
    later assignment replaces ours: it is put back around the new hook at the
    next registration.
    """
    current = server.__dict__.get("post_fork_hook")
    if isinstance(current, _PostForkHook):
        return
    server.__dict__["post_fork_hook"] = _PostForkHook(current)
    if type(server) is types.ModuleType:
        with contextlib.suppress(TypeError):
            server.__class__ = _KeepsOurHook


# -- registries ---------------------------------------------------------------------


def _register(registry: dict[Any, _Ref], callback: Callable[..., object]) -> None:
    owner = getattr(callback, "__self__", None)
    function = getattr(callback, "__func__", None)
    if owner is not None and function is not None:
        key: Any = (id(owner), function)
        if key not in registry:

            def forget(_: object) -> None:  # when its object goes (its id may be reused)
                registry.pop(key, None)

            registry[key] = weakref.WeakMethod(callback, forget)
    elif id(callback) not in registry:
        registry[id(callback)] = _Strong(callback)


class _Strong:
    __slots__ = ("callback",)

    def __init__(self, callback: Callable[..., object]) -> None:
        self.callback = callback

    def __call__(self) -> Callable[..., object]:
        return self.callback


def _run(registry: dict[Any, _Ref]) -> None:
    for ref in list(registry.values()):
        callback = ref()
        if callback is None:
            continue
        try:
            callback()
        except Exception:  # one failure must not stop the others, nor the worker
            log.exception("outbox-analytics: a callback after uWSGI's fork failed")


def deliver_registered() -> None:
    """At exit, where threads are off: each registered delivery, within EXIT_BUDGET in all.

    Called by exit_delivery's hook. Where threads are on, the uploader's
    thread runs and the client's own exit flush sends; the master never gets
    here (uWSGI runs no exit hooks in it).
    """
    server = _uwsgi()
    if server is None or _threads_on(server) or _will_fork(server):
        return
    process.current_pid()
    deadline = time.monotonic() + EXIT_BUDGET
    for ref in list(_at_exit.values()):
        deliver = ref()
        left = deadline - time.monotonic()
        if deliver is None or left <= 0:
            continue
        try:
            deliver(left)
        except Exception:
            log.exception("outbox-analytics: delivering at exit failed; events stay in the outbox")


def _expect_forks_unseen_in_a_master() -> None:
    """At import in a uWSGI master: the store keeps no connection open across its forks."""
    server = _uwsgi()
    if server is not None and _will_fork(server):
        process.expect_forks_unseen()


_expect_forks_unseen_in_a_master()
