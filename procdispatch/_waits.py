"""Waits a signal handler can interrupt, or run on top of, without harm.

Python runs signal handlers in the main thread, between any two bytecodes, and a handler may
call back into the channel (``stats()``, ``close()``, ``wait_drained()``). So nothing here
holds a lock that another thread needs while a handler could run: :class:`Latch` takes no lock
at all, and every wait blocks on a lock of its own (a *waiter*), released by whoever ends the
wait, in slices of :data:`WAIT_SLICE` seconds so that a pending handler gets to run.

:func:`check_timeout` gives every public ``timeout=`` argument the rules of ``queue.Queue``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import time
from typing import Any

__all__ = ["WAIT_SLICE", "Latch", "acquire_in_slices", "check_timeout"]

monotonic = time.monotonic
allocate_lock = threading.Lock
#: Longest stretch a waiting producer or drainer sleeps before a pending signal handler runs.
WAIT_SLICE = 0.05


def check_timeout(method: str, timeout: object) -> float | None:
    """``timeout`` of ``method()`` as seconds, or None for ever (None or inf).

    Like ``queue.Queue``: a negative number or nan is a ValueError, anything but a real
    number (a bool included) a TypeError.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            f"{method}(): 'timeout' must be a number of seconds or None (got {timeout!r})"
        )
    try:
        seconds = float(timeout)
    except OverflowError:  # an int too large for a float: +-inf
        huge: Any = timeout
        seconds = math.inf if huge > 0 else -math.inf
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{method}(): 'timeout' must be a non-negative number (got {timeout!r})")
    return None if seconds == math.inf else seconds


class Latch:
    """A one-shot event that waiters can be interrupted out of without harm.

    ``threading.Event.wait`` goes through a Python-level ``Condition``: an exception raised by
    a signal handler at the wrong instant of it can leave the event's lock released twice or
    held, and a handler that waits on the event while its thread is inside ``wait`` deadlocks.
    Here each waiter blocks on a lock of its own, which only ``set`` releases, and no lock is
    shared: ``set`` stores the flag *before* it takes the list of waiters, and ``wait`` adds
    its waiter *before* it reads the flag, so a waiter that ``set`` did not see reads True.
    """

    def __init__(self) -> None:
        self._flag = False
        self._waiters: list[Any] = []

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.release()

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        waiter = allocate_lock()
        waiter.acquire()
        waiters = self._waiters
        waiters.append(waiter)
        try:
            if not self._flag:
                acquire_in_slices(waiter, timeout)
        finally:
            with contextlib.suppress(ValueError):  # set() took the list, or a timeout raced it
                waiters.remove(waiter)
        return self._flag

    def add_waiter(self, waiter: Any) -> bool:
        """Register ``waiter``, whose ``release()`` (which must neither block nor raise, and
        may be called even after this returned False) ``set`` calls from the thread that sets
        the latch; False when the latch is already set. For waiters that cannot block a thread
        (asyncio's)."""
        waiters = self._waiters
        waiters.append(waiter)
        if self._flag:  # as in wait: set() stored the flag before it took the list
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            return False
        return True

    def remove_waiter(self, waiter: Any) -> None:
        with contextlib.suppress(ValueError):  # set() took it already
            self._waiters.remove(waiter)


def acquire_in_slices(lock: Any, timeout: float | None) -> bool:
    """``lock.acquire`` with ``timeout`` (None: for ever), waking every WAIT_SLICE seconds.

    Python runs signal handlers in the main thread only, and a signal the kernel delivers to
    another thread does not interrupt a wait of the main thread: without the slices, a Ctrl-C
    could go unanswered until the wait ends. Each slice's return lets a pending handler run.
    """
    deadline = None if timeout is None else monotonic() + timeout
    while True:
        step = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - monotonic())
        if step <= 0:
            return bool(lock.acquire(False))
        if lock.acquire(True, step):
            return True
