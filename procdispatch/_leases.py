"""The leased batches' accounting: which batches are out, and how many items and bytes.

:class:`Leases` is the part of :class:`~procdispatch.buffer.Buffer` that keeps the batches
leased now: a lease starts (:meth:`Leases._lease`, moving a batch's counts from unleased to
leased) and ends exactly once (:meth:`Leases.ack`, or the buffer's ``nack`` and ``release``),
and in between what a send did to the batch is applied and settled (:meth:`Leases.apply_mutation`,
:meth:`Leases.settle`). The accounting only ever shrinks while a batch is out. The buffer
itself fills, cuts, queues and retries batches; like it, nothing here is thread-safe.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from ._batch import DONE as _DONE
from ._batch import LEASED as _LEASED
from ._batch import Batch
from .errors import ProcDispatchError

__all__ = ["Leases"]

T = TypeVar("T")


class Leases(Generic[T]):
    """The batches leased now and their accounting; see the module docstring."""

    #: Counted by the buffer (items and size queued or being filled): a lease moves its batch's
    #: counts from there to here.
    _unleased_items: int
    _unleased_size: int

    def __init__(self) -> None:
        self._leases: dict[int, Batch[T]] = {}
        self._leased_items = 0
        self._leased_size = 0

    @property
    def leased(self) -> int:
        return len(self._leases)

    def ack(self, batch: Batch[T]) -> None:
        """The lease ended well (or the batch is being dropped): forget the batch."""
        self._end_lease(batch, "ack")
        batch._state = _DONE

    def leases(self) -> list[Batch[T]]:
        """The batches leased now (not yet acked or nacked), oldest first."""
        return sorted(self._leases.values(), key=lambda b: b.id)

    # ---- what a send did to a leased batch ----------------------------------------------------

    def apply_mutation(
        self, batch: Batch[T], kept: list[int] | None, new_data: list[T] | None
    ) -> None:
        """Apply a send's change to a leased batch's data: the indices of the items it kept
        (it only removed items), or a whole new list. The accounting follows at
        :meth:`settle`; a new list's sizes are unknown, so its accounted size stays (a batch's
        accounting never grows)."""
        self._check_leased(batch, "apply_mutation")
        batch._apply_change(kept, new_data)

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

    # ---- internals --------------------------------------------------------------------------

    def _lease(self, b: Batch[T], now: float | None = None) -> Batch[T]:
        b._state = _LEASED
        b.attempt += 1
        if b._first_lease is None:
            b._first_lease = now
        b._lease_count = count = b._count
        b._lease_size = size = b._size
        self._leases[b.id] = b
        self._unleased_items -= count
        self._unleased_size -= size
        self._leased_items += count
        self._leased_size += size
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
        leases = self._leases
        try:
            leased = leases.get(batch.id) is batch
        except AttributeError:  # not a Batch at all
            leased = False
        if not leased:
            self._check_leased(batch, what)  # raises, saying what is wrong
        del leases[batch.id]
        self._leased_items -= batch._lease_count
        self._leased_size -= batch._lease_size
