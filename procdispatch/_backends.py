"""Worker handles: what the coordinator needs from one worker, for processes and for threads.

A handle starts its worker, hands it a lease, gives the coordinator the objects to wait on (the
result pipe, and for a process its sentinel), returns the messages that arrived, and can kill the
worker. The process backend pickles leases and results over two one-way pipes per worker (so a
death identifies exactly the batches that worker held). The thread backend runs ``send_fn`` in a
thread of the parent with no pickling at all -- for stepping through ``send_fn`` in a debugger --
and wakes the coordinator through a socket pair; a thread cannot be killed, so "kill" abandons it.

Neither pipe ever blocks the coordinator. Results are read without blocking. Leases and the stop
frame are written without blocking: a frame that fits in the pipe goes in with one write; what
does not fit waits in the handle's outgoing queue, and the coordinator's selector watches the
pipe for room and calls :meth:`WorkerHandle.flush`. So a worker blocked writing a large result
while a large lease waits for it cannot deadlock the two, and a worker busy with one batch cannot
hold up the coordinator's timers by not reading the next. The handle counts the leases not yet
wholly in the pipe: the worker never saw those, so its death does not count against them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from . import _protocol as proto
from ._worker import run_lease, worker_main
from .buffer import Batch

__all__ = ["ProcessWorker", "ThreadWorker", "WorkerHandle"]

READ_SIZE = 1 << 16
_SIZE = struct.Struct("!i")  # Connection.send_bytes framing: size, or -1 then a !Q size
_BIG = struct.Struct("!Q")
#: Leases up to this size are framed here, in one write of a copy; larger ones go out with one
#: writev of the size and the payload, which is not copied.
_COPY_MAX = 16384
#: Frames above this size carry a -1 and an 8-byte size, as in Connection.send_bytes.
_SMALL_LIMIT = 0x7FFFFFFF
_STOP = _SIZE.pack(len(proto.STOP_FRAME)) + proto.STOP_FRAME
_write = os.write


class WorkerHandle:
    """Interface of one worker as the coordinator sees it."""

    pid: int | None = None

    def start(self) -> None:
        raise NotImplementedError

    def send_lease(self, batch: Batch[Any], payload: bytes | None) -> bool:
        """Hand the worker a lease: the framed, pickled lease for processes; the batch's
        fields as they are for threads. Never blocks; True when part of it waits in the
        outgoing queue (the caller then watches :meth:`write_fd` and calls :meth:`flush`)."""
        raise NotImplementedError

    def nonblocking(self) -> None:
        """Make writes to the worker non-blocking; called once, right after :meth:`start`."""

    def write_fd(self) -> int:
        """The descriptor to watch for room while the outgoing queue is not empty."""
        raise NotImplementedError

    def flush(self) -> bool:
        """Write what the outgoing queue holds, without blocking; True once it is empty.
        Raises OSError when the worker's end of the pipe is gone."""
        return True

    def unsent(self) -> int:
        """Leases handed to :meth:`send_lease` and not yet wholly written to the worker."""
        return 0

    def waitables(self) -> tuple[Any, Any]:
        """(the result pipe, the death sentinel or None) for the coordinator's selector."""
        raise NotImplementedError

    def receive(self) -> tuple[list[proto.WorkerMessage], bool]:
        """Called when the result pipe is readable: the messages, and whether it is closed."""
        raise NotImplementedError

    def drain(self) -> list[proto.WorkerMessage]:
        """Called when the worker died: whatever it managed to send before."""
        raise NotImplementedError

    def exitcode(self, wait: float) -> int | None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def stop(self) -> bool:
        """Ask the worker to exit once idle, without blocking; True when the request waits in
        the outgoing queue (as for :meth:`send_lease`)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the handle's resources (pipes); the worker is already gone or killed."""
        raise NotImplementedError

    def disown(self) -> None:
        """In a child forked from the coordinator's process: forget the worker, which belongs
        to the parent, without touching it."""


