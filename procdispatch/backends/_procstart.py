"""Starting worker processes without running the user's main module in them.

multiprocessing's spawn and forkserver children rebuild ``__main__`` before they run their
target: the parent's preparation data names the main script (``init_main_from_path``) or module
(``init_main_from_name``), and the child runs it again as ``__mp_main__``; the forkserver also
preloads ``__main__`` in the server. A script that makes a channel at module level without
``if __name__ == "__main__":`` would then make another channel during every worker's start-up
(and fail), and a slow or side-effecting main module would run once per worker. Our workers
need none of it: their target is :func:`._worker.worker_main`, and what ``send_fn`` and
``worker_init`` take from ``__main__`` travels by value (:mod:`._shipping`).

So our processes launch through Popen subclasses that drop the ``init_main_*`` keys from the
preparation data (sys.path, the working directory, argv and the authkey still travel; sys.path's
``''`` stands for the directory procdispatch was imported in), and forkserver workers fork from
a server of our own (:mod:`._forkserver`, run with the parent's sys.path) that preloads the
worker module and what the user asked multiprocessing's forkserver to preload, never
``__main__``. The user's own
forkserver, Pools and Processes stay exactly as multiprocessing makes them. fork children copy
the parent and run nothing again: they start the standard way.

The two launch methods repeat the steps of CPython's ``popen_spawn_posix`` and
``popen_forkserver`` (the same from 3.8 to 3.14) with only the preparation data, the server and
the waits (below) changed. What they use is checked once (:func:`avoids_main`); where something
is missing (another platform, a future Python), workers start the standard way, and a channel
made by a script's top-level code outside the main guard fails at once with the fix
(:func:`check_main_guard`) instead of failing in every worker.

A launch runs on a starter thread of the channel and can be given up (a :class:`StartAbort`):
it writes the preparation data and the process object (``send_fn`` and all it closes over)
without blocking, and waits for room in the child's pipe, and for the forkserver's answer, on
the abort's descriptor too. A spawn child given up is killed and reaped there and then; a
forkserver fork given up cannot be (its pid is the server's answer we stop waiting for), so its
data pipe is closed: the child, when the server forks it, reads a truncated process object, or
sees its parent's sentinel ready, and exits.
"""

from __future__ import annotations

import io
import math
import os
import select
import selectors
import signal
import threading
from multiprocessing import process
from typing import TYPE_CHECKING, Any

from ..errors import OptionsError
from ._forkserver import new_server, parent_sys_path
from ._mainguard import unguarded_main_line

if TYPE_CHECKING:
    from . import StartAbort

__all__ = ["WorkerContext", "avoids_main", "check_main_guard", "unguarded_main_line"]

#: What our forkserver imports before it forks: the worker, and this module (the class of the
#: process object each worker unpickles).
_PRELOAD = [__name__.rpartition(".")[0] + "._worker", __name__]

_lock = threading.Lock()  # guards _launchers
_server_lock = threading.Lock()  # guards _server and _server_pid
_launchers: dict[str, Any] | None = None  # start method -> Popen class; {} where unsupported
_server: Any = None
_server_pid = 0  # the process that started _server (a forked child needs its own)


class WorkerProcess(process.BaseProcess):
    """A worker process; ``_start_method`` is set per instance (the child reads it back), and
    ``_abort`` (never pickled) lets the channel give its launch up."""

    _start_method: str | None = None
    _abort: StartAbort | None = None

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _popen_classes()[process_obj._start_method](process_obj)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_abort", None)
        return state


class WorkerContext:
    """What the pool needs of a multiprocessing context: ``Pipe`` and ``Process``."""

    def __init__(self, method: str) -> None:
        import multiprocessing

        self._ctx: Any = multiprocessing.get_context(method)
        self.Pipe: Any = self._ctx.Pipe
        # fork children run nothing again: they start the standard way.
        self._method = method if method in _popen_classes() else None

    def Process(self, abort: StartAbort | None = None, **kwargs: Any) -> Any:
        """A process to start; ``abort`` gives up its launch (a fork child needs none: forking
        cannot block)."""
        if self._method is None:
            return self._ctx.Process(**kwargs)
        proc = WorkerProcess(**kwargs)
        proc._start_method = self._method
        proc._abort = abort
        return proc


