"""ProcessChannel: the public facade. It validates, then hands everything to the coordinator.

Producers call :meth:`ProcessChannel.put` from any thread; the call measures the item (when
``item_size`` is set), waits for room under BlockNewItems, and leaves the item with the
coordinator (see :mod:`._admission`). Nothing here touches the buffer or the workers.

Ending. Leaving a ``with`` block normally closes and drains. An exception closes and drains
too (and is re-raised); a KeyboardInterrupt or SystemExit cancels: the first Ctrl-C logs how
many sends it waits for and for how long (``cancel_grace``), a second one ends them at once.
A channel left open at interpreter exit, or collected while open, is closed and drained (see
:mod:`._process_end`).

Waits that would wait for themselves raise instead of hanging. The callbacks ``on_error``,
``on_drop``, ``on_delivered``, ``on_drained`` and the retry policy run on the coordinator
thread, which alone makes room and ends the drain: from there every wait, synchronous or
asynchronous (``asyncio.run`` of it), raises :class:`~.errors.ProcDispatchError` naming the
method and the callback when it would wait -- ``wait_drained``, ``close_and_drain``, leaving a
``with`` block, ``await_drained``, ``aclose_and_drain``, leaving an ``async with`` block, and a
``put``, ``put_many``, ``aput`` or ``aput_many`` that would wait for room
(:class:`~.errors.BufferFull` for those). The drain ends with the last report of a ``progress``
callable, made on its own thread: from there the waits for the drain raise as well. So does a
drain waited for by a signal handler that interrupted a ``put`` of the same channel in the
lock the drain needs. Calls that do not wait are fine anywhere: a ``put`` or ``aput`` with room,
``put_nowait``, ``stats``, ``close``, ``cancel``. Every ``timeout=`` follows ``queue.Queue``'s
rules (see :func:`._waits.check_timeout`) and is checked before the call does anything.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import CodeType, TracebackType
from typing import Any, Generic, TypeVar

from . import _process_end
from ._admission import Admission, Stats
from ._coordinator import Coordinator
from ._options import Options, check_body_runs
from ._outcomes import _name_of
from ._progress import Reporter, sized_length
from ._waits import check_timeout
from .backends import Backend
from .buffer import Batch, Buffer, FullBehavior
from .errors import BufferFull, ItemsDropped, OptionsError, ProcDispatchError

__all__ = ["ProcessChannel", "Stats"]

T = TypeVar("T")
log = logging.getLogger("procdispatch")


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
        coord.start()
        if self._progress is not None:
            self._progress.start()
        # Not a method of the channel: the coordinator holds the admission, which must not
        # keep the channel object alive (its collection closes it).
        adm.reentry_error = _reentry_errors(opts)
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

    # ---- ending ---------------------------------------------------------------------------

    def close(self) -> None:
        """Take no more items; everything buffered is still sent. Idempotent."""
        self._check_not_inherited()
        self._adm.request_close()

    def cancel(self) -> None:
        """Stop: drop queued batches; in-flight sends get ``cancel_grace`` seconds, then their
        workers are killed and their batches dropped. Implies :meth:`close`."""
        self._check_not_inherited()
        self._adm.request_cancel()

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until every batch was delivered or dropped; False on timeout."""
        self._check_not_inherited()
        seconds = check_timeout("wait_drained", timeout)
        if seconds != 0 and not self._adm.drained.is_set():
            self._check_can_wait("wait_drained() cannot be called")
        return self._adm.drained.wait(seconds)

    def close_and_drain(self, timeout: float | None = None) -> bool:
        """:meth:`close`, then :meth:`wait_drained`. Once drained, raises the error that killed
        the channel (e.g. WorkerStartFailed), and with ``raise_on_drop=True`` raises
        :class:`ItemsDropped` if anything was dropped."""
        self._check_not_inherited()
        seconds = check_timeout("close_and_drain", timeout)
        if seconds != 0 and not self._adm.drained.is_set():
            self._check_can_wait("close_and_drain() cannot be called")
        self.close()
        ok = self._adm.drained.wait(seconds)
        if ok:
            self._raise_after_drain()
        return ok

    def _raise_after_drain(self) -> None:
        if self._adm.fatal is not None:
            raise self._adm.fatal
        if self._coord.opts.raise_on_drop:
            dropped = self._adm.snapshot().items_dropped
            if dropped:
                raise ItemsDropped(dropped, self._coord.first_drop_error)

    def _check_not_inherited(self) -> None:
        if self._adm.inherited_by_fork:
            self._adm._check_open(0)  # raises the error that explains it

    def _reentry(self, what: str) -> BaseException | None:
        """The error for a wait for the drain made on a thread the drain waits for: the
        coordinator's, the one that makes the last progress report, or a worker thread of the
        thread backend running the user's code; None elsewhere."""
        if self._adm.coordinator_ident == threading.get_ident():
            err: BaseException = self._adm.reentry_error(what)
            return err
        user_code = self._coord.opts.backend.running_user_code()
        if user_code is not None:
            name = _name_of(self._user_code.get(user_code))
            return ProcDispatchError(
                f"{what} from {user_code} ({name}) on a worker of the channel: the drain waits "
                f"for this worker's {user_code} to return, so it would wait for itself (call "
                "close() or cancel() there: they do not wait)"
            )
        progress = self._progress
        if progress is not None and progress.is_current_thread():
            name = _name_of(self._coord.opts.progress)
            return ProcDispatchError(
                f"{what} from the progress callable ({name}): the drain ends with its last "
                "report, made on this thread, so it would wait for itself (call close() or "
                "cancel() there: they do not wait)"
            )
        return None

    def _check_can_wait(self, what: str) -> None:
        """Raise instead of waiting for the drain when the wait would wait for itself."""
        adm = self._adm
        err = self._reentry(what)
        if err is not None:
            raise err
        if adm.lock.locked() and _interrupts_a_producer(adm):
            # A signal handler on top of put(): if that put holds the lock, the coordinator
            # cannot take what was put, and the drain never ends. Another thread holding the
            # lock lets it go within microseconds.
            deadline = time.monotonic() + _LOCK_PROBE
            while adm.lock.locked():
                if time.monotonic() >= deadline:
                    raise ProcDispatchError(
                        f"{what} from a signal handler that interrupted put() or put_many() of "
                        "the same channel: that call holds the lock the drain needs, so it "
                        "would wait for itself (call close() or cancel() there, and wait after "
                        "the put returned)"
                    )
                time.sleep(_LOCK_PROBE / 100)

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
        if self._adm.inherited_by_fork:
            return  # nothing of it runs in this process
        err = self._reentry("leaving a with block of the channel cannot wait")
        if err is not None:
            # In a callback: end the channel as the block would, but do not wait for it.
            if exc_type is None or issubclass(exc_type, (Exception, GeneratorExit)):
                self.close()
            else:
                self.cancel()
            raise err
        if exc_type is not None and not issubclass(exc_type, (Exception, GeneratorExit)):
            deadline = _process_end.sigterm_deadline()
            if issubclass(exc_type, SystemExit) and deadline is not None:
                self._drain_until(deadline)  # SIGTERM under drain_on_sigterm
            else:
                self._cancel_and_wait(f"{exc_type.__name__} in the with block")
            return
        try:
            self.close()
            self.wait_drained()
        except BaseException as interrupt:
            self._cancel_and_wait(f"{type(interrupt).__name__} while draining")
            raise
        if exc_type is None:
            self._raise_after_drain()

    def _cancel_and_wait(self, why: str) -> None:
        """Cancel, say what is waited for, and wait; a Ctrl-C during the wait ends the sends
        still in flight at once (their batches still reach on_drop)."""
        self.cancel()
        n = self._adm.snapshot().batches_in_flight
        if n:
            log.warning(
                "%s: channel cancelled; waiting up to %.1fs (cancel_grace) for %d send(s) in "
                "flight; Ctrl-C again to stop them now (their batches are dropped)",
                why,
                self._coord.opts.cancel_grace,
                n,
            )
        try:
            self.wait_drained()
        except KeyboardInterrupt:
            n = self._adm.snapshot().batches_in_flight
            log.warning("Ctrl-C again: stopping %d send(s) in flight now", n)
            self._adm.request_cancel(kill=True)
            self.wait_drained()

    def _drain_until(self, deadline: float) -> None:
        self.close()
        if not self.wait_drained(max(0.0, deadline - time.monotonic())):
            self._cancel_and_wait("SIGTERM drain timed out")

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

        return await _aio.await_drained(self, timeout)

    async def aclose_and_drain(self, timeout: float | None = None) -> bool:
        """:meth:`close_and_drain` for asyncio (the same errors once drained)."""
        from . import _aio

        return await _aio.close_and_drain(self, timeout)

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

        await _aio.aexit(self, exc_type)

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


