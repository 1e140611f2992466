"""What happens to batches and workers when workers answer, die, overrun or age out.

The coordinator's outcome half (a base class of :class:`~procdispatch._coordinator.Coordinator`,
run only on its thread): Done acks a batch; Failed applies the worker's mutation and asks
``on_error``, then retries (nack) or drops; a dead worker fails only the batch it was running
(``WorkerCrashed``, or ``SendTimeout`` when we killed it for overrunning), puts back the batches
it never started (those queued behind the running one, and any lease not yet wholly written to
its pipe), and is replaced. Before a worker is killed for a deadline (``send_timeout``, the end
of ``cancel_grace``, ``start_timeout``) what it already answered is read, and read again once it
is dead: a batch whose answer was in the pipe is not failed. A worker that cannot start, or is
not ready within ``start_timeout``, counts towards ``WorkerStartFailed``. A worker that reached
``max_batches_per_worker`` (counted in leases handed to it, so that pipelining cannot take it
past the limit) or is above ``max_worker_memory`` gets no new lease (STOPPING), and is stopped
and replaced once it answered what it holds. Counter moves are booked here and published by the
admission base once per iteration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from time import monotonic
from typing import Any

from . import _protocol as proto
from ._admission import Admission
from ._options import ChannelOptions
from ._pool import BUSY, DEAD, IDLE, STARTING, STOPPING, Slot, WorkerPool
from .buffer import Batch, Buffer
from .errors import (
    DeliveryTimeout,
    InternalError,
    ProcDispatchError,
    SendTimeout,
    WorkerCrashed,
    WorkerStartFailed,
)

log = logging.getLogger("procdispatch")

#: Worker start failures in a row (plus workers - 1) with no worker ready in between before
#: the channel gives up instead of respawning for ever.
START_FAILURES_FATAL = 3
#: Seconds before a worker whose start raised (no process was made) is started again.
SPAWN_RETRY_DELAY = 0.05
#: A batch about to be sent for this many times (and each doubling after) logs a WARNING.
REPEATED_RETRY_WARNING = 5
#: A user callback that runs longer than this on the coordinator thread logs a WARNING.
SLOW_CALLBACK = 1.0
#: Seconds to wait for a killed worker to be gone before reading the last of its pipe.
KILL_WAIT = 1.0


class Outcomes(Admission):
    """Outcome handling; the attributes below are set by the coordinator's constructor."""

    opts: ChannelOptions
    buffer: Buffer[Any]
    pool: WorkerPool
    _on_error: Callable[[Batch[Any], BaseException], bool]
    _on_drop: Callable[[Batch[Any] | None, bool], None]
    _cancelled: bool
    _cancel_deadline: float
    _start_failures: int
    _deferred: int
    _to_respawn: int
    _respawn_at: float
    #: Why the first item was dropped (None: an eviction or a cancel); for ItemsDropped.
    first_drop_error: BaseException | None = None
    _dropped_any = False

    # ---- bookkeeping ----------------------------------------------------------------------

    def _book(
        self, *, in_flight: int = 0, delivered: int = 0, dropped: int = 0, size: int = 0
    ) -> None:
        """Move items between states (published to producers and stats by ``_publish``)."""
        self._d_in_flight += in_flight
        self._d_delivered += delivered
        self._d_dropped += dropped
        self._d_size += size

    def _call_on_error(self, batch: Batch[Any], exc: BaseException) -> bool:
        t0 = monotonic()
        try:
            return bool(self._on_error(batch, exc))
        except Exception:
            log.exception("on_error raised for batch %d; treating it as 'do not retry'", batch.id)
            return False
        finally:
            _warn_if_slow("on_error", self._on_error, t0)

    def _drop(self, batch: Batch[Any], error: BaseException | None = None) -> None:
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
        self.batches_dropped += 1
        if not batch.synthetic:
            self._book(dropped=batch._count, size=batch._size)

    def _shrink(self, batch: Batch[Any]) -> None:
        """Items removed from data by send_fn (or on_error) count as delivered."""
        removed, size = self.buffer.settle(batch)
        if (removed or size) and not batch.synthetic:
            self._book(delivered=removed, size=size)

    # ---- what workers say -----------------------------------------------------------------

    def _handle(self, slot: Slot, sentinel: bool, now: float) -> None:
        msgs, gone = self.pool.read(slot, sentinel)
        for m in msgs:
            if slot.state is DEAD:
                return
            self._on_message(slot, m, now)
        if gone and slot.state is not DEAD:
            self._on_death(slot, now)

    def _on_message(self, slot: Slot, msg: proto.WorkerMessage, now: float) -> None:
        m: proto.Done | proto.Failed
        failed: proto.Failed | None
        if isinstance(msg, proto.Done):  # by far the most common: tested first
            m, failed = msg, None
        elif isinstance(msg, proto.Failed):
            m = failed = msg
        elif isinstance(msg, proto.Ready):
            if slot.state is STARTING:
                slot.move(IDLE)
            self._start_failures = 0
            return
        else:
            slot.init_error = msg.error  # InitFailed: reported when the worker's death is seen
            return
        b = slot.batches[0] if slot.batches else None
        if b is None or b.id != m.batch_id or b.attempt != m.attempt:
            raise InternalError(
                f"worker {slot.wid} answered for batch {m.batch_id} attempt {m.attempt}, "
                f"but its oldest batch is {b!r}"
            )
        slot.batches.popleft()
        slot.done += 1
        if slot.batches:  # the next one starts running now
            st = self.opts.send_timeout
            slot.deadline = now + st if st is not None else math.inf
        else:
            slot.deadline = math.inf
            if slot.state is BUSY:
                slot.move(IDLE)
        if failed is None:
            self.buffer.ack(b)
            if not b.synthetic:  # _book(...), spelled out: this runs once per batch
                count = b._count
                self._d_in_flight -= count
                self._d_delivered += count
                self._d_size += b._size
        else:
            if not b.synthetic:
                self._book(in_flight=-b._count)
            self._apply_mutation(b, failed)
            self._fail(b, failed.error, now)
        if not slot.batches:
            self._maybe_recycle(slot)

    def _apply_mutation(self, b: Batch[Any], m: proto.Failed) -> None:
        self.buffer.apply_mutation(b, m.kept, m.new_data)
        if m.meta_sent:
            b.meta = m.meta
        self._shrink(b)

    def _fail(self, b: Batch[Any], exc: BaseException, now: float, *, fault: bool = False) -> None:
        """A leased batch failed: ask on_error, then retry (nack) or drop it.

        Every way out ends the lease once: delivered by removal, dropped (on_error said no, the
        channel is cancelled, delivery_timeout has passed, the retry policy gave up or
        misbehaved), or queued again for a retry.
        """
        self.batches_failed += 1
        if fault:
            self.buffer.count_fault(b)
        b._last_error = exc
        retry = self._call_on_error(b, exc)
        self._shrink(b)
        if not b.data:
            self.buffer.ack(b)  # everything was delivered by removal: nothing left to retry
            return
        if self._cancelled or not retry:
            self.buffer.ack(b)
            self._drop(b, exc)
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
            # The retry policy is user code: whatever it does, the batch ends in on_drop.
            log.error(
                "the retry policy failed for batch %d (attempt %d): %s: %s; dropping the batch",
                b.id,
                b.attempt,
                type(policy_error).__name__,
                policy_error,
                exc_info=policy_error,
            )
            self.buffer.ack(b)
            self._drop(b, policy_error)
            return
        finally:
            _warn_if_slow("the retry policy", self.opts.buffer.retry, t0)
        if exhausted is not None:
            self._drop(exhausted, exc)
            return
        self.batches_retried += 1
        nxt = b.attempt + 1
        if nxt >= REPEATED_RETRY_WARNING and _doubling(nxt // REPEATED_RETRY_WARNING, nxt):
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
        self._drop(b, err)

    def _expire(self, now: float) -> None:
        """Drop the batches that wait for a retry past ``delivery_timeout``."""
        dt = self.opts.delivery_timeout
        if dt is not None:
            for b in self.buffer.expire(now, dt):
                self._drop_expired(b, now)

    def _on_death(self, slot: Slot, now: float) -> None:
        was = slot.state
        unsent = slot.handle.unsent()  # leases not wholly in its pipe: it never read them
        code = self.pool.bury(slot)
        self._count_alive()
        batches = list(slot.batches)
        slot.batches.clear()
        if was is STARTING:
            self._start_failed(slot, slot.init_error or WorkerCrashed(slot.handle.pid, code))
        reason = slot.kill_reason
        # Only the head can have been running, and only if the worker could read all of it.
        started = len(batches) - unsent
        for i, b in enumerate(batches):
            if not b.synthetic:
                self._book(in_flight=-b._count)
            if reason == "cancel" and i == 0:
                self.buffer.ack(b)
                self._drop(b, None)
            elif i > 0 or i >= started or (reason == "timeout" and b is not slot.victim):
                # Never started, or (its predecessor answered just before the kill) killed
                # for another batch's overrun: back in the queue, no attempt used.
                self.buffer.release(b)
            else:
                exc: ProcDispatchError
                if reason == "timeout":
                    assert self.opts.send_timeout is not None
                    exc = SendTimeout(
                        self.opts.send_timeout,
                        pid=slot.handle.pid,
                        worker=slot.wid,
                        batch_id=b.id,
                        attempt=b.attempt,
                    )
                else:
                    exc = WorkerCrashed(
                        slot.handle.pid, code, worker=slot.wid, batch_id=b.id, attempt=b.attempt
                    )
                self._fail(b, exc, now, fault=True)
        if not slot.replaced and not self._ending():
            self._spawn()
            with self.lock:
                self.worker_restarts += 1

    def _start_failed(self, slot: Slot, cause: BaseException) -> None:
        self._start_failures += 1
        log.error(
            "worker %d (pid %s) could not start: %s: %s%s",
            slot.wid,
            slot.handle.pid,
            type(cause).__name__,
            cause,
            cause.__cause__ or "",
        )
        if self._start_failures >= START_FAILURES_FATAL + self.opts.workers - 1:
            err = WorkerStartFailed(
                f"workers cannot start: {self._start_failures} attempts failed in a row; "
                f"last: {type(cause).__name__}: {cause}"
            )
            err.__cause__ = cause
            self._set_fatal(err)

    def _retire(self, slot: Slot, reason: str) -> None:
        """Give a worker no new lease; it is replaced once it answered what it holds."""
        log.info("recycling worker %d (pid %s): %s", slot.wid, slot.handle.pid, reason)
        slot.move(STOPPING)

    def _maybe_recycle(self, slot: Slot) -> None:
        """Retire a worker above max_worker_memory (read once per finished batch); stop and
        replace a retired worker that holds nothing any more. max_batches_per_worker retires a
        worker when it is handed its last lease (see ``_send``), so that pipelining cannot
        take it past the limit."""
        if slot.replaced or slot.state is DEAD:
            return
        if slot.state is not STOPPING:
            o = self.opts
            if (
                o.max_worker_memory is None
                or slot.done == slot.checked
                or self._cancelled
                or o.backend != "process"
                or not slot.handle.pid
            ):
                return
            slot.checked = slot.done
            rss = _rss(slot.handle.pid)
            if rss is None or rss <= o.max_worker_memory:
                return
            self._retire(slot, f"its memory ({rss} bytes) is above max_worker_memory")
        if slot.batches:
            return
        slot.replaced = True
        self.pool.stop(slot)
        if not self._ending():
            self._spawn()
            with self.lock:
                self.worker_restarts += 1

    def _check_deadlines(self, now: float) -> None:
        """Kill the workers past a deadline: start_timeout, send_timeout, the end of
        cancel_grace. What a worker already answered is read first, and again once it is dead:
        an answer in the pipe is not an overrun."""
        cancel_due = self._cancelled and now >= self._cancel_deadline
        for s in list(self.pool.slots):
            if s.state is DEAD:
                continue
            if s.state is STARTING:
                if s.deadline <= now:
                    self._start_overdue(s, now)
                continue
            if not s.batches:
                continue
            if s.deadline <= now:
                reason = "timeout"
            elif cancel_due:
                reason = "cancel"
            else:
                continue
            self._handle(s, False, now)
            if s.state is DEAD or not s.batches:
                continue
            if reason == "timeout" and s.deadline > now:  # the overdue one had answered
                if not cancel_due:
                    continue
                reason = "cancel"
            self.pool.kill(s, reason, s.batches[0])
            s.handle.exitcode(KILL_WAIT)  # once it is dead, its pipe holds all it said
            self._handle(s, True, now)

    def _start_overdue(self, slot: Slot, now: float) -> None:
        """A worker not ready within start_timeout is killed (a thread is abandoned) and its
        start counts as failed."""
        self._handle(slot, False, now)  # its Ready may be waiting in the pipe
        if slot.state is not STARTING:
            return
        if slot.init_error is None:
            how = "abandoned" if self.opts.backend == "thread" else "killed"
            slot.init_error = TimeoutError(
                f"worker {slot.wid} (pid {slot.handle.pid}) did not become ready within "
                f"start_timeout={self.opts.start_timeout}s; it was {how}"
            )
        self.pool.kill(slot, "start")
        self._on_death(slot, now)

    def _ending(self) -> bool:
        """Cancelled or failed: the channel starts no more workers."""
        return self._cancelled or self.fatal is not None

    def _spawn_deferred(self) -> None:
        n, self._deferred = self._deferred, 0
        if self._ending():
            return
        for _ in range(n):
            self._spawn()

    def _respawn_due(self, now: float) -> None:
        """Start again the workers whose start raised, once their retry delay is over."""
        if now < self._respawn_at:
            return
        n, self._to_respawn, self._respawn_at = self._to_respawn, 0, math.inf
        if self._ending():
            return
        for _ in range(n):
            self._spawn()

    def _spawn(self) -> None:
        """Start a worker. If starting raises, no process exists to die and be replaced, so
        the start is retried after SPAWN_RETRY_DELAY; the failures count towards
        WorkerStartFailed like workers dying at start-up."""
        try:
            self.pool.spawn()
        except Exception as exc:
            log.exception("could not start a worker")
            self._start_failures += 1
            if self._start_failures >= START_FAILURES_FATAL + self.opts.workers - 1:
                err = WorkerStartFailed(
                    f"workers cannot start: {self._start_failures} attempts failed in a row; "
                    f"last: {exc!r}"
                )
                err.__cause__ = exc
                self._set_fatal(err)
            else:
                self._to_respawn += 1
                self._respawn_at = min(self._respawn_at, monotonic() + SPAWN_RETRY_DELAY)
        self._count_alive()

    def _count_alive(self) -> None:
        n = self.pool.alive()
        with self.lock:
            self._alive = n


def _doubling(ratio: int, attempt: int) -> bool:
    """True when ``attempt`` is REPEATED_RETRY_WARNING times a power of two."""
    return attempt % REPEATED_RETRY_WARNING == 0 and ratio & (ratio - 1) == 0


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


def _rss(pid: int) -> int | None:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None
