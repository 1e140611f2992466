"""P11: the Dask backend against Dask's own ``client.map``, on one warm cluster.

100,000 small items: through a channel on the Dask backend (batches of 100), through
``client.map`` over the items (one task per item), and through ``client.map`` over chunks of 100.
The same function does the work in all three (``_dask_fns``), on the same LocalCluster of two
single-threaded worker processes, warmed up first; each clock runs from the first item handed
over to the last result collected (the channel's ``close_and_drain``, ``client.gather``). The
systems alternate within each repetition. Target: procdispatch at least as fast as the chunked
``client.map``.

    python benchmarks/bench_dask.py [--items N] [--per-item N] [--reps R] [--quick] [--json PATH]

``--per-item`` sizes the one-task-per-item run separately (it takes minutes at 100,000 here); its
time is reported per 100,000 items.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # Dask's spawned workers inherit sys.path: _dask_fns resolves
    sys.path.insert(0, HERE)

import _dask_fns  # noqa: E402

import procdispatch as pd  # noqa: E402

BATCH = 100


def run_procdispatch(client: Any, items: list[int]) -> float:
    from procdispatch.backends.dask import DaskBackend

    t = time.perf_counter()
    ch = pd.ProcessChannel(
        _dask_fns.send,
        backend=DaskBackend(client),
        workers=2,
        batch_items_max=BATCH,
        batch_age_max=0.01,
    )
    ch.put_many(items)
    assert ch.close_and_drain(600)
    took = time.perf_counter() - t
    assert ch.stats().items_delivered == len(items)
    return took


def run_map_chunks(client: Any, items: list[int]) -> float:
    t = time.perf_counter()
    chunks = [items[i : i + BATCH] for i in range(0, len(items), BATCH)]
    futures = client.map(_dask_fns.work_chunk, chunks, pure=False)
    client.gather(futures)
    took = time.perf_counter() - t
    del futures
    return took


def run_map_items(client: Any, items: list[int]) -> float:
    t = time.perf_counter()
    futures = client.map(_dask_fns.work_item, items, pure=False)
    client.gather(futures)
    took = time.perf_counter() - t
    del futures
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--per-item", type=int, default=None, help="items of the per-item run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="20,000 items, 5,000 per-item, 2 reps")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.reps = 20_000, 2
        args.per_item = args.per_item or 5_000
    per_item = args.per_item or args.items
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            # as the docs advise for channels; client.map's tasks do not fail here either way
            scheduler_kwargs={"allowed_failures": 0},
        ) as cluster,
        Client(cluster) as client,
    ):
        warm = list(range(2_000))
        run_map_chunks(client, warm)
        run_map_items(client, warm[:200])
        run_procdispatch(client, warm)
        items = list(range(args.items))
        runs = {
            "procdispatch (Dask backend)": lambda: run_procdispatch(client, items),
            "client.map, chunks of 100": lambda: run_map_chunks(client, items),
            "client.map, one task per item": lambda: (
                run_map_items(client, items[:per_item]) * (args.items / per_item)
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        names = list(runs)
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                took = runs[name]()
                times[name].append(took)
                print(f"  rep {rep + 1}/{args.reps} {name}: {took:.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = med["procdispatch (Dask backend)"]
    print(f"P11: {args.items:,} items, batches of {BATCH}, {args.reps} reps (median seconds)")
    for name, m in med.items():
        per = f" (scaled from {per_item:,} items)" if "per item" in name else ""
        print(f"  {name:34s} {m:7.2f} s  {args.items / m:9,.0f} items/s{per}")
    chunked = med["client.map, chunks of 100"]
    verdict = "met" if ours <= chunked else "NOT met"
    print(f"  target: procdispatch <= chunked client.map: {chunked / ours:.2f}x ({verdict})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"items": args.items, "per_item": per_item, "times": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
