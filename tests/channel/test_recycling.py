"""Recycling limits hold under pipelining: a worker never runs more than max_batches_per_worker
batches, a worker above max_worker_memory gets no new lease, and either is replaced once it
answered what it holds (no batch fails for it)."""

from __future__ import annotations

from collections import Counter

import pytest
from pipefns import CountingSender
from workerfns import Log

N = 60


def _runs_per_worker(log: Log) -> Counter[str]:
    return Counter(r["worker"] for r in log.read() if r["ev"] == "start")


@pytest.mark.needs("pipelining", why="max_leases above workers: leases wait behind the running one")
@pytest.mark.parametrize(("workers", "max_leases"), [(1, 2), (2, 4), (2, 6)])
def test_max_batches_per_worker_holds_under_pipelining(
    tmp_path, make_channel, backend, workers, max_leases
):
    log = Log(tmp_path / "log")
    ch = make_channel(
        CountingSender(log),
        backend=backend,
        workers=workers,
        max_leases=max_leases,
        batch_items_max=1,
        max_batches_per_worker=5,
    )
    ch.put_many(range(N))
    assert ch.close_and_drain(60)
    runs = _runs_per_worker(log)
    assert sum(runs.values()) == N
    assert max(runs.values()) <= 5, runs
    s = ch.stats()
    assert (s.items_delivered, s.batches_failed) == (N, 0)
    assert s.worker_restarts >= N // 5 - workers


@pytest.mark.needs("processes", why="a worker's memory is its process's")
@pytest.mark.parametrize(("workers", "max_leases"), [(1, 2), (2, 4), (2, 6)])
def test_max_worker_memory_holds_under_pipelining(tmp_path, make_channel, workers, max_leases):
    log = Log(tmp_path / "log")
    # Every process is above 1 byte: each one is retired after its first answered batch, so it
    # runs at most what it held then -- one running, the rest waiting in its pipe.
    depth = -(-max_leases // workers)
    ch = make_channel(
        CountingSender(log),
        workers=workers,
        max_leases=max_leases,
        batch_items_max=1,
        max_worker_memory=1,
    )
    ch.put_many(range(N // 3))
    assert ch.close_and_drain(60)
    runs = _runs_per_worker(log)
    assert sum(runs.values()) == N // 3
    assert max(runs.values()) <= depth, runs
    s = ch.stats()
    assert (s.items_delivered, s.batches_failed) == (N // 3, 0)
