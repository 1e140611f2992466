"""The thread backend: ``send_fn`` runs in threads of this process, with nothing pickled.

For stepping through ``send_fn`` in a debugger, and for tests: the semantics are the
channel's, but leases and results are handed over as the message objects themselves, and the
coordinator is woken through a socket pair. A thread cannot be killed, so ``send_timeout``, the
end of ``cancel_grace`` and ``start_timeout`` abandon it instead: it may run on.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _protocol as proto
from .._worker_logging import current, stamp_thread_records
from . import Backend, WorkerHandle
from ._usercode import UserCode
from ._worker import leave_if_forked, run_lease

if TYPE_CHECKING:
    from .._batch import Batch
    from .._options import ChannelOptions

__all__ = ["ThreadBackend", "ThreadWorker"]


class ThreadBackend(Backend):
    """Workers are threads of this process."""

    name = "thread"

    def prepare(self, send_fn: Callable[[Batch[Any]], object], options: ChannelOptions) -> None:
        self._send_fn = send_fn
        self._init = options.worker_init
        # On each worker thread: what of the user's code it is running, if any.
        self._running = threading.local()
        stamp_thread_records()

    def start_worker(self, wid: int) -> WorkerHandle:
        handle = ThreadWorker(self._send_fn, self._init, wid, self._running)
        handle.start()
        return handle

    def running_user_code(self) -> str | None:
        what: str | None = getattr(self._running, "what", None)
        return what


class ThreadWorker(WorkerHandle):
    """A thread of this process running ``send_fn``; it wakes the coordinator through a
    socket pair. A thread cannot be killed: "kill" abandons it (it may run on)."""

    killable = False

    def __init__(
        self,
        send_fn: Callable[[Batch[Any]], object],
        worker_init: Callable[[], object] | None,
        wid: int,
        running: threading.local | None = None,
    ) -> None:
        self._send_fn = send_fn
        self._init = worker_init
        self._wid = wid
        self._running = threading.local() if running is None else running
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._inbox: collections.deque[proto.Lease | None] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._out: collections.deque[proto.WorkerMessage] = collections.deque()
        self._abandoned = False
        # Set once _main has posted its last message: receive() then reports the worker gone,
        # as a process's end of file does (an init that raised is a failed start at once).
        self._ended = False
        self._thread: threading.Thread | None = None
        self.pid = self._owner = os.getpid()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._main, name=f"procdispatch-thread-worker-{self._wid}", daemon=True
        )
        self._thread.start()

    def _post(self, msg: proto.WorkerMessage) -> None:
        if self._abandoned:
            return
        self._out.append(msg)
        with contextlib.suppress(OSError):
            self._w.send(b"\0")

    def _main(self) -> None:
        try:
            self._serve()
        finally:
            self._ended = True
            with contextlib.suppress(OSError):
                self._w.send(b"\0")

    def _serve(self) -> None:
        # This thread's records carry its worker number, and the batch it is sending.
        current.set((self._wid, None))
        running = self._running
        running.what = "worker_init"
        try:
            user = UserCode(self._send_fn, self._init)  # an event loop of this thread if async
        except BaseException as exc:
            leave_if_forked(self._owner, exc)  # a child forked there has no coordinator to tell
            self._post(proto.InitFailed(exc))
            return
        finally:
            running.what = None
        leave_if_forked(self._owner)
        try:
            self._post(proto.Ready(self.pid or 0))
            while True:
                with self._ready:
                    while not self._inbox:
                        self._ready.wait()
                    lease = self._inbox.popleft()
                if lease is None or self._abandoned:
                    return
                current.set((self._wid, lease.batch_id))
                running.what = "send_fn"
                try:
                    result = run_lease(user.send, lease)
                finally:
                    running.what = None
                leave_if_forked(self._owner, getattr(result, "error", None))
                current.set((self._wid, None))
                self._post(result)
        finally:
            user.close()

    def send_lease(self, batch: Batch[Any]) -> bool:
        # The coordinator's own list: nothing changes it while it is leased, and run_lease
        # gives send_fn a copy.
        lease = proto.Lease(batch.id, batch.attempt, batch.synthetic, batch.data, batch.meta)
        with self._ready:
            self._inbox.append(lease)
            self._ready.notify()
        return False

    def waitables(self) -> tuple[Any, Any]:
        return self._r, None

    def receive(self) -> tuple[list[proto.WorkerMessage], bool]:
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        ended = self._ended  # read first: every message posted before it is drained below
        return self.drain(), ended

    def drain(self) -> list[proto.WorkerMessage]:
        out: list[proto.WorkerMessage] = []
        while self._out:
            out.append(self._out.popleft())
        return out

    def exitcode(self, wait: float) -> int | None:
        t = self._thread
        if t is None or self._abandoned:
            return None  # an abandoned thread may run on for ever: never wait for it
        t.join(wait)
        return None if t.is_alive() else 0

    def kill(self) -> None:
        self._abandoned = True
        self.stop()

    def stop(self) -> bool:
        with self._ready:
            self._inbox.append(None)
            self._ready.notify()
        return False

    def close(self) -> None:
        self._r.close()
        self._w.close()
