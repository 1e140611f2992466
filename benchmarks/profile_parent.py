"""cProfile of procdispatch's parent process for P1 (put_many) / P2 (put) / P3 (single items).

    python benchmarks/profile_parent.py P1 --top 10

Profiles both threads that do the parent's work, separately: the producer (main) thread, from
constructing the channel to ``close_and_drain`` returning, and the coordinator thread (its
``threading.Thread.run`` is wrapped here, at run time, for threads named ``procdispatch*``;
the library is not changed). Prints the
top functions by cumulative time for each, then the wall time and throughput of the run (which
cProfile slows down: read the shares, not the absolute numbers).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import _bench_fns as fns  # noqa: E402

SIZES = {
    "P1": (1_000_000, 1000, "put_many"),
    "P2": (200_000, 1000, "put"),
    "P3": (20_000, 1, "put_many"),
}


def top(prof: cProfile.Profile, n: int, title: str) -> str:
    st = pstats.Stats(prof)
    st.sort_stats("cumulative")
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    lines = [title, f"  {'cum s':>7} {'own s':>7} {'calls':>9}  function"]
    shown = 0
    for key in st.fcn_list:  # type: ignore[attr-defined]
        _cc, ncalls, tt, ct, _callers = raw[key]
        file, line, name = key
        if name in ("<module>",) or "cProfile" in file or name == "_profiled_run":
            continue
        where = f"{os.path.basename(file)}:{line}" if line else "builtin"
        lines.append(f"  {ct:7.3f} {tt:7.3f} {ncalls:9d}  {name} ({where})")
        shown += 1
        if shown >= n:
            break
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workload", choices=sorted(SIZES))
    ap.add_argument("--n", type=int, default=None, help="items (default: the workload's size)")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    n, batch, producer = SIZES[args.workload]
    n = args.n or n

    import procdispatch as pd

    thread_profs: dict[str, cProfile.Profile] = {}
    original = threading.Thread.run

    def _profiled_run(self: threading.Thread) -> None:
        if not self.name.startswith("procdispatch"):
            original(self)
            return
        prof = thread_profs.setdefault(self.name, cProfile.Profile())
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    from _throughput import context

    context()
    items = list(range(n))
    main_prof = cProfile.Profile()
    t0 = time.perf_counter()
    main_prof.enable()
    ch = pd.ProcessChannel(
        fns.noop_batch, workers=2, batch_items_max=batch, full_behavior=pd.InfiniteGrowth()
    )
    if producer == "put":
        for x in items:
            ch.put(x)
    else:
        ch.put_many(items)
    ch.close_and_drain()
    main_prof.disable()
    dt = time.perf_counter() - t0
    print(top(main_prof, args.top, f"{args.workload}: producer (main) thread, by cumulative time"))
    for name, prof in thread_profs.items():
        print(top(prof, args.top, f"{args.workload}: thread {name}, by cumulative time"))
    print(
        f"{n:,} items, batches of {batch}, {producer}: {dt:.2f} s under cProfile, {n / dt:,.0f}/s"
    )
    print(ch.stats())


if __name__ == "__main__":
    main()
