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
    it ends its worker at once on the first attempt of a batch holding ``exit_on``."""

    def __init__(self, log: Log, exit_on: object = None) -> None:
        self.log = log
        self.exit_on = exit_on

    def __call__(self, batch: pd.Batch[Any]) -> None:
        from distributed import get_worker

        task = get_worker().get_current_task()
        self.log.write(ev="start", task=task, id=batch.id, attempt=batch.attempt)
        if self.exit_on in batch.data and batch.attempt == 1:
            os._exit(1)
        self.log.write(ev="sent", task=task, id=batch.id, attempt=batch.attempt, data=batch.data)
