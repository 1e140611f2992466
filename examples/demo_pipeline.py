"""A real pipeline on generated data: CPU-heavy scoring of sensor readings in worker processes.

The producer generates readings and puts them into a ProcessChannel. Each worker scores its
batch (an iterated hash per reading: pure-Python CPU work), and writes one JSON line per batch
to a results file of its own. One reading in 500 is "corrupt" and fails its first send with a
TransientError, so the retry path runs too. At the end the parent reads every results file and
checks that each reading arrived exactly once, then prints what was delivered.

    python examples/demo_pipeline.py [--readings N] [--workers W] [--batch B]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import procdispatch as pd


def score(value: float, rounds: int) -> int:
    """CPU work: an iterated SHA-256 of the reading, reduced to a small score."""
    h = repr(value).encode()
    for _ in range(rounds):
        h = hashlib.sha256(h).digest()
    return h[0]


def make_sender(out_dir: str, rounds: int) -> Callable[[pd.Batch[dict[str, float]]], None]:
    def send(batch: pd.Batch[dict[str, float]]) -> None:
        if batch.attempt == 1 and any(r["id"] % 500 == 0 for r in batch.data):
            raise pd.TransientError(f"batch {batch.id}: corrupt reading, try again")
        scores = [score(r["value"], rounds) for r in batch.data]
        line = {
            "pid": os.getpid(),
            "batch": batch.id,
            "attempt": batch.attempt,
            "ids": [int(r["id"]) for r in batch.data],
            "score_sum": sum(scores),
        }
        with open(Path(out_dir) / f"worker-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    return send


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--readings", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=200, help="hash rounds per reading")
    args = ap.parse_args(argv)

    rng = random.Random(42)
    with tempfile.TemporaryDirectory(prefix="procdispatch-demo-") as out_dir:
        t0 = time.perf_counter()
        with pd.ProcessChannel(
            make_sender(out_dir, args.rounds),
            workers=args.workers,
            batch_items_max=args.batch,
            batch_age_max=0.2,
            retry=pd.retry.exponential(initial=0.05, max_attempts=4),
        ) as ch:
            for i in range(args.readings):
                ch.put({"id": i, "value": rng.gauss(20.0, 5.0)})
        elapsed = time.perf_counter() - t0
        stats = ch.stats()

        seen: dict[int, int] = {}
        per_worker: dict[int, int] = {}
        score_total = 0
        for path in Path(out_dir).glob("worker-*.jsonl"):
            for raw in path.read_text().splitlines():
                rec = json.loads(raw)
                for i in rec["ids"]:
                    seen[i] = seen.get(i, 0) + 1
                per_worker[rec["pid"]] = per_worker.get(rec["pid"], 0) + len(rec["ids"])
                score_total += rec["score_sum"]

    missing = args.readings - len(seen)
    dupes = sum(1 for c in seen.values() if c > 1)
    print(
        f"delivered {len(seen)} of {args.readings} readings in {elapsed:.2f}s "
        f"({args.readings / elapsed:,.0f} readings/s) with {args.workers} workers"
    )
    for pid, n in sorted(per_worker.items()):
        print(f"  worker pid {pid}: {n} readings")
    print(f"score checksum {score_total}; missing {missing}; delivered twice {dupes}")
    print(f"stats: {stats}")
    ok = missing == 0 and dupes == 0 and stats.items_delivered == args.readings
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
