"""The buffer's queue of unleased batches, in lease order.

Lease order is (next send time, id), or id alone with ``fifo``. The queue is kept in two parts:
batches just cut, whose keys only grow (a cut time is not earlier than the last one, and ids
always grow), go to the end of a deque; batches queued again (retries, released leases) go to a
heap. The head of the queue is the smaller of the two heads, so the common lease -- of a batch
just cut -- costs no heap work.

Like the buffer that owns it, it reads no clock (times are arguments) and is not thread-safe.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Generic, TypeVar

from ._batch import Batch

__all__ = ["BatchQueue"]

T = TypeVar("T")


class BatchQueue(Generic[T]):
    """Unleased batches in lease order; see the module docstring."""

    __slots__ = ("_fifo", "_fresh", "_heap")

    def __init__(self, fifo: bool) -> None:
        self._fifo = fifo
        self._fresh: deque[tuple[float, int, Batch[T]]] = deque()
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

    def push_again(self, b: Batch[T]) -> None:
        """Queue again a batch that was leased (a retry, or a lease given back)."""
        heapq.heappush(self._heap, (0.0 if self._fifo else b._next_send, b.id, b))

    def head(self) -> Batch[T] | None:
        """The first batch in lease order, if any."""
        fresh, heap = self._fresh, self._heap
        if fresh:
            return heap[0][2] if heap and heap[0] < fresh[0] else fresh[0][2]
        return heap[0][2] if heap else None

    def pop_ready(self, now: float) -> Batch[T] | None:
        """Take the first batch if it may be sent at ``now``."""
        fresh, heap = self._fresh, self._heap
        if fresh:
            if heap and heap[0] < fresh[0]:
                if heap[0][2]._next_send <= now:
                    return heapq.heappop(heap)[2]
            elif fresh[0][2]._next_send <= now:
                return fresh.popleft()[2]
        elif heap and heap[0][2]._next_send <= now:
            return heapq.heappop(heap)[2]
        return None

    def pop_head(self) -> Batch[T]:
        """Take the first batch (the queue must not be empty)."""
        fresh, heap = self._fresh, self._heap
        if fresh and not (heap and heap[0] < fresh[0]):
            return fresh.popleft()[2]
        return heapq.heappop(heap)[2]

    def take_all(self) -> list[Batch[T]]:
        """Take every batch, oldest (lowest id) first."""
        batches = sorted([e[2] for e in self._heap] + [e[2] for e in self._fresh], key=_by_id)
        self._heap.clear()
        self._fresh.clear()
        return batches

    def take_oldest(self) -> Batch[T] | None:
        """Take the batch with the lowest id, whatever its send time."""
        heap, fresh = self._heap, self._fresh
        idx = min(range(len(heap)), key=lambda i: heap[i][1]) if heap else -1
        if fresh and (idx < 0 or fresh[0][1] < heap[idx][1]):
            return fresh.popleft()[2]  # ids only grow along the deque
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
