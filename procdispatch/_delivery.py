"""Delivery reports: the ``on_delivered`` callback, once per delivered batch, with its items.

Run by :class:`~._outcomes.Outcomes` on the coordinator thread, where ``on_drop`` runs, and
through the same guard (:func:`~._outcomes.call_user`): whatever ``on_delivered`` raises, of
whatever class, is logged and ignored, and a slow one is reported; the accounting is booked
before the call, so nothing the callback does can lose or double-count an item.

What "delivered" is follows the accounting. A send that returned delivered every item its
batch still held: the batch itself is reported. A send that raised after removing items from
``batch.data`` delivered those (the rest is retried or dropped): a batch of just the removed
items is reported, with the batch's id, attempt and meta. Which items were removed is exact
when the send only removed items (the worker sends back the indices it kept) and when
``on_error`` removed them in the parent (matched by identity). When the send put a new list in
``data``, the original items are matched against it by equality, and no more are reported than
the accounting counts as delivered.

Keep-alive batches (``min_qps``) are never reported: they hold no item of the user's.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from .buffer import Batch

__all__ = ["DeliveryReports", "removed_items"]


class DeliveryReports:
    """Tells ``report`` (the guarded call of ``on_delivered``) what was delivered; see the
    module docstring."""

    def __init__(self, report: Callable[[Batch[Any]], None]) -> None:
        self._call = report

    def whole(self, batch: Batch[Any]) -> None:
        """Every item ``batch`` holds was delivered."""
        if not batch.synthetic:
            self._call(batch)

    def part(self, batch: Batch[Any], items: list[Any]) -> None:
        """``items`` of ``batch`` were delivered (removed from its data by a send that raised,
        or by ``on_error``); the rest stays with ``batch``."""
        if items and not batch.synthetic:
            self._call(Batch(items, batch.meta, batch.id, batch.attempt))


def removed_items(
    before: list[Any], kept: list[int] | None, after: list[Any], count: int
) -> list[Any]:
    """The items of ``before`` no longer in ``after``: by the worker's ``kept`` indices when
    given, else matched by identity, then by equality; at most ``count`` of them (the number
    the accounting took as delivered)."""
    if count <= 0:
        return []
    if kept is not None:
        keep = set(kept)
        return [x for i, x in enumerate(before) if i not in keep][:count]
    left = collections.Counter(id(x) for x in after)
    gone: list[Any] = []
    matched = 0
    for x in before:
        if left[id(x)] > 0:
            left[id(x)] -= 1
            matched += 1
        else:
            gone.append(x)
    if matched < len(after):
        # Items that came back as new objects (a send that replaced the list): match them by
        # equality, each one against at most one original.
        ids = {id(x) for x in before}
        for y in after:
            if id(y) in ids:
                continue
            for i, x in enumerate(gone):
                try:
                    same = bool(x == y)
                except BaseException:  # user code (an item's __eq__): as in call_user
                    same = False
                if same:
                    del gone[i]
                    break
    return gone[:count]