class ProcessWorker(WorkerHandle):
    """A worker process with two one-way pipes: leases go down one, results come up the other.

    The result pipe is read without blocking, straight from its descriptor, and split into
    frames here (the framing of ``Connection.send_bytes``): one read usually brings a whole
    small result, or several, instead of two reads per frame.
    """

    def __init__(self, ctx: Any, payload: bytes, wid: int) -> None:
        self._ctx = ctx
        self._payload = payload
        self._wid = wid
        self._lease_w: Connection | None = None
        self._lease_fd = -1
        self._result_r: Connection | None = None
        self._fd = -1
        self._rbuf = bytearray()
        self._proc: Any = None

    def start(self) -> None:
        lease_r, lease_w = self._ctx.Pipe(duplex=False)
        result_r, result_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_main,
            args=(lease_r, result_w, self._payload, os.getpid()),
            name=f"procdispatch-worker-{self._wid}",
            daemon=True,
        )
        try:
            proc.start()
        except BaseException:
            for c in (lease_w, result_r):
                c.close()
            raise
        finally:
            lease_r.close()
            result_w.close()
        self._lease_w = lease_w
        self._lease_fd = lease_w.fileno()
        self._result_r = result_r
        self._fd = result_r.fileno()
        os.set_blocking(self._fd, False)
        self._proc = proc
        self.pid = proc.pid

    #: Frames (or their unwritten tails) waiting for room in the lease pipe, oldest first,
    #: each with whether it ends a lease; None while nothing waits (the usual case). Class
    #: defaults, so that the queue exists only for a worker that ever had to wait.
    _out: collections.deque[tuple[memoryview, bool]] | None = None
    _unsent = 0

    def nonblocking(self) -> None:
        os.set_blocking(self._lease_fd, False)

    def write_fd(self) -> int:
        return self._lease_fd

    def unsent(self) -> int:
        return self._unsent

    def send_lease(self, batch: Batch[Any], payload: bytes | None) -> bool:
        assert payload is not None
        n = len(payload)
        if n > _COPY_MAX:
            # Large: the size and the payload go out in one writev, without copying the payload.
            head = _SIZE.pack(n) if n <= _SMALL_LIMIT else _SIZE.pack(-1) + _BIG.pack(n)
            return self._put((head, payload), True)
        # Connection.send_bytes's framing, written directly: one write call and none of its
        # per-call checks (this runs once per batch on the coordinator thread).
        frame = _SIZE.pack(n) + payload
        if self._out is None:
            try:
                written = _write(self._lease_fd, frame)
            except BlockingIOError:
                written = 0
            except OSError:
                self._unsent += 1  # it never reached the worker
                raise
            if written == len(frame):
                return False
            frame = frame[written:]
        return self._put((frame,), True)

    def _put(self, parts: tuple[bytes, ...], ends_lease: bool) -> bool:
        """Queue what of a frame is not written yet; True when something waits. A frame in
        parts (a large lease) is first written with one writev, unless frames already wait; a
        frame in one part comes from a caller that already wrote what the pipe took."""
        written = 0
        if self._out is None and len(parts) > 1:
            try:
                written = os.writev(self._lease_fd, parts)
            except BlockingIOError:
                pass
            except OSError:
                if ends_lease:
                    self._unsent += 1
                raise
        waits = False
        for i, part in enumerate(parts):
            if written >= len(part):
                written -= len(part)
                continue
            if self._out is None:
                self._out = collections.deque()
            last = ends_lease and i == len(parts) - 1
            self._out.append((memoryview(part)[written:], last))
            written = 0
            waits = True
        if waits and ends_lease:
            self._unsent += 1
        return waits

    def flush(self) -> bool:
        out = self._out
        if out is None:
            return True
        fd = self._lease_fd
        while out:
            view, ends_lease = out[0]
            try:
                written = _write(fd, view)
            except BlockingIOError:
                return False
            if written < len(view):
                out[0] = (view[written:], ends_lease)
                return False
            out.popleft()
            if ends_lease:
                self._unsent -= 1
        self._out = None
        return True

    def waitables(self) -> tuple[Any, Any]:
        return self._result_r, self._proc.sentinel

    def receive(self) -> tuple[list[proto.WorkerMessage], bool]:
        gone = False
        buf = self._rbuf
        try:
            while True:
                chunk = os.read(self._fd, READ_SIZE)
                if not chunk:
                    gone = True
                    break
                buf += chunk
                if len(chunk) < READ_SIZE:
                    break
        except BlockingIOError:
            pass
        except OSError:
            gone = True
        out: list[proto.WorkerMessage] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _SIZE.unpack_from(buf, pos)
            head = 4
            if size == -1:
                if n - pos < 12:
                    break
                (size,) = _BIG.unpack_from(buf, pos + 4)
                head = 12
            if n - pos - head < size:
                break
            start = pos + head
            out.append(proto.decode_from_worker(bytes(buf[start : start + size])))
            pos = start + size
        if pos:
            del buf[:pos]
        return out, gone

    def drain(self) -> list[proto.WorkerMessage]:
        return self.receive()[0]

    def exitcode(self, wait: float) -> int | None:
        self._proc.join(wait)
        code: int | None = self._proc.exitcode
        return code

    def kill(self) -> None:
        if self._proc is not None and self._proc.exitcode is None:
            self._proc.kill()

    def stop(self) -> bool:
        if self._lease_w is None or self._lease_w.closed:
            return False
        written = 0
        if self._out is None:
            try:
                written = _write(self._lease_fd, _STOP)
            except BlockingIOError:
                pass
            except OSError:
                return False  # the worker is gone: nothing to stop
            if written == len(_STOP):
                return False
        return self._put((_STOP[written:],), False)

    def close(self) -> None:
        self._out = None
        for c in (self._lease_w, self._result_r):
            if c is not None:
                c.close()
        if self._proc is not None:
            self._proc.join(0)
            if self._proc.exitcode is not None:
                self._proc.close()

    def disown(self) -> None:
        # multiprocessing's exit hook terminates and joins every daemon process in its table
        # of children, and a forked child inherits the table: it would SIGTERM our workers.
        from multiprocessing import process

        if self._proc is not None:
            process._children.discard(self._proc)  # type: ignore[attr-defined]


