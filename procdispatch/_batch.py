"""Batch: the unit a ``send_fn`` receives, and the states the buffer moves it through.

Its own module so that a worker process can build batches without importing the buffer (which
pulls in dataclasses and inspect: tens of milliseconds at every worker start under spawn).
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

__all__ = ["Batch", "BatchState", "cut"]

T = TypeVar("T")


class BatchState(enum.Enum):
    FILLING = "filling"
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"


# Module constants for the paths that run per batch (on Python 3.11 an Enum class attribute
# goes through the metaclass's __getattr__ hook, which costs far more than a global).
FILLING, QUEUED, LEASED, DONE = (
    BatchState.FILLING,
    BatchState.QUEUED,
    BatchState.LEASED,
    BatchState.DONE,
)


class Batch(Generic[T]):
    """A group of items sent together by one ``send_fn`` call.

    ``data`` holds the items in ``put`` order; ``send_fn`` may remove the ones it delivered.
    ``meta`` is free for the user and survives retries. ``id`` is 1-based and increases with
    age (0 for a batch made outside the buffer); ``attempt`` is 1 for the first send (and for
    a batch dropped before its first send), 2 for the first retry, and so on. ``synthetic`` is
    True for a keep-alive batch (the ``keep_alive`` option): the channel made it, its data is
    ``[None]``, and it never counts in the channel's item stats or reaches ``on_drop``.
    """

    __slots__ = (
        "_count",
        "_evicted",
        "_faults",
        "_first_lease",
        "_last_error",
        "_lease_count",
        "_lease_size",
        "_next_send",
        "_retry",
        "_size",
        "_sizes",
        "_state",
        "attempt",
        "data",
        "id",
        "meta",
        "synthetic",
    )

    def __init__(
        self,
        data: list[T],
        meta: object = None,
        id: int = 0,
        attempt: int = 0,
        synthetic: bool = False,
    ) -> None:
        self.data = data
        self.meta = meta
        self.id = id
        self.attempt = attempt
        self.synthetic = synthetic
        # Private bookkeeping, owned by the Buffer (and the channel's coordinator).
        self._sizes: list[int] | None = None  # per-item sizes, aligned with data; None = all 0
        self._count = len(data)  # items accounted for; only ever shrinks after creation
        self._size = 0  # accounted size; only ever shrinks after creation
        self._next_send = 0.0
        self._retry: Iterator[float] | None = None
        self._state = DONE
        self._lease_count = 0
        self._lease_size = 0
        self._faults = 0  # worker crashes / timeouts this batch caused (poison detection)
        self._evicted = False  # dropped to make room (DropOldestBatch), not for a failure
        self._first_lease: float | None = None  # when it was first leased (delivery_timeout)
        self._last_error: BaseException | None = None  # why its latest send failed

    @property
    def item_count(self) -> int:
        """Items of this batch still accounted for (never grows when ``data`` grows)."""
        return self._count

    @property
    def worker_faults(self) -> int:
        """How many times this batch's send crashed or timed out a worker."""
        return self._faults

    def shrink(self) -> int:
        """Shrink the accounting to what is left of ``data``; return how many items went."""
        before = self._count
        n = len(self.data)
        self._count = min(self._count, n)
        sizes = self._sizes
        if not self.data:
            self._size = 0
        elif sizes is not None and len(sizes) == n:
            self._size = min(self._size, sum(sizes))
        elif sizes is not None and n < len(sizes):
            # Items were removed but ``_sizes`` was not realigned, so which ones went is unknown:
            # the n largest recorded sizes bound what is left (exact when sizes are uniform).
            self._size = min(self._size, sum(heapq.nlargest(n, sizes)))
        return before - self._count

    def _apply_change(self, kept: list[int] | None, new_data: list[T] | None) -> None:
        """Apply a send's change to ``data`` (for the buffer, which owns the accounting): the
        indices of the items kept, or a whole new list, whose sizes are unknown."""
        if kept is not None:
            data = self.data
            self.data = [data[i] for i in kept]
            sizes = self._sizes
            if sizes is not None:
                self._sizes = [sizes[i] for i in kept]
        elif new_data is not None:
            self.data = new_data
            self._sizes = None

    def __repr__(self) -> str:
        return (
            f"Batch(id={self.id}, attempt={self.attempt}, items={len(self.data)}, "
            f"meta={self.meta!r}{', synthetic' if self.synthetic else ''})"
        )


def cut(
    items: Sequence[T], sizes: Sequence[int] | None, items_max: int, size_max: int, first_id: int
) -> list[Batch[T]]:
    """Cut ``items`` into batches of at most ``items_max`` items and ``size_max`` total size
    (<= 0: no limit), with ids from ``first_id`` and attempt 1."""
    out: list[Batch[T]] = []
    cur: Batch[T] | None = None
    for i, item in enumerate(items):
        size = sizes[i] if sizes is not None else 0
        if cur is None or (
            (items_max > 0 and cur._count >= items_max)
            or (size_max > 0 and cur._size + size > size_max)
        ):
            cur = Batch([], id=first_id + len(out), attempt=1)
            out.append(cur)
        if size or cur._sizes is not None:
            if cur._sizes is None:
                cur._sizes = [0] * len(cur.data)
            cur._sizes.append(size)
        cur.data.append(item)
        cur._count += 1
        cur._size += size
    return out
