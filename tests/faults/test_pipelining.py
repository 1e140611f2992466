"""Pipelining (max_leases above workers) never blocks the coordinator on a pipe.

A lease larger than the pipe waits in the coordinator's outgoing queue while its worker is busy:
timers still fire, results still come back, and a worker blocked writing a large result cannot
deadlock with a coordinator writing it a large lease. A lease the worker never wholly received
does not count against it when it dies, and an answer already in the pipe when a worker is killed
for a deadline is delivered, not failed. (Large items go through the pipe here, not through
shared memory.)
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pipefns import Scripted
from workerfns import Log, wait_for

import procdispatch as pd
from procdispatch import _protocol as proto
from procdispatch._pool import IDLE
from procdispatch.backends import _arena
from procdispatch.backends._procstart import WorkerContext
from procdispatch.backends.process import ProcessWorker
from procdispatch.backends.thread import ThreadWorker

BIG = 300_000  # several times a pipe's capacity


@pytest.fixture(autouse=True)
def _through_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about frames larger than a pipe: large bytes items must not take the
    shared memory way (see backends._arena), whose frames are small."""
    monkeypatch.setattr(_arena, "OOB_MIN", 1 << 62)


@pytest.fixture
def script(tmp_path: Path) -> Any:
    gates = tmp_path / "gates"
    gates.mkdir()
    sender = Scripted(Log(tmp_path / "log"), str(gates))
    yield sender
    for name in ("hold", "raise", "exit", "b"):  # let whatever still waits end
        sender.gate(name).open()


def _sent(log: Log) -> list[dict[str, Any]]:
    return [r for r in log.read() if r["ev"] == "sent"]


def _check_accounting(ch: pd.ProcessChannel[Any]) -> pd.Stats:
    s = ch.stats()
    assert s.items_put == s.items_delivered + s.items_dropped
    assert (s.items_buffered, s.items_in_flight) == (0, 0)
    return s


@pytest.mark.needs("pipelining", why="max_leases above workers: leases wait behind the running one")
def test_a_large_lease_for_a_busy_worker_does_not_hold_up_send_timeout(
    make_channel, script, backend
):
    errors: list[tuple[Any, BaseException]] = []
    ch = make_channel(
        script,
        backend=backend,
        workers=1,
        max_leases=2,
        batch_items_max=1,
        send_timeout=1.0,
        on_error=lambda b, e: errors.append((b.data[0], e)) and False,
    )
    ch.put("hold")
    script.log.wait_count(1, ev="start")
    ch.put(b"y" * BIG)  # leased behind "hold": it cannot all go into the pipe
    assert ch.close_and_drain(20)
    ((item, exc),) = errors
    assert item == "hold"
    assert isinstance(exc, pd.SendTimeout)
    (rec,) = _sent(script.log)
    assert (rec["item"], rec["attempt"]) == (f"bytes:{BIG}", 1)  # never started before
    s = _check_accounting(ch)
    assert (s.items_delivered, s.items_dropped, s.batches_failed) == (1, 1, 1)


@pytest.mark.needs("pipelining", why="max_leases above workers: leases wait behind the running one")
@pytest.mark.parametrize("ending", ["close", "cancel"])
def test_a_large_result_and_a_large_lease_cross_without_deadlock(
    make_channel, script, ending, backend
):
    errors: list[tuple[Any, BaseException]] = []
    ch = make_channel(
        script,
        backend=backend,
        workers=1,
        max_leases=2,
        batch_items_max=1,
        cancel_grace=20.0,
        on_error=lambda b, e: errors.append((b.data[0], e)) and False,
    )
    ch.put(f"raise:{BIG}")
    script.log.wait_count(1, ev="start")
    ch.put(b"y" * BIG)
    wait_for(lambda: ch.stats().items_in_flight == 2, 10, "the large lease to be handed over")
    # The worker now writes a large Failed while a large lease waits for it.
    script.gate("raise").open()
    if ending == "close":
        assert ch.close_and_drain(20)
    else:
        ch.cancel()
        assert ch.wait_drained(20)
    ((item, exc),) = errors
    assert item == f"raise:{BIG}"
    assert isinstance(exc, ValueError)
    assert len(str(exc)) == BIG
    assert [r["item"] for r in _sent(script.log)] == [f"bytes:{BIG}"]
    s = _check_accounting(ch)
    assert (s.items_delivered, s.items_dropped) == (1, 1)