#: How long a drain waited for from a signal handler lets the admission lock stay taken
#: before deciding that the put the handler interrupted holds it.
_LOCK_PROBE = 1.0


def _deadline(method: str, timeout: object) -> float | None:
    seconds = check_timeout(method, timeout)
    return None if seconds is None else time.monotonic() + seconds


def _interrupts_a_producer(adm: Admission) -> bool:
    """Whether this thread's stack holds a put of ``adm`` (a signal handler runs on top)."""
    codes = (Admission.put_one.__code__, Admission.admit.__code__)
    f = sys._getframe(2)
    while f is not None:
        if f.f_code in codes and f.f_locals.get("self") is adm:
            return True
        f = f.f_back  # type: ignore[assignment]
    return False


def _reentry_errors(opts: Any) -> Callable[[str], BaseException]:
    """The error for a wait from the coordinator thread, naming the callback that made it."""
    callbacks = {
        "on_error": opts.on_error,
        "on_drop": opts.on_drop,
        "on_drained": opts.on_drained,
        "on_delivered": opts.on_delivered,
        "the retry policy": opts.buffer.retry,
    }

    def build(what: str) -> BaseException:
        codes = {}
        for name, fn in callbacks.items():
            code = _code_of(fn)
            if code is not None:
                codes[code] = name
        name = "a callback (on_error, on_drop, on_drained, on_delivered or the retry policy)"
        f = sys._getframe(1)
        while f is not None:
            if f.f_code in codes:
                name = codes[f.f_code]
                break
            f = f.f_back  # type: ignore[assignment]
        if what.endswith("cannot wait for room"):
            return BufferFull(
                f"{what} from {name}: the buffer is full, and the coordinator thread, which "
                f"runs {name}, is what makes room, so it would wait for itself (use "
                "put_nowait() and handle BufferFull there)"
            )
        return ProcDispatchError(
            f"{what} from {name}: the coordinator thread runs {name} and ends the drain, so "
            "it would wait for itself (call close() or cancel() there: they do not wait)"
        )

    return build


def _code_of(fn: object) -> CodeType | None:
    """The code object a call of ``fn`` runs first (functions, methods, partials, objects)."""
    for _ in range(8):
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        code = getattr(fn, "__code__", None)
        if isinstance(code, CodeType):
            return code
        inner = getattr(fn, "__func__", None)
        if inner is not None:
            fn = inner
            continue
        if not callable(fn) or isinstance(fn, type):
            return None
        fn = type(fn).__call__
    return None
