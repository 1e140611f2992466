"""Send functions for the Dask backend's own tests: importable on Dask workers (the tests'
directory is on the path of the worker processes a LocalCluster spawns)."""

from __future__ import annotations

import os
from typing import Any

from workerfns import Gate, Log

import procdispatch as pd


class Sink:
    """send_fn that records every send (the Dask worker's pid, batch id, attempt, items)."""

    def __init__(self, log: Log, hang_on: object = None, gate: Gate | None = None) -> None:
        self.log = log
        self.hang_on = hang_on
        self.gate = gate

    def __call__(self, batch: pd.Batch[Any]) -> None:
        self.log.write(ev="start", pid=os.getpid(), id=batch.id, attempt=batch.attempt)
        if self.gate is not None and self.hang_on in batch.data:
            self.gate.wait(120)
        self.log.write(
            ev="sent", pid=os.getpid(), id=batch.id, attempt=batch.attempt, data=list(batch.data)
        )


class InitLog:
    """worker_init that records the pid it runs in, and waits for a gate when given one."""

    def __init__(self, log: Log, gate: Gate | None = None) -> None:
        self.log = log
        self.gate = gate

    def __call__(self) -> None:
        self.log.write(ev="init", pid=os.getpid())
        if self.gate is not None:
            self.gate.wait(120)


class TaskLog:
    """send_fn that records, for every send, the Dask task it ran in (its key) and the batch;
    it ends its worker at once on the first attempt of a batch holding ``exit_on`` (or one of
    them, given a frozenset)."""

    def __init__(self, log: Log, exit_on: object = None) -> None:
        self.log = log
        self.exit_on = exit_on

    def __call__(self, batch: pd.Batch[Any]) -> None:
        from distributed import get_worker

        task = get_worker().get_current_task()
        self.log.write(ev="start", task=task, id=batch.id, attempt=batch.attempt)
        ends = self.exit_on if isinstance(self.exit_on, frozenset) else {self.exit_on}
        if batch.attempt == 1 and any(x in ends for x in batch.data):
            os._exit(1)
        self.log.write(ev="sent", task=task, id=batch.id, attempt=batch.attempt, data=batch.data)


class Stuck:
    """send_fn that leaves its Dask worker unable to answer anything on the first attempt of a
    batch holding ``on``: ``how="gil"`` runs a regular expression that backtracks for hours
    holding the GIL, ``how="stop"`` stops the worker's process (SIGSTOP). Every send is logged,
    with the worker's pid, before it gets stuck."""

    def __init__(self, log: Log, on: object, how: str) -> None:
        self.log = log
        self.on = on
        self.how = how

    def __call__(self, batch: pd.Batch[Any]) -> None:
        self.log.write(ev="start", pid=os.getpid(), id=batch.id, attempt=batch.attempt)
        if self.on in batch.data and batch.attempt == 1:
            if self.how == "gil":
                import re

                re.match(r"(a+)+$", "a" * 40 + "b")
            else:
                import signal

                os.kill(os.getpid(), signal.SIGSTOP)
        self.log.write(
            ev="sent", pid=os.getpid(), id=batch.id, attempt=batch.attempt, data=list(batch.data)
        )
