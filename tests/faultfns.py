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


# ---- misbehaving send functions and policies, for the user-callable tests ----------------------


class LibraryError(Exception):
    """Stands for a library's own transient error type (requests.ConnectionError, say)."""


def _not_a_number() -> Any:
    return int("not-a-number")


class UnpicklesBadly:
    """Pickles in the worker; unpickling it (in the parent) raises ValueError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (int, ("not-a-number",))


class FailsFirst:
    """Fails the first ``attempts`` sends of the batch holding ``trigger`` in a chosen way,
    then records like Recorder."""

    def __init__(self, log: Log, how: str, trigger: Any = 0, attempts: int = 1) -> None:
        self.rec = Recorder(log)
        self.how = how
        self.trigger = trigger
        self.attempts = attempts

    def __call__(self, batch: pd.Batch[Any]) -> None:
        if self.trigger in batch.data and batch.attempt <= self.attempts:
            self.fail(batch)
        self.rec(batch)

    def fail(self, batch: pd.Batch[Any]) -> None:
        import urllib.error

        h = self.how
        if h == "transient":
            raise pd.TransientError("try again")
        if h == "url_refused":
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        if h == "runtime_from_connection":
            try:
                raise ConnectionResetError("peer reset")
            except ConnectionResetError as exc:
                raise RuntimeError("the client gave up") from exc
        if h == "runtime_while_timeout":
            try:
                raise TimeoutError("slow")
            except TimeoutError:
                raise RuntimeError("while handling a timeout") from None
        if h == "runtime_in_handler":
            try:
                raise TimeoutError("slow")
            except TimeoutError:
                raise RuntimeError("while handling a timeout")  # noqa: B904
        if h == "runtime":
            raise RuntimeError("permanent")
        if h == "library":
            raise LibraryError("the library says: retry")
        if h == "data_none":
            batch.data = None  # type: ignore[assignment]
            raise ValueError("after setting data to None")
        if h == "data_tuple":
            batch.data = tuple(batch.data)  # type: ignore[assignment]
            raise ValueError("after setting data to a tuple")
        if h == "meta_undecodable":
            batch.meta = UnpicklesBadly()
            raise ValueError("failed with a meta the parent cannot unpickle")
        if h == "data_undecodable":
            batch.data.append(UnpicklesBadly())
            raise ValueError("failed with an item the parent cannot unpickle")
        if h == "slow_then_ok":
            time.sleep(0.5)
            return
        if h == "slow_then_fail":
            time.sleep(0.5)
            raise pd.TransientError("late failure")
        raise AssertionError(h)  # pragma: no cover


def _fork() -> int:
    import warnings

    with warnings.catch_warnings():  # 3.12+ warns of forking a process that has threads
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


class ForkingSend:
    """A send_fn that, on the first attempt of the batch that holds ``0``, forks a child that
    goes back into the worker's code (``child`` = "return" or "raise") instead of ending with
    os._exit; the send waits for the child, and logs its exit status and its own pid."""

    def __init__(self, log: Log, child: str) -> None:
        self.log, self.child = log, child

    def __call__(self, batch: pd.Batch[Any]) -> None:
        if 0 in batch.data and batch.attempt == 1:
            pid = _fork()
            if pid == 0:
                if self.child == "raise":
                    # The child's stderr into a file of the test's (the worker's may be that
                    # of a forkserver started by another test).
                    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
                    os.dup2(os.open(self.log.path + ".stderr", flags, 0o644), 2)
                    raise ValueError("the child's work failed")
                return
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            self.log.write(kind="child", pid=pid, parent=os.getpid(), status=code)
        self.log.write(kind="send", pid=os.getpid(), items=list(batch.data))


class ForkingInit:
    """A worker_init that forks a child which returns (or raises) into the worker's code; it
    waits for the child and logs its exit status."""

    def __init__(self, log: Log, child: str) -> None:
        self.log, self.child = log, child

    def __call__(self) -> None:
        pid = _fork()
        if pid == 0:
            if self.child == "raise":
                raise ValueError("the child's work failed")
            return
        _, status = os.waitpid(pid, 0)
        self.log.write(kind="child", status=os.waitstatus_to_exitcode(status), parent=os.getpid())
