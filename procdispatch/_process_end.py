"""What happens to channels when their process ends, is asked to terminate, or forks.

*Interpreter exit.* Every channel whose coordinator is still running when the interpreter
exits -- referenced or not, closed or not -- is closed and drained before the interpreter goes,
as ``concurrent.futures`` does with its executors: the hook runs through
``threading._register_atexit``, which runs while threads may still be used (``atexit``
handlers run too late for that on 3.12+). While it waits it logs at WARNING every
:data:`EXIT_LOG_EVERY` seconds what it still waits for. A Ctrl-C there cancels every channel
(in-flight sends get their ``cancel_grace``); a second one ends those sends at once; a third
stops waiting.

*Exit status.* A signal that interrupts that drain decides how the process ends, as it would
have without the drain: 130 for SIGINT, 143 for SIGTERM under :func:`drain_on_sigterm`. By
then the interpreter has already settled on its status (the script ended), so the hook records
the status, and an ``atexit`` hook registered when this module is imported -- ``atexit``
handlers run after the threading ones, and the one registered first runs last -- flushes
standard output, standard error and logging, then ends the process with ``os._exit``. Nothing
is recorded when the drain was not interrupted: the status stays the interpreter's own.

A channel object collected while open is closed by its finalizer; its coordinator thread holds
everything it needs, so it drains in the background, ``on_drop`` still sees anything dropped,
and the exit hook waits for it like any other.

*SIGTERM* (containers, systemd) is opt-in: :func:`drain_on_sigterm` installs a handler that
closes every channel (no lock: it may interrupt a ``put``), records a deadline, and raises
``SystemExit(143)`` in the main thread. A ``with`` block it unwinds then drains until the
deadline instead of cancelling, and the exit hook does the same for every other channel; what
is still in flight at the deadline is cancelled.

*fork.* A child forked while channels are alive inherits objects whose coordinator thread and
workers stay with the parent: the child forgets them (its exit hook waits for nothing) and
every use of an inherited channel raises a clear error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from .errors import OptionsError

if TYPE_CHECKING:
    from ._coordinator import Coordinator

__all__ = ["EXIT_LOG_EVERY", "drain_on_sigterm", "register", "sigterm_deadline"]

log = logging.getLogger("procdispatch")

#: Seconds between the WARNING lines of a drain at interpreter exit.
EXIT_LOG_EVERY = 10.0
#: Extra seconds, past the longest ``cancel_grace``, that a cancel at exit waits for workers.
_CANCEL_SLACK = 5.0

_lock = threading.Lock()
_running: set[Coordinator] = set()  # strong: a running coordinator outlives its channel object
_every: weakref.WeakSet[Coordinator] = weakref.WeakSet()
_sigterm_at: float | None = None  # monotonic deadline of a SIGTERM drain, once one started
_exit_status: int | None = None  # set when a signal interrupted the drain at exit


def register(coord: Coordinator) -> None:
    """Track a coordinator that has started, until it has drained."""
    with _lock:
        _running.add(coord)
        _every.add(coord)


def unregister(coord: Coordinator) -> None:
    with _lock:
        _running.discard(coord)


def _snapshot() -> list[Coordinator]:
    with _lock:
        return [c for c in _running if not c.admission.drained.is_set()]


def sigterm_deadline() -> float | None:
    """The monotonic deadline of the SIGTERM drain under way, if one is."""
    return _sigterm_at


# ---- interpreter exit -------------------------------------------------------------------------


def _describe(coords: list[Coordinator]) -> str:
    buffered = in_flight = 0
    for c in coords:
        s = c.admission.snapshot()
        buffered += s.items_buffered
        in_flight += s.items_in_flight
    return (
        f"{len(coords)} channel(s) still draining: {buffered} item(s) buffered, "
        f"{in_flight} in flight"
    )


def _wait_all(coords: list[Coordinator], deadline: float | None, what: str) -> bool:
    """Wait until every coordinator drained or ``deadline``; log every EXIT_LOG_EVERY s."""
    next_log = time.monotonic() + EXIT_LOG_EVERY
    for c in coords:
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            step = next_log - now
            if deadline is not None:
                step = min(step, deadline - now)
            if c.admission.drained.wait(max(0.0, step)):
                break
            if time.monotonic() >= next_log:
                left = [x for x in coords if not x.admission.drained.is_set()]
                log.warning("procdispatch: %s: %s", what, _describe(left))
                next_log = time.monotonic() + EXIT_LOG_EVERY
    return True


def _cancel_all(coords: list[Coordinator], *, kill: bool = False) -> None:
    for c in coords:
        c.admission.request_cancel(kill=kill)


def _grace(coords: list[Coordinator]) -> float:
    return max((c.opts.cancel_grace for c in coords), default=0.0) + _CANCEL_SLACK


def _drain_at_exit() -> None:
    coords = _snapshot()
    if not coords:
        return
    for c in coords:
        c.admission.request_close()
    log.info(
        "procdispatch: draining %d channel(s) at interpreter exit (Ctrl-C cancels)", len(coords)
    )
    # Stages: drain (until the SIGTERM deadline, if any), cancel (in-flight sends get their
    # grace), kill (the sends in flight end now). A Ctrl-C moves to the next stage; a first
    # SIGTERM only gives the drain its deadline. The except clauses only note what happened:
    # what follows runs in the try, where a further signal is handled the same way.
    stage = _DRAIN
    left = coords
    until = 0.0
    interrupt: str | None = None
    while True:
        try:
            if interrupt == "int":
                interrupt = None
                _note_exit_status(128 + signal.SIGINT)
                left = [c for c in coords if not c.admission.drained.is_set()]
                if stage == _DRAIN:
                    log.warning(
                        "procdispatch: Ctrl-C at exit: cancelling %s (Ctrl-C again stops the "
                        "sends in flight now)",
                        _describe(left),
                    )
                    stage, until = _CANCEL, time.monotonic() + _grace(left)
                    _cancel_all(left)
                elif stage == _CANCEL:
                    log.warning("procdispatch: Ctrl-C again at exit: stopping the sends now")
                    stage, until = _KILL, time.monotonic() + _CANCEL_SLACK
                    _cancel_all(left, kill=True)
                else:
                    log.warning("procdispatch: Ctrl-C again at exit: not waiting any longer")
                    return
            elif interrupt == "term":
                interrupt = None
                _note_exit_status(128 + signal.SIGTERM)
            if stage == _DRAIN:
                if _wait_all(coords, _sigterm_at, "waiting at exit (Ctrl-C cancels)"):
                    return
                # The SIGTERM deadline passed: cancel what is left.
                left = [c for c in coords if not c.admission.drained.is_set()]
                log.warning("procdispatch: SIGTERM drain timed out; cancelling %s", _describe(left))
                stage, until = _CANCEL, time.monotonic() + _grace(left)
                _cancel_all(left)
            what = "cancelling at exit" if stage == _CANCEL else "stopping at exit"
            _wait_all(left, until, what)
            return
        except KeyboardInterrupt:
            interrupt = "int"
        except SystemExit:
            if _sigterm_at is None:
                raise
            interrupt = "term"  # SIGTERM under drain_on_sigterm: it set the drain's deadline


_DRAIN, _CANCEL, _KILL = "drain", "cancel", "kill"


def _note_exit_status(status: int) -> None:
    """The first signal that interrupted the drain at exit decides the process's status."""
    global _exit_status
    if _exit_status is None:
        _exit_status = status


