"""An asyncio service feeding a channel: several event sources, async workers, graceful shutdown.

A few producer tasks stand for the service's event sources (each emits events at its own
jittered pace) and feed one ProcessChannel with ``await ch.aput(event)``: the event loop never
blocks, even while the channel's buffer is full. The workers' ``send_fn`` is a coroutine
function: each worker opens its "client" once in an async ``worker_init`` (here an append-only
results file written through a small async wrapper, standing for an HTTP session or a database
pool) and every batch is awaited on that worker's one event loop.

SIGINT or SIGTERM stops the sources gracefully: they finish the event in hand, the ``async with``
block ends normally, and leaving it closes the channel and awaits the drain, so every event
accepted is still delivered. The program then checks that each event arrived exactly once.

    python examples/asyncio_producer.py [--events N] [--sources S] [--workers W]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import procdispatch as pd


class ResultsClient:
    """Stands for an asyncio client: made on the worker's loop, used by every send."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = asyncio.Lock()  # tied to the worker's loop, as a real client's state is

    async def write(self, rows: list[dict[str, Any]]) -> None:
        async with self.lock:
            await asyncio.sleep(0.001)  # the round trip a real client would await
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


_client: ResultsClient | None = None


def make_worker(out_dir: str) -> tuple[Any, Any]:
    """The async worker_init and send_fn; pickled with out_dir."""

    async def init() -> None:
        global _client
        _client = ResultsClient(Path(out_dir) / f"worker-{os.getpid()}.jsonl")

    async def send(batch: pd.Batch[dict[str, Any]]) -> None:
        assert _client is not None
        await _client.write(batch.data)

    return init, send


async def source(
    name: int, events: int, ch: pd.ProcessChannel[dict[str, Any]], stop: asyncio.Event
) -> int:
    """One event source: emits ``events`` events unless told to stop; returns how many."""
    rng = random.Random(name)
    sent = 0
    for seq in range(events):
        if stop.is_set():
            break
        if rng.random() < 0.05:
            await asyncio.sleep(rng.uniform(0, 0.002))  # a quiet moment of this source
        await ch.aput({"source": name, "seq": seq, "value": rng.random()})
        sent += 1
    return sent


async def serve(args: argparse.Namespace, out_dir: str) -> tuple[int, pd.Stats]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    init, send = make_worker(out_dir)
    per_source = -(-args.events // args.sources)
    counts = [min(per_source, args.events - i * per_source) for i in range(args.sources)]
    async with pd.ProcessChannel(
        send,
        worker_init=init,
        workers=args.workers,
        batch_items_max=200,
        batch_age_max=0.1,
    ) as ch:
        produced = await asyncio.gather(
            *(source(i, n, ch, stop) for i, n in enumerate(counts) if n > 0)
        )
    # Leaving the block closed the channel and awaited the drain.
    return sum(produced), ch.stats()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        produced, stats = asyncio.run(serve(args, out_dir))
        seen: dict[tuple[int, int], int] = {}
        for path in Path(out_dir).glob("worker-*.jsonl"):
            for line in path.read_text().splitlines():
                r = json.loads(line)
                key = (r["source"], r["seq"])
                seen[key] = seen.get(key, 0) + 1
        workers = len(list(Path(out_dir).glob("worker-*.jsonl")))
    print(f"produced {produced} events from {args.sources} sources")
    print(f"delivered {len(seen)} distinct events through {workers} worker(s)")
    print(stats)
    ok = (
        len(seen) == produced
        and all(n == 1 for n in seen.values())
        and stats.items_put == stats.items_delivered == produced
    )
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