def avoids_main(method: str) -> bool:
    """Whether workers started with ``method`` never run the user's main module."""
    return method == "fork" or method in _popen_classes()


def check_main_guard(method: str) -> None:
    """Raise OptionsError when ``method``'s workers would run the main module again, and the
    channel is being made by that module's top-level code outside the main guard (every worker
    would then make a channel of its own while it starts)."""
    if avoids_main(method):
        return
    found = unguarded_main_line()
    if found is None:
        return
    path, line = found
    raise OptionsError(
        f"start_method must be 'fork' for a channel made by the top-level code of a script "
        f"without 'if __name__ == \"__main__\":' on this platform, where {method} workers run "
        f"the script again (got {method!r} at {path}, line {line}): put the code that makes "
        f"the channel under that guard, or pass start_method='fork'"
    )


# ---- launching ------------------------------------------------------------------------------


def _preparation_data(name: str) -> dict[str, Any]:
    from multiprocessing import spawn

    data: dict[str, Any] = spawn.get_preparation_data(name)
    for key in [k for k in data if k.startswith("init_main")]:
        del data[key]
    data["sys_path"] = parent_sys_path()
    return data


def _wait_for(fd: int, events: int, abort: StartAbort) -> None:
    """Wait until ``fd`` is ready for ``events``; raise StartAborted once ``abort`` is set."""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, events)
        sel.register(abort.fileno(), selectors.EVENT_READ)
        while True:
            abort.check()
            if any(key.fd == fd for key, _ in sel.select()):
                abort.check()
                return


def _write_all(fd: int, data: memoryview, abort: StartAbort | None) -> None:
    """Write ``data`` to the pipe ``fd``; with ``abort``, without ever blocking past it."""
    if abort is None:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        return
    os.set_blocking(fd, False)
    view = data.cast("B")
    while view:
        abort.check()
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            _wait_for(fd, selectors.EVENT_WRITE, abort)


