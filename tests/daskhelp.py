"""The contract suite's Dask cluster, shared by the tests of a module.

A test may leave the cluster changed: a worker restarted for a hung send (its replacement
registers within a second or so), or a worker killed by the test. Before each channel is made on
it, :meth:`SharedCluster.backend` waits, on the scheduler's state, until the cluster has its two
workers again and no task left; a cluster that does not recover within ``RECOVERY`` seconds is
replaced by a fresh one.
"""

from __future__ import annotations

from typing import Any

from distributed import Client, LocalCluster

from procdispatch.backends.dask import DaskBackend, close_cluster

WORKERS = 2
RECOVERY = 30.0


#: The shared clusters alive: the tests that check that a channel leaves no process behind leave
#: their worker processes out (a cluster outlives channels).
LIVE: set[Any] = set()


def shared_pids() -> set[int]:
    """The process ids of the shared clusters' workers (each nanny's current process)."""
    pids: set[int] = set()
    for cluster in list(LIVE):
        for nanny in list(cluster.workers.values()):
            proc = getattr(getattr(nanny, "process", None), "process", None)
            pid = getattr(proc, "pid", None)
            if pid is not None:
                pids.add(pid)
    return pids


def new_cluster(workers: int = WORKERS) -> tuple[Any, Any]:
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        scheduler_kwargs={"allowed_failures": 0},
        silence_logs=False,  # Dask would set the level of the handlers tests capture with
    )
    return cluster, Client(cluster)


def wait_healthy(client: Any, workers: int, timeout: float) -> bool:
    """Wait until the cluster runs ``workers`` workers again (a worker restarted for a hung
    send, or killed by a test, is replaced by its nanny)."""
    try:
        client.wait_for_workers(workers, timeout=timeout)
    except TimeoutError:
        return False
    return True


class SharedCluster:
    """See the module docstring."""

    def __init__(self) -> None:
        self.cluster, self.client = new_cluster()
        LIVE.add(self.cluster)

    def backend(self, workers: int | None) -> DaskBackend:
        """A backend for one channel: on the shared cluster when it has the threads, else on a
        cluster of the channel's own (started and stopped by the backend)."""
        if workers is not None and workers > WORKERS:
            return DaskBackend()
        if not wait_healthy(self.client, WORKERS, RECOVERY):
            self.close()
            self.cluster, self.client = new_cluster()
            LIVE.add(self.cluster)
        return DaskBackend(self.client, restart_hung_workers=True)

    def close(self) -> None:
        LIVE.discard(self.cluster)
        self.client.close()
        close_cluster(self.cluster)
