"""Keeping only fresh sensor readings when the sink cannot keep up: DropOldestBatch.

Sensors emit readings at a steady rate (5,000 a second in all); the sink (one worker, a slow
send) takes far fewer. With ``full_behavior=DropOldestBatch(...)`` the channel never blocks the
producer: when its buffer is full it drops its oldest batch not in flight, so what reaches the
sink is recent, and ``fifo=True`` keeps the sink's view moving forward only. ``on_drop`` counts
the readings dropped. The sink appends each batch's readings to a file; at the end the program
checks that every reading was either received by the sink or dropped, exactly once, that the
sink saw them in order, and that the newest reading reached it: exit status 0 if so, 1 if not.

    python examples/latest_state.py [--readings N] [--rate R] [--buffer M] [--sink-delay S]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procdispatch as pd

Reading = dict[str, Any]
SENSORS = 4


def make_sink(path: str, delay: float) -> Callable[[pd.Batch[Reading]], None]:
    """The send_fn: a slow sink that records, per batch, the readings' sequence numbers and
    how old the oldest one was when it arrived."""

    def send(batch: pd.Batch[Reading]) -> None:
        arrived = time.time()
        line = {
            "batch": batch.id,
            "seqs": [r["seq"] for r in batch.data],
            "age": arrived - min(r["t"] for r in batch.data),
        }
        time.sleep(delay)  # the sink's own pace: this is what the producer outruns
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)

    return send


class DropCounter:
    """An on_drop that remembers the sequence numbers of the dropped readings."""

    def __init__(self) -> None:
        self.batches = 0
        self.seqs: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, batch: pd.Batch[Reading] | None, flush: bool) -> None:
        if batch is None:  # the final call, once the channel drained
            return
        with self._lock:
            self.batches += 1
            self.seqs.extend(r["seq"] for r in batch.data)


def produce(ch: pd.ProcessChannel[Reading], readings: int, rate: float) -> None:
    """Put readings at ``rate`` a second, as sensors sampling at a fixed pace would."""
    start = time.monotonic()
    for seq in range(readings):
        ahead = start + seq / rate - time.monotonic()
        if ahead > 0.001:
            time.sleep(ahead)
        sensor = seq % SENSORS
        value = 20.0 + sensor + math.sin(seq / 500)
        ch.put({"seq": seq, "sensor": sensor, "value": round(value, 3), "t": time.time()})


def check(received: list[int], dropped: list[int], readings: int) -> list[str]:
    """What is wrong with the outcome for readings 0..readings-1 (nothing: an empty list)."""
    problems = []
    got, lost = set(received), set(dropped)
    if len(got) != len(received):
        problems.append(f"{len(received) - len(got)} readings reached the sink twice")
    if len(lost) != len(dropped):
        problems.append(f"{len(dropped) - len(lost)} readings were dropped twice")
    both = got & lost
    if both:
        problems.append(f"{len(both)} readings were both received and dropped")
    neither = set(range(readings)) - got - lost
    if neither:
        problems.append(f"{len(neither)} readings were neither received nor dropped")
    if any(a > b for a, b in itertools.pairwise(received)):
        problems.append("the sink saw a reading older than one it had already seen")
    if readings and readings - 1 not in got:
        problems.append(f"the newest reading #{readings - 1} did not reach the sink")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--readings", type=int, default=25_000)
    ap.add_argument("--rate", type=float, default=5000.0, help="readings per second")
    ap.add_argument("--batch", type=int, default=50, help="readings per batch")
    ap.add_argument("--buffer", type=int, default=200, help="readings the channel may hold")
    ap.add_argument(
        "--sink-delay", type=float, default=0.05, help="seconds the sink takes per batch"
    )
    args = ap.parse_args(argv)

    drops = DropCounter()
    with tempfile.TemporaryDirectory(prefix="procdispatch-latest-") as tmp:
        sink_file = os.path.join(tmp, "sink.jsonl")
        t0 = time.perf_counter()
        with pd.ProcessChannel(
            make_sink(sink_file, args.sink_delay),
            workers=1,
            fifo=True,
            batch_items_max=args.batch,
            batch_age_max=0.05,
            full_behavior=pd.DropOldestBatch(max_live_items=args.buffer),
            on_drop=drops,
        ) as ch:
            produce(ch, args.readings, args.rate)
            produced = time.perf_counter() - t0
        drained = time.perf_counter() - t0
        stats = ch.stats()
        lines = [json.loads(x) for x in Path(sink_file).read_text().splitlines()]

    received = [seq for line in lines for seq in line["seqs"]]
    ages = [line["age"] for line in lines]
    print(
        f"produced {args.readings} readings in {produced:.2f}s; the sink took "
        f"{len(lines)} batches, and was done {drained:.2f}s after the start"
    )
    if ages:
        print(
            f"age of a batch's oldest reading on arrival at the sink: median "
            f"{statistics.median(ages) * 1000:.0f} ms, max {max(ages) * 1000:.0f} ms"
        )
    print(
        f"channel: {stats.items_delivered} delivered, {stats.items_dropped} dropped in "
        f"{stats.batches_dropped} batches"
    )
    problems = check(received, drops.seqs, args.readings)
    if stats.items_dropped != len(drops.seqs):
        problems.append(f"stats count {stats.items_dropped} drops, on_drop {len(drops.seqs)}")
    for problem in problems:
        print(f"MISMATCH: {problem}")
    newest = "reached" if args.readings - 1 in set(received) else "did NOT reach"
    print(
        f"kept {len(received)} of {args.readings} readings, dropped {len(drops.seqs)} "
        f"(in {drops.batches} batches, counted by on_drop); the newest reading "
        f"#{args.readings - 1} {newest} the sink"
    )
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
