"""Backends: where ``send_fn`` runs, behind one interface.

A :class:`Backend` starts workers; a :class:`WorkerHandle` is one worker as the coordinator sees
it: something to hand leases to, objects to wait on, the messages that came back, and a way to
stop or kill it. The coordinator never asks which backend it runs on: whatever differs (pickling,
pipes, what "kill" means, what starts first) is behind these two classes.

Three backends are built in: ``"process"`` (the default: worker processes, leases pickled over
pipes), ``"thread"`` (``send_fn`` in threads of this process, nothing pickled: for stepping
through ``send_fn`` in a debugger) and ``"dask"`` (the workers of a Dask distributed cluster,
with the ``dask`` extra: see :mod:`procdispatch.backends.dask`). Another is one class plus a call
to :func:`register_backend`, in this package or outside it; ``ProcessChannel(backend=...)``
takes a registered name or a :class:`Backend` object.

Starting a worker may block: a process backend creates a process, asks a forkserver for a
fork, writes the pickled ``send_fn`` into the child's pipe. A backend that sets
:attr:`Backend.start_blocks` is never started on the coordinator's thread: the channel calls
:meth:`Backend.start_worker_abortable` on a starter thread of its own, with a
:class:`StartAbort` that the coordinator sets when it gives the start up (``start_timeout`` ran
out, the channel ends), so that a stopped forkserver or a child slow to read a large payload
holds up that one start, never the channel.

This module is imported by worker processes too: it imports nothing heavy.
"""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._protocol import UnsendableItems

if TYPE_CHECKING:
    from .._batch import Batch
    from .._options import ChannelOptions
    from .._protocol import WorkerMessage

__all__ = [
    "Backend",
    "StartAbort",
    "StartAborted",
    "UnsendableItems",
    "WorkerHandle",
    "make_backend",
    "register_backend",
    "registered_backends",
]


class StartAborted(Exception):
    """Raised by a start whose :class:`StartAbort` was set: the channel gave it up."""


class StartAbort:
    """Set by the coordinator's thread when the channel gives up a start that runs on a starter
    thread (``start_timeout`` ran out, or the channel ends). A start that may block waits on
    :meth:`fileno` besides what it waits for (it becomes readable once set), calls
    :meth:`check` between steps, and leaves no process behind when it raises."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._closed = False
        self._fds: tuple[int, int] | None = None  # made on the first fileno()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            if self._fds is not None and not self._closed:
                os.write(self._fds[1], b"\0")  # one byte into an empty pipe: never blocks

    def check(self) -> None:
        """Raise :class:`StartAborted` once set."""
        if self._set:
            raise StartAborted("the channel gave up this worker start")

    def fileno(self) -> int:
        """A descriptor that becomes readable once the abort is set."""
        with self._lock:
            if self._closed:
                raise ValueError("fileno() of a closed StartAbort")
            if self._fds is None:
                self._fds = os.pipe()
                if self._set:
                    os.write(self._fds[1], b"\0")
            return self._fds[0]

    def close(self) -> None:
        """Release the descriptors; :meth:`set` still works (and only records it)."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, None
        for fd in fds or ():
            os.close(fd)


class LeasesHeld(Exception):
    """From :meth:`WorkerHandle.send_leases`: the worker takes no more leases now (its arena
    of large items is full until it answers some); the batches from this one on go back to the
    queue, unsent."""


