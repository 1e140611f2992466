"""The coordinator survives whatever option values, user code and worker answers throw at it.

Every finite option value the validators accept is a valid deadline, however far; and whatever
a callback, a retry policy, an item's pickling or a worker's answer raises -- a SystemExit or a
KeyboardInterrupt too -- is the failure of the batch concerned, never of the coordinator: after
the drain every item is delivered or dropped, and no worker is left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import worker_processes
from edgefns import AnswersBadly, InitFailsBadly, InitFailsStrangely, Unpicklable
from faultfns import FailsFirst, UnpicklableError
from workerfns import Log, Recorder, delivered_items, wait_for

import procdispatch as pd
from procdispatch import _outcomes

MONTH = 2.6e6  # beyond the longest wait the OS takes under the selector (about 24.8 days)


def _no_coordinator_failure(caplog: Any) -> None:
    assert not [r for r in caplog.records if "coordinator failed" in r.getMessage()]


def _accounted(ch: pd.ProcessChannel[Any], delivered: list[Any], dropped: list[Any]) -> None:
    s = ch.stats()
    assert s.items_put == s.items_delivered + s.items_dropped
    assert (s.items_delivered, s.items_dropped) == (len(delivered), len(dropped))


# ---- deadlines of any finite length ---------------------------------------------------------


def test_month_long_timeouts_drain_normally(tmp_path: Any, make_channel: Any, caplog: Any) -> None:
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log),
        workers=1,
        batch_items_max=2,
        batch_age_max=MONTH,
        start_timeout=MONTH,
        send_timeout=MONTH,
        cancel_grace=1e10,
        delivery_timeout=1e10,
    )
    ch.put_many(range(5))  # the last batch is cut by the close, not by its age
    assert ch.close_and_drain(60)
    assert sorted(delivered_items(log)) == list(range(5))
    _accounted(ch, list(range(5)), [])
    _no_coordinator_failure(caplog)


def test_a_retry_delay_of_1e300_waits_until_the_cancel(
    tmp_path: Any, make_channel: Any, caplog: Any
) -> None:
    log = Log(tmp_path / "log")
    drops: list[list[Any]] = []
    ch = make_channel(
        FailsFirst(log, "transient"),
        workers=1,
        batch_items_max=2,
        retry=lambda: iter([1e300]),
        on_drop=lambda b, f: b is not None and drops.append(list(b.data)),
    )
    ch.put_many(range(6))
    wait_for(lambda: sorted(delivered_items(log)) == [2, 3, 4, 5], what="the other batches")
    wait_for(lambda: ch.stats().batches_retried == 1, what="the retry to be queued")
    ch.cancel()
    assert ch.wait_drained(60)
    assert drops == [[0, 1]]
    _accounted(ch, [2, 3, 4, 5], [0, 1])
    _no_coordinator_failure(caplog)


# ---- user callables that fail, whatever they raise --------------------------------------------

#: Where the user's code misbehaves, and how the coordinator names it in its log.
WHERE = {
    "on_error": "on_error",
    "on_drop": "on_drop",
    "on_drop_flush": "on_drop(None, True)",
    "on_drained": "on_drained",
    "retry_factory": "the retry policy",
    "retry_iterator": "the retry policy",
}


def _callables(where: str, act: Callable[[], None], seen: dict[str, list[Any]]) -> dict[str, Any]:
    """The channel's callables, with ``act`` run inside the one named ``where``. The batch
    holding item 0 fails once (transiently); it is retried, except when ``on_drop`` is under
    test: then it is dropped, so that on_drop runs."""

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        if where == "on_error":
            act()
        return where != "on_drop"

    def on_drop(b: pd.Batch[Any] | None, flush: bool) -> None:
        if b is not None:
            seen["dropped"].extend(b.data)
        if (where == "on_drop" and b is not None) or (where == "on_drop_flush" and flush):
            act()

    def on_drained() -> None:
        seen["drained"].append(True)
        if where == "on_drained":
            act()

    def delays() -> Iterator[float]:
        if where == "retry_iterator":
            act()
        yield 0.0

    def retry() -> Iterator[float]:
        if where == "retry_factory":
            act()
        return delays()

    return {"on_error": on_error, "on_drop": on_drop, "on_drained": on_drained, "retry": retry}


def _run(
    tmp_path: Any, make_channel: Any, where: str, act: Callable[[], None]
) -> tuple[pd.ProcessChannel[Any], Log, dict[str, list[Any]]]:
    log = Log(tmp_path / "log")
    seen: dict[str, list[Any]] = {"dropped": [], "drained": []}
    ch = make_channel(
        FailsFirst(log, "transient"),
        workers=1,
        batch_items_max=2,
        **_callables(where, act, seen),
    )
    ch.put_many(range(6))
    assert ch.close_and_drain(60)
    return ch, log, seen


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, GeneratorExit])
@pytest.mark.parametrize("where", sorted(WHERE))
def test_a_callable_raising_a_base_exception_fails_only_what_it_was_called_for(
    tmp_path: Any,
    make_channel: Any,
    caplog: Any,
    backend: str,
    where: str,
    error: type[BaseException],
) -> None:
    def act() -> None:
        raise error(f"raised in {where}")

    with caplog.at_level(logging.ERROR, logger="procdispatch"):
        ch, log, seen = _run(tmp_path, make_channel, where, act)
    # A failing on_error or retry policy means "do not retry": the batch is dropped (through
    # on_drop); a failing on_drop still counts its drop; the final callbacks changed nothing.
    # The channel was not cancelled: every other batch was delivered.
    lost = [0, 1] if where in ("on_error", "on_drop", "retry_factory", "retry_iterator") else []
    assert sorted(seen["dropped"]) == lost
    assert sorted(delivered_items(log)) == [x for x in range(6) if x not in lost]
    _accounted(ch, [x for x in range(6) if x not in lost], lost)
    assert seen["drained"] == [True]  # on_drained ran, even after a failing final on_drop
    name = error.__name__
    assert [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR
        and r.getMessage().startswith(WHERE[where])
        and f"{name}: raised in {where}" in r.getMessage()
    ], [r.getMessage() for r in caplog.records]
    _no_coordinator_failure(caplog)
    if backend == "process":
        wait_for(lambda: not worker_processes(), what="no worker left")


def test_on_error_that_breaks_batch_data_drops_the_batch_as_it_was(
    tmp_path: Any, make_channel: Any, caplog: Any
) -> None:
    log = Log(tmp_path / "log")
    dropped: list[list[Any]] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        b.data = None  # type: ignore[assignment]
        return True

    with caplog.at_level(logging.ERROR, logger="procdispatch"):
        ch = make_channel(
            FailsFirst(log, "transient"),
            workers=1,
            batch_items_max=2,
            on_error=on_error,
            on_drop=lambda b, f: b is not None and dropped.append(list(b.data)),
        )
        ch.put_many(range(6))
        assert ch.close_and_drain(60)
    assert dropped == [[0, 1]]
    assert sorted(delivered_items(log)) == [2, 3, 4, 5]
    _accounted(ch, [2, 3, 4, 5], [0, 1])
    assert any(
        "on_error left batch.data of batch 1 (attempt 1) a NoneType" in r.getMessage()
        for r in caplog.records
    )
    _no_coordinator_failure(caplog)


# ---- slow callables ----------------------------------------------------------------------------


class _Stopwatch:
    """Stands for the monotonic clock the coordinator times callbacks with: it moves only when
    a callback says it took long, so that no test waits for real."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("where", sorted(WHERE))
