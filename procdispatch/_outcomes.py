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
delivered or dropped: the moves are booked in the :class:`~._admission.Ledger`.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from time import monotonic
from typing import Any

from . import _protocol as proto
from ._admission import Ledger
from ._callbacks import default_on_drop, default_on_error
from ._clock import Clock
from ._delivery import DeliveryReports, removed_items
from ._options import ChannelOptions
from .buffer import Batch, Buffer
from .errors import DeliveryTimeout

__all__ = ["REPEATED_RETRY_WARNING", "SLOW_CALLBACK", "Outcomes"]

log = logging.getLogger("procdispatch")

#: A batch about to be sent for this many times (and each doubling after) logs a WARNING.
REPEATED_RETRY_WARNING = 5
#: A user callback that runs longer than this (in real seconds) on the coordinator thread logs
#: a WARNING.
SLOW_CALLBACK = 1.0


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
        self._reports = (
            DeliveryReports(opts.on_delivered, _warn_if_slow) if opts.on_delivered else None
        )
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
        t0 = monotonic()
        try:
            exhausted = self.buffer.nack(now, b, exc)
        except Exception as policy_error:
            log.error(
                "the retry policy failed for batch %d (attempt %d): %s: %s; dropping the batch",
                b.id,
                b.attempt,
                type(policy_error).__name__,
                policy_error,
                exc_info=policy_error,
            )
            self.buffer.ack(b)
            self.drop(b, policy_error)
            return
        finally:
            _warn_if_slow("the retry policy", self.opts.buffer.retry, t0)
        if exhausted is not None:
            self.drop(exhausted, exc)
            return
        self.ledger.batches_retried += 1
        nxt = b.attempt + 1
        if nxt % REPEATED_RETRY_WARNING == 0 and _power_of_two(nxt // REPEATED_RETRY_WARNING):
            age = now - b._first_lease if b._first_lease is not None else 0.0
            log.warning(
                "batch %d has failed %d times in %.1fs and will be sent again (attempt %d); "
                "last error: %s: %s. It is retried until the retry policy gives up: set "
                "delivery_timeout= or retry= to bound this",
                b.id,
                b.attempt,
                age,
                nxt,
                type(exc).__name__,
                exc,
            )

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
                f"worker: {type(why).__name__}: {why}"
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
        t0 = monotonic()
        try:
            self._on_drop(batch, False)
        except Exception:
            log.exception("on_drop raised for batch %d; ignored", batch.id)
        finally:
            _warn_if_slow("on_drop", self._on_drop, t0)
        self.ledger.batches_dropped += 1
        if not batch.synthetic:
            self.ledger.book(dropped=batch._count, size=batch._size)

    def flush_drops(self) -> None:
        """The final ``on_drop(None, True)``."""
        self._on_drop(None, True)

    def expire(self, now: float) -> None:
        """Drop the batches that wait for a retry past ``delivery_timeout``."""
        dt = self.opts.delivery_timeout
        if dt is not None:
            for b in self.buffer.expire(now, dt):
                self._drop_expired(b, now)

    def call_on_error(self, batch: Batch[Any], exc: BaseException) -> bool:
        t0 = monotonic()
        try:
            return bool(self._on_error(batch, exc))
        except Exception:
            log.exception("on_error raised for batch %d; treating it as 'do not retry'", batch.id)
            return False
        finally:
            _warn_if_slow("on_error", self._on_error, t0)

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


def _warn_if_slow(what: str, fn: object, t0: float) -> None:
    took = monotonic() - t0
    if took > SLOW_CALLBACK:
        name = getattr(fn, "__qualname__", None) or repr(fn)
        log.warning(
            "%s (%s) took %.1fs on the coordinator thread; while a callback runs no batch is "
            "leased, acknowledged or retried",
            what,
            name,
            took,
        )
