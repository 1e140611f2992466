"""The exceptions procdispatch raises or hands to ``on_error``.

::

    Exception
     └── ProcDispatchError                     base of everything below
          ├── OptionsError (ValueError)         a bad option, named with its rule and value
          ├── ChannelClosed                     put() after close() or cancel()
          ├── BufferFull                        put_nowait() while BlockNewItems is full
          ├── ItemTooLarge (ValueError)         item_size() above batch_size_max
          ├── ItemTooSmall (ValueError)         item_size() < 0, or 0 when sizes are enforced
          ├── TransientError                    raise it in send_fn to ask for a retry
          ├── WorkerCrashed                     the worker holding a batch died
          ├── SendTimeout (TimeoutError)        a send overran send_timeout; its worker was killed
          ├── RemoteError                       a worker-side exception that would not pickle back
          ├── WorkerStartFailed                 workers cannot start at all (worker_init fails...)
          ├── DeliveryTimeout                   a batch outlived delivery_timeout; it was dropped
          ├── ItemsDropped                      raise_on_drop: the drain ended with items dropped
          └── InternalError                     a broken invariant inside procdispatch (a bug)

Classes that also subclass a builtin (``ValueError``, ``TimeoutError``) let callers keep the
``except`` clauses they already have.
"""

from __future__ import annotations

import signal

__all__ = [
    "BufferFull",
    "ChannelClosed",
    "DeliveryTimeout",
    "InternalError",
    "ItemTooLarge",
    "ItemTooSmall",
    "ItemsDropped",
    "OptionsError",
    "ProcDispatchError",
    "RemoteError",
    "RemoteTraceback",
    "SendTimeout",
    "TransientError",
    "WorkerCrashed",
    "WorkerStartFailed",
    "describe_exitcode",
]


class ProcDispatchError(Exception):
    """Base class of every procdispatch exception."""


class OptionsError(ProcDispatchError, ValueError):
    """An option is invalid: the message names the option, the rule and the value given."""


class ChannelClosed(ProcDispatchError):
    """The channel was closed or cancelled; it takes no more items."""


class BufferFull(ProcDispatchError):
    """The buffer is full (BlockNewItems) and the caller asked not to block."""


class ItemTooLarge(ProcDispatchError, ValueError):
    """An item's size is above ``batch_size_max``."""


class ItemTooSmall(ProcDispatchError, ValueError):
    """An item's size is negative, or zero while ``batch_size_max`` is set."""


class TransientError(ProcDispatchError):
    """Raise (or subclass) this in ``send_fn`` to ask the default ``on_error`` for a retry."""


class InternalError(ProcDispatchError):
    """An invariant inside procdispatch was broken; this is a bug, please report it."""


