"""The coordinator: the one thread that owns the buffer, the leases and the workers.

Data flow::

    producer threads                        coordinator thread                  workers
    ----------------                        ------------------                  -------
    put / put_many --(lock)--> pending ----> Buffer.add_many
         ^  (waits while full)        |        |  lease_one (max_leases, age, retry
         |                            |        |  delays, qps token first)
         +---- room on ack/drop ------+        v
                                      |   backend handle ---- lease ------------> send_fn
    close / cancel (no lock) ---------+        ^                                      |
                                      |        +---- Done / Failed (+ mutation) ------+
    wake pipe (a byte per idle->busy)-+   on_error / on_drop / on_drained run here
                                          a dead worker fails only its one batch

Composition. The coordinator owns, and alone calls: the pure :class:`~.buffer.Buffer`; its
:class:`~._outcomes.Outcomes` (what happens to a batch when its lease ends: acks, retries,
drops); its :class:`~._workers.Workers` (the worker side: starting, sending, reading, deadlines,
recycling, replacing, through the :class:`~.backends.Backend`); and the :class:`~._clock.Clock`
it was given. It shares one thing with producers: the channel's
:class:`~._admission.Admission` (pending items, back-pressure, requests, statistics), to which
it publishes its :class:`~._handover.Ledger` once per turn of the loop.

The loop. Each turn (:meth:`Coordinator.step`) handles what the last wait found (worker answers
and deaths, overdue workers), takes what producers handed over, drops what outlived
``delivery_timeout``, leases and sends what it can, publishes, and computes its next deadline
(batch age, retry delay, qps token, min_qps, send_timeout, start_timeout, cancel grace, expiry);
then it waits once, in the clock's wait over the pool's selector, for at most ``MAX_WAIT`` (any
finite option value is a valid deadline, however far). Nothing else on the loop's path
blocks: pipes are non-blocking both ways, and the only other waits are for a killed worker's
end, at most ``KILL_WAIT`` each.

Lifecycle: OPEN, then CLOSING or CANCELLING, then ENDED; the states, their transitions and
the coordinator's end are :mod:`._lifecycle`'s.

Accounting: every admitted item leaves exactly once, as delivered (its send succeeded, or the
send removed it from ``data``) or dropped (``on_drop`` saw it).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _process_end
from ._admission import Admission
from ._clock import Clock, RealClock
from ._handover import Ledger
from ._lifecycle import Lifecycle, drop_everything_left, moved, shutdown_steps
from ._options import ChannelOptions
from ._outcomes import Outcomes
from ._pool import DEAD, STARTING, Slot, WorkerPool
from ._workers import Workers
from .backends import Backend
from .buffer import Buffer
from .errors import InternalError

if TYPE_CHECKING:
    from ._limiter.remote import TokenSource

__all__ = ["MAX_WAIT", "QPS_BOOK_AHEAD", "Coordinator", "Lifecycle"]

log = logging.getLogger("procdispatch")

#: How far ahead the coordinator books a rate-limit token instead of sleeping then retrying.
QPS_BOOK_AHEAD = 0.05
#: The longest the loop waits in one go, whatever its next deadline (see :func:`_bounded`).
MAX_WAIT = 3600.0


#: What :meth:`Coordinator.step` returns when the channel has drained.
FINISHED = -1.0


class Coordinator:
    """Owns one channel's batches and workers; see the module docstring."""

    def __init__(
        self,
        opts: ChannelOptions,
        admission: Admission,
        backend: Backend,
        limiter: TokenSource | None,
        *,
        owns_limiter: bool = False,
        clock: Clock | None = None,
        final_report: Callable[[], None] | None = None,
    ) -> None:
        self.opts = opts
        #: The progress display's final report (it waits a bounded time for another thread),
        #: made after the last ``on_drop`` and before ``on_drained``.
        self._final_report = final_report
        self.admission = admission
        self.backend = backend
        self._limiter = limiter
        self._owns_limiter = owns_limiter
        self._clock: Clock = clock if clock is not None else RealClock()
        self._now = self._clock.now
        self.buffer: Buffer[Any] = Buffer(opts.buffer)
        self.ledger = Ledger()
        self.outcomes = Outcomes(opts, self.buffer, self.ledger, self._clock)
        self.pool = WorkerPool(opts, backend, admission.wake_fd)
        self.workers = Workers(
            opts, backend, self.pool, self.outcomes, self.ledger, admission, self._clock
        )
        self.state = Lifecycle.OPEN
        self._cancel_deadline = math.inf
        self._last_send = 0.0
        self._qps_wait_until = 0.0
        self._qps_booked = False  # a token is booked for _qps_wait_until
        #: Items taken from producers that the buffer had no room for yet (BlockNewItems'
        #: size cap is soft for producers, exact in the buffer).
        self._backlog: collections.deque[tuple[list[Any], list[int] | None]] = collections.deque()
        self._thread = threading.Thread(
            target=self._run, name="procdispatch-coordinator", daemon=True
        )

    @property
    def first_drop_error(self) -> BaseException | None:
        return self.outcomes.first_drop_error

    def start(self) -> None:
        _process_end.register(self)
        self._thread.start()

    def after_fork_in_child(self) -> None:
        self.admission.after_fork_in_child()
        self.workers.after_fork_in_child()

    # ---- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._last_send = self._now()
            self.workers.begin()
            woke = False
            ready: list[tuple[Slot, bool]] = []
            while True:
                timeout = self.step(woke, ready)
                if timeout == FINISHED:
                    break
                woke, ready = self._clock.wait(self.pool.wait, _bounded(timeout))
        except BaseException as exc:
            log.critical("procdispatch coordinator failed; the channel is dead", exc_info=True)
            err = InternalError(f"coordinator failed: {exc!r}")
            err.__cause__ = exc
            self.admission.set_fatal(err)
        finally:
            self._shutdown()

    def step(self, woke: bool, ready: list[tuple[Slot, bool]]) -> float | None:
        """One turn of the loop, after a wait that found ``woke`` / ``ready``: the seconds to
        wait next (None: until something happens), or FINISHED."""
        now = self._now()
        workers = self.workers
        for slot, gone in ready:
            if slot.state is not DEAD:
                workers.handle(slot, gone, now)
        cancel_due = self.state is Lifecycle.CANCELLING and now >= self._cancel_deadline
        workers.check_deadlines(now, cancel_due)
        self._ingest(now, woke)
        if woke and self._qps_wait_until == math.inf:
            # A source that answered "not before a wake-up" (tokens fetched on another thread,
            # see _limiter.remote) may have one now: ask again.
            self._qps_wait_until = 0.0
        self.outcomes.expire(now)
        self._dispatch(now)
        self.admission.publish(self.ledger, self.buffer.leased)
        if workers.deferred and (self._backlog or self.buffer.total > 1):
            workers.spawn_deferred()  # more than one item: work for more than one worker
        if workers.to_respawn:
            workers.respawn_due(now)
        if self._finished():
            return FINISHED
        if self.pool.waiting:
            workers.begin_waiting(now)  # starts whose turn came (a start in flight ended)
        return self._timeout(now)

    def _ingest(self, now: float, woke: bool) -> None:
        adm = self.admission
        if woke:
            adm.clear_wake()
        taken, sizes, closed, cancel = adm.take_pending()
        if closed and self.state is Lifecycle.OPEN:
            self._move(Lifecycle.CLOSING)
        if cancel and self.state is not Lifecycle.CANCELLING:
            self._move(Lifecycle.CANCELLING)
            self.outcomes.cancelled = True
            self._cancel_deadline = now + self.opts.cancel_grace
            self.buffer.flush(now)
        if adm.kill_requested and self._cancel_deadline > now:
            self._cancel_deadline = now  # a second Ctrl-C: the grace is over
        backlog = self._backlog
        if taken:
            backlog.append((taken, sizes))
        cancelling = self.state is Lifecycle.CANCELLING
        while backlog:
            items, sizes = backlog[0]
            if cancelling:
                for b in self.buffer.make_batches(now, items, sizes):
                    self.outcomes.drop(b)
                backlog.popleft()
                continue
            n, dropped = self.buffer.add_many(now, items, sizes)
            for b in dropped:
                self.outcomes.drop(b)
            if n < len(items):
                backlog[0] = (items[n:], sizes[n:] if sizes is not None else None)
                break
            backlog.popleft()
        if closed and not backlog:
            self.buffer.flush(now)

    def _dispatch(self, now: float) -> None:
        buf = self.buffer
        if self.state is Lifecycle.CANCELLING:
            buf.flush(now)
            for b in buf.force_lease_all():
                buf.ack(b)
                self.outcomes.drop(b)
            if self._qps_booked and self._limiter is not None:
                self._qps_booked = False
                self._limiter.refund()  # nothing will be sent with it
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
        send = self.workers.send
        if limiter is None and min_qps is None:
            self._lease_and_send_all(now)
            return booked
        while True:
            slot = pool.pick()
            if slot is None:
                return booked
            synth = False
            if not buf.ready(now):
                if (
                    min_qps is None
                    or self.state is not Lifecycle.OPEN
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
                        self._qps_wait_until = self._now() + delay
                        self._qps_booked = delay <= QPS_BOOK_AHEAD
                        return False
            if synth:
                buf.add_synthetic(now)
            leased = buf.lease_one(now)
            if leased is None:  # pragma: no cover - ready() said otherwise
                raise InternalError("buffer.ready() was true but lease_one() returned None")
            self._last_send = now
            send(slot, leased, now)

    def _lease_and_send_all(self, now: float) -> None:
        """Lease as many batches as the workers have room for, and send each worker its share
        together. Shared as pick() would, one at a time: level by level (every worker holding
        the fewest gets one, then every worker holding one more...), in table order."""
        slots = self.pool.with_room()
        if not slots:
            return
        cap = self.opts.max_batches_per_worker
        held = [len(s.batches) for s in slots]
        room = [s.depth - h for s, h in zip(slots, held, strict=True)]
        if cap is not None:  # a worker is retired once handed ``cap`` batches
            room = [min(r, cap - s.leased) for s, r in zip(slots, room, strict=True)]
        batches = self.buffer.lease_many(now, sum(room))
        if not batches:
            return
        self._last_send = now
        if len(slots) == 1:
            shares = [batches]
        else:
            shares = [[] for _ in slots]
            it = iter(batches)
            left = len(batches)
            level = min(held)
            while left:
                for i, h in enumerate(held):
                    if h <= level < h + room[i]:
                        shares[i].append(next(it))
                        left -= 1
                        if not left:
                            break
                level += 1
        send_many = self.workers.send_many
        for s, share in zip(slots, shares, strict=True):
            if share:
                send_many(s, share, now)

    def _finished(self) -> bool:
        if self.state is Lifecycle.OPEN or self._backlog or self.buffer.total:
            return False
        return not self.pool.busy() and self.admission.nothing_pending()

    def _timeout(self, now: float) -> float | None:
        deadline = math.inf
        buf = self.buffer
        pool = self.pool
        cancelling = self.state is Lifecycle.CANCELLING
        if not cancelling and buf.leased < self.opts.max_leases and pool.pick() is not None:
            if now < self._qps_wait_until:
                deadline = self._qps_wait_until
            else:
                t = buf.next_send_time()
                if t is not None:
                    deadline = t
                min_qps = self.opts.min_qps
                if min_qps is not None and self.state is Lifecycle.OPEN and buf.total == 0:
                    deadline = min(deadline, self._last_send + 1.0 / min_qps)
        for s in pool.slots:
            if s.batches or s.state is STARTING:  # send_timeout, or start_timeout
                deadline = min(deadline, s.deadline)
        if self._qps_booked:
            # A booked token is good at its instant only: the loop wakes then to use it or
            # give it back, even with no worker free now (used later, next to a fresh token,
            # it could make a burst the limiter never allowed).
            deadline = min(deadline, self._qps_wait_until)
        if cancelling:
            deadline = min(deadline, self._cancel_deadline)
        if self.workers.to_respawn:
            deadline = min(deadline, self.workers.respawn_at)
        dt = self.opts.delivery_timeout
        if dt is not None and not cancelling:
            expiry = buf.next_expiry(dt)
            if expiry is not None:
                deadline = min(deadline, expiry)
        if deadline == math.inf:
            return None
        return max(0.0, deadline - now)

    # ---- the end ------------------------------------------------------------------------

    def _move(self, to: Lifecycle) -> None:
        self.state = moved(self.state, to)

    def _shutdown(self) -> None:
        """End the channel: every step runs even if an earlier one raised, and the drain is
        signalled last whatever happens, so that no waiter can hang on a failed step."""
        try:
            shutdown_steps(
                self.admission,
                self.pool,
                self.backend,
                self._limiter if self._owns_limiter else None,
                self.ledger,
                self.outcomes,
                self._final_report,
                lambda: drop_everything_left(
                    self._now(),
                    self.admission,
                    self._backlog,
                    self.buffer,
                    self.pool,
                    self.ledger,
                    self.outcomes,
                ),
            )
        finally:
            self._move(Lifecycle.ENDED)
            self.admission.finished()
            _process_end.unregister(self)


def _bounded(timeout: float | None) -> float | None:
    """The loop's wait, clamped to ``MAX_WAIT``: deadlines may lie at any finite distance (a
    send_timeout of a month, a retry delay of 1e300 s), but the waits under the selector take
    at most about 24 days (epoll counts int milliseconds) or what fits a ``time_t``; past the
    clamp the loop wakes, finds nothing due and waits again. Anything not a number <=
    ``MAX_WAIT`` (a NaN, too) waits ``MAX_WAIT``."""
    if timeout is None:
        return None
    if timeout <= MAX_WAIT:
        return max(0.0, timeout)
    return MAX_WAIT
