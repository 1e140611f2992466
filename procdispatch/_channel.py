"""ProcessChannel: the public facade. It validates, then hands everything to the coordinator.

Producers call :meth:`ProcessChannel.put` from any thread; the call measures the item (when
``item_size`` is set), waits for room under BlockNewItems, and leaves the item with the
coordinator (see :mod:`._admission`). Nothing here touches the buffer or the workers.

How the channel ends -- close, cancel, the waits for the drain, leaving a ``with`` block, and
the waits that would wait for themselves and raise instead -- is :mod:`._ending`'s; the
asyncio methods' machinery is :mod:`._aio`'s. Every ``timeout=`` follows ``queue.Queue``'s
rules (see :func:`._waits.check_timeout`) and is checked before the call does anything.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._admission import Admission, Stats
from ._coordinator import Coordinator
from ._ending import Ending, reentry_errors
from ._option_checks import check_body_runs
from ._options import Options
from ._progress import Reporter, sized_length
from ._waits import check_timeout
from .backends import Backend
from .buffer import Batch, Buffer, FullBehavior
from .errors import OptionsError

__all__ = ["ProcessChannel", "Stats"]

T = TypeVar("T")


class ProcessChannel(Generic[T]):
    """Batch items from producers and send them through ``send_fn`` in worker processes.

    Every option is keyword-only; the documentation's options page (and the README's table)
    gives each one's meaning and default.
    Leaving a ``with`` block closes the channel and waits until every batch was delivered or
    dropped; a KeyboardInterrupt or SystemExit cancels instead (a second Ctrl-C ends the sends
    still in flight). A channel still open at interpreter exit is closed and drained.
    """

    def __init__(
        self,
        send_fn: Callable[[Batch[T]], object],
        *,
        workers: int | None = None,
        max_leases: int | None = None,
        batch_items_max: int | None = 20,
        batch_size_max: int | None = None,
        batch_age_max: float = 10.0,
        item_size: Callable[[T], int] | None = None,
        full_behavior: FullBehavior | None = None,
        retry: Callable[[], Iterator[float]] | None = None,
        fifo: bool = False,
        qps_limit: float | Any | Sequence[Any] | None = None,
        qps_burst: int = 1,
        min_qps: float | None = None,
        on_error: Callable[[Batch[T], BaseException], bool] | None = None,
        on_drop: Callable[[Batch[T] | None, bool], None] | None = None,
        on_delivered: Callable[[Batch[T]], object] | None = None,
        on_drained: Callable[[], None] | None = None,
        worker_init: Callable[[], object] | None = None,
        send_timeout: float | None = None,
        cancel_grace: float = 5.0,
        start_timeout: float = 60.0,
        delivery_timeout: float | None = None,
        raise_on_drop: bool = False,
        max_batches_per_worker: int | None = None,
        max_worker_memory: int | None = None,
        start_method: str | None = None,
        backend: str | Backend = "process",
        progress: bool | Callable[[Stats], object] | Any = False,
        progress_total: int | None = None,
    ) -> None:
        if not callable(send_fn):
            raise OptionsError(f"send_fn must be callable (got {send_fn!r})")
        check_body_runs("send_fn", send_fn, in_worker=True)
        opts = Options(
            workers=workers,
            max_leases=max_leases,
            batch_items_max=batch_items_max,
            batch_size_max=batch_size_max,
            batch_age_max=batch_age_max,
            item_size=item_size,
            full_behavior=full_behavior,
            retry=retry,
            fifo=fifo,
            qps_limit=qps_limit,
            qps_burst=qps_burst,
            min_qps=min_qps,
            on_error=on_error,
            on_drop=on_drop,
            on_delivered=on_delivered,
            on_drained=on_drained,
            worker_init=worker_init,
            send_timeout=send_timeout,
            cancel_grace=cancel_grace,
            start_timeout=start_timeout,
            delivery_timeout=delivery_timeout,
            raise_on_drop=raise_on_drop,
            max_batches_per_worker=max_batches_per_worker,
            max_worker_memory=max_worker_memory,
            start_method=start_method,
            backend=backend,
            progress=progress,
            progress_total=progress_total,
        ).resolve()
        self._adm = adm = Admission(opts.buffer.full_behavior)
        self._item_size = opts.item_size
        if self._item_size is None:
            # The hot path without item sizes: put goes straight to the admission.
            self.put = adm.put_one  # type: ignore[method-assign]
        else:
            adm._pending_sized = True
        opts.backend.open(send_fn, opts)  # before any thread or process exists: may refuse
        self._user_code = {"send_fn": send_fn, "worker_init": opts.worker_init}
        self._progress: Reporter | None = None
        if opts.progress is not False:
            self._progress = Reporter(opts.progress, opts.progress_total, adm.snapshot)
        limiter = _make_limiter(opts.qps, adm._wake)
        # A limiter built here (from a rate, or the token source over a Limiter) is ours to
        # close; a RateLimiter or Limiter given is the user's.
        owned = limiter is not None and limiter is not opts.qps
        self._coord = coord = Coordinator(
            opts,
            adm,
            opts.backend,
            limiter,
            owns_limiter=owned,
            final_report=None if self._progress is None else self._progress.finish,
        )
        self._sizer: Buffer[Any] = coord.buffer  # check_size only reads its options
        self._ending = Ending(adm, coord, self._progress, self._user_code)
        coord.start()
        if self._progress is not None:
            self._progress.start()
        # Not a method of the channel: the coordinator holds the admission, which must not
        # keep the channel object alive (its collection closes it).
        adm.reentry_error = reentry_errors(opts)
        adm.coordinator_ident = coord._thread.ident
        # Collected while open: the coordinator drains what it holds in the background.
        weakref.finalize(self, adm.request_close)

    # ---- producing ------------------------------------------------------------------------

    def _size_of(self, item: T) -> int:
        assert self._item_size is not None
        size = self._item_size(item)
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"item_size must return an int (got {size!r} for {item!r})")
        self._sizer.check_size(size)
        return size

    def put(self, item: T, *, timeout: float | None = None) -> None:
        """Add one item; wait while BlockNewItems is full (TimeoutError after ``timeout``)."""
        if timeout is not None:
            check_timeout("put", timeout)  # before item_size runs
        size = self._size_of(item) if self._item_size is not None else None
        self._adm.put_one(item, size=size, timeout=timeout)

    def put_nowait(self, item: T) -> None:
        """Add one item, or raise BufferFull at once when BlockNewItems is full."""
        size = self._size_of(item) if self._item_size is not None else None
        self._adm.put_one(item, size=size, block=False)

    def put_many(self, items: Iterable[T], *, timeout: float | None = None) -> int:
        """``put`` each item in order, in bulk; return how many were added.

        When it has to stop early (closed, timeout, an item of a forbidden size) it raises what
        ``put`` would have raised for that item, with the count added so far as ``exc.added``.
        """
        deadline = _deadline("put_many", timeout)
        if self._progress is not None:
            n = sized_length(items)
            if n is not None:
                self._progress.announce(n)
        batch: list[T] = []
        try:
            batch.extend(items)
        except Exception as exc:
            # As a loop of put() would: what the iterable gave before it raised goes in.
            self._put_list(batch, deadline, exc)
            raise
        return self._put_list(batch, deadline, None)

    def _put_list(self, batch: list[T], deadline: float | None, err: Exception | None) -> int:
        """Admit ``batch``; with ``err`` (what stopped the iterable), set ``err.added``."""
        if self._item_size is None:
            added = self._adm.admit(batch, None, block=True, deadline=deadline, method="put_many")
            if err is not None:
                err.added = added  # type: ignore[attr-defined]
            return added
        sizes: list[int] = []
        try:
            for item in batch:
                sizes.append(self._size_of(item))
        except Exception as exc:
            good = len(sizes)
            added = self._adm.admit(
                batch[:good], sizes, block=True, deadline=deadline, method="put_many"
            )
            exc.added = added  # type: ignore[attr-defined]
            raise
        added = self._adm.admit(batch, sizes, block=True, deadline=deadline, method="put_many")
        if err is not None:
            err.added = added  # type: ignore[attr-defined]
        return added

    # ---- ending (the machinery, and its rules, are in ._ending) -----------------------------

    def close(self) -> None:
        """Take no more items; everything buffered is still sent. Idempotent."""
        self._ending.close()

    def cancel(self) -> None:
        """Stop: drop queued batches; in-flight sends get ``cancel_grace`` seconds, then their
        workers are killed and their batches dropped. Implies :meth:`close`."""
        self._ending.cancel()

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until every batch was delivered or dropped; False on timeout."""
        return self._ending.wait_drained(timeout)

    def close_and_drain(self, timeout: float | None = None) -> bool:
        """:meth:`close`, then :meth:`wait_drained`. Once drained, raises the error that killed
        the channel (e.g. WorkerStartFailed), and with ``raise_on_drop=True`` raises
        :class:`ItemsDropped` if anything was dropped."""
        return self._ending.close_and_drain(timeout)

    @property
    def drained(self) -> bool:
        """True once the channel drained and ``on_drained`` returned."""
        return self._adm.drained.is_set()

    def stats(self) -> Stats:
        """A consistent snapshot of the channel's counters."""
        return self._adm.snapshot()

    def __enter__(self) -> ProcessChannel[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._ending.exit(exc_type)

    # ---- asyncio (the machinery, and its rules, are in ._aio) -------------------------------

    async def aput(self, item: T, *, timeout: float | None = None) -> None:
        """``put`` for asyncio: await room under BlockNewItems without blocking the event loop
        (TimeoutError after ``timeout``).

        Cancellation-atomic: an ``aput`` that raised CancelledError did not add its item; one
        that returned did (``items_put`` counts it, and it is delivered or dropped). Waiting
        ``aput`` calls and blocked ``put`` calls are woken together when room appears, with no
        priority between them.
        """
        from . import _aio

        await _aio.put_one(self, item, timeout)

    async def aput_many(self, items: Iterable[T], *, timeout: float | None = None) -> int:
        """``put_many`` for asyncio: add the items in order and return how many were added.

        An early exit (closed, timeout, an item of a forbidden size, a cancellation) raises
        with the count added so far as ``exc.added``.
        """
        from . import _aio

        return await _aio.put_many(self, items, timeout)

    async def await_drained(self, timeout: float | None = None) -> bool:
        """:meth:`wait_drained` for asyncio: True once drained, False after ``timeout``."""
        from . import _aio

        return await _aio.await_drained(self._ending, timeout)

    async def aclose_and_drain(self, timeout: float | None = None) -> bool:
        """:meth:`close_and_drain` for asyncio (the same errors once drained)."""
        from . import _aio

        return await _aio.close_and_drain(self._ending, timeout)

    async def __aenter__(self) -> ProcessChannel[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """A normal exit awaits :meth:`aclose_and_drain`; an exception or a cancellation in the
        block cancels the channel and awaits the end of the sends in flight."""
        from . import _aio

        await _aio.aexit(self._ending, exc_type)

    def __repr__(self) -> str:
        if self._adm.inherited_by_fork:
            return "<ProcessChannel inherited through os.fork(): unusable here>"
        s = self.stats()
        state = "drained" if self.drained else ("closed" if self._adm.closed else "open")
        return (
            f"<ProcessChannel {state} workers={s.workers_alive} put={s.items_put} "
            f"delivered={s.items_delivered} dropped={s.items_dropped}>"
        )


def _make_limiter(qps: Any, wake: Callable[[], None]) -> Any:
    """The channel's limiter: the user's RateLimiter as given, or one of our own for a parsed
    rate (from the one parse of qps_limit; ours to close), or for a pyrate-limiter Limiter a
    token source whose helper thread rouses the coordinator with ``wake`` (ours to close)."""
    if qps is None:
        return None
    from ._limiter.limiter import RateLimiter  # only with a limit: it is not needed otherwise
    from ._limiter.remote import RemoteLimit

    if isinstance(qps, RateLimiter):
        return qps
    if isinstance(qps, RemoteLimit):
        return qps.tokens(wake)
    return RateLimiter._for(qps)


def _deadline(method: str, timeout: object) -> float | None:
    seconds = check_timeout(method, timeout)
    return None if seconds is None else time.monotonic() + seconds
