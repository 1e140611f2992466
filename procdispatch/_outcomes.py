"""Outcomes: what happens to a batch when its lease ends, or it leaves the channel.

A collaborator of the coordinator, run only on its thread; it knows batches, the buffer, the
user's callbacks and the ledger, and nothing of workers or pipes. The worker side
(:mod:`._workers`) tells it what a lease came to:

* :meth:`Outcomes.delivered` -- the send returned: the lease is acked, its items delivered;
* :meth:`Outcomes.failed` -- the send raised: the worker's change to the batch is applied (what
  it removed from ``data`` counts as delivered), then :meth:`Outcomes.fail`;
* :meth:`Outcomes.fail` -- ``on_error`` is asked, then the batch is retried (nack), or dropped:
  when ``on_error`` says no, the channel is cancelled, ``delivery_timeout`` has passed, or the
  retry policy gave up or misbehaved (it is user code: whatever it does ends in ``on_drop``);
* :meth:`Outcomes.released` -- the worker never saw the lease: the batch goes back to the
  queue without using an attempt.

Every way out ends the lease exactly once, and every item leaves the channel exactly once, as
delivered or dropped: the moves are booked in the :class:`~._handover.Ledger`.

User code (``on_error``, ``on_drop``, ``on_delivered``, ``on_drained``, the retry policy) runs
only through :func:`call_user`: whatever it raises, of whatever class, is its own failure and
never the loop's, and a call that takes longer than ``SLOW_CALLBACK`` is reported.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from time import monotonic
from typing import Any, TypeVar

from . import _protocol as proto
from ._callbacks import default_on_drop, default_on_error
from ._clock import Clock
from ._delivery import DeliveryReports, removed_items
from ._handover import Ledger
from ._options import ChannelOptions
from .buffer import Batch, Buffer
from .errors import DeliveryTimeout

__all__ = ["REPEATED_RETRY_WARNING", "SLOW_CALLBACK", "Outcomes", "Raised", "call_user"]

log = logging.getLogger("procdispatch")

#: A batch about to be sent for this many times (and each doubling after) logs a WARNING.
REPEATED_RETRY_WARNING = 5
#: A user callback that runs longer than this (in real seconds) on the coordinator thread logs
#: a WARNING.
SLOW_CALLBACK = 1.0

R = TypeVar("R")


class Outcomes:
    """The fates of batches; see the module docstring."""

    def __init__(
        self, opts: ChannelOptions, buffer: Buffer[Any], ledger: Ledger, clock: Clock
    ) -> None:
        self.opts = opts
        self.buffer = buffer
        self.ledger = ledger
        self._now = clock.now
        self._on_error: Callable[[Batch[Any], BaseException], bool] = (
            opts.on_error or default_on_error
        )
        self._on_drop: Callable[[Batch[Any] | None, bool], None] = opts.on_drop or default_on_drop
        self._reports = DeliveryReports(self._report_delivered) if opts.on_delivered else None
        #: Set by the coordinator once the channel is cancelled: no failure is retried.
        self.cancelled = False
        #: Why the first item was dropped (None: an eviction or a cancel); for ItemsDropped.
        self.first_drop_error: BaseException | None = None
        self._dropped_any = False

    # ---- leases that ended --------------------------------------------------------------

    def delivered(self, b: Batch[Any]) -> None:
        """The send of ``b`` returned."""
        self.buffer.ack(b)
        if not b.synthetic:  # Ledger.book spelled out: this runs once per batch
            led = self.ledger
            count = b._count
            led.d_in_flight -= count
            led.d_delivered += count
            led.d_size += b._size
            if self._reports is not None:
                self._reports.whole(b)

    def failed(self, b: Batch[Any], m: proto.Failed, now: float) -> None:
        """The send of ``b`` raised: apply its change to the batch, then fail it."""
        if not b.synthetic:
            self.ledger.book(in_flight=-b._count)
        sent = b.data  # the change below makes a new list: this one stays as it was sent
        self.buffer.apply_mutation(b, m.kept, m.new_data)
        if m.meta_sent:
            b.meta = m.meta
        self._shrink(b, sent, m.kept)
        self.fail(b, m.error, now)

    def released(self, b: Batch[Any]) -> None:
        """The worker never saw the lease of ``b``: queue it again, no attempt used."""
        if not b.synthetic:
            self.ledger.book(in_flight=-b._count)
        self.buffer.release(b)

    def ended_by_cancel(self, b: Batch[Any]) -> None:
        """The send of ``b`` was still running when the cancel grace ran out."""
        if not b.synthetic:
            self.ledger.book(in_flight=-b._count)
        self.buffer.ack(b)
        self.drop(b, None)

    def crashed(self, b: Batch[Any], exc: BaseException, now: float) -> None:
        """The send of ``b`` killed its worker, or overran and was killed."""
        if not b.synthetic:
            self.ledger.book(in_flight=-b._count)
        self.buffer.count_fault(b)
        self.fail(b, exc, now)

    def fail(self, b: Batch[Any], exc: BaseException, now: float) -> None:
        """A leased batch failed: ask ``on_error``, then retry (nack) or drop it."""
        self.ledger.batches_failed += 1
        b._last_error = exc
        before = list(b.data) if self._reports is not None else b.data
        retry = self.call_on_error(b, exc)
        self._shrink(b, before)
        if not b.data:
            self.buffer.ack(b)  # everything was delivered by removal: nothing left to retry
            return
        if self.cancelled or not retry:
            self.buffer.ack(b)
            self.drop(b, exc)
            return
        dt = self.opts.delivery_timeout
        if dt is not None and b._first_lease is not None and now - b._first_lease >= dt:
            self.buffer.ack(b)
            self._drop_expired(b, now)
            return
        # nack asks the retry policy (user code) for the next delay.
        exhausted = call_user(
            "the retry policy", self._nack, now, b, exc, named=self.opts.buffer.retry
        )
        if isinstance(exhausted, Raised):
            policy_error = exhausted.error
            log.error(
                "the retry policy failed for batch %d (attempt %d): %s; dropping the batch",
                b.id,
                b.attempt,
                proto.describe_error(policy_error),
                exc_info=policy_error,
            )
            self.buffer.ack(b)  # a policy that raised left the batch leased
            self.drop(b, policy_error)
            return
        if exhausted is not None:
            self.drop(exhausted, exc)
            return
        self.ledger.batches_retried += 1
        nxt = b.attempt + 1
        if nxt % REPEATED_RETRY_WARNING == 0 and _power_of_two(nxt // REPEATED_RETRY_WARNING):
            age = now - b._first_lease if b._first_lease is not None else 0.0
            log.warning(
                "batch %d has failed %d times in %.1fs and will be sent again (attempt %d); "
                "last error: %s. It is retried until the retry policy gives up: set "
                "delivery_timeout= or retry= to bound this",
                b.id,
                b.attempt,
                age,
                nxt,
                proto.describe_error(exc),
            )

    def _nack(self, now: float, b: Batch[Any], exc: BaseException) -> Batch[Any] | None:
        return self.buffer.nack(now, b, exc)

    def unsendable(self, b: Batch[Any], err: proto.UnsendableItems, now: float) -> bool:
        """A leased batch could not be handed over as it is. Each item that will not pickle
        goes alone, as a batch of its own, to ``on_error`` (with its position and the pickling
        error) and ``on_drop``; a meta that will not pickle fails the batch. True when what is
        left of it can be sent."""
        id_, attempt = b.id, b.attempt
        for pos, (i, why) in enumerate(err.items):
            one = self.buffer.split_off(b, i - pos)  # earlier ones are already out
            exc = pickle.PicklingError(
                f"item {i} of batch {id_} (attempt {attempt}) cannot be pickled to reach a "
                f"worker: {proto.describe_error(why)}"
            )
            exc.__cause__ = why
            self.call_on_error(one, exc)
            self.drop(one, exc)
        if not b.data:
            self.buffer.ack(b)
            return False
        if err.meta_error is not None:
            self.fail(b, err.meta_error, now)
            return False
        return True

    # ---- leaving the channel ------------------------------------------------------------

    def drop(self, batch: Batch[Any], error: BaseException | None = None) -> None:
        """Report a batch that is no longer leased nor queued as dropped; ``error`` is why
        (None for an eviction by DropOldestBatch or a cancel)."""
        if not batch.synthetic and not self._dropped_any:
            self._dropped_any = True
            self.first_drop_error = error
        res = call_user("on_drop", self._on_drop, batch, False)
        if isinstance(res, Raised):
            log.error(
                "on_drop raised for batch %d: %s; ignored (the drop is counted)",
                batch.id,
                proto.describe_error(res.error),
                exc_info=res.error,
            )
        self.ledger.batches_dropped += 1
        if not batch.synthetic:
            self.ledger.book(dropped=batch._count, size=batch._size)

    def flush_drops(self) -> None:
        """The final ``on_drop(None, True)``."""
        res = call_user("on_drop(None, True)", self._on_drop, None, True)
        if isinstance(res, Raised):
            log.error(
                "on_drop(None, True) raised: %s; ignored",
                proto.describe_error(res.error),
                exc_info=res.error,
            )

    def drained(self) -> None:
        """``on_drained()``, once, at the very end."""
        on_drained = self.opts.on_drained
        if on_drained is not None:
            res = call_user("on_drained", on_drained)
            if isinstance(res, Raised):
                log.error(
                    "on_drained raised: %s; ignored",
                    proto.describe_error(res.error),
                    exc_info=res.error,
                )

    def expire(self, now: float) -> None:
        """Drop the batches that wait for a retry past ``delivery_timeout``."""
        dt = self.opts.delivery_timeout
        if dt is not None:
            for b in self.buffer.expire(now, dt):
                self._drop_expired(b, now)

    def call_on_error(self, batch: Batch[Any], exc: BaseException) -> bool:
        """Ask ``on_error`` whether to retry ``batch``. An ``on_error`` that raises, or that
        leaves ``batch.data`` something other than a list (removing items from it is how it
        reports them delivered), means "do not retry"; the batch keeps its data list."""
        data = batch.data
        res = call_user("on_error", self._retry_wanted, batch, exc, named=self._on_error)
        if isinstance(res, Raised):
            log.error(
                "on_error raised for batch %d (attempt %d): %s; treating it as 'do not retry'",
                batch.id,
                batch.attempt,
                proto.describe_error(res.error),
                exc_info=res.error,
            )
            res = False
        try:
            now_data = batch.data
        except AttributeError:  # `del batch.data`
            now_data = None
        if type(now_data) is not list:
            log.error(
                "on_error left batch.data of batch %d (attempt %d) a %s; batch.data must stay "
                "a list: the batch keeps the list it had and is not retried",
                batch.id,
                batch.attempt,
                type(now_data).__name__,
            )
            batch.data = data
            return False
        return res

    def _report_delivered(self, batch: Batch[Any]) -> None:
        """``on_delivered(batch)``; its items are counted as delivered whatever it does."""
        assert self.opts.on_delivered is not None
        res = call_user("on_delivered", self.opts.on_delivered, batch)
        if isinstance(res, Raised):
            log.error(
                "on_delivered raised for batch %d: %s; ignored (its items are delivered)",
                batch.id,
                proto.describe_error(res.error),
                exc_info=res.error,
            )

    def _retry_wanted(self, batch: Batch[Any], exc: BaseException) -> bool:
        return bool(self._on_error(batch, exc))  # bool() of what it returned is user code too

    def _drop_expired(self, b: Batch[Any], now: float) -> None:
        """Drop a batch (no longer leased nor queued) that outlived ``delivery_timeout``."""
        assert self.opts.delivery_timeout is not None
        first = b._first_lease if b._first_lease is not None else now
        err = DeliveryTimeout(
            self.opts.delivery_timeout,
            batch_id=b.id,
            attempts=b.attempt,
            age=now - first,
            last_error=b._last_error,
        )
        log.warning("%s", err)
        self.drop(b, err)

    def _shrink(self, batch: Batch[Any], before: list[Any], kept: list[int] | None = None) -> None:
        """Items removed from data by send_fn (or on_error) count as delivered; ``before`` is
        the data before the removal (and ``kept`` the indices a worker kept of it)."""
        removed, size = self.buffer.settle(batch)
        if (removed or size) and not batch.synthetic:
            self.ledger.book(delivered=removed, size=size)
            if removed and self._reports is not None:
                self._reports.part(batch, removed_items(before, kept, batch.data, removed))


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Raised:
    """What :func:`call_user` returns when the callable raised: the error, whatever its class."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def call_user(what: str, fn: Callable[..., R], *args: Any, named: object = None) -> R | Raised:
    """Run user code on the coordinator thread: what it returned, or :class:`Raised` with what
    it raised, whatever its class; and a WARNING, naming ``what`` and ``named`` (by default
    ``fn``), when it ran longer than ``SLOW_CALLBACK``.

    ``BaseException`` is caught here, and only in guards like this one that run user code or
    unpickle foreign bytes: a ``SystemExit``, ``KeyboardInterrupt`` or ``GeneratorExit`` out of
    a callback is that callback's failure, handled as an ``Exception`` would be (logged, and
    the batch concerned dropped where that is the rule). It does not cancel the channel:
    Python delivers signals to the main thread only, so a ``KeyboardInterrupt`` on this thread
    never comes from Ctrl-C (which reaches the producer's ``with`` block and cancels there); it
    was raised by the callback itself, and cancelling would drop every queued batch for one
    callback's error. A callback that means to stop the channel calls ``cancel()``.
    """
    t0 = monotonic()
    try:
        return fn(*args)
    except BaseException as exc:  # user code: see the docstring
        return Raised(exc)
    finally:
        _warn_if_slow(what, fn if named is None else named, t0)


def _name_of(fn: object) -> str:
    try:
        name = getattr(fn, "__qualname__", None)
        return name if isinstance(name, str) else repr(fn)
    except BaseException:  # user code: a __getattr__ or __repr__ that raises
        return f"a {type(fn).__qualname__} object"


def _warn_if_slow(what: str, fn: object, t0: float) -> None:
    took = monotonic() - t0
    if took > SLOW_CALLBACK:
        log.warning(
            "%s (%s) took %.1fs on the coordinator thread; while a callback runs no batch is "
            "leased, acknowledged or retried",
            what,
            _name_of(fn),
            took,
        )
