"""ProcessChannel options: declared once, validated in one place.

:class:`Options` is the one declaration: every option with its default and a doc per field.
ProcessChannel's constructor repeats it as an explicit signature, for IDEs and type checkers,
and a test holds the two equal (names, defaults, order). :meth:`Options.resolve` validates and
fills in what is derived, giving the :class:`ChannelOptions` the coordinator runs on;
:func:`options_table` renders the options table of the docs from the same fields.

Messages follow one shape -- "*option* must be *rule* (got *value*)" -- and every failure is an
:class:`~procdispatch.errors.OptionsError` raised before any thread or process exists.
"""

from __future__ import annotations

import math
import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ._fullbehavior import check_int_limit
from .backends import Backend, make_backend
from .backends._usercode import lazy_kind

if TYPE_CHECKING:
    from ._limiter.gcra import ParsedRate
    from ._limiter.limiter import RateLimiter
    from ._limiter.remote import RemoteLimit
from .buffer import BlockNewItems, BufferOptions, FullBehavior
from .errors import OptionsError

__all__ = [
    "DEPTH",
    "QUICK_SEND",
    "ChannelOptions",
    "Options",
    "check_body_runs",
    "default_start_method",
    "options_table",
]

#: With ``max_leases`` left out, a worker holds batches waiting in its pipe behind the one it
#: runs only while its sends are quick: as many as its last send's time fits into QUICK_SEND
#: seconds (none once a send took that long), up to DEPTH - 1. A queued batch starts without
#: a round trip through the coordinator (tens of microseconds, most of the cost of a quick
#: send), and a worker that finds its next batch waiting needs no wake-up; a slower send loses
#: at most about 1 % to that round trip, and a batch queued behind it would wait for it while
#: another worker may be idle.
QUICK_SEND = 0.005
#: The most batches a worker holds when ``max_leases`` is left out (it is DEPTH * workers).
DEPTH = 8


def default_start_method() -> str:
    """The platform's safe default: forkserver where it exists (Linux), else spawn.

    ``fork`` is never the default: the parent runs a coordinator thread (and often producer
    threads), and forking a process that runs threads can deadlock the child.
    """
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "forkserver" in methods:
        return "forkserver"
    return "spawn"


