"""Chaos: Dask worker processes are killed at random while 5,000 items go through a channel.

Only the batches on a killed worker fail (WorkerCrashed naming that worker) and are retried by
the channel's policy; every item is delivered or dropped exactly once by the accounting; and no
send whose answer the coordinator had received is made again (checked at the sink, which logs
every send with its batch id and attempt).
"""

from __future__ import annotations

import collections
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed")

from daskfns import Sink
from daskhelp import new_cluster
from workerfns import Log, wait_for

import procdispatch as pd
from procdispatch.backends.dask import DaskBackend, close_cluster

ITEMS = 5000
KILLS = 5


def test_killed_dask_workers_fail_only_their_batches_and_nothing_received_is_sent_again(
    tmp_path: Path,
) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    log = Log(tmp_path / "sink")
    cluster, client = new_cluster()
    delivered: list[tuple[int, int, list[int]]] = []
    dropped: list[int] = []
    errors: list[tuple[BaseException, int, int]] = []
    killed: set[str] = set()

    def on_error(b: pd.Batch[int], exc: BaseException) -> bool:
        errors.append((exc, b.id, b.attempt))
        return True

    try:
        ch = pd.ProcessChannel(
            Sink(log),
            backend=DaskBackend(client),
            workers=2,
            batch_items_max=20,
            batch_age_max=0.05,
            retry=pd.retry.exponential(initial=0.01, max_attempts=30),
            on_error=on_error,
            on_delivered=lambda b: delivered.append((b.id, b.attempt, list(b.data))),
            on_drop=lambda b, final: b is not None and dropped.extend(b.data),
        )
        ch.put_many(range(ITEMS))
        marks = sorted(rng.sample(range(10, ITEMS // 20 - 20), KILLS))
        for mark in marks:
            wait_for(
                lambda mark=mark: len([r for r in log.read() if r["ev"] == "sent"]) >= mark,
                timeout=120,
                what=f"{mark} sends",
            )
            pids = _pids(client)
            address = rng.choice(sorted(pids))
            killed.add(address)
            os.kill(pids[address], signal.SIGKILL)
        assert ch.close_and_drain(120)
        _pids(client)  # the last killed worker is replaced: its cluster closes cleanly
    finally:
        client.close()
        close_cluster(cluster)

    # Every item left the channel exactly once, as delivered or dropped.
    out = [x for _, _, data in delivered for x in data] + dropped
    assert sorted(out) == list(range(ITEMS))
    s = ch.stats()
    assert (s.items_put, s.items_delivered + s.items_dropped) == (ITEMS, ITEMS)
    assert not dropped  # the policy retries a lost batch until it goes through
    # Only batches on killed workers failed, each as WorkerCrashed naming its worker.
    for exc, _, _ in errors:
        assert isinstance(exc, pd.WorkerCrashed), exc
        assert exc.where in killed, (exc.where, killed)
    # No send whose answer reached the coordinator was made again, by Dask or by us.
    sends = collections.Counter((r["id"], r["attempt"]) for r in log.read() if r["ev"] == "start")
    last_attempt: dict[int, int] = {}
    for r in log.read():
        if r["ev"] == "start":
            last_attempt[r["id"]] = max(last_attempt.get(r["id"], 0), r["attempt"])
    for bid, attempt, _ in delivered:
        assert sends[(bid, attempt)] == 1, (bid, attempt)
        assert last_attempt[bid] == attempt, (bid, attempt)
    # Every lost batch was retried, not repeated by Dask: a repeat would show as a second send
    # of the same attempt.
    assert all(n == 1 for n in sends.values()), [k for k, n in sends.items() if n > 1]


def _pids(client: Any) -> dict[str, int]:
    """{address: pid} of the two workers, once both are up (a killed one is being replaced)."""

    def both() -> dict[str, int] | None:
        client.wait_for_workers(2, timeout=60)
        got = client.run(os.getpid, on_error="return")
        pids = {a: p for a, p in got.items() if isinstance(p, int)}
        return pids if len(pids) == 2 else None

    found: dict[str, int] = wait_for(both, timeout=60, what="two live workers")
    return found
