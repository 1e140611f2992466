"""Where the cold clock of P1 and P3 goes: its parts, for procdispatch, a Pool and PPE.

    python benchmarks/cold_parts.py P3 --reps 7
    python benchmarks/cold_parts.py P1 --reps 7 --systems procdispatch,ppe

Each measurement is a fresh interpreter (``run.py``'s runner: timeout, clean-up), the systems
alternating, as in ``run.py``'s cold mode: the forkservers are started (and have finished their
preload, unless ``--unready``) and the pool's module is imported before the clock, and the
clock runs from the constructor to the end of the shutdown.
What is timed outside the clock is shown too (``import``: importing the package and taking its
pool class; ``forkserver``: starting the server(s)).

procdispatch's events come from wrappers put, in the measuring process only, around the
package's own methods (the library is not changed): its backend's ``prepare``, each worker's
start on its starter thread, each worker's Ready (its slot leaving STARTING), the first and last
batch delivered, ``close_and_drain``, the stop sent to each worker and its end. The pools' come
from the caller's side: the constructor, the first and the last result, the shutdown.
Times are milliseconds since the constructor was called; the table shows the median over the
repetitions, and the min-max.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import argparse  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

WORKLOADS = {
    # id: (items, batch, procdispatch's full_behavior)
    "P1": (1_000_000, 1000, "infinite"),
    "P3": (20_000, 1, "default"),
}
SYSTEMS = ("procdispatch", "pool", "ppe")


# ---- child side -----------------------------------------------------------------------------


class Events:
    """First occurrence of each event, in seconds of perf_counter (any thread)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, name: str, last: bool = False) -> None:
        now = time.perf_counter()
        with self._lock:
            if last or name not in self.t:
                self.t[name] = now


def _hook_procdispatch(ev: Events) -> None:
    """Wrap the package's methods to mark events (see the module docstring)."""
    from procdispatch import _outcomes, _pool
    from procdispatch.backends import process

    def around(cls: Any, name: str, before: str | None, after: str | None) -> None:
        orig = getattr(cls, name)

        def wrapper(self: Any, *a: Any, **k: Any) -> Any:
            if before:
                ev.mark(before.format(a=a))
            try:
                return orig(self, *a, **k)
            finally:
                if after:
                    ev.mark(after.format(a=a))

        setattr(cls, name, wrapper)

    around(process.ProcessBackend, "prepare", "prepare begins", "prepare ends")
    around(process.ProcessBackend, "start_worker_abortable", "start w{a[0]} begins", None)
    around(process.ProcessBackend, "start_worker_abortable", None, "start w{a[0]} returns")
    move = _pool.Slot.move

    def moved(self: Any, to: Any) -> None:
        was = self.state
        move(self, to)
        if was is _pool.STARTING and to is _pool.IDLE:
            ev.mark(f"ready w{self.wid}")

    _pool.Slot.move = moved  # type: ignore[method-assign]
    delivered = _outcomes.Outcomes.delivered

    def on_delivered(self: Any, b: Any) -> None:
        delivered(self, b)
        ev.mark("first ack")
        ev.mark("last ack", last=True)

    _outcomes.Outcomes.delivered = on_delivered  # type: ignore[method-assign]
    stop = process.ProcessWorker.stop

    def on_stop(self: Any) -> bool:
        ev.mark("first stop sent")
        return bool(stop(self))

    process.ProcessWorker.stop = on_stop  # type: ignore[method-assign]
    close = process.ProcessWorker.close

    def on_close(self: Any) -> None:
        close(self)
        ev.mark("last worker closed", last=True)

    process.ProcessWorker.close = on_close  # type: ignore[method-assign]


def run_parts(p: dict[str, Any]) -> dict[str, float]:
    """One cold run of ``p["system"]`` on workload ``p["wl"]``; ms of each event since the
    constructor was called, and the untimed import and forkserver start."""
    import _bench_fns as fns
    import _throughput as tp

    n, batch, fb = WORKLOADS[str(p["wl"])]
    items = list(range(n))
    ev = Events()
    out: dict[str, float] = {}
    system = p["system"]
    t = time.perf_counter()
    if system == "procdispatch":
        import procdispatch as pd

        cls = pd.ProcessChannel
    else:
        import multiprocessing.pool  # noqa: F401
        from concurrent.futures import process  # noqa: F401
    out["import (untimed)"] = time.perf_counter() - t
    if p.get("unready"):  # skip the wait for the servers' preload (see _throughput.context)
        tp._READY.update(("multiprocessing", "procdispatch"))
    t = time.perf_counter()
    ctx = tp.context()
    if system == "procdispatch":
        tp.procdispatch_server()
    out["forkserver (untimed)"] = time.perf_counter() - t
    if system == "procdispatch":
        _hook_procdispatch(ev)
        full: Any = pd.InfiniteGrowth() if fb == "infinite" else None
        t0 = time.perf_counter()
        ch = cls(fns.noop_batch, workers=2, batch_items_max=batch, full_behavior=full)
        ev.mark("constructed")
        ch.put_many(items)
        ev.mark("put_many returned")
        ev.mark("close_and_drain called")
        if not ch.close_and_drain(60.0):
            raise TimeoutError("close_and_drain timed out")
        ev.mark("end")
        if ch.stats().items_delivered != n:
            raise RuntimeError("items lost")
    elif system == "pool":
        t0 = time.perf_counter()
        pool = ctx.Pool(2)
        ev.mark("constructed")
        for _ in pool.imap_unordered(fns.noop, items, chunksize=batch):
            ev.mark("first result")
        ev.mark("last result")
        pool.close()
        pool.join()
        ev.mark("end")
    else:
        from concurrent.futures import ProcessPoolExecutor

        t0 = time.perf_counter()
        ex = ProcessPoolExecutor(2, mp_context=ctx)
        ev.mark("constructed")
        if batch == 1:  # P3's PPE row is PPE.submit; map with chunksize 1 is its peer here
            it = ex.map(fns.noop, items, chunksize=1)
        else:
            it = ex.map(fns.noop, items, chunksize=batch)
        ev.mark("map returned")
        for _ in it:
            ev.mark("first result")
        ev.mark("last result")
        ex.shutdown(wait=True)
        ev.mark("end")
    out.update({k: v - t0 for k, v in ev.t.items()})
    return {k: v * 1000 for k, v in out.items()}


# ---- parent side ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument(
        "--unready",
        action="store_true",
        help="start the clock without waiting for the forkservers' preload to end",
    )
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in systems}
    load0 = os.getloadavg()[0]
    for rep in range(args.reps):
        k = rep % len(systems)
        for s in systems[k:] + systems[:k]:
            res, err = run.run_child(
                "cold_parts", {"system": s, "wl": args.workload, "unready": args.unready}, 120.0
            )
            if err:
                print(f"  rep {rep + 1} {s}: {err}", file=sys.stderr)
            for name, v in res.items():
                samples[s].setdefault(name, []).append(v)
            print(
                f"  rep {rep + 1} {s}: end {res.get('end', float('nan')):.1f} ms", file=sys.stderr
            )
    print(f"{args.workload}, {args.reps} reps, load {load0:.1f}->{os.getloadavg()[0]:.1f}")
    for s in systems:
        print(f"\n{s} (ms since the constructor was called; median, min-max)")
        rows = sorted(
            samples[s].items(),
            key=lambda kv: (kv[0].endswith("(untimed)"), statistics.median(kv[1])),
        )
        for name, vs in rows:
            print(f"  {name:<28} {statistics.median(vs):8.1f}   {min(vs):7.1f} - {max(vs):7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