def _exit_with_noted_status() -> None:
    """atexit: end the process with the status a signal during the drain at exit meant."""
    status = _exit_status
    if status is None or _exit_pid != os.getpid():
        return
    logging.shutdown()  # its own atexit handler, registered earlier, would run after this one
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing to say
            if stream is not None:
                stream.flush()
    os._exit(status)


# Registered before the drain hook: with the plain ``atexit`` fallback, handlers run last
# first, and this one must come after the drain.
_exit_pid = os.getpid()
__import__("atexit").register(_exit_with_noted_status)

_register_exit: Callable[[Callable[[], None]], None]
_register_exit = getattr(threading, "_register_atexit", None) or __import__("atexit").register
_register_exit(_drain_at_exit)


# ---- SIGTERM ----------------------------------------------------------------------------------


def drain_on_sigterm(timeout: float = 30.0) -> None:
    """Opt in: on SIGTERM, close and drain every channel within ``timeout`` seconds, then
    cancel what is left (in-flight sends get their ``cancel_grace``), then exit with status
    143 (128 + SIGTERM).

    The handler raises ``SystemExit`` in the main thread: a ``with`` block it unwinds drains
    its channel until the deadline (instead of cancelling, as for other exits), and every other
    channel is drained by the exit hook. A second SIGTERM cancels at once. Call it from the main
    thread (Python runs signal handlers there); a library never installs it by itself.
    """
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise OptionsError(
            f"drain_on_sigterm(): timeout must be a number of seconds >= 0 (got {timeout!r})"
        )
    seconds = float(timeout)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        global _sigterm_at
        coords = _snapshot()
        if _sigterm_at is not None:  # a second SIGTERM: do not wait any longer
            _sigterm_at = time.monotonic()
            _cancel_all(coords)
            return
        _sigterm_at = time.monotonic() + seconds
        for c in coords:
            c.admission.request_close()  # takes no lock: this may run inside a put
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


# ---- fork -------------------------------------------------------------------------------------


def _after_fork_in_child() -> None:
    global _exit_pid, _exit_status, _lock, _sigterm_at
    _lock = threading.Lock()  # a parent thread may have held it at the fork
    _running.clear()
    _sigterm_at = None
    _exit_status = None
    _exit_pid = os.getpid()
    for c in list(_every):
        c.after_fork_in_child()
    _forget_inherited_workers()


def _forget_inherited_workers() -> None:
    """In a forked child: take every worker process of the parent's channels off
    multiprocessing's table of children, which the child inherited. Its exit hook terminates
    and joins every daemon process in that table: it would SIGTERM the parent's workers. The
    handles' own ``disown`` covers the workers in their slots; this also covers one between
    its start and its slot, or killed and not yet reaped."""
    from multiprocessing import process

    children = process._children  # type: ignore[attr-defined]
    for proc in list(children):
        if getattr(proc, "_name", "").startswith("procdispatch-worker-"):
            children.discard(proc)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
