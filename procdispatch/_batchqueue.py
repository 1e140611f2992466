"""The buffer's queue of unleased batches, in lease order.

Lease order is (next send time, id), or id alone with ``fifo``. The queue is kept in two parts:
batches just cut, whose keys only grow (a cut time is not earlier than the last one, and ids
always grow), go to the end of a deque; batches queued again (retries, released leases) go to a
heap. The head of the queue is the smaller of the two heads, so the common lease -- of a batch
just cut -- costs no heap work.

Many whole batches added at once (``put_many``) are queued as one *run*: the list they come
from, and where each begins. A run is cut into Batch objects one at a time, as its first batch
reaches the head of the queue, so that a million buffered items are not a thousand lists the
garbage collector goes through again and again before they are sent.

Like the buffer that owns it, it reads no clock (times are arguments) and is not thread-safe.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from ._batch import QUEUED, Batch

__all__ = ["BatchQueue"]

T = TypeVar("T")


class _Run(Generic[T]):
    """``left`` whole batches of ``size`` items, ``items[start:]`` on, cut at ``time``."""

    __slots__ = ("items", "left", "size", "start", "time")

    def __init__(self, items: Sequence[T], start: int, size: int, left: int, time: float) -> None:
        self.items = items
        self.start = start
        self.size = size
        self.left = left
        self.time = time

    def cut(self, bid: int) -> Batch[T]:
        """Its first batch (whose id is ``bid``), taken out of it."""
        start = self.start
        end = start + self.size
        data = self.items[start:end]
        b: Batch[T] = Batch(data if type(data) is list else list(data), id=bid)
        b._next_send = self.time
        b._state = QUEUED
        self.start = end
        self.left -= 1
        return b


class BatchQueue(Generic[T]):
    """Unleased batches in lease order; see the module docstring."""

    __slots__ = ("_fifo", "_fresh", "_heap")

    def __init__(self, fifo: bool) -> None:
        self._fifo = fifo
        #: (key, id, batch), or (key, id of its first batch, run): see the module docstring.
        self._fresh: deque[tuple[float, int, Any]] = deque()
        self._heap: list[tuple[float, int, Batch[T]]] = []

    def __bool__(self) -> bool:
        return bool(self._fresh or self._heap)

    def push_cut(self, b: Batch[T]) -> None:
        """Queue a batch just cut, at its ``_next_send``."""
        entry = (0.0 if self._fifo else b._next_send, b.id, b)
        fresh = self._fresh
        if not fresh or fresh[-1] < entry:  # keys compare by (time, id); ids are unique
            fresh.append(entry)
        else:  # a cut time earlier than the last one (only a caller's clock can do that)
            heapq.heappush(self._heap, entry)

    def push_run(
        self, now: float, items: Sequence[T], start: int, size: int, count: int, first_id: int
    ) -> None:
        """Queue ``count`` whole batches of ``size`` items, cut at ``now`` from ``items`` (from
        ``start`` on, which nothing changes any more), with ids from ``first_id``."""
        run = _Run(items, start, size, count, now)
        entry = (0.0 if self._fifo else now, first_id, run)
        fresh = self._fresh
        if not fresh or fresh[-1] < entry:
            fresh.append(entry)
        else:  # a cut time earlier than the last one: see push_cut
            for bid in range(first_id, first_id + count):
                heapq.heappush(self._heap, (entry[0], bid, run.cut(bid)))

    def _cut_front(self) -> tuple[float, int, Batch[T]]:
        """The first entry of the deque, a run's first batch cut from it when it is a run."""
        fresh = self._fresh
        entry = fresh[0]
        if type(entry[2]) is _Run:
            key, bid, run = entry
            if run.left > 1:
                fresh[0] = (key, bid + 1, run)
            else:
                fresh.popleft()
            entry = (key, bid, run.cut(bid))
            fresh.appendleft(entry)
        return entry

    def push_again(self, b: Batch[T]) -> None:
        """Queue again a batch that was leased (a retry, or a lease given back)."""
        heapq.heappush(self._heap, (0.0 if self._fifo else b._next_send, b.id, b))

    def head(self) -> Batch[T] | None:
        """The first batch in lease order, if any."""
        fresh, heap = self._fresh, self._heap
        if fresh:
            first = self._cut_front()
            return heap[0][2] if heap and heap[0] < first else first[2]
        return heap[0][2] if heap else None

    def pop_ready(self, now: float) -> Batch[T] | None:
        """Take the first batch if it may be sent at ``now``."""
        fresh, heap = self._fresh, self._heap
        if fresh:
            first = fresh[0]
            if heap and heap[0] < first:
                if heap[0][2]._next_send <= now:
                    return heapq.heappop(heap)[2]
            elif type(first[2]) is _Run:
                key, bid, run = first
                if run.time <= now:
                    if run.left > 1:
                        fresh[0] = (key, bid + 1, run)
                    else:
                        fresh.popleft()
                    cut: Batch[T] = run.cut(bid)
                    return cut
            elif first[2]._next_send <= now:
                b: Batch[T] = fresh.popleft()[2]
                return b
        elif heap and heap[0][2]._next_send <= now:
            return heapq.heappop(heap)[2]
        return None

    def pop_head(self) -> Batch[T]:
        """Take the first batch (the queue must not be empty)."""
        fresh, heap = self._fresh, self._heap
        if fresh and not (heap and heap[0] < self._cut_front()):
            b: Batch[T] = fresh.popleft()[2]  # a batch: the front run was cut above
            return b
        return heapq.heappop(heap)[2]

    def take_all(self) -> list[Batch[T]]:
        """Take every batch, oldest (lowest id) first."""
        batches = [e[2] for e in self._heap]
        for _, bid, b in self._fresh:
            if type(b) is _Run:
                batches.extend(b.cut(i) for i in range(bid, bid + b.left))
            else:
                batches.append(b)
        batches.sort(key=_by_id)
        self._heap.clear()
        self._fresh.clear()
        return batches

    def take_oldest(self) -> Batch[T] | None:
        """Take the batch with the lowest id, whatever its send time."""
        heap, fresh = self._heap, self._fresh
        idx = min(range(len(heap)), key=lambda i: heap[i][1]) if heap else -1
        if fresh and (idx < 0 or fresh[0][1] < heap[idx][1]):
            first: Batch[T] = self._cut_front()[2]  # ids only grow along the deque
            fresh.popleft()
            return first
        if idx < 0:
            return None
        b = heap[idx][2]
        heap[idx] = heap[-1]
        heap.pop()
        heapq.heapify(heap)
        return b

    def take_expired(self, now: float, max_age: float) -> list[Batch[T]]:
        """Take the batches first leased ``max_age`` or more before ``now``, oldest first.

        Only queued-again batches were ever leased: they are all in the heap."""
        heap = self._heap
        gone = [e[2] for e in heap if _expired(e[2], now, max_age)]
        if gone:
            self._heap = [e for e in heap if not _expired(e[2], now, max_age)]
            heapq.heapify(self._heap)
            gone.sort(key=_by_id)
        return gone

    def next_expiry(self, max_age: float) -> float | None:
        """When :meth:`take_expired` with ``max_age`` will next take a batch (None: never)."""
        firsts = [e[2]._first_lease for e in self._heap if e[2]._first_lease is not None]
        return min(firsts) + max_age if firsts else None


def _by_id(b: Batch[T]) -> int:
    return b.id


def _expired(b: Batch[T], now: float, max_age: float) -> bool:
    return b._first_lease is not None and b._first_lease + max_age <= now