def test_every_callable_the_coordinator_runs_is_reported_when_slow(
    tmp_path: Any,
    make_channel: Any,
    caplog: Any,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    clock = _Stopwatch()
    monkeypatch.setattr(_outcomes, "monotonic", clock)

    def act() -> None:
        clock.t += 2.5 * _outcomes.SLOW_CALLBACK

    with caplog.at_level(logging.WARNING, logger="procdispatch"):
        ch, _, _ = _run(tmp_path, make_channel, where, act)
    slow = [r.getMessage() for r in caplog.records if "on the coordinator thread" in r.getMessage()]
    assert len(slow) == 1, slow
    assert slow[0].startswith(f"{WHERE[where]} (")
    named = {"retry_factory": "retry", "retry_iterator": "retry", "on_drop_flush": "on_drop"}
    assert f"_callables.<locals>.{named.get(where, where)})" in slow[0]
    assert f"took {2.5 * _outcomes.SLOW_CALLBACK:.1f}s" in slow[0]
    s = ch.stats()
    assert s.items_put == s.items_delivered + s.items_dropped == 6


# ---- foreign bytes: items pickled and answers unpickled in the parent ----------------------------


@pytest.mark.needs("pickling", why="leases are pickled to reach the worker")
@pytest.mark.parametrize("how", ["exit", "interrupt"])
def test_an_item_whose_pickling_raises_a_base_exception_fails_alone(
    tmp_path: Any, make_channel: Any, caplog: Any, how: str
) -> None:
    log = Log(tmp_path / "log")
    errors: list[tuple[BaseException, int]] = []
    dropped: list[list[Any]] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        errors.append((e, len(b.data)))
        return False

    bad = Unpicklable(how)
    ch = make_channel(
        Recorder(log),
        workers=1,
        batch_items_max=3,
        on_error=on_error,
        on_drop=lambda b, f: b is not None and dropped.append(list(b.data)),
    )
    ch.put_many([0, 1, bad, 3, 4, 5])
    assert ch.close_and_drain(60)
    ((exc, n),) = errors
    assert n == 1
    raised = {"exit": SystemExit, "interrupt": KeyboardInterrupt}[how]
    assert str(exc) == (
        "item 2 of batch 1 (attempt 1) cannot be pickled to reach a worker: "
        f"{raised.__name__}: raised while pickling ({how})"
    )
    assert type(exc.__cause__) is raised
    assert dropped == [[bad]]
    assert sorted(delivered_items(log)) == [0, 1, 3, 4, 5]
    _accounted(ch, [0, 1, 3, 4, 5], [bad])
    _no_coordinator_failure(caplog)


@pytest.mark.needs("pickling", why="leases are pickled to reach the worker")
def test_a_meta_set_by_on_error_whose_pickling_raises_a_base_exception_fails_its_batch(
    tmp_path: Any, make_channel: Any, caplog: Any
) -> None:
    log = Log(tmp_path / "log")
    errors: list[BaseException] = []
    dropped: list[list[Any]] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        errors.append(e)
        b.meta = Unpicklable("exit")  # the retry's lease cannot be pickled
        return len(errors) == 1

    ch = make_channel(
        FailsFirst(log, "transient"),
        workers=1,
        batch_items_max=2,
        on_error=on_error,
        on_drop=lambda b, f: b is not None and dropped.append(list(b.data)),
    )
    ch.put_many(range(6))
    assert ch.close_and_drain(60)
    assert [type(e) for e in errors] == [pd.TransientError, SystemExit]
    assert dropped == [[0, 1]]
    _accounted(ch, [2, 3, 4, 5], [0, 1])
    _no_coordinator_failure(caplog)


@pytest.mark.needs("pickling", why="answers are pickled by the worker and unpickled here")
@pytest.mark.parametrize("how", ["exit", "interrupt", "value"])
@pytest.mark.parametrize("where", ["error", "meta", "data"])
def test_an_answer_whose_unpickling_raises_fails_its_batch_saying_why(
    tmp_path: Any, make_channel: Any, caplog: Any, where: str, how: str
) -> None:
    log = Log(tmp_path / "log")
    errors: list[tuple[BaseException, list[Any]]] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        errors.append((e, list(b.data)))
        return True

    ch = make_channel(
        AnswersBadly(log, where, how),
        workers=1,
        batch_items_max=2,
        retry=pd.retry.limited(1),
        on_error=on_error,
    )
    ch.put_many(range(6))
    assert ch.close_and_drain(60)
    ((exc, data),) = errors
    assert isinstance(exc, pd.RemoteError)
    raised = {"exit": "SystemExit", "interrupt": "KeyboardInterrupt", "value": "ValueError"}[how]
    part = "" if where == "error" else f"batch.{where}: "
    assert exc.reason == (
        "the worker's answer for batch 1 (attempt 1) could not be unpickled in the parent: "
        f"{part}{raised}: raised while unpickling ({how})"
    )
    assert f"({exc.reason}; worker traceback follows)" in str(exc)
    assert "pickled back from the worker" not in str(exc)
    if where == "error":
        assert (exc.type_name, exc.message) == (
            "edgefns.UnrebuildableError",
            f"the send failed ({how})",
        )
    else:
        assert f"its change to batch.{where} could not be unpickled" in exc.message
    assert data == [0, 1]  # the change was not applied: the batch as it was sent
    assert sorted(delivered_items(log)) == list(range(6))  # the retry delivered it
    _accounted(ch, list(range(6)), [])
    _no_coordinator_failure(caplog)


@pytest.mark.needs("pickling", why="answers are pickled by the worker and unpickled here")
def test_an_error_the_worker_cannot_pickle_says_so(tmp_path: Any, make_channel: Any) -> None:
    errors: list[BaseException] = []

    def send(b: pd.Batch[Any]) -> None:
        raise UnpicklableError("holds a lock")

    ch = make_channel(
        send, workers=1, retry=pd.retry.none(), on_error=lambda b, e: errors.append(e) or False
    )
    ch.put(0)
    assert ch.close_and_drain(60)
    ((exc,),) = [errors]
    assert isinstance(exc, pd.RemoteError)
    assert "could not be unpickled" not in str(exc)
    assert "pickled back from the worker" in exc.reason


@pytest.mark.needs("pickling", why="a worker's start-up error is pickled to reach the parent")
@pytest.mark.parametrize("how", ["exit", "interrupt"])
def test_a_start_up_error_whose_unpickling_raises_fails_the_start_saying_why(
    make_channel: Any, caplog: Any, how: str
) -> None:
    ch = make_channel(print, workers=1, worker_init=InitFailsBadly(how))

    def put_until_it_fails() -> None:
        for i in range(10_000):
            ch.put(i, timeout=30)

    with pytest.raises(pd.WorkerStartFailed) as info:
        put_until_it_fails()
    cause = info.value.__cause__
    assert isinstance(cause, pd.RemoteError)
    raised = {"exit": "SystemExit", "interrupt": "KeyboardInterrupt"}[how]
    assert cause.reason == (
        "the worker's start-up error could not be unpickled in the parent: "
        f"{raised}: raised while unpickling ({how})"
    )
    assert ch.wait_drained(60)
    _no_coordinator_failure(caplog)


@pytest.mark.needs("processes", why="the error's str() fails only outside the worker's process")
def test_a_start_up_error_whose_str_fails_in_the_parent_fails_the_start(
    make_channel: Any, caplog: Any
) -> None:
    ch = make_channel(print, workers=1, worker_init=InitFailsStrangely())

    def put_until_it_fails() -> None:
        for i in range(10_000):
            ch.put(i, timeout=30)

    with pytest.raises(pd.WorkerStartFailed) as info:
        put_until_it_fails()
    assert str(info.value).endswith("last: StrFailsElsewhere: <str() of the exception failed>")
    assert ch.wait_drained(60)
    _no_coordinator_failure(caplog)