class ThreadWorker(WorkerHandle):
    def __init__(
        self,
        send_fn: Callable[[Batch[Any]], object],
        worker_init: Callable[[], object] | None,
        wid: int,
    ) -> None:
        self._send_fn = send_fn
        self._init = worker_init
        self._wid = wid
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._inbox: collections.deque[proto.Lease | None] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._out: collections.deque[proto.WorkerMessage] = collections.deque()
        self._abandoned = False
        self._thread: threading.Thread | None = None
        self.pid = os.getpid()

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
            if self._init is not None:
                self._init()
        except BaseException as exc:
            self._post(proto.InitFailed(exc))
            return
        self._post(proto.Ready(self.pid or 0))
        while True:
            with self._ready:
                while not self._inbox:
                    self._ready.wait()
                lease = self._inbox.popleft()
            if lease is None or self._abandoned:
                return
            self._post(run_lease(self._send_fn, lease))

    def send_lease(self, batch: Batch[Any], payload: bytes | None) -> bool:
        lease = proto.Lease(batch.id, batch.attempt, batch.synthetic, batch.data, batch.meta)
        with self._ready:
            self._inbox.append(lease)
            self._ready.notify()
        return False

    def write_fd(self) -> int:
        return self._w.fileno()  # never watched: nothing waits to be written

    def waitables(self) -> tuple[Any, Any]:
        return self._r, None

    def receive(self) -> tuple[list[proto.WorkerMessage], bool]:
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        return self.drain(), False

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
