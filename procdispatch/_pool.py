"""The worker table: worker slots, their states, and the one selector the coordinator waits on.

Each slot wraps one :class:`~procdispatch.backends.WorkerHandle` (whatever the backend) and the
batches handed to it, oldest first: the head is the one running, the rest wait in the worker's
pipe (pipelining, when ``max_leases`` exceeds ``workers``). With ``max_leases`` left out, each
slot's own ``depth`` follows its sends: as many batches as its last send's time fits into
:data:`~._options.QUICK_SEND` (one once a send took that long, and one for a worker not yet seen
to answer, such as one just started), up to ``max_leases / workers``. That hides the round trip
between an answer and the next lease, most of the cost of a quick send, while a batch never
waits behind a slow one when another worker could take it. The pool starts (through the
backend), watches, kills and buries workers, and reports what happened; what that *means* for
batches (retry, drop) is decided by :mod:`._workers` and :mod:`._outcomes`. Only the
coordinator thread calls into the pool.

Starting a worker that costs a core while it starts (a process: an interpreter, the user's
imports, ``worker_init``) competes for the cores with the workers already serving. So for such a
backend (``staggered_start``) at most :data:`START_LIMIT` workers start at once: a slot is STARTING
from its start's beginning until its Ready (or its death), and the slots spawned beyond the limit
wait, in order, in a :class:`~._starting.QueuedStart` with no process and no deadline, until a
start in flight ends (:meth:`WorkerPool.begin_waiting`). A worker that is ready takes leases
while its siblings start; the channel's end abandons the waiting starts, which hold nothing.

The selector is the coordinator's one wait point. It watches the wake pipe, every worker's result
pipe and death sentinel, and -- only while a handle has frames waiting for room -- that worker's
lease pipe for writability: :meth:`WorkerPool.wait` flushes those itself and reports only what
the coordinator must act on. For a backend whose start may block, it also watches the pipe of
the starter threads (:mod:`._starting`): a worker whose start returned is put in its slot there
and then, and one whose start raised is reported as gone.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import math
import os
import selectors
import time
from typing import Any

from . import _protocol as proto
from ._options import ChannelOptions
from ._starting import QueuedStart, Starts
from .backends import Backend, WorkerHandle
from .buffer import Batch
from .errors import InternalError

__all__ = ["START_LIMIT", "Slot", "WState", "WorkerPool"]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: Workers of a ``staggered_start`` backend that start at once at most (see the module
#: docstring): about one per core, the cores their start-up competes for.
START_LIMIT = max(2, _cores())

#: Marks a selector key that watches a lease pipe for room (the others carry a sentinel flag).
_WRITABLE = None
#: The data of the selector key of the starter threads' pipe.
_STARTS = ("starts",)


class WState(enum.Enum):
    STARTING = "starting"  # started, waiting for its Ready (worker_init runs)
    IDLE = "idle"  # ready, holds no batch
    BUSY = "busy"  # holds one or more batches
    STOPPING = "stopping"  # asked to exit once idle (recycling); takes no batch
    DEAD = "dead"


# The members as module constants, which the package uses instead of `WState.X`: on Python 3.11
# the Enum metaclass defines __getattr__, so every `WState.IDLE` goes through a Python-level
# attribute hook (about 1,000 instructions), and states are tested and moved on every batch.
STARTING, IDLE, BUSY, STOPPING, DEAD = (
    WState.STARTING,
    WState.IDLE,
    WState.BUSY,
    WState.STOPPING,
    WState.DEAD,
)

# The allowed transitions, in one table. Keyed by name and held in tuples: an Enum member's
# hash is computed in Python, and this check runs twice per batch; `in` on a tuple compares
# identity first.
_ALLOWED: dict[str, tuple[WState, ...]] = {
    "STARTING": (IDLE, STOPPING, DEAD),
    "IDLE": (BUSY, STOPPING, DEAD),
    "BUSY": (IDLE, STOPPING, DEAD),
    "STOPPING": (DEAD,),
    "DEAD": (),
}


class Slot:
    """One worker in the table and the batches it holds (oldest, i.e. running, first)."""

    __slots__ = (
        "batches",
        "checked",
        "deadline",
        "depth",
        "done",
        "handle",
        "init_error",
        "kill_reason",
        "kill_why",
        "leased",
        "replaced",
        "state",
        "victim",
        "wid",
        "writing",
    )

    def __init__(self, wid: int, handle: WorkerHandle, depth: int = 1) -> None:
        self.wid = wid
        self.handle = handle
        self.state = STARTING
        self.batches: collections.deque[Batch[Any]] = collections.deque()
        #: While STARTING: when start_timeout runs out. Then: the send_timeout deadline of the
        #: running (head) batch.
        self.deadline = math.inf
        self.done = 0
        self.leased = 0  # leases handed to it, finished or not (max_batches_per_worker)
        self.checked = 0  # `done` when its memory was last read (max_worker_memory)
        self.replaced = False  # asked to stop, with a replacement started
        self.writing = False  # its lease pipe is watched for room
        #: The most batches it may hold now: the pool's depth with an explicit ``max_leases``,
        #: else what its last send's time allows (see the module docstring).
        self.depth = depth
        self.init_error: BaseException | None = None
        #: "timeout", "cancel", "start" or "answer" when we killed it; ``victim`` is the batch
        #: it was killed over (for "timeout"); ``kill_why`` what it answered (for "answer").
        self.kill_reason: str | None = None
        self.kill_why: str | None = None
        self.victim: Batch[Any] | None = None

    def move(self, to: WState) -> None:
        if to not in _ALLOWED[self.state._name_]:
            raise InternalError(
                f"worker {self.wid}: no transition {self.state.value} -> {to.value}"
            )
        self.state = to


class WorkerPool:
    """The worker table and the selector; see the module docstring."""

    def __init__(self, opts: ChannelOptions, backend: Backend, wake_fd: int) -> None:
        self.opts = opts
        self._backend = backend
        self.slots: list[Slot] = []
        self._next_wid = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(wake_fd, selectors.EVENT_READ, None)
        #: Starter threads, for a backend whose start may block (None: starts return at once).
        self._starts = Starts() if backend.start_blocks else None
        if self._starts is not None:
            self._selector.register(self._starts.fileno(), selectors.EVENT_READ, _STARTS)
        #: batches one worker may hold at once: the first runs, the others wait in its pipe.
        self.depth = max(1, -(-opts.max_leases // opts.workers))
        #: what a new worker may hold: ``depth``, or one until its sends were seen
        self._depth_at_start = 1 if opts.adaptive_depth else self.depth
        #: Starts in flight at once at most (None: no limit), and the slots waiting their turn.
        self._start_limit = START_LIMIT if backend.staggered_start else None
        self.waiting: collections.deque[Slot] = collections.deque()

    # ---- starting and watching ------------------------------------------------------------

    def spawn(self, now: float) -> Slot:
        """Start one worker (raises what starting it raised), or queue its start behind those
        waiting while START_LIMIT starts are in flight; see :meth:`_begin`."""
        self._next_wid += 1
        slot = Slot(self._next_wid, QueuedStart(), self._depth_at_start)
        if self.waiting or self._room() <= 0:
            self.waiting.append(slot)
        else:
            self._begin(slot, now)
        self.slots.append(slot)
        return slot

    def begin_waiting(self, now: float) -> list[BaseException]:
        """Begin the waiting starts, oldest first, while fewer than START_LIMIT are in flight;
        what each start that could not begin raised (its slot is forgotten)."""
        errors: list[BaseException] = []
        if not self.waiting:
            return errors
        room = self._room()
        while room > 0 and self.waiting:
            slot = self.waiting.popleft()
            try:
                self._begin(slot, now)
            except Exception as exc:
                slot.move(DEAD)
                self.slots.remove(slot)
                errors.append(exc)
                continue
            room -= 1
        return errors

    def _room(self) -> int:
        """How many more starts may begin now."""
        if self._start_limit is None:
            return 1
        starting = sum(1 for s in self.slots if s.state is STARTING)
        return self._start_limit - (starting - len(self.waiting))

    def _begin(self, slot: Slot, now: float) -> None:
        """Begin a slot's start; start_timeout runs from now. A start that may block runs on a
        starter thread: the slot holds a StartingHandle until :meth:`wait` learns that it
        returned."""
        if self._starts is not None:
            slot.handle = self._starts.begin(slot.wid, self._backend)
        else:
            slot.handle = self._backend.start_worker(slot.wid)
            self._watch(slot)
        slot.deadline = now + self.opts.start_timeout

    def _watch(self, slot: Slot) -> None:
        conn, sentinel = slot.handle.waitables()
        self._selector.register(conn, selectors.EVENT_READ, (slot, False))
        if sentinel is not None:
            self._selector.register(sentinel, selectors.EVENT_READ, (slot, True))

    def _started(self) -> list[tuple[Slot, bool]]:
        """Put the workers whose start returned in their slots; the slots of those whose start
        raised, to report as gone (their StartingHandle holds the error)."""
        assert self._starts is not None
        gone: list[tuple[Slot, bool]] = []
        for starting in self._starts.collect():
            slot = next((s for s in self.slots if s.handle is starting), None)
            if slot is None:  # given up (and buried) before its start was seen
                starting.close()
                continue
            handle = starting.take()
            if handle is None:
                gone.append((slot, True))
                continue
            slot.handle = handle
            self._watch(slot)
        return gone

    def wait(self, timeout: float | None) -> tuple[bool, list[tuple[Slot, bool]]]:
        """Block once: (was the wake pipe ready, [(slot, it is gone)] to read).

        Lease pipes with room are flushed here; one whose worker closed it is reported as
        gone, as its sentinel would be."""
        woke = False
        ready: list[tuple[Slot, bool]] = []
        for key, _ in self._selector.select(timeout):
            data = key.data
            if data is None:
                woke = True
            elif data is _STARTS:
                ready.extend(self._started())
            elif data[1] is _WRITABLE:
                slot = data[0]
                try:
                    if slot.handle.flush():
                        self._unwatch_writes(slot)
                except OSError:
                    self._unwatch_writes(slot)
                    ready.append((slot, True))
            else:
                ready.append(data)
        return woke, ready

    def watch_writes(self, slot: Slot) -> None:
        """Watch a worker's lease pipe for room: its handle has frames waiting."""
        if not slot.writing:
            slot.writing = True
            self._selector.register(
                slot.handle.write_fd(), selectors.EVENT_WRITE, (slot, _WRITABLE)
            )

    def _unwatch_writes(self, slot: Slot) -> None:
        if slot.writing:
            slot.writing = False
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(slot.handle.write_fd())

    def read(self, slot: Slot, sentinel: bool) -> tuple[list[proto.WorkerMessage], bool]:
        """Messages from a ready worker, and whether it is gone."""
        if sentinel:
            return slot.handle.drain(), True
        return slot.handle.receive()

    # ---- choosing -------------------------------------------------------------------------

    def pick(self) -> Slot | None:
        """The ready worker holding the fewest batches, if one has room for another."""
        best: Slot | None = None
        least = self.depth
        for s in self.slots:
            if s.state is IDLE or s.state is BUSY:
                n = len(s.batches)
                if not n:
                    return s
                if n < least and n < s.depth:
                    best, least = s, n
        return best

    def with_room(self) -> list[Slot]:
        """The ready workers that have room for another batch, in table order."""
        return [
            s
            for s in self.slots
            if (s.state is IDLE or s.state is BUSY) and len(s.batches) < s.depth
        ]

    def busy(self) -> bool:
        return any(s.batches for s in self.slots)

    def alive(self) -> int:
        """Workers begun and not gone (a start waiting its turn has nothing running)."""
        return sum(1 for s in self.slots if s.state is not DEAD) - len(self.waiting)

    # ---- ending ---------------------------------------------------------------------------

    def stop(self, slot: Slot) -> None:
        """Ask a worker to exit once it has answered every lease it was handed."""
        if slot.handle.stop():
            self.watch_writes(slot)

    def kill(self, slot: Slot, reason: str, victim: Batch[Any] | None = None) -> None:
        slot.kill_reason = reason
        slot.victim = victim
        slot.handle.kill()

    def bury(self, slot: Slot) -> int | None:
        """Forget a dead (or killed) worker; return its exit code when it has one."""
        handle = slot.handle
        code = handle.exitcode(1.0)
        if code is None and slot.kill_reason is None and handle.killable:
            handle.kill()  # its pipe closed but it lingers: make sure it is gone
            code = handle.exitcode(1.0)
        slot.move(DEAD)
        self._unwatch(slot)
        handle.close()
        self.slots.remove(slot)
        if isinstance(handle, QueuedStart):
            with contextlib.suppress(ValueError):
                self.waiting.remove(slot)
        return code

    def _unwatch(self, slot: Slot) -> None:
        self._unwatch_writes(slot)
        for obj in slot.handle.waitables():
            if obj is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(obj)

    def shutdown(self, join_timeout: float) -> None:
        """Stop every worker, wait up to ``join_timeout`` in all, kill stragglers, close all.

        A worker whose stop frame cannot be written at once (its pipe is full of leases the
        channel no longer holds) or that is still starting (it holds nothing) is killed
        instead: nothing is waited for that way, and no lease is sent after the drain. A
        start still running is given up, and its starter thread joined; one waiting its turn
        is forgotten."""
        self.waiting.clear()
        for s in self.slots:
            if s.state is STARTING or s.handle.stop():
                s.handle.kill()
        deadline = time.monotonic() + join_timeout
        for s in self.slots:
            if s.handle.exitcode(max(0.0, deadline - time.monotonic())) is None:
                s.handle.kill()
                s.handle.exitcode(1.0)
            self._unwatch(s)
            s.handle.close()
            s.state = DEAD
        self.slots = []
        if self._starts is not None:
            self._starts.shutdown(deadline)  # every start was given up above
        self._selector.close()
