"""A process forked by send_fn or worker_init that does not end with os._exit comes back into
the worker's code: it must end there, writing nothing to the worker's pipes (a Dask worker's
connections), so that the worker alone answers its leases."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from faultfns import ForkingInit, ForkingSend
from workerfns import Log, noop

import procdispatch as pd

#: The exit status the child gets, by what it did in the user's code.
STATUS = {"return": 0, "raise": 1}
#: Where the worker runs: on a Dask worker, the child is a copy of that worker's process.
ON = [
    "process",
    "thread",
    pytest.param(
        "dask",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("distributed") is None, reason="needs the dask extra"
        ),
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("child", sorted(STATUS))
def test_a_child_forked_by_send_fn_ends_when_it_comes_back_into_the_worker(
    tmp_path: Any, on: str, child: str
) -> None:
    log = Log(tmp_path / "log")
    ch: pd.ProcessChannel[int] = pd.ProcessChannel(
        ForkingSend(log, child), backend=on, workers=2, batch_items_max=5
    )
    ch.put_many(range(40))
    assert ch.close_and_drain(30)
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped, s.worker_restarts) == (40, 0, 0)
    recs = log.read()
    [forked] = [r for r in recs if r["kind"] == "child"]
    assert forked["status"] == STATUS[child]
    sends = [r for r in recs if r["kind"] == "send"]
    assert sorted(x for r in sends for x in r["items"]) == list(range(40))  # each sent once
    assert forked["pid"] not in {r["pid"] for r in sends}  # by the workers: none by the child
    if child == "raise":
        err = Path(log.path + ".stderr").read_text()
        assert err == (
            f"procdispatch: process {forked['pid']}, forked by the user's code in the worker "
            f"(pid {forked['parent']}), raised "
            "ValueError out of it into the worker: it exits here (end a forked child with "
            "os._exit)\n"
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("child", sorted(STATUS))
def test_a_child_forked_by_worker_init_ends_when_it_comes_back_into_the_worker(
    tmp_path: Any, on: str, child: str
) -> None:
    log = Log(tmp_path / "log")
    ch: pd.ProcessChannel[int] = pd.ProcessChannel(
        noop, backend=on, workers=1, batch_items_max=5, worker_init=ForkingInit(log, child)
    )
    ch.put_many(range(20))
    assert ch.close_and_drain(30)
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped, s.worker_restarts) == (20, 0, 0)
    [rec] = [r for r in log.read() if r["kind"] == "child"]
    assert rec["status"] == STATUS[child]
