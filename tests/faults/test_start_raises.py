"""Starting a worker can raise in the parent (fork failing with EAGAIN, no file descriptors left
for its pipes, a broken forkserver): then no process exists to die and be replaced. The start is
retried after a short delay; if it keeps raising, the channel fails with WorkerStartFailed."""

from __future__ import annotations

import logging

import pytest
from conftest import worker_processes
from workerfns import Log, Recorder, delivered_items

import procdispatch as pd
from procdispatch.backends import process as _backends

pytestmark = pytest.mark.needs(
    "processes", why="the failures are those of starting a worker process"
)


@pytest.fixture
def failing_starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``[starts still to fail, starts attempted]``: the test sets the first, the patched
    ``ProcessWorker.start`` raises while it is positive and counts every attempt."""
    plan = [0, 0]  # [starts still to fail, starts attempted]
    real_start = _backends.ProcessWorker.start

    def start(self: _backends.ProcessWorker) -> None:
        plan[1] += 1
        if plan[0]:
            plan[0] -= 1
            raise OSError(11, "Resource temporarily unavailable (simulated)")
        real_start(self)

    monkeypatch.setattr(_backends.ProcessWorker, "start", start)
    return plan


@pytest.mark.parametrize("workers", [1, 2])
def test_a_start_that_raises_once_is_retried(
    tmp_path, make_channel, failing_starts, workers, caplog
):
    failing_starts[0] = 1
    log = Log(tmp_path / "log")
    with caplog.at_level(logging.ERROR, logger="procdispatch"):
        ch = make_channel(Recorder(log), workers=workers, batch_items_max=1)
        ch.put("only")  # one item: the deferred workers would not start for it
        assert ch.close_and_drain(30)
    assert delivered_items(log) == ["only"]
    assert failing_starts[1] == 2  # the failed start, then its retry
    assert any("could not start a worker" in r.getMessage() for r in caplog.records)
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped) == (1, 0)


def test_starts_that_keep_raising_fail_the_channel(tmp_path, make_channel, failing_starts):
    failing_starts[0] = 10**6
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=2, batch_items_max=1)

    def put_then_close() -> None:
        for i in range(3):
            ch.put(i, timeout=30)
        ch.close_and_drain(30)

    with pytest.raises(pd.WorkerStartFailed) as ei:
        put_then_close()
    assert ch.wait_drained(30)
    assert "workers cannot start: 4 attempts failed in a row" in str(ei.value)
    assert isinstance(ei.value.__cause__, OSError)
    assert failing_starts[1] == 4  # START_FAILURES_FATAL + workers - 1, then no more
    s = ch.stats()
    assert s.items_delivered == 0
    assert s.items_put == s.items_dropped
    assert not worker_processes()
    assert delivered_items(log) == []