@pytest.mark.needs("processes", why="the worker is stopped with SIGSTOP, then killed")
def test_a_lease_still_in_our_queue_when_its_worker_dies_never_started(make_channel, script):
    """The head lease itself: the worker was stopped before it could read it all."""
    errors: list[BaseException] = []
    ch = make_channel(
        script,
        workers=1,
        max_leases=1,
        batch_items_max=1,
        on_error=lambda b, e: errors.append(e) or True,
    )
    ch.put("warm")
    wait_for(lambda: ch.stats().items_delivered == 1, 20, "the first item")
    pid = int(_sent(script.log)[0]["worker"].split("/")[0])
    os.kill(pid, signal.SIGSTOP)  # it cannot read its next lease
    try:
        ch.put(b"y" * BIG)
        wait_for(lambda: ch.stats().items_in_flight == 1, 10, "the large lease to be handed over")
    finally:
        os.kill(pid, signal.SIGKILL)
    assert ch.close_and_drain(20)
    assert errors == []  # it died without having read the lease: no attempt, no fault
    recs = _sent(script.log)
    assert [(r["item"], r["attempt"]) for r in recs] == [("warm", 1), (f"bytes:{BIG}", 1)]
    assert recs[1]["worker"] != recs[0]["worker"]
    s = _check_accounting(ch)
    assert (s.items_delivered, s.batches_failed, s.worker_restarts) == (2, 0, 1)


def _both_workers_idle(ch: pd.ProcessChannel[Any]) -> bool:
    slots = ch._coord.pool.slots
    return len(slots) == 2 and all(s.state is IDLE and not s.batches for s in slots)


def _wait_until_answered(ch: pd.ProcessChannel[Any], item: str) -> None:
    """Block (in a parent-side callback, on the coordinator thread) until the worker holding
    ``item`` has its answer in its result pipe, unread."""
    (slot,) = [s for s in ch._coord.pool.slots if s.batches and s.batches[0].data == [item]]
    conn = slot.handle.waitables()[0]
    readable, _, _ = select.select([conn], [], [], 20)
    assert readable, f"no answer from the worker holding {item!r}"


@pytest.mark.parametrize("deadline", ["send_timeout", "cancel_grace"])
def test_an_answer_already_in_the_pipe_is_delivered_not_failed(
    make_channel, script, backend, deadline
):
    """Two workers get their batches in the same pass, so their deadlines are equal. The first
    is killed; the callback that reports its batch lets the second finish and waits until the
    second's Done is in its pipe, past the second's deadline too. The second worker must then
    be read, not killed."""
    errors: list[tuple[Any, str]] = []
    drops: list[Any] = []
    holder: list[pd.ProcessChannel[Any]] = []

    def release_b(b: pd.Batch[Any]) -> None:
        if b.data == ["hold"]:
            script.gate("b").open()
            _wait_until_answered(holder[0], "wait:b")

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        errors.append((b.data[0], type(e).__name__))
        release_b(b)
        return False

    def on_drop(b: pd.Batch[Any] | None, final: bool) -> None:
        if b is not None:
            drops.append(b.data[0])
            if deadline == "cancel_grace":
                release_b(b)

    ch = make_channel(
        script,
        backend=backend,
        workers=2,
        max_leases=2,
        batch_items_max=1,
        send_timeout=1.0 if deadline == "send_timeout" else None,
        cancel_grace=1.0,
        on_error=on_error,
        on_drop=on_drop,
    )
    holder.append(ch)
    ch.put_many(["warm1", "warm2"])  # starts the second worker
    wait_for(lambda: ch.stats().items_delivered == 2, 20, "the warm-up items")
    wait_for(lambda: _both_workers_idle(ch), 20, "both workers to be ready")
    ch.put_many(["hold", "wait:b"])  # one pass leases both: equal deadlines
    script.log.wait_count(2, ev="start")
    if deadline == "cancel_grace":
        ch.cancel()
        assert ch.wait_drained(20)
        assert errors == []
    else:
        assert ch.close_and_drain(20)
        assert errors == [("hold", "SendTimeout")]
    assert drops == ["hold"]
    sent = [r["item"] for r in _sent(script.log)]
    assert sorted(sent) == ["wait:b", "warm1", "warm2"]
    s = _check_accounting(ch)
    assert (s.items_delivered, s.items_dropped) == (3, 1)


