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


# Item kinds of RandomFaults, by priority: the first kind found in a batch decides what its
# send does. "once" kinds act on a batch's first attempt only; "poison" acts on every attempt.
KINDS = ("hang", "exit", "poison", "raise", "reverse", "remove", "ok")


class RandomFaults:
    """send_fn of the randomized pipelining test. Items are ``(id, kind, result size,
    padding)``. Logs ``start`` for every lease it runs, and ``delivered`` with the ids it
    delivered: all of them when it returns, the removed ones when it removes some and raises.

    * ``hang`` (first attempt): waits for ``gate`` without logging (killed by send_timeout,
      or abandoned by a thread worker), then raises;
    * ``exit`` (first attempt): ends the process at once (WorkerCrashed);
    * ``poison`` (every attempt) and ``raise`` (first attempt): raise a ValueError whose
      message is ``result size`` characters long;
    * ``reverse`` (first attempt): reverses ``data`` (it comes back whole, by value) and raises;
    * ``remove`` (first attempt): removes the first half of ``data`` and raises;
    * ``ok``: returns.
    """

    def __init__(self, log: Log, gate: Gate) -> None:
        self.log = log
        self.gate = gate

    def __call__(self, batch: pd.Batch[Any]) -> None:
        first = batch.attempt == 1
        kinds = {item[1] for item in batch.data}
        kind = next((k for k in KINDS if k in kinds and (first or k == "poison")), "ok")
        rec = {"worker": worker_key(), "id": batch.id, "attempt": batch.attempt}
        self.log.write(ev="start", **rec)
        if kind == "hang":
            self.gate.wait(300)
            raise RuntimeError("released after the round")
        if kind == "exit":
            os._exit(6)
        if kind in ("poison", "raise"):
            size = max(item[2] for item in batch.data if item[1] == kind)
            raise ValueError("z" * size)
        if kind == "reverse":
            batch.data.reverse()
            raise ValueError("reversed")
        if kind == "remove":
            half = max(1, len(batch.data) // 2)
            removed = batch.data[:half]
            del batch.data[:half]
            self.log.write(ev="delivered", items=[item[0] for item in removed], **rec)
            raise ValueError("removed some")
        self.log.write(ev="delivered", items=[item[0] for item in batch.data], **rec)
