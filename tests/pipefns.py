"""Send functions and worker_init hooks for the pipelining, start-timeout and recycling tests
(importable in worker processes)."""

from __future__ import annotations

import os
import threading
from typing import Any

from workerfns import Gate, Log

import procdispatch as pd


def worker_key() -> str:
    """Names the worker running this code: its pid, and for the thread backend its thread."""
    return f"{os.getpid()}/{threading.current_thread().name}"


class Scripted:
    """send_fn whose behaviour is chosen by the batch's first item (a str), on every attempt:

    * ``"hold"``: log ``start``, then wait for ``gates/hold`` (killed or abandoned before);
    * ``"wait:NAME"``: log ``start``, wait for ``gates/NAME``, then succeed;
    * ``"raise:N"``: log ``start``, wait for ``gates/raise``, then raise a ValueError whose
      message is N characters long;
    * ``"exit"``: log ``start``, wait for ``gates/exit``, then end the process at once;
    * anything else (and bytes): log ``sent`` and succeed.

    Every record names the worker, the batch id, the attempt and the first item (or the length
    of a bytes item).
    """

    def __init__(self, log: Log, gates: str) -> None:
        self.log = log
        self.gates = gates

    def gate(self, name: str) -> Gate:
        return Gate(os.path.join(self.gates, name))

    def __call__(self, batch: pd.Batch[Any]) -> None:
        first = batch.data[0]
        what = first if isinstance(first, str) else f"bytes:{len(first)}"
        rec = {"worker": worker_key(), "id": batch.id, "attempt": batch.attempt, "item": what}
        if isinstance(first, str) and first.startswith(("hold", "wait:", "raise:", "exit")):
            self.log.write(ev="start", **rec)
            if first == "hold":
                self.gate("hold").wait(120)
            elif first.startswith("wait:"):
                self.gate(first[5:]).wait(120)
            elif first.startswith("raise:"):
                self.gate("raise").wait(120)
                raise ValueError("z" * int(first[6:]))
            else:
                self.gate("exit").wait(120)
                os._exit(5)
        self.log.write(ev="sent", **rec)


class InitHangsOnce:
    """worker_init: the first worker to run it logs ``init-hang`` and waits for ``gate``; the
    others log ``init`` and return. The first is told apart by creating ``marker``."""

    def __init__(self, log: Log, gate: Gate, marker: str) -> None:
        self.log = log
        self.gate = gate
        self.marker = marker

    def __call__(self) -> None:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self.log.write(ev="init", worker=worker_key())
            return
        os.close(fd)
        self.log.write(ev="init-hang", worker=worker_key())
        self.gate.wait(120)


class InitHangs:
    """worker_init that logs ``init-hang`` and waits for ``gate``, in every worker."""

    def __init__(self, log: Log, gate: Gate) -> None:
        self.log = log
        self.gate = gate

    def __call__(self) -> None:
        self.log.write(ev="init-hang", worker=worker_key(), pid=os.getpid())
        self.gate.wait(120)


class CountingSender:
    """send_fn that logs ``start`` (with the worker) for every lease it runs."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def __call__(self, batch: pd.Batch[Any]) -> None:
        self.log.write(ev="start", worker=worker_key(), id=batch.id, data=list(batch.data))
