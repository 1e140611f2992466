"""A fake clock and fake workers, to drive the coordinator's decisions at literal times.

:class:`World` is the coordinator's clock: it stands still while the coordinator works, and when
the coordinator waits with nothing ready it jumps to the earlier of the wait's deadline and the
next scheduled event (a worker answering, the test calling close() at t=5...), runs what is due,
and returns. The coordinator's own loop (:meth:`Coordinator._run`) runs in the test's thread to
the end, so a test with ten-second timeouts takes milliseconds, and every time it checks is
exact.

:class:`FakeBackend` makes workers that follow a *plan* per lease -- answer Done after d
seconds, fail with an exception after d seconds, or hang -- and record every lease they are
handed, with the time. Their wake-ups are real pipes, so the coordinator's selector sees them.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from procdispatch import _protocol as proto
from procdispatch._admission import Admission
from procdispatch._coordinator import Coordinator
from procdispatch._options import Options
from procdispatch.backends import Backend, WorkerHandle
from procdispatch.buffer import Batch


class WouldWaitForever(AssertionError):
    """The coordinator asked to wait with no deadline and nothing scheduled: a hang."""


class World:
    """The fake clock (see the module docstring)."""

    def __init__(self) -> None:
        self.t = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.waits: list[tuple[float, float | None]] = []  # (when, timeout) of every wait

    def now(self) -> float:
        return self.t

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def after(self, d: float, fn: Callable[[], None]) -> None:
        self.at(self.t + d, fn)

    def _run_due(self) -> None:
        while self._events and self._events[0][0] <= self.t:
            _, _, fn = heapq.heappop(self._events)
            fn()

    def wait(self, select: Callable[[float | None], Any], timeout: float | None) -> Any:
        self.waits.append((self.t, timeout))
        self._run_due()
        woke, ready = select(0)
        if woke or ready:
            return woke, ready
        deadline = math.inf if timeout is None else self.t + timeout
        nxt = min(deadline, self._events[0][0] if self._events else math.inf)
        if nxt == math.inf:
            raise WouldWaitForever(f"at t={self.t}: no deadline and nothing scheduled")
        self.t = max(self.t, nxt)
        self._run_due()
        return select(0)


@dataclass
class Plan:
    """What a fake worker does with one lease."""

    kind: str = "done"  # "done", "fail" or "hang"
    after: float = 0.0
    error: BaseException | None = None
    keep: list[int] | None = None  # for "fail": the indices of the items it did not deliver
    answer_as: tuple[int, int] | None = (
        None  # the (batch id, attempt) it answers for, if not its own
    )


Behaviour = Callable[[Batch[Any], "FakeWorker"], Plan]


@dataclass
class Sent:
    t: float
    wid: int
    batch_id: int
    attempt: int
    data: list[Any]
    synthetic: bool


@dataclass
class Record:
    sent: list[Sent] = field(default_factory=list)
    starts: list[tuple[float, int]] = field(default_factory=list)
    kills: list[tuple[float, int]] = field(default_factory=list)
    stops: list[tuple[float, int]] = field(default_factory=list)


class FakeWorker(WorkerHandle):
    def __init__(self, world: World, rec: Record, wid: int, behaviour: Behaviour, ready: float):
        self.world, self.rec, self.wid, self.behaviour = world, rec, wid, behaviour
        self.pid = 10_000 + wid
        self._r, self._w = os.pipe()
        self._gone_r, self._gone_w = os.pipe()
        os.set_blocking(self._r, False)
        self._out: list[proto.WorkerMessage] = []
        self._queue: list[Batch[Any]] = []  # leases handed and not answered, oldest first
        self._busy = False
        self._dead = False
        self._unsent = 0
        self._stopping = False
        self.code: int | None = None
        if ready != math.inf:
            world.after(ready, lambda: self._post(proto.Ready(self.pid)))

    def _post(self, msg: proto.WorkerMessage) -> None:
        if not self._dead:
            self._out.append(msg)
            os.write(self._w, b"\0")

    def _start_next(self) -> None:
        if self._busy or self._dead:
            return
        if not self._queue:
            if self._stopping:
                self._die(0)
            return
        b = self._queue[0]
        plan = self.behaviour(b, self)
        self._busy = True
        if plan.kind == "hang":
            return

        def answer() -> None:
            if self._dead:
                return
            self._queue.pop(0)
            self._busy = False
            bid, attempt = plan.answer_as or (b.id, b.attempt)
            if plan.kind == "done":
                self._post(proto.Done(bid, attempt, plan.after))
            else:
                assert plan.error is not None
                self._post(proto.Failed(bid, attempt, plan.error, plan.keep, None, False, None))
            self._start_next()

        self.world.after(plan.after, answer)

    def _die(self, code: int) -> None:
        if not self._dead:
            self._dead = True
            self.code = code
            os.write(self._gone_w, b"\0")

    # ---- WorkerHandle ----

    def send_lease(self, batch: Batch[Any]) -> bool:
        if self._dead:
            self._unsent += 1  # as a process worker's handle: the lease never reached it
            raise BrokenPipeError("fake worker is gone")
        self.rec.sent.append(
            Sent(self.world.t, self.wid, batch.id, batch.attempt, list(batch.data), batch.synthetic)
        )
        self._queue.append(batch)
        self._start_next()
        return False

    def send_leases(self, batches: Sequence[Batch[Any]]) -> tuple[int, bool, Exception | None]:
        """As a process worker's handle: the leases encoded up to the first that cannot be,
        then handed together (a gone worker: all of them count as unsent)."""
        n, err = 0, None
        for b in batches:
            try:
                proto.encode_lease(b)
            except proto.UnsendableItems as exc:
                err = exc
                break
            n += 1
        if n and self._dead:
            self._unsent += len(batches)
            raise BrokenPipeError("fake worker is gone")
        for b in batches[:n]:
            self.send_lease(b)
        return n, False, err

    def unsent(self) -> int:
        return self._unsent

    def die_unnoticed(self) -> None:
        """Answer the running lease and die at once, neither answer nor death yet signalled
        (the coordinator finds out when it next writes to this worker)."""
        b = self._queue.pop(0)
        self._out.append(proto.Done(b.id, b.attempt, 0.0))
        self._dead, self.code = True, -9

    def waitables(self) -> tuple[Any, Any]:
        return self._r, self._gone_r

    def receive(self) -> tuple[list[proto.WorkerMessage], bool]:
        with contextlib.suppress(BlockingIOError):  # drain() reads it even when empty
            os.read(self._r, 4096)
        out, self._out = self._out, []
        return out, False

    def drain(self) -> list[proto.WorkerMessage]:
        return self.receive()[0]

    def exitcode(self, wait: float) -> int | None:
        return self.code

    def kill(self) -> None:
        self.rec.kills.append((self.world.t, self.wid))
        self._die(-9)

    def stop(self) -> bool:
        self.rec.stops.append((self.world.t, self.wid))
        self._stopping = True
        self._start_next()
        return False

    def close(self) -> None:
        for fd in (self._r, self._w, self._gone_r, self._gone_w):
            os.close(fd)


class FakeBackend(Backend):
    name = "fake"

    def __init__(
        self,
        world: World,
        behaviour: Behaviour,
        ready: float = 0.0,
        staggered: bool = False,
        together: bool = False,
    ) -> None:
        super().__init__()
        self.world, self.behaviour, self.ready = world, behaviour, ready
        self.staggered_start = staggered  # workers that cost a core to start, like processes
        self.together = together  # workers handed several leases at once, like processes
        self.rec = Record()
        self.workers: dict[int, FakeWorker] = {}

    def prepare(self, send_fn: Any, options: Any) -> None:
        pass

    def start_worker(self, wid: int) -> WorkerHandle:
        self.rec.starts.append((self.world.t, wid))
        self.workers[wid] = FakeWorker(self.world, self.rec, wid, self.behaviour, self.ready)
        self.workers[wid].sends_together = self.together
        return self.workers[wid]


def always(plan: Plan) -> Behaviour:
    return lambda b, w: plan


class FakeLimiter:
    """A GCRA limiter on the world's clock (the coordinator calls reserve and refund)."""

    def __init__(self, world: World, rate: float, burst: int = 1) -> None:
        self.world, self.T, self.burst = world, 1.0 / rate, burst
        self.tat = 0.0
        self.admitted: list[float] = []  # booked admission times
        self.refunds: list[float] = []
        self._last: list[tuple[float, float]] = []  # (booked time, tat before) per reserve

    def reserve(self, weight: int = 1, *, within: float = 0.0) -> float:
        now = self.world.t
        at = max(self.tat, now) - (self.burst - 1) * self.T
        wait = max(0.0, at - now)
        if wait > within:
            return wait
        self._last.append((now + wait, self.tat))
        self.tat = max(self.tat, now) + self.T
        self.admitted.append(now + wait)
        return wait

    def refund(self, weight: int = 1) -> None:
        t, tat = self._last.pop()
        self.tat = tat
        self.admitted.remove(t)
        self.refunds.append(self.world.t)

    def close(self) -> None:
        pass