@pytest.mark.needs("pipelining", why="max_leases above workers: leases wait behind the running one")
def test_a_worker_retired_with_a_large_lease_pending_runs_it_then_is_replaced(make_channel, script):
    """Its last lease is still waiting for room in the pipe when it is retired."""
    ch = make_channel(script, workers=1, max_leases=2, batch_items_max=1, max_batches_per_worker=2)
    ch.put("wait:b")
    script.log.wait_count(1, ev="start")
    ch.put(b"y" * BIG)  # its second and last lease: it is retired holding both
    wait_for(lambda: ch.stats().items_in_flight == 2, 10, "the large lease to be handed over")
    script.gate("b").open()
    ch.put("after")
    assert ch.close_and_drain(20)
    recs = _sent(script.log)
    assert [r["item"] for r in recs] == ["wait:b", f"bytes:{BIG}", "after"]
    assert recs[0]["worker"] == recs[1]["worker"] != recs[2]["worker"]
    s = _check_accounting(ch)
    assert (s.items_delivered, s.worker_restarts) == (3, 1)


def test_the_stop_frame_waits_behind_a_lease_the_pipe_cannot_take_yet(tmp_path, script):
    """At the handle: neither a large lease nor the stop frame behind it blocks the caller; both
    go out as the worker makes room, and the worker runs the lease, then exits."""
    payload = pickle.dumps((script, None), protocol=5)
    h = ProcessWorker(WorkerContext("forkserver"), payload, 1)
    h.start()
    try:
        received: list[Any] = []

        def read_until(n: int) -> None:
            while len(received) < n:
                readable, _, _ = select.select([h.waitables()[0]], [], [], 20)
                assert readable, f"waiting for message {n}, got {received}"
                msgs, gone = h.receive()
                received.extend(msgs)
                assert not gone or len(received) >= n

        read_until(1)
        assert isinstance(received[0], proto.Ready)
        first: pd.Batch[Any] = pd.Batch(["wait:b"], id=1, attempt=1)
        big: pd.Batch[Any] = pd.Batch([b"y" * BIG], id=2, attempt=1)
        assert h.send_lease(first) is False  # fits: written at once
        script.log.wait_count(1, ev="start")
        assert h.send_lease(big) is True  # the worker is busy
        assert h.unsent() == 1
        assert h.stop() is True  # queued behind the lease
        script.gate("b").open()
        while not h.flush():
            _, writable, _ = select.select([], [h.write_fd()], [], 20)
            assert writable, "the worker stopped reading"
        assert h.unsent() == 0
        read_until(3)
        assert [(type(m), m.batch_id) for m in received[1:]] == [(proto.Done, 1), (proto.Done, 2)]
        assert h.exitcode(20) == 0  # it read the stop frame
    finally:
        h.kill()
        h.exitcode(5)
        h.close()


