"""ProcessChannel options: declared once, validated in one place.

:class:`Options` is the one declaration: every option with its default and a doc per field.
ProcessChannel's constructor repeats it as an explicit signature, for IDEs and type checkers,
and a test holds the two equal (names, defaults, order). :meth:`Options.resolve` validates and
fills in what is derived, giving the :class:`ChannelOptions` the coordinator runs on;
:func:`options_table` renders the options table of the docs from the same fields.

Messages follow one shape -- "*option* must be *rule* (got *value*)" -- and every failure is an
:class:`~procdispatch.errors.OptionsError` raised before any thread or process exists; the
checks themselves, and what values are normalised to, are :mod:`~procdispatch._option_checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ._fullbehavior import check_int_limit
from ._option_checks import (
    check_body_runs,
    check_bool,
    check_callable,
    check_int,
    check_min_qps,
    check_number,
    check_start_method,
    default_start_method,
    float_or_none,
    normalise_qps,
)
from .backends import Backend, make_backend

if TYPE_CHECKING:
    from ._limiter.gcra import ParsedRate
    from ._limiter.limiter import RateLimiter
    from ._limiter.remote import RemoteLimit
from .buffer import BlockNewItems, BufferOptions, FullBehavior
from .errors import OptionsError

__all__ = [
    "DASK_DEPTH",
    "DEPTH",
    "QUICK_BYTES",
    "QUICK_SEND",
    "ChannelOptions",
    "Options",
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
#: And as many as QUICK_BYTES holds, counting the last lease's size with its large items in
#: shared memory, where the backend measures it (WorkerHandle.lease_cap): 1 MB batches that
#: take a fraction of a millisecond ran 10-25 % slower 32 deep than 8 deep.
QUICK_BYTES = 8 << 20
#: The most batches a worker holds when ``max_leases`` is left out (DEPTH * workers), but on a
#: backend that says otherwise (Backend.lease_depth). For sends under QUICK_SEND / DEPTH a loop
#: turn is shared by more answers: single no-op items ran 140-145k/s with 8, 200-210k with 32.
DEPTH = 32
#: DEPTH for a Dask lane (DaskBackend.lease_depth): each task costs a trip through the
#: scheduler, about ten milliseconds, so quick sends go many to a task; their sends still take
#: QUICK_SEND at most together, and a worker's death fails at most this many batches of a lane
#: (any of a task's may have been sent).
DASK_DEPTH = 32


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
            f"as its last send's time fits into {QUICK_SEND * 1000:g} ms, up to {DEPTH}, and "
            "fewer when its leases are large"
            + (f" ({DASK_DEPTH} on the Dask backend)" if DASK_DEPTH != DEPTH else ""),
            shown=(
                f"`{DEPTH} * workers` ("
                + (f"the Dask backend: `{DASK_DEPTH} * workers`; " if DASK_DEPTH != DEPTH else "")
                + "`workers` with `fifo=True`, or the Dask backend and `qps_limit`)"
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
            "`workers` when left out (the Dask backend counts its default; no item limit when "
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
            check_int("workers", self.workers, allow_none=False)
        backend = make_backend(self.backend)
        try:
            return self._resolve(backend)
        except BaseException:
            backend.close()  # it may hold what default_workers() connected to
            raise

    def _resolve(self, backend: Backend) -> ChannelOptions:
        workers = self.workers if self.workers is not None else backend.default_workers()
        check_int("workers", workers, allow_none=False)
        check_int("max_leases", self.max_leases, allow_none=True)
        leases = self.max_leases
        if leases is None:
            queued = (
                self.fifo is not True
                and backend.queues_leases
                and (self.qps_limit is None or backend.paces_queued_leases)
            )
            depth = backend.lease_depth if backend.lease_depth is not None else DEPTH
            leases = depth * workers if queued else workers
        full_behavior = self.full_behavior if self.full_behavior is not None else BlockNewItems()
        if isinstance(full_behavior, FullBehavior):
            check_int_limit("batch_items_max", self.batch_items_max)  # before they are used
            check_int_limit("batch_size_max", self.batch_size_max)
            # A channel's derived item limit holds every lease full plus as much queued; the
            # pure buffer's smaller default would keep workers idle. Left out, max_leases
            # counts as workers here: the deeper default holds more than one batch per worker
            # only while sends are quick, when a refill a worker deep keeps up, and deriving
            # from it would make the buffer DEPTH times larger. A backend whose leases are
            # answered a worker's worth at a time (Backend.answers_together) has no such
            # refill: there every lease counts.
            every = self.max_leases is not None or backend.answers_together
            held = leases if every else workers
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
        check_callable("item_size", self.item_size)
        check_body_runs("item_size", self.item_size, in_worker=False)
        if self.batch_size_max is not None and self.item_size is None:
            raise OptionsError(
                f"batch_size_max needs item_size to measure items (got batch_size_max="
                f"{self.batch_size_max!r}, item_size=None)"
            )
        qps = normalise_qps(self.qps_limit, self.qps_burst)
        min_qps = self.min_qps
        check_min_qps(min_qps, qps)
        for name in ("on_error", "on_drop", "on_delivered", "on_drained", "worker_init"):
            check_callable(name, getattr(self, name))
            check_body_runs(name, getattr(self, name), in_worker=name == "worker_init")
        check_number("send_timeout", self.send_timeout, minimum=0, strict=True, allow_none=True)
        check_number("cancel_grace", self.cancel_grace, minimum=0, strict=False, allow_none=False)
        check_number("start_timeout", self.start_timeout, minimum=0, strict=True, allow_none=False)
        check_number(
            "delivery_timeout", self.delivery_timeout, minimum=0, strict=True, allow_none=True
        )
        check_bool("raise_on_drop", self.raise_on_drop)
        check_int("max_batches_per_worker", self.max_batches_per_worker, allow_none=True)
        check_int("max_worker_memory", self.max_worker_memory, allow_none=True)
        from ._progress import check_progress

        check_progress(self.progress, self.progress_total)
        if not isinstance(self.progress, bool):
            check_body_runs("progress", self.progress, in_worker=False)
        check_start_method(self.start_method)
        return ChannelOptions(
            workers=workers,
            max_leases=leases,
            adaptive_depth=self.max_leases is None,
            buffer=buf,
            item_size=self.item_size,
            qps=qps,
            min_qps=float_or_none(min_qps),
            on_error=self.on_error,
            on_drop=self.on_drop,
            on_delivered=self.on_delivered,
            on_drained=self.on_drained,
            worker_init=self.worker_init,
            send_timeout=float_or_none(self.send_timeout),
            cancel_grace=float(self.cancel_grace),
            start_timeout=float(self.start_timeout),
            delivery_timeout=float_or_none(self.delivery_timeout),
            raise_on_drop=self.raise_on_drop,
            max_batches_per_worker=self.max_batches_per_worker,
            max_worker_memory=self.max_worker_memory,
            start_method=self.start_method or default_start_method(),
            backend=backend,
            progress=self.progress,
            progress_total=self.progress_total,
        )


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
