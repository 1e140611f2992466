"""The worker side: run ``send_fn`` on leased batches and report what happened.

A worker process imports little (the stdlib, the protocol, and cloudpickle only for what was
sent by value), ignores SIGINT (the parent decides what an interrupt means), and runs one loop:
receive a lease frame, unpickle its items, call ``send_fn``, answer ``Done`` or ``Failed``.
Every failure becomes a message, never a dead pipe. A watchdog thread ends the worker within
about half a second of its parent's death, even when the parent was SIGKILLed while ``send_fn``
is busy; a worker that finds its result pipe closed when it reports how its start went (its
parent died, or ended the channel, during ``worker_init``) ends as quietly, with the same status.

:func:`~._lease_call.run_lease` (one send, and its answer) is shared with the thread backend,
which calls it without any pickling; it is re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from .. import _protocol as proto
from .._batch import Batch
from .._worker_logging import Shipper, install_shipper
from ..errors import WorkerStartFailed
from ._lease_call import diff_data, run_lease, send_leased
from ._usercode import UserCode

__all__ = ["diff_data", "run_lease", "worker_main"]

WATCHDOG_PERIOD = 0.5
#: The exit status of a worker that ends because its parent went away (died, or gave it up and
#: closed its pipes): it ends at once and says nothing, since nobody is left to read it.
PARENT_GONE = 70
#: The exit status of a process forked by ``send_fn`` or ``worker_init`` that raised out of it
#: into the worker's code (one that returned exits with 0): see :func:`leave_if_forked`.
FORKED_CHILD_RAISED = 1


def leave_if_forked(owner: int, exc: BaseException | None = None) -> None:
    """End, at once, a process that the user's code forked and that came back into the worker's
    code (``send_fn`` or ``worker_init`` returned, or raised, in the child too).

    Such a child shares the worker's pipes: went on, it would answer leases of the worker
    and read its next ones. So it writes nothing to them and exits with ``os._exit``, as
    ``multiprocessing``'s children do (no ``atexit``, no flushing of buffers it shares with the
    worker): 0 when the user's code returned there, :data:`FORKED_CHILD_RAISED` when it raised,
    saying so on stderr. ``owner`` is the worker's pid."""
    if os.getpid() == owner:
        return
    if exc is None:
        os._exit(0)
    with contextlib.suppress(BaseException):
        note = (
            f"procdispatch: process {os.getpid()}, forked by the user's code in the worker "
            f"(pid {owner}), raised {type(exc).__qualname__} out of it into the worker: it "
            "exits here (end a forked child with os._exit)\n"
        )
        os.write(2, note.encode(errors="replace"))
    os._exit(FORKED_CHILD_RAISED)


def _watch_parent(parent_pid: int, parent_sentinel: int | None) -> None:
    """Exit the worker soon after the parent dies (a SIGKILLed parent closes nothing for us)."""
    waitables = [parent_sentinel] if parent_sentinel is not None else []
    while True:
        if waitables:
            if wait(waitables, WATCHDOG_PERIOD):
                os._exit(PARENT_GONE)
        else:
            threading.Event().wait(WATCHDOG_PERIOD)
        if os.getppid() != parent_pid and not _pid_alive(parent_pid):
            os._exit(PARENT_GONE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_main(
    leases: Connection,
    results: Connection,
    payload: bytes,
    parent_pid: int,
    wid: int = 0,
    shipped: str = "send_fn",
    log_level: int = logging.WARNING,
) -> None:
    """Entry point of a worker process (the target of ``multiprocessing.Process``): worker
    ``wid``; ``shipped`` names what ``payload`` holds (see ``_shipping.describe_payload``);
    records at ``log_level`` and above go to the parent's logging."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import multiprocessing

    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None
    if os.getppid() == parent_pid:
        sentinel = None  # our direct parent: getppid() tells us when it goes
    threading.Thread(
        target=_watch_parent, args=(parent_pid, sentinel), name="procdispatch-watchdog", daemon=True
    ).start()
    lease_fd = leases.fileno()
    out = _ResultPipe(results.fileno())
    shipper = install_shipper(wid, log_level, out.send_log)
    shipper.begin(None)
    try:
        send_fn, worker_init = pickle.loads(payload)
    except BaseException as exc:
        from ._shipping import FIX

        err = WorkerStartFailed(
            f"{shipped} could not be loaded in worker {wid} (pid {os.getpid()}): "
            f"{type(exc).__name__}: {proto.text_of(exc)}; {FIX}"
        )
        err.__cause__ = exc
        shipper.end()
        _say(out, proto.encode_init_failed(err))
        os._exit(3)
    me = os.getpid()
    try:
        user = UserCode(send_fn, worker_init)  # runs worker_init (on an event loop when async)
    except BaseException as exc:
        leave_if_forked(me, exc)
        shipper.end()
        _say(out, proto.encode_init_failed(exc))
        os._exit(3)
    leave_if_forked(me)
    shipper.end()
    _say(out, proto.encode_ready(me))
    _serve(lease_fd, out, user.send, shipper, me)
    user.close()
    # Skip interpreter teardown (as fork-started multiprocessing children do): the channel's
    # drain waits for workers to exit, and the user's resources were set up by worker_init.
    _flush_std_streams()
    os._exit(0)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _say(out: _ResultPipe, body: bytes) -> None:
    """Send what the worker's start came to; a parent that went away while it started (the
    channel ended, or gave this start up, and closed the pipe) reads nothing more: end quietly."""
    try:
        out.send(body)
    except OSError:
        _flush_std_streams()
        os._exit(PARENT_GONE)


class _Unmapped:
    """Stands for an arena the worker could not map (or was never named: a protocol error):
    its leases fail, saying why."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def decode(self, body: bytes | bytearray) -> proto.Lease:
        raise RuntimeError(
            "this worker could not map the shared memory that carries large items: "
            f"{type(self.error).__name__}: {self.error}"
        ) from self.error


