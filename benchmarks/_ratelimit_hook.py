"""P5/P6 (rate limiter) come from ``bench_ratelimit.py``, a suite of its own; fold them in.

That script exposes no function that returns its results, so it runs as a subprocess
(``bench_ratelimit.py --json PATH``, plus ``--quick`` when this run is quick) under a timeout,
and the ``rows`` of its JSON join the table: each row an object with ``workload`` (its id first,
e.g. ``"P5 limiter acquire, uncontended"``), ``system``, ``label``, ``anchor``, ``metric``,
``unit``, ``values``, ``median``, ``min``, ``max``, ``ratios`` (anchor -> ours / theirs),
``target`` and ``met``. A failure, or JSON without such rows, becomes a note under the table
instead of failing the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

from _report import Row

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "bench_ratelimit.py")
TIMEOUT = 600.0


def run(ids: list[str], args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    if not ids:
        return [], []
    if not os.path.exists(SCRIPT):
        return [], [f"{'/'.join(ids)}: benchmarks/bench_ratelimit.py is not there yet; not run."]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ratelimit.json")
        cmd = [sys.executable, SCRIPT, "--json", out] + (["--quick"] if args.quick else [])
        print(
            f"{'/'.join(ids)}: bench_ratelimit.py {' '.join(cmd[2:])}", file=sys.stderr, flush=True
        )
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            return [], [f"P5/P6: bench_ratelimit.py timed out after {TIMEOUT:.0f} s"]
        except BaseException:
            _kill_group(proc.pid)
            raise
        _kill_group(proc.pid)  # whatever it left running
        if proc.returncode != 0 or not os.path.exists(out):
            tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
            return [], [f"P5/P6: bench_ratelimit.py failed (exit {proc.returncode}): {tail}"]
        try:
            with open(out) as f:
                doc = json.load(f)
            rows = _name_metrics([_row(r) for r in _rows_of(doc)])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            text = stdout.decode(errors="replace").strip()
            return [], [f"P5/P6: could not read bench_ratelimit.py's JSON ({exc}); it said:", text]
    return [r for r in rows if r.workload.upper().startswith(tuple(ids))] or rows, []


def _name_metrics(rows: list[tuple[Row, str]]) -> list[Row]:
    """Keep only what tells rows of one workload apart in the metric column.

    The script's workload text is e.g. "P5 limiter acquire, uncontended" and "P5 limiter
    acquire, 4 procs": the id goes to the workload column, "uncontended" / "4 procs" to the
    metric, and what all rows of the workload share is left out.
    """
    by_wl: dict[str, set[str]] = {}
    for r, what in rows:
        by_wl.setdefault(r.workload, set()).add(what)
    for r, what in rows:
        whats = sorted(by_wl[r.workload])
        if len(whats) < 2:
            continue
        parts = [w.split(", ") for w in whats]
        shared = 0
        while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
            shared += 1
        r.metric = f"{r.metric}, {', '.join(what.split(', ')[shared:])}"
    return [r for r, _ in rows]


def _kill_group(pgid: int) -> None:
    """Kill the script and every process it started (it runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _rows_of(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, dict):
        doc = doc.get("rows", doc.get("results"))
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise TypeError("expected a list of row objects")
    return doc


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _row(r: dict[str, Any]) -> tuple[Row, str]:
    """The row, and its workload's description (the workload text after the id)."""
    median = _num(r.get("median", r.get("value")))
    ratios = r.get("ratios", {})
    if not isinstance(ratios, dict):
        ratios = {}
    if not ratios and _num(r.get("ratio")) is not None:
        ratios = {str(r.get("anchor", "anchor")): r["ratio"]}
    met = r.get("met")
    target = r.get("target")
    wl, _, what = str(r.get("workload", r.get("id", "P5/P6"))).partition(" ")
    row = Row(
        workload=wl,
        system=str(r.get("system", r.get("name", ""))),
        label=str(r.get("label", r.get("system", r.get("name", "?")))),
        anchor=bool(r.get("anchor", False)),
        metric=str(r.get("metric", "")),
        metric_label=str(r.get("metric_label", r.get("metric", ""))),
        unit=str(r.get("unit", "")),
        values=[v for v in map(_num, r.get("values", [])) if v is not None],
        median=median,
        lo=_num(r.get("min", median)),
        hi=_num(r.get("max", median)),
        ratios=[(str(k), float(v)) for k, v in ratios.items() if _num(v) is not None],
        targets=[(str(target), met if isinstance(met, bool) else None)] if target else [],
        errors=[str(e) for e in r.get("errors", [])] if isinstance(r.get("errors"), list) else [],
    )
    return row, what
