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

Accounting: every admitted item leaves exactly once, as delivered (its send
succeeded, or the send removed it from ``data``) or dropped (``on_drop`` saw it); ``_book``
records each move and ``_publish`` applies them under the lock once per iteration, so that a
snapshot always adds up.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import threading
import time
from typing import TYPE_CHECKING, Any

from . import _process_end
from . import _protocol as proto
from ._admission import Admission
from ._callbacks import default_on_drop, default_on_error
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

    def _after_fork_in_child(self) -> None:
        super()._after_fork_in_child()
        for slot in self.pool.slots:
            slot.handle.disown()

    def start(self) -> None:
        _process_end.register(self)
        self._thread.start()

    # ---- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
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
                self._expire(now)
                self._dispatch(now)
                self._publish(self.buffer.leased)
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
        taken, sizes, closed, cancel = self._take_pending()
        if cancel and not self._cancelled:
            self._cancelled = True
            self._cancel_deadline = now + self.opts.cancel_grace
            self.buffer.flush(now)
        if self.kill_requested and self._cancel_deadline > now:
            self._cancel_deadline = now  # a second Ctrl-C: the grace is over
        backlog = self._backlog
        if taken:
            backlog.append((taken, sizes))
        while backlog:
            items, sizes = backlog[0]
            if self._cancelled:
                for b in self.buffer.make_batches(now, items, sizes):
                    self._drop(b)
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
                        # then and reserving again would lose each wake-up's lateness. The
                        # delay counts from reserve's own reading of the clock, later than the
                        # loop's ``now``: measured from ``now`` the send could come early.
                        self._qps_wait_until = monotonic() + delay
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
        """Split out the items that will not pickle, each into a batch of its own that goes
        to on_error (with its position in the batch and the pickling error) and on_drop;
        return whether anything is left to send."""
        bad: list[tuple[int, Exception]] = []
        for i, item in enumerate(b.data):
            try:
                proto.dumps(item)
            except Exception as exc:
                bad.append((i, exc))
        id_, attempt = b.id, b.attempt
        for pos, (i, why) in enumerate(bad):
            one = self.buffer.split_off(b, i - pos)  # earlier ones are already out
            err = pickle.PicklingError(
                f"item {i} of batch {id_} (attempt {attempt}) cannot be pickled to reach a "
                f"worker: {type(why).__name__}: {why}"
            )
            err.__cause__ = why
            self._call_on_error(one, err)
            self._drop(one, err)
        if not b.data:
            self.buffer.ack(b)
            return False
        return True

    def _finished(self) -> bool:
        if not self.closed or self._backlog or self.buffer.total or self.pool.busy():
            return False
        return self._nothing_pending()

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
        dt = self.opts.delivery_timeout
        if dt is not None and not self._cancelled:
            expiry = buf.next_expiry(dt)
            if expiry is not None:
                deadline = min(deadline, expiry)
        if deadline == math.inf:
            return None
        return max(0.0, deadline - now)

    def _drop_everything_left(self) -> None:
        """After a crash of this loop: report whatever is still held as dropped (nothing is
        lost silently)."""
        now = monotonic()
        taken, sizes, _, _ = self._take_pending()
        if taken:
            self._backlog.append((taken, sizes))
        for items, sizes in self._backlog:
            for b in self.buffer.make_batches(now, items, sizes):
                self._drop(b)
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
        """End the channel: every step runs even if an earlier one raised, and ``drained`` is
        set last whatever happens, so that no waiter can hang on a failed step."""
        try:
            self._shutdown_steps()
        finally:
            self._coordinator_gone = True
            self.drained.set()
            _process_end.unregister(self)

    def _shutdown_steps(self) -> None:
        if self.fatal is not None and isinstance(self.fatal, InternalError):
            _guarded("report what the failed coordinator held", self._drop_everything_left)
        self._publish(self.buffer.leased)
        _guarded("stop the workers", self.pool.shutdown, STOP_JOIN_TIMEOUT)
        if self._owns_limiter and self._limiter is not None:
            _guarded("close the channel's rate limiter", self._limiter.close)
        with self.lock:
            self._alive = 0
        _guarded("call on_drop(None, True)", self._on_drop, None, True)
        if self.opts.on_drained is not None:
            _guarded("call on_drained", self.opts.on_drained)


def _guarded(what: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("procdispatch: could not %s; going on with the shutdown", what)
