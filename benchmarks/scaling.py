"""P12, the scaling charts: procdispatch and ProcessPoolExecutor on the same axes.

    python benchmarks/scaling.py --json scaling.json --svg scaling.svg
    python benchmarks/scaling.py --quick --reps 1          # a smoke run

Two series, each point the median of ``--reps`` measurements, every measurement a fresh
interpreter run by ``run.py``'s runner (with its timeout and clean-up), the two systems
alternating point by point:

* *batch size*: no-op work on ints, 2 workers, batches of 1, 10, 100, 1000 and 10000 items
  (procdispatch's ``batch_items_max`` with ``InfiniteGrowth``; ``PPE.map``'s ``chunksize``);
  items/s in the steady and the cold mode (see ``_throughput``);
* *workers*: 200 CPU-bound calls of ~10 ms (P4's pure-Python loop, calibrated here), one per
  batch (``chunksize=1``), 1 and 2 workers; tasks/s, steady mode.

The chart is an SVG drawn here, with no plotting library: two panels, log-log for the batch
sizes, linear for the workers.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # workers (spawn / forkserver) inherit sys.path: _bench_fns resolves
    sys.path.insert(0, HERE)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import run  # noqa: E402

BATCHES = (1, 10, 100, 1000, 10_000)
#: items per measurement, by batch size: each about 0.2-2 s for the slower system here
ITEMS = {1: 20_000, 10: 100_000, 100: 500_000, 1000: 1_000_000, 10_000: 1_000_000}
WORKERS = (1, 2)
CPU_CALLS = 200
SYSTEMS = ("procdispatch", "PPE.map")


def _params(system: str, extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if system == "procdispatch":
        return "procdispatch", {**extra, "producer": "put_many", "full_behavior": "infinite"}
    return "pool", {**extra, "lib": "ppe", "api": "map"}


def points(quick: bool, spin_n: int) -> list[dict[str, Any]]:
    """Every (series, x, mode) to measure, for both systems."""
    out: list[dict[str, Any]] = []
    for b in BATCHES:
        n = ITEMS[b] // (5 if quick else 1)
        for mode in ("steady", "cold"):
            out.append(
                {"series": "batch", "x": b, "mode": mode, "p": {"workers": 2, "batch": b, "n": n}}
            )
    for w in WORKERS:
        p = {"workers": w, "batch": 1, "n": CPU_CALLS, "work": "spin", "spin_n": spin_n}
        out.append({"series": "workers", "x": w, "mode": "steady", "p": p})
    return out


def measure(pts: list[dict[str, Any]], reps: int, timeout: float) -> list[dict[str, Any]]:
    """Run every point ``reps`` times per system; the systems alternate, the order of the pair
    flips every repetition."""
    rows = [
        {k: pt[k] for k in ("series", "x", "mode")} | {"system": s, "samples": [], "errors": []}
        for pt in pts
        for s in SYSTEMS
    ]
    for rep in range(reps):
        for i, pt in enumerate(pts):
            order = [0, 1] if (rep + i) % 2 == 0 else [1, 0]
            for k in order:
                row = rows[2 * i + k]
                func, params = _params(row["system"], {**pt["p"], "mode": pt["mode"]})
                result, err = run.run_child(func, params, timeout)
                value = result.get(pt["mode"])
                if value is not None:
                    row["samples"].append(float(value))
                if err:
                    row["errors"].append(f"rep {rep + 1}: {err}")
                tag = f"{row['series']}={row['x']} {row['mode']} {row['system']}"
                shown = f"{value:,.0f}/s" if value is not None else err
                print(f"  rep {rep + 1}/{reps} {tag}: {shown}", file=sys.stderr, flush=True)
    for row in rows:
        row["median"] = statistics.median(row["samples"]) if row["samples"] else None
    return rows


# ---- the chart --------------------------------------------------------------------------------

COLOR = {"procdispatch": "#1f6fb4", "PPE.map": "#d9822b"}
DASH = {"steady": "", "cold": "6,4"}
W, H = 360, 260  # one panel's plot area
LEFT, TOP, GAP = 70, 50, 110


def _fmt(v: float) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _text(x: float, y: float, s: str, anchor: str = "middle", size: int = 11) -> str:
    s = s.replace("&", "&amp;").replace("<", "&lt;")
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}">{s}</text>'


def _panel(
    x0: float,
    title: str,
    xlabel: str,
    ylabel: str,
    lines: list[tuple[str, str, list[tuple[float, float]]]],
    xs: list[float],
    log: bool,
) -> list[str]:
    """One panel at horizontal offset ``x0``: axes, grid, one polyline per (system, mode)."""
    ys = [y for _, _, pts in lines for _, y in pts]
    if log:
        lo = 10 ** math.floor(math.log10(min(ys)))
        hi = 10 ** math.ceil(math.log10(max(ys)))
        yticks = [lo * 10**k for k in range(round(math.log10(hi / lo)) + 1)]

        def fy(v: float) -> float:
            return TOP + H - H * math.log10(v / lo) / math.log10(hi / lo)

        def fx(v: float) -> float:
            span = math.log10(xs[-1] / xs[0])
            return x0 + W * math.log10(v / xs[0]) / span
    else:
        step = 10 ** math.floor(math.log10(max(ys)))
        top = step * math.ceil(max(ys) * 1.1 / step)
        yticks = [step * k for k in range(int(top / step) + 1)]

        def fy(v: float) -> float:
            return TOP + H - H * v / top

        def fx(v: float) -> float:
            return x0 + W * (0.15 + 0.7 * (v - xs[0]) / (xs[-1] - xs[0]))

    out = [_text(x0 + W / 2, TOP - 18, title, size=13)]
    out.append(f'<rect x="{x0}" y="{TOP}" width="{W}" height="{H}" fill="none" stroke="#444"/>')
    for t in yticks:
        y = fy(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + W}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(_text(x0 - 6, y + 4, _fmt(t), anchor="end", size=10))
    for v in xs:
        x = fx(v)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + H}" stroke="#eee"/>')
        out.append(_text(x, TOP + H + 16, _fmt(v), size=10))
    out.append(_text(x0 + W / 2, TOP + H + 36, xlabel))
    cx, cy = x0 - 52, TOP + H / 2
    out.append(
        f'<text x="{cx}" y="{cy}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 {cx} {cy})">{ylabel}</text>'
    )
    for system, mode, pts in lines:
        coords = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in pts)
        dash = f' stroke-dasharray="{DASH[mode]}"' if DASH[mode] else ""
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{COLOR[system]}" '
            f'stroke-width="2"{dash}/>'
        )
        for x, y in pts:
            out.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3" fill="{COLOR[system]}"/>')
    return out


def _lines(rows: list[dict[str, Any]], series: str) -> list[tuple[str, str, list[Any]]]:
    keys = dict.fromkeys((r["system"], r["mode"]) for r in rows if r["series"] == series)
    return [
        (
            s,
            m,
            sorted(
                (r["x"], r["median"])
                for r in rows
                if (r["series"], r["system"], r["mode"]) == (series, s, m) and r["median"]
            ),
        )
        for s, m in keys
    ]


def svg(rows: list[dict[str, Any]], caption: str) -> str:
    """Both panels and a legend, as one SVG document."""
    width = LEFT + 2 * W + GAP + 30
    height = TOP + H + 110
    body = _panel(
        LEFT,
        "no-op, 2 workers: throughput by batch size",
        "items per batch (batch_items_max / chunksize)",
        "items/s",
        _lines(rows, "batch"),
        [float(b) for b in BATCHES],
        log=True,
    )
    body += _panel(
        LEFT + W + GAP,
        "~10 ms CPU-bound calls: throughput by workers",
        "worker processes",
        "tasks/s",
        _lines(rows, "workers"),
        [float(w) for w in WORKERS],
        log=False,
    )
    y = TOP + H + 62
    x = LEFT
    for system in SYSTEMS:
        for mode in ("steady", "cold"):
            dash = f' stroke-dasharray="{DASH[mode]}"' if DASH[mode] else ""
            body.append(
                f'<line x1="{x}" y1="{y}" x2="{x + 30}" y2="{y}" stroke="{COLOR[system]}" '
                f'stroke-width="2"{dash}/>'
            )
            body.append(_text(x + 36, y + 4, f"{system} {mode}", anchor="start"))
            x += 190
    body.append(_text(LEFT, y + 28, caption, anchor="start", size=10))
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">'
    )
    return "\n".join(
        [head, f'<rect width="{width}" height="{height}" fill="white"/>', *body, "</svg>", ""]
    )


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| series | x | mode | procdispatch | PPE.map | ratio |", "|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        ratio = f"{a['median'] / b['median']:.2f}x" if a["median"] and b["median"] else "-"
        med = [f"{r['median']:,.0f}/s" if r["median"] else "failed" for r in (a, b)]
        out.append(f"| {a['series']} | {a['x']} | {a['mode']} | {med[0]} | {med[1]} | {ratio} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="measurements per point and system")
    ap.add_argument("--quick", action="store_true", help="a fifth of the items per point")
    ap.add_argument("--json", metavar="PATH", help="write every sample and median as JSON")
    ap.add_argument("--svg", metavar="PATH", help="draw the chart")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    started = time.monotonic()
    load0 = os.getloadavg()[0]
    spin_n = run.calibrate_spin()
    rows = measure(points(args.quick, spin_n), args.reps, args.timeout)
    load1 = os.getloadavg()[0]
    cmd = "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = (
        f"python {platform.python_version()}, {os.cpu_count()} cores, {args.reps} repetitions, "
        f"{time.monotonic() - started:.0f} s, load {load0:.1f}->{load1:.1f}, "
        f"spin({spin_n:,}) ~ 10 ms"
    )
    print(f"$ {cmd.strip()}\n{head}\n{table(rows)}")
    for r in rows:
        for e in r["errors"]:
            print(f"warning: {r['series']}={r['x']} {r['mode']} {r['system']}: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd.strip(), "info": head, "rows": rows}, f, indent=1)
    if args.svg:
        caption = f"medians of {args.reps}; {head}"
        with open(args.svg, "w") as f:
            f.write(svg(rows, caption))
    return 0


if __name__ == "__main__":
    sys.exit(main())
