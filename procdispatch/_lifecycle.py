"""The coordinator's lifecycle: its states, the transitions between them, and its end.

:class:`Lifecycle` (transitions in one table, checked by :func:`moved`): OPEN until a close is
requested (CLOSING: draining what it holds) or a cancel, or a fatal error (CANCELLING: queued
batches are dropped, in-flight sends get ``cancel_grace``); ENDED once everything was delivered
or dropped and the coordinator has exited.

The end's steps are functions of the parts they act on, which the coordinator passes
(:func:`shutdown_steps`, each step guarded so that every one runs even if an earlier one raised;
:func:`drop_everything_left` after a crash of the loop).
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

__all__ = ["STOP_JOIN_TIMEOUT", "Lifecycle", "drop_everything_left", "moved", "shutdown_steps"]

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


def moved(state: Lifecycle, to: Lifecycle) -> Lifecycle:
    """The state after a move from ``state`` to ``to``; a move the table does not allow is a
    bug of the coordinator's."""
    if to not in _NEXT[state]:
        raise InternalError(f"channel: no transition {state.value} -> {to.value}")
    return to


def drop_everything_left(
    now: float,
    admission: Admission,
    backlog: collections.deque[tuple[list[Any], list[int] | None]],
    buffer: Buffer[Any],
    pool: WorkerPool,
    ledger: Ledger,
    outcomes: Outcomes,
) -> None:
    """After a crash of the coordinator's loop: report whatever is still held as dropped
    (nothing is lost silently)."""
    taken, sizes, _, _ = admission.take_pending()
    if taken:
        backlog.append((taken, sizes))
    for items, sizes in backlog:
        for b in buffer.make_batches(now, items, sizes):
            outcomes.drop(b)
    backlog.clear()
    for slot in pool.slots:
        for b in slot.batches:
            if not b.synthetic:
                ledger.book(in_flight=-b._count)
        slot.batches.clear()
    buffer.flush(now)
    buffer.force_lease_all()
    for b in buffer.leases():
        buffer.ack(b)
        outcomes.drop(b)


def shutdown_steps(
    admission: Admission,
    pool: WorkerPool,
    backend: Backend,
    own_limiter: TokenSource | None,
    ledger: Ledger,
    outcomes: Outcomes,
    final_report: Callable[[], None] | None,
    drop_left: Callable[[], None],
) -> None:
    """The steps of the channel's end, in order, each guarded so that every step runs even if
    an earlier one raised: what a crashed loop held reported dropped (``drop_left``), the
    workers stopped, the backend and a limiter the channel made closed, the stats' last
    publication, the drops' callbacks, the final progress report, and the drain's signal to
    ``on_drained``."""
    if admission.fatal is not None and isinstance(admission.fatal, InternalError):
        _guarded("report what the failed coordinator held", drop_left)
    _guarded("stop the workers", pool.shutdown, STOP_JOIN_TIMEOUT)
    _guarded("close the backend", backend.close)
    if own_limiter is not None:
        _guarded("close the channel's rate limiter", own_limiter.close)
    ledger.alive = 0
    admission.publish(ledger, 0)
    # User code: each is guarded, and reported when slow, by Outcomes itself.
    outcomes.flush_drops()
    if final_report is not None:
        # Before on_drained, so the totals are on screen before anything printed after the
        # drain; it never runs user code on this thread.
        _guarded("make the final progress report", final_report)
    outcomes.drained()


def _guarded(what: str, fn: Any, *args: Any) -> None:
    """Run one of the shutdown's own steps (never user code: that goes through
    :func:`~._outcomes.call_user`)."""
    try:
        fn(*args)
    except Exception:
        log.exception("procdispatch: could not %s; going on with the shutdown", what)
