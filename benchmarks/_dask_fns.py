"""The work of P11 (benchmarks/bench_dask.py): importable by Dask's worker processes."""

from __future__ import annotations

from typing import Any


def work_item(x: int) -> int:
    """A small piece of work per item (a few microseconds)."""
    return hash((x, x * 3)) & 0xFF


def work_chunk(xs: list[int]) -> int:
    return sum(work_item(x) for x in xs)


def send(batch: Any) -> None:
    work_chunk(batch.data)
