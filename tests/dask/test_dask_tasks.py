"""How the Dask backend's lanes use tasks: the leases a lane holds go in one task, in order
(one each with send_timeout set); a worker that dies fails every lease of its task, which may
all have been sent; and the end of a LocalCluster whose close trips over a worker it never saw."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed")

from daskfns import InitLog, TaskLog
from daskhelp import new_cluster
from distributed.comm import CommClosedError
from distributed.core import Status
from workerfns import Gate, Log, wait_for

import procdispatch as pd
from procdispatch._options import DASK_DEPTH
from procdispatch.backends.dask import DaskBackend, close_cluster


@pytest.fixture
def one(tmp_path: Path) -> Any:
    """A cluster of one single-threaded worker process for this test alone."""
    cluster, client = new_cluster(1)
    yield client
    client.close()
    close_cluster(cluster)


def _tasks(log: Log, ev: str = "sent") -> dict[str, list[tuple[int, int]]]:
    """{task key: [(batch id, attempt), ...] in the order they were sent}."""
    tasks: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for r in log.read():
        if r["ev"] == ev:
            tasks[r["task"]].append((r["id"], r["attempt"]))
    return tasks


@pytest.mark.parametrize("send_timeout", [None, 30.0])
def test_a_lane_sends_the_leases_it_holds_in_one_task_unless_send_timeout_is_set(
    tmp_path: Path, one: Any, send_timeout: float | None
) -> None:
    log = Log(tmp_path / "log")
    with pd.ProcessChannel(
        TaskLog(log),
        backend=DaskBackend(one),
        workers=1,
        batch_items_max=10,
        send_timeout=send_timeout,
    ) as ch:
        ch.put_many(range(3000))
    assert ch.stats().items_delivered == 3000
    sent = [x for r in log.read() if r["ev"] == "sent" for x in r["data"]]
    assert sorted(sent) == list(range(3000))  # each item once
    tasks = _tasks(log)
    sizes = [len(v) for v in tasks.values()]
    assert sum(sizes) == 300
    if send_timeout is None:
        # quick sends: the lane's depth grew (the buffer's 100 batches leave it many queued),
        # and its tasks carry them, many to a task
        assert DASK_DEPTH // 2 < max(sizes) <= DASK_DEPTH  # never more than the lane holds
    else:
        assert set(sizes) == {1}
    for leases in tasks.values():
        assert [bid for bid, _ in leases] == sorted(bid for bid, _ in leases)  # in lease order


def test_a_worker_that_dies_in_a_task_fails_every_lease_of_it_and_they_are_retried(
    tmp_path: Path, one: Any
) -> None:
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    errors: list[tuple[BaseException, int, int]] = []

    def on_error(b: pd.Batch[int], exc: BaseException) -> bool:
        errors.append((exc, b.id, b.attempt))
        return True

    try:
        ch = pd.ProcessChannel(
            TaskLog(log, exit_on=2),
            backend=DaskBackend(one),
            workers=1,
            max_leases=4,
            batch_items_max=1,
            worker_init=InitLog(log, gate),  # no lane is ready until the four are queued
            retry=pd.retry.exponential(initial=0.01, max_attempts=3),
            on_error=on_error,
        )
        ch.put_many(range(4))
        wait_for(lambda: ch.stats().items_buffered == 4, what="four batches buffered")
    finally:
        gate.open()
    assert ch.close_and_drain(60)
    # One task held the four leases; it died in the third send, after two were sent.
    [first] = [v for v in _tasks(log, "start").values() if all(a == 1 for _, a in v)]
    assert [bid for bid, _ in first] == [1, 2, 3]
    # Any of them may have been sent: each failed as WorkerCrashed, and was retried.
    assert sorted((bid, attempt) for _, bid, attempt in errors) == [(b, 1) for b in (1, 2, 3, 4)]
    assert all(isinstance(exc, pd.WorkerCrashed) for exc, _, _ in errors)
    sent = collections.Counter((r["id"], r["attempt"]) for r in log.read() if r["ev"] == "sent")
    assert sent == {(1, 1): 1, (2, 1): 1, (1, 2): 1, (2, 2): 1, (3, 2): 1, (4, 2): 1}
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped) == (4, 0)


def test_close_cluster_ends_a_close_that_trips_over_a_worker_it_never_saw(caplog) -> None:
    """Dask's LocalCluster.close() raises KeyError when its copy of the workers lacks one the
    scheduler says left, before it marks itself closed; and a second close() would wait for
    ever on its 'closing' status. close_cluster marks it closed (its scheduler and workers are
    closed by then). Should Dask's close stop raising, or mark the cluster closed itself, this
    test says so."""
    cluster, client = new_cluster(2)
    address = sorted(cluster.scheduler_info["workers"])[0]
    del cluster.scheduler_info["workers"][address]  # as if its join had never been seen
    with contextlib.suppress(CommClosedError):
        client.run(os._exit, 1, workers=[address])
    wait_for(
        lambda: address not in client.run_on_scheduler(_workers), what="the scheduler to see it go"
    )
    client.close()
    with caplog.at_level(logging.INFO, logger="procdispatch"):
        close_cluster(cluster)
    assert "tripping over a worker it never saw" in caplog.text  # Dask's close still raises
    assert cluster.status == Status.closed
    assert cluster.scheduler.status == Status.closed
    assert all(w.status == Status.closed for w in cluster.workers.values())


def _workers(dask_scheduler: Any) -> list[str]:
    return list(dask_scheduler.workers)


def test_an_answer_whose_callback_never_runs_is_taken_by_the_monitor(
    tmp_path: Path, one: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Should Dask never run a task's done-callback, the lane would hold its leases for ever
    and the drain would never end: the monitor takes the answer of a task Dask reports done."""
    import threading

    from procdispatch.backends import _dask_lane

    monkeypatch.setattr(_dask_lane, "ANSWER_WAIT", 0.5)
    real = _dask_lane.DaskLane._finished
    dropped: list[str] = []

    def lossy(self: Any, fut: Any) -> None:
        # Dask's callbacks of every task but the lane's first are lost.
        if threading.current_thread().name.startswith("Dask-Callback") and self._seq > 1:
            dropped.append(fut.key)
            return
        real(self, fut)

    monkeypatch.setattr(_dask_lane.DaskLane, "_finished", lossy)
    log = Log(tmp_path / "log")
    with caplog.at_level(logging.WARNING, logger="procdispatch"):
        ch = pd.ProcessChannel(
            TaskLog(log), backend=DaskBackend(one), workers=1, batch_items_max=10
        )
        ch.put_many(range(50))
        assert ch.close_and_drain(60)
    assert dropped  # the callbacks were lost, and the drain ended all the same
    sent = [x for r in log.read() if r["ev"] == "sent" for x in r["data"]]
    assert sorted(sent) == list(range(50))  # each once
    assert ch.stats().items_delivered == 50
    assert any("taking it now" in r.getMessage() for r in caplog.records)
