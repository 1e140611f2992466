"""send_fns and worker_inits that log, for the worker-logging tests (importable in workers)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import procdispatch as pd

log = logging.getLogger("tests.logfns")


def warn_x(batch: pd.Batch[Any]) -> None:
    logging.warning("x")


def init_logs() -> None:
    log.warning("init of %s", "the worker")


class Unpicklable:
    """Will not pickle; its text is all a log message needs of it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __str__(self) -> str:
        return "the lock holder"


def logs_exception(batch: pd.Batch[Any]) -> None:
    try:
        raise ZeroDivisionError("division in the worker")
    except ZeroDivisionError:
        log.exception("batch %d failed inside", batch.id)


def unpicklable_arg(batch: pd.Batch[Any]) -> None:
    log.warning("holding %s", Unpicklable())


def unpicklable_extra(batch: pd.Batch[Any]) -> None:
    log.warning("with an extra", extra={"holder": Unpicklable()})


def every_level(batch: pd.Batch[Any]) -> None:
    log.debug("debug %d", batch.id)
    log.info("info %d", batch.id)
    log.warning("warning %d", batch.id)


def flood(batch: pd.Batch[Any]) -> None:
    n = 2500 if batch.id == 1 else 3
    for i in range(n):
        log.warning("flood %d of batch %d", i, batch.id)


def to_raising_logger(batch: pd.Batch[Any]) -> None:
    logging.getLogger("tests.raising").warning("this one breaks the parent's handler")
    log.warning("and this one arrives")


def logs_then_fails(batch: pd.Batch[Any]) -> None:
    log.warning("about to fail batch %d", batch.id)
    raise ValueError("failed after logging")
