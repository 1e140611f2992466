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
The coordinator's side (taking the pending items, publishing its counters, ending) and the
state itself are :class:`~procdispatch._handover.Shared`, which :class:`Admission` extends with
the producers' side. The channel owns its Admission and hands it to the coordinator.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from ._handover import Shared
from ._waits import acquire_in_slices, check_timeout
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
    #: Sends: batches a worker began, calling ``send_fn`` on them or failing to unpickle their
    #: items (a retry counts again; a batch queued behind a worker's running send that the
    #: worker never began is not counted).
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


class Admission(Shared):
    """What a channel's producers share with its coordinator; see the module docstring."""

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


def _with_added(exc: BaseException, added: int) -> BaseException:
    exc.added = added  # type: ignore[attr-defined]
    return exc
