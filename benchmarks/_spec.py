"""The benchmark workloads as data: systems, metrics, sizes and targets.

A *system* is one way of doing a workload (procdispatch with some options, or an anchor: the
stdlib pools, loky, pebble, the raw pipe). Each system runs once per *mode* per repetition, in a
fresh interpreter, through the child function named by ``func``; that function returns
``{metric: value}``. A *target* compares a procdispatch system's metric with an anchor's (a
ratio of medians of per-repetition ratios) or with an absolute bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "items/s", "tasks/s", "ms", "B/item"
    higher_is_better: bool


@dataclass(frozen=True)
class System:
    key: str
    label: str
    func: str  # a name in run.CHILD_FUNCS
    params: dict[str, Any]
    modes: tuple[str | None, ...] = (None,)  # one child run per mode and repetition
    anchor: bool = False
    # anchors shown as ratios; None = every anchor (none for an anchor)
    compare_to: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Target:
    system: str
    metric: str
    op: str  # ">=" or "<="
    value: float
    anchor: str | None = None  # None: an absolute bound in the metric's unit
    add_median_of: tuple[str, str] | None = None  # (system, metric) added to ``value``
    text: str = ""


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    metrics: tuple[Metric, ...]
    systems: tuple[System, ...]
    targets: tuple[Target, ...] = ()
    timeout: float = 240.0
    notes: tuple[str, ...] = field(default=())

    def metric(self, key: str) -> Metric:
        return next(m for m in self.metrics if m.key == key)

    def system(self, key: str) -> System:
        return next(s for s in self.systems if s.key == key)


AGE = 0.005
_PPE_NAMES = {"ppe-fs": "PPE forkserver", "ppe-spawn": "PPE spawn"}


def workloads(quick: bool, spin_n: int) -> list[Workload]:
    """Every workload, sized for a full run or a quick smoke run."""
    import _spec_throughput as tp

    n1 = 100_000 if quick else 1_000_000
    n3 = 2_000 if quick else 20_000
    n4 = 40 if quick else 200
    n9 = 200_000 if quick else 1_000_000
    n10 = 50 if quick else 200
    startup = (
        Metric("import_ms", "import of the channel / pool module (no target)", "ms", False),
        Metric("cold_ms", "cold: first start in a fresh interpreter", "ms", False),
        Metric("warm_ms", "warm: second start, same interpreter", "ms", False),
        Metric("cold_cycle_ms", "P7' cold: construct -> first ack -> shut down", "ms", False),
        Metric("warm_cycle_ms", "P7' warm: construct -> first ack -> shut down", "ms", False),
    )
    p7 = Workload(
        "P7",
        "start-up: construct -> first call acked; P7': on to the end of the shutdown; 2 workers",
        startup,
        (
            System(
                "pd-fs",
                "procdispatch forkserver",
                "startup",
                {"lib": "procdispatch", "method": "forkserver"},
                compare_to=("ppe-fs",),
            ),
            System(
                "ppe-fs",
                "PPE forkserver",
                "startup",
                {"lib": "ppe", "method": "forkserver"},
                anchor=True,
            ),
            System(
                "pd-spawn",
                "procdispatch spawn",
                "startup",
                {"lib": "procdispatch", "method": "spawn"},
                compare_to=("ppe-spawn",),
            ),
            System(
                "ppe-spawn", "PPE spawn", "startup", {"lib": "ppe", "method": "spawn"}, anchor=True
            ),
        ),
        (
            *(
                Target(s, m, "<=", 1.0, anchor=a)
                for s, a in (("pd-fs", "ppe-fs"), ("pd-spawn", "ppe-spawn"))
                for m in ("cold_ms", "warm_ms")
            ),
            *(
                Target(s, m, "<=", 1.0, anchor=a, text=f"P7': <= 1x {_PPE_NAMES[a]} with block")
                for s, a in (("pd-fs", "ppe-fs"), ("pd-spawn", "ppe-spawn"))
                for m in ("cold_cycle_ms", "warm_cycle_ms")
            ),
        ),
    )
    p8 = Workload(
        "P8",
        "drain of an idle pool (workers up, idle 0.3 s): close_and_drain / shutdown",
        (Metric("ms", "close -> drained", "ms", False),),
        (
            System("pd", "procdispatch close_and_drain", "drain", {"lib": "procdispatch"}),
            System("ppe", "PPE.shutdown(wait=True)", "drain", {"lib": "ppe"}, anchor=True),
            System("pool", "Pool.close+join", "drain", {"lib": "pool"}, anchor=True),
        ),
        (Target("pd", "ms", "<=", 50.0),),
    )
    mem = (
        Metric("bytes_per_item", "held while buffered", "B/item", False),
        Metric("peak_bytes_per_item", "peak during put_many", "B/item", False),
    )
    b9 = {"n": n9}
    p9 = Workload(
        "P9",
        f"parent memory with {n9:,} buffered ints (InfiniteGrowth), beyond the caller's list",
        mem,
        (
            System(
                "pd-tm",
                "procdispatch batches of 1000 (tracemalloc)",
                "memory",
                {**b9, "lib": "procdispatch", "batch": 1000, "how": "tracemalloc"},
            ),
            System(
                "pd-rss",
                "procdispatch batches of 1000 (RSS delta)",
                "memory",
                {**b9, "lib": "procdispatch", "batch": 1000, "how": "rss"},
            ),
            System(
                "pd-tm20",
                "procdispatch batches of 20 (tracemalloc)",
                "memory",
                {**b9, "lib": "procdispatch", "batch": 20, "how": "tracemalloc"},
            ),
            System(
                "list",
                "reference: the list of ints itself",
                "memory",
                {**b9, "lib": "list", "how": "tracemalloc"},
                anchor=True,
            ),
        ),
        tuple(Target(s, "bytes_per_item", "<=", 100.0) for s in ("pd-tm", "pd-rss", "pd-tm20")),
    )
    lat = (
        Metric("median_ms", "median over single submits", "ms", False),
        Metric("p90_ms", "90th percentile", "ms", False),
    )
    p10 = Workload(
        "P10",
        f"latency at low load, submit -> send start, {n10} spaced submits, batch_age_max=5 ms",
        lat,
        (
            System(
                "pd",
                "procdispatch put (batch_age_max=0.005)",
                "latency",
                {"lib": "procdispatch", "count": n10, "age": AGE},
                compare_to=("pipe",),
            ),
            System(
                "pipe",
                "one Pipe round trip (reference)",
                "latency",
                {"lib": "pipe", "count": n10},
                anchor=True,
            ),
            System(
                "ppe",
                "PPE.submit -> call start",
                "latency",
                {"lib": "ppe", "count": n10},
                anchor=True,
            ),
        ),
        (
            Target(
                "pd",
                "median_ms",
                "<=",
                2 * AGE * 1e3,
                add_median_of=("pipe", "median_ms"),
                text="<= 2 x 5 ms + pipe RTT",
            ),
        ),
    )
    return [
        tp.p1(n1),
        tp.p2(n1),
        tp.p3(n3),
        tp.p4(n4, spin_n),
        p7,
        p8,
        p9,
        p10,
        tp.p13(quick),
    ]


ALL_IDS = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10", "P11", "P13")