def describe_exitcode(exitcode: int | None) -> str:
    """Say how a process ended, decoding a signal death: ``-9`` -> ``"killed by SIGKILL"``."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with code {exitcode}"


class WorkerCrashed(ProcDispatchError):
    """The worker process that held a batch died before it answered.

    ``exitcode`` is what :mod:`multiprocessing` reports: negative for a signal death. ``where``
    names a worker that is not a local process (a Dask worker's address); its ``pid`` and
    ``exitcode`` may then be None. ``why`` says why the channel killed the worker, when it did
    because of something the worker did (it answered for a batch it was not sending); None
    otherwise.
    """

    def __init__(
        self,
        pid: int | None,
        exitcode: int | None,
        *,
        worker: int | None = None,
        batch_id: int | None = None,
        attempt: int | None = None,
        where: str | None = None,
        why: str | None = None,
    ) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.worker = worker
        self.batch_id = batch_id
        self.attempt = attempt
        self.where = where
        self.why = why
        super().__init__(pid, exitcode)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_worker_crashed,
            (
                self.pid,
                self.exitcode,
                self.worker,
                self.batch_id,
                self.attempt,
                self.where,
                self.why,
            ),
        )

    def __str__(self) -> str:
        where = (
            f"worker {self.worker} (pid {self.pid})"
            if self.worker is not None
            else (f"worker pid {self.pid}")
        )
        what = ""
        if self.batch_id is not None:
            what = f" while sending batch {self.batch_id} (attempt {self.attempt})"
        if self.why is not None:
            return f"{where} was killed{what}: {self.why}"
        if self.where is not None:
            how = "was lost" if self.exitcode is None else describe_exitcode(self.exitcode)
            return f"{where} on {self.where} {how}{what}"
        return f"{where} {describe_exitcode(self.exitcode)}{what}"


def _rebuild_worker_crashed(
    pid: int | None,
    exitcode: int | None,
    worker: int | None,
    batch_id: int | None,
    attempt: int | None,
    where: str | None = None,
    why: str | None = None,
) -> WorkerCrashed:
    return WorkerCrashed(
        pid, exitcode, worker=worker, batch_id=batch_id, attempt=attempt, where=where, why=why
    )


class SendTimeout(ProcDispatchError, TimeoutError):
    """A send ran longer than ``send_timeout``; its worker was killed and replaced.

    ``killed`` is False when the worker could only be abandoned (a thread; a Dask task on a
    cluster the backend does not restart): the send may run on. ``where`` names a worker that is
    not a local process (the Dask worker that ran the send).
    """

    def __init__(
        self,
        timeout: float,
        *,
        pid: int | None = None,
        worker: int | None = None,
        batch_id: int | None = None,
        attempt: int | None = None,
        where: str | None = None,
        killed: bool = True,
    ) -> None:
        self.timeout = timeout
        self.pid = pid
        self.worker = worker
        self.batch_id = batch_id
        self.attempt = attempt
        self.where = where
        self.killed = killed
        super().__init__(timeout)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_send_timeout,
            (
                self.timeout,
                self.pid,
                self.worker,
                self.batch_id,
                self.attempt,
                self.where,
                self.killed,
            ),
        )

    def __str__(self) -> str:
        fate = "was killed" if self.killed else "was abandoned: the send may run on"
        on = f" (on {self.where})" if self.where is not None else ""
        return (
            f"send of batch {self.batch_id} (attempt {self.attempt}) ran longer than "
            f"send_timeout={self.timeout}s; worker {self.worker} (pid {self.pid}) {fate}{on}"
        )


def _rebuild_send_timeout(
    timeout: float,
    pid: int | None,
    worker: int | None,
    batch_id: int | None,
    attempt: int | None,
    where: str | None = None,
    killed: bool = True,
) -> SendTimeout:
    return SendTimeout(
        timeout,
        pid=pid,
        worker=worker,
        batch_id=batch_id,
        attempt=attempt,
        where=where,
        killed=killed,
    )


class RemoteError(ProcDispatchError):
    """An exception raised in a worker that could not reach the parent as itself.

    Carries the worker-side facts as text: ``type_name``, ``message`` and ``remote_traceback``;
    ``reason`` says why it came as text (it could not be pickled in the worker, or the
    worker's answer could not be unpickled in the parent, and with what error).
    """

    #: Why the error came as text, when nothing more precise is known.
    DEFAULT_REASON = "it could not be pickled back from the worker"

    def __init__(
        self, type_name: str, message: str, remote_traceback: str, *, reason: str | None = None
    ) -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.reason = reason if reason is not None else self.DEFAULT_REASON
        super().__init__(type_name, message, remote_traceback)

    def __str__(self) -> str:
        return (
            f"{self.type_name}: {self.message}\n"
            f"({self.reason}; worker traceback follows)\n"
            f"{self.remote_traceback}"
        )


class WorkerStartFailed(ProcDispatchError):
    """Workers could not be started (``worker_init`` raised, or the process died at start-up)
    several times in a row: the channel dropped what it held instead of respawning for ever.
    The last start-up error is the ``__cause__``."""


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of an exception that came from a worker: the worker's traceback."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class DeliveryTimeout(ProcDispatchError):
    """A batch was still undelivered ``delivery_timeout`` seconds after its first lease.

    Handed to ``on_drop``'s log and to :class:`ItemsDropped` as the reason of the drop; the
    batch goes to ``on_drop``. ``last_error`` is the failure of its latest attempt.
    """

    def __init__(
        self,
        timeout: float,
        *,
        batch_id: int | None = None,
        attempts: int | None = None,
        age: float | None = None,
        last_error: BaseException | None = None,
    ) -> None:
        self.timeout = timeout
        self.batch_id = batch_id
        self.attempts = attempts
        self.age = age
        self.last_error = last_error
        super().__init__(timeout, batch_id, attempts, age)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_delivery_timeout,
            (self.timeout, self.batch_id, self.attempts, self.age, self.last_error),
        )

    def __str__(self) -> str:
        last = ""
        if self.last_error is not None:
            last = f"; last error: {type(self.last_error).__name__}: {self.last_error}"
        age = f" ({self.age:.1f}s after its first lease)" if self.age is not None else ""
        return (
            f"batch {self.batch_id} was not delivered within delivery_timeout={self.timeout}s"
            f"{age} after {self.attempts} attempt(s); dropped{last}"
        )


def _rebuild_delivery_timeout(
    timeout: float,
    batch_id: int | None,
    attempts: int | None,
    age: float | None,
    last_error: BaseException | None,
) -> DeliveryTimeout:
    return DeliveryTimeout(
        timeout, batch_id=batch_id, attempts=attempts, age=age, last_error=last_error
    )


class ItemsDropped(ProcDispatchError):
    """``raise_on_drop=True``: the channel drained, but ``count`` items had been dropped.

    ``first_error`` is why the first drop happened (the error ``on_error`` gave up on, a
    :class:`DeliveryTimeout`, ...), or None when it was no failure: a ``DropOldestBatch``
    eviction or a cancel.
    """

    def __init__(self, count: int, first_error: BaseException | None = None) -> None:
        self.count = count
        self.first_error = first_error
        super().__init__(count, first_error)

    def __reduce__(self) -> tuple[object, ...]:
        return (ItemsDropped, (self.count, self.first_error))

    def __str__(self) -> str:
        why = ""
        if self.first_error is not None:
            why = f"; the first drop was for {type(self.first_error).__name__}: {self.first_error}"
        return f"{self.count} item(s) were dropped{why}"
