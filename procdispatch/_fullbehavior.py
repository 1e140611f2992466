"""Full-buffer policies (strategies): what happens when the buffer reaches its limits.

Each policy is a frozen dataclass. ``resolve()`` returns a *new* policy with the derived defaults
filled in and validated against the batch limits -- the user's object is never mutated, and each
buffer gets its own. ``compute_state(total, total_size)`` is then asked before every
insertion: may the item go in, and must one batch be dropped first?
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Literal

from .errors import OptionsError

__all__ = [
    "DERIVED",
    "BlockNewItems",
    "DropOldestBatch",
    "FullBehavior",
    "InfiniteGrowth",
    "check_int_limit",
]


class _Derived(enum.Enum):
    DERIVED = "derived"

    def __repr__(self) -> str:
        return "DERIVED"


#: Marker for a limit left to its derived default (see each policy).
DERIVED = _Derived.DERIVED
Limit = int | None | Literal[_Derived.DERIVED]


def check_int_limit(name: str, value: object, *, allow_none: bool = True) -> None:
    """Raise OptionsError unless value is an int >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        rule = ">= 1 or None" if allow_none else "an int >= 1"
        raise OptionsError(f"{name} must be {rule} (got {value!r})")


def _resolve_pair(
    policy: str,
    items_name: str,
    size_name: str,
    items: Limit,
    size: Limit,
    batch_items_max: int | None,
    batch_size_max: int | None,
    leases: int | None,
) -> tuple[int | None, int | None]:
    if size is DERIVED:
        size = 5 * batch_size_max if batch_size_max is not None else None
    if items is DERIVED:
        if batch_items_max is not None:
            items = max(1000, batch_items_max * (2 * leases if leases is not None else 1))
        else:
            # No count limit on batches: a size limit, if one remains, is the only cap (so a
            # size-only buffer never blocks at 1,000 tiny items); with none, 1,000 items.
            items = None if size is not None else 1000
    check_int_limit(f"{policy}.{items_name}", items)
    check_int_limit(f"{policy}.{size_name}", size)
    if items is not None and batch_items_max is not None and items < batch_items_max:
        raise OptionsError(
            f"{policy}.{items_name} must be >= batch_items_max ({batch_items_max}) or None "
            f"(got {items})"
        )
    if size is not None:
        if batch_size_max is None:
            raise OptionsError(
                f"{policy}.{size_name} may only be set when batch_size_max is set (got {size})"
            )
        if size < batch_size_max:
            raise OptionsError(
                f"{policy}.{size_name} must be >= batch_size_max ({batch_size_max}) or None "
                f"(got {size})"
            )
    if items is None and size is None:
        raise OptionsError(f"{policy} must keep one of {items_name} or {size_name} (got both None)")
    return items, size


class FullBehavior:
    """Base of the full-buffer policies."""

    #: True when the policy can make ``put`` wait (BlockNewItems).
    blocks: bool = False

    def resolve(
        self, batch_items_max: int | None, batch_size_max: int | None, *, leases: int | None = None
    ) -> FullBehavior:
        """A copy with the derived limits filled in and checked against the batch limits.

        ``leases`` is given by a channel: its derived item limit then leaves room for every
        lease full plus as much queued (``max(1000, 2 * leases * batch_items_max)``) instead of
        the pure buffer's ``max(1000, batch_items_max)``.
        """
        raise NotImplementedError

    def compute_state(self, total: int, total_size: int) -> tuple[bool, bool]:
        """(ok to insert, drop a batch first) for the buffer's totals before an insertion."""
        raise NotImplementedError

    def room(self, total: int, total_size: int, want: int) -> int | None:
        """How many of ``want`` more items of size 0 may go in at once, for a policy that never
        drops; None when a batch may have to be dropped first (ask item by item)."""
        return None

    def admission_limits(self) -> tuple[int | None, int | None] | None:
        """(items, size) at which ``put`` must wait (None: no limit on that dimension), or
        None when this policy never makes ``put`` wait."""
        return None


@dataclass(frozen=True)
class BlockNewItems(FullBehavior):
    """Never drop; make ``put`` wait while the buffer holds ``max_items`` items or ``max_size``.

    In-flight batches count until they are acknowledged. Defaults: ``max_size`` =
    ``5 * batch_size_max`` (no limit without it); ``max_items`` = ``max(1000, batch_items_max)``
    in a pure :class:`~procdispatch.buffer.Buffer` and ``max(1000, 2 * max_leases *
    batch_items_max)`` in a channel (every lease full, plus as much queued; ``max_leases`` left
    out counts as ``workers``, except on the Dask backend, which counts its default); with
    ``batch_items_max=None`` no item limit when a size limit remains, else 1,000. ``None``
    lifts a limit; at least one must remain.
    """

    max_items: Limit = DERIVED
    max_size: Limit = DERIVED
    blocks = True

    def resolve(
        self, batch_items_max: int | None, batch_size_max: int | None, *, leases: int | None = None
    ) -> BlockNewItems:
        items, size = _resolve_pair(
            "BlockNewItems",
            "max_items",
            "max_size",
            self.max_items,
            self.max_size,
            batch_items_max,
            batch_size_max,
            leases,
        )
        return replace(self, max_items=items, max_size=size)

    def compute_state(self, total: int, total_size: int) -> tuple[bool, bool]:
        mi, ms = self.max_items, self.max_size
        ok = (mi is None or total < mi) and (ms is None or total_size < ms)  # type: ignore[operator]
        return ok, False

    def room(self, total: int, total_size: int, want: int) -> int | None:
        if not self.compute_state(total, total_size)[0]:
            return 0
        mi = self.max_items
        return min(want, mi - total) if isinstance(mi, int) else want

    def admission_limits(self) -> tuple[int | None, int | None]:
        mi, ms = self.max_items, self.max_size
        return (mi if isinstance(mi, int) else None, ms if isinstance(ms, int) else None)


@dataclass(frozen=True)
class DropOldestBatch(FullBehavior):
    """Never block; at the limit, drop the oldest batch not in flight to make room.

    Defaults as for :class:`BlockNewItems`. When every buffered item is in flight, the new item
    is accepted without dropping anything.
    """

    max_live_items: Limit = DERIVED
    max_live_size: Limit = DERIVED

    def resolve(
        self, batch_items_max: int | None, batch_size_max: int | None, *, leases: int | None = None
    ) -> DropOldestBatch:
        items, size = _resolve_pair(
            "DropOldestBatch",
            "max_live_items",
            "max_live_size",
            self.max_live_items,
            self.max_live_size,
            batch_items_max,
            batch_size_max,
            leases,
        )
        return replace(self, max_live_items=items, max_live_size=size)

    def compute_state(self, total: int, total_size: int) -> tuple[bool, bool]:
        mi, ms = self.max_live_items, self.max_live_size
        drop = (mi is not None and total >= mi) or (ms is not None and total_size >= ms)  # type: ignore[operator]
        return True, drop


@dataclass(frozen=True)
class InfiniteGrowth(FullBehavior):
    """Never block, never drop: memory is the limit."""

    def resolve(
        self, batch_items_max: int | None, batch_size_max: int | None, *, leases: int | None = None
    ) -> InfiniteGrowth:
        return self

    def compute_state(self, total: int, total_size: int) -> tuple[bool, bool]:
        return True, False

    def room(self, total: int, total_size: int, want: int) -> int | None:
        return want
