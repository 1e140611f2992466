"""A lane: one thread of one Dask worker, as the coordinator sees a worker.

A lane has at most one task at a time on its Dask worker, submitted with ``pure=False,
retries=0`` and pinned there (``workers=[address], allow_other_workers=False``); the task sends
one or more of the lane's leases, one after another (:func:`._dask_worker.run_leases_task`).
Pinning is what makes a finished send final: Dask recomputes a finished task whose result was
lost with its worker while a client still wanted it, and a task pinned to a worker that is gone
can never run again. So a send whose answer reached the coordinator is never repeated, and the
batches of a task whose worker died before its answer came are failed here (``WorkerCrashed``:
any of them may have been sent) and retried by the channel's policy: at least once, never by
Dask.

Why several leases in a task: each task costs a trip from the client through the scheduler to
the worker and back, about ten milliseconds, most of it Dask's message batching; a lane that
waited that long for each batch of quick sends would leave its thread idle most of the time. The
coordinator hands a lane as many batches as its sends' times allow (its ``depth``), in one pass;
the lane keeps them until the pass ends (:meth:`DaskLane.send_lease` asks to be flushed,
:meth:`DaskLane.flush` submits them as one task), and those handed to it while its task runs go
as the next task as soon as that one answers. With ``send_timeout`` or a qps limit set each
task carries one lease: a batch's deadline runs from its predecessor's answer, which must not
wait for later sends, and sends admitted apart by the rate must not start back to back. Leases
still waiting in the lane were never sent: a lane that is lost or killed reports them as
unsent, and they go back to the queue with no attempt used.

Answers come through :meth:`distributed.Future.add_done_callback`: a task whose sends all
returned quickly answers None, which the scheduler's completion message says (it carries the
result's type), so nothing is gathered; other answers are gathered on the client's event loop.
The future is released at once, and the answers posted to the lane, which wakes the coordinator
through a socket pair, as the thread backend does. The lane's life:

================  ====================================================================
``waiting``       started; no Dask worker thread is free for it yet (the backend assigns
                  one, and the lane says Ready)
``ready``         pinned to ``where``; holds leases or none
``lost``          its worker left the cluster, or its task failed in Dask (KilledWorker, a
                  cancel from elsewhere): the coordinator sees it gone
``killed``        given up by the coordinator (``send_timeout``, the end of ``cancel_grace``,
                  ``start_timeout``): the backend restarts its worker or abandons the task
``stopped``       asked to exit (recycling, the channel's end)
================  ====================================================================
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import _protocol as proto
from . import WorkerHandle
from ._dask_worker import run_leases_task

if TYPE_CHECKING:
    from .._batch import Batch
    from .dask import DaskBackend

__all__ = ["DaskLane"]

log = logging.getLogger("procdispatch")

#: A lease as the lane keeps it: (batch id, attempt, header, payload).
_Lease = tuple[int, int, bytes, bytes]

#: Seconds a task Dask reports done may wait for its answer to reach the lane before the
#: monitor takes it itself.
ANSWER_WAIT = 5.0


class DaskLane(WorkerHandle):
    """One Dask worker thread's worth of a channel's workers; see the module docstring."""

    #: Every lease of its task may have been sent when its worker dies.
    runs_ahead = True

    def __init__(self, backend: DaskBackend, wid: int, killable: bool) -> None:
        self._backend = backend
        self.wid = wid
        self.killable = killable
        self.state = "waiting"
        # state, _future, _task, _pending, _unsent: shared by the coordinator's thread, Dask's
        # callback thread and the client's loop
        self._lock = threading.Lock()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._out: collections.deque[proto.WorkerMessage] = collections.deque()
        self._future: Any = None
        self._task: list[_Lease] = []  # the leases of the task in flight, in order
        self._pending: list[_Lease] = []  # handed to the lane, not submitted yet
        self._unsent = 0  # leases lost without being sent, besides those pending
        self._seq = 0
        self._done_since: tuple[Any, float] | None = None  # (task in flight, first seen done)

    # ---- from the backend ------------------------------------------------------------------

    def assigned(self, where: str, pid: int | None) -> bool:
        """The backend pinned this lane to a worker thread: it says Ready. False when the lane
        was given up meanwhile."""
        with self._lock:
            if self.state != "waiting":
                return False
            self.state = "ready"
            self.where = where
            self.pid = pid
        self._post(proto.Ready(pid or 0))
        return True

    def failed_start(self, error: BaseException) -> None:
        """No worker can take this lane (worker_init failed on all of them)."""
        with self._lock:
            if self.state != "waiting":
                return
            self.state = "lost"
        self._post(proto.InitFailed(error))

    def lost(self, where: str, why: str) -> None:
        """Its worker left the cluster: what its task held may have been sent."""
        with self._lock:
            if self.state != "ready" or self.where != where:
                return
            self.state = "lost"
            fut, self._future = self._future, None
        self._backend.lane_lost(self, why, fut)
        self._post(None)

    # ---- the coordinator's side ------------------------------------------------------------

    def send_lease(self, batch: Batch[Any]) -> bool:
        head, payload = proto.lease_parts(batch)  # raises UnsendableItems before anything goes
        with self._lock:
            if self.state != "ready":
                self._unsent += 1
                raise OSError(f"lane {self.wid} is gone")
            self._pending.append((batch.id, batch.attempt, head, payload))
            # With no task in flight, the pending leases go at the pass's end (flush); else
            # when the task answers.
            return self._future is None

    def write_fd(self) -> Any:
        return self._w  # always has room: the coordinator flushes at the end of its pass

    def flush(self) -> bool:
        with self._lock:
            if self._future is None and self._pending and self.state == "ready":
                self._submit()
        return True

    def _submit(self) -> None:
        """Submit the pending leases as one task (one lease when send_timeout or a qps limit
        is set); the lock is held."""
        take = 1 if self._backend.one_lease_per_task else len(self._pending)
        leases, self._pending = self._pending[:take], self._pending[take:]
        self._seq += 1
        try:
            fut = self._backend.client.submit(
                run_leases_task,
                self._backend.plugin_name,
                [(head, payload) for _, _, head, payload in leases],
                key=f"procdispatch-send-{self._backend.token}-{self.wid}-{self._seq}",
                workers=[self.where],
                allow_other_workers=False,
                pure=False,
                retries=0,
            )
        except Exception as exc:  # a closed client, say: the leases never left
            self.state = "lost"
            self._pending[:0] = leases
            self._backend.lane_lost(self, f"it could not submit its task: {exc!r}", None)
            self._post(None)
            return
        self._future = fut
        self._task = leases
        fut.add_done_callback(self._finished)

    def check_answer(self) -> None:
        """On the monitor's thread: a task that Dask reports done and whose answer has not
        reached the lane within ``ANSWER_WAIT`` seconds is answered from here, with a WARNING.
        The answer normally comes through the future's done-callback; should that callback
        never run, the lane would hold its leases for ever and the drain would never end. An
        answer taken twice counts once (the second finds the task no longer in flight)."""
        now = time.monotonic()
        with self._lock:
            fut = self._future
            if fut is None or self.state != "ready" or not fut.done():
                self._done_since = None
                return
            if self._done_since is None or self._done_since[0] is not fut:
                self._done_since = (fut, now)
                return
            if now - self._done_since[1] < ANSWER_WAIT:
                return
            self._done_since = (fut, float("inf"))  # once per task
        log.warning(
            "the answer of lane %d's Dask task %s had not arrived %.0f s after Dask reported "
            "it done; taking it now",
            self.wid,
            fut.key,
            ANSWER_WAIT,
        )
        self._finished(fut)

    def _finished(self, fut: Any) -> None:
        """On Dask's callback thread: the task ended. A task that answered None needs no
        gather (the key's type came with its completion); any other answer is gathered on the
        client's loop."""
        if fut.status == "finished" and fut.type is type(None):
            self._answered(fut, None)
        else:
            asyncio.run_coroutine_threadsafe(self._gather(fut), self._backend.loop)

    async def _gather(self, fut: Any) -> None:
        try:
            result = await self._backend.client.gather(fut, asynchronous=True)
        except BaseException as exc:  # KilledWorker, a cancel: the lane hears it as a loss
            result = exc
        self._answered(fut, result)

    def _answered(self, fut: Any, result: object) -> None:
        """The task's answer: None (every send returned), the answers' bytes, or what made it
        fail in Dask."""
        fut.release()
        with self._lock:
            if self._future is not fut or self.state != "ready":
                return  # killed or lost meanwhile: nobody waits for this answer
            self._future = None
            task, self._task = self._task, []
            if result is None:
                msgs: list[proto.WorkerMessage] = [proto.Done(b, a, 0.0) for b, a, _, _ in task]
            elif isinstance(result, tuple) and all(isinstance(r, bytes) for r in result):
                msgs = [proto.decode_from_worker(r) for r in result]
            else:
                msgs = []
            failed = next((m for m in msgs if isinstance(m, proto.InitFailed)), None)
            if not msgs or failed is not None:
                self.state = "lost"
                if failed is not None:
                    self._unsent += len(task)  # worker_init failed there: nothing was sent
            elif self._pending:
                self._submit()  # the next task goes before the coordinator hears of this one
        if failed is not None:
            self._backend.worker_broken(self, failed.error)
            self._post(failed)
            self._post(None)
            return
        if not msgs:
            error = result if isinstance(result, BaseException) else RuntimeError(repr(result))
            self._backend.lane_lost(self, f"its task failed in Dask: {_describe(error)}", None)
            self._post(None)
            return
        self._out.extend(msgs)
        self._post(None)

    def _post(self, msg: proto.WorkerMessage | None) -> None:
        if msg is not None:
            self._out.append(msg)
        with contextlib.suppress(OSError):
            self._w.send(b"\0")

    def waitables(self) -> tuple[Any, Any]:
        return self._r, None

    def receive(self) -> tuple[list[proto.WorkerMessage], bool]:
        with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
            while self._r.recv(4096):
                pass
        gone = self.state in ("lost", "killed", "stopped")  # first: its messages are posted
        return self.drain(), gone

    def drain(self) -> list[proto.WorkerMessage]:
        out: list[proto.WorkerMessage] = []
        while self._out:
            out.append(self._out.popleft())
        return out

    def unsent(self) -> int:
        with self._lock:
            return self._unsent + len(self._pending)

    def exitcode(self, wait: float) -> int | None:
        return 0 if self.state == "stopped" else None

    def kill(self) -> None:
        with self._lock:
            if self.state in ("lost", "killed", "stopped"):
                return
            was = self.state
            self.state = "killed"
            fut, self._future = self._future, None
        self._backend.lane_killed(self, fut, was == "ready")

    def stop(self) -> bool:
        with self._lock:
            if self.state in ("lost", "killed", "stopped"):
                return False
            self.state = "stopped"
            fut, self._future = self._future, None
        self._backend.lane_stopped(self, fut)
        return False

    def close(self) -> None:
        self._backend.forget(self)
        self._r.close()
        self._w.close()


def _describe(exc: BaseException) -> str:
    return proto.describe_error(exc)