def _kill_child(pid: int) -> None:
    """End and reap a child whose launch failed or was given up (nothing else will reap it)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _forkserver() -> Any:
    """Our forkserver (started on first use; one per process, since a forked child cannot wait
    on its parent's server)."""
    global _server, _server_pid
    from multiprocessing import forkserver

    with _server_lock:
        if _server is None or _server_pid != os.getpid():
            server = new_server()
            server.set_forkserver_preload(_preload_list(forkserver))
            _server, _server_pid = server, os.getpid()
        return _server


def _preload_list(forkserver: Any) -> list[str]:
    """What our server imports: what the user asked multiprocessing's forkserver to preload
    (so workers still share it), less ``__main__``, and the worker."""
    standard = getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", None)
    modules = [m for m in standard or () if isinstance(m, str) and m != "__main__"]
    return modules + [m for m in _PRELOAD if m not in modules]


def _popen_classes() -> dict[str, Any]:
    """The Popen classes of our launch methods, built once; {} where they cannot work."""
    global _launchers
    if _launchers is not None:
        return _launchers
    with _lock:
        if _launchers is None:
            try:
                _launchers = _build_popen_classes()
            except (ImportError, AttributeError):
                _launchers = {}
        return _launchers


def _build_popen_classes() -> dict[str, Any]:
    from multiprocessing import context, forkserver, popen_forkserver, popen_spawn_posix, spawn
    from multiprocessing import resource_tracker as tracker
    from multiprocessing import util as mp_util

    # Private parts of multiprocessing, typed loosely; every one is looked up now, so that a
    # missing piece means the standard start (and the main-guard check), never a failure
    # while a worker starts.
    util: Any = mp_util
    reduction: Any = context.reduction  # type: ignore[attr-defined]
    set_spawning_popen: Any = context.set_spawning_popen
    spawn_base: Any = popen_spawn_posix.Popen
    forkserver_base: Any = popen_forkserver.Popen
    for obj, attr in [
        (spawn, "get_preparation_data"),
        (spawn, "get_command_line"),
        (spawn, "get_executable"),
        (util, "spawnv_passfds"),
        (util, "close_fds"),
        (util, "Finalize"),
        (tracker, "getfd"),
        (reduction, "dump"),
        (forkserver, "read_signed"),
        (forkserver.ForkServer, "connect_to_new_process"),
        (forkserver.ForkServer, "set_forkserver_preload"),
        (forkserver_base, "_launch"),
        (spawn_base, "_launch"),
    ]:
        getattr(obj, attr)

    def dump(popen: Any, process_obj: Any) -> io.BytesIO:
        buf = io.BytesIO()
        set_spawning_popen(popen)
        try:
            reduction.dump(_preparation_data(process_obj._name), buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        return buf

    class SpawnPopen(spawn_base):  # type: ignore[misc]
        def _launch(self, process_obj: Any) -> None:
            abort = process_obj._abort
            tracker_fd = tracker.getfd()
            self._fds.append(tracker_fd)
            buf = dump(self, process_obj)
            if abort is not None:
                abort.check()
            parent_r = child_w = child_r = parent_w = None
            pid = None
            launched = False
            try:
                parent_r, child_w = os.pipe()
                child_r, parent_w = os.pipe()
                cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
                self._fds.extend([child_r, child_w])
                self.pid = pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
                self.sentinel = parent_r
                with buf.getbuffer() as data:
                    _write_all(parent_w, data, abort)
                launched = True
            finally:
                ours = [fd for fd in (parent_r, parent_w) if fd is not None]
                self.finalizer = util.Finalize(self, util.close_fds, ours)
                for fd in (child_r, child_w):
                    if fd is not None:
                        os.close(fd)
                if not launched:
                    if pid is not None:
                        _kill_child(pid)  # given up, or it died: nothing else reaps it
                    self.finalizer()

    class ForkServerPopen(forkserver_base):  # type: ignore[misc]
        def _launch(self, process_obj: Any) -> None:
            abort = process_obj._abort
            buf = dump(self, process_obj)
            if abort is not None:
                abort.check()
            self.sentinel, w = _forkserver().connect_to_new_process(self._fds)
            # The child learns of our death from its copy of the data pipe's write end.
            parent_w = os.dup(w)
            self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
            try:
                try:
                    with buf.getbuffer() as data:
                        _write_all(w, data, abort)
                finally:
                    os.close(w)
                if abort is not None:
                    _wait_for(self.sentinel, selectors.EVENT_READ, abort)
                self.pid = forkserver.read_signed(self.sentinel)
            except BaseException:
                try:
                    if getattr(self, "pid", None) is None:
                        _end_server_child(self.sentinel)
                finally:
                    self.finalizer()  # the child, if the server still forks it, sees our end
                raise

    return {"spawn": SpawnPopen, "forkserver": ForkServerPopen}


def _end_server_child(sentinel: int, wait: float = 1.0) -> None:
    """A forkserver launch given up before its pid was read: the server reports the pid as soon
    as it has forked, so read it (for at most ``wait`` seconds: a stopped server never answers)
    and kill the child before it reads the payload cut short, which it would report on stderr
    as an EOFError. The server reaps it; wait for its end so that none outlives the channel."""
    try:
        if not _readable(sentinel, wait):
            return
        from multiprocessing import forkserver

        pid = forkserver.read_signed(sentinel)
        os.kill(pid, signal.SIGKILL)
    except (OSError, EOFError):
        return
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return  # gone already, or no pidfd here: the kill is enough
    try:
        _readable(pidfd, wait)
    finally:
        os.close(pidfd)


def _readable(fd: int, wait: float) -> bool:
    """Whether ``fd`` becomes readable within ``wait`` seconds. poll, not select: a channel
    with many workers has descriptors past select's limit (FD_SETSIZE, 1024)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(wait * 1000))))
