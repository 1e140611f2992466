"""Run rounds of a producer that SIGINT interrupts at a random instant; report each round.

Usage: ``python interrupt_driver.py ROUNDS SEED SINK_DIR [MODES]`` (MODES: a comma-separated
subset of put, put_many, drain). Each round builds a channel, feeds
it from the main thread (``put``, ``put_many`` or a ``close_and_drain`` of what was put) inside
a ``with`` block, and a timer thread sends this process SIGINT -- sometimes twice -- at random
instants. The round then checks, in this process, what a user must be able to rely on:

* the ``with`` block was left within ``cancel_grace + 2 s`` of the first SIGINT (a watchdog
  dumps every stack and exits with status 3 otherwise);
* the channel drained, no lock is left held, and ``put`` raises ``ChannelClosed`` at once;
* the accounting is exact: ``items_put == delivered + dropped``; the items accepted are exactly
  ``range(items_put)`` (one producer, consecutive items); every accepted item reached the sink or
  ``on_drop``; ``on_drop`` saw no item twice and the sink saw no item twice.

One JSON line per round goes to stdout; the exit status is 0 only if every round held.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workerfns import Log

import procdispatch as pd

CANCEL_GRACE = 0.5
#: Items one round puts at most. A cancel reports every buffered batch to on_drop, one call
#: each, so what a cancel costs grows with what is buffered; this keeps it well under a second.
MAX_ITEMS = 100_000


class Sink:
    """send_fn: a short random pause (so that interrupts find sends in flight), then record."""

    def __init__(self, log: Log, pause: float) -> None:
        self.log = log
        self.pause = pause

    def __call__(self, batch: pd.Batch[int]) -> None:
        if self.pause:
            time.sleep(random.random() * self.pause)
        self.log.write(ev="sent", id=batch.id, data=list(batch.data))


def _interrupt_later(
    delays: list[float], fired: list[float], exited: threading.Event
) -> threading.Thread:
    def run() -> None:
        for d in delays:
            if exited.wait(d):
                return  # the with block is over: later interrupts would hit the checks
            fired.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_for_interrupt() -> None:
    """Sleep in short steps: a SIGINT the kernel gives another thread does not interrupt a
    long sleep of the main thread, and Python runs handlers in the main thread only."""
    for _ in range(500):
        time.sleep(0.01)


class _Stamp:
    """Records when the with block (the channel's __exit__ included) was left."""

    def __init__(self, out: list[float]) -> None:
        self.out = out

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        self.out.append(time.monotonic())


def one_round(rng: random.Random, sink_dir: str, n: int, modes: list[str]) -> dict[str, Any]:
    mode = rng.choice(modes)
    backend = "thread" if rng.random() < 0.2 else "process"
    full = rng.choice(["block", "grow", "drop"])
    per_batch = rng.choice([1, 7, 100])
    fb: pd.FullBehavior = {
        "block": pd.BlockNewItems(max_items=rng.choice([100, 500, 5000])),
        "grow": pd.InfiniteGrowth(),
        "drop": pd.DropOldestBatch(max_live_items=rng.choice([100, 2000])),
    }[full]
    workers = rng.choice([1, 2])
    log = Log(os.path.join(sink_dir, f"sink-{n}.jsonl"))
    dropped: list[int] = []

    def on_drop(b: pd.Batch[int] | None, flush: bool) -> None:
        if b is not None:
            dropped.extend(b.data)

    ch = pd.ProcessChannel(
        Sink(log, rng.choice([0.0, 0.002, 0.02, 0.3])),
        workers=workers,
        max_leases=workers * rng.choice([1, 2]),
        batch_items_max=per_batch,
        batch_age_max=0.01,
        full_behavior=fb,
        cancel_grace=CANCEL_GRACE,
        on_drop=on_drop,
        backend=backend,
    )
    # Within the first tenth of a second of producing, when the producer is still busy
    # (100,000 puts take longer than that here), or its drain still under way.
    first = rng.uniform(0.0, 0.1)
    delays = [first] + ([rng.uniform(0.0, CANCEL_GRACE)] if rng.random() < 0.3 else [])
    fired: list[float] = []
    exited = threading.Event()
    left: list[float] = []
    timer: threading.Thread | None = None
    try:
        with _Stamp(left), ch:
            timer = _interrupt_later(delays, fired, exited)
            if mode == "put":
                for i in range(MAX_ITEMS):
                    ch.put(i)
                _wait_for_interrupt()
            elif mode == "put_many":
                start = 0
                while start < MAX_ITEMS:
                    k = rng.choice([1, 10, 1000])
                    ch.put_many(range(start, start + k))
                    start += k
                _wait_for_interrupt()
            else:
                ch.put_many(range(rng.choice([100, 3000])))
                ch.close_and_drain()
                _wait_for_interrupt()  # here if the drain was quicker
    except KeyboardInterrupt:
        pass
    while True:
        # A second SIGINT sent just as the block was left may still arrive: absorb it here,
        # away from the checks below.
        try:
            exited.set()
            if timer is not None:
                timer.join()
            break
        except KeyboardInterrupt:
            continue
    rec: dict[str, Any] = {"round": n, "mode": mode, "backend": backend, "full": full}
    rec["batch_items_max"] = per_batch
    rec["interrupts"] = len(fired)
    rec["exit_after"] = round(left[0] - fired[0], 3) if fired and left else None
    problems: list[str] = []
    if not ch.drained:
        problems.append("not drained after the with block")
    if ch._adm.lock.locked():
        problems.append("admission lock left held")
    try:
        ch.put(-1)
        problems.append("put after the with block did not raise")
    except pd.ChannelClosed:
        pass
    s = ch.stats()
    rec.update(put=s.items_put, delivered=s.items_delivered, dropped=s.items_dropped)
    if s.items_put != s.items_delivered + s.items_dropped:
        problems.append(f"stats do not add up: {s}")
    sent: list[int] = []
    for r in log.read():
        sent.extend(r["data"])
    if len(sent) != len(set(sent)):
        problems.append("the sink saw an item twice")
    if len(dropped) != len(set(dropped)):
        problems.append("on_drop saw an item twice")
    if len(dropped) != s.items_dropped:
        problems.append(f"on_drop saw {len(dropped)} items, stats say {s.items_dropped}")
    accepted = set(range(s.items_put))
    seen = set(sent) | set(dropped)
    if seen != accepted:
        extra = sorted(seen - accepted)[:5]
        missing = sorted(accepted - seen)[:5]
        problems.append(f"items seen != items put: extra {extra}, missing {missing}")
    rec["problems"] = problems
    return rec


def main() -> int:
    rounds, seed, sink_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    modes = sys.argv[4].split(",") if len(sys.argv) > 4 else ["put", "put_many", "drain"]
    rng = random.Random(seed)
    ok = True
    for n in range(rounds):
        # The with block must be left within cancel_grace + 2 s of the SIGINT; the round's
        # start-up and producing come on top, so the watchdog is armed per round with both.
        faulthandler.dump_traceback_later(CANCEL_GRACE + 2 + 0.3 + 30, exit=True)
        rec = one_round(rng, sink_dir, n, modes)
        faulthandler.cancel_dump_traceback_later()
        late = rec["exit_after"] is not None and rec["exit_after"] > CANCEL_GRACE + 2
        if late:
            rec["problems"].append(f"left the with block {rec['exit_after']}s after SIGINT")
        if rec["problems"]:
            ok = False
        print(json.dumps(rec), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