def _number(name: str, value: object, *, minimum: float, strict: bool, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    rule = f"a number {'>' if strict else '>='} {minimum:g}"
    if allow_none:
        rule += " or None"
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        assert isinstance(value, (int, float))
        ok = not math.isnan(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise OptionsError(f"{name} must be {rule} (got {value!r})")


def _int(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        rule = "an int >= 1" + (" or None" if allow_none else "")
        raise OptionsError(f"{name} must be {rule} (got {value!r})")


def _callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise OptionsError(f"{name} must be callable or None (got {value!r})")


#: What a call of each kind of function (see ``lazy_kind``) makes instead of running its body.
_BUILDS = {
    "a generator function": "a generator",
    "an async generator function": "an async generator",
    "a coroutine function": "a coroutine",
}


def check_body_runs(name: str, value: object, *, in_worker: bool) -> None:
    """Refuse a callable whose call would only build a generator (or, in the parent, where
    nothing awaits, a coroutine): its body would never run, and nothing would say so. Workers
    await coroutines (``send_fn``, ``worker_init``); the parent calls its callbacks as plain
    functions."""
    kind = lazy_kind(value) if value is not None else None
    if kind is None or (in_worker and kind == "a coroutine function"):
        return
    made = f"calling it only makes {_BUILDS[kind]}"
    if in_worker:
        outcome = _NEVER_RUN.get(name, "")
        raise OptionsError(
            f"{name} must not be {kind} (got {value!r}): {made}, which a worker does not "
            f"iterate, so its body would never run{outcome}; make it a plain function, or an "
            "async def (a worker awaits its coroutine)"
        )
    raise OptionsError(
        f"{name} must not be {kind} (got {value!r}): {made}, and the parent calls {name} as a "
        "plain function (it neither iterates nor awaits what that returns), so its body would "
        "never run; make it a plain function"
    )


#: What a worker-side callable whose body never runs would silently lead to.
_NEVER_RUN = {
    "send_fn": " and every batch would count as delivered",
    "worker_init": " and workers would start without it",
}


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionsError(f"{name} must be a bool (got {value!r})")


def _doc(doc: str, shown: str | None = None) -> dict[str, str | None]:
    """A field's metadata in :class:`Options`: what it means, and how the docs show its
    default (its repr when not given)."""
    return {"doc": doc, "shown": shown}


@dataclass(frozen=True)
class Options:
    """Every option of :class:`~procdispatch.ProcessChannel`, in the constructor's order, with
    its default and what it means: the one place options are declared.

    The constructor repeats these as an explicit signature (for IDEs and type checkers), and a
    test holds the two equal; :meth:`resolve` validates them; :func:`options_table` renders the
    docs' table from the same fields.
    """

    workers: int | None = field(
        default=None,
        metadata=_doc(
            "worker processes (>= 1); with a Dask cluster, worker threads",
            shown="`os.cpu_count()` (a given Dask cluster: its threads)",
        ),
    )
    max_leases: int | None = field(
        default=None,
        metadata=_doc(
            "batches in flight at once (>= 1); above `workers`, each worker holds up to "
            "`ceil(max_leases / workers)` batches, one running and the rest waiting in its "
            "pipe. Left out, a worker holds more than one only while its sends are quick: as many "
            f"as its last send's time fits into {QUICK_SEND * 1000:g} ms, up to {DEPTH}",
            shown=(
                f"`{DEPTH} * workers` (`workers` with `fifo=True`, or the Dask backend and "
                "`qps_limit`)"
            ),
        ),
    )
    batch_items_max: int | None = field(
        default=20, metadata=_doc("items per batch (`None`: no count limit)")
    )
    batch_size_max: int | None = field(
        default=None, metadata=_doc("total `item_size` per batch; needs `item_size`")
    )
    batch_age_max: float = field(
        default=10.0, metadata=_doc("seconds before a partly filled batch is cut (> 0)")
    )
    item_size: Callable[[Any], int] | None = field(
        default=None, metadata=_doc("size of one item (an int >= 0), called once in `put`")
    )
    full_behavior: FullBehavior | None = field(
        default=None,
        metadata=_doc(
            "`BlockNewItems`, `DropOldestBatch` or `InfiniteGrowth`; limits left out are derived: "
            "`max(1000, 2 * max_leases * batch_items_max)` items, with `max_leases` counted as "
            "`workers` when left out (no item limit when "
            "`batch_items_max` is `None` and a size limit remains), `5 * batch_size_max` size",
            shown="`BlockNewItems()`",
        ),
    )
    retry: Callable[[], Iterator[float]] | None = field(
        default=None,
        metadata=_doc(
            "factory of per-batch iterators of retry delays in seconds; exhaustion drops the batch",
            shown="`retry.exponential()`",
        ),
    )
    fifo: bool = field(default=False, metadata=_doc("strict batch order; needs `max_leases == 1`"))
    qps_limit: float | Any | Sequence[Any] | None = field(
        default=None,
        metadata=_doc(
            "cap on `send_fn` calls per second across the channel's workers: a float, "
            "pyrate-limiter `Rate`(s), a `RateLimiter` shared with other channels or processes, "
            "or a pyrate-limiter `Limiter` (e.g. Redis-backed, shared by many hosts)",
        ),
    )
    qps_burst: int = field(
        default=1,
        metadata=_doc(
            "sends that may go at once under a float `qps_limit` (with a `Limiter`, its rates "
            "decide: leave it at 1)"
        ),
    )
    min_qps: float | None = field(
        default=None,
        metadata=_doc(
            "keep-alive: a synthetic one-item batch when idle this often (<= `qps_limit`)"
        ),
    )
    on_error: Callable[[Any, BaseException], bool] | None = field(
        default=None,
        metadata=_doc(
            "parent side, `(batch, exc) -> retry?`; the default retries transient errors",
            shown="`default_on_error`",
        ),
    )
    on_drop: Callable[[Any, bool], None] | None = field(
        default=None,
        metadata=_doc(
            "parent side, `(batch, False)` per dropped batch, `(None, True)` once at the end",
            shown="`default_on_drop`",
        ),
    )
    on_delivered: Callable[[Any], object] | None = field(
        default=None,
        metadata=_doc(
            "parent side, `(batch)` once per delivered batch, with the items delivered (after a "
            "send that removed some and raised: only those)",
        ),
    )
    on_drained: Callable[[], None] | None = field(
        default=None, metadata=_doc("parent side, once, at the very end")
    )
    worker_init: Callable[[], object] | None = field(
        default=None, metadata=_doc("runs once in each worker before its first batch")
    )
    send_timeout: float | None = field(
        default=None,
        metadata=_doc(
            "a send running longer is killed with its worker (a thread worker is abandoned); the "
            "batch fails with `SendTimeout`",
        ),
    )
    cancel_grace: float = field(
        default=5.0, metadata=_doc("seconds in-flight sends get after `cancel()`")
    )
    start_timeout: float = field(
        default=60.0,
        metadata=_doc(
            "seconds a worker may take to start, `worker_init` included; one not ready by then is "
            "killed (a thread worker abandoned) and counts as a failed start. Worker processes "
            "start a few at a time (about one per core); each one's clock starts when its own "
            "start begins, not while it waits for its turn",
        ),
    )
    delivery_timeout: float | None = field(
        default=None,
        metadata=_doc(
            "seconds from a batch's first lease after which a batch waiting for a retry is dropped "
            "with `DeliveryTimeout`; a send under way is not killed: its result decides",
        ),
    )
    raise_on_drop: bool = field(
        default=False,
        metadata=_doc(
            "`close_and_drain()` and a normal exit of the `with` block raise `ItemsDropped` after "
            "the drain if anything was dropped",
        ),
    )
    max_batches_per_worker: int | None = field(
        default=None,
        metadata=_doc(
            "a worker is handed at most this many batches, and replaced once it answered them",
        ),
    )
    max_worker_memory: int | None = field(
        default=None,
        metadata=_doc(
            "a worker whose RSS is above this many bytes (read after each batch) gets no more "
            "batches, and is replaced once it answered what it holds",
        ),
    )
    start_method: str | None = field(
        default=None,
        metadata=_doc(
            '`"spawn"`, `"forkserver"` or `"fork"`',
            shown="forkserver on Linux, else spawn",
        ),
    )
    backend: str | Backend = field(
        default="process",
        metadata=_doc(
            'where `send_fn` runs: `"process"`; `"thread"` (in-process, unpickled, for '
            "debugging); another registered name; or a `Backend` object",
            shown='`"process"`',
        ),
    )
    progress: bool | Callable[[Any], object] | Any = field(
        default=False,
        metadata=_doc(
            "`True`: a tqdm bar on stderr (delivered / total, rate; dropped, in flight and "
            "retried after it), or a status line every 5 s when stderr is not a terminal, and a "
            "final one; a tqdm bar of yours to update and close; or a callable given a `Stats` "
            "up to 10 times a second and once at the end. Needs `procdispatch[progress]` for a "
            "bar. The reports run on a thread of their own: one that raises (whatever it "
            "raises) is logged once at WARNING and the reports go on; the end of the channel "
            "waits at most 1 s for the final report (still busy then: a WARNING, and the final "
            "report comes when it returns)",
        ),
    )
    progress_total: int | None = field(
        default=None,
        metadata=_doc(
            "the bar's total; `None`: the summed lengths of the sized iterables given to "
            "`put_many`",
        ),
    )

    def resolve(self) -> ChannelOptions:
        """Validate every option and fill in what is derived; raise OptionsError naming the
        option, the rule and the value given."""
        if self.workers is not None:
            _int("workers", self.workers, allow_none=False)
        backend = make_backend(self.backend)
        try:
            return self._resolve(backend)
        except BaseException:
            backend.close()  # it may hold what default_workers() connected to
            raise

    def _resolve(self, backend: Backend) -> ChannelOptions:
        workers = self.workers if self.workers is not None else backend.default_workers()
        _int("workers", workers, allow_none=False)
        _int("max_leases", self.max_leases, allow_none=True)
        leases = self.max_leases
        if leases is None:
            queued = (
                self.fifo is not True
                and backend.queues_leases
                and (self.qps_limit is None or backend.paces_queued_leases)
            )
            leases = DEPTH * workers if queued else workers
        full_behavior = self.full_behavior if self.full_behavior is not None else BlockNewItems()
        if isinstance(full_behavior, FullBehavior):
            check_int_limit("batch_items_max", self.batch_items_max)  # before they are used
            check_int_limit("batch_size_max", self.batch_size_max)
            # A channel's derived item limit holds every lease full plus as much queued; the
            # pure buffer's smaller default would keep workers idle. Left out, max_leases
            # counts as workers here: the deeper default holds more than one batch per worker
            # only while sends are quick, when a refill a worker deep keeps up, and deriving
            # from it would make the buffer DEPTH times larger.
            held = self.max_leases if self.max_leases is not None else workers
            full_behavior = full_behavior.resolve(
                self.batch_items_max, self.batch_size_max, leases=held
            )
        buf = BufferOptions(
            max_leases=leases,
            batch_items_max=self.batch_items_max,
            batch_size_max=self.batch_size_max,
            batch_age_max=self.batch_age_max,
            full_behavior=full_behavior,
            retry=self.retry,
            fifo=self.fifo,
        ).validated()
        _callable("item_size", self.item_size)
        check_body_runs("item_size", self.item_size, in_worker=False)
        if self.batch_size_max is not None and self.item_size is None:
            raise OptionsError(
                f"batch_size_max needs item_size to measure items (got batch_size_max="
                f"{self.batch_size_max!r}, item_size=None)"
            )
        qps = _qps(self.qps_limit, self.qps_burst)
        min_qps = self.min_qps
        _number("min_qps", min_qps, minimum=0, strict=True, allow_none=True)
        if min_qps is not None:
            if math.isinf(min_qps):
                raise OptionsError(f"min_qps must be finite (got {min_qps!r})")
            cap = None if qps is None else _per_second(qps)  # None: not known
            if cap is not None and min_qps > cap:
                raise OptionsError(
                    f"min_qps must be <= qps_limit ({cap:g} per second) (got {min_qps!r})"
                )
        for name in ("on_error", "on_drop", "on_delivered", "on_drained", "worker_init"):
            _callable(name, getattr(self, name))
            check_body_runs(name, getattr(self, name), in_worker=name == "worker_init")
        _number("send_timeout", self.send_timeout, minimum=0, strict=True, allow_none=True)
        _number("cancel_grace", self.cancel_grace, minimum=0, strict=False, allow_none=False)
        _number("start_timeout", self.start_timeout, minimum=0, strict=True, allow_none=False)
        _number("delivery_timeout", self.delivery_timeout, minimum=0, strict=True, allow_none=True)
        _bool("raise_on_drop", self.raise_on_drop)
        _int("max_batches_per_worker", self.max_batches_per_worker, allow_none=True)
        _int("max_worker_memory", self.max_worker_memory, allow_none=True)
        from ._progress import check_progress

        check_progress(self.progress, self.progress_total)
        if not isinstance(self.progress, bool):
            check_body_runs("progress", self.progress, in_worker=False)
        methods = multiprocessing.get_all_start_methods()
        if self.start_method is not None and self.start_method not in methods:
            raise OptionsError(
                f"start_method must be one of {', '.join(methods)} or None "
                f"(got {self.start_method!r})"
            )
        return ChannelOptions(
            workers=workers,
            max_leases=leases,
            adaptive_depth=self.max_leases is None,
            buffer=buf,
            item_size=self.item_size,
            qps=qps,
            min_qps=_float_or_none(min_qps),
            on_error=self.on_error,
            on_drop=self.on_drop,
            on_delivered=self.on_delivered,
            on_drained=self.on_drained,
            worker_init=self.worker_init,
            send_timeout=_float_or_none(self.send_timeout),
            cancel_grace=float(self.cancel_grace),
            start_timeout=float(self.start_timeout),
            delivery_timeout=_float_or_none(self.delivery_timeout),
            raise_on_drop=self.raise_on_drop,
            max_batches_per_worker=self.max_batches_per_worker,
            max_worker_memory=self.max_worker_memory,
            start_method=self.start_method or default_start_method(),
            backend=backend,
            progress=self.progress,
            progress_total=self.progress_total,
        )


def _float_or_none(value: float | None) -> float | None:
    return float(value) if value is not None else None


def options_table() -> str:
    """The options as a Markdown table (option, default, meaning), from :class:`Options`."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in fields(Options):
        shown = f.metadata["shown"] or f"`{f.default!r}`"
        rows.append(f"| `{f.name}` | {shown} | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class ChannelOptions:
    """The validated options of one channel, with what is derived filled in
    (:meth:`Options.resolve` makes it)."""

    workers: int
    max_leases: int
    #: ``max_leases`` was left out: a worker is handed more than one batch only while its
    #: sends are quick (see :data:`QUICK_SEND`).
    adaptive_depth: bool
    buffer: BufferOptions
    item_size: Callable[[Any], int] | None
    #: ``qps_limit`` normalised once: the user's RateLimiter, the parsed rate of a number or
    #: Rate(s) (with ``qps_burst``), the user's pyrate-limiter Limiter, or None.
    qps: RateLimiter | ParsedRate | RemoteLimit | None
    min_qps: float | None
    on_error: Callable[[Any, BaseException], bool] | None
    on_drop: Callable[[Any, bool], None] | None
    on_delivered: Callable[[Any], object] | None
    on_drained: Callable[[], None] | None
    worker_init: Callable[[], object] | None
    send_timeout: float | None
    cancel_grace: float
    start_timeout: float
    delivery_timeout: float | None
    raise_on_drop: bool
    max_batches_per_worker: int | None
    max_worker_memory: int | None
    start_method: str
    backend: Backend
    #: False, True, the user's tqdm bar, or a callable taking Stats (see :mod:`._progress`).
    progress: Any = False
    progress_total: int | None = None


def _qps(qps_limit: object, qps_burst: object) -> RateLimiter | ParsedRate | RemoteLimit | None:
    """``qps_limit`` normalised once; OptionsError names the options as the user spelled them."""
    if qps_limit is None:
        _int("qps_burst", qps_burst, allow_none=False)
        return None
    from ._limiter.limiter import RateLimiter  # only with a limit: it is not needed otherwise

    if isinstance(qps_limit, RateLimiter):
        _int("qps_burst", qps_burst, allow_none=False)
        if qps_limit.closed:
            raise OptionsError(f"qps_limit must be an open RateLimiter (got {qps_limit!r})")
        return qps_limit
    from ._limiter.remote import remote_limit

    remote = remote_limit(qps_limit, qps_burst)
    if remote is not None:
        return remote
    from ._limiter.gcra import parse_rate

    return parse_rate(qps_limit, qps_burst, what="qps_limit", burst_what="qps_burst")


def _per_second(qps: RateLimiter | ParsedRate | RemoteLimit) -> float | None:
    """The long-run sends per second a normalised ``qps_limit`` allows (one formula:
    :func:`~procdispatch._limiter.gcra.parse_rate`'s; a Limiter's tightest rate), or None when
    a Limiter's buckets are made on demand."""
    from ._limiter.gcra import ParsedRate
    from ._limiter.remote import RemoteLimit

    if isinstance(qps, (ParsedRate, RemoteLimit)):
        return qps.per_second
    return qps.rate_per_second
