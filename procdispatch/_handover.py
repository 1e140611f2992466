"""The coordinator's side of admission: the state producers share with it, and its handover.

:class:`Shared` is the state a channel's producers share with its coordinator (the pending
list, the admission counters, the lifecycle flags, the wake pipe; see
:mod:`procdispatch._admission` for the rules that keep it safe under interrupts), with the
methods the coordinator's thread calls: take the pending items, publish its ledger, set a fatal
error, end. :class:`~procdispatch._admission.Admission` adds the producers' side.

The coordinator books its counter moves in a :class:`Ledger` of its own and hands it over
once per loop iteration (:meth:`Shared.publish`), so that a
:class:`~procdispatch._admission.Stats` snapshot always adds up:
``items_put == items_delivered + items_dropped + items_buffered + items_in_flight``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Any

from ._waits import Latch
from .buffer import FullBehavior

__all__ = ["Ledger", "Shared"]

_allocate_lock = threading.Lock


class Ledger:
    """Counter moves booked by the coordinator's thread (no lock), handed to producers by
    :meth:`Shared.publish`. The ``d_*`` fields are moves since the last publish; the rest
    are running totals."""

    __slots__ = (
        "alive",
        "batches_dropped",
        "batches_failed",
        "batches_retried",
        "batches_sent",
        "d_delivered",
        "d_dropped",
        "d_in_flight",
        "d_size",
        "worker_restarts",
    )

    def __init__(self) -> None:
        self.d_in_flight = self.d_delivered = self.d_dropped = self.d_size = 0
        self.batches_sent = self.batches_failed = self.batches_retried = 0
        self.batches_dropped = self.worker_restarts = self.alive = 0

    def book(
        self, *, in_flight: int = 0, delivered: int = 0, dropped: int = 0, size: int = 0
    ) -> None:
        """Move items between states (``size``: accounted size that left the channel)."""
        self.d_in_flight += in_flight
        self.d_delivered += delivered
        self.d_dropped += dropped
        self.d_size += size


class Shared:
    """The state a channel's producers share with its coordinator, and the coordinator's side."""

    def __init__(self, fb: FullBehavior | None) -> None:
        self.lock = _allocate_lock()
        #: Items put and not yet taken by the coordinator, in put order. With item sizes, each
        #: entry is an (item, size) pair, so that one append commits both.
        self._pending: list[Any] = []
        self._pending_sized = False  # set at construction by the channel when it measures
        #: Sizes of the pending items, kept after each commit; the coordinator recounts it
        #: exactly when it takes the list, so a producer interrupted between its commit and
        #: this addition only makes the soft size cap late by one item for one iteration.
        self._pending_size = 0
        # Admission limits for the put fast path (None: no limit on that dimension).
        limits = fb.admission_limits() if fb is not None else None
        self._max_items, self._max_size = limits if limits is not None else (None, None)
        #: Taken by the coordinator and not yet delivered or dropped (and their sizes).
        self.admitted = 0
        self.admitted_size = 0
        # Lifecycle flags, each set once and never cleared. Plain stores, readable anywhere.
        self.closed = False
        self.cancel_requested = False
        self.kill_requested = False  # cancel, and kill the sends in flight without grace
        self.fatal: BaseException | None = None
        #: Set in a child process forked while the channel was alive: it cannot be used there.
        self.inherited_by_fork = False
        self._wake_pending = False
        self._coordinator_gone = False  # set when the coordinator has exited
        self._waiters: list[Any] = []  # producers waiting for room, one lock each
        #: How many items each blocked ``admit`` still has to add, by its waiter (asyncio
        #: waiters have no entry: any room is worth their wake-up).
        self._wants: dict[Any, int] = {}
        # The coordinator's ledger as last published (under the lock).
        self._delivered = 0
        self._dropped = 0
        self._in_flight = 0
        self._batches_in_flight = 0
        self._published = Ledger()
        self.drained = Latch()
        #: Odd while the coordinator changes the counters a snapshot reads (see the module).
        self._seq = 0
        #: The coordinator thread's ident, once it runs: it must never wait for room, which
        #: only it can make. ``reentry_error(what)`` builds the error that says so.
        self.coordinator_ident: int | None = None
        self.reentry_error: Any = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

    @property
    def wake_fd(self) -> int:
        """Readable when a producer has something for the coordinator."""
        return self._wake_r

    def clear_wake(self) -> None:
        """Read what the wake pipe holds (the coordinator, before it takes the pending list)."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def take_pending(self) -> tuple[list[Any], list[int] | None, bool, bool]:
        """Coordinator: (items put since the last call, their sizes or None, closed, cancel)."""
        with self.lock:
            self._wake_pending = False
            taken = self._pending
            if taken:
                # Moved to ``admitted`` in the same lock round: the producers' room check
                # counts every item either here or there, never in neither.
                self._seq += 1
                try:
                    self._pending = []
                    self.admitted += len(taken)
                finally:
                    self._seq += 1
                if self._pending_sized:
                    self.admitted_size += sum([e[1] for e in taken])  # exact, unlike the estimate
                self._pending_size = 0
            closed = self.closed
            cancel = self.cancel_requested
            if closed and self._waiters:
                self._release_waiters_locked()
        sizes: list[int] | None = None
        if taken and self._pending_sized:
            sizes = [e[1] for e in taken]
            taken = [e[0] for e in taken]
        return taken, sizes, closed, cancel

    def _release_waiters_locked(self) -> None:
        self._wants.clear()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.release()

    def publish(self, led: Ledger, batches_in_flight: int) -> None:
        """Apply the ledger's moves under the lock at once, and reset them: one lock round per
        loop iteration, and every snapshot sees whole iterations, so its counters add up."""
        gone = led.d_delivered + led.d_dropped
        pub = self._published
        if not (
            gone
            or led.d_in_flight
            or led.d_size
            or batches_in_flight != self._batches_in_flight
            or led.batches_sent != pub.batches_sent
            or led.batches_failed != pub.batches_failed
            or led.batches_retried != pub.batches_retried
            or led.alive != pub.alive
            or led.worker_restarts != pub.worker_restarts
            or led.batches_dropped != pub.batches_dropped
        ):
            return
        with self.lock:
            self._seq += 1
            try:
                self._in_flight += led.d_in_flight
                self._batches_in_flight = batches_in_flight
                self._delivered += led.d_delivered
                self._dropped += led.d_dropped
                self.admitted -= gone
                pub.alive = led.alive
                pub.batches_dropped = led.batches_dropped
                pub.batches_failed = led.batches_failed
                pub.batches_retried = led.batches_retried
                pub.batches_sent = led.batches_sent
                pub.worker_restarts = led.worker_restarts
            finally:
                self._seq += 1
            self.admitted_size -= led.d_size
            if self._waiters and (gone or led.d_size) and self._worth_waking_locked():
                self._release_waiters_locked()
        led.d_in_flight = led.d_delivered = led.d_dropped = led.d_size = 0

    def _worth_waking_locked(self) -> bool:
        """Under the lock: whether the room freed so far is worth the blocked producers' wake-up.

        A producer blocked in a large ``put_many`` that is woken for every acknowledged batch
        adds one batch's worth and blocks again: one wake-up of its thread, one handover of the
        GIL and one byte on the wake pipe per batch, on the coordinator's critical path. So
        while batches are in flight (their answers will free more room) the producers sleep
        until a quarter of ``max_items`` is free, or until the smallest of their remaining
        wants fits; with nothing in flight, any room wakes them, since no answer may come to
        free more (items waiting for their batch's age, a retry's delay, a rate limit).
        """
        mi = self._max_items
        if mi is None or not self._batches_in_flight or len(self._wants) < len(self._waiters):
            return True
        need = min(max(1, mi // 4), *self._wants.values())
        return mi - self.admitted - len(self._pending) >= need

    def set_fatal(self, err: BaseException) -> None:
        with self.lock:
            if self.fatal is None:
                self.fatal = err
            self.closed = True
            self.cancel_requested = True
            self._release_waiters_locked()

    def nothing_pending(self) -> bool:
        """Coordinator: closed and nothing put since the last take, decided under the lock
        (a producer that saw the channel open commits before this can run)."""
        with self.lock:
            return self.closed and not self._pending

    def finished(self) -> None:
        """The coordinator has ended: wake no one any more, and release every waiter."""
        self._coordinator_gone = True
        self.coordinator_ident = None  # a later thread may be given the same ident
        self.drained.set()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