def test_an_answer_that_arrives_as_the_worker_is_killed_is_delivered(
    make_channel, script, backend, monkeypatch
):
    """The send finishes between the last read and the kill: what the dead worker said is
    read before its batch is judged."""
    if backend not in ("process", "thread"):
        pytest.skip(f"it patches the kill of the process and thread handles (not {backend}'s)")
    cls = ProcessWorker if backend == "process" else ThreadWorker
    real_kill = cls.kill
    first = [True]

    def kill_after_the_answer(self: Any) -> None:
        if first.pop() if first else False:
            script.gate("b").open()
            readable, _, _ = select.select([self.waitables()[0]], [], [], 20)
            assert readable, "the send did not answer"
        real_kill(self)

    monkeypatch.setattr(cls, "kill", kill_after_the_answer)
    errors: list[BaseException] = []
    ch = make_channel(
        script,
        backend=backend,
        workers=1,
        batch_items_max=1,
        send_timeout=0.5,
        on_error=lambda b, e: errors.append(e) or True,
    )
    ch.put("wait:b")
    assert ch.close_and_drain(20)
    assert errors == []
    assert [(r["item"], r["attempt"]) for r in _sent(script.log)] == [("wait:b", 1)]
    s = _check_accounting(ch)
    assert (s.items_delivered, s.batches_failed) == (1, 0)


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_done_says_how_long_its_send_ran(script, kind):
    """The coordinator hands a second batch only to a worker whose sends are quick: each Done
    carries the send's duration, which lies between what the test saw of it from outside."""
    if kind == "process":
        payload = pickle.dumps((script, None), protocol=5)
        h: Any = ProcessWorker(WorkerContext("forkserver"), payload, 1)
    else:
        h = ThreadWorker(script, None, 1)
    h.start()
    try:
        received: list[Any] = []

        def read_until(n: int) -> None:
            while len(received) < n:
                readable, _, _ = select.select([h.waitables()[0]], [], [], 20)
                assert readable, f"waiting for message {n}, got {received}"
                received.extend(h.receive()[0])

        read_until(1)
        handed = time.monotonic()
        assert h.send_lease(pd.Batch(["wait:b"], id=1, attempt=1)) is False
        script.log.wait_count(1, ev="start")
        running = time.monotonic()  # the send began before this
        script.gate("b").open()
        opened = time.monotonic()  # and ended after this
        read_until(2)
        answered = time.monotonic()
        (done,) = received[1:]
        assert isinstance(done, proto.Done)
        assert opened - running <= done.seconds <= answered - handed
    finally:
        h.kill()
        h.exitcode(5)
        h.close()


class _KillsItselfOn:
    """Records each send in the log, then SIGKILLs its own worker on every ``every``-th item's
    first attempt (after its work is done: the death is what fails it)."""

    def __init__(self, log: Log, every: int) -> None:
        self.log, self.every = log, every

    def __call__(self, batch: pd.Batch[int]) -> None:
        k = batch.data[0]
        self.log.write(k=k, attempt=batch.attempt)
        if k % self.every == self.every - 1 and batch.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_death_seen_on_a_write_is_charged_to_the_batch_being_sent(tmp_path):
    """Quick sends let a worker hold queued leases; when its death shows first as a failed
    write of the next lease, the answers it wrote before it died are read before the death is
    charged: each batch that returned is delivered once, and only the batch whose send killed
    the worker fails (retry.none(): dropped after its first crash)."""
    log = Log(tmp_path / "log")
    every, n = 50, 3000
    drops: list[int] = []
    errors: list[tuple[int, BaseException]] = []
    ch = pd.ProcessChannel(
        _KillsItselfOn(log, every),
        workers=2,
        batch_items_max=1,
        retry=pd.retry.none(),
        on_drop=lambda b, flush: drops.extend(b.data if b is not None else ()),
        on_error=lambda b, e: errors.append((b.data[0], e)) and False,
    )
    ch.put_many(range(n))
    assert ch.close_and_drain(120)
    killers = {k for k in range(n) if k % every == every - 1}
    runs: dict[int, int] = {}
    for r in log.read():
        runs[r["k"]] = runs.get(r["k"], 0) + 1
    assert sorted(drops) == sorted(killers)
    assert {k for k, _ in errors} == killers
    assert all(isinstance(e, pd.WorkerCrashed) for _, e in errors)
    assert runs == dict.fromkeys(range(n), 1)  # a batch behind the fatal one never ran
    s = _check_accounting(ch)
    assert (s.items_delivered, s.items_dropped) == (n - len(killers), len(killers))
    assert s.batches_sent == n  # every send_fn call, and only those
