"""The Dask backend's table of Dask workers, and the monitor thread that keeps it.

A mixin of :class:`~procdispatch.backends.dask.DaskBackend`. The table holds each Dask worker's
threads, the lanes pinned to it (:mod:`._dask_lane`), and whether the channel's plugin is set up
there. The monitor thread registers the plugin, then looks at the scheduler's workers every
``POLL_INTERVAL`` seconds (or at once when poked): a worker that joins is probed, off the
monitor's thread, for its ``worker_init`` (it gets lanes once it ran; none when it failed), a
worker that left takes its lanes with it (their leases fail as ``WorkerCrashed``), and lanes
waiting for a thread get one, on the worker with the most free threads. A worker one of whose
lanes was lost (its task failed in Dask: it may have died) gets no lane until a probe answers.
A client that is closed, or a scheduler out of reach for ``UNREACHABLE_WAIT`` seconds, loses
every lane and fails every lane to come (:meth:`WorkerTable.cluster_lost`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distributed.client import ClosedClientError

from .. import _protocol as proto
from ._dask_lane import DaskLane
from ._dask_worker import probe

__all__ = ["POLL_INTERVAL", "WorkerTable", "scheduler_workers"]

log = logging.getLogger("procdispatch")

#: Seconds between two looks at the scheduler's workers.
POLL_INTERVAL = 0.2
#: Seconds the scheduler may stay out of reach (the client reconnecting, a look failing)
#: before the cluster counts as lost.
UNREACHABLE_WAIT = 10.0
#: A client in these states never runs again (one "connecting" may).
_ENDED = ("closing", "closed")


def scheduler_workers(client: Any) -> dict[str, Any]:
    """The scheduler's workers now, asked of the scheduler itself. ``client.scheduler_info()``
    returns the client's cached copy, which the client's own periodic refresh replaces with one
    that lists no worker: read between the two, every worker would look gone."""
    identity = client.sync(client.scheduler.identity, n_workers=-1)
    return dict(identity["workers"])


class _DaskWorker:
    """A Dask worker in the backend's table."""

    __slots__ = ("abandoned", "address", "lanes", "nthreads", "pid", "probed", "state")

    def __init__(self, address: str, nthreads: int, pid: int | None) -> None:
        self.address = address
        self.nthreads = nthreads
        self.pid = pid
        self.lanes: set[DaskLane] = set()
        self.abandoned = 0  # threads left running a task this channel gave up
        self.probed = False  # a probe of it is under way
        #: "probing" until its plugin is known set up, then "ok", or "broken" (worker_init
        #: failed there), or "restarting" (we restart it: it takes no lane).
        self.state = "probing"

    def free(self) -> int:
        if self.state != "ok":
            return 0
        return self.nthreads - len(self.lanes) - self.abandoned


