"""send_fn of the large-item tests (importable in worker processes)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from workerfns import Gate, Log

import procdispatch as pd

HOLD = b"hold"


def describe(x: Any) -> list[Any]:
    """An item's type, size and digest (its repr when it is not bytes-like)."""
    if isinstance(x, (bytes, bytearray)):
        return [type(x).__name__, len(x), hashlib.sha1(x).hexdigest()]
    return [type(x).__name__, repr(x)]


class Describe:
    """Logs ``sent`` with what each item is, as ``send_fn`` sees it. A batch whose first item
    begins with ``HOLD`` first logs ``start`` (with its pid) and waits for the gate."""

    def __init__(self, log: Log, gate: Gate | None = None) -> None:
        self.log = log
        self.gate = gate

    def __call__(self, batch: pd.Batch[Any]) -> None:
        rec = {"pid": os.getpid(), "id": batch.id, "attempt": batch.attempt}
        first = batch.data[0]
        if isinstance(first, (bytes, bytearray)) and first[: len(HOLD)] == HOLD:
            self.log.write(ev="start", **rec)
            assert self.gate is not None
            self.gate.wait(120)
        self.log.write(ev="sent", items=[describe(x) for x in batch.data], **rec)


class RemoveHalfThenFail:
    """On a first attempt, removes the first half of ``batch.data`` (delivered) and raises;
    on a retry, logs ``sent`` with what it got and returns."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def __call__(self, batch: pd.Batch[Any]) -> None:
        if batch.attempt == 1:
            del batch.data[: len(batch.data) // 2]
            raise ValueError("half of it went")
        self.log.write(ev="sent", items=[describe(x) for x in batch.data])
