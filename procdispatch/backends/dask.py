"""The Dask backend: the coordinator and the buffer stay here, ``send_fn`` runs on the workers of
a Dask distributed cluster (``pip install 'procdispatch[dask]'``).

``ProcessChannel(send_fn, backend=DaskBackend())`` starts a ``LocalCluster`` of ``workers``
single-threaded worker processes and stops it at the channel's end;
``DaskBackend(client=Client | "tcp://address")`` uses a running cluster and leaves it running.
Either way the channel's contract holds: batches, retries by the channel's policy only
(tasks are submitted with ``retries=0``), per-batch failure when a worker dies, qps taken here,
and a drain that waits for every task.

``workers`` counts Dask worker *threads*, and each is a lane (:mod:`._dask_lane`): a worker of
the channel pinned to one thread of one Dask worker, with one task at a time there, which sends
one or more of its leases in order (several cost one trip through the scheduler). The backend
keeps the table of Dask workers (:mod:`._dask_table`): their threads, the lanes pinned to them,
and whether the channel's worker plugin (:mod:`._dask_worker`, which carries ``send_fn`` and
runs ``worker_init``) is set up there.

Dask cannot interrupt a running task. A lane given up for ``send_timeout`` or at the end of
``cancel_grace`` has its worker's process killed by the worker's nanny, which starts a new one,
on a cluster this backend started or on a given one with ``restart_hung_workers=True`` (the
nanny's event loop answers when the worker's cannot); otherwise its task is cancelled and
abandoned, with a WARNING that its thread stays busy (it gets no lane until it leaves). Every
wait of the channel's end has a deadline: a worker that never answers cannot hold it up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .._options import DASK_DEPTH
from ..errors import OptionsError
from . import Backend, WorkerHandle
from ._dask_hung import CLOSE_WAIT, RESTART_WAIT, HungWorkers
from ._dask_lane import DaskLane
from ._dask_table import WorkerTable
from ._dask_worker import ChannelPlugin
from ._procstart import unguarded_main_line
from ._shipping import pickle_payload

if TYPE_CHECKING:
    from .._batch import Batch
    from .._options import ChannelOptions

__all__ = ["DaskBackend"]

log = logging.getLogger("procdispatch")


class DaskBackend(HungWorkers, WorkerTable, Backend):
    """``send_fn`` on the workers of a Dask cluster; see the module docstring.

    ``client``: None (start a ``LocalCluster`` of ``workers`` processes of one thread each,
    stopped at the channel's end), a ``distributed.Client``, or a scheduler's address.
    ``restart_hung_workers``: on a given cluster, restart (through its nanny) the worker of a
    send that overran ``send_timeout`` or the end of ``cancel_grace``, instead of abandoning
    the task.
    """

    name = "dask"
    paces_queued_leases = False  # a lane's next task waits for the last one's answer
    answers_together = True  # a task's leases answer at once, a trip through the scheduler on
    lease_depth = DASK_DEPTH  # that trip paid once for many quick sends

    def __init__(self, client: Any = None, *, restart_hung_workers: bool = False) -> None:
        super().__init__()
        from distributed import Client

        if client is not None and not isinstance(client, (str, Client)):
            raise OptionsError(
                f"client must be None, a distributed.Client or a scheduler address (got {client!r})"
            )
        if not isinstance(restart_hung_workers, bool):
            raise OptionsError(
                f"restart_hung_workers must be a bool (got {restart_hung_workers!r})"
            )
        self._spec = client
        self._restart = restart_hung_workers or client is None
        self.client: Any = None
        self.address = "(not connected)"
        self._cluster: Any = None
        self._owns_client = False
        self.token = uuid.uuid4().hex[:12]
        self.plugin_name = f"procdispatch-{self.token}"
        self.loop: asyncio.AbstractEventLoop | Any = None
        self._lock = threading.Lock()
        self._workers = {}
        self._waiting: list[DaskLane] = []
        self._registered = False
        self._fatal: BaseException | None = None  # the plugin could not be registered
        self._last_failure: BaseException | None = None
        self._stopping = threading.Event()
        self._poke = threading.Event()
        self._monitor: threading.Thread | None = None
        self._jobs: list[threading.Thread] = []  # restarts and cancels (_background)
        self._halt = threading.Event()  # the channel's end stops waiting for replacements
        #: Why the cluster is out of reach (the client closed, the scheduler gone), once seen.
        self._gone: BaseException | None = None
        self._probes: ThreadPoolExecutor | None = None
        self._closed = False
        #: Each task carries one lease (send_timeout or a qps limit is set: see the lane's
        #: docstring).
        self.one_lease_per_task = False

    # ---- connecting ---------------------------------------------------------------------

    def _connect(self) -> Any:
        if self.client is None and self._spec is not None:
            if isinstance(self._spec, str):
                from distributed import Client

                self.client = Client(self._spec)  # type: ignore[no-untyped-call]
                self._owns_client = True
            else:
                self.client = self._spec
        return self.client

    def default_workers(self) -> int:
        if self._spec is None:
            return os.cpu_count() or 1
        threads = _threads(self._connect())
        if threads < 1:
            raise OptionsError(
                f"workers must be given while the Dask cluster at {self.client.scheduler.address}"
                " has no worker threads (got workers=None)"
            )
        return threads

    def prepare(self, send_fn: Callable[[Batch[Any]], object], options: ChannelOptions) -> None:
        try:
            self._prepare(send_fn, options)
        except BaseException:
            self.close()  # a client connected or a cluster started here is not left behind
            raise

    def _prepare(self, send_fn: Callable[[Batch[Any]], object], options: ChannelOptions) -> None:
        if options.max_worker_memory is not None:
            raise OptionsError(
                "max_worker_memory must be None with the dask backend: a Dask worker's memory is "
                "Dask's to limit (its memory_limit and nanny) "
                f"(got {options.max_worker_memory!r})"
            )
        # A deadline must cover one send, and a rate the sends' starts: several sends in one
        # task would start back to back, however far apart the coordinator admitted them.
        self.one_lease_per_task = options.send_timeout is not None or options.qps is not None
        payload = pickle_payload(send_fn, options.worker_init, None)
        if self._spec is None:
            self._start_cluster(options.workers)
        else:
            client = self._connect()
            threads = _threads(client)
            if options.workers > threads:
                raise OptionsError(
                    f"workers must be <= the {threads} threads of the Dask cluster at "
                    f"{client.scheduler.address} (got {options.workers})"
                )
            allowed = client.run_on_scheduler(_allowed_failures)
            if allowed != 0:
                log.warning(
                    "the Dask scheduler at %s has distributed.scheduler.allowed-failures=%s: a "
                    "task whose worker dies may be run again by Dask before the channel hears "
                    "of it (set it to 0 on the scheduler: the channel's retry policy is the only "
                    "retry)",
                    client.scheduler.address,
                    allowed,
                )
        self.loop = self.client.loop.asyncio_loop
        self.address = str(self.client.scheduler.address)
        self._plugin = ChannelPlugin(self.plugin_name, payload)
        self._probes = ThreadPoolExecutor(4, thread_name_prefix="procdispatch-dask-probe")
        self._monitor = threading.Thread(
            target=self._watch, name="procdispatch-dask-monitor", daemon=True
        )
        self._monitor.start()

    def _start_cluster(self, workers: int) -> None:
        found = unguarded_main_line()
        if found is not None:
            raise OptionsError(
                "DaskBackend() without a client starts a LocalCluster, whose worker processes "
                "import the main module again: put the code that makes the channel under "
                f"'if __name__ == \"__main__\":' (got the top-level code of {found[0]}, line "
                f"{found[1]})"
            )
        from distributed import Client, LocalCluster

        self._cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            # No dashboard; its HTTP server (health, metrics) on a free port: Dask warns when
            # the default one is taken (by another cluster of this machine).
            dashboard_address=":0",
            scheduler_kwargs={"allowed_failures": 0},
        )
        try:
            self.client = Client(self._cluster)  # type: ignore[no-untyped-call]
        except BaseException:
            self._cluster.close()
            raise
        self._owns_client = True

    # ---- the table ----------------------------------------------------------------------

    def start_worker(self, wid: int) -> WorkerHandle:
        lane = DaskLane(self, wid, killable=self._restart)
        with self._lock:
            self._waiting.append(lane)
        self._assign()
        return lane

    def lane_lost(self, lane: DaskLane, why: str, fut: Any) -> None:
        if fut is not None:
            fut.release()
        if self._gone is None and self.client.status == "running":
            # (a cluster out of reach is logged once, for all its lanes, by the monitor)
            log.warning("lane %d of the Dask worker %s was lost: %s", lane.wid, lane.where, why)
        self._unpin(lane, suspect=True)
        if self.client.status != "running":
            self._poke.set()  # the monitor sees to it

    def lane_stopped(self, lane: DaskLane, fut: Any) -> None:
        if fut is not None:
            fut.release()
        self._unpin(lane)

    def lane_killed(self, lane: DaskLane, fut: Any, pinned: bool) -> None:
        """The coordinator gave the lane up; a task still running is restarted away, or
        abandoned with a WARNING (a Dask task cannot be interrupted)."""
        if fut is None or not pinned:
            self._unpin(lane)
            return
        where = lane.where or ""
        with self._lock:
            w = self._workers.get(where)
            if w is not None:
                w.lanes.discard(lane)
                if self._restart:
                    w.state = "restarting"
                else:
                    w.abandoned += 1
        if self._restart:
            self._background(self._restart_worker, where, lane.pid, fut)
        else:
            self._background(self._abandon, fut)
            log.warning(
                "a send of lane %d keeps running on the Dask worker %s: a Dask task cannot be "
                "interrupted, so that thread stays busy until send_fn returns "
                "(DaskBackend(restart_hung_workers=True) restarts the worker instead)",
                lane.wid,
                where,
            )
        self._poke.set()

    def forget(self, lane: DaskLane) -> None:
        self._unpin(lane)

    # ---- the end ------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._poke.set()
        with self._lock:
            jobs = list(self._jobs)
        deadline = time.monotonic() + RESTART_WAIT
        for job in jobs:  # restarts under way end first (each is bounded by RESTART_WAIT)
            job.join(max(0.0, deadline - time.monotonic()))
        self._halt.set()
        if any(job.is_alive() for job in jobs):
            log.warning(
                "a restart or cancel of a Dask worker had not ended at the channel's end; it is "
                "left running"
            )
        if self._probes is not None:
            self._probes.shutdown(wait=False, cancel_futures=True)
        monitor = self._monitor
        if monitor is not None:
            # A plugin whose set-up never ends holds the monitor in its registration: only a
            # registered one is waited for.
            monitor.join(CLOSE_WAIT if self._registered else 0)
        client = self.client
        if client is None:
            return
        if self._cluster is None and monitor is not None and self._gone is None:
            self._unregister(client)
        if self._owns_client:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                client.close()
            if self._cluster is not None:
                close_cluster(self._cluster)
        if monitor is not None and monitor.is_alive():
            monitor.join(1.0)
            if monitor.is_alive():
                log.warning(
                    "the channel's plugin is still being set up on the Dask cluster at its end "
                    "(worker_init has not returned); its registration is left running"
                )


def close_cluster(cluster: Any) -> None:
    """Close a LocalCluster. Its last step awaits the task that follows the scheduler's news of
    workers, which raises KeyError when a worker it never saw join leaves (one replaced just
    before the close): its workers and scheduler are closed by then, so the cluster is marked
    closed (else it warns, unclosed, when collected). Dask has no public way to finish such a
    close: a second ``close()`` waits for ever while the status says closing, hence the write
    to ``status``; tests/dask/test_dask_tasks.py fails should Dask change this."""
    try:
        cluster.close()
    except KeyError:
        from distributed.core import Status

        log.info("the Dask cluster closed, tripping over a worker it never saw", exc_info=True)
        cluster.status = Status.closed
    except Exception:
        log.warning("the Dask cluster did not close cleanly", exc_info=True)


def _threads(client: Any) -> int:
    return int(sum(client.nthreads().values()))


def _allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)
