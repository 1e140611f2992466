"""start_timeout: a worker not ready in time (worker_init that never returns) is killed -- a
thread worker is abandoned -- and counts as a failed start, so the channel either recovers with
a new worker or fails with WorkerStartFailed instead of never draining."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import worker_processes
from pipefns import InitHangs, InitHangsOnce
from workerfns import Gate, Log, Recorder, delivered_items

import procdispatch as pd


@pytest.fixture
def gate(tmp_path: Path) -> object:
    g = Gate(tmp_path / "init-gate")
    yield g
    g.open()  # let abandoned thread workers end


INIT = pytest.mark.needs("init-per-start", why="each worker start runs worker_init again")


@INIT
def test_a_worker_init_that_never_returns_fails_the_channel(tmp_path, make_channel, gate, backend):
    log = Log(tmp_path / "log")
    drops: list[object] = []
    ch = make_channel(
        Recorder(log),
        backend=backend,
        workers=1,
        batch_items_max=1,
        start_timeout=0.5,
        worker_init=InitHangs(log, gate),
        on_drop=lambda b, final: b is not None and drops.extend(b.data),
    )
    ch.put("x")
    with pytest.raises(pd.WorkerStartFailed) as ei:
        ch.close_and_drain(20)
    hung = [r for r in log.read() if r["ev"] == "init-hang"]
    assert len(hung) == 3  # START_FAILURES_FATAL starts, each killed in turn
    cause = ei.value.__cause__
    assert isinstance(cause, TimeoutError)
    last = hung[-1]["pid"]
    how = "abandoned" if backend == "thread" else "killed"
    assert str(cause).endswith(
        f"(pid {last}) did not become ready within start_timeout=0.5s; it was {how}"
    )
    assert str(cause).startswith("worker 3 ")
    assert "did not become ready within start_timeout=0.5s" in str(ei.value)
    assert drops == ["x"]
    s = ch.stats()
    assert (s.items_put, s.items_delivered, s.items_dropped) == (1, 0, 1)
    if backend == "process":
        assert not worker_processes()


@INIT
def test_a_worker_that_hangs_in_worker_init_is_replaced(
    tmp_path, make_channel, gate, backend, caplog
):
    log = Log(tmp_path / "log")
    with caplog.at_level(logging.ERROR, logger="procdispatch"):
        ch = make_channel(
            Recorder(log),
            backend=backend,
            workers=1,
            batch_items_max=1,
            start_timeout=0.5,
            worker_init=InitHangsOnce(log, gate, str(tmp_path / "first")),
        )
        ch.put_many(range(6))
        assert ch.close_and_drain(20)
    assert sorted(delivered_items(log)) == list(range(6))
    hung = [r["worker"] for r in log.read() if r["ev"] == "init-hang"]
    assert len(hung) == 1
    assert hung[0] not in {r["worker"] for r in log.read() if r["ev"] == "init"}
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped, s.batches_failed, s.worker_restarts) == (
        6,
        0,
        0,
        1,
    )
    msgs = [r.getMessage() for r in caplog.records]
    assert any("did not become ready within start_timeout=0.5s" in m for m in msgs)
