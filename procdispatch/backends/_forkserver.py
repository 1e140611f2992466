"""The forkserver our workers fork from: multiprocessing's, run with the parent's sys.path.

A forkserver runs as ``python -c``, so its sys.path starts with its working directory, and
CPython 3.10 to 3.13 hand the parent's sys.path to :func:`multiprocessing.forkserver.main`,
which never sets it (3.14 does). Such a server imports what it preloads (our worker module and
what the user preloads) from its working directory first: run from a directory that holds
another procdispatch (a checkout, say), or a package named like a preloaded one, every worker
forked from it would run that code instead of the parent's.

So where ``main`` takes exactly the arguments of those versions, our server's command sets
sys.path to the parent's before it imports anything, multiprocessing included; the rest is
CPython's ``ForkServer.ensure_running`` (the same from 3.8 to 3.13). Elsewhere the standard
server, which sets sys.path itself, is used as it is (with the sys.path multiprocessing makes
for it, whose ``''`` stands for the directory multiprocessing was first imported in).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

__all__ = ["new_server", "parent_sys_path", "quiet_cut_launches"]

#: The parameters of ``forkserver.main`` in the versions that ignore ``sys_path``.
_IGNORING_MAIN = ["listener_fd", "alive_r", "preload", "main_path", "sys_path"]


def new_server() -> Any:
    """A forkserver (not yet running) whose process has the parent's sys.path."""
    # Imported here, not with the module: the server and every spawned worker import this
    # module (through the class of the process object), and inspect costs them milliseconds of
    # start-up that only the parent's check needs.
    import inspect
    from multiprocessing import forkserver

    if list(inspect.signature(forkserver.main).parameters) != _IGNORING_MAIN:
        return forkserver.ForkServer()
    return _path_server_class()()


def parent_sys_path() -> list[str]:
    """The parent's sys.path as our server and workers get it: ``''`` (``python -c``, the REPL)
    becomes the directory procdispatch was imported in, the one the parent found procdispatch
    in through that entry, wherever the program is now."""
    from multiprocessing import process

    from .. import _IMPORTED_IN

    where = _IMPORTED_IN or getattr(process, "ORIGINAL_DIR", None)
    return [where if entry == "" and where else entry for entry in sys.path]


def server_command(sys_path: list[str], listener_fd: int, alive_r: int, preload: list[str]) -> str:
    """The ``python -c`` program of our server: sys.path first, then a quiet ending for a child
    whose launch was cut short, then multiprocessing's main.

    A child the server forks reads its launch from the parent and reports what it cannot read
    through ``sys.excepthook``. A launch the parent gave up part way (a channel cancelled while
    a worker starts, under load, after its wait for the child's pid ran out) ends in an
    EOFError or a truncated pickle: the parent knows, and there is nothing for the user to
    read, so such a child ends without a traceback."""
    return (
        f"import sys; sys.path[:] = {sys_path!r}; "
        f"from procdispatch.backends._forkserver import quiet_cut_launches; "
        f"quiet_cut_launches(); "
        f"from multiprocessing.forkserver import main; "
        f"main({listener_fd:d}, {alive_r:d}, {preload!r})"
    )


def quiet_cut_launches() -> None:
    """In our forkserver: see :func:`server_command`."""
    import pickle

    report = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(kind, EOFError) or (
            issubclass(kind, pickle.UnpicklingError) and "truncated" in str(exc)
        ):
            return
        report(kind, exc, tb)

    sys.excepthook = hook


def _path_server_class() -> Any:
    from multiprocessing import connection as mp_connection
    from multiprocessing import forkserver, resource_tracker
    from multiprocessing import spawn as mp_spawn
    from multiprocessing import util as mp_util

    # Private parts of multiprocessing, typed loosely.
    connection: Any = mp_connection
    spawn: Any = mp_spawn
    util: Any = mp_util
    base: Any = forkserver.ForkServer

    class PathForkServer(base):  # type: ignore[misc]
        def ensure_running(self: Any) -> None:
            with self._lock:
                resource_tracker.ensure_running()
                if self._forkserver_pid is not None:
                    pid, _ = os.waitpid(self._forkserver_pid, os.WNOHANG)
                    if not pid:
                        return  # still running
                    os.close(self._forkserver_alive_fd)
                    self._forkserver_address = None
                    self._forkserver_alive_fd = None
                    self._forkserver_pid = None
                sys_path = parent_sys_path()
                with socket.socket(socket.AF_UNIX) as listener:
                    address = connection.arbitrary_address("AF_UNIX")
                    listener.bind(address)
                    if not util.is_abstract_socket_namespace(address):
                        os.chmod(address, 0o600)
                    listener.listen()
                    # Every client holds the write end of the "alive" pipe: the server ends
                    # once they all have.
                    alive_r, alive_w = os.pipe()
                    try:
                        cmd = server_command(
                            sys_path, listener.fileno(), alive_r, self._preload_modules
                        )
                        exe = spawn.get_executable()
                        args = [exe, *util._args_from_interpreter_flags(), "-c", cmd]
                        pid = util.spawnv_passfds(exe, args, [listener.fileno(), alive_r])
                    except BaseException:
                        os.close(alive_w)
                        raise
                    finally:
                        os.close(alive_r)
                    self._forkserver_address = address
                    self._forkserver_alive_fd = alive_w
                    self._forkserver_pid = pid

    return PathForkServer
