"""The pure buffer: batching, leasing, retry scheduling and full-buffer policy.

Theory of operation. Items are appended to the batch being filled (the *current* batch). A batch is
*cut* -- moved to the queue of unleased batches -- when it reaches ``batch_items_max`` items, when
the next item would push it over ``batch_size_max`` (or an item fills it exactly), when it is older
than ``batch_age_max`` at lease time (lazily), or on :meth:`Buffer.flush`. The queue is ordered by
(next send time, id), or by id alone with ``fifo=True``. It is kept in two parts: cut batches,
whose keys only grow (cut times are not earlier than the last, ids always larger), go to the end of
a deque, and re-queued ones (retries, released leases) go to a heap; the head of the queue is the
smaller of the two heads, so the common lease costs no heap work. :meth:`Buffer.lease_one` hands
out the first ready batch while fewer than ``max_leases`` batches are leased; every lease ends with
exactly one :meth:`Buffer.ack` or :meth:`Buffer.nack`. A nack re-queues the batch after the next
delay of its own retry iterator, counting only what is left of its data (accounting can only
shrink), or hands the batch back for dropping when the iterator is exhausted.

A full-buffer policy (:class:`BlockNewItems`, :class:`DropOldestBatch`, :class:`InfiniteGrowth`)
is asked before each insertion whether the item may go in and whether a batch must be dropped
first. Only data that is not in flight is ever dropped.

Nothing here starts a thread or a process or reads a clock: every time-dependent call takes
``now`` (float seconds, any monotonic origin), and the buffer is not thread-safe -- one owner
calls it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ._batch import DONE as _DONE
from ._batch import FILLING as _FILLING
from ._batch import LEASED as _LEASED
from ._batch import QUEUED as _QUEUED
from ._batch import Batch
from ._fullbehavior import (
    DERIVED,
    BlockNewItems,
    DropOldestBatch,
    FullBehavior,
    InfiniteGrowth,
    check_int_limit,
)
from .errors import BufferFull, ItemTooLarge, ItemTooSmall, OptionsError, ProcDispatchError
from .retry import RetryFactory, exponential

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


@dataclass(frozen=True)
class BufferStats:
    """A snapshot of what the buffer holds (synthetic items included)."""

    unleased_items: int = 0
    unleased_size: int = 0
    leased_items: int = 0
    leased_size: int = 0

    @property
    def total(self) -> int:
        return self.unleased_items + self.leased_items

    @property
    def total_size(self) -> int:
        return self.unleased_size + self.leased_size

    @property
    def empty(self) -> bool:
        return self.total == 0


@dataclass(frozen=True)
class BufferOptions:
    """Options of a :class:`Buffer`; validated when the buffer is built."""

    max_leases: int = 4
    batch_items_max: int | None = 20
    batch_size_max: int | None = None
    batch_age_max: float = 10.0
    full_behavior: FullBehavior | None = None
    retry: RetryFactory | None = field(default=None)
    fifo: bool = False

    def validated(self) -> BufferOptions:
        """Return a copy with defaults filled in, or raise :class:`OptionsError`."""
        check_int_limit("max_leases", self.max_leases, allow_none=False)
        check_int_limit("batch_items_max", self.batch_items_max)
        check_int_limit("batch_size_max", self.batch_size_max)
        age = self.batch_age_max
        if (
            isinstance(age, bool)
            or not isinstance(age, (int, float))
            or math.isnan(age)
            or age <= 0
        ):
            raise OptionsError(f"batch_age_max must be a number of seconds > 0 (got {age!r})")
        if not isinstance(self.fifo, bool):
            raise OptionsError(f"fifo must be a bool (got {self.fifo!r})")
        if self.fifo and self.max_leases != 1:
            raise OptionsError(f"fifo=True needs max_leases == 1 (got {self.max_leases!r})")
        fb = self.full_behavior if self.full_behavior is not None else BlockNewItems()
        if not isinstance(fb, FullBehavior):
            raise OptionsError(
                "full_behavior must be BlockNewItems, DropOldestBatch or InfiniteGrowth "
                f"(got {fb!r})"
            )
        fb = fb.resolve(self.batch_items_max, self.batch_size_max)
        retry = self.retry if self.retry is not None else exponential()
        _check_retry_factory(retry)
        return BufferOptions(
            max_leases=self.max_leases,
            batch_items_max=self.batch_items_max,
            batch_size_max=self.batch_size_max,
            batch_age_max=float(age),
            full_behavior=fb,
            retry=retry,
            fifo=self.fifo,
        )


class Buffer(Generic[T]):
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
        #: The queue: cut batches in key order (ids increasing), and re-queued ones in a heap.
        self._fresh: deque[tuple[float, int, Batch[T]]] = deque()
        self._heap: list[tuple[float, int, Batch[T]]] = []
        self._leases: dict[int, Batch[T]] = {}
        self._last_id = 0
        self._unleased_items = 0
        self._unleased_size = 0
        self._leased_items = 0
        self._leased_size = 0

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
        head = self._head()
        if head is not None:
            top = head._next_send
            if self._fifo or self._cur is None:
                return top
            return min(top, self._cur._next_send)
        return self._cur._next_send if self._cur is not None else None

    @property
    def leased(self) -> int:
        return len(self._leases)

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
        entry = (0.0 if self._fifo else now, cur.id, cur)
        fresh = self._fresh
        if not fresh or fresh[-1] < entry:  # keys compare by (time, id); ids are unique
            fresh.append(entry)
        else:  # a cut time earlier than the last one (only a caller's clock can do that)
            heapq.heappush(self._heap, entry)

    # ---- leasing ----------------------------------------------------------------------------

    def lease_one(self, now: float) -> Batch[T] | None:
        if len(self._leases) >= self._max_leases:
            return None
        fresh, heap = self._fresh, self._heap
        if fresh:  # _head() and _pop_head(), spelled out: this runs once per batch
            if heap and heap[0] < fresh[0]:
                if heap[0][2]._next_send <= now:
                    return self._lease(heapq.heappop(heap)[2], now)
            elif fresh[0][2]._next_send <= now:
                return self._lease(fresh.popleft()[2], now)
        elif heap and heap[0][2]._next_send <= now:
            return self._lease(heapq.heappop(heap)[2], now)
        cur = self._cur
        if cur is not None and cur._next_send <= now and not (self._fifo and (fresh or heap)):
            self.flush(now)
            return self._lease(self._pop_head(), now)
        return None

    def ready(self, now: float) -> bool:
        """True when :meth:`lease_one` at ``now`` would hand out a batch."""
        if len(self._leases) >= self._max_leases:
            return False
        head = self._head()
        if head is not None and head._next_send <= now:
            return True
        cur = self._cur
        return cur is not None and cur._next_send <= now and not (self._fifo and head is not None)

    def force_lease_all(self) -> list[Batch[T]]:
        """Lease every queued batch, ignoring send times and ``max_leases`` (not the current)."""
        batches = sorted([e[2] for e in self._heap] + [e[2] for e in self._fresh], key=_by_id)
        self._heap.clear()
        self._fresh.clear()
        for b in batches:
            self._lease(b)
        return batches

    def ack(self, batch: Batch[T]) -> None:
        """The lease ended well (or the batch is being dropped): forget the batch."""
        self._end_lease(batch, "ack")
        batch._state = _DONE

    def leases(self) -> list[Batch[T]]:
        """The batches leased now (not yet acked or nacked), oldest first."""
        return sorted(self._leases.values(), key=lambda b: b.id)

    def release(self, batch: Batch[T]) -> None:
        """Give back a lease whose batch was never sent (its worker died before starting it).

        The batch is queued again where it was, and the lease does not count as an attempt.
        """
        self._end_lease(batch, "release")
        batch.attempt -= 1
        batch._state = _QUEUED
        self._unleased_items += batch._count
        self._unleased_size += batch._size
        heapq.heappush(self._heap, (0.0 if self._fifo else batch._next_send, batch.id, batch))

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
        delay = self._next_delay(batch)
        self._end_lease(batch, "nack")
        batch._state = _DONE
        if delay is None:
            return batch
        batch._next_send = now + delay
        batch._state = _QUEUED
        self._unleased_items += batch._count
        self._unleased_size += batch._size
        heapq.heappush(self._heap, (0.0 if self._fifo else batch._next_send, batch.id, batch))
        return None

    def _next_delay(self, batch: Batch[T]) -> float | None:
        """The batch's next retry delay from its own iterator; None when it is exhausted."""
        it = batch._retry
        if it is None:  # made on first use: most batches never fail
            made = self._retry_factory()
            try:
                it = iter(made)
            except TypeError:
                raise TypeError(
                    f"retry must return an iterator of delays in seconds (it returned {made!r})"
                ) from None
            batch._retry = it
        delay = next(it, None)
        if delay is None:
            return None
        if (
            isinstance(delay, bool)
            or not isinstance(delay, (int, float))
            or not math.isfinite(delay)
            or delay < 0
        ):
            raise ProcDispatchError(
                f"retry delays must be finite numbers of seconds >= 0 (got {delay!r} for batch "
                f"{batch.id}, attempt {batch.attempt})"
            )
        return float(delay)

    # ---- what a send did to a leased batch ----------------------------------------------------

    def apply_mutation(
        self, batch: Batch[T], kept: list[int] | None, new_data: list[T] | None
    ) -> None:
        """Apply a send's change to a leased batch's data: the indices of the items it kept
        (it only removed items), or a whole new list. The accounting follows at
        :meth:`settle`; a new list's sizes are unknown, so its accounted size stays (a batch's
        accounting never grows)."""
        self._check_leased(batch, "apply_mutation")
        if kept is not None:
            data = batch.data
            batch.data = [data[i] for i in kept]
            sizes = batch._sizes
            if sizes is not None:
                batch._sizes = [sizes[i] for i in kept]
        elif new_data is not None:
            batch.data = new_data
            batch._sizes = None

    def settle(self, batch: Batch[T]) -> tuple[int, int]:
        """Shrink a leased batch's accounting to what is left of its data (a send or
        ``on_error`` removed the items it delivered); return (items, size) that went."""
        self._check_leased(batch, "settle")
        size_before = batch._size
        removed = batch.shrink()
        return removed, size_before - batch._size

    def count_fault(self, batch: Batch[T]) -> None:
        """The batch's send crashed or timed out its worker (the poison rule counts these)."""
        batch._faults += 1

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
        out: list[Batch[T]] = []
        cur: Batch[T] | None = None
        for i, item in enumerate(items):
            size = sizes[i] if sizes is not None else 0
            if cur is None or (
                (self._items_max > 0 and cur._count >= self._items_max)
                or (self._size_max > 0 and cur._size + size > self._size_max)
            ):
                self._last_id += 1
                cur = Batch([], id=self._last_id, attempt=1)
                out.append(cur)
            if size or cur._sizes is not None:
                if cur._sizes is None:
                    cur._sizes = [0] * len(cur.data)
                cur._sizes.append(size)
            cur.data.append(item)
            cur._count += 1
            cur._size += size
        return out

    def expire(self, now: float, max_age: float) -> list[Batch[T]]:
        """Remove and return the queued batches first leased ``max_age`` or more before
        ``now`` (they wait for a retry), oldest first; the caller drops them."""
        heap = self._heap
        gone = [e[2] for e in heap if _expired(e[2], now, max_age)]
        if not gone:
            return []
        self._heap = [e for e in heap if not _expired(e[2], now, max_age)]
        heapq.heapify(self._heap)
        for b in gone:
            b._state = _DONE
            self._unleased_items -= b._count
            self._unleased_size -= b._size
        gone.sort(key=_by_id)
        return gone

    def next_expiry(self, max_age: float) -> float | None:
        """When :meth:`expire` with ``max_age`` will next remove a batch (None: no candidate)."""
        firsts = [e[2]._first_lease for e in self._heap if e[2]._first_lease is not None]
        return min(firsts) + max_age if firsts else None

    # ---- internals --------------------------------------------------------------------------

    def _head(self) -> Batch[T] | None:
        """The first batch of the queue (the smaller head of its two parts), if any."""
        fresh, heap = self._fresh, self._heap
        if fresh:
            return heap[0][2] if heap and heap[0] < fresh[0] else fresh[0][2]
        return heap[0][2] if heap else None

    def _pop_head(self) -> Batch[T]:
        fresh, heap = self._fresh, self._heap
        if fresh and not (heap and heap[0] < fresh[0]):
            return fresh.popleft()[2]
        return heapq.heappop(heap)[2]

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
        """Append items[:n] (all of size 0) by slices: the bulk path of add_many."""
        i = 0
        items_max = self._items_max
        while i < n:
            cur = self._cur
            if cur is None:
                cur = self._new_batch(now)
            room = n - i if items_max <= 0 else min(n - i, items_max - cur._count)
            cur.data.extend(items[i : i + room])
            if cur._sizes is not None:
                cur._sizes.extend([0] * room)
            cur._count += room
            i += room
            if items_max > 0 and cur._count >= items_max:
                self.flush(now)
        self._unleased_items += n

    def _lease(self, b: Batch[T], now: float | None = None) -> Batch[T]:
        b._state = _LEASED
        b.attempt += 1
        if b._first_lease is None:
            b._first_lease = now
        b._lease_count = b._count
        b._lease_size = b._size
        self._leases[b.id] = b
        self._unleased_items -= b._count
        self._unleased_size -= b._size
        self._leased_items += b._count
        self._leased_size += b._size
        return b

    def _check_leased(self, batch: Batch[T], what: str) -> None:
        if not isinstance(batch, Batch):
            raise ProcDispatchError(f"{what} needs a leased Batch (got {batch!r})")
        if self._leases.get(batch.id) is not batch:
            raise ProcDispatchError(
                f"{what} of batch {batch.id}, which is not leased (state {batch._state.value}); "
                "every lease ends with exactly one ack or nack"
            )

    def _end_lease(self, batch: Batch[T], what: str) -> None:
        self._check_leased(batch, what)
        del self._leases[batch.id]
        self._leased_items -= batch._lease_count
        self._leased_size -= batch._lease_size

    def _drop_oldest(self) -> Batch[T] | None:
        """Drop the oldest queued batch, else the one being filled; never one in flight."""
        heap, fresh = self._heap, self._fresh
        idx = min(range(len(heap)), key=lambda i: heap[i][1]) if heap else -1
        if fresh and (idx < 0 or fresh[0][1] < heap[idx][1]):
            b = fresh.popleft()[2]  # ids only grow along the deque
        elif idx >= 0:
            b = heap[idx][2]
            heap[idx] = heap[-1]
            heap.pop()
            heapq.heapify(heap)
        elif self._cur is not None:
            b = self._cur
            self._cur = None
        else:
            return None
        b._state = _DONE
        b._evicted = True
        b.attempt = max(1, b.attempt)  # a batch dropped before its first send: attempt 1
        self._unleased_items -= b._count
        self._unleased_size -= b._size
        return b


def _by_id(b: Batch[T]) -> int:
    return b.id


def _expired(b: Batch[T], now: float, max_age: float) -> bool:
    return b._first_lease is not None and b._first_lease + max_age <= now


def _check_retry_factory(retry: object) -> None:
    """Raise OptionsError unless ``retry`` is callable. It is not called here: a factory may
    hand out its iterators in order (one per failing batch), so a trial call would use one up;
    what it returns is checked when a batch first fails (:meth:`Buffer.nack`)."""
    if not callable(retry):
        raise OptionsError(f"retry must be a callable returning an iterator (got {retry!r})")
