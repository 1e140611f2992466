"""Send functions for the progress and delivery-report tests: importable in worker processes."""

from __future__ import annotations

from typing import Any

from workerfns import Gate

import procdispatch as pd


class GatedItems:
    """send_fn that holds a batch holding one of the given items until that item's gate
    opens."""

    def __init__(self, gates: dict[Any, str]) -> None:
        self.gates = gates

    def __call__(self, batch: pd.Batch[Any]) -> None:
        for item in batch.data:
            path = self.gates.get(item)
            if path is not None:
                Gate(path).wait()


class PartialSender:
    """send_fn that delivers part of each batch per attempt, by removing those items from
    ``batch.data`` and raising for the rest.

    Attempt 1 delivers the items ``x % 3 == 0`` and raises a TransientError (so the rest is
    retried); attempt 2 delivers the items ``x % 3 == 1``, then succeeds unless one of the
    remaining items is ``x % 4 == 0``, which fails the batch permanently (RuntimeError). With
    ``replace=True`` the send puts a new list of copies in ``data`` instead of removing items
    (so the parent learns the new list, not which indices were kept)."""

    def __init__(self, replace: bool = False) -> None:
        self.replace = replace

    def __call__(self, batch: pd.Batch[Any]) -> None:
        key = (lambda x: x["n"]) if self.replace else (lambda x: x)
        gone = 0 if batch.attempt == 1 else 1
        left = [x for x in batch.data if key(x) % 3 != gone]
        if self.replace:
            batch.data = [dict(x) for x in left]
        else:
            batch.data[:] = left
        if batch.attempt == 1 and left:
            raise pd.TransientError(f"batch {batch.id}: {len(left)} items refused for now")
        bad = [key(x) for x in left if key(x) % 4 == 0]
        if bad:
            raise RuntimeError(f"batch {batch.id}: items {bad} refused")
