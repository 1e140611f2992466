"""Default and ready-made callbacks: ``on_error``, ``on_drop``, and their logging.

They run in the parent, on the coordinator thread, so they must be quick. Everything logs to
``logging.getLogger("procdispatch")``; the library never configures logging.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ._transient import TRANSIENT_NAMES, matches, qualified_name
from .buffer import Batch
from .errors import OptionsError, SendTimeout, WorkerCrashed

__all__ = [
    "POISON_FAULTS",
    "default_on_drop",
    "default_on_error",
    "drop_quiet",
    "drop_summarized",
    "retry_on",
]

log = logging.getLogger("procdispatch")

#: A batch that crashed or timed out a worker this many times is dropped as poison.
POISON_FAULTS = 3


def default_on_error(batch: Batch[Any], exc: BaseException) -> bool:
    """Retry transient errors; give up on everything else and on poison batches.

    Transient: an error that is, or was raised from or while handling (its ``__cause__`` /
    ``__context__`` chain), or has as its ``reason`` (``urllib``'s ``URLError``), a
    :class:`TransientError`, a ``ConnectionError`` or a ``TimeoutError`` (so
    :class:`SendTimeout`); and :class:`WorkerCrashed`. The chain is read in the worker, from
    the live exception. A batch that has crashed or timed out a worker ``POISON_FAULTS`` (3)
    times is dropped as poison. Logs INFO when retrying, ERROR when giving up.
    """
    return _decide(batch, exc, TRANSIENT_NAMES)


def retry_on(
    *exception_types: type[BaseException],
) -> Callable[[Batch[Any], BaseException], bool]:
    """An ``on_error`` that also retries the given exception types (a library's own transient
    errors, e.g. ``requests.ConnectionError``), found on the error's chain as
    :func:`default_on_error` finds its own; everything else as :func:`default_on_error` does.

    Types are matched by qualified name, so the parent need not import the library.
    """
    for t in exception_types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise OptionsError(f"retry_on takes exception classes (got {t!r})")
    names = TRANSIENT_NAMES | {qualified_name(t) for t in exception_types}
    listed = ", ".join(t.__qualname__ for t in exception_types)

    def on_error(batch: Batch[Any], exc: BaseException) -> bool:
        return _decide(batch, exc, names)

    on_error.__qualname__ = on_error.__name__ = f"retry_on({listed})"
    return on_error


def _decide(batch: Batch[Any], exc: BaseException, names: frozenset[str]) -> bool:
    retry = isinstance(exc, WorkerCrashed) or matches(exc, names)
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
    """Log each dropped batch: INFO for a batch evicted to make room (DropOldestBatch does it
    by design), WARNING for every other drop (a failure given up on, a cancel, a timeout)."""
    if flush or batch is None:
        return
    level = logging.INFO if batch._evicted else logging.WARNING
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
