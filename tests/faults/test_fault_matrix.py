"""The fault matrix: each fault, on each side of the pipe, with its exact expected outcome.

Items 0..5 go out in batches of two ([0, 1], [2, 3], [4, 5]); the fault hits the first attempt of
the batch holding item 2. Every row asserts what on_error saw (type and message), what was
delivered, what was dropped, and what stats() says -- not merely that nothing crashed.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import CAPABILITIES, worker_processes
from faultfns import FailingInit, FailsToUnpickle, Fault, KillsOnUnpickle
from workerfns import Log, Recorder, delivered_items

import procdispatch as pd
from procdispatch import _outcomes


@dataclass
class Row:
    kind: str
    error: type[BaseException]
    message: str  # regex searched in str(exc)
    retried_ok: bool  # the retry (attempt 2) delivers the batch
    restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: What a backend must be able to do for the row to apply (see tests/conftest.py).
    needs: tuple[str, ...] = ()


def _row(row: Row) -> Any:
    marks = [pytest.mark.needs(*row.needs, why=f"the {row.kind} fault")] if row.needs else []
    return pytest.param(row, id=row.kind, marks=marks)


ROWS = [
    # worker dies mid-send: the batch fails alone, the worker is replaced, the retry delivers
    Row(
        "sigkill",
        pd.WorkerCrashed,
        r"killed by SIGKILL while sending batch 2 \(attempt 1\)",
        True,
        1,
        needs=("processes",),
    ),
    Row(
        "segfault",
        pd.WorkerCrashed,
        r"killed by SIGSEGV while sending batch 2",
        True,
        1,
        needs=("processes",),
    ),
    Row(
        "exit",
        pd.WorkerCrashed,
        r"exited with code 7 while sending batch 2",
        True,
        1,
        needs=("processes",),
    ),
    Row(
        "hang",
        pd.SendTimeout,
        r"batch 2 \(attempt 1\) ran longer than send_timeout=1.0s; "
        r"worker \d+ \(pid \d+\) was killed",
        True,
        1,
        {"send_timeout": 1.0},
        needs=("kill",),
    ),
    # send_fn raises: the exception crosses the pipe as itself or as RemoteError
    Row("raise", ValueError, r"^plain failure$", True),
    Row(
        "raise_unpicklable",
        pd.RemoteError,
        r"UnpicklableError: holds a lock",
        True,
        needs=("pickling",),
    ),
    Row("raise_badinit", pd.RemoteError, r"BadInitError: a/b", True, needs=("pickling",)),
    Row("systemexit", SystemExit, r"^3$", True),
    # send_fn's mutation cannot be pickled back
    Row(
        "meta_unpicklable",
        pd.RemoteError,
        r"change to batch\.meta could not be pickled",
        True,
        needs=("pickling",),
    ),
    Row(
        "data_unpicklable",
        pd.RemoteError,
        r"change to batch\.data could not be pickled",
        True,
        needs=("pickling",),
    ),
]


def _run(tmp_path: Any, make_channel: Any, send_fn: Any, items: list[Any], **kw: Any):
    errors: list[tuple[BaseException, list[Any], int]] = []
    drops: list[tuple[list[Any] | None, bool]] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        errors.append((e, list(b.data), b.attempt))
        return True

    kw.setdefault("retry", pd.retry.limited(1))
    ch = make_channel(
        send_fn,
        workers=2,
        batch_items_max=2,
        on_error=on_error,
        on_drop=lambda b, f: drops.append((None if b is None else list(b.data), f)),
        **kw,
    )
    ch.put_many(items)
    assert ch.close_and_drain(60)
    return errors, drops, ch.stats()


@pytest.mark.parametrize("row", [_row(r) for r in ROWS])
def test_send_side_faults(tmp_path, make_channel, row: Row, backend):
    log = Log(tmp_path / "log")
    errors, drops, s = _run(
        tmp_path, make_channel, Fault(log, row.kind), list(range(6)), **row.extra
    )
    ((exc, data, attempt),) = errors
    assert type(exc) is row.error, (type(exc), exc)
    assert re.search(row.message, str(exc)), str(exc)
    assert data == [2, 3]
    assert attempt == 1
    assert sorted(delivered_items(log)) == list(range(6))
    assert drops == [(None, True)]
    assert (s.items_put, s.items_delivered, s.items_dropped) == (6, 6, 0)
    assert (s.batches_failed, s.batches_retried) == (1, 1)
    assert s.worker_restarts == row.restarts
    if isinstance(exc, pd.WorkerCrashed):
        assert exc.pid is not None
        assert exc.exitcode == {"sigkill": -9, "segfault": -11, "exit": 7}[row.kind]
    if isinstance(exc, pd.RemoteError):
        assert exc.remote_traceback in str(exc)
        assert "faultfns.py" in exc.remote_traceback
    if row.kind == "raise" and "pickling" in CAPABILITIES[backend]:
        assert "faultfns.py" in str(exc.__cause__)  # the worker's traceback came back with it
    assert not worker_processes()


@pytest.mark.needs("pickling", why="what will not pickle fails only where items are pickled")
def test_item_that_will_not_pickle_fails_alone(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    lock = threading.Lock()
    errors, drops, s = _run(tmp_path, make_channel, Recorder(log), [0, 1, lock, 3, 4, 5])
    ((exc, data, _),) = errors
    assert data == [lock]
    assert isinstance(exc, (TypeError, Exception))
    assert "lock" in str(exc).lower()
    assert sorted(delivered_items(log)) == [0, 1, 3, 4, 5]
    assert [d for d in drops if d[0] is not None] == [([lock], False)]
    assert (s.items_put, s.items_delivered, s.items_dropped) == (6, 5, 1)


@pytest.mark.needs("pickling", why="what will not pickle fails only where items are pickled")
def test_item_that_fails_to_unpickle_in_the_worker(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    bad = FailsToUnpickle()
    errors, drops, s = _run(
        tmp_path, make_channel, Recorder(log), [0, 1, bad, 3, 4, 5], retry=pd.retry.none()
    )
    ((exc, data, _),) = errors
    assert type(exc) is ValueError
    assert str(exc) == "cannot unpickle this item"
    assert data == [bad, 3]
    assert sorted(delivered_items(log)) == [0, 1, 4, 5]
    assert [d for d in drops if d[0] is not None] == [([bad, 3], False)]
    assert (s.items_delivered, s.items_dropped, s.worker_restarts) == (4, 2, 0)


@pytest.mark.needs(
    "processes", why="a worker that crashes, exits or is killed is a process of its own"
)
def test_item_whose_unpickling_kills_the_worker(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    bad = KillsOnUnpickle()
    errors, _, s = _run(
        tmp_path, make_channel, Recorder(log), [0, 1, bad, 3, 4, 5], retry=pd.retry.none()
    )
    ((exc, data, _),) = errors
    assert isinstance(exc, pd.WorkerCrashed)
    assert exc.exitcode == 9
    assert data == [bad, 3]
    assert sorted(delivered_items(log)) == [0, 1, 4, 5]
    assert (s.items_delivered, s.items_dropped, s.worker_restarts) == (4, 2, 1)


@pytest.mark.parametrize("where", ["on_error", "on_drop", "on_drained"])
def test_exceptions_in_callbacks_are_logged_and_never_stop_the_coordinator(
    tmp_path, make_channel, caplog, where
):
    log = Log(tmp_path / "log")
    calls: list[str] = []

    def raiser(*a: Any) -> Any:
        calls.append(where)
        raise RuntimeError(f"bug in {where}")

    kw: dict[str, Any] = {where: raiser}
    if where != "on_error":
        kw["on_error"] = lambda b, e: False
    ch = make_channel(
        Fault(log, "raise", trigger=2, attempts=99), workers=1, batch_items_max=2, **kw
    )
    ch.put_many(range(6))
    assert ch.close_and_drain(30)
    assert calls
    assert sorted(delivered_items(log)) == [0, 1, 4, 5]
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped) == (4, 2)  # raising on_error = do not retry
    logged = [r for r in caplog.records if r.name == "procdispatch" and r.exc_info]
    assert any(f"bug in {where}" in str(r.exc_info[1]) for r in logged)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_worker_init_failing_everywhere_fails_fast(make_channel, method, backend):
    ch = make_channel(
        Recorder(Log("/dev/null")), workers=2, worker_init=FailingInit(), start_method=method
    )

    def put_until_it_fails() -> None:
        for i in range(10_000):
            ch.put(i, timeout=30)

    with pytest.raises(pd.WorkerStartFailed) as ei:
        put_until_it_fails()
    assert ch.wait_drained(60)
    err = ei.value
    assert "workers cannot start" in str(err)
    assert "init cannot reach the database" in str(err)
    cause = err.__cause__
    assert isinstance(cause, RuntimeError)
    if "pickling" in CAPABILITIES[backend]:
        assert "faultfns.py" in str(cause.__cause__)  # the worker's traceback
    s = ch.stats()
    assert s.items_put == s.items_delivered + s.items_dropped
    with pytest.raises(pd.WorkerStartFailed):
        ch.close_and_drain(10)
    assert not worker_processes()


@pytest.mark.needs(
    "processes", why="a worker that crashes, exits or is killed is a process of its own"
)
def test_worker_killed_while_idle_is_replaced_without_failing_anything(tmp_path, make_channel):
    import os
    import signal

    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=1, batch_items_max=1)
    from workerfns import wait_for

    ch.put(0)
    (rec,) = log.wait_count(1, ev="sent")
    # Idle as the parent sees it: its answer has arrived (the worker logs "sent" before it
    # answers, and a kill in between would fail the batch it still holds).
    wait_for(lambda: ch.stats().items_delivered == 1, what="the first answer")
    os.kill(rec["pid"], signal.SIGKILL)
    wait_for(lambda: ch.stats().worker_restarts == 1, what="a replacement worker")
    ch.put(1)
    assert ch.close_and_drain(30)
    s = ch.stats()
    assert (s.items_delivered, s.batches_failed, s.worker_restarts) == (2, 0, 1)
    pids = {r["pid"] for r in log.read() if r["ev"] == "sent"}
    assert len(pids) == 2


@pytest.mark.needs(
    "processes", why="a worker that crashes, exits or is killed is a process of its own"
)
@pytest.mark.parametrize(
    "max_leases",
    [
        4,  # two batches per worker: one running, one waiting in its pipe
        None,  # the default: the same, once a worker's sends were seen to be quick
    ],
)
def test_pipelined_batches_behind_a_crash_are_requeued_without_an_attempt(
    tmp_path, make_channel, max_leases
):
    log = Log(tmp_path / "log")
    errors, _, s = _run(
        tmp_path,
        make_channel,
        Fault(log, "sigkill", trigger=2),
        list(range(12)),
        max_leases=max_leases,
    )
    ((exc, data, attempt),) = errors
    assert isinstance(exc, pd.WorkerCrashed)
    assert (data, attempt) == ([2, 3], 1)
    sent = [r for r in log.read() if r["ev"] == "sent"]
    assert sorted(x for r in sent for x in r["data"]) == list(range(12))
    assert {tuple(r["data"]): r["attempt"] for r in sent if 2 not in r["data"]} == {
        (i, i + 1): 1 for i in range(0, 12, 2) if i != 2
    }
    assert (s.batches_failed, s.worker_restarts, s.items_delivered) == (1, 1, 12)


@pytest.mark.only("thread", why="a thread cannot be killed: it is abandoned")
def test_thread_backend_send_timeout_abandons_the_thread(make_channel):
    import time

    errors: list[BaseException] = []
    done: list[int] = []

    def send(batch: pd.Batch[int]) -> None:
        if batch.data == [1] and batch.attempt == 1:
            time.sleep(3)
        done.extend(batch.data)

    ch = make_channel(
        send,
        backend="thread",
        workers=1,
        batch_items_max=1,
        send_timeout=0.3,
        retry=pd.retry.limited(1),
        on_error=lambda b, e: errors.append(e) or True,
    )
    ch.put_many([0, 1, 2])
    assert ch.close_and_drain(30)
    (e,) = errors
    assert isinstance(e, pd.SendTimeout)
    assert sorted(done[:3]) == [0, 1, 2]
    assert ch.stats().worker_restarts == 1


def test_a_coordinator_crash_fails_loudly_and_still_accounts_for_every_item(
    make_channel, caplog, monkeypatch
):
    def bug(self: Any, batch: Any) -> None:
        raise KeyError("coordinator bug")

    # A bug in the coordinator's own code (user callables are guarded: see
    # test_coordinator_edges), hit when the first send fails.
    monkeypatch.setattr(_outcomes.Outcomes, "_shrink", bug)
    ch = make_channel(
        Fault(Log("/dev/null"), "raise", trigger=2, attempts=99),
        backend="thread",
        workers=1,
        batch_items_max=2,
    )
    ch.put_many(range(6))
    assert ch.wait_drained(30)
    with pytest.raises(pd.InternalError, match="coordinator failed"):
        ch.put(99)
    with pytest.raises(pd.InternalError):
        ch.close_and_drain(5)
    s = ch.stats()
    assert s.items_put == 6
    assert s.items_put == s.items_delivered + s.items_dropped
    assert any("coordinator failed" in r.getMessage() for r in caplog.records)