@dataclass
class Scene:
    """What a scripted event can act on."""

    adm: Admission
    backend: FakeBackend


@dataclass
class Run:
    world: World
    rec: Record
    stats: Any
    drops: list[tuple[float, int, int, list[Any], BaseException | None]]
    errors: list[tuple[float, int, int, BaseException]]


def run(
    behaviour: Behaviour,
    items: Iterable[Any] = (),
    *,
    close_at: float | None = 0.0,
    script: Iterable[tuple[float, Callable[[Scene], None]]] = (),
    limiter: Callable[[World], Any] | None = None,
    ready: float = 0.0,
    staggered: bool = False,
    together: bool = False,
    on_error: Callable[[Batch[Any], BaseException], bool] | None = None,
    **options: Any,
) -> Run:
    """Run a coordinator to the end on the fake world; return what happened."""
    world = World()
    backend = FakeBackend(world, behaviour, ready, staggered, together)
    drops: list[tuple[float, int, int, list[Any], BaseException | None]] = []
    errors: list[tuple[float, int, int, BaseException]] = []

    def record_error(b: Batch[Any], e: BaseException) -> bool:
        errors.append((world.t, b.id, b.attempt, e))
        if on_error is not None:
            return on_error(b, e)
        from procdispatch import default_on_error

        return default_on_error(b, e)

    def record_drop(b: Batch[Any] | None, flush: bool) -> None:
        pass  # each drop is recorded with its reason below, where the coordinator makes it

    options.setdefault("workers", 1)
    opts = Options(backend=backend, on_error=record_error, on_drop=record_drop, **options).resolve()
    adm = Admission(opts.buffer.full_behavior)
    backend.open(None, opts)  # type: ignore[arg-type]
    lim = limiter(world) if limiter is not None else None
    coord = Coordinator(opts, adm, backend, lim, clock=world)
    drop = coord.outcomes.drop

    def recording_drop(b: Batch[Any], error: BaseException | None = None) -> None:
        drops.append((world.t, b.id, b.attempt, list(b.data), error))
        drop(b, error)

    coord.outcomes.drop = recording_drop  # type: ignore[method-assign]
    items = list(items)
    if items:
        adm.admit(items, None, block=False, deadline=None)
    if close_at is not None:
        world.at(close_at, adm.request_close)
    scene = Scene(adm, backend)
    for t, fn in script:
        world.at(t, lambda fn=fn: fn(scene))
    coord._run()
    if adm.fatal is not None:
        raise adm.fatal
    return Run(world, backend.rec, adm.snapshot(), drops, errors)


def sends(r: Run) -> list[tuple[float, int, int, list[Any]]]:
    """(time, worker, attempt, items) of each lease handed out, synthetic ones left out."""
    return [(s.t, s.wid, s.attempt, s.data) for s in r.rec.sent if not s.synthetic]


def run_death_found_on_a_write(put: list[Any], **options: Any) -> Run:
    """Worker 1 is handed "a" and hangs on it; at t=1 it answers "a" and dies in the same
    instant, neither yet signalled, as ``put`` is admitted (which wakes the coordinator): the
    coordinator finds the death when it writes ``put`` to it. Later workers answer in 0.5 s."""

    def first_worker_hangs(b: Batch[Any], w: FakeWorker) -> Plan:
        return Plan("hang") if w.wid == 1 else Plan("done", 0.5)

    def answer_and_die_then_put(c: Scene) -> None:
        c.backend.workers[1].die_unnoticed()
        c.adm.admit(put, None, block=False, deadline=None)

    return run(
        first_worker_hangs,
        ["a"],
        close_at=2.0,
        script=[(1.0, answer_and_die_then_put)],
        workers=1,
        batch_items_max=1,
        **options,
    )