class WorkerTable:
    """The worker table and its monitor; see the module docstring. The backend sets these."""

    client: Any
    plugin_name: str
    address: str  # the scheduler's, read while the client runs
    _plugin: Any
    _lock: threading.Lock
    _workers: dict[str, _DaskWorker]
    _waiting: list[DaskLane]
    _registered: bool
    _fatal: BaseException | None
    _gone: BaseException | None
    _last_failure: BaseException | None
    _stopping: threading.Event
    _poke: threading.Event
    _probes: ThreadPoolExecutor | None

    def workers_alive(self, handles: int) -> int:
        with self._lock:
            return sum(1 for w in self._workers.values() if w.state != "restarting")

    def _assign(self) -> None:
        """Pin waiting lanes to free threads (the worker with the most first); fail them when no
        worker can take one."""
        ready: list[tuple[DaskLane, _DaskWorker]] = []
        failed: list[DaskLane] = []
        with self._lock:
            if not self._registered:
                return
            # A client that is not running cannot submit: lanes wait for it, or for the
            # monitor to find the cluster lost and fail them.
            reachable = self._gone is None and self.client.status == "running"
            while self._waiting and reachable:
                best = max(self._workers.values(), key=_DaskWorker.free, default=None)
                if best is None or best.free() < 1:
                    break
                lane = self._waiting.pop(0)
                best.lanes.add(lane)
                ready.append((lane, best))
            error = self._fatal
            if (
                error is None
                and self._waiting
                and self._workers
                and all(w.state == "broken" for w in self._workers.values())
            ):
                error = self._last_failure
            if error is not None:
                failed, self._waiting = self._waiting, []
        for lane, w in ready:
            if not lane.assigned(w.address, w.pid):
                self._unpin(lane)
        for lane in failed:
            assert error is not None
            lane.failed_start(error)

    def _unpin(self, lane: DaskLane, suspect: bool = False) -> None:
        """Take the lane off its worker. ``suspect``: the lane was lost (its task failed in
        Dask, KilledWorker say): its worker may have died, though the scheduler still lists it,
        and gets no lane until a probe says it lives (a dead one leaves the scheduler)."""
        with self._lock:
            if lane in self._waiting:
                self._waiting.remove(lane)
            for w in self._workers.values():
                w.lanes.discard(lane)
            known = self._workers.get(lane.where or "") if suspect else None
            if known is not None and known.state == "ok":
                known.state = "probing"
        self._poke.set()

    def worker_broken(self, lane: DaskLane, error: BaseException) -> None:
        log.error(
            "worker_init failed on the Dask worker %s: it gets no lease from this channel: %s",
            lane.where,
            proto.describe_error(error),
        )
        with self._lock:
            w = self._workers.get(lane.where or "")
            if w is not None:
                w.state = "broken"
            self._last_failure = error
        self._unpin(lane)

    # ---- the monitor thread -------------------------------------------------------------

    def _watch(self) -> None:
        try:
            self.client.register_plugin(self._plugin, name=self.plugin_name)
        except BaseException as exc:
            log.error("the channel's plugin could not be registered with the Dask cluster: %r", exc)
            with self._lock:
                self._fatal = exc
        with self._lock:
            self._registered = True
        unreachable: float | None = None  # since when the scheduler could not be read
        while not self._stopping.is_set():
            if self._gone is None:
                error = self._look()
                now = time.monotonic()
                if error is None:
                    unreachable = None
                elif isinstance(error, ClosedClientError) or self.client.status in _ENDED:
                    self.cluster_lost(error)
                else:
                    unreachable = now if unreachable is None else unreachable
                    if now - unreachable > UNREACHABLE_WAIT:
                        self.cluster_lost(error)
            self._assign()
            with self._lock:
                pinned = [lane for w in self._workers.values() for lane in w.lanes]
            for lane in pinned:
                lane.check_answer()
            self._poke.wait(POLL_INTERVAL)
            self._poke.clear()

    def _look(self) -> BaseException | None:
        """Refresh the table from the scheduler; what stopped it, if anything. A client that is
        reconnecting is not asked (its calls would wait for the reconnection)."""
        status = self.client.status
        if status != "running":
            return ConnectionError(f"the Dask client is {status}")
        try:
            self._refresh()
        except Exception as exc:
            if not self._stopping.is_set():
                log.debug("could not read the Dask cluster's workers", exc_info=True)
            return exc
        return None

    def cluster_lost(self, error: BaseException) -> None:
        """The client is closed, or the scheduler out of reach for UNREACHABLE_WAIT: every lane
        is lost (the batches of its task fail as WorkerCrashed, by the retry policy), and every
        lane to come fails to start with ``error``, so that the channel ends by its rules for
        workers that cannot start. Said once, in one ERROR."""
        # (the error's own text only: the coordinator adds a start failure's __cause__)
        gone = ConnectionError(
            f"the Dask cluster at {self.address} is out of reach (its client is "
            f"{self.client.status}): {proto.describe_error(error)}"
        )
        with self._lock:
            if self._gone is not None:
                return
            self._gone = gone
            if self._fatal is None:
                self._fatal = gone
            pinned = [(lane, w.address) for w in self._workers.values() for lane in w.lanes]
        log.error(
            "%s: the batches on its workers fail as WorkerCrashed and no lane of this channel "
            "can start there",
            gone,
        )
        for lane, where in pinned:
            lane.lost(where, str(gone))
        self._poke.set()

    def _refresh(self) -> None:
        info = scheduler_workers(self.client)
        gone: list[_DaskWorker] = []
        with self._lock:
            for address in list(self._workers):
                if address not in info:
                    gone.append(self._workers.pop(address))
            new = [a for a in info if a not in self._workers]
            for address in new:
                d = info[address]
                self._workers[address] = _DaskWorker(address, int(d["nthreads"]), None)
            probing = [a for a, w in self._workers.items() if w.state == "probing" and not w.probed]
            for address in probing:
                self._workers[address].probed = True
        for w in gone:
            for lane in list(w.lanes):
                lane.lost(w.address, "it left the cluster")
        for address in probing:
            # One worker at a time, off this thread: a worker that died after the scheduler
            # listed it costs a connect timeout, which must not hold up the others.
            assert self._probes is not None
            self._probes.submit(self._probe, address)

    def _probe(self, address: str) -> None:
        try:
            answer = self.client.run(probe, self.plugin_name, workers=[address], on_error="return")
        except Exception:
            answer = {}
        with self._lock:
            known = self._workers.get(address)
            if known is None:
                return
            known.probed = False  # asked again next time unless settled below
            got = answer.get(address)
            if not isinstance(got, tuple):
                return  # not set up yet, or gone
            known.pid, failure = got
            error: BaseException | None = None
            if failure is None:
                known.state = "ok"
            else:
                known.state = "broken"
                msg = proto.decode_from_worker(failure)
                error = msg.error if isinstance(msg, proto.InitFailed) else RuntimeError(msg)
                self._last_failure = error
        if error is not None:
            log.error(
                "worker_init failed on the Dask worker %s: it gets no lease from this channel: %s",
                address,
                proto.describe_error(error),
            )
        self._poke.set()
