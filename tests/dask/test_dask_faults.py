"""A Dask worker that cannot answer, a client or scheduler gone, a worker that just died: the
channel's end is bounded, nothing is lost silently, and no batch is failed for a worker it
never reached."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed")

from daskfns import Sink, Stuck, TaskLog
from daskhelp import new_cluster
from distributed import Client
from workerfns import Gate, Log

import procdispatch as pd
from procdispatch.backends.dask import DaskBackend, close_cluster


@pytest.fixture
def fresh() -> Any:
    """A cluster of two single-threaded worker processes (each under a nanny) for this test."""
    cluster, client = new_cluster()
    yield cluster, client
    client.close()
    close_cluster(cluster)


def _on_error(errors: list[tuple[BaseException, int, int, list[int]]], retry: bool) -> Any:
    def on_error(b: pd.Batch[int], exc: BaseException) -> bool:
        errors.append((exc, b.id, b.attempt, list(b.data)))
        return retry

    return on_error


def test_a_send_holding_the_gil_is_ended_by_its_nanny_and_the_channel_ends(tmp_path: Path):
    """Its worker's event loop never runs again: the backend ends the process from its nanny."""
    log = Log(tmp_path / "log")
    errors: list[tuple[BaseException, int, int, list[int]]] = []
    ch = pd.ProcessChannel(
        Stuck(log, on=3, how="gil"),
        backend=DaskBackend(),
        workers=2,
        batch_items_max=1,
        send_timeout=1.0,
        on_error=_on_error(errors, retry=True),
    )
    ch.put_many(range(10))
    assert ch.close_and_drain(60)
    ((exc, _, attempt, data),) = errors
    assert isinstance(exc, pd.SendTimeout)
    assert (data, attempt) == ([3], 1)
    assert "was killed (on tcp://" in str(exc)
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped) == (10, 0)


def test_an_abandoned_send_on_a_stopped_worker_does_not_hold_up_the_channels_end(
    tmp_path: Path, fresh: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """On a given cluster the task is abandoned; the plugin's removal, which Dask makes wait for
    every worker, gives up on the one that cannot answer, naming it."""
    _, client = fresh
    log = Log(tmp_path / "log")
    errors: list[tuple[BaseException, int, int, list[int]]] = []
    try:
        with caplog.at_level(logging.WARNING, logger="procdispatch"):
            ch = pd.ProcessChannel(
                Stuck(log, on=0, how="stop"),
                backend=DaskBackend(client),
                workers=2,
                batch_items_max=1,
                send_timeout=1.0,
                on_error=_on_error(errors, retry=False),
                on_drop=pd.drop_quiet,
            )
            ch.put_many(range(6))
            assert ch.close_and_drain(60)
        ((exc, _, _, data),) = errors
        assert isinstance(exc, pd.SendTimeout)
        assert data == [0]
        assert exc.where is not None
        ended = [r.getMessage() for r in caplog.records if "was not removed" in r.getMessage()]
        assert len(ended) == 1
        assert exc.where in ended[0]
        assert (ch.stats().items_delivered, ch.stats().items_dropped) == (5, 1)
    finally:
        for rec in log.read():
            if rec["ev"] == "start" and rec["attempt"] == 1 and rec["id"] == 1:
                os.kill(rec["pid"], signal.SIGKILL)  # its nanny replaces it; the cluster closes


def test_a_client_closed_under_the_channel_fails_what_it_held_and_the_drain_ends(
    tmp_path: Path, fresh: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cluster, _ = fresh
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    errors: list[tuple[BaseException, int, int, list[int]]] = []
    dropped: list[int] = []
    delivered: list[int] = []
    own = Client(cluster)
    try:
        with caplog.at_level(logging.WARNING, logger="procdispatch"):
            ch = pd.ProcessChannel(
                Sink(log, hang_on=0, gate=gate),
                backend=DaskBackend(own),
                workers=2,
                batch_items_max=1,
                on_error=_on_error(errors, retry=True),
                on_drop=lambda b, final: b is not None and dropped.extend(b.data),
                on_delivered=lambda b: delivered.extend(b.data),
            )
            ch.put_many(range(20))
            log.wait_count(1, ev="start", id=1)  # item 0's send holds its task on the worker
            own.close()
            with pytest.raises(pd.WorkerStartFailed, match="is out of reach"):
                ch.close_and_drain(60)
            assert ch.wait_drained(0)
    finally:
        gate.open()
    s = ch.stats()
    assert (s.items_in_flight, s.items_buffered) == (0, 0)
    # Each item ended once (item 0's send may yet end on its worker: it failed as may-be-sent).
    assert sorted(delivered + dropped) == list(range(20))
    assert 0 in dropped  # its task was in flight: failed, retried, then dropped
    assert any(isinstance(e, pd.WorkerCrashed) and d == [0] for e, _, _, d in errors)
    said = [r for r in caplog.records if "out of reach" in r.getMessage()]
    assert len([r for r in said if r.name == "procdispatch" and "fail as" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if "was lost" in r.getMessage()]


def test_no_lane_is_pinned_to_a_worker_that_just_died(tmp_path: Path, fresh: Any) -> None:
    """Each batch failed as WorkerCrashed had started on the worker that died: none was sent to
    the dead worker the scheduler still listed for a moment."""
    _, client = fresh
    log = Log(tmp_path / "log")
    errors: list[tuple[BaseException, int, int, list[int]]] = []
    with pd.ProcessChannel(
        TaskLog(log, exit_on=frozenset({5, 15, 25, 35})),
        backend=DaskBackend(client),
        workers=2,
        batch_items_max=1,
        send_timeout=60,  # one batch per task: a dead worker's task held only the one it ran
        retry=pd.retry.limited(5),
        on_error=_on_error(errors, retry=True),
    ) as ch:
        ch.put_many(range(50))
    crashed = [(bid, attempt) for e, bid, attempt, _ in errors if isinstance(e, pd.WorkerCrashed)]
    started = {(r["id"], r["attempt"]) for r in log.read() if r["ev"] == "start"}
    assert crashed
    assert [c for c in crashed if c not in started] == []
    assert ch.stats().items_delivered == 50
