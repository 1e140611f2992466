"""A lane: one thread of one Dask worker, as the coordinator sees a worker.

A lane holds at most one lease at a time: a task submitted with ``pure=False, retries=0`` and
pinned to its Dask worker (``workers=[address], allow_other_workers=False``). Pinning is what
makes a finished send final: Dask recomputes a finished task whose result was lost with its
worker while a client still wanted it, and a task pinned to a worker that is gone can never run
again. So a send whose answer reached the coordinator is never repeated, and one whose worker
died before its answer came is failed here (``WorkerCrashed``) and retried by the channel's
policy: at least once, never by Dask.

Answers come on the client's event loop (:meth:`DaskLane.track`): a send that returned answers
None, which the scheduler's completion message says (it carries the result's type), so nothing
is gathered; a failure's answer is gathered. The future is released at once, and the answer
posted to the lane, which wakes the coordinator through a socket pair, as the thread backend
does. The lane's life:

================  ====================================================================
``waiting``       started; no Dask worker thread is free for it yet (the backend assigns
                  one, and the lane says Ready)
``ready``         pinned to ``where``; holds no lease or one
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
import socket
import threading
from typing import TYPE_CHECKING, Any

from .. import _protocol as proto
from . import WorkerHandle
from ._dask_worker import run_lease_task

if TYPE_CHECKING:
    from .._batch import Batch
    from .dask import DaskBackend

__all__ = ["DaskLane"]


class DaskLane(WorkerHandle):
    """One Dask worker thread's worth of a channel's workers; see the module docstring."""

    def __init__(self, backend: DaskBackend, wid: int, killable: bool) -> None:
        self._backend = backend
        self.wid = wid
        self.killable = killable
        self.state = "waiting"
        self._lock = threading.Lock()  # state, _future, _out between the loop and the coordinator
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._out: collections.deque[proto.WorkerMessage] = collections.deque()
        self._future: Any = None
        self._unsent = 0
        self._seq = 0

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
        """Its worker left the cluster: what it held may have been sent."""
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
            self._seq += 1
            try:
                fut = self._backend.client.submit(
                    run_lease_task,
                    self._backend.plugin_name,
                    head,
                    payload,
                    key=f"procdispatch-send-{self._backend.token}-{self.wid}-{self._seq}",
                    workers=[self.where],
                    allow_other_workers=False,
                    pure=False,
                    retries=0,
                )
            except Exception as exc:  # a closed client, say: the lease never left
                self.state = "lost"
                self._unsent += 1
                raise OSError(f"lane {self.wid} could not submit its lease: {exc!r}") from exc
            self._future = fut
        done = proto.Done(batch.id, batch.attempt)
        asyncio.run_coroutine_threadsafe(self.track(fut, done), self._backend.loop)
        return False

    async def track(self, fut: Any, done: proto.Done) -> None:
        """On the client's loop: wait for the task, gather its answer unless it is a plain
        Done (a task whose result is None), release the future."""
        try:
            await fut._state.wait()
            result: Any
            if fut.status == "finished" and fut.type is type(None):
                result = done  # the key's type came with its completion: nothing to fetch
            else:
                result = await fut._result(raiseit=False)
                if result is None:
                    result = done
        except BaseException as exc:  # a gather that failed: the lane hears it as a loss
            result = (type(exc), exc, None)
        finally:
            fut.release()
        answered = isinstance(result, (bytes, proto.Done))
        with self._lock:
            if self._future is not fut or self.state != "ready":
                return  # killed or lost meanwhile: nobody waits for this answer
            self._future = None
            if not answered:
                self.state = "lost"
        if isinstance(result, proto.Done):
            self._post(result)
            return
        if isinstance(result, bytes):
            self._answer(result)
            return
        error = result[1] if isinstance(result, tuple) else result
        self._backend.lane_lost(self, f"its task failed in Dask: {_describe(error)}", None)
        self._post(None)

    def _answer(self, body: bytes) -> None:
        msg = proto.decode_from_worker(body)
        if isinstance(msg, proto.InitFailed):
            # worker_init failed on this worker after all: the batch was never sent.
            with self._lock:
                self.state = "lost"
                self._unsent += 1
            self._backend.worker_broken(self, msg.error)
            self._post(msg)
            self._post(None)
            return
        self._post(msg)

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
        return self._unsent

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
