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
from ._outcomes import Outcomes
from ._pool import BUSY, DEAD, STARTING, Slot, WorkerPool
from .buffer import Batch, Buffer
from .errors import (
    InternalError,
)

if TYPE_CHECKING:
    from ._ratelimit import RateLimiter

log = logging.getLogger("procdispatch")
monotonic = time.monotonic

#: How far ahead the coordinator books a rate-limit token instead of sleeping then retrying.
QPS_BOOK_AHEAD = 0.05
#: How long shutdown waits for stopped workers to exit before killing them.
STOP_JOIN_TIMEOUT = 5.0


class Coordinator(Outcomes):
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
        Admission.__init__(self, self._fb)  # the admission limits come from it
        # Owned by the coordinator thread.
        self.pool = WorkerPool(opts, send_fn, payload, self._wake_r)
        self._pickle = opts.backend == "process"
        self._cancelled = False
        self._cancel_deadline = math.inf
        self._start_failures = 0
        #: Workers not started yet. A process worker costs a core while it starts (a whole
        #: interpreter under spawn), so one starts alone; the rest start together as soon as
        #: more than one item is in the channel (one item never needs a second worker).
        self._deferred = 0
        self._to_respawn = 0  # workers whose start raised, to start again at _respawn_at
        self._respawn_at = math.inf
        self._last_send = 0.0
        self._qps_wait_until = 0.0
        self._qps_booked = False  # a token is booked for _qps_wait_until
        self._backlog: collections.deque[tuple[list[Any], list[int] | None]] = collections.deque()
        self._thread = threading.Thread(
            target=self._run, name="procdispatch-coordinator", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    # ---- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        current_full_behavior.set(self._fb)
        try:
            self._last_send = monotonic()
            o = self.opts
            first = 1 if o.backend == "process" else o.workers
            self._deferred = o.workers - first
            for _ in range(first):
                self._spawn()
            recycling = o.max_batches_per_worker is not None or o.max_worker_memory is not None
            woke = False
            while True:
                now = monotonic()
                self._ingest(now, woke)
                self._dispatch(now)
                self._publish()
                if self._deferred and (self._backlog or self.buffer.total > 1):
                    self._spawn_deferred()  # more than one item: work for more than one worker
                if self._to_respawn:
                    self._respawn_due(now)
                if self._finished():
                    break
                woke, ready = self.pool.wait(self._timeout(now))
                now = monotonic()
                for slot, sentinel in ready:
                    if slot.state is not DEAD:
                        self._handle(slot, sentinel, now)
                        if recycling and slot.state is not DEAD:
                            self._maybe_recycle(slot)  # limits hold under pipelining too
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
        lock = self.lock  # the condition's lock, taken directly: once per loop iteration
        lock.acquire()
        try:
            self._wake_pending = False
            inbox = self.inbox
            if inbox:
                self.inbox = collections.deque()
                self._open = self._open_sizes = None
            closed = self.closed
            cancel = self.cancel_requested
        finally:
            lock.release()
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
        if limiter is None and min_qps is None:
            # Nothing to consult before leasing: lease and send while both sides have room.
            while (slot := pool.pick()) is not None:
                leased = buf.lease_one(now)
                if leased is None:
                    return booked
                self._last_send = now
                self._send(slot, leased, now)
            return booked
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
            slot.move(BUSY)
            st = self.opts.send_timeout
            slot.deadline = now + st if st is not None else math.inf
        slot.batches.append(b)
        self.batches_sent += 1
        if not b.synthetic:
            self._d_in_flight += b._count  # _book(in_flight=...), spelled out: once per batch
        slot.leased += 1
        cap = self.opts.max_batches_per_worker
        if cap is not None and slot.leased >= cap:  # it gets no more: count what it was handed
            self._retire(slot, f"it was handed {slot.leased} batches")
        try:
            if slot.handle.send_lease(b, payload):
                self.pool.watch_writes(slot)  # the rest goes out when the pipe has room
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
            if s.batches or s.state is STARTING:  # send_timeout, or start_timeout
                deadline = min(deadline, s.deadline)
        if self._cancelled:
            deadline = min(deadline, self._cancel_deadline)
        if self._to_respawn:
            deadline = min(deadline, self._respawn_at)
        if deadline == math.inf:
            return None
        return max(0.0, deadline - now)

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