class WorkerHandle(abc.ABC):
    """One worker, as the coordinator sees it. Only the coordinator's thread calls it (but for
    a worker whose start was given up and returned late: the starter thread that got it kills,
    waits for and closes it), and no call may block it: writes that do not fit wait in the
    handle (see :meth:`flush`)."""

    #: The worker's process id, when it has one.
    pid: int | None = None
    #: Where the worker runs, when that is not a process of this machine's channel (a Dask
    #: worker's address): errors about its batches name it.
    where: str | None = None
    #: False when :meth:`kill` can only abandon the worker (a thread): messages then say so.
    killable: bool = True
    #: False when the worker reads a lease only after answering the one before (a pipe read
    #: in order): when it dies, only the oldest batch it holds can have been started. True
    #: when it may go on to its next leases before the coordinator hears of the last one (a
    #: Dask lane sends several in one task): each one it holds, but those :meth:`unsent`
    #: counts, may have been sent.
    runs_ahead: bool = False
    #: True when :meth:`send_leases` hands several leases at once for less than one by one.
    sends_together: bool = False
    #: The most batches like the last one handed over that are worth queueing in the worker
    #: (with ``max_leases`` left out, how many it holds never exceeds this); set by a handle
    #: that measures its leases' sizes.
    lease_cap: int = 1 << 30

    @abc.abstractmethod
    def send_lease(self, batch: Batch[Any]) -> bool:
        """Hand the worker a lease of ``batch`` (its id, attempt, synthetic flag, data and
        meta). Never blocks: True when part of it waits to be written (the caller then watches
        :meth:`write_fd` and calls :meth:`flush`). Raises :class:`UnsendableItems` when the
        batch cannot go as it is, and OSError when the worker is gone."""

    def send_leases(self, batches: Sequence[Batch[Any]]) -> tuple[int, bool, Exception | None]:
        """Hand the worker leases of ``batches``, in order, together (a handle whose
        :attr:`sends_together` is True has this). Returns (n, waits, error): the first n were
        handed; ``error``, when not None, is the :class:`UnsendableItems` of ``batches[n]``,
        or :class:`LeasesHeld` (nothing after it was handed). Raises OSError when the worker is
        gone, every lease of the call then counted by :meth:`unsent`."""
        raise NotImplementedError

    @abc.abstractmethod
    def waitables(self) -> tuple[Any, Any]:
        """(an object that is readable when messages arrive, one that is readable when the
        worker is gone, or None) for the coordinator's selector."""

    @abc.abstractmethod
    def receive(self) -> tuple[list[WorkerMessage], bool]:
        """Called when the first waitable is readable: the messages, and whether it is gone.
        A ``Done`` that says how long its send took (``seconds``) lets a channel whose
        ``max_leases`` was left out queue batches behind quick sends; one made without it
        counts as slow."""

    @abc.abstractmethod
    def drain(self) -> list[WorkerMessage]:
        """Called when the worker is gone: whatever it managed to say before."""

    @abc.abstractmethod
    def exitcode(self, wait: float) -> int | None:
        """Wait up to ``wait`` seconds for the worker to end; its exit code, or None."""

    @abc.abstractmethod
    def kill(self) -> None:
        """End the worker now (or abandon it, when it cannot be killed)."""

    @abc.abstractmethod
    def stop(self) -> bool:
        """Ask the worker to exit once idle, without blocking; True when the request waits to
        be written (as for :meth:`send_lease`)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the handle's resources; the worker is already gone, killed or abandoned."""

    def write_fd(self) -> Any:
        """What to watch for room while something waits to be written."""
        raise NotImplementedError(f"{type(self).__name__} never has anything waiting")

    def flush(self) -> bool:
        """Write what waits, without blocking; True once nothing waits. Raises OSError when
        the worker is gone."""
        return True

    def unsent(self) -> int:
        """Leases handed to :meth:`send_lease` that the worker cannot have seen yet."""
        return 0

    def rss(self) -> int | None:
        """The worker's resident memory in bytes, when it can be measured."""
        return None

    def disown(self) -> None:  # noqa: B027 - most workers need nothing forgotten
        """In a child forked from the coordinator's process: forget the worker, which belongs
        to the parent, without touching it."""


