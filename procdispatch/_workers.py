"""Workers: the worker side of the coordinator's loop.

A collaborator of the coordinator, run only on its thread. It starts workers (through the
backend), hands them leases, reads what they say, and turns what happens to a worker into
outcomes for the batches it held (:class:`~._outcomes.Outcomes`):

* a worker that dies fails only the batch it was running (``WorkerCrashed``, or ``SendTimeout``
  when it was killed for overrunning), puts back the batches it never started (those queued
  behind the running one, and any lease not yet wholly written to its pipe), and is replaced;
* before a worker is killed for a deadline (``send_timeout``, the end of ``cancel_grace``,
  ``start_timeout``) what it already answered is read, and read again once it is dead: a batch
  whose answer was in the pipe is not failed;
* workers are started, and replaced, as :mod:`._worker_starts` says (at most
  ``START_LIMIT`` starting at once; too many failed starts in a row fail the channel);
* a worker that reached ``max_batches_per_worker`` (counted in leases handed to it, so that
  pipelining cannot take it past the limit) or is above ``max_worker_memory`` gets no new lease
  (STOPPING), and is stopped and replaced once it answered what it holds.

Nothing here blocks but the waits for a killed worker's end (at most ``KILL_WAIT``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from . import _protocol as proto
from ._admission import Admission
from ._clock import Clock
from ._handover import Ledger
from ._options import QUICK_SEND, ChannelOptions
from ._outcomes import Outcomes
from ._pool import BUSY, DEAD, IDLE, STARTING, STOPPING, Slot, WorkerPool
from ._starting import StartingHandle
from ._worker_logging import handle_record
from ._worker_starts import WorkerStarts
from .backends import Backend, LeasesHeld
from .buffer import Batch
from .errors import ProcDispatchError, SendTimeout, WorkerCrashed

__all__ = ["KILL_WAIT", "Workers"]

log = logging.getLogger("procdispatch")

#: Seconds to wait for a killed worker to be gone before reading the last of its pipe.
KILL_WAIT = 1.0


class Workers(WorkerStarts):
    """The worker side of the loop; see the module docstring."""

    def __init__(
        self,
        opts: ChannelOptions,
        backend: Backend,
        pool: WorkerPool,
        outcomes: Outcomes,
        ledger: Ledger,
        admission: Admission,
        clock: Clock,
    ) -> None:
        super().__init__(opts, backend, pool, outcomes, ledger, admission, clock)
        self.recycling = opts.max_batches_per_worker is not None or (
            opts.max_worker_memory is not None
        )
        #: Whether a worker may hold more than one batch depends on its sends (see _pool).
        self._adaptive = opts.adaptive_depth
        self._depth = pool.depth

    # ---- sending ----------------------------------------------------------------------

    def send(self, slot: Slot, b: Batch[Any], now: float) -> None:
        """Hand a leased batch to a worker that has room for it. A batch that cannot be
        encoded changes nothing here (the handle raises before writing anything); what is left
        of it once the items that cannot go were split off is tried again."""
        while True:
            try:
                waits = slot.handle.send_lease(b)
                break
            except proto.UnsendableItems as err:
                if not self.outcomes.unsendable(b, err, now):
                    return  # nothing of it can go; already reported
            except OSError:
                # The worker is gone; the handle counts this lease as never written, so its
                # death puts it back in the queue with the others it held. What it answered
                # before it died is read first (as when its sentinel shows the death): a
                # worker holding queued leases answered some of them, and its death must be
                # charged to the batch it was sending, not to the oldest one it was handed.
                self._hand_over(slot, [b], now)
                self.handle(slot, True, now)
                return
        self._hand_over(slot, [b], now)
        if waits:
            self.pool.watch_writes(slot)  # the rest goes out when the pipe has room

    def send_many(self, slot: Slot, batches: list[Batch[Any]], now: float) -> None:
        """Hand several leased batches to a worker with room for all of them, together when
        its handle can (one write for all). Those it can no longer take (it died, or was
        retired, on the way) go back to the queue unsent."""
        handle = slot.handle
        if not handle.sends_together:
            for i, b in enumerate(batches):
                if slot.state is not IDLE and slot.state is not BUSY:
                    self._give_back(batches[i:])
                    return
                self.send(slot, b, now)
            return
        todo = batches
        while todo:
            try:
                n, waits, err = handle.send_leases(todo)
            except OSError:
                # Gone: the handle counts all of them unsent; its death (its answers read
                # first, see send) puts them back in the queue.
                self._hand_over(slot, todo, now)
                self.handle(slot, True, now)
                return
            if n:
                self._hand_over(slot, todo[:n] if n < len(todo) else todo, now)
            if waits:
                self.pool.watch_writes(slot)
            if err is None:
                return
            if isinstance(err, LeasesHeld):
                self._give_back(todo[n:])  # leased again once the worker answers
                return
            assert isinstance(err, proto.UnsendableItems)
            b = todo[n]
            rest = todo[n:] if self.outcomes.unsendable(b, err, now) else todo[n + 1 :]
            if rest and slot.state is not IDLE and slot.state is not BUSY:
                self._give_back(rest)  # retired when it took the batches before
                return
            todo = rest

    def _give_back(self, batches: list[Batch[Any]]) -> None:
        for b in batches:
            self.outcomes.buffer.release(b)

    def _hand_over(self, slot: Slot, batches: list[Batch[Any]], now: float) -> None:
        if not slot.batches:
            slot.move(BUSY)
            st = self.opts.send_timeout
            slot.deadline = now + st if st is not None else math.inf
        slot.batches.extend(batches)
        n = len(batches)
        led = self.ledger
        led.batches_sent += n
        led.d_in_flight += sum([b._count for b in batches if not b.synthetic])  # Ledger.book
        slot.leased += n
        cap = self.opts.max_batches_per_worker
        if cap is not None and slot.leased >= cap:  # it gets no more: count what it was handed
            self._retire(slot, f"it was handed {slot.leased} batches")

    # ---- what workers say -------------------------------------------------------------

    def handle(self, slot: Slot, sentinel: bool, now: float) -> None:
        msgs, gone = self.pool.read(slot, sentinel)
        # Bound once: a turn reads several answers of each worker holding quick sends.
        done, adaptive, depth = proto.Done, self._adaptive, self._depth
        answered, delivered = self._answered, self.outcomes.delivered
        for m in msgs:
            if slot.state is DEAD:
                return
            if type(m) is done:  # by far the most common: handled here
                if adaptive:
                    seconds = m.seconds
                    slot.depth = (
                        depth if seconds * depth < QUICK_SEND else self._depth_after(seconds)
                    )
                    slot.depth = min(slot.depth, slot.handle.lease_cap)
                b = answered(slot, m, now)
                if b is not None:
                    delivered(b)
            else:
                self._on_message(slot, m, now)
        if gone and slot.state is not DEAD:
            self._on_death(slot, now)
        elif self.recycling and slot.state is not DEAD:
            self.maybe_recycle(slot)  # the limits hold under pipelining too

    def _on_message(self, slot: Slot, msg: proto.WorkerMessage, now: float) -> None:
        """Any message but a Done (see :meth:`handle`)."""
        if isinstance(msg, proto.Failed):
            if self._adaptive:
                slot.depth = 1
            b = self._answered(slot, msg, now)
            if b is not None:
                self.outcomes.failed(b, msg, now)
        elif isinstance(msg, proto.Done):
            b = self._answered(slot, msg, now)
            if b is not None:
                self.outcomes.delivered(b)
        elif isinstance(msg, proto.Log):
            handle_record(msg.attrs)  # the user's handlers run here, on the coordinator thread
            return
        elif isinstance(msg, proto.Ready):
            if slot.state is STARTING:
                slot.move(IDLE)
            self._start_failures = 0
            self.ledger.alive = self.backend.workers_alive(self.pool.alive())
            return
        else:
            slot.init_error = msg.error  # InitFailed: reported when the worker's death is seen

    def _answered(self, slot: Slot, m: proto.Done | proto.Failed, now: float) -> Batch[Any] | None:
        """The batch a worker answered for, taken off the slot (the oldest it holds); None
        when the answer is for a batch it is not sending (the worker is killed for it)."""
        batches = slot.batches
        b = batches[0] if batches else None
        if b is None or b.id != m.batch_id or b.attempt != m.attempt:
            self._confused(slot, m, b, now)
            return None
        batches.popleft()
        slot.done += 1
        if batches:  # the next one starts running now
            st = self.opts.send_timeout
            slot.deadline = now + st if st is not None else math.inf
        else:
            slot.deadline = math.inf
            if slot.state is BUSY:
                slot.move(IDLE)
        return b

    def _depth_after(self, seconds: float) -> int:
        """How many batches a worker may hold after a send of ``seconds``: the running one,
        and as many more as that time fits into QUICK_SEND (never more than the pool's depth;
        one for NaN, an unmeasured send's infinity, or a send of QUICK_SEND or more)."""
        depth = self._depth
        if seconds * depth < QUICK_SEND:
            return depth
        if seconds < QUICK_SEND:
            return min(depth, 1 + int(QUICK_SEND / seconds))
        return 1

    def _confused(
        self, slot: Slot, m: proto.Done | proto.Failed, head: Batch[Any] | None, now: float
    ) -> None:
        """A worker answered for a batch it is not sending (a process that ``send_fn`` forked
        and that went on in the worker's code, or a backend's fault): nothing it says can be
        trusted any more. It is killed, and its batches go as in a crash: the one it was
        sending fails (a worker fault, retried as one), the others go back to the queue."""
        said = "succeeded" if isinstance(m, proto.Done) else "failed"
        holds = "no batch" if head is None else f"batch {head.id} (attempt {head.attempt}) first"
        why = (
            f"it answered that batch {m.batch_id} (attempt {m.attempt}) {said}, but it holds "
            f"{holds}; a process forked by send_fn that did not end with os._exit may "
            "have answered in its place"
        )
        log.error("killing worker %d (pid %s): %s", slot.wid, slot.handle.pid, why)
        self.pool.kill(slot, "answer")
        slot.kill_why = why
        self._on_death(slot, now)

    def _on_death(self, slot: Slot, now: float) -> None:
        start = slot.handle
        if isinstance(start, StartingHandle) and start.error is not None:
            # Its start raised on a starter thread: no worker existed to die and be replaced.
            self.pool.bury(slot)
            self.ledger.alive = self.backend.workers_alive(self.pool.alive())
            self._spawn_failed(start.error)
            return
        was = slot.state
        unsent = slot.handle.unsent()  # leases not wholly in its pipe: it never read them
        code = self.pool.bury(slot)
        self.ledger.alive = self.backend.workers_alive(self.pool.alive())
        batches = list(slot.batches)
        slot.batches.clear()
        if was is STARTING:
            self._start_failed(slot, slot.init_error or WorkerCrashed(slot.handle.pid, code))
        reason = slot.kill_reason
        # The oldest ones it holds, but the unsent, may have been sent: only the head, if the
        # worker could read all of it, unless it runs ahead (see WorkerHandle.runs_ahead).
        started = len(batches) - unsent
        if not slot.handle.runs_ahead:
            started = min(started, 1)
        outcomes = self.outcomes
        for i, b in enumerate(batches):
            if reason == "cancel" and (i == 0 or i < started):
                outcomes.ended_by_cancel(b)
            elif i >= started or (reason == "timeout" and b is not slot.victim):
                # Never started, or (its predecessor answered just before the kill) killed
                # for another batch's overrun: back in the queue, no attempt used.
                if i >= started:
                    self.ledger.batches_sent -= 1  # send_fn never saw it: no send to count
                outcomes.released(b)
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
                        where=slot.handle.where,
                        killed=slot.handle.killable,
                    )
                else:
                    exc = WorkerCrashed(
                        slot.handle.pid,
                        code,
                        worker=slot.wid,
                        batch_id=b.id,
                        attempt=b.attempt,
                        where=slot.handle.where,
                        why=slot.kill_why,
                    )
                outcomes.crashed(b, exc, now)
        if not slot.replaced:
            self._replace()

    # ---- recycling --------------------------------------------------------------------

    def _retire(self, slot: Slot, reason: str) -> None:
        """Give a worker no new lease; it is replaced once it answered what it holds."""
        log.info("recycling worker %d (pid %s): %s", slot.wid, slot.handle.pid, reason)
        slot.move(STOPPING)

    def maybe_recycle(self, slot: Slot) -> None:
        """Retire a worker above max_worker_memory (read once per finished batch); stop and
        replace a retired worker that holds nothing any more. max_batches_per_worker retires a
        worker when it is handed its last lease (see :meth:`send`), so that pipelining cannot
        take it past the limit."""
        if slot.replaced or slot.state is DEAD:
            return
        if slot.state is not STOPPING:
            limit = self.opts.max_worker_memory
            if limit is None or slot.done == slot.checked or self.outcomes.cancelled:
                return
            slot.checked = slot.done
            rss = slot.handle.rss()
            if rss is None or rss <= limit:
                return
            self._retire(slot, f"its memory ({rss} bytes) is above max_worker_memory")
        if slot.batches:
            return
        slot.replaced = True
        self.pool.stop(slot)
        self._replace()

    # ---- deadlines --------------------------------------------------------------------

    def check_deadlines(self, now: float, cancel_due: bool) -> None:
        """Kill the workers past a deadline: start_timeout, send_timeout, the end of
        cancel_grace (``cancel_due``). What a worker already answered is read first, and again
        once it is dead: an answer in the pipe is not an overrun."""
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
            self.handle(s, False, now)
            if s.state is DEAD or not s.batches:
                continue
            if reason == "timeout" and s.deadline > now:  # the overdue one had answered
                if not cancel_due:
                    continue
                reason = "cancel"
            self.pool.kill(s, reason, s.batches[0])
            s.handle.exitcode(KILL_WAIT)  # once it is dead, its pipe holds all it said
            self.handle(s, True, now)

    def _start_overdue(self, slot: Slot, now: float) -> None:
        """A worker not ready within start_timeout is killed (or abandoned, when it cannot be
        killed) and its start counts as failed."""
        self.handle(slot, False, now)  # its Ready may be waiting in the pipe
        if slot.state is not STARTING:
            return
        if isinstance(slot.handle, StartingHandle):
            slot.init_error = TimeoutError(
                f"worker {slot.wid} (no pid: its start had not returned) did not become ready "
                f"within start_timeout={self.opts.start_timeout}s; the start was given up"
            )
        elif slot.init_error is None:
            how = "killed" if slot.handle.killable else "abandoned"
            slot.init_error = TimeoutError(
                f"worker {slot.wid} (pid {slot.handle.pid}) did not become ready within "
                f"start_timeout={self.opts.start_timeout}s; it was {how}"
            )
        self.pool.kill(slot, "start")
        self._on_death(slot, now)

    def after_fork_in_child(self) -> None:
        for slot in self.pool.slots:
            slot.handle.disown()
