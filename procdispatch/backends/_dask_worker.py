"""The Dask worker side of the Dask backend: the channel's worker plugin and the task of a lease.

This module is imported by Dask workers (the task and the plugin name it by reference), so
procdispatch must be importable there, as Dask needs of any task's module.

:class:`ChannelPlugin` carries ``send_fn`` and ``worker_init``, pickled once per channel, to
every Dask worker: its ``setup`` runs on each worker there is when the channel registers it and
on every worker that joins later (a replacement for one that died or was restarted).
``worker_init`` runs there once, on a thread of its own so that a slow one never blocks the
worker's event loop. What it raises is kept, never raised: the channel reads it with
:func:`probe` and gives that worker no lease. The pickled function is never scattered: data
scattered to a worker dies with it, a plugin is set up again on the worker that replaces it.

:func:`run_leases_task` is the task of one or more leases of one lane, run one after another: a
module-level function, so each task pickles to its name, the plugin's name and the leases'
bytes. When every send returned, each quickly enough that the coordinator would give its lane
the most batches anyway (see :data:`~procdispatch._options.QUICK_SEND`), the task answers None:
the scheduler's completion message, which carries the result's type, is then the whole answer.
Otherwise it answers, for each lease in order, the bytes a worker process writes into its
result pipe (:func:`~procdispatch._protocol.encode_result`): how long a send took, or its failure
and the batch's change.

A process that ``send_fn`` or ``worker_init`` forks and that comes back into this code (the
user's function returned or raised in the child too) ends there at once
(:func:`~._worker.leave_if_forked`): it is a copy of the Dask worker, and going on it would
answer the task in the worker's place, over the worker's own connections.

A worker's threads share its plugin: ``send_fn``, what ``worker_init`` set up, and, for
asynchronous code, one event loop running on a thread of its own, on which every thread's sends
are run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import threading
from collections.abc import Callable
from typing import Any

from distributed import WorkerPlugin, get_worker

from .. import _protocol as proto
from .._options import DASK_DEPTH, QUICK_SEND
from ._usercode import CLOSE_TIMEOUT, _is_async
from ._worker import leave_if_forked, run_lease

__all__ = ["ChannelPlugin", "SharedUserCode", "kill_worker_process", "probe", "run_leases_task"]

#: A send quicker than this leaves its lane the most batches (the coordinator's rule for a Done,
#: with DaskBackend.lease_depth): its task then answers None, and the client learns of it with
#: no gather.
QUICK = QUICK_SEND / DASK_DEPTH


class SharedUserCode:
    """``send_fn`` and ``worker_init`` of one Dask worker, shared by its threads. Making it runs
    ``worker_init``. Asynchronous code runs on one event loop, on a thread of its own, so that
    clients made by ``worker_init`` are used on the loop they were made on."""

    def __init__(
        self, send_fn: Callable[[Any], object], worker_init: Callable[[], object] | None
    ) -> None:
        self._send_fn = send_fn
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        if _is_async(send_fn) or (worker_init is not None and _is_async(worker_init)):
            self._start_loop()
        if worker_init is not None:
            try:
                self._settle(self._forked_back(worker_init))
            except BaseException:
                self.close()
                raise

    def send(self, batch: Any) -> object:
        return self._settle(self._forked_back(self._send_fn, batch))

    def _forked_back(self, fn: Callable[..., object], *args: Any) -> object:
        """``fn(*args)``, in the worker only: a child it forked ends here (module docstring)."""
        try:
            result = fn(*args)
        except BaseException as exc:
            leave_if_forked(self._owner, exc)
            raise
        leave_if_forked(self._owner)
        return result

    def _settle(self, result: object) -> object:
        if result is None:
            return None
        import inspect

        if not inspect.isawaitable(result):
            return result
        loop = self._start_loop()
        return asyncio.run_coroutine_threadsafe(_awaited(result, self._owner), loop).result()

    def _start_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=loop.run_forever, name="procdispatch-dask-loop", daemon=True
                )
                self._thread.start()
                self._loop = loop
            return self._loop

    def close(self) -> None:
        """End the loop, if there is one: its tasks are cancelled and get CLOSE_TIMEOUT to end.
        Never raises (the plugin is being torn down)."""
        with self._lock:
            loop, self._loop = self._loop, None
            thread, self._thread = self._thread, None
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_wind_down(), loop).result(CLOSE_TIMEOUT + 1)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_TIMEOUT)
        if not thread.is_alive():
            loop.close()


async def _awaited(awaitable: Any, owner: int) -> object:
    """Await the user's coroutine on the worker's loop; a child forked there ends here (it holds
    the loop's thread alone: nothing in it waits for the result)."""
    try:
        result = await awaitable
    except BaseException as exc:
        leave_if_forked(owner, exc)
        raise
    leave_if_forked(owner)
    return result


async def _wind_down() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
    await asyncio.get_running_loop().shutdown_asyncgens()


class ChannelPlugin(WorkerPlugin):
    """One channel's ``send_fn`` and ``worker_init`` on a Dask worker; see the module
    docstring."""

    idempotent = False

    def __init__(self, name: str, payload: bytes) -> None:
        self.name = name
        self._payload = payload
        self._new()

    def _new(self) -> None:
        self.user: SharedUserCode | None = None
        #: The encoded InitFailed answer when the set-up failed on this worker.
        self.failure: bytes | None = None
        self.ready = threading.Event()

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "_payload": self._payload}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._new()

    async def setup(self, worker: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._start)

    def _start(self) -> None:
        try:
            try:
                send_fn, worker_init = pickle.loads(self._payload)
            except BaseException as exc:
                from ..errors import WorkerStartFailed
                from ._shipping import FIX

                err = WorkerStartFailed(
                    f"send_fn or worker_init could not be loaded on this Dask worker: "
                    f"{type(exc).__name__}: {proto.text_of(exc)}; {FIX}"
                )
                err.__cause__ = exc
                raise err from exc
            self.user = SharedUserCode(send_fn, worker_init)
        except BaseException as exc:
            self.failure = proto.encode_init_failed(exc)
        finally:
            self.ready.set()

    def teardown(self, worker: Any) -> None:
        user, self.user = self.user, None
        if user is not None:
            user.close()


