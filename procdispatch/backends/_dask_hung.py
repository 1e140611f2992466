"""Hung Dask workers, a mixin of :class:`~procdispatch.backends.dask.DaskBackend`: ending one
from its nanny, abandoning its task, and the channel's bounded waits for both.

A worker whose send holds the GIL, or whose process is stopped, answers nothing run on it
(``Client.run``, a plugin's removal): its nanny, whose event loop is free, kills its process
(:func:`~._dask_worker.kill_worker_process`) and starts a new one. Every call into Dask that a
hung worker could hold up runs on a daemon thread the channel's end waits for with a deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ._dask_table import POLL_INTERVAL, scheduler_workers
from ._dask_worker import kill_worker_process

__all__ = ["CLOSE_WAIT", "RESTART_WAIT", "HungWorkers"]

log = logging.getLogger("procdispatch")

#: Seconds the channel's end waits for its monitor thread, and for its plugin's removal.
CLOSE_WAIT = 10.0
#: Seconds a worker ended for a hung send has to be replaced by its nanny.
RESTART_WAIT = 30.0


class HungWorkers:
    """See the module docstring. The backend sets these."""

    client: Any
    plugin_name: str
    _lock: threading.Lock
    _workers: dict[str, Any]
    _jobs: list[threading.Thread]
    _halt: threading.Event
    _poke: threading.Event

    def _background(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on a daemon thread of its own, which the channel's end waits for with a
        deadline: a call into Dask that a hung worker never answers must hold up neither the
        coordinator nor the interpreter's exit."""
        job = threading.Thread(target=fn, args=args, name="procdispatch-dask-control", daemon=True)
        with self._lock:
            self._jobs = [j for j in self._jobs if j.is_alive()]
            self._jobs.append(job)
        job.start()

    def _abandon(self, fut: Any) -> None:
        try:
            self.client.cancel([fut], force=True)
        except Exception:
            log.debug("could not cancel an abandoned task", exc_info=True)
        finally:
            fut.release()

    def _restart_worker(self, where: str, pid: int | None, fut: Any) -> None:
        """SIGKILL the worker's process from its nanny, whose loop answers when the worker's
        cannot (a send holding the GIL, a stopped process); the nanny starts a new one. A
        graceful restart, or anything run on the worker itself, would wait for the hung send."""
        try:
            if fut.done() or pid is None:
                return
            before = len(scheduler_workers(self.client))
            answer = self.client.run(
                kill_worker_process, pid, workers=[where], nanny=True, on_error="return"
            )
            got = answer.get(where)
            if got is None:
                log.warning(
                    "the Dask worker %s has no nanny to restart it: its hung send is abandoned "
                    "and its thread stays busy until send_fn returns",
                    where,
                )
                return
            if isinstance(got, BaseException):
                log.warning("could not end the Dask worker %s: %r", where, got)
                return
            self._wait_replaced(where, before)
        except Exception:
            log.exception("could not restart the Dask worker %s", where)
        finally:
            fut.release()
            self._poke.set()

    def _wait_replaced(self, where: str, before: int) -> None:
        """Wait, up to RESTART_WAIT, for the ended worker to leave the scheduler and a new one
        to take its place: the channel's end then leaves the cluster as it found it."""
        deadline = time.monotonic() + RESTART_WAIT
        while time.monotonic() < deadline:
            now = scheduler_workers(self.client)
            if where not in now and len(now) >= before:
                return
            if self._halt.wait(POLL_INTERVAL):
                return
        log.warning(
            "the Dask worker %s was ended, and not replaced within %ss", where, RESTART_WAIT
        )

    def _unregister(self, client: Any) -> None:
        """Remove the channel's plugin from a given cluster, waiting at most CLOSE_WAIT: Dask
        waits for every worker's answer, and a worker whose thread is held by an abandoned send
        that holds the GIL never answers."""
        failed: list[BaseException] = []

        def unregister() -> None:
            try:
                client.unregister_worker_plugin(self.plugin_name)
            except BaseException as exc:
                failed.append(exc)

        job = threading.Thread(target=unregister, name="procdispatch-dask-end", daemon=True)
        job.start()
        job.join(CLOSE_WAIT)
        if job.is_alive():
            with self._lock:
                busy = sorted(a for a, w in self._workers.items() if w.abandoned)
            log.warning(
                "the channel's plugin was not removed from the Dask cluster within %ss (%s); "
                "its removal is left running",
                CLOSE_WAIT,
                "the Dask worker(s) still running an abandoned send: " + ", ".join(busy)
                if busy
                else "no worker is known to be busy",
            )
        elif failed:
            log.warning("could not remove the channel's plugin from Dask", exc_info=failed[0])
