"""The process backend: each worker a process, leases and results pickled over two pipes.

One pipe pair per worker, so a worker's death identifies exactly the batches it held. Neither
pipe ever blocks the coordinator. Results are read without blocking, and split into frames by
:class:`~procdispatch._protocol.FrameSplitter`. Leases and the stop request are written without
blocking: a frame that fits in the pipe goes in with one write; what does not fit waits in the
handle's outgoing queue, and the coordinator's selector watches the pipe for room and calls
:meth:`ProcessWorker.flush`. So a worker blocked writing a large result while a large lease
waits for it cannot deadlock the two, and a worker busy with one batch cannot hold up the
coordinator's timers by not reading the next. The handle counts the leases not yet wholly in
the pipe: the worker never saw those, so its death does not count against them.

Workers start without running the user's main module (:mod:`._procstart`); ``send_fn`` and
``worker_init`` are pickled once per channel (:mod:`._shipping`). A start blocks (a forkserver
round trip, the payload written into the child's pipe), so it runs on a starter thread of the
channel (``start_blocks``) and can be given up through its :class:`StartAbort`.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .. import _protocol as proto
from .._options import QUICK_BYTES
from . import Backend, LeasesHeld, StartAbort, WorkerHandle
from ._arena import Arena, arena_frame, encode_oob_lease, wants_arena
from ._procstart import WorkerContext
from ._shipping import describe_payload, pickle_payload
from ._worker import worker_main

if TYPE_CHECKING:
    from .._batch import Batch
    from .._options import ChannelOptions

__all__ = ["ProcessBackend", "ProcessWorker"]

log = logging.getLogger("procdispatch")

READ_SIZE = 1 << 16
_write = os.write
#: Leases queued beyond what a lease pipe holds wait in the coordinator, and each flush of them
#: costs it a turn: a worker holds as many as PIPE_BYTES takes, but PIPE_LEASES at least (the
#: depth that measured well for every size of lease). Batches of a thousand ints (5 KB) ran
#: 20-25 % slower 32 deep than 8 deep.
PIPE_BYTES = 64 << 10
PIPE_LEASES = 8
#: send_leases writes what it encoded once it holds this much (see there).
FLUSH_BYTES = 16 << 10
#: The most parts one writev takes; the rest wait in the handle's queue.
try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError):  # not a name this system knows
    _IOV_MAX = 16  # the least POSIX allows


class ProcessBackend(Backend):
    """Workers are processes of the channel's ``start_method``."""

    name = "process"
    staggered_start = True  # a worker process costs a core (a whole interpreter) to start
    start_blocks = True  # a forkserver round trip, the payload written into the child's pipe

    def prepare(self, send_fn: Callable[[Batch[Any]], object], options: ChannelOptions) -> None:
        self._payload = pickle_payload(send_fn, options.worker_init, options.start_method)
        self._shipped = describe_payload(send_fn, options.worker_init)
        # Workers send records at the level the parent logs at now, and make none below it.
        self._log_level = logging.getLogger().getEffectiveLevel()
        self._ctx = WorkerContext(options.start_method)

    def start_worker(self, wid: int) -> WorkerHandle:
        handle = ProcessWorker(self._ctx, self._payload, wid, self._shipped, self._log_level)
        handle.start()
        return handle

    def start_worker_abortable(self, wid: int, abort: StartAbort) -> WorkerHandle:
        abort.check()
        handle = ProcessWorker(
            self._ctx, self._payload, wid, self._shipped, self._log_level, abort=abort
        )
        handle.start()
        return handle


