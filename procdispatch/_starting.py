"""Worker starts off the coordinator's thread.

Starting a worker may block: a process backend asks a forkserver for a fork and writes
``send_fn`` (and all it closes over) into the child's pipe. On the coordinator's thread a
stopped forkserver, or a child slow to read a large payload, would freeze the whole loop: no
results read, no ``send_timeout``, no cancel, no drain deadline. So for a backend with
``start_blocks`` the pool never calls the backend itself: :meth:`Starts.begin` runs
``start_worker_abortable`` on a thread of its own, and the slot holds a :class:`StartingHandle`
meanwhile.

Which starts begin, and when, is the pool's decision (at most ``START_LIMIT`` at once, see
:mod:`._pool`); a start waiting for its turn holds a :class:`QueuedStart`, and no thread.

A :class:`StartingHandle` is a worker whose start has not returned: no pid, nothing to read or
watch. Its slot is STARTING, and ``start_timeout`` runs from the start's beginning as for any
starting worker. When the start returns, its thread posts the handle and writes a byte into the
pipe the pool's selector watches (:meth:`Starts.fileno`), so the coordinator's one wait point
stays its selector; the pool then puts the real handle in the slot (:meth:`StartingHandle.take`)
and watches its pipes. A start that raised is reported as the worker's death, with the error.

Giving a start up (``start_timeout`` ran out, the channel ends) is killing its StartingHandle:
that sets the start's :class:`~.backends.StartAbort`, and never waits. Whatever the start made
is ended by whichever side holds it, exactly once: the starter thread, when it had not posted
yet (it kills, waits for and closes the worker it got); the coordinator, when it had (the
StartingHandle kills the posted worker, and its ``exitcode`` and ``close`` are that worker's).
At the channel's end the pool joins every starter thread (:meth:`Starts.shutdown`): a start that
can be aborted ends at once; one that cannot keeps its daemon thread until it returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from . import _protocol as proto
from .backends import Backend, StartAbort, StartAborted, WorkerHandle
from .buffer import Batch
from .errors import InternalError

__all__ = ["ORPHAN_WAIT", "QueuedStart", "StartingHandle", "Starts"]

log = logging.getLogger("procdispatch")

#: Seconds a starter thread waits for the end of a worker it got after its start was given up.
ORPHAN_WAIT = 1.0
#: Seconds the channel's end waits for starter threads at least (an aborted start ends in
#: milliseconds; the rest of the shutdown may have used up its own deadline).
JOIN_AT_LEAST = 1.0


class _NoProcessYet(WorkerHandle):
    """A worker with nothing of its own running yet: nothing to watch, and no message."""

    def waitables(self) -> tuple[None, None]:
        return None, None

    def receive(self) -> tuple[list[proto.WorkerMessage], bool]:
        return [], False

    def drain(self) -> list[proto.WorkerMessage]:
        return []


class StartingHandle(_NoProcessYet):
    """A worker whose start runs on a starter thread; see the module docstring. Only the
    coordinator's thread calls its methods; the starter thread runs :meth:`_run`."""

    def __init__(self, wid: int, backend: Backend, starts: Starts) -> None:
        self.wid = wid
        self._backend = backend
        self._starts = starts
        self.abort = StartAbort()
        self._lock = threading.Lock()  # _given_up, _result, error between the two threads
        self._given_up = False
        self._result: WorkerHandle | None = None
        #: What the start raised, once it is posted.
        self.error: BaseException | None = None
        self._late: WorkerHandle | None = None  # posted, then given up: ended by the coordinator
        self._disowned = False
        self.thread = threading.Thread(
            target=self._run, name=f"procdispatch-start-{wid}", daemon=True
        )

    def _run(self) -> None:
        handle: WorkerHandle | None = None
        error: BaseException | None = None
        try:
            handle = self._backend.start_worker_abortable(self.wid, self.abort)
        except BaseException as exc:  # the coordinator decides what a failed start means
            error = exc
        finally:
            self.abort.close()
        with self._lock:
            given_up = self._given_up
            if not given_up:
                self._result, self.error = handle, error
        if given_up:
            if handle is not None:
                _end(handle, self.wid)
            elif error is not None and not isinstance(error, StartAborted):
                log.info("worker %d, given up, could not start: %r", self.wid, error)
        elif not self._starts.post(self):
            self.close()  # the channel has ended: nobody will take it

    def take(self) -> WorkerHandle | None:
        """The started worker, once posted; None when the start raised (see :attr:`error`)."""
        with self._lock:
            handle, self._result = self._result, None
        return handle

    def kill(self) -> None:
        """Give the start up (never waits); a worker it already posted is killed here."""
        if self._disowned:
            return
        with self._lock:
            self._given_up = True
            late, self._result = self._result, None
        self.abort.set()
        if late is not None:
            self._late = late
            late.kill()

    def exitcode(self, wait: float) -> int | None:
        late = self._late
        return late.exitcode(wait) if late is not None else None

    def close(self) -> None:
        if self._disowned:
            return
        self.kill()
        late, self._late = self._late, None
        if late is not None:
            late.close()

    def stop(self) -> bool:
        self.kill()  # it holds nothing: nothing to wait for
        return False

    def send_lease(self, batch: Batch[object]) -> bool:
        raise InternalError(f"worker {self.wid} was handed batch {batch.id} before it started")

    def disown(self) -> None:
        # In a forked child: the start, its abort pipe and what it posted are the parent's.
        self._disowned = True
        with self._lock:
            posted = self._result
        if posted is not None:
            posted.disown()


