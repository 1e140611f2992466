"""Worker-side fault injectors for the fault matrix (importable in worker processes)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any

from workerfns import Log, Recorder

import procdispatch as pd


class UnpicklableError(Exception):
    """Will not pickle: it holds a lock."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


class BadInitError(Exception):
    """Pickles, but cannot be rebuilt: __init__ wants two arguments, args holds one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def _boom(msg: str) -> Any:
    raise ValueError(msg)


def _die_now(code: int) -> Any:
    os._exit(code)


class FailsToUnpickle:
    """Pickles fine in the parent; unpickling it (in the worker) raises ValueError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_boom, ("cannot unpickle this item",))


class KillsOnUnpickle:
    """Unpickling it ends the worker process (exit code 9)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_die_now, (9,))


class Fault:
    """A send_fn that misbehaves on the first attempt of the batch holding ``trigger``."""

    def __init__(self, log: Log, kind: str, trigger: Any = 2, attempts: int = 1) -> None:
        self.rec = Recorder(log)
        self.kind = kind
        self.trigger = trigger
        self.attempts = attempts

    def __call__(self, batch: pd.Batch[Any]) -> None:
        if self.trigger in batch.data and batch.attempt <= self.attempts:
            self.fire(batch)
        self.rec(batch)

    def fire(self, batch: pd.Batch[Any]) -> None:
        k = self.kind
        if k == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif k == "segfault":
            ctypes.string_at(0)
        elif k == "exit":
            os._exit(7)
        elif k == "hang":
            time.sleep(3600)
        elif k == "raise":
            raise ValueError("plain failure")
        elif k == "raise_unpicklable":
            raise UnpicklableError("holds a lock")
        elif k == "raise_badinit":
            raise BadInitError("a", "b")
        elif k == "systemexit":
            sys.exit(3)
        elif k == "meta_unpicklable":
            batch.meta = threading.Lock()
            raise ValueError("failed with an unpicklable meta")
        elif k == "data_unpicklable":
            batch.data.append(threading.Lock())
            raise ValueError("failed with an unpicklable item added")
        else:  # pragma: no cover
            raise AssertionError(k)


class FailingInit:
    """worker_init that raises in every worker."""

    def __call__(self) -> None:
        raise RuntimeError("init cannot reach the database")
