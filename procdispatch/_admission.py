"""Admission: the state a channel's producers share with its coordinator.

Producers (``put``, ``put_many``, ``close``, ``cancel``, ``stats``) touch only what is here:
the *pending* list of items not yet taken by the coordinator, the admission counters that
implement BlockNewItems back-pressure without asking the coordinator thread, the lifecycle
flags, and the wake pipe that rouses the coordinator. ``admitted`` -- items the coordinator has
taken and not yet delivered or dropped -- plus ``len(pending)`` always equals everything put and
not yet finished, so ``put`` can decide alone whether an item fits.

Interrupts. A KeyboardInterrupt (or any exception a signal handler raises) can land in a
producer between any two lines, so:

* ``lock`` is a plain lock, only ever taken with ``with`` and never held across a wait: an
  interrupted producer cannot keep it. Producers that must wait for room block on a lock of
  their own (a *waiter*, released by whoever frees room), never on a Python-level
  ``Condition``, whose ``wait`` can leave its lock in the wrong state when interrupted.
* Every change a producer makes is one *commit*: appending to ``pending`` (one C call) after
  everything it needs was computed. Counters are derived from it or kept by the coordinator,
  whose thread never receives signals. An interrupt before the commit leaves nothing put; after
  it, the item is put and accounted for.
* ``close()`` and ``cancel()`` take no lock at all (a signal handler may call them while its
  own thread is inside ``put``): each is one flag store and one byte on the wake pipe. The pipe
  stays open until this object is collected, so the byte never goes to a reused descriptor.
* ``stats()`` takes no lock either, for the same reason: the coordinator is the only writer
  of the counters, and it brackets each change with two increments of ``_seq`` (a sequence
  lock), odd while it is under way; a snapshot reads everything between two equal, even
  readings of ``_seq``, and reads again otherwise. Producers only ever add to ``pending``,
  one item or chunk in one C call, which leaves every snapshot consistent.

The coordinator books its counter moves in a :class:`Ledger` of its own and hands it over
once per loop iteration (:meth:`Admission.publish`), so that a :class:`Stats` snapshot always
adds up: ``items_put == items_delivered + items_dropped + items_buffered + items_in_flight``.

The channel owns its Admission and hands it to the coordinator, which uses only the methods
under "the coordinator's side" below.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from ._waits import Latch, acquire_in_slices, check_timeout
from .buffer import FullBehavior
from .errors import BufferFull, ChannelClosed, ProcDispatchError

monotonic = time.monotonic
_allocate_lock = threading.Lock


@dataclass(frozen=True)
class Stats:
    """A consistent snapshot of a channel's counters.

    After a drain, ``items_put == items_delivered + items_dropped``; at any moment
    ``items_put == items_delivered + items_dropped + items_buffered + items_in_flight``.
    """

    #: Items accepted by ``put`` / ``put_many`` since the channel was made.
    items_put: int
    #: Items in batches a worker's ``send_fn`` returned from.
    items_delivered: int
    #: Items given to ``on_drop`` (evicted, out of retries, cancelled, unsendable, timed out).
    items_dropped: int
    #: Items in the buffer: waiting to be leased, or waiting for a retry.
    items_buffered: int
    #: Items in batches leased to workers now.
    items_in_flight: int
    #: Leases handed to workers (a retry counts again).
    batches_sent: int
    #: Sends that ended in an error (raised by ``send_fn``, a crash, ``send_timeout``).
    batches_failed: int
    #: Failed batches put back for another attempt.
    batches_retried: int
    #: Batches given to ``on_drop``.
    batches_dropped: int
    #: Workers running now (started and not yet gone).
    workers_alive: int
    #: Workers started to replace one that crashed, was killed or was recycled.
    worker_restarts: int
    #: Batches leased to workers now (sends under way or queued in a worker's pipe).
    batches_in_flight: int = 0


class Ledger:
    """Counter moves booked by the coordinator's thread (no lock), handed to producers by
    :meth:`Admission.publish`. The ``d_*`` fields are moves since the last publish; the rest
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


