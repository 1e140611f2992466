"""Default and ready-made callbacks: ``on_error``, ``on_drop``, and their logging.

They run in the parent, on the coordinator thread, so they must be quick. Everything logs to
``logging.getLogger("procdispatch")``; the library never configures logging.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .buffer import Batch, DropOldestBatch, FullBehavior
from .errors import SendTimeout, TransientError, WorkerCrashed

__all__ = [
    "POISON_FAULTS",
    "current_full_behavior",
    "default_on_drop",
    "default_on_error",
    "drop_quiet",
    "drop_summarized",
]

log = logging.getLogger("procdispatch")

#: A batch that crashed or timed out a worker this many times is dropped as poison.
POISON_FAULTS = 3

#: The full behaviour of the channel whose coordinator is running the callback.
current_full_behavior: contextvars.ContextVar[FullBehavior | None] = contextvars.ContextVar(
    "procdispatch_full_behavior", default=None
)

TRANSIENT = (TransientError, ConnectionError, TimeoutError, WorkerCrashed)


def default_on_error(batch: Batch[Any], exc: BaseException) -> bool:
    """Retry transient errors; give up on everything else and on poison batches.

    Transient: :class:`TransientError`, ``ConnectionError``, ``TimeoutError`` (so
    :class:`SendTimeout`) and :class:`WorkerCrashed`. A batch that has crashed or timed out a
    worker ``POISON_FAULTS`` (3) times is dropped as poison. Logs INFO when retrying, ERROR when
    giving up.
    """
    retry = isinstance(exc, TRANSIENT)
    reason = "transient error, will retry" if retry else "not transient, giving up"
    if (
        retry
        and isinstance(exc, (WorkerCrashed, SendTimeout))
        and batch.worker_faults >= (POISON_FAULTS)
    ):
        retry = False
        reason = f"poison: it crashed or timed out a worker {batch.worker_faults} times"
    log.log(
        logging.INFO if retry else logging.ERROR,
        "failed to send batch %d (attempt %d, %d items, meta %r): %s: %s (%s)",
        batch.id,
        batch.attempt,
        len(batch.data),
        batch.meta,
        type(exc).__name__,
        exc,
        reason,
    )
    return retry


def default_on_drop(batch: Batch[Any] | None, flush: bool) -> None:
    """Log each dropped batch: INFO under DropOldestBatch (dropping is its job), else WARNING."""
    if flush or batch is None:
        return
    level = (
        logging.INFO
        if isinstance(current_full_behavior.get(), DropOldestBatch)
        else logging.WARNING
    )
    log.log(
        level,
        "dropping batch %d (%d items, meta %r)",
        batch.id,
        len(batch.data),
        batch.meta,
    )


def drop_quiet(batch: Batch[Any] | None, flush: bool) -> None:
    """An ``on_drop`` that does nothing."""


def drop_summarized(
    every: float, *, clock: Callable[[], float] = time.monotonic
) -> Callable[[Batch[Any] | None, bool], None]:
    """An ``on_drop`` that counts dropped items and logs one line at most every ``every`` s.

    It also logs at the final flush call when anything is pending.
    """
    lock = threading.Lock()
    state = {"start": clock(), "count": 0}

    def on_drop(batch: Batch[Any] | None, flush: bool) -> None:
        with lock:
            if batch is not None and not batch.synthetic:
                state["count"] += len(batch.data)
            now = clock()
            if state["count"] and (flush or now - state["start"] >= every):
                log.info("dropped %d items over %.3fs", state["count"], now - state["start"])
                state["count"] = 0
                state["start"] = now

    return on_drop
