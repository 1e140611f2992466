"""Options and statistics of the pure buffer (:class:`~procdispatch.buffer.Buffer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._fullbehavior import BlockNewItems, FullBehavior, check_int_limit
from .errors import OptionsError
from .retry import RetryFactory, exponential

__all__ = ["BufferOptions", "BufferStats"]


@dataclass(frozen=True)
class BufferStats:
    """A snapshot of what the buffer holds (synthetic items included)."""

    unleased_items: int = 0
    unleased_size: int = 0
    leased_items: int = 0
    leased_size: int = 0

    @property
    def total(self) -> int:
        """Items held, leased or not."""
        return self.unleased_items + self.leased_items

    @property
    def total_size(self) -> int:
        """The summed ``item_size`` of the items held, leased or not."""
        return self.unleased_size + self.leased_size

    @property
    def empty(self) -> bool:
        """True when the buffer holds nothing."""
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


def _check_retry_factory(retry: object) -> None:
    """Raise OptionsError unless ``retry`` is callable. It is not called here: a factory may
    hand out its iterators in order (one per failing batch), so a trial call would use one up;
    what it returns is checked when a batch first fails (:meth:`Buffer.nack`)."""
    if not callable(retry):
        raise OptionsError(f"retry must be a callable returning an iterator (got {retry!r})")
