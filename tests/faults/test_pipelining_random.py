"""Randomized pipelining rounds: up to 4 leases per worker (or the default's, which follow how
quick its sends are), items and results from 1 byte to 4 MiB, send_timeout kills, crashes,
failures with large mutations, recycling limits.

Each round must drain (no hang) with exact accounting: every item put is delivered or dropped
exactly once, both at the sink (what the workers delivered, less the attempts the parent failed
for a kill or crash: their results never reached it) and in ``stats()``; and no worker runs more
batches than the recycling limits allow. The default run does ROUNDS rounds from a fresh seed
(set PROCDISPATCH_SEED to replay one); ``-m soak`` runs SOAK_ROUNDS.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pipefns import RandomFaults
from workerfns import Gate, Log

import procdispatch as pd
from procdispatch._options import DEPTH

ROUNDS = 20
SOAK_ROUNDS = 200
MAX_SIZE = 4 << 20
#: Bytes of items one round puts, at most: rounds stay short on two cores.
ROUND_BYTES = 24 << 20


def _size(rng: random.Random) -> int:
    """1 byte to 4 MiB, even on a log scale: mostly small, a few large."""
    return min(MAX_SIZE, int(math.exp(rng.uniform(0.0, math.log(MAX_SIZE)))))


def _plan(rng: random.Random) -> dict[str, Any]:
    backend = "thread" if rng.random() < 0.2 else "process"
    workers = rng.randint(1, 3)
    recycle = rng.choice(["none", "count", "memory"] if backend == "process" else ["none", "count"])
    kinds = ["ok"] * 12 + ["raise", "reverse", "remove", "poison"]
    hangs = rng.random() < 0.4
    if hangs:
        kinds.append("hang")
    if backend == "process" and rng.random() < 0.4:
        kinds.append("exit")
    items: list[tuple[int, str, int, bytes]] = []
    total = 0
    for i in range(rng.randint(1, 40)):
        size = _size(rng)
        if total + size > ROUND_BYTES:
            break
        total += size
        items.append((i, rng.choice(kinds), _size(rng), b"p" * size))
    return {
        "backend": backend,
        "workers": workers,
        # None: the default, more than one batch per worker only while its sends are quick
        "max_leases": None if rng.random() < 0.3 else rng.randint(1, 4 * workers),
        "batch_items_max": rng.randint(1, 4),
        "send_timeout": 0.4 if hangs else rng.choice([None, 5.0]),
        "max_batches_per_worker": rng.randint(1, 6) if recycle == "count" else None,
        "max_worker_memory": 1 if recycle == "memory" else None,
        "items": items,
        "chunks": rng.randint(1, 4),
    }


def _describe(seed: int, plan: dict[str, Any]) -> str:
    shown = {k: v for k, v in plan.items() if k != "items"}
    kinds = Counter(item[1] for item in plan["items"])
    return f"seed {seed}: {shown}, {len(plan['items'])} items {dict(kinds)}"


def _round(seed: int, where: Path) -> None:
    plan = _plan(random.Random(seed))
    what = _describe(seed, plan)
    where.mkdir()
    log = Log(where / "log")
    gate = Gate(where / "gate")
    items = plan["items"]
    lost: set[tuple[int, int]] = set()  # attempts whose result never reached the parent
    dropped: list[int] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        if isinstance(e, (pd.SendTimeout, pd.WorkerCrashed)):
            lost.add((b.id, b.attempt))
        return True

    def on_drop(b: pd.Batch[Any] | None, final: bool) -> None:
        if b is not None:
            dropped.extend(item[0] for item in b.data)

    ch: pd.ProcessChannel[Any] = pd.ProcessChannel(
        RandomFaults(log, gate),
        backend=plan["backend"],
        workers=plan["workers"],
        max_leases=plan["max_leases"],
        batch_items_max=plan["batch_items_max"],
        batch_age_max=0.01,
        send_timeout=plan["send_timeout"],
        max_batches_per_worker=plan["max_batches_per_worker"],
        max_worker_memory=plan["max_worker_memory"],
        retry=pd.retry.limited(2, 0.0),
        on_error=on_error,
        on_drop=on_drop,
    )
    try:
        step = -(-len(items) // plan["chunks"])
        for i in range(0, len(items), step):
            assert ch.put_many(items[i : i + step], timeout=60) == len(items[i : i + step])
        assert ch.close_and_drain(120), f"no drain: {what}"
    finally:
        gate.open()  # hung sends of abandoned thread workers end
        if not ch.drained:
            ch.cancel()
            ch.wait_drained(60)

    recs = log.read()
    delivered = [
        x
        for r in recs
        if r["ev"] == "delivered" and (r["id"], r["attempt"]) not in lost
        for x in r["items"]
    ]
    assert sorted(delivered + dropped) == list(range(len(items))), what
    s = ch.stats()
    assert s.items_put == len(items), what
    assert (s.items_delivered, s.items_dropped) == (len(delivered), len(dropped)), what
    assert (s.items_buffered, s.items_in_flight) == (0, 0), what
    runs = Counter(r["worker"] for r in recs if r["ev"] == "start")
    if plan["max_batches_per_worker"] is not None:
        assert max(runs.values()) <= plan["max_batches_per_worker"], (runs, what)
    if plan["max_worker_memory"] is not None:
        leases = plan["max_leases"] or DEPTH * plan["workers"]
        depth = -(-leases // plan["workers"])
        assert max(runs.values()) <= depth, (runs, what)


def _base_seed() -> int:
    fixed = os.environ.get("PROCDISPATCH_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(1 << 32)


def test_random_pipelining_rounds(tmp_path: Path) -> None:
    base = _base_seed()
    for i in range(ROUNDS):
        _round(base + i, tmp_path / f"round{i}")


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_random_pipelining_rounds_soak(tmp_path: Path) -> None:
    base = _base_seed()
    for i in range(SOAK_ROUNDS):
        _round(base + i, tmp_path / f"round{i}")