class ProcessWorker(WorkerHandle):
    """A worker process with two one-way pipes: leases go down one, results come up the other.

    The result pipe is read without blocking, straight from its descriptor, and split into
    frames here (the framing of ``Connection.send_bytes``): one read usually brings a whole
    small result, or several, instead of two reads per frame.
    """

    def __init__(
        self,
        ctx: Any,
        payload: bytes,
        wid: int,
        shipped: str = "send_fn",
        log_level: int = logging.WARNING,
        abort: StartAbort | None = None,
    ) -> None:
        self._ctx = ctx
        self._payload = payload
        self._wid = wid
        self._shipped = shipped
        self._log_level = log_level
        self._abort = abort
        self._lease_w: Connection | None = None
        self._lease_fd = -1
        self._result_r: Connection | None = None
        self._fd = -1
        self._frames = proto.FrameSplitter()
        self._proc: Any = None

    def start(self) -> None:
        lease_r, lease_w = self._ctx.Pipe(duplex=False)
        result_r, result_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            abort=self._abort,
            target=worker_main,
            args=(
                lease_r,
                result_w,
                self._payload,
                os.getpid(),
                self._wid,
                self._shipped,
                self._log_level,
            ),
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
            self._abort = None  # the launch is over: nothing waits on it any more
        self._lease_w = lease_w
        self._lease_fd = lease_w.fileno()
        os.set_blocking(self._lease_fd, False)  # the coordinator never blocks on a pipe
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

    def write_fd(self) -> int:
        return self._lease_fd

    def unsent(self) -> int:
        return self._unsent

    #: The worker's arena for large buffers (see _arena), made on the first batch of them;
    #: False once it could not be made (everything goes through the pipe then).
    _arena: Arena | bool | None = None
    #: (batch id, attempt) of the leases with space in the arena, oldest first: the worker
    #: answers in order, and each answer to one of them frees the oldest space.
    _in_arena: collections.deque[tuple[int, int]] | None = None
    _arena_named = False  # the K_ARENA frame went ahead of the first lease through it

    sends_together = True

    def send_lease(self, batch: Batch[Any]) -> bool:
        parts, _ = self._lease_frames(batch)
        return self._put_frames(parts, [False] * (len(parts) - 1) + [True], 1)

    def send_leases(self, batches: Sequence[Batch[Any]]) -> tuple[int, bool, Exception | None]:
        """Leases of ``batches`` written together: the frames of several (a large lease's
        parts too) go out with one ``writev``, whose cost, and the worker's reads, are then
        paid once. Small leases are all written at the end; once FLUSH_BYTES of them are
        encoded they are written before the next is encoded, so that a worker waiting for work
        does not wait for the pickling of the others. A batch that cannot be encoded ends the
        run: what came before it is written, and it is returned with its error."""
        frames: list[bytes] = []
        ends: list[bool] = []  # whether each frame ends a lease (a large lease is parts)
        n = written = pending = size = shared = 0
        waits = False
        err: Exception | None = None
        for b in batches:
            try:
                parts, shared = self._lease_frames(b, True)
            except (proto.UnsendableItems, LeasesHeld) as exc:
                err = exc
                break
            if len(parts) == 1:
                frames.append(parts[0])
                ends.append(True)
                size = len(parts[0])
            else:
                frames.extend(parts)
                ends.extend([False] * (len(parts) - 1))
                ends.append(True)
                size = sum([len(p) for p in parts])
            n += 1
            pending += size + shared
            if pending >= FLUSH_BYTES:
                # A worker gone now: the leases not yet written count as unsent.
                waits = self._put_frames(frames, ends, len(batches) - written) or waits
                written, pending, frames, ends = n, 0, [], []
        if not n:
            return 0, False, err
        # The last lease's size, in its pipe and in all (its arena bytes too).
        self.lease_cap = min(
            max(PIPE_LEASES, PIPE_BYTES // size), max(1, QUICK_BYTES // (size + shared))
        )
        if frames:
            waits = self._put_frames(frames, ends, len(batches) - written) or waits
        return n, waits, err

    def _lease_frames(self, batch: Batch[Any], hold: bool = False) -> tuple[tuple[bytes, ...], int]:
        """The frames of a lease, and the bytes it put in the arena: through the arena when
        its items are large buffers, else pickled whole (a large one in two parts, its payload
        not copied). Raises UnsendableItems; with ``hold``, LeasesHeld when the lease would go
        through the arena but for the space its earlier leases hold: a worker handed quick
        sends of large items would otherwise take its later ones through the pipe, at twice
        the copies."""
        data = batch.data
        if (
            data
            and (type(data[0]) is bytes or type(data[0]) is bytearray)  # cheap, before the call
            and self._arena is not False
            and wants_arena(data)
        ):
            parts = self._through_arena(batch)
            arena = self._arena
            if parts is not None:
                assert isinstance(arena, Arena)
                return parts, arena.newest()
            if hold and isinstance(arena, Arena) and arena.short:
                raise LeasesHeld
        return proto.encode_lease(batch), 0

    def _put_frames(self, frames: Sequence[bytes], ends: list[bool], handed: int) -> bool:
        """Write ``frames`` with one writev (``ends``: whether each ends a lease), queueing
        what the pipe did not take; True when something waits. When the worker is gone, the
        ``handed`` leases count as unsent: the caller gives them all to the worker's slot,
        whose death puts them back in the queue."""
        written = 0
        if self._out is None:
            try:
                written = (
                    _write(self._lease_fd, frames[0])
                    if len(frames) == 1
                    else os.writev(self._lease_fd, frames[:_IOV_MAX])
                )
            except BlockingIOError:
                pass
            except OSError:
                self._unsent += handed  # none of them reached the worker
                raise
        waits = False
        for part, last in zip(frames, ends, strict=True):
            if written >= len(part):
                written -= len(part)
                continue
            if self._out is None:
                self._out = collections.deque()
            self._out.append((memoryview(part)[written:], last))
            written = 0
            waits = True
            if last:
                self._unsent += 1
        return waits

    def _through_arena(self, batch: Batch[Any]) -> tuple[bytes, ...] | None:
        """The frames of a lease whose large buffers went into the arena (the arena's own
        frame first, when it was just made); None when it goes through the pipe."""
        arena = self._arena
        if not isinstance(arena, Arena):
            try:
                arena = Arena()
            except OSError as exc:  # no /dev/shm, or not room enough in it
                log.info("worker %d: large items go through its pipe (%s)", self._wid, exc)
                self._arena = False
                return None
            self._arena = arena
            self._in_arena = collections.deque()
        parts = encode_oob_lease(batch, arena)
        if parts is None:
            return None
        assert self._in_arena is not None
        self._in_arena.append((batch.id, batch.attempt))
        if self._arena_named:
            return parts
        self._arena_named = True
        return (arena_frame(arena), *parts)  # the worker maps it before it reads the lease

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
        chunks: list[bytes] = []
        try:
            while True:
                chunk = os.read(self._fd, READ_SIZE)
                if not chunk:
                    gone = True
                    break
                chunks.append(chunk)
                if len(chunk) < READ_SIZE:
                    break
        except BlockingIOError:
            pass
        except OSError:
            gone = True
        msgs = self._frames.messages(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if self._in_arena:
            self._free_answered(msgs)
        return msgs, gone

    def _free_answered(self, msgs: list[proto.WorkerMessage]) -> None:
        """Free the arena space of the leases just answered (the worker copied their buffers
        out before it began the send)."""
        in_arena = self._in_arena
        arena = self._arena
        assert in_arena is not None
        assert isinstance(arena, Arena)
        for m in msgs:
            if (
                in_arena
                and (type(m) is proto.Done or type(m) is proto.Failed)
                and (m.batch_id, m.attempt) == in_arena[0]
            ):
                in_arena.popleft()
                arena.free_oldest()

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
        try:
            return self._put_frames([proto.STOP], [False], 0)
        except OSError:
            return False  # the worker is gone: nothing to stop

    def close(self) -> None:
        self._out = None
        arena, self._arena = self._arena, False
        if isinstance(arena, Arena):
            arena.close()  # whatever ended the worker: the segment goes with its handle
        for c in (self._lease_w, self._result_r):
            if c is not None:
                c.close()
        if self._proc is not None:
            self._proc.join(0)
            if self._proc.exitcode is not None:
                self._proc.close()

    def rss(self) -> int | None:
        import psutil

        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None

    def disown(self) -> None:
        # multiprocessing's exit hook terminates and joins every daemon process in its table
        # of children, and a forked child inherits the table: it would SIGTERM our workers.
        from multiprocessing import process

        if self._proc is not None:
            process._children.discard(self._proc)  # type: ignore[attr-defined]
        if isinstance(self._arena, Arena):
            self._arena.disown()
