"""The coordinator's lifecycle: its states, the transitions between them, and its end.

:class:`Lifecycle` (transitions in one table): OPEN until a close is requested
(CLOSING: draining what it holds) or a cancel, or a fatal error (CANCELLING: queued batches are
dropped, in-flight sends get ``cancel_grace``); ENDED once everything was delivered or dropped
and the coordinator has exited.

:class:`Transitions` is the part of :class:`~procdispatch._coordinator.Coordinator` that moves
it between states and takes the steps of its end (:meth:`Transitions._shutdown_steps`, each
guarded so that every step runs even if an earlier one raised).
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import InternalError

if TYPE_CHECKING:
    from ._admission import Admission
    from ._handover import Ledger
    from ._limiter.remote import TokenSource
    from ._outcomes import Outcomes
    from ._pool import WorkerPool
    from .backends import Backend
    from .buffer import Buffer

__all__ = ["STOP_JOIN_TIMEOUT", "Lifecycle", "Transitions"]

log = logging.getLogger("procdispatch")

#: How long shutdown waits for stopped workers to exit before killing them.
STOP_JOIN_TIMEOUT = 5.0


class Lifecycle(enum.Enum):
    OPEN = "open"  # taking items
    CLOSING = "closing"  # closed: sending what it holds
    CANCELLING = "cancelling"  # cancelled or failed: dropping what is queued
    ENDED = "ended"  # everything delivered or dropped; the coordinator has exited


_NEXT: dict[Lifecycle, tuple[Lifecycle, ...]] = {
    Lifecycle.OPEN: (Lifecycle.CLOSING, Lifecycle.CANCELLING, Lifecycle.ENDED),
    Lifecycle.CLOSING: (Lifecycle.CANCELLING, Lifecycle.ENDED),
    Lifecycle.CANCELLING: (Lifecycle.ENDED,),
    Lifecycle.ENDED: (),
}


class Transitions:
    """The coordinator's moves between states, and its end; see the module docstring."""

    # Set by the coordinator.
    state: Lifecycle
    admission: Admission
    backend: Backend
    buffer: Buffer[Any]
    ledger: Ledger
    outcomes: Outcomes
    pool: WorkerPool
    _limiter: TokenSource | None
    _owns_limiter: bool
    _final_report: Callable[[], None] | None
    _backlog: collections.deque[tuple[list[Any], list[int] | None]]
    _now: Callable[[], float]

    def _move(self, to: Lifecycle) -> None:
        if to not in _NEXT[self.state]:
            raise InternalError(f"channel: no transition {self.state.value} -> {to.value}")
        self.state = to

    def _drop_everything_left(self) -> None:
        """After a crash of this loop: report whatever is still held as dropped (nothing is
        lost silently)."""
        now = self._now()
        taken, sizes, _, _ = self.admission.take_pending()
        if taken:
            self._backlog.append((taken, sizes))
        for items, sizes in self._backlog:
            for b in self.buffer.make_batches(now, items, sizes):
                self.outcomes.drop(b)
        self._backlog.clear()
        for slot in self.pool.slots:
            for b in slot.batches:
                if not b.synthetic:
                    self.ledger.book(in_flight=-b._count)
            slot.batches.clear()
        self.buffer.flush(now)
        self.buffer.force_lease_all()
        for b in self.buffer.leases():
            self.buffer.ack(b)
            self.outcomes.drop(b)

    def _shutdown_steps(self) -> None:
        if self.admission.fatal is not None and isinstance(self.admission.fatal, InternalError):
            _guarded("report what the failed coordinator held", self._drop_everything_left)
        _guarded("stop the workers", self.pool.shutdown, STOP_JOIN_TIMEOUT)
        _guarded("close the backend", self.backend.close)
        if self._owns_limiter and self._limiter is not None:
            _guarded("close the channel's rate limiter", self._limiter.close)
        self.ledger.alive = 0
        self.admission.publish(self.ledger, 0)
        # User code: each is guarded, and reported when slow, by Outcomes itself.
        self.outcomes.flush_drops()
        if self._final_report is not None:
            # Before on_drained, so the totals are on screen before anything printed after
            # the drain; it never runs user code on this thread.
            _guarded("make the final progress report", self._final_report)
        self.outcomes.drained()


def _guarded(what: str, fn: Any, *args: Any) -> None:
    """Run one of the shutdown's own steps (never user code: that goes through
    :func:`~._outcomes.call_user`)."""
    try:
        fn(*args)
    except Exception:
        log.exception("procdispatch: could not %s; going on with the shutdown", what)
