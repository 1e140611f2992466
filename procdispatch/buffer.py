"""The pure buffer: batching, leasing, retry scheduling and full-buffer policy.

Theory of operation. Items are appended to the batch being filled (the *current* batch). A batch
is *cut* -- moved to the queue of unleased batches (:mod:`._batchqueue`: by next send time and
id, or id alone with ``fifo=True``) -- when it reaches ``batch_items_max`` items, when the next
item would push it over ``batch_size_max`` (or an item fills it exactly), when it is older than
``batch_age_max`` at lease time (lazily), or on :meth:`Buffer.flush`. :meth:`Buffer.lease_one`
hands out the first ready batch while fewer than ``max_leases`` are leased; every lease ends with
exactly one :meth:`Buffer.ack` or :meth:`Buffer.nack`. A nack re-queues the batch after the next
delay of its own retry iterator, counting only what is left of its data (accounting can only
shrink), or hands the batch back for dropping when the iterator is exhausted. The buffer is the
only code that changes a batch's accounting; the leased batches' part of it is
:class:`~procdispatch._leases.Leases`, which :class:`Buffer` extends.

A full-buffer policy (:class:`BlockNewItems`, :class:`DropOldestBatch`, :class:`InfiniteGrowth`)
is asked before each insertion whether the item may go in and whether a batch must be dropped
first. Only data that is not in flight is ever dropped.

Nothing here starts a thread or a process or reads a clock: every time-dependent call takes
``now`` (float seconds, any monotonic origin), and the buffer is not thread-safe -- one owner
calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from ._batch import DONE as _DONE
from ._batch import FILLING as _FILLING
from ._batch import QUEUED as _QUEUED
from ._batch import Batch, cut
from ._batchqueue import BatchQueue
from ._bufferopts import BufferOptions, BufferStats
from ._fullbehavior import DERIVED, BlockNewItems, DropOldestBatch, FullBehavior, InfiniteGrowth
from ._leases import Leases
from .errors import BufferFull, ItemTooLarge, ItemTooSmall
from .retry import RetryFactory, next_delay

__all__ = [
    "DERIVED",
    "Batch",
    "BlockNewItems",
    "Buffer",
    "BufferOptions",
    "BufferStats",
    "DropOldestBatch",
    "FullBehavior",
    "InfiniteGrowth",
]

T = TypeVar("T")


class Buffer(Leases[T]):
    """Batches items and leases them out; see the module docstring. Not thread-safe."""

    def __init__(self, options: BufferOptions | None = None) -> None:
        opts = (options or BufferOptions()).validated()
        self.options = opts
        assert opts.full_behavior is not None
        assert opts.retry is not None
        self._fb: FullBehavior = opts.full_behavior
        self._retry_factory: RetryFactory = opts.retry
        self._max_leases = opts.max_leases
        self._items_max = opts.batch_items_max if opts.batch_items_max is not None else -1
        self._size_max = opts.batch_size_max if opts.batch_size_max is not None else -1
        self._age = opts.batch_age_max
        self._fifo = opts.fifo
        self._cur: Batch[T] | None = None
        self._queue: BatchQueue[T] = BatchQueue(opts.fifo)
        super().__init__()
        self._last_id = 0
        self._unleased_items = 0
        self._unleased_size = 0

    # ---- inspection -------------------------------------------------------------------------

    def stats(self) -> BufferStats:
        return BufferStats(
            self._unleased_items, self._unleased_size, self._leased_items, self._leased_size
        )

    def can_add(self) -> bool:
        total = self._unleased_items + self._leased_items
        return self._fb.compute_state(total, self._unleased_size + self._leased_size)[0]

    def next_send_time(self) -> float | None:
        """When the next batch may become leasable (ignoring ``max_leases``); None if never."""
        head = self._queue.head()
        if head is not None:
            top = head._next_send
            if self._fifo or self._cur is None:
                return top
            return min(top, self._cur._next_send)
        return self._cur._next_send if self._cur is not None else None

    # ---- adding -----------------------------------------------------------------------------

    def check_size(self, size: int) -> None:
        """Raise ItemTooSmall / ItemTooLarge for a size the options forbid."""
        if size < 0:
            raise ItemTooSmall(f"item size must be >= 0 (got {size})")
        if self._size_max < 0:
            return
        if size == 0:
            raise ItemTooSmall(f"item size must be >= 1 when batch_size_max is set (got {size})")
        if size > self._size_max:
            raise ItemTooLarge(
                f"item size must be <= batch_size_max ({self._size_max}) (got {size})"
            )

    def add(self, now: float, item: T, size: int = 0) -> Batch[T] | None:
        """Add one item; return a batch dropped to make room (DropOldestBatch), if any."""
        self.check_size(size)
        ok, drop = self._fb.compute_state(
            self._unleased_items + self._leased_items, self._unleased_size + self._leased_size
        )
        if not ok:
            raise BufferFull("buffer is full")
        dropped = self._drop_oldest() if drop else None
        self._append(now, item, size)
        return dropped

    def add_many(
        self, now: float, items: Sequence[T], sizes: Sequence[int] | None = None
    ) -> tuple[int, list[Batch[T]]]:
        """Add items in order until one would not fit; return (count added, dropped batches).

        Equivalent to calling :meth:`add` for each item and stopping at the first
        ``BufferFull``; sizes are all checked before anything is added.
        """
        if sizes is not None:
            if len(sizes) != len(items):
                raise ValueError("sizes must be as long as items")
            for s in sizes:
                self.check_size(s)
        elif self._size_max > 0 and items:
            self.check_size(0)
        if sizes is None:
            total = self._unleased_items + self._leased_items
            n = self._fb.room(total, self._unleased_size + self._leased_size, len(items))
            if n is not None:  # a policy that never drops: the bulk path
                self._extend(now, items, n)
                return n, []
        dropped: list[Batch[T]] = []
        for i, item in enumerate(items):
            size = sizes[i] if sizes is not None else 0
            total = self._unleased_items + self._leased_items
            ok, drop = self._fb.compute_state(total, self._unleased_size + self._leased_size)
            if not ok:
                return i, dropped
            if drop:
                d = self._drop_oldest()
                if d is not None:
                    dropped.append(d)
            self._append(now, item, size)
        return len(items), dropped

    def add_synthetic(self, now: float) -> Batch[T] | None:
        """Queue a one-item synthetic batch (``data == [None]``), ready at once."""
        self.flush(now)
        b = self._new_batch(now)
        b.synthetic = True
        b.data.append(None)  # type: ignore[arg-type]
        b._count = 1
        self._unleased_items += 1
        self.flush(now)
        return None

    def flush(self, now: float) -> None:
        """Cut the batch being filled, if any; it becomes sendable at ``now``."""
        cur = self._cur
        if cur is None:
            return
        self._cur = None
        cur._next_send = now
        cur._state = _QUEUED
        self._queue.push_cut(cur)

    # ---- leasing ----------------------------------------------------------------------------

    def lease_one(self, now: float) -> Batch[T] | None:
        if len(self._leases) >= self._max_leases:
            return None
        queue = self._queue
        b = queue.pop_ready(now)
        if b is not None:
            return self._lease(b, now)
        cur = self._cur
        if cur is not None and cur._next_send <= now and not (self._fifo and queue):
            # Cut now, it is the head: every batch queued before it was not due yet.
            self.flush(now)
            return self._lease(queue.pop_head(), now)
        return None

    def lease_many(self, now: float, n: int) -> list[Batch[T]]:
        """Up to ``n`` batches, as :meth:`lease_one` called until it gives None would hand
        out (one call for the batches a turn of the coordinator sends)."""
        n = min(n, self._max_leases - len(self._leases))
        out: list[Batch[T]] = []
        pop, lease = self._queue.pop_ready, self._lease
        while len(out) < n:
            b = pop(now)
            if b is None:
                b = self.lease_one(now)  # the batch being filled, when it is due
                if b is not None:
                    out.append(b)
                break
            out.append(lease(b, now))
        return out

    def ready(self, now: float) -> bool:
        """True when :meth:`lease_one` at ``now`` would hand out a batch."""
        if len(self._leases) >= self._max_leases:
            return False
        head = self._queue.head()
        if head is not None and head._next_send <= now:
            return True
        cur = self._cur
        return cur is not None and cur._next_send <= now and not (self._fifo and head is not None)

    def force_lease_all(self) -> list[Batch[T]]:
        """Lease every queued batch, ignoring send times and ``max_leases`` (not the current)."""
        batches = self._queue.take_all()
        for b in batches:
            self._lease(b)
        return batches

    def release(self, batch: Batch[T]) -> None:
        """Give back a lease whose batch was never sent (its worker died before starting it).

        The batch is queued again where it was, and the lease does not count as an attempt.
        """
        self._end_lease(batch, "release")
        batch.attempt -= 1
        batch._state = _QUEUED
        self._unleased_items += batch._count
        self._unleased_size += batch._size
        self._queue.push_again(batch)

    @property
    def total(self) -> int:
        """Items held, queued or leased (``stats().total`` without building a snapshot)."""
        return self._unleased_items + self._leased_items

    def nack(
        self, now: float, batch: Batch[T], exc: BaseException | None = None
    ) -> Batch[T] | None:
        """The send failed and should be retried: re-queue after the batch's next delay.

        Returns the batch when it must be dropped instead (its retry iterator is exhausted);
        a batch whose data was emptied by the send is finished (nothing left to send) and None
        is returned. ``exc`` is accepted for symmetry with ``on_error`` and not used.

        The retry policy is user code: if its factory or iterator raises, or gives something
        other than a number of seconds >= 0, that error is raised here and the batch stays
        leased, so that the caller can end the lease (``ack``) and drop it.
        """
        self._check_leased(batch, "nack")
        batch.shrink()
        if not batch.data or batch._count == 0:
            self._end_lease(batch, "nack")
            batch._state = _DONE
            return None
        delay = next_delay(self._retry_factory, batch)
        self._end_lease(batch, "nack")
        batch._state = _DONE
        if delay is None:
            return batch
        batch._next_send = now + delay
        batch._state = _QUEUED
        self._unleased_items += batch._count
        self._unleased_size += batch._size
        self._queue.push_again(batch)
        return None

    # ---- batches outside the queue ----------------------------------------------------------

    def split_off(self, batch: Batch[T], index: int) -> Batch[T]:
        """Take item ``index`` out of a leased batch into a batch of its own, with a fresh id
        and the same attempt and meta, outside the queue (to report it alone, e.g. an item
        that cannot be pickled). The lease's accounting no longer counts it."""
        self._check_leased(batch, "split_off")
        item = batch.data.pop(index)
        sizes = batch._sizes
        size = sizes.pop(index) if sizes is not None else 0
        self._last_id += 1
        one: Batch[T] = Batch([item], batch.meta, self._last_id, batch.attempt)
        one._size = size
        if size:
            one._sizes = [size]
        one._first_lease = batch._first_lease
        batch._count -= 1
        batch._size -= size
        batch._lease_count -= 1
        batch._lease_size -= size
        self._leased_items -= 1
        self._leased_size -= size
        return one

    def make_batches(
        self, now: float, items: Sequence[T], sizes: Sequence[int] | None = None
    ) -> list[Batch[T]]:
        """Cut ``items`` into batches as :meth:`add` would (batch limits, fresh ids, attempt
        1), outside the queue and the accounting: for items that will never be queued, such
        as those a cancelled channel still receives, to be reported as dropped."""
        out = cut(items, sizes, self._items_max, self._size_max, self._last_id + 1)
        self._last_id += len(out)
        return out

    def expire(self, now: float, max_age: float) -> list[Batch[T]]:
        """Remove and return the queued batches first leased ``max_age`` or more before
        ``now`` (they wait for a retry), oldest first; the caller drops them."""
        gone = self._queue.take_expired(now, max_age)
        for b in gone:
            b._state = _DONE
            self._unleased_items -= b._count
            self._unleased_size -= b._size
        return gone

    def next_expiry(self, max_age: float) -> float | None:
        """When :meth:`expire` with ``max_age`` will next remove a batch (None: no candidate)."""
        return self._queue.next_expiry(max_age)

    # ---- internals --------------------------------------------------------------------------

    def _new_batch(self, now: float) -> Batch[T]:
        self._last_id += 1
        b: Batch[T] = Batch([], id=self._last_id)
        b._next_send = now + self._age
        b._state = _FILLING
        self._cur = b
        return b

    def _append(self, now: float, item: T, size: int) -> None:
        cur = self._cur
        if cur is not None and (
            (self._items_max > 0 and cur._count + 1 > self._items_max)
            or (self._size_max > 0 and cur._size + size > self._size_max)
        ):
            self.flush(now)
            cur = None
        if cur is None:
            cur = self._new_batch(now)
        if size:
            if cur._sizes is None:
                cur._sizes = [0] * len(cur.data)
            cur._sizes.append(size)
        elif cur._sizes is not None:
            cur._sizes.append(0)
        cur.data.append(item)
        cur._count += 1
        cur._size += size
        self._unleased_items += 1
        self._unleased_size += size
        if (self._items_max > 0 and cur._count >= self._items_max) or (
            self._size_max > 0 and cur._size >= self._size_max
        ):
            self.flush(now)

    def _extend(self, now: float, items: Sequence[T], n: int) -> None:
        """Append items[:n] (all of size 0) by slices: the bulk path of add_many. Whole batches
        past the one being filled are queued as one run (see :mod:`._batchqueue`)."""
        i = 0
        items_max = self._items_max
        cur = self._cur
        if cur is not None:
            i = n if items_max <= 0 else min(n, items_max - cur._count)
            self._fill(cur, items, 0, i)
            if items_max > 0 and cur._count >= items_max:
                self.flush(now)
        if items_max > 0 and n - i >= items_max:
            whole = (n - i) // items_max
            self._queue.push_run(now, items, i, items_max, whole, self._last_id + 1)
            self._last_id += whole
            i += whole * items_max
        if i < n:  # less than a whole batch
            self._fill(self._new_batch(now), items, i, n)
        self._unleased_items += n

    @staticmethod
    def _fill(cur: Batch[T], items: Sequence[T], start: int, end: int) -> None:
        cur.data.extend(items[start:end])
        room = end - start
        if cur._sizes is not None:
            cur._sizes.extend([0] * room)
        cur._count += room

    def _drop_oldest(self) -> Batch[T] | None:
        """Drop the oldest queued batch, else the one being filled; never one in flight."""
        b = self._queue.take_oldest()
        if b is None:
            if self._cur is None:
                return None
            b, self._cur = self._cur, None
        b._state = _DONE
        b._evicted = True
        b.attempt = max(1, b.attempt)  # a batch dropped before its first send: attempt 1
        self._unleased_items -= b._count
        self._unleased_size -= b._size
        return b
