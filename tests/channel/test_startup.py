"""Worker start-up order. A starting worker process needs a core (a whole interpreter under
spawn), so one worker starts with the channel; the others start as soon as more than one item
is in the channel, since a single item never needs a second worker, and never more than
START_LIMIT (about one per core) at once: a start begins when another ends (its worker ready,
or dead). A worker that is ready takes leases while its siblings are still starting, and a
channel that ends abandons the starts still waiting for their turn. The thread backend starts
every worker at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import worker_processes
from workerfns import (
    FirstInitPasses,
    Gate,
    GatedInit,
    Log,
    Recorder,
    SlowInit,
    delivered_items,
    wait_for,
)

import procdispatch as pd
from procdispatch import _pool

METHODS = pytest.mark.parametrize("method", ["forkserver", "spawn"])
pytestmark = pytest.mark.needs(
    "processes", why="only workers that cost a core to start are started one at a time"
)


def three_gated_workers(
    tmp_path: Path, make_channel: Callable[..., pd.ProcessChannel[Any]], method: str
) -> tuple[pd.ProcessChannel[Any], Log, Gate]:
    """A channel of 3 workers, single-item batches, whose worker_init waits on a gate."""
    log, gate = Log(tmp_path / "log"), Gate(tmp_path / "gate")
    ch = make_channel(
        Recorder(log),
        workers=3,
        batch_items_max=1,
        start_method=method,
        worker_init=GatedInit(log, gate),
    )
    return ch, log, gate


@METHODS
def test_one_worker_starts_with_the_channel_and_serves_single_items(tmp_path, make_channel, method):
    ch, log, gate = three_gated_workers(tmp_path, make_channel, method)
    first = log.wait_count(1, ev="init")[0]["pid"]
    # Nothing was put: the first worker is alone (and cannot become ready: its init waits).
    assert [p.pid for p in worker_processes()] == [first]
    gate.open()
    for i in range(3):  # one item at a time: never more than one in the channel
        ch.put(i)
        log.wait_count(i + 1, ev="sent")
        wait_for(lambda n=i + 1: ch.stats().items_delivered == n, what=f"item {i} delivered")
    assert {r["pid"] for r in log.read() if r["ev"] == "sent"} == {first}
    assert [p.pid for p in worker_processes()] == [first]
    assert ch.stats().workers_alive == 1
    ch.close_and_drain(30)
    assert delivered_items(log) == [0, 1, 2]


@METHODS
def test_the_other_workers_start_when_more_than_one_item_waits_a_few_at_a_time(
    tmp_path, make_channel, method, monkeypatch
):
    monkeypatch.setattr(_pool, "START_LIMIT", 2)
    ch, log, gate = three_gated_workers(tmp_path, make_channel, method)
    ch.put_many(range(10))
    # No worker can be ready (every init waits on the gate): two start for the work, and the
    # third waits for its turn, with no process.
    inits = log.wait_count(2, ev="init")
    assert len({r["pid"] for r in inits}) == 2
    assert sorted(p.pid for p in worker_processes()) == sorted(r["pid"] for r in inits)
    assert ch.stats().workers_alive == 2
    gate.open()
    # Its turn comes when one of the two is ready (the channel is still open).
    inits = log.wait_count(3, ev="init")
    assert len({r["pid"] for r in inits}) == 3
    ch.close_and_drain(30)
    assert sorted(delivered_items(log)) == list(range(10))
    s = ch.stats()
    assert (s.items_delivered, s.worker_restarts) == (10, 0)


@METHODS
def test_a_ready_worker_takes_the_items_while_its_siblings_are_still_starting(
    tmp_path, make_channel, method, monkeypatch
):
    monkeypatch.setattr(_pool, "START_LIMIT", 2)
    log, gate = Log(tmp_path / "log"), Gate(tmp_path / "gate")
    ch = make_channel(
        Recorder(log),
        workers=4,
        batch_items_max=1,
        start_method=method,
        worker_init=FirstInitPasses(log, gate, str(tmp_path / "first")),
    )
    ch.put_many(range(10))
    # Every worker but the first to run worker_init waits on the gate: the ready one sends all.
    wait_for(lambda: ch.stats().items_delivered == 10, what="every item, while the gate is shut")
    first = log.wait_count(1, ev="init")[0]["pid"]
    assert sorted(delivered_items(log)) == list(range(10))
    assert {r["pid"] for r in log.read() if r["ev"] == "sent"} == {first}
    # The ready worker holds no place among the starts: two more are starting (held at the
    # gate), and the fourth waits for one of them, with no process.
    starting = [r["pid"] for r in log.wait_count(2, ev="init-wait")]
    assert sorted(p.pid for p in worker_processes()) == sorted([first, *starting])
    assert ch.stats().workers_alive == 3
    gate.open()
    log.wait_count(3, ev="init-wait")  # the fourth's turn came
    assert ch.close_and_drain(30)
    s = ch.stats()
    assert (s.items_delivered, s.worker_restarts) == (10, 0)


def test_cancel_ends_a_channel_of_500_workers_with_starts_waiting_at_once(
    tmp_path, make_channel, monkeypatch
):
    """Starting 500 workers two at a time, each with a worker_init of half a second, would
    take over two minutes: cancel() abandons the waiting starts at once, kills the ones under
    way, and the channel ends with no process and no starter thread left."""
    monkeypatch.setattr(_pool, "START_LIMIT", 2)
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=500, batch_items_max=1, worker_init=SlowInit(log, 0.5))
    ch.put_many(range(1000))
    log.wait_count(3, ev="init")  # the first worker, then two at a time
    ch.cancel()
    assert ch.wait_drained(10), "cancel() did not end a channel whose starts wait"
    assert [t.name for t in threading.enumerate() if t.name.startswith("procdispatch-start-")] == []
    assert worker_processes() == []
    s = ch.stats()
    assert s.items_put == s.items_delivered + s.items_dropped == 1000
    assert s.workers_alive == 0


def test_a_second_item_while_the_first_is_in_hand_starts_the_others(tmp_path, make_channel):
    log, gate = Log(tmp_path / "log"), Gate(tmp_path / "gate")
    ch = make_channel(Recorder(log, gate=gate), workers=2, batch_items_max=1)
    ch.put("a")
    first = log.wait_count(1, ev="start")[0]["pid"]
    assert [p.pid for p in worker_processes()] == [first]  # busy, but nothing else waits
    ch.put("b")  # now two items are in the channel: the second worker starts and takes "b"
    second = log.wait_count(2, ev="start")[1]["pid"]
    assert second != first
    gate.open()
    ch.close_and_drain(30)
    assert sorted(delivered_items(log)) == ["a", "b"]


def test_thread_backend_starts_every_worker_at_once(make_channel):
    started: list[str] = []
    gate = threading.Event()

    def init() -> None:
        started.append(threading.current_thread().name)
        gate.wait(30)

    ch = make_channel(lambda b: None, workers=3, backend="thread", worker_init=init)
    wait_for(lambda: len(started) == 3, what="three worker threads in init")
    gate.set()
    ch.put(1)
    ch.close_and_drain(30)
    assert ch.stats().items_delivered == 1
