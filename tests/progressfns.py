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