def _open_arena(body: bytes | bytearray) -> Any:
    from ._arena import WorkerArena

    try:
        return WorkerArena(body)
    except Exception as exc:
        return _Unmapped(exc)


class _ResultPipe:
    """The result pipe: one frame at a time, from the worker's loop and from whatever thread
    of ``send_fn`` logs (frames of two threads must not interleave)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.RLock()
        self._owner = os.getpid()

    def send(self, body: bytes) -> None:
        leave_if_forked(self._owner)  # never write from a child of the user's code
        with self._lock:
            proto.write_frame(self._fd, body)

    def send_framed(self, data: bytes) -> None:
        """Write a whole small frame (a Done)."""
        with self._lock:
            while data:
                data = data[os.write(self._fd, data) :]

    def send_log(self, pickled_attrs: bytes) -> None:
        if os.getpid() != self._owner:
            return  # a child of the user's code logging: its frames would mix with the worker's
        self.send(proto.encode_log(pickled_attrs))


def _serve(
    lease_fd: int,
    out: _ResultPipe,
    send_fn: Callable[[Batch[Any]], object],
    shipper: Shipper,
    owner: int,
) -> None:
    """Answer leases until the stop request or the end of the lease pipe."""
    reader = proto.FrameReader(lease_fd)
    # The shared memory of large items, once the coordinator names it (before any lease in it).
    arena: Any = _Unmapped(RuntimeError("no shared memory was named to this worker"))
    # Bound once: the loop below runs once per lease, and a quick send makes these lookups a
    # visible share of the worker's time.
    read, monotonic, getpid = reader.read, time.monotonic, os.getpid
    header, lease_items = proto.HEADER.unpack_from, proto.lease_items
    begin, end, answer, done_frame = shipper.begin, shipper.end, out.send_framed, proto.framed_done
    k_lease = proto.K_LEASE
    while True:
        try:
            body = read()
        except OSError:
            return
        if body is None:
            return  # the end of the pipe
        kind = body[0]
        if kind != k_lease:
            if kind == proto.K_ARENA:
                arena = _open_arena(body)
                continue
            if kind != proto.K_LEASE_OOB:
                return  # the stop request
        start = monotonic()  # unpickling counts: the worker is busy with the lease
        _, bid, attempt, synthetic = header(body)
        begin(bid)
        res: float | proto.Failed
        try:
            if kind == k_lease:
                data, meta = lease_items(body)
            else:
                lease = arena.decode(body)
                data, meta = lease.data, lease.meta
        except BaseException as exc:
            res = proto.Failed(bid, attempt, exc, None, None, False, None)
        else:
            res = send_leased(send_fn, data, meta, bid, attempt, bool(synthetic), start)
            del data, meta
            if getpid() != owner:  # a child of the user's code came back here
                leave_if_forked(owner, None if isinstance(res, float) else res.error)
        del body
        end()  # its records go before its answer
        try:
            if isinstance(res, float):
                answer(done_frame(bid, attempt, res))
            else:
                out.send(proto.encode_result(res))
        except OSError:
            return
