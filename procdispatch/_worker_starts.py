"""Worker starts: the part of the coordinator's worker side that starts and replaces workers.

:class:`WorkerStarts` is extended by :class:`~procdispatch._workers.Workers` and, like it, runs
only on the coordinator's thread:

* at most ``START_LIMIT`` workers of a backend whose workers cost a core to start are
  starting at once (from the beginning of their start to their Ready); the others wait their
  turn, and their ``start_timeout`` runs from the beginning of their own start;
* a worker that cannot start, or is not ready within ``start_timeout``, counts towards
  ``WorkerStartFailed``; after too many failed starts in a row the channel fails. A start that
  may block runs on a starter thread (:mod:`._starting`): its slot is STARTING meanwhile, a
  start that raised counts as one that raised here, and one that has not returned within
  ``start_timeout`` is given up like a worker not ready in time.

Replacing a worker that died or was recycled is a start like any other.
"""

from __future__ import annotations

import logging
import math

from . import _protocol as proto
from ._admission import Admission
from ._clock import Clock
from ._handover import Ledger
from ._options import ChannelOptions
from ._outcomes import Outcomes
from ._pool import Slot, WorkerPool
from .backends import Backend
from .errors import WorkerStartFailed

__all__ = ["SPAWN_RETRY_DELAY", "START_FAILURES_FATAL", "WorkerStarts"]

log = logging.getLogger("procdispatch")

#: Worker start failures in a row (plus workers - 1) with no worker ready in between before
#: the channel gives up instead of respawning for ever.
START_FAILURES_FATAL = 3
#: Seconds before a worker whose start raised (no process was made) is started again.
SPAWN_RETRY_DELAY = 0.05


class WorkerStarts:
    """Starting and replacing the workers of the coordinator's loop; see the module docstring."""

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
        self.opts = opts
        self.backend = backend
        self.pool = pool
        self.outcomes = outcomes
        self.ledger = ledger
        self.admission = admission
        self._now = clock.now
        self._start_failures = 0
        #: Workers not started yet. A worker that costs a core while it starts (a process)
        #: starts alone; the rest start together as soon as more than one item is in the
        #: channel (one item never needs a second worker).
        self.deferred = 0
        self.to_respawn = 0  # workers whose start raised, to start again at respawn_at
        self.respawn_at = math.inf

    def begin(self) -> None:
        first = 1 if self.backend.staggered_start else self.opts.workers
        self.deferred = self.opts.workers - first
        for _ in range(first):
            self.spawn()

    def ending(self) -> bool:
        """Cancelled or failed: the channel starts no more workers."""
        return self.outcomes.cancelled or self.admission.fatal is not None

    def spawn_deferred(self) -> None:
        n, self.deferred = self.deferred, 0
        if not self.ending():
            for _ in range(n):
                self.spawn()

    def respawn_due(self, now: float) -> None:
        """Start again the workers whose start raised, once their retry delay is over."""
        if now < self.respawn_at:
            return
        n, self.to_respawn, self.respawn_at = self.to_respawn, 0, math.inf
        if not self.ending():
            for _ in range(n):
                self.spawn()

    def begin_waiting(self, now: float) -> None:
        """Begin the starts waiting for their turn (at most START_LIMIT in flight), unless the
        channel is ending; one that cannot begin counts as a start that raised."""
        if self.ending():
            return
        for exc in self.pool.begin_waiting(now):
            self._spawn_failed(exc)
        self.ledger.alive = self.pool.alive()

    def spawn(self) -> None:
        """Start a worker, or queue its start while START_LIMIT starts are in flight. If
        starting raises, no worker exists to die and be replaced, so the start is retried after
        SPAWN_RETRY_DELAY; the failures count towards WorkerStartFailed like workers dying at
        start-up."""
        try:
            self.pool.spawn(self._now())
        except Exception as exc:
            self._spawn_failed(exc)
        self.ledger.alive = self.backend.workers_alive(self.pool.alive())

    def _spawn_failed(self, exc: BaseException) -> None:
        """Starting a worker raised (on this thread or a starter thread)."""
        log.error("could not start a worker", exc_info=exc)
        self._start_failures += 1
        if self._start_failures >= START_FAILURES_FATAL + self.opts.workers - 1:
            err = WorkerStartFailed(
                f"workers cannot start: {self._start_failures} attempts failed in a row; "
                f"last: {exc!r}"
            )
            err.__cause__ = exc
            self.admission.set_fatal(err)
        else:
            self.to_respawn += 1
            self.respawn_at = min(self.respawn_at, self._now() + SPAWN_RETRY_DELAY)

    def _replace(self) -> None:
        if not self.ending():
            self.spawn()
            self.ledger.worker_restarts += 1

    def _start_failed(self, slot: Slot, cause: BaseException) -> None:
        self._start_failures += 1
        why = proto.describe_error(cause)  # the user's error: its str() may fail here
        tail = cause.__cause__
        log.error(
            "worker %d (pid %s) could not start: %s%s",
            slot.wid,
            slot.handle.pid,
            why,
            "" if tail is None else tail,
        )
        if self._start_failures >= START_FAILURES_FATAL + self.opts.workers - 1:
            err = WorkerStartFailed(
                f"workers cannot start: {self._start_failures} attempts failed in a row; "
                f"last: {why}"
            )
            err.__cause__ = cause
            self.admission.set_fatal(err)
