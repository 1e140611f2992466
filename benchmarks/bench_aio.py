"""Event-loop responsiveness while asyncio producers feed a channel whose buffer is full.

A ticker task asks the loop to wake it every ``TICK`` seconds and records how late each wake
is; meanwhile producer tasks ``await ch.aput(item)`` as fast as the channel takes items. The
workers are slow on purpose (each batch sleeps), and the buffer is small, so the producers spend
the run waiting for room: the measure is what that waiting costs the rest of the loop. Target:
a p99 lateness under 50 ms.

Modes, each in the same run:

* ``idle``: the ticker alone, no channel (the loop's and the machine's own lateness);
* ``aput``: the producers use ``aput`` (the loop never blocks);
* ``put (blocking)``: the producers call the blocking ``put`` in the loop, as code unaware of
  ``aput`` would: what the ticker suffers without it.

    python benchmarks/bench_aio.py [--seconds S] [--producers P] [--json PATH]

Reports, per mode: ticks, lateness p50 / p99 / max in milliseconds, and items put per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import procdispatch as pd

TICK = 0.005
TARGET_P99_MS = 50.0


def slow_send(batch: pd.Batch[int]) -> None:
    time.sleep(0.05)  # a slow consumer: the producers outrun it, so the buffer stays full


async def ticker(stop: asyncio.Event, late: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + TICK
        await asyncio.sleep(TICK)
        late.append(max(0.0, loop.time() - due))


async def run_mode(mode: str, seconds: float, producers: int) -> dict[str, Any]:
    stop = asyncio.Event()
    late: list[float] = []
    put = 0
    tick = asyncio.ensure_future(ticker(stop, late))
    if mode == "idle":
        await asyncio.sleep(seconds)
    else:
        ch: pd.ProcessChannel[int] = pd.ProcessChannel(
            slow_send,
            workers=2,
            batch_items_max=20,
            batch_age_max=0.05,
            full_behavior=pd.BlockNewItems(max_items=200),
            on_drop=pd.drop_quiet,  # the cancel at the end drops what is queued
        )
        ch.put_many(range(200))  # the buffer starts full
        await asyncio.sleep(0.2)  # the workers start before the clock runs
        late.clear()

        async def produce() -> None:
            nonlocal put
            while not stop.is_set():
                if mode == "aput":
                    await ch.aput(put)
                else:
                    ch.put(put)
                    await asyncio.sleep(0)  # a blocking producer that still yields between puts
                put += 1

        tasks = [asyncio.ensure_future(produce()) for _ in range(producers)]
        await asyncio.sleep(seconds)
        stop.set()
        ch.cancel()  # release the producers waiting for room
        await asyncio.gather(*tasks, return_exceptions=True)
        await ch.await_drained(60)
    stop.set()
    await tick
    q = statistics.quantiles(late, n=100, method="inclusive") if len(late) > 1 else [0.0] * 99
    return {
        "mode": mode,
        "ticks": len(late),
        "p50_ms": 1000 * statistics.median(late) if late else 0.0,
        "p99_ms": 1000 * q[98],
        "max_ms": 1000 * max(late, default=0.0),
        "items_per_s": put / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [
        asyncio.run(run_mode(mode, args.seconds, args.producers))
        for mode in ("idle", "aput", "put (blocking)")
    ]
    print(f"ticker every {TICK * 1000:.0f} ms, {args.producers} producers, {args.seconds:.0f} s")
    print(f"{'mode':<16}{'ticks':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'items/s':>10}")
    for r in rows:
        print(
            f"{r['mode']:<16}{r['ticks']:>7}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{r['max_ms']:>9.2f}{r['items_per_s']:>10.0f}"
        )
    aput = rows[1]
    met = aput["p99_ms"] < TARGET_P99_MS
    print(
        f"aput p99 lateness {aput['p99_ms']:.2f} ms (target < {TARGET_P99_MS:.0f} ms): "
        f"{'met' if met else 'NOT met'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "target_p99_ms": TARGET_P99_MS, "met": met}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
