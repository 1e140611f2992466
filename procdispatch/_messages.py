"""The wire's messages: what each kind of frame is, and the classes the two sides exchange.

A frame's body starts with a byte naming its kind (``K_*``); leases and results then carry a
fixed binary header (:data:`HEADER`: batch id, attempt, synthetic flag) outside any pickle.
The message classes are small slotted classes, made once and never changed; each docstring says
the message's direction. :mod:`procdispatch._protocol` frames, encodes and decodes them;
:mod:`procdispatch._wire_errors` packs and rebuilds a failure.
"""

from __future__ import annotations

import math
import struct
from typing import Any

__all__ = [
    "DONE",
    "HEADER",
    "K_ARENA",
    "K_DONE",
    "K_FAILED",
    "K_INIT_FAILED",
    "K_LEASE",
    "K_LEASE_OOB",
    "K_LOG",
    "K_READY",
    "K_STOP",
    "PARTS",
    "PROTOCOL",
    "Done",
    "Failed",
    "InitFailed",
    "Lease",
    "Log",
    "Ready",
    "WorkerMessage",
]

PROTOCOL = 5
K_LEASE = 0x4C  # "L"  parent -> worker
K_LEASE_OOB = 0x4F  # "O"  parent -> worker: a lease with buffers in the arena (backends._arena)
K_ARENA = 0x41  # "A"  parent -> worker: the arena's name and size
K_STOP = 0x53  # "S"   parent -> worker
K_READY = 0x52  # "R"  worker -> parent
K_INIT_FAILED = 0x49  # "I"
K_DONE = 0x44  # "D"
K_FAILED = 0x46  # "F"
K_LOG = 0x47  # "G"    worker -> parent: a log record

HEADER = struct.Struct("<BQIB")  # kind, batch id, attempt, synthetic flag
DONE = struct.Struct("<BQIBd")  # a Done frame: the header, then the send's seconds
PARTS = struct.Struct("<II")  # a Failed frame: sizes of its error part and of its data part


class _Message:
    """Base of the messages: plain slotted classes. Five NamedTuple classes took 3-4 ms of
    every worker's start (the forkserver's, when it preloads this module); these take 0.4."""

    __slots__ = ()

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__name__}({fields})"


class Lease(_Message):
    """parent -> worker: send this batch (its items and meta) for attempt ``attempt``."""

    __slots__ = ("attempt", "batch_id", "data", "meta", "synthetic")

    def __init__(
        self, batch_id: int, attempt: int, synthetic: bool, data: list[Any], meta: object
    ) -> None:
        self.batch_id = batch_id
        self.attempt = attempt
        self.synthetic = synthetic
        self.data = data
        self.meta = meta


class Ready(_Message):
    """worker -> parent: ``worker_init`` ran; the worker takes leases from now on."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid


class InitFailed(_Message):
    """worker -> parent: the worker could not start (``worker_init`` raised, or bad payload)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Done(_Message):
    """worker -> parent: ``send_fn`` returned for this lease; the worker spent ``seconds`` on
    it (infinite when not measured): how many batches the coordinator queues for a worker
    follows that time (see :data:`~procdispatch._options.QUICK_SEND`)."""

    __slots__ = ("attempt", "batch_id", "seconds")

    def __init__(self, batch_id: int, attempt: int, seconds: float = math.inf) -> None:
        self.batch_id = batch_id
        self.attempt = attempt
        self.seconds = seconds


class Failed(_Message):
    """worker -> parent: ``send_fn`` raised (or the lease could not be unpickled).

    The batch's mutation comes back with it, to be applied before ``on_error`` and any retry:
    ``kept`` lists the indices of the original items still in ``data`` when ``send_fn`` only
    removed items; ``new_data`` is the whole new list when it did anything else; both None
    when ``data`` is unchanged. ``meta`` is
    the worker's ``batch.meta`` when ``meta_sent``.
    """

    __slots__ = ("attempt", "batch_id", "error", "kept", "meta", "meta_sent", "new_data")

    def __init__(
        self,
        batch_id: int,
        attempt: int,
        error: BaseException,
        kept: list[int] | None,
        new_data: list[Any] | None,
        meta_sent: bool,
        meta: object,
    ) -> None:
        self.batch_id = batch_id
        self.attempt = attempt
        self.error = error
        self.kept = kept
        self.new_data = new_data
        self.meta_sent = meta_sent
        self.meta = meta


class Log(_Message):
    """worker -> parent: a record a worker logged, as the attributes of a ``LogRecord``
    (see :mod:`procdispatch._worker_logging`)."""

    __slots__ = ("attrs",)

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs


WorkerMessage = Ready | InitFailed | Done | Failed | Log
