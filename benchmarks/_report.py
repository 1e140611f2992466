"""Turn the samples into one table (text), JSON and an optional PNG chart.

Ratios are medians of per-repetition ratios: repetition *r* of a procdispatch system is divided
by repetition *r* of the anchor, which ran right next to it, so drift between repetitions
cancels out. Higher is better for throughput; for times and bytes (lower is better) a ratio
below 1 means procdispatch is ahead.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from _spec import Metric, System, Target, Workload

# samples[system key][metric key] = {repetition: value}
Samples = dict[str, dict[str, dict[int, float]]]


@dataclass
class Row:
    workload: str
    system: str
    label: str
    anchor: bool
    metric: str
    metric_label: str
    unit: str
    values: list[float]
    median: float | None
    lo: float | None
    hi: float | None
    ratios: list[tuple[str, float]] = field(default_factory=list)
    targets: list[tuple[str, bool | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def short(label: str) -> str:
    return label.split("(", maxsplit=1)[0].strip()


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("items/s", "tasks/s"):
        suffix = unit.split("/", maxsplit=1)[0][:-1] + "/s"
        if value >= 1e6:
            return f"{value / 1e6:.2f} M {suffix}"
        if value >= 1e3:
            return f"{value / 1e3:.1f} k {suffix}"
        return f"{value:.1f} {suffix}"
    if unit == "B/s":
        return f"{value / 1e9:.2f} GB/s" if value >= 1e9 else f"{value / 1e6:.0f} MB/s"
    if unit == "calls":
        return f"{value:.0f} calls"
    if unit == "ms":
        return f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"
    return f"{value:.1f} {unit}"


def fmt_ratio(r: float) -> str:
    """2.05x, 0.57x, or 1/180x for a ratio far below 1 (lower-is-better metrics)."""
    return f"1/{1 / r:.0f}x" if 0 < r < 0.1 else f"{r:.2f}x"


def paired_ratio(a: dict[int, float], b: dict[int, float]) -> float | None:
    reps = [r for r in a if r in b and b[r] > 0]
    if not reps:
        return None
    return statistics.median(a[r] / b[r] for r in reps)


def _median(vals: dict[int, float]) -> float | None:
    return statistics.median(vals.values()) if vals else None


def _target_text(t: Target, wl: Workload) -> str:
    if t.text:
        return t.text
    if t.anchor is not None:
        return f"{t.op} {t.value:g}x {short(wl.system(t.anchor).label)}"
    return f"{t.op} {fmt(t.value, wl.metric(t.metric).unit)}"


def _measure(t: Target, samples: Samples) -> tuple[float | None, float | None]:
    """(the target's value: a paired ratio or a median, its bound)."""
    mine = samples.get(t.system, {}).get(t.metric, {})
    if t.anchor is not None:
        return paired_ratio(mine, samples.get(t.anchor, {}).get(t.metric, {})), t.value
    bound: float | None = t.value
    if t.add_median_of is not None:
        extra = _median(samples.get(t.add_median_of[0], {}).get(t.add_median_of[1], {}))
        bound = None if extra is None else t.value + extra
    return _median(mine), bound


def _evaluate(t: Target, wl: Workload, samples: Samples) -> bool | None:
    value, bound = _measure(t, samples)
    if value is None or bound is None:
        return None
    return value >= bound if t.op == ">=" else value <= bound


@dataclass
class Verdict:
    """One target over every mode (metric) it names, judged on the least favourable."""

    workload: str
    system: str
    target: str
    per_mode: list[tuple[str, float | None]]
    decided_by: str | None
    met: bool | None
    is_ratio: bool


def verdicts(wl: Workload, samples: Samples) -> list[Verdict]:
    """Targets that differ only in their metric are one target, judged on its worst metric."""
    groups: dict[tuple[object, ...], list[Target]] = {}
    for t in wl.targets:
        key = (t.system, t.anchor, t.op, t.value, t.add_median_of, _target_text(t, wl))
        groups.setdefault(key, []).append(t)
    out: list[Verdict] = []
    for key, ts in groups.items():
        per_mode: list[tuple[str, float | None]] = []
        worst: tuple[float, str] | None = None  # (margin, metric): margin < 0 is a miss
        missing = False
        for t in ts:
            value, bound = _measure(t, samples)
            per_mode.append((t.metric, value))
            if value is None or bound is None:
                missing = True
                continue
            margin = (value - bound if t.op == ">=" else bound - value) / max(abs(bound), 1e-12)
            if worst is None or margin < worst[0]:
                worst = (margin, t.metric)
        met: bool | None = None
        if worst is not None and worst[0] < 0:
            met = False
        elif worst is not None and not missing:
            met = True
        out.append(
            Verdict(
                wl.id,
                str(key[0]),
                str(key[5]),
                per_mode,
                None if worst is None else worst[1],
                met,
                ts[0].anchor is not None,
            )
        )
    return out


def verdict_table(vs: list[Verdict], labels: dict[tuple[str, str], str]) -> str:
    """The targets, one line each: value in every mode, the deciding mode, met or not."""
    lines = ["targets, each judged on its least favourable mode:"]
    for v in vs:
        modes = ", ".join(
            f"{m} {'-' if x is None else fmt_ratio(x) if v.is_ratio else f'{x:.4g}'}"
            for m, x in v.per_mode
        )
        met = "?" if v.met is None else ("met" if v.met else "MISSED")
        lines.append(
            f"  {v.workload} {labels.get((v.workload, v.system), v.system)}: {v.target} -- "
            f"{modes}; decided by {v.decided_by or '-'}: {met}"
        )
    return "\n".join(lines)


def _anchors_for(s: System, wl: Workload) -> list[System]:
    if s.compare_to is not None:
        return [wl.system(k) for k in s.compare_to]
    if s.anchor:
        return []
    return [a for a in wl.systems if a.anchor]


def rows_for(wl: Workload, samples: Samples, errors: dict[str, list[str]]) -> list[Row]:
    rows: list[Row] = []
    for m in wl.metrics:
        for s in wl.systems:
            vals = samples.get(s.key, {}).get(m.key, {})
            if not vals and not errors.get(s.key):
                continue
            row = _row(wl, s, m, vals, errors.get(s.key, []))
            for a in _anchors_for(s, wl):
                r = paired_ratio(vals, samples.get(a.key, {}).get(m.key, {}))
                if r is not None:
                    row.ratios.append((short(a.label), r))
            for t in wl.targets:
                if t.system == s.key and t.metric == m.key:
                    row.targets.append((_target_text(t, wl), _evaluate(t, wl, samples)))
            rows.append(row)
    return rows


def _row(wl: Workload, s: System, m: Metric, vals: dict[int, float], errs: list[str]) -> Row:
    v = [vals[r] for r in sorted(vals)]
    return Row(
        workload=wl.id,
        system=s.key,
        label=s.label,
        anchor=s.anchor,
        metric=m.key,
        metric_label=m.label,
        unit=m.unit,
        values=v,
        median=statistics.median(v) if v else None,
        lo=min(v) if v else None,
        hi=max(v) if v else None,
        errors=errs,
    )


HEADER = ("workload", "system", "metric", "median", "min-max", "ratio to anchors", "target", "met")


def table(rows: list[Row]) -> str:
    """One plain-text table, columns aligned."""
    cells: list[tuple[str, ...]] = [HEADER]
    last = ""
    for r in rows:
        if r.median is None:
            med, span = "ERROR", (r.errors[0][:60] if r.errors else "no data")
        else:
            med = fmt(r.median, r.unit)
            span = f"{fmt(r.lo, r.unit)} - {fmt(r.hi, r.unit)}"
            if r.errors:
                span += f" ({len(r.errors)} failed)"
        ratios = ", ".join(f"{fmt_ratio(v)} {name}" for name, v in r.ratios)
        if r.anchor:
            ratios = f"(anchor) {ratios}".strip()
        ratios = ratios or "-"
        targets = "; ".join(t for t, _ in r.targets) or "-"
        met = "; ".join("?" if ok is None else ("yes" if ok else "NO") for _, ok in r.targets)
        wl = r.workload if r.workload != last else ""
        last = r.workload
        cells.append((wl, r.label, r.metric, med, span, ratios, targets, met or "-"))
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = []
    for i, c in enumerate(cells):
        if i == 1 or (i > 1 and c[0]):
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
    return "\n".join(lines)


def as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [
        {
            "workload": r.workload,
            "system": r.system,
            "label": r.label,
            "anchor": r.anchor,
            "metric": r.metric,
            "metric_label": r.metric_label,
            "unit": r.unit,
            "values": r.values,
            "median": r.median,
            "min": r.lo,
            "max": r.hi,
            "ratios": {name: v for name, v in r.ratios},
            "targets": [{"target": t, "met": ok} for t, ok in r.targets],
            "errors": r.errors,
        }
        for r in rows
    ]


def plot(rows: list[Row], path: str) -> None:
    """One horizontal bar chart per (workload, metric): medians with min-max whiskers."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "--png needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.median is not None:
            groups.setdefault((r.workload, r.metric), []).append(r)
    if not groups:
        raise SystemExit("--png: nothing to plot")
    cols = 3
    nrows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 2.6 * nrows), squeeze=False)
    for ax, ((wl, metric), rs) in zip(axes.flat, groups.items(), strict=False):
        meds = [r.median or 0.0 for r in rs]
        err = [
            [m - (r.lo or m) for m, r in zip(meds, rs, strict=True)],
            [(r.hi or m) - m for m, r in zip(meds, rs, strict=True)],
        ]
        colors = ["tab:gray" if r.anchor else "tab:blue" for r in rs]
        ax.barh(range(len(rs)), meds, xerr=err, color=colors, capsize=3)
        ax.set_yticks(range(len(rs)), [r.label for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{wl} {metric} ({rs[0].unit})", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle("procdispatch (blue) vs anchors (gray): median, whiskers min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
