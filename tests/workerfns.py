"""Send functions and probes used by the channel tests: importable in worker processes.

Workers report to the test through files (one JSON line per event, appended with O_APPEND so
lines from several processes never interleave), and the test waits on those files with a
deadline. Gates let a test hold a send until it says so.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procdispatch as pd

POLL = 0.005


def wait_for(pred: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


class Log:
    """An append-only JSON-lines file shared by the test and its workers."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    def write(self, **rec: Any) -> None:
        line = (json.dumps(rec) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path) as f:
                return [json.loads(x) for x in f if x.endswith("\n")]
        except FileNotFoundError:
            return []

    def wait_count(self, n: int, timeout: float = 20.0, **match: Any) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            recs = [r for r in self.read() if all(r.get(k) == v for k, v in match.items())]
            return recs if len(recs) >= n else None

        return wait_for(enough, timeout, f"{n} records {match} in {self.path}")  # type: ignore[no-any-return]


class Gate:
    """A one-way gate: workers wait until the test opens it (a file appears)."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    def open(self) -> None:
        Path(self.path).touch()

    def wait(self, timeout: float = 60.0) -> None:
        wait_for(lambda: os.path.exists(self.path), timeout, f"gate {self.path}")


class Recorder:
    """send_fn that records each send (pid, batch id, attempt, data, times) to a Log."""

    def __init__(self, log: Log, gate: Gate | None = None, sleep: float = 0.0) -> None:
        self.log = log
        self.gate = gate
        self.sleep = sleep

    def __call__(self, batch: pd.Batch[Any]) -> None:
        start = time.monotonic()
        self.log.write(
            ev="start",
            pid=os.getpid(),
            id=batch.id,
            attempt=batch.attempt,
            t=start,
            synthetic=batch.synthetic,
        )
        if self.gate is not None:
            self.gate.wait()
        if self.sleep:
            time.sleep(self.sleep)
        self.log.write(
            ev="sent",
            pid=os.getpid(),
            id=batch.id,
            attempt=batch.attempt,
            data=None if batch.synthetic else list(batch.data),
            t0=start,
            t1=time.monotonic(),
            synthetic=batch.synthetic,
            meta=repr(batch.meta),
        )


def delivered_items(log: Log) -> list[Any]:
    out: list[Any] = []
    for r in log.read():
        if r["ev"] == "sent" and not r["synthetic"]:
            out.extend(r["data"])
    return out


def kill_self(batch: pd.Batch[Any]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def exit_self(batch: pd.Batch[Any]) -> None:
    os._exit(7)


def noop(batch: pd.Batch[Any]) -> None:
    return None


class PacedSender:
    """send_fn that paces one sub-request per item with a shared RateLimiter."""

    def __init__(self, log: Log, limiter: Any) -> None:
        self.log = log
        self.limiter = limiter

    def __call__(self, batch: pd.Batch[Any]) -> None:
        for item in batch.data:
            asked = time.monotonic()
            assert self.limiter.acquire(timeout=30)
            self.log.write(ev="sub", pid=os.getpid(), item=item, asked=asked, t=time.monotonic())


class GatedInit:
    """worker_init that logs its pid, then waits until the gate opens."""

    def __init__(self, log: Log, gate: Gate) -> None:
        self.log = log
        self.gate = gate

    def __call__(self) -> None:
        self.log.write(ev="init", pid=os.getpid())
        self.gate.wait()


class FirstInitPasses:
    """worker_init: the first worker to run it (the one that creates ``marker``) logs ``init``
    and returns; every other logs ``init-wait`` and waits until the gate opens."""

    def __init__(self, log: Log, gate: Gate, marker: str) -> None:
        self.log = log
        self.gate = gate
        self.marker = marker

    def __call__(self) -> None:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self.log.write(ev="init-wait", pid=os.getpid())
            self.gate.wait()
            return
        os.close(fd)
        self.log.write(ev="init", pid=os.getpid())


class SlowInit:
    """worker_init that logs its pid, then takes ``seconds``."""

    def __init__(self, log: Log, seconds: float) -> None:
        self.log = log
        self.seconds = seconds

    def __call__(self) -> None:
        self.log.write(ev="init", pid=os.getpid(), t=time.monotonic())
        time.sleep(self.seconds)