async def probe(name: str, dask_worker: Any = None) -> tuple[int, bytes | None] | None:
    """Run on a Dask worker by the channel (``Client.run``): wait until the channel's plugin is
    set up there, then (the worker's pid, None or its InitFailed answer); None while the plugin
    is not there yet."""
    plugin = dask_worker.plugins.get(name)
    if not isinstance(plugin, ChannelPlugin):
        return None
    await asyncio.get_running_loop().run_in_executor(None, plugin.ready.wait)
    return os.getpid(), plugin.failure


def kill_worker_process(pid: int, dask_worker: Any = None) -> bool:
    """Run on a Dask worker's *nanny* (``Client.run(..., nanny=True)``), whose event loop is
    free when the worker's is not (a send holding the GIL, a stopped process): SIGKILL the
    worker's process, which the nanny then starts again. Only when it is still ``pid``, the
    process the channel probed: a replacement started meanwhile is never killed. True when
    the signal was sent."""
    if dask_worker is None or dask_worker.pid != pid:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def run_leases_task(name: str, leases: list[tuple[bytes, bytes]]) -> tuple[bytes, ...] | None:
    """The task of a lane's leases, each a (header, payload) pair, sent in order: None when
    every send returned quickly, else one answer per lease, as a worker process would answer
    it (see the module docstring); the plugin's InitFailed answer alone when it could not be
    set up here (no lease was sent). Never raises."""
    plugin = get_worker().plugins.get(name)
    if not isinstance(plugin, ChannelPlugin):
        return (
            proto.encode_init_failed(
                RuntimeError(f"the channel's plugin {name} is not on this Dask worker")
            ),
        )
    plugin.ready.wait()
    user = plugin.user
    if plugin.failure is not None or user is None:
        return (plugin.failure or proto.encode_init_failed(RuntimeError("no send_fn")),)
    answers: list[proto.Done | proto.Failed] = []
    quick = True
    for head, payload in leases:
        body = head + payload
        result: proto.Done | proto.Failed
        try:
            lease = proto.decode_lease(body)
        except BaseException as exc:
            _, bid, attempt, _ = proto.HEADER.unpack_from(body)
            result = proto.Failed(bid, attempt, exc, None, None, False, None)
        else:
            result = run_lease(user.send, lease)
        del body
        quick = quick and isinstance(result, proto.Done) and result.seconds < QUICK
        answers.append(result)
    return None if quick else tuple(proto.encode_result(a) for a in answers)
