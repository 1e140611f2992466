"""The coordinator: the one thread that owns the buffer, the leases and the workers.

Data flow::

    producer threads                       coordinator thread                  workers
    ----------------                       ------------------                  -------
    put / put_many --admit (lock)--> inbox ---> Buffer.add_many
         ^   (blocks while full)         |        |  lease_one (max_leases, age, retry
         |                               |        |  delays, qps token first)
         +------ release on ack/drop ----+        v
                                         |   Lease frame ----- one pipe per worker ---> send_fn
    close / cancel --command (lock)------+        ^                                      |
                                         |        +---- Done / Failed (+ mutation) ------+
    wake pipe (one byte per idle->busy) -+   on_error / on_drop / on_drained run here
                                             sentinels: a dead worker fails its one batch

Each iteration takes what producers handed over, leases what it can, computes its next deadline
(batch age, retry delay, qps token, min_qps, send_timeout, cancel grace) and blocks once in the
pool's selector over the wake pipe, the worker pipes and the worker sentinels. Only this thread
touches the buffer, the worker table, the pipes and the processes; public methods hand it
commands under ``lock`` and wake it.

Admission (BlockNewItems back-pressure, in the base class of ``_admission``) is decided on the
producer side from ``admitted`` --
items put and not yet delivered or dropped, which always equals the buffer's total plus what
waits in the inbox -- so ``put`` never has to wait for this thread to answer.

Accounting (SPEC D3): every admitted item leaves exactly once, as delivered (its send
succeeded, or the send removed it from ``data``) or dropped (``on_drop`` saw it); ``_book``
records each move and ``_publish`` applies them under the lock once per iteration, so that a
snapshot always adds up.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from . import _protocol as proto
from ._admission import Admission
from ._callbacks import current_full_behavior, default_on_drop, default_on_error
from ._options import ChannelOptions
from ._pool import Slot, WorkerPool, WState
from .buffer import Batch, Buffer
from .errors import (
    InternalError,
    ProcDispatchError,
    SendTimeout,
    WorkerCrashed,
    WorkerStartFailed,
)

if TYPE_CHECKING:
    from ._ratelimit import RateLimiter

log = logging.getLogger("procdispatch")
monotonic = time.monotonic

#: Worker start failures in a row (plus workers - 1) with no worker ready in between before
#: the channel gives up instead of respawning for ever.
START_FAILURES_FATAL = 3
#: How far ahead the coordinator books a rate-limit token instead of sleeping then retrying.
QPS_BOOK_AHEAD = 0.05
#: How long shutdown waits for stopped workers to exit before killing them.
STOP_JOIN_TIMEOUT = 5.0


class Coordinator(Admission):
    """Owns one channel's state; see the module docstring. Thread-safe entry points are
    :meth:`admit`, :meth:`request_close`, :meth:`request_cancel` and :meth:`snapshot`."""

    def __init__(
        self,
        send_fn: Any,
        opts: ChannelOptions,
        payload: bytes,
        limiter: RateLimiter | None,
        *,
        owns_limiter: bool = False,
    ) -> None:
        self.opts = opts
        self._limiter = limiter
        self._owns_limiter = owns_limiter
        self.buffer: Buffer[Any] = Buffer(opts.buffer)
        self._fb = opts.buffer.full_behavior
        self._on_error = opts.on_error or default_on_error
        self._on_drop = opts.on_drop or default_on_drop
        Admission.__init__(self, self._fb)
        # Owned by the coordinator thread.
        self.pool = WorkerPool(opts, send_fn, payload, self._wake_r)
        self._pickle = opts.backend == "process"
        self._cancelled = False
        self._cancel_deadline = math.inf
        self._start_failures = 0
        self._last_send = 0.0
        self._qps_wait_until = 0.0
        self._qps_booked = False  # a token is booked for _qps_wait_until
        self._backlog: collections.deque[tuple[list[Any], list[int] | None]] = collections.deque()
        self._thread = threading.Thread(
            target=self._run, name="procdispatch-coordinator", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

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
        try:
            return bool(self._on_error(batch, exc))
        except Exception:
            log.exception("on_error raised for batch %d; treating it as 'do not retry'", batch.id)
            return False

    def _drop(self, batch: Batch[Any]) -> None:
        """Report a batch that is no longer leased nor queued as dropped."""
        try:
            self._on_drop(batch, False)
        except Exception:
            log.exception("on_drop raised for batch %d; ignored", batch.id)
        self.batches_dropped += 1
        if not batch.synthetic:
            self._book(dropped=batch._count, size=batch._size)

    def _shrink(self, batch: Batch[Any]) -> None:
        """Items removed from data by send_fn (or on_error) count as delivered (SPEC D2)."""
        size_before = batch._size
        removed = batch.shrink()
        if (removed or size_before != batch._size) and not batch.synthetic:
            self._book(delivered=removed, size=size_before - batch._size)

    # ---- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        current_full_behavior.set(self._fb)
        try:
            self._last_send = monotonic()
            for _ in range(self.opts.workers):
                self._spawn()
            woke = False
            while True:
                now = monotonic()
                self._ingest(now, woke)
                self._dispatch(now)
                self._publish()
                if self._finished():
                    break
                woke, ready = self.pool.wait(self._timeout(now))
                now = monotonic()
                for slot, sentinel in ready:
                    if slot.state is not WState.DEAD:
                        self._handle(slot, sentinel, now)
                self._check_deadlines(now)
        except BaseException as exc:
            log.critical("procdispatch coordinator failed; the channel is dead", exc_info=True)
            err = InternalError(f"coordinator failed: {exc!r}")
            err.__cause__ = exc
            self._set_fatal(err)
        finally:
            self._shutdown()

    def _ingest(self, now: float, woke: bool) -> None:
        if woke:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        with self.cond:
            self._wake_pending = False
            inbox = self.inbox
            if inbox:
                self.inbox = collections.deque()
                self._open = self._open_sizes = None
            closed = self.closed
            cancel = self.cancel_requested
        if cancel and not self._cancelled:
            self._cancelled = True
            self._cancel_deadline = now + self.opts.cancel_grace
            self.buffer.flush(now)
        backlog = self._backlog
        if inbox:
            backlog.extend(inbox)
        while backlog:
            items, sizes = backlog[0]
            if self._cancelled:
                self._drop(Batch(items))
                backlog.popleft()
                continue
            n, dropped = self.buffer.add_many(now, items, sizes)
            for b in dropped:
                self._drop(b)
            if n < len(items):
                backlog[0] = (items[n:], sizes[n:] if sizes is not None else None)
                break
            backlog.popleft()
        if closed and not backlog:
            self.buffer.flush(now)

    def _dispatch(self, now: float) -> None:
        buf = self.buffer
        if self._cancelled:
            buf.flush(now)
            for b in buf.force_lease_all():
                buf.ack(b)
                self._drop(b)
            return
        if now < self._qps_wait_until:
            return
        # A token booked ahead (see QPS_BOOK_AHEAD) is good for this pass only: sending with
        # it later, next to a fresh token, could burst above the limit, so it is refunded.
        booked = self._qps_booked
        self._qps_booked = False
        if self._lease_and_send(now, booked) and self._limiter is not None:
            self._limiter.refund()

    def _lease_and_send(self, now: float, booked: bool) -> bool:
        """Lease and send while workers, batches and tokens allow; True if ``booked`` (a token
        booked for now) went unused."""
        buf = self.buffer
        limiter = self._limiter
        min_qps = self.opts.min_qps
        pool = self.pool
        while True:
            slot = pool.pick()
            if slot is None:
                return booked
            synth = False
            if not buf.ready(now):
                if (
                    min_qps is None
                    or self.closed
                    or now - self._last_send < 1.0 / min_qps
                    or buf.total
                    or self._backlog
                ):
                    return booked
                synth = True
            if limiter is not None:
                if booked:
                    booked = False
                else:
                    delay = limiter.reserve(within=QPS_BOOK_AHEAD)
                    if delay > 0:
                        # Booked for now + delay when delay <= QPS_BOOK_AHEAD: sleeping until
                        # then and reserving again would lose each wake-up's lateness.
                        self._qps_wait_until = now + delay
                        self._qps_booked = delay <= QPS_BOOK_AHEAD
                        return False
            if synth:
                buf.add_synthetic(now)
            leased = buf.lease_one(now)
            if leased is None:  # pragma: no cover - ready() said otherwise
                raise InternalError("buffer.ready() was true but lease_one() returned None")
            self._last_send = now
            self._send(slot, leased, now)

    def _send(self, slot: Slot, b: Batch[Any], now: float) -> None:
        payload: bytes | None = None
        if self._pickle:
            payload = self._pickle_lease(b, now)
            if payload is None:
                return  # nothing of it could be pickled; already reported
        if not slot.batches:
            slot.move(WState.BUSY)
            st = self.opts.send_timeout
            slot.deadline = now + st if st is not None else math.inf
        slot.batches.append(b)
        self.batches_sent += 1
        if not b.synthetic:
            self._book(in_flight=b._count)
        try:
            slot.handle.send_lease(b, payload)
        except OSError:
            self._on_death(slot, monotonic())

    def _pickle_lease(self, b: Batch[Any], now: float) -> bytes | None:
        """Pickle a lease; items that will not pickle fail alone (on_error, then on_drop)."""
        try:
            body = proto.dumps((b.data, b.meta))
        except Exception:
            if not self._isolate_unpicklable(b):
                return None
            try:
                body = proto.dumps((b.data, b.meta))
            except Exception as exc:  # the meta itself will not pickle
                self._fail(b, exc, now)
                return None
        return proto.encode_lease(b.id, b.attempt, b.synthetic, body)

    def _isolate_unpicklable(self, b: Batch[Any]) -> bool:
        """Split out the items that will not pickle; return whether anything is left to send."""
        keep: list[Any] = []
        keep_sizes: list[int] = []
        sizes = b._sizes
        for i, item in enumerate(b.data):
            try:
                proto.dumps(item)
            except Exception as exc:
                one = Batch([item], meta=b.meta)
                one._size = sizes[i] if sizes is not None else 0
                self._call_on_error(one, exc)
                self._drop(one)
                b._count -= 1
                b._size -= one._size
                continue
            keep.append(item)
            if sizes is not None:
                keep_sizes.append(sizes[i])
        b.data = keep
        b._sizes = keep_sizes if sizes is not None else None
        if not keep:
            self.buffer.ack(b)
            return False
        return True

    def _finished(self) -> bool:
        if not self.closed:
            with self.lock:
                if not self.closed:
                    return False
        return (
            not self._backlog and not self.inbox and self.buffer.total == 0 and not self.pool.busy()
        )

    def _timeout(self, now: float) -> float | None:
        deadline = math.inf
        buf = self.buffer
        pool = self.pool
        if not self._cancelled and buf.leased < self.opts.max_leases and pool.pick() is not None:
            if now < self._qps_wait_until:
                deadline = self._qps_wait_until
            else:
                t = buf.next_send_time()
                if t is not None:
                    deadline = t
                min_qps = self.opts.min_qps
                if min_qps is not None and not self.closed and buf.total == 0:
                    deadline = min(deadline, self._last_send + 1.0 / min_qps)
        for s in pool.slots:
            if s.batches:
                deadline = min(deadline, s.deadline)
        if self._cancelled:
            deadline = min(deadline, self._cancel_deadline)
        if deadline == math.inf:
            return None
        return max(0.0, deadline - now)

    # ---- what workers say -----------------------------------------------------------------

    def _handle(self, slot: Slot, sentinel: bool, now: float) -> None:
        msgs, gone = self.pool.read(slot, sentinel)
        for m in msgs:
            if slot.state is WState.DEAD:
                return
            self._on_message(slot, m, now)
        if gone and slot.state is not WState.DEAD:
            self._on_death(slot, now)

    def _on_message(self, slot: Slot, m: proto.WorkerMessage, now: float) -> None:
        if isinstance(m, proto.Ready):
            if slot.state is WState.STARTING:
                slot.move(WState.IDLE)
            self._start_failures = 0
            return
        if isinstance(m, proto.InitFailed):
            slot.init_error = m.error  # reported when the worker's death is seen
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
            if slot.state is WState.BUSY:
                slot.move(WState.IDLE)
        if isinstance(m, proto.Done):
            self.buffer.ack(b)
            if not b.synthetic:
                self._book(in_flight=-b._count, delivered=b._count, size=b._size)
        else:
            if not b.synthetic:
                self._book(in_flight=-b._count)
            self._apply_mutation(b, m)
            self._fail(b, m.error, now)
        if not slot.batches:
            self._maybe_recycle(slot)

    def _apply_mutation(self, b: Batch[Any], m: proto.Failed) -> None:
        if m.kept is not None:
            data = b.data
            b.data = [data[i] for i in m.kept]
            if b._sizes is not None:
                sizes = b._sizes
                b._sizes = [sizes[i] for i in m.kept]
        elif m.new_data is not None:
            b.data = m.new_data
            b._sizes = None  # unknown: the accounted size stays as it was (it never grows)
        if m.meta_sent:
            b.meta = m.meta
        self._shrink(b)

    def _fail(self, b: Batch[Any], exc: BaseException, now: float, *, fault: bool = False) -> None:
        """A leased batch failed: ask on_error, then retry (nack) or drop it."""
        self.batches_failed += 1
        if fault:
            b._faults += 1
        retry = self._call_on_error(b, exc)
        self._shrink(b)
        if not b.data:
            self.buffer.ack(b)  # everything was delivered by removal: nothing left to retry
            return
        if self._cancelled or not retry:
            self.buffer.ack(b)
            self._drop(b)
            return
        exhausted = self.buffer.nack(now, b, exc)
        if exhausted is not None:
            self._drop(exhausted)
        else:
            self.batches_retried += 1

    def _on_death(self, slot: Slot, now: float) -> None:
        was = slot.state
        code = self.pool.bury(slot)
        self._count_alive()
        batches = list(slot.batches)
        slot.batches.clear()
        if was is WState.STARTING:
            self._start_failed(slot, slot.init_error or WorkerCrashed(slot.handle.pid, code))
        for i, b in enumerate(batches):
            if not b.synthetic:
                self._book(in_flight=-b._count)
            if i > 0:
                self.buffer.release(b)  # never started: back in the queue, no attempt used
            elif slot.kill_reason == "cancel":
                self.buffer.ack(b)
                self._drop(b)
            else:
                exc: ProcDispatchError
                if slot.kill_reason == "timeout":
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
        if was is not WState.STOPPING and not self._cancelled and self.fatal is None:
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

    def _maybe_recycle(self, slot: Slot) -> None:
        o = self.opts
        reason = None
        if o.max_batches_per_worker is not None and slot.done >= o.max_batches_per_worker:
            reason = f"it sent {slot.done} batches"
        elif o.max_worker_memory is not None and o.backend == "process" and slot.handle.pid:
            rss = _rss(slot.handle.pid)
            if rss is not None and rss > o.max_worker_memory:
                reason = f"its memory ({rss} bytes) is above max_worker_memory"
        if reason is None or self._cancelled:
            return
        log.info("recycling worker %d (pid %s): %s", slot.wid, slot.handle.pid, reason)
        slot.move(WState.STOPPING)
        slot.handle.stop()
        self._spawn()
        with self.lock:
            self.worker_restarts += 1

    def _check_deadlines(self, now: float) -> None:
        for s in list(self.pool.slots):
            if s.batches and s.deadline <= now:
                self.pool.kill(s, "timeout")
                self._on_death(s, now)
        if self._cancelled and now >= self._cancel_deadline:
            for s in list(self.pool.slots):
                if s.batches:
                    self.pool.kill(s, "cancel")
                    self._on_death(s, now)

    def _spawn(self) -> None:
        try:
            self.pool.spawn()
        except Exception as exc:
            log.exception("could not start a worker")
            self._start_failures += 1
            if self._start_failures >= START_FAILURES_FATAL + self.opts.workers - 1:
                err = WorkerStartFailed(f"workers cannot start: {exc!r}")
                err.__cause__ = exc
                self._set_fatal(err)
        self._count_alive()

    def _count_alive(self) -> None:
        n = self.pool.alive()
        with self.lock:
            self._alive = n

    def _drop_everything_left(self) -> None:
        """After a crash of this loop: report whatever is still held as dropped (D3)."""
        now = monotonic()
        with self.cond:
            self._backlog.extend(self.inbox)
            self.inbox.clear()
        for items, _ in self._backlog:
            self._drop(Batch(items))
        self._backlog.clear()
        for slot in self.pool.slots:
            for b in slot.batches:
                if not b.synthetic:
                    self._book(in_flight=-b._count)
            slot.batches.clear()
        self.buffer.flush(now)
        self.buffer.force_lease_all()
        for b in self.buffer.leases():
            self.buffer.ack(b)
            self._drop(b)

    def _shutdown(self) -> None:
        if self.fatal is not None and isinstance(self.fatal, InternalError):
            try:
                self._drop_everything_left()
            except Exception:
                log.exception("could not report what the failed coordinator held")
        self._publish()
        try:
            self.pool.shutdown(STOP_JOIN_TIMEOUT)
        finally:
            if self._owns_limiter and self._limiter is not None:
                self._limiter.close()
            with self.lock:
                self._alive = 0
                # Producers may still call close()/put(): they must never write to a closed
                # (or reused) descriptor, so the pipe is closed under the lock, marked so.
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)
            try:
                self._on_drop(None, True)
            except Exception:
                log.exception("on_drop(None, True) raised; ignored")
            if self.opts.on_drained is not None:
                try:
                    self.opts.on_drained()
                except Exception:
                    log.exception("on_drained raised; ignored")
            with self.cond:
                self.cond.notify_all()
            self.drained.set()


def _rss(pid: int) -> int | None:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None