class Backend(abc.ABC):
    """Where a channel's ``send_fn`` runs. One object serves one channel."""

    #: The name it is registered under (``ProcessChannel(backend=name)``).
    name: str = ""
    #: True when a worker costs a core while it starts (a process): the channel then starts
    #: one worker at first, and the others as soon as more than one item is in the channel,
    #: about one per core at once (a start lasts until the worker is ready).
    staggered_start: bool = False
    #: True when starting a worker may block (a process is made, a payload written to it): the
    #: channel then starts each worker on a starter thread of its own, through
    #: :meth:`start_worker_abortable`, and the coordinator learns of the started worker through
    #: a pipe its selector watches. False: :meth:`start_worker` returns at once, and is called
    #: on the coordinator's thread.
    start_blocks: bool = False
    #: False when a worker holds one batch at most (nothing may wait queued on a worker that
    #: could die with it): ``max_leases`` left out is then ``workers``, not a multiple of it.
    queues_leases: bool = True
    #: False when batches queued on a worker start back to back whenever it gets to them,
    #: however far apart a ``qps_limit`` admitted them (a Dask lane's wait a trip through the
    #: scheduler): with a ``qps_limit``, ``max_leases`` left out is then ``workers``.
    paces_queued_leases: bool = True
    #: True when the batches a worker holds are answered together, a trip much longer than a
    #: send after they were handed over (a Dask lane's task): their room comes back a worker's
    #: worth at a time, too late for a refill one batch per worker deep, so the full-buffer
    #: limits derived from ``max_leases`` count every lease even when it is left out.
    answers_together: bool = False
    #: The most batches a worker holds when ``max_leases`` is left out (``max_leases`` is then
    #: this times ``workers``); None: :data:`~procdispatch._options.DEPTH`. How many it holds
    #: still follows its sends (as many as its last send's time fits into ``QUICK_SEND``): a
    #: backend whose every hand-over costs a trip much longer than a quick send (a Dask task)
    #: allows more, so that such sends pay the trip once for many batches.
    lease_depth: int | None = None

    def __init__(self) -> None:
        self._opened = False

    def open(self, send_fn: Callable[[Batch[Any]], object], options: ChannelOptions) -> None:
        """Called once, when the channel is made, before any worker starts: prepare what
        every worker needs, and raise OptionsError for what cannot work. A backend object
        serves one channel."""
        if self._opened:
            raise _options_error(
                f"backend must be a fresh Backend object: one serves one channel (got {self!r})"
            )
        self._opened = True
        self.prepare(send_fn, options)

    @abc.abstractmethod
    def prepare(self, send_fn: Callable[[Batch[Any]], object], options: ChannelOptions) -> None:
        """What :meth:`open` does for this backend."""

    @abc.abstractmethod
    def start_worker(self, wid: int) -> WorkerHandle:
        """Start worker number ``wid`` (raise what starting it raised); it says Ready (or
        InitFailed) once ``worker_init`` ran. Called on the coordinator's thread, unless
        :attr:`start_blocks` is set (see :meth:`start_worker_abortable`)."""

    def start_worker_abortable(self, wid: int, abort: StartAbort) -> WorkerHandle:
        """How a channel starts a worker when :attr:`start_blocks` is set: on a starter thread,
        while the coordinator goes on. ``abort`` is set when the channel gives this start up:
        a start that may block then raises :class:`StartAborted` soon, leaving no process
        behind (the coordinator never waits for it; the channel's end joins its thread). A
        handle returned after the abort is killed and closed by the channel. The default calls
        :meth:`start_worker`, which cannot be aborted: a hung start keeps its thread."""
        abort.check()
        return self.start_worker(wid)

    def close(self) -> None:  # noqa: B027 - most backends hold nothing past their workers
        """The channel has ended: every worker is gone. Release what the backend holds. Also
        called on a backend whose channel could not be made (its options were refused)."""

    def default_workers(self) -> int:
        """``workers`` when the channel is given None: the cores of this machine. Called
        before :meth:`open`; may raise OptionsError."""
        return os.cpu_count() or 1

    def running_user_code(self) -> str | None:
        """When the calling thread is one of this backend's workers, running the user's code:
        which (``"send_fn"`` or ``"worker_init"``); None otherwise. A wait for the drain made
        there would wait for itself, and the channel refuses it. Only a backend whose workers
        are threads of the channel's process can answer anything but None."""
        return None

    def workers_alive(self, handles: int) -> int:
        """What ``stats().workers_alive`` reports, given the number of worker handles not
        dead: the handles themselves, unless the backend's workers are something else."""
        return handles

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# ---- the registry -----------------------------------------------------------------------------

_lock = threading.Lock()
_registry: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make ``ProcessChannel(backend=name)`` build its backend with ``factory()``."""
    if not isinstance(name, str) or not name:
        raise _options_error(f"name must be a non-empty str (got {name!r})")
    if not callable(factory):
        raise _options_error(f"factory must be callable (got {factory!r})")
    with _lock:
        _registry[name] = factory


def registered_backends() -> list[str]:
    """The registered backend names, in registration order."""
    with _lock:
        return list(_registry)


def make_backend(spec: object) -> Backend:
    """The backend for a channel's ``backend`` option: a registered name or a Backend object."""
    if isinstance(spec, Backend):
        return spec
    with _lock:
        factory = _registry.get(spec) if isinstance(spec, str) else None
        names = list(_registry)
    if factory is None:
        raise _options_error(
            f"backend must be one of {', '.join(names)} or a Backend object (got {spec!r})"
        )
    backend = factory()
    if not isinstance(backend, Backend):
        raise _options_error(
            f"backend {spec!r}'s factory must return a Backend object (got {backend!r})"
        )
    return backend


def _options_error(message: str) -> Exception:
    from ..errors import OptionsError

    return OptionsError(message)


def _register_builtins() -> None:
    def process() -> Backend:
        from .process import ProcessBackend

        return ProcessBackend()

    def thread() -> Backend:
        from .thread import ThreadBackend

        return ThreadBackend()

    def dask() -> Backend:
        try:
            from .dask import DaskBackend
        except ImportError as exc:
            raise _options_error(
                f"backend='dask' needs Dask distributed: pip install 'procdispatch[dask]' ({exc})"
            ) from exc
        return DaskBackend()

    register_backend("process", process)
    register_backend("thread", thread)
    register_backend("dask", dask)


_register_builtins()