class Admission:
    """What a channel's producers share with its coordinator; see the module docstring."""

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

    # ---- thread-safe entry points ---------------------------------------------------------

    def _wake(self) -> None:
        """Rouse the coordinator; no lock (safe from a signal handler)."""
        if self._coordinator_gone:
            return
        # Full (a wake is pending anyway) or already closed: nothing to do either way.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def put_one(
        self,
        item: Any,
        *,
        size: int | None = None,
        timeout: float | None = None,
        block: bool = True,
    ) -> None:
        """``put`` of one (already measured) item: one lock round on the fast path.

        Without ``item_size`` the channel's ``put`` is this very method.
        """
        if timeout is not None:
            timeout = check_timeout("put", timeout)
        with self.lock:
            if not self.closed:  # (a fatal error closes the channel too)
                mi = self._max_items
                ms = self._max_size
                pending = self._pending
                if (mi is None or self.admitted + len(pending) < mi) and (
                    ms is None or self.admitted_size + self._pending_size < ms
                ):
                    if not self._wake_pending:
                        # Written before the flag is set and before the commit: an interrupt
                        # between the three leaves a spare wake at worst, never a missing one.
                        self._wake()
                        self._wake_pending = True
                    if size is None:
                        pending.append(item)  # the commit
                    else:
                        pending.append((item, size))  # the commit
                        self._pending_size += size
                    return
        deadline = None if timeout is None else monotonic() + timeout
        self.admit([item], None if size is None else [size], block=block, deadline=deadline)

    def admit(
        self,
        items: list[Any],
        sizes: list[int] | None,
        *,
        block: bool,
        deadline: float | None,
        method: str = "put",
    ) -> int:
        """Hand items to the coordinator in order, waiting for room under BlockNewItems.

        ``items`` is the caller's own list (it may be kept). Returns how many were added;
        raises (with ``added`` set on the exception) when it has to stop early: ChannelClosed,
        BufferFull (``block=False``, or a wait on the coordinator thread, which ``method``
        names), TimeoutError, or a fatal error.
        """
        n = len(items)
        added = 0
        entries: list[Any] = items if sizes is None else list(zip(items, sizes, strict=True))
        while added < n:
            with self.lock:
                self._check_open(added)
                k = self._room_locked(sizes, added, n - added)
                if k:
                    chunk = entries if added == 0 and k == n else entries[added : added + k]
                    if not self._wake_pending:
                        self._wake()
                        self._wake_pending = True
                    if self._pending:
                        self._pending.extend(chunk)  # the commit
                    else:
                        self._pending = chunk  # the commit (the list is ours to keep)
                    if sizes is not None:
                        self._pending_size += sum(sizes[added : added + k])
                    added += k
                    continue
                if not block:
                    raise _with_added(BufferFull("buffer is full"), added)
                remaining = None if deadline is None else deadline - monotonic()
                if remaining is not None and remaining <= 0:
                    raise _with_added(TimeoutError("put timed out: buffer is full"), added)
                if self.coordinator_ident == threading.get_ident():
                    raise _with_added(self.wait_for_itself(method), added)
                waiter = _allocate_lock()
                waiter.acquire()
                self._waiters.append(waiter)
                self._wants[waiter] = n - added
            try:
                acquire_in_slices(waiter, remaining)
            finally:
                with self.lock:
                    self._wants.pop(waiter, None)
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        return added

    def add_waiter(self, waiter: Any) -> None:
        """Register ``waiter`` as a producer waiting for room; its ``release()`` (which must
        neither block nor raise) is called once, under the lock, the next time room may have
        appeared or the channel closed. A caller that registers first and then retries its
        non-blocking ``admit`` cannot miss a wake-up (asyncio producers: see :mod:`._aio`)."""
        with self.lock:
            self._waiters.append(waiter)

    def remove_waiter(self, waiter: Any) -> None:
        with self.lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def wait_for_itself(self, method: str) -> BaseException:
        """The BufferFull for ``method`` (a put) that would wait for room on the coordinator
        thread, which alone makes room."""
        if self.reentry_error is not None:
            err: BaseException = self.reentry_error(f"{method}() cannot wait for room")
            return err
        return BufferFull("buffer is full, and the coordinator thread cannot wait for room")

    def _check_open(self, added: int) -> None:
        """Under the lock: raise what a put must raise when the channel takes no items."""
        if self.closed:
            if self.inherited_by_fork:
                raise _with_added(_forked_error(), added)
            if self.fatal is not None:
                raise _with_added(self.fatal, added)
            raise _with_added(ChannelClosed("the channel is closed"), added)

    def _room_locked(self, sizes: list[int] | None, start: int, want: int) -> int:
        """How many of the next ``want`` items fit now (BlockNewItems; else all of them)."""
        room = want
        mi, ms = self._max_items, self._max_size
        if mi is not None:
            room = max(0, min(room, mi - self.admitted - len(self._pending)))
        if ms is not None and room:
            # A soft cap: an item may go in while the total is below it.
            total = self.admitted_size + self._pending_size
            k = 0
            while k < room and total < ms:
                total += sizes[start + k] if sizes is not None else 0
                k += 1
            room = k
        return room

    def request_close(self) -> None:
        """No more items. No lock: a signal handler may call it while its thread holds one."""
        self.closed = True
        self._wake()

    def request_cancel(self, *, kill: bool = False) -> None:
        """Cancel (and with ``kill``, end the sends in flight now). No lock, as for close."""
        if kill:
            self.kill_requested = True
        self.cancel_requested = True
        self.closed = True
        self._wake()

    def snapshot(self) -> Stats:
        """A consistent snapshot, taking no lock (a signal handler may call it while its own
        thread holds ``lock``); see the module docstring."""
        if self.inherited_by_fork:
            raise _forked_error()
        while True:
            seq = self._seq
            if not seq & 1:
                pending = len(self._pending)
                admitted = self.admitted
                delivered = self._delivered
                dropped = self._dropped
                in_flight = self._in_flight
                led = self._published
                stats = Stats(
                    # Every item put is pending or admitted until it is delivered or dropped.
                    items_put=admitted + pending + delivered + dropped,
                    items_delivered=delivered,
                    items_dropped=dropped,
                    items_buffered=admitted + pending - in_flight,
                    items_in_flight=in_flight,
                    batches_sent=led.batches_sent,
                    batches_failed=led.batches_failed,
                    batches_retried=led.batches_retried,
                    batches_dropped=led.batches_dropped,
                    workers_alive=led.alive,
                    worker_restarts=led.worker_restarts,
                    batches_in_flight=self._batches_in_flight,
                )
                if self._seq == seq:
                    return stats
            # The coordinator (another thread: it never runs signal handlers) is mid-change.
            time.sleep(0)

    # ---- the coordinator's side -----------------------------------------------------------

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

    def after_fork_in_child(self) -> None:
        """In a child forked from the process that owns this channel: the coordinator thread
        and the workers do not exist here; every use raises a clear error."""
        self.lock = _allocate_lock()
        self._waiters = []
        self._seq = 0  # the coordinator may have been mid-change at the fork
        self.inherited_by_fork = True
        self.closed = True
        self._coordinator_gone = True


def _forked_error() -> ProcDispatchError:
    return ProcDispatchError(
        "this channel was inherited through os.fork(): its coordinator and workers belong to "
        "the parent process, so it cannot be used in the child; create the channel in the "
        "child (e.g. in a gunicorn post_fork hook, not before the fork)"
    )


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _with_added(exc: BaseException, added: int) -> BaseException:
    exc.added = added  # type: ignore[attr-defined]
    return exc
