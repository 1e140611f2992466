"""A sink that accepts part of a batch: only the items it refused are retried.

Bulk APIs often answer item by item: these were stored, those were throttled. Here the sink
(a bulk store whose files live in a temporary directory) refuses about 10% of the items it is
offered, at random. send_fn removes from ``batch.data`` the items the sink accepted and raises
a TransientError for the rest; the channel brings that change back to the parent, so the retry
offers only the refused items, and the next retry fewer still. At the end the program reads
the sink's records and checks that every item was accepted exactly once and was never offered
again after it was accepted: exit status 0 if so, 1 if not.

    python examples/partial_success.py [--items N] [--batch B] [--refuse P] [--workers W]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procdispatch as pd

Item = dict[str, Any]


class BulkSink:
    """A bulk store that answers item by item: ``write`` stores what it accepts and returns
    the items it refused. Every offer is recorded (a JSON line per call, in a file of the
    calling process) so that the program can check the outcome afterwards."""

    def __init__(self, directory: str, refuse: float) -> None:
        self.directory = directory
        self.refuse = refuse

    def write(self, items: list[Item], batch: int, attempt: int) -> list[Item]:
        # A seeded draw per (item, attempt): a refused item may well pass on its next offer.
        draws = [random.Random(f"{item['id']}/{attempt}").random() for item in items]
        refused = [item for item, x in zip(items, draws, strict=True) if x < self.refuse]
        accepted = [item for item, x in zip(items, draws, strict=True) if x >= self.refuse]
        record = {
            "batch": batch,
            "attempt": attempt,
            "accepted": [i["id"] for i in accepted],
            "refused": [i["id"] for i in refused],
        }
        path = os.path.join(self.directory, f"sink-{os.getpid()}.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
        return refused


def make_sender(sink: BulkSink) -> Callable[[pd.Batch[Item]], None]:
    """The send_fn: offer the batch, keep in ``batch.data`` only what the sink refused, and
    fail the batch if anything is left, so that only those items are retried."""

    def send(batch: pd.Batch[Item]) -> None:
        refused = sink.write(batch.data, batch.id, batch.attempt)
        offered = len(batch.data)
        batch.data[:] = refused
        if refused:
            raise pd.TransientError(
                f"batch {batch.id} attempt {batch.attempt}: the sink refused "
                f"{len(refused)} of {offered} items"
            )

    return send


def check(records: list[dict[str, Any]], items: int) -> list[str]:
    """What is wrong with the sink's records for items 0..items-1 (nothing: an empty list)."""
    accepted: Counter[int] = Counter()
    late: set[int] = set()  # items offered again after they were accepted
    for rec in sorted(records, key=lambda r: (r["batch"], r["attempt"])):
        late.update(i for i in rec["accepted"] + rec["refused"] if accepted[i])
        accepted.update(rec["accepted"])
    problems = []
    missing = sorted(set(range(items)) - set(accepted))
    twice = sorted(i for i, n in accepted.items() if n > 1)
    unknown = sorted(i for i in accepted if not 0 <= i < items)
    for what, ids in (
        ("never accepted", missing),
        ("accepted more than once", twice),
        ("offered again after they were accepted", sorted(late)),
        ("accepted but never put", unknown),
    ):
        if ids:
            problems.append(f"{len(ids)} items {what} (first: {ids[:5]})")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=100, help="items per batch")
    ap.add_argument("--refuse", type=float, default=0.1, help="share of offers the sink refuses")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="procdispatch-partial-") as tmp:
        with pd.ProcessChannel(
            make_sender(BulkSink(tmp, args.refuse)),
            workers=args.workers,
            batch_items_max=args.batch,
            batch_age_max=0.2,
            retry=pd.retry.exponential(initial=0.02, max_delay=0.5),
        ) as ch:
            for i in range(args.items):
                ch.put({"id": i, "body": f"event {i}"})
        stats = ch.stats()
        records = [
            json.loads(line)
            for path in sorted(Path(tmp).glob("sink-*.jsonl"))
            for line in path.read_text().splitlines()
        ]

    offers = sum(len(r["accepted"]) + len(r["refused"]) for r in records)
    reoffered = offers - args.items
    first_sends = sum(1 for r in records if r["attempt"] == 1)
    print(
        f"{args.items} items in {first_sends} batches; {len(records)} sends "
        f"({len(records) - first_sends} of them retries), {offers} items offered in all"
    )
    print(
        f"retries offered {reoffered} items again; "
        f"the longest batch took {max((r['attempt'] for r in records), default=0)} sends"
    )
    print(
        f"channel: {stats.items_delivered} items delivered, {stats.batches_retried} retries, "
        f"{stats.items_dropped} dropped"
    )
    problems = check(records, args.items)
    if stats.items_delivered != args.items:
        problems.append(f"the channel delivered {stats.items_delivered} of {args.items} items")
    for problem in problems:
        print(f"MISMATCH: {problem}")
    if not problems:
        print(f"OK: each of the {args.items} items was accepted exactly once")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