class QueuedStart(_NoProcessYet):
    """A worker whose start waits for its turn (see ``START_LIMIT`` in :mod:`._pool`): nothing
    begun, nothing to watch, kill or wait for."""

    def send_lease(self, batch: Batch[object]) -> bool:
        raise InternalError(f"batch {batch.id} was handed to a worker whose start had not begun")

    def exitcode(self, wait: float) -> int | None:
        return None

    def kill(self) -> None:
        pass

    def stop(self) -> bool:
        return False

    def close(self) -> None:
        pass


class Starts:
    """The channel's starter threads, and the pipe through which they report; see the module
    docstring."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)  # a full pipe already holds a wake-up
        self._lock = threading.Lock()
        self._posted: list[StartingHandle] = []
        self._threads: list[threading.Thread] = []
        self._closed = False

    def fileno(self) -> int:
        """Readable when a start has returned (see :meth:`collect`)."""
        return self._r

    def begin(self, wid: int, backend: Backend) -> StartingHandle:
        """Start worker ``wid`` on a thread of its own (raises when no thread can start)."""
        handle = StartingHandle(wid, backend, self)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(handle.thread)
        handle.thread.start()
        return handle

    def post(self, handle: StartingHandle) -> bool:
        """From a starter thread: its start returned. False once the channel has ended."""
        with self._lock:
            if self._closed:
                return False
            self._posted.append(handle)
            with contextlib.suppress(BlockingIOError):
                os.write(self._w, b"\0")
        return True

    def collect(self) -> list[StartingHandle]:
        """The starts that returned since the last call, oldest first."""
        with contextlib.suppress(BlockingIOError):
            while len(os.read(self._r, 4096)) == 4096:
                pass
        with self._lock:
            posted, self._posted = self._posted, []
        return posted

    def shutdown(self, deadline: float) -> None:
        """At the channel's end, every start already given up: join the starter threads until
        ``deadline`` (a ``time.monotonic()`` instant, JOIN_AT_LEAST from now at the earliest),
        end what was posted and never taken, and close the pipe."""
        deadline = max(deadline, time.monotonic() + JOIN_AT_LEAST)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closed = True
            posted, self._posted = self._posted, []
            left = [t.name for t in self._threads if t.is_alive()]
            self._threads = []
        for handle in posted:
            handle.close()
        for fd in (self._r, self._w):
            os.close(fd)
        if left:
            log.warning(
                "worker starts still running at the channel's end (%s): their backend cannot "
                "abort a start; each worker they still make is ended when its start returns",
                ", ".join(left),
            )


def _end(handle: WorkerHandle, wid: int) -> None:
    """End a worker whose start returned after it was given up."""
    try:
        handle.kill()
        handle.exitcode(ORPHAN_WAIT)
        handle.close()
    except Exception:
        log.exception("could not end worker %d, started after its start was given up", wid)
