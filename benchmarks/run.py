"""procdispatch's benchmark suite: every workload, side by side, one table.

    python benchmarks/run.py                      # everything, 5 repetitions (5-9 minutes)
    python benchmarks/run.py --quick              # smaller sizes: a smoke run
    python benchmarks/run.py --only P1,P3 --reps 7 --json out.json --png out.png

Each measurement runs in a fresh interpreter (``run.py --child ...``) with a timeout; the whole
process group of that interpreter is killed if it overruns or leaves processes behind. Within a
workload the systems alternate, one run each per repetition (the order rotates every repetition),
so every ratio compares runs made seconds apart. See README.md in this folder.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # workers (spawn / forkserver) inherit sys.path: _bench_fns resolves
    sys.path.insert(0, HERE)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import _ratelimit_hook  # noqa: E402
import _report  # noqa: E402
from _spec import ALL_IDS, Workload, workloads  # noqa: E402

#: child function names -> "module:function" (imported only in the child)
CHILD_FUNCS = {
    "procdispatch": "_throughput:run_procdispatch",
    "pool": "_throughput:run_pool",
    "raw": "_throughput:run_raw",
    "memcpy": "_payload:run_memcpy",
    "pipe_bw": "_payload:run_pipe_bw",
    "startup": "_latency:run_startup",
    "drain": "_latency:run_drain",
    "memory": "_latency:run_memory",
    "latency": "_latency:run_latency",
    "cold_parts": "cold_parts:run_parts",
}
SPIN_TARGET = 0.010  # seconds of pure-Python work per P4 call


def calibrate_spin() -> int:
    """Loop turns of ``_bench_fns.spin`` that take about 10 ms here.

    The fastest of 5 runs sets the rate: on a shared machine, slower runs measure the neighbours.
    """
    import _bench_fns

    n = 20_000
    while True:
        t0 = time.perf_counter()
        _bench_fns.spin(n)
        dt = time.perf_counter() - t0
        if dt > 0.02:
            break
        n *= 2
    n = int(n * SPIN_TARGET / dt)
    for _ in range(3):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            _bench_fns.spin(n)
            times.append(time.perf_counter() - t0)
        n = int(n * SPIN_TARGET / min(times))
    return n


# ---- running one measurement in a child interpreter -----------------------------------------


def _group_members(pgid: int) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if (
                proc.pid != os.getpid()
                and os.getpgid(proc.pid) == pgid
                and proc.status() != psutil.STATUS_ZOMBIE  # dead; orphans wait for init
            ):
                pids.append(proc.pid)
    return pids


def _reap_group(pgid: int, grace: float = 3.0) -> int:
    """Wait up to ``grace`` s for the child's process group to empty, then kill what is left."""
    deadline = time.monotonic() + grace
    left = _group_members(pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _group_members(pgid)
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    return len(left)


def run_child(func: str, params: dict[str, Any], timeout: float) -> tuple[dict[str, float], str]:
    """Run one measurement; return (metrics, "") or ({}, error text). Never hangs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", func, "--out", out]
        cmd += ["--params", json.dumps({**params, "budget": max(5.0, timeout - 10.0)})]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {}, f"timed out after {timeout:.0f} s"
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        left = _reap_group(proc.pid)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return {}, f"exit {proc.returncode}: {tail[0]}"
        with open(out) as f:
            result: dict[str, float] = json.load(f)
        if left:
            return result, f"left {left} process(es) behind (killed)"
        return result, ""


def child_main(func: str, params_json: str, out: str) -> None:
    module, name = CHILD_FUNCS[func].split(":")
    fn = getattr(importlib.import_module(module), name)
    result = fn(json.loads(params_json))
    with open(out, "w") as f:
        json.dump(result, f)


# ---- the runner -----------------------------------------------------------------------------


def run_workload(
    wl: Workload, reps: int, timeout: float
) -> tuple[_report.Samples, dict[str, list[str]]]:
    runs = [(s, mode) for s in wl.systems for mode in s.modes]
    samples: _report.Samples = {}
    errors: dict[str, list[str]] = {}
    for rep in range(reps):
        k = rep % len(runs)
        for s, mode in runs[k:] + runs[:k]:
            params = {**s.params, "mode": mode}
            t0 = time.monotonic()
            result, err = run_child(s.func, params, timeout)
            took = time.monotonic() - t0
            shown = ", ".join(f"{m}={_report.fmt(v, wl.metric(m).unit)}" for m, v in result.items())
            tag = f"{wl.id} rep {rep + 1}/{reps} {s.label}" + (f" [{mode}]" if mode else "")
            print(f"  {tag}: {shown or err} ({took:.1f} s)", file=sys.stderr, flush=True)
            for metric, value in result.items():
                samples.setdefault(s.key, {}).setdefault(metric, {})[rep] = float(value)
            if err:
                errors.setdefault(s.key, []).append(f"rep {rep + 1}: {err}")
    return samples, errors


def run_p11(args: argparse.Namespace) -> list[str]:
    """P11 (the Dask backend against client.map) runs as bench_dask.py when the dask extra is
    installed; its summary lines become notes under the table."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return ["P11: not run (the dask extra is not installed: pip install -e '.[dask]')"]
    # The one-task-per-item reference is timed on 10,000 items and scaled (it is no anchor of
    # the target, and at 100,000 items it alone took most of a full run's time).
    cmd = [sys.executable, os.path.join(HERE, "bench_dask.py")] + (
        ["--quick"] if args.quick else ["--per-item", "10000"]
    )
    print("P11: bench_dask.py " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired:
        return ["P11: bench_dask.py timed out after 1800 s"]
    if proc.returncode != 0:
        return [f"P11: bench_dask.py failed (exit {proc.returncode}): {proc.stderr[-300:]}"]
    return [line for line in proc.stdout.splitlines() if line.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per system (>= 1; default 5)")
    ap.add_argument("--only", default="", help="comma-separated workload ids, e.g. P1,P3")
    ap.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--png", metavar="PATH", help="draw the results (needs matplotlib)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    only = [x.strip().upper() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in ALL_IDS]
    if bad:
        ap.error(f"--only: unknown workload(s) {', '.join(bad)} (known: {', '.join(ALL_IDS)})")
    args.only = only or list(ALL_IDS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.params, args.out)
        return 0
    if args.png:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--png needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
            return 2
    started = time.monotonic()
    spin_n = calibrate_spin() if "P4" in args.only else 0
    chosen = [wl for wl in workloads(args.quick, spin_n) if wl.id in args.only]
    rows: list[_report.Row] = []
    verdicts: list[_report.Verdict] = []
    labels: dict[tuple[str, str], str] = {}
    loads: list[str] = []
    for wl in chosen:
        print(f"{wl.id}: {wl.title}", file=sys.stderr, flush=True)
        timeout = args.timeout or (wl.timeout / (2 if args.quick else 1))
        before = os.getloadavg()[0]
        samples, errors = run_workload(wl, args.reps, timeout)
        loads.append(f"{wl.id} {before:.1f}->{os.getloadavg()[0]:.1f}")
        rows += _report.rows_for(wl, samples, errors)
        verdicts += _report.verdicts(wl, samples)
        labels.update({(wl.id, s.key): s.label for s in wl.systems})
    extra_rows, notes = _ratelimit_hook.run([x for x in args.only if x in ("P5", "P6")], args)
    rows += extra_rows
    if "P11" in args.only:
        notes += run_p11(args)
    elapsed = time.monotonic() - started
    cmd = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print()
    print(f"$ {cmd.strip()}")
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, {args.reps} repetitions, "
        f"{'quick' if args.quick else 'full'} sizes, {elapsed:.0f} s"
    )
    print("1-min load average before->after each workload: " + ", ".join(loads))
    if spin_n:
        print(f"P4: one call = spin({spin_n:,}) ~ {SPIN_TARGET * 1e3:.0f} ms")
    print(_report.table(rows))
    if verdicts:
        print()
        print(_report.verdict_table(verdicts, labels))
    for note in notes:
        print(note)
    problems = [f"{r.workload} {r.label}: {e}" for r in rows for e in r.errors]
    for p in dict.fromkeys(problems):
        print(f"warning: {p}")
    if args.json:
        doc = {
            "command": cmd.strip(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "reps": args.reps,
            "quick": args.quick,
            "spin_n": spin_n,
            "elapsed_s": elapsed,
            "rows": _report.as_json(rows),
            "verdicts": [
                {
                    "workload": v.workload,
                    "system": v.system,
                    "target": v.target,
                    "per_mode": dict(v.per_mode),
                    "decided_by": v.decided_by,
                    "met": v.met,
                }
                for v in verdicts
            ],
            "notes": notes,
            "load_average": loads,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.png:
        _report.plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
