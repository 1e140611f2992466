"""What one batch costs procdispatch, measured so that load on the machine spoils it little.

    python benchmarks/cost_per_batch.py P3                  # CPU per batch, 5 runs
    python benchmarks/cost_per_batch.py P3 --callgrind      # parent instructions per batch
    python benchmarks/cost_per_batch.py P1 --max-leases 4

A warm channel (2 workers, a no-op send, every worker has run a few batches, then 0.3 s idle)
is handed the workload's items with one ``put_many``. Two measures:

* CPU (the default; Linux): per batch, the coordinator thread's CPU time (its own CPU clock),
  the workers' (``/proc/<pid>/task/*/schedstat``: every thread, in nanoseconds) and the
  producer's, from the ``put_many`` to the last item delivered; and the rate in that time.
  CPU time moves much less than wall time when other work shares the cores, but it still
  moves (caches, clock frequency): compare runs made one after another.
* ``--callgrind``: the parent's instructions per batch. The same program runs twice under
  valgrind's callgrind (``--trace-children=no``: workers are not traced), with N and 3N
  items; the difference in instructions over the difference in batches is what one more
  batch costs the parent, start-up and shutdown cancelled out. Under callgrind the parent is
  some fifty times slower than its workers, so each loop turn finds every worker's answers:
  the count is the parent's work at its busiest. Needs valgrind; about a minute.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import _bench_fns as fns  # noqa: E402

#: workload -> (items for the CPU measure, items per batch, full behaviour)
WORKLOADS = {
    "P1": (1_000_000, 1000, "infinite"),
    "P3": (40_000, 1, "default"),
}


def _worker_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total


def child(n: int, batch: int, full: str, max_leases: int | None, cpu: bool) -> None:
    """One run: a warm channel, ``n`` items; with ``cpu``, print the CPU figures."""
    from _throughput import procdispatch_server

    import procdispatch as pd

    procdispatch_server()
    ch: Any = pd.ProcessChannel(
        fns.noop_batch,
        workers=2,
        max_leases=max_leases,
        batch_items_max=batch,
        full_behavior=pd.InfiniteGrowth() if full == "infinite" else None,
    )
    warm = list(range(batch * 8))
    ch.put_many(warm)
    deadline = time.monotonic() + 120
    while ch.stats().items_delivered < len(warm) or ch.stats().workers_alive < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("warm-up")
        time.sleep(0.005)
    time.sleep(0.3)
    items = list(range(n))
    if cpu:
        coordinator = next(t for t in threading.enumerate() if t.name.endswith("coordinator"))
        clock = time.pthread_getcpuclockid(coordinator.ident or 0)
        pids = [s.handle.pid for s in ch._coord.pool.slots]
        c0, w0, p0 = time.clock_gettime(clock), _worker_ns(pids), time.thread_time()
    t0 = time.perf_counter()
    ch.put_many(items)
    if cpu:
        p1 = time.thread_time()
    total = n + len(warm)
    while ch.stats().items_delivered < total:
        if time.monotonic() > deadline + 600:
            raise TimeoutError("delivery")
        time.sleep(0.0005)
    t1 = time.perf_counter()
    if cpu:
        c1, w1 = time.clock_gettime(clock), _worker_ns(pids)
        nb = n / batch
        print(
            f"{(c1 - c0) / nb * 1e6:.2f} {(w1 - w0) / nb / 1e3:.2f} {(p1 - p0) / nb * 1e6:.2f} "
            f"{n / (t1 - t0):.0f}"
        )
    if not ch.close_and_drain(60):
        raise TimeoutError("close_and_drain")


def _run_child(args: argparse.Namespace, n: int, cpu: bool, prefix: list[str]) -> str:
    cmd = [
        *prefix,
        sys.executable,
        os.path.abspath(__file__),
        args.workload,
        "--child",
        str(n),
        *(["--max-leases", str(args.max_leases)] if args.max_leases else []),
        *(["--cpu"] if cpu else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return proc.stdout


def _instructions(path: str) -> int:
    with open(path) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(1))
    raise SystemExit(f"no instruction count in {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--max-leases", type=int, default=None)
    ap.add_argument("--runs", type=int, default=5, help="CPU measure: runs (default 5)")
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n, batch, full = WORKLOADS[args.workload]
    if args.child is not None:
        child(args.child, batch, full, args.max_leases, args.cpu)
        return
    what = f"{args.workload}, batches of {batch}, max_leases={args.max_leases}"
    if args.callgrind:
        small = 4000 * batch if batch > 1 else 4000
        counts = []
        with tempfile.TemporaryDirectory() as tmp:
            for k, items in enumerate((small, 3 * small)):
                out = os.path.join(tmp, f"cg{k}.out")
                vg = ["valgrind", "--tool=callgrind", "--trace-children=no"]
                _run_child(args, items, False, [*vg, f"--callgrind-out-file={out}"])
                counts.append(_instructions(out))
        per = (counts[1] - counts[0]) / (2 * small / batch)
        print(f"{what}: {per:,.0f} parent instructions per batch (callgrind)")
        return
    rows = [_run_child(args, n, True, []).split() for _ in range(args.runs)]
    cols = list(zip(*[[float(x) for x in r] for r in rows], strict=True))
    print(f"{what}, {n:,} items, {args.runs} runs (median, min-max):")
    names = ("coordinator CPU", "workers' CPU", "producer CPU")
    for name, col in zip(names, cols[:3], strict=False):
        mid, low, high = statistics.median(col), min(col), max(col)
        print(f"  {name:16} {mid:7.2f} us/batch  ({low:.2f}-{high:.2f})")
    rate = cols[3]
    print(f"  {'items/s':16} {statistics.median(rate):9,.0f}  ({min(rate):,.0f}-{max(rate):,.0f})")


if __name__ == "__main__":
    main()
