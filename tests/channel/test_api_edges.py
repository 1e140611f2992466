"""The public methods at their edges: odd timeouts, callbacks that call back into the channel,
a signal handler on top of a method of the same channel, iterables that raise."""

from __future__ import annotations

import asyncio
import math
import sys
import threading
from collections.abc import Callable
from fractions import Fraction
from types import FrameType
from typing import Any

import pytest
from workerfns import Gate, Log, Recorder, delivered_items, noop, wait_for

import procdispatch as pd
from procdispatch import _admission, _ending

# ---- timeouts ---------------------------------------------------------------------------------

#: One item fills it, and stays buffered (its batch is cut after a minute).
FULL_AFTER_ONE: dict[str, Any] = {
    "workers": 1,
    "batch_items_max": 1,
    "batch_age_max": 60,
    "full_behavior": pd.BlockNewItems(max_items=1),
}

BAD_TIMEOUTS: list[tuple[object, type[Exception], str]] = [
    (-1, ValueError, "'timeout' must be a non-negative number (got -1)"),
    (-0.5, ValueError, "'timeout' must be a non-negative number (got -0.5)"),
    (math.nan, ValueError, "'timeout' must be a non-negative number (got nan)"),
    (-math.inf, ValueError, "'timeout' must be a non-negative number (got -inf)"),
    ("1", TypeError, "'timeout' must be a number of seconds or None (got '1')"),
    (True, TypeError, "'timeout' must be a number of seconds or None (got True)"),
    (False, TypeError, "'timeout' must be a number of seconds or None (got False)"),
    ([1], TypeError, "'timeout' must be a number of seconds or None (got [1])"),
]

CALLS: dict[str, Callable[[pd.ProcessChannel[Any], object], object]] = {
    "put": lambda ch, t: ch.put(1, timeout=t),  # type: ignore[arg-type]
    "put_many": lambda ch, t: ch.put_many([1, 2], timeout=t),  # type: ignore[arg-type]
    "wait_drained": lambda ch, t: ch.wait_drained(t),  # type: ignore[arg-type]
    "close_and_drain": lambda ch, t: ch.close_and_drain(t),  # type: ignore[arg-type]
    "aput": lambda ch, t: asyncio.run(ch.aput(1, timeout=t)),  # type: ignore[arg-type]
    "aput_many": lambda ch, t: asyncio.run(ch.aput_many([1, 2], timeout=t)),  # type: ignore[arg-type]
    "await_drained": lambda ch, t: asyncio.run(ch.await_drained(t)),  # type: ignore[arg-type]
    "aclose_and_drain": lambda ch, t: asyncio.run(ch.aclose_and_drain(t)),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize(("timeout", "kind", "message"), BAD_TIMEOUTS)
def test_a_bad_timeout_is_refused_at_once_whatever_the_buffer_holds(
    make_channel: Any, method: str, timeout: object, kind: type[Exception], message: str
) -> None:
    # A full channel (put would wait) and an open one (a drain would wait): every bad value
    # is refused before anything waits or changes.
    ch = make_channel(noop, **FULL_AFTER_ONE)
    ch.put(0)
    with pytest.raises(kind) as info:
        CALLS[method](ch, timeout)
    assert str(info.value) == f"{method}(): {message}"
    assert not ch._adm.closed  # (a)close_and_drain refused before it closed
    assert ch.stats().items_put == 1


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("timeout", [-1, "1"])
def test_a_bad_timeout_is_refused_on_a_drained_channel_too(
    make_channel: Any, method: str, timeout: object
) -> None:
    ch = make_channel(noop, workers=1)
    assert ch.close_and_drain(30)
    with pytest.raises((ValueError, TypeError), match=rf"^{method}\(\): 'timeout' must be"):
        CALLS[method](ch, timeout)


def test_a_bad_timeout_is_refused_before_anything_is_taken_or_measured(
    make_channel: Any,
) -> None:
    measured: list[object] = []
    taken: list[int] = []

    def size(x: object) -> int:
        measured.append(x)
        return 1

    def items() -> Any:
        for i in range(3):
            taken.append(i)
            yield i

    ch = make_channel(noop, workers=1, item_size=size, batch_size_max=10)
    for call in (
        lambda: ch.put(1, timeout=-1),
        lambda: ch.put_many(items(), timeout=-1),
        lambda: asyncio.run(ch.aput(1, timeout=-1)),
        lambda: asyncio.run(ch.aput_many(items(), timeout=-1)),
    ):
        with pytest.raises(ValueError, match="'timeout' must be a non-negative number"):
            call()
    assert (measured, taken) == ([], [])  # item_size never ran, no item was taken
    assert ch.stats().items_put == 0
    assert ch.close_and_drain(30)


@pytest.mark.parametrize("timeout", [-1, math.nan, "30", True])
def test_drain_on_sigterm_refuses_a_bad_timeout_naming_itself_and_installs_nothing(
    timeout: object,
) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(
        pd.OptionsError, match=r"^drain_on_sigterm\(\): timeout must be a number of seconds"
    ):
        pd.drain_on_sigterm(timeout)  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGTERM) is before


class _Bar:
    """A progress bar look-alike: the total the channel gives it is what is checked."""

    def __init__(self) -> None:
        self.n = 0
        self.total: int | None = None

    def update(self, k: int) -> None:
        self.n += k

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass


def test_a_put_many_refused_for_its_timeout_adds_nothing_to_the_progress_total(
    make_channel: Any,
) -> None:
    bar = _Bar()
    ch = make_channel(noop, workers=1, progress=bar)
    with pytest.raises(ValueError, match=r"^put_many\(\): 'timeout'"):
        ch.put_many([1, 2, 3], timeout=-1)
    ch.put_many([7])
    assert ch.close_and_drain(30)
    assert (bar.n, bar.total) == (1, 1)


def test_a_bad_timeout_of_put_is_refused_with_item_sizes_too(make_channel: Any) -> None:
    ch = make_channel(noop, workers=1, item_size=lambda x: 1, batch_size_max=10)
    with pytest.raises(ValueError, match=r"^put\(\): 'timeout' must be a non-negative number"):
        ch.put(1, timeout=math.nan)
    assert ch.stats().items_put == 0


def test_inf_waits_for_ever_and_other_real_numbers_are_seconds(
    tmp_path: Any, make_channel: Any
) -> None:
    gate = Gate(tmp_path / "gate")
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log, gate=gate),
        workers=1,
        batch_items_max=1,
        batch_age_max=0.01,
        full_behavior=pd.BlockNewItems(max_items=1),
    )
    ch.put(0, timeout=math.inf)  # room: goes in at once
    log.wait_count(1, ev="start")  # the send holds the only place
    with pytest.raises(TimeoutError):
        ch.put(1, timeout=Fraction(1, 100))

    # A put with timeout=inf waits until the gate lets the send end and frees the place.
    done = threading.Event()

    def producer() -> None:
        ch.put(2, timeout=math.inf)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.2)  # it is waiting (a wait for an event, not a sleep)
    gate.open()
    t.join(30)
    assert done.is_set()
    assert ch.close_and_drain(math.inf)
    assert sorted(delivered_items(log)) == [0, 2]


def test_a_timeout_too_large_for_a_float_means_for_ever(tmp_path: Any, make_channel: Any) -> None:
    gate = Gate(tmp_path / "gate")
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log, gate=gate), cancel_grace=0.1, **FULL_AFTER_ONE)
    ch.put(0)
    log.wait_count(1, ev="start")  # held by the gate: the channel stays full
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            ch.put_many([1], timeout=10**400)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=producer)
    t.start()
    wait_for(lambda: ch._adm._waiters, what="the producer waiting for room")
    ch.cancel()  # releases the producer with ChannelClosed: it was waiting, not timed out
    t.join(30)
    gate.open()
    assert [type(e) for e in errors] == [pd.ChannelClosed]


# ---- callbacks that call back into the channel --------------------------------------------


def fail_on_x(batch: pd.Batch[Any]) -> None:
    if "x" in batch.data:
        raise RuntimeError("permanent")


class Reentry:
    """A callback that calls ``action(ch)`` once and records what it returned or raised."""

    def __init__(self, action: Callable[[pd.ProcessChannel[Any]], object]) -> None:
        self.action = action
        self.ch: pd.ProcessChannel[Any] | None = None
        self.outcome: list[object] = []

    def run(self) -> None:
        if self.outcome:
            return
        assert self.ch is not None
        try:
            self.outcome.append(("returned", self.action(self.ch)))
        except BaseException as exc:
            self.outcome.append(exc)


def _with_block(ch: pd.ProcessChannel[Any]) -> None:
    with ch:
        pass


def _async_with_block(ch: pd.ProcessChannel[Any]) -> None:
    async def block() -> None:
        async with ch:
            pass

    asyncio.run(block())


WAITS = {
    "close_and_drain()": lambda ch: ch.close_and_drain(),
    "close_and_drain(5)": lambda ch: ch.close_and_drain(5),
    "wait_drained()": lambda ch: ch.wait_drained(),
    "wait_drained(5)": lambda ch: ch.wait_drained(5),
    "with": _with_block,
    # asyncio.run on the coordinator thread: an await there would block the thread it awaits.
    "aclose_and_drain()": lambda ch: asyncio.run(ch.aclose_and_drain()),
    "aclose_and_drain(5)": lambda ch: asyncio.run(ch.aclose_and_drain(5)),
    "await_drained()": lambda ch: asyncio.run(ch.await_drained()),
    "await_drained(5)": lambda ch: asyncio.run(ch.await_drained(5)),
    "async with": _async_with_block,
}

#: Each callback run on the coordinator thread, and the name the error gives it.
CALLBACKS = {
    "on_error": "on_error",
    "on_drop": "on_drop",
    "on_drained": "on_drained",
    "on_delivered": "on_delivered",
    "retry factory": "the retry policy",
    "retry generator": "the retry policy",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("callback", sorted(CALLBACKS))
@pytest.mark.parametrize("wait", sorted(WAITS))
def test_a_wait_from_a_callback_raises_instead_of_waiting_for_itself(
    make_channel: Any, callback: str, wait: str
) -> None:
    r = Reentry(WAITS[wait])

    def on_error(b: Any, e: BaseException) -> bool:
        if callback == "on_error":
            r.run()
        return callback.startswith("retry") and b.attempt == 1  # one retry, to ask the policy

    def on_drop(b: Any, flush: bool) -> None:
        if callback == "on_drop" and b is not None:
            r.run()

    def on_drained() -> None:
        if callback == "on_drained":
            r.run()

    def on_delivered(b: Any) -> None:
        if callback == "on_delivered":
            r.run()

    def factory() -> Any:
        if callback == "retry factory":
            r.run()
        return iter([0.0])

    def generator() -> Any:  # the policy's own body runs at each next()
        if callback == "retry generator":
            r.run()
        yield 0.0

    ch = make_channel(
        fail_on_x,
        workers=1,
        batch_items_max=1,
        batch_age_max=0.01,
        on_error=on_error,
        on_drop=on_drop,
        on_drained=on_drained,
        on_delivered=on_delivered,
        retry=generator if callback == "retry generator" else factory,
    )
    r.ch = ch
    ch.put_many(["x", "ok"])
    ch.close()  # the callback's wait was refused without closing (except the with blocks')
    assert ch.wait_drained(30)  # the channel went on and drained: nothing hung
    [err] = r.outcome
    assert isinstance(err, pd.ProcDispatchError), err
    name = CALLBACKS[callback]
    method = wait.split("(", maxsplit=1)[0]
    if "with" in wait:
        assert str(err).startswith(f"leaving a{'n' if wait == 'async with' else ''} {wait} block")
    else:
        assert str(err).startswith(f"{method}() cannot be called from {name}: "), err
    assert f"from {name}: the coordinator thread runs {name}" in str(err)
    assert "would wait for itself" in str(err)
    s = ch.stats()
    assert s.items_put == s.items_delivered + s.items_dropped == 2
    if "with" in wait:
        assert ch._adm.closed  # leaving the block closed the channel, without waiting


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wait", sorted(WAITS))
def test_a_drain_wait_from_the_progress_callable_raises_instead_of_waiting_for_itself(
    tmp_path: Any, make_channel: Any, wait: str
) -> None:
    # The drain ends with the callable's last report, made on its thread: a wait for the
    # drain there would wait for itself (until the drain gave up waiting for the report).
    r = Reentry(WAITS[wait])

    def report(s: pd.Stats) -> None:
        if r.ch is not None:  # (the reports begin as the channel is made)
            r.run()

    gate = Gate(tmp_path / "gate")
    ch = make_channel(Recorder(Log(tmp_path / "log"), gate=gate), workers=1, progress=report)
    r.ch = ch
    ch.put(1)
    wait_for(lambda: r.outcome, what="the first report")
    gate.open()
    ch.close()
    assert ch.wait_drained(30)
    [err] = r.outcome
    assert isinstance(err, pd.ProcDispatchError), err
    assert f"from the progress callable ({report.__qualname__}): the drain ends" in str(err)
    assert "would wait for itself" in str(err)
    assert ch.stats().items_delivered == 1


def test_a_callable_object_or_partial_is_named_too(make_channel: Any) -> None:
    import functools

    class OnError:
        def __init__(self) -> None:
            self.r = Reentry(lambda ch: ch.wait_drained())

        def __call__(self, b: Any, e: BaseException, extra: int = 0) -> bool:
            self.r.run()
            return False

    obj = OnError()
    ch = make_channel(
        fail_on_x, workers=1, batch_items_max=1, on_error=functools.partial(obj, extra=1)
    )
    obj.r.ch = ch
    ch.put("x")
    assert ch.close_and_drain(30)
    [err] = obj.r.outcome
    assert "wait_drained() cannot be called from on_error" in str(err)


@pytest.mark.timeout(60)
def test_a_put_that_would_wait_for_room_from_a_callback_raises_buffer_full(
    make_channel: Any,
) -> None:
    # on_error requeues the failed item while BlockNewItems is full: only the coordinator,
    # which runs on_error, could make room. asyncio.run there would block it just the same.
    requeued: list[tuple[str, object]] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        item = ("again", b.data[0])
        for method, call in (
            ("put", lambda: ch.put(item)),
            ("put", lambda: ch.put(item, timeout=5)),
            ("put_many", lambda: ch.put_many([item])),
            ("put_many", lambda: ch.put_many([item], timeout=5)),
            ("aput", lambda: asyncio.run(ch.aput(item))),
            ("aput", lambda: asyncio.run(ch.aput(item, timeout=5))),
            ("aput_many", lambda: asyncio.run(ch.aput_many([item]))),
            ("aput_many", lambda: asyncio.run(ch.aput_many([item], timeout=5))),
        ):
            try:
                call()
                requeued.append((method, "put"))
            except BaseException as exc:
                requeued.append((method, exc))
        return False

    ch = make_channel(
        fail_on_x,
        workers=1,
        batch_items_max=1,
        batch_age_max=0.01,
        on_error=on_error,
        full_behavior=pd.BlockNewItems(max_items=2),
    )
    ch.put_many(["x", "ok"])  # one worker: "ok" waits while "x" fails, so the buffer is full
    wait_for(lambda: len(requeued) == 8, what="on_error")
    assert ch.close_and_drain(30)
    for method, exc in requeued:
        assert isinstance(exc, pd.BufferFull), requeued
        assert f"{method}() cannot wait for room from on_error" in str(exc)
        assert exc.added == 0  # type: ignore[attr-defined]
    assert ch.stats().items_put == 2


def test_a_put_with_a_timeout_already_over_times_out_in_a_callback_too(
    make_channel: Any,
) -> None:
    # timeout=0 never waits: as anywhere else, a full buffer makes it a TimeoutError.
    outcomes: list[object] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        for call in (
            lambda: ch.put("again", timeout=0),
            lambda: asyncio.run(ch.aput("again", timeout=0)),
            lambda: asyncio.run(ch.aput_many(["again"], timeout=0)),
        ):
            try:
                call()
                outcomes.append("put")
            except BaseException as exc:
                outcomes.append(exc)
        return False

    ch = make_channel(
        fail_on_x,
        workers=1,
        batch_items_max=1,
        batch_age_max=0.01,
        on_error=on_error,
        full_behavior=pd.BlockNewItems(max_items=2),
    )
    ch.put_many(["x", "ok"])
    wait_for(lambda: len(outcomes) == 3, what="on_error")
    assert ch.close_and_drain(30)
    assert [type(x) for x in outcomes] == [TimeoutError] * 3, outcomes


def test_calls_that_do_not_wait_are_fine_from_a_callback(tmp_path: Any, make_channel: Any) -> None:
    log = Log(tmp_path / "log")
    seen: list[object] = []

    def send(b: pd.Batch[Any]) -> None:
        fail_on_x(b)
        Recorder(log)(b)

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        ch.put("requeued")  # room: goes in
        ch.put_nowait("nowait")
        seen.append(ch.stats().items_put)
        seen.append(ch.wait_drained(0))  # a poll does not wait
        seen.append(repr(ch).startswith("<ProcessChannel open"))
        ch.close()
        seen.append(ch.drained)
        return False

    def on_drained() -> None:
        ch.cancel()  # harmless at the end
        seen.append("drained")

    ch = make_channel(
        send,
        workers=1,
        batch_items_max=1,
        batch_age_max=0.01,
        on_error=on_error,
        on_drained=on_drained,
    )
    ch.put("x")
    assert ch.wait_drained(30)
    assert seen == [3, False, True, False, "drained"]
    assert sorted(delivered_items(log)) == ["nowait", "requeued"]


# ---- put_many with an iterable that raises ----------------------------------------------------


def test_put_many_puts_what_a_raising_iterable_gave_and_says_how_many(
    tmp_path: Any, make_channel: Any
) -> None:
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=1, batch_items_max=2)

    def gen() -> Any:
        yield from range(3)
        raise KeyError("broken source")

    with pytest.raises(KeyError) as info:
        ch.put_many(gen())
    assert info.value.added == 3  # type: ignore[attr-defined]
    with pytest.raises(KeyError) as info:
        ch.put_many(gen(), timeout=5)
    assert info.value.added == 3  # type: ignore[attr-defined]
    assert ch.close_and_drain(30)
    assert sorted(delivered_items(log)) == [0, 0, 1, 1, 2, 2]


def test_put_many_with_item_sizes_and_a_raising_iterable(make_channel: Any) -> None:
    ch = make_channel(noop, workers=1, item_size=len, batch_size_max=100)

    def gen() -> Any:
        yield "ab"
        yield "c"
        raise ValueError("broken source")

    with pytest.raises(ValueError, match="broken source") as info:
        ch.put_many(gen())
    assert info.value.added == 2  # type: ignore[attr-defined]
    assert ch.close_and_drain(30)
    assert ch.stats().items_delivered == 2


# ---- __exit__ ---------------------------------------------------------------------------------


def test_a_generator_closed_inside_the_with_block_drains_it(
    tmp_path: Any, make_channel: Any
) -> None:
    # Breaking out of a loop over a generator closes it (GeneratorExit): normal control
    # flow, so the block drains, as for a normal exit, instead of cancelling.
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log, sleep=0.05), workers=1, batch_items_max=1)

    def produce() -> Any:
        with ch:
            for i in range(100):
                ch.put(i)
                yield i

    for i in produce():
        if i == 4:
            break
    assert ch.drained
    assert sorted(delivered_items(log)) == [0, 1, 2, 3, 4]
    assert ch.stats().items_dropped == 0


# ---- a signal handler on top of a method of the same channel -------------------------------


def _run_at_every_line(
    codes: set[Any], handler: Callable[[], None], body: Callable[[], None]
) -> int:
    """Run ``body`` with ``handler`` called at each line of the functions in ``codes``, as a
    signal handler may be; return how many times it ran."""
    calls = 0

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal calls
        if event == "line":
            calls += 1
            sys.settrace(None)  # what the handler calls is not traced
            try:
                handler()
            finally:
                sys.settrace(tracer)
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code in codes else None

    sys.settrace(tracer)
    try:
        body()
    finally:
        sys.settrace(None)
    return calls


def _producer_codes() -> set[Any]:
    """The code of every function a put runs in this package."""
    fns = [_admission.Admission.put_one, _admission.Admission.admit]
    fns += [v for k, v in vars(pd.ProcessChannel).items() if k.startswith(("put", "_put"))]
    return {f.__code__ for f in fns}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sized", [False, True])
def test_stats_from_a_handler_at_any_line_of_put(make_channel: Any, sized: bool) -> None:
    kw: dict[str, Any] = {"item_size": len, "batch_size_max": 10**6} if sized else {}
    ch = make_channel(noop, workers=1, batch_items_max=5, batch_age_max=0.01, **kw)
    snapshots: list[pd.Stats] = []

    def handler() -> None:
        s = ch.stats()
        assert s.items_put == (
            s.items_delivered + s.items_dropped + s.items_buffered + s.items_in_flight
        )
        snapshots.append(s)
        repr(ch)
        assert not ch.drained

    def body() -> None:
        for i in range(50):
            ch.put(str(i))
        ch.put_many([str(i) for i in range(50)])

    ran = _run_at_every_line(_producer_codes(), handler, body)
    assert ran == len(snapshots) > 100
    assert ch.close_and_drain(30)
    assert ch.stats().items_delivered == 100


@pytest.mark.timeout(120)
def test_a_drain_waited_for_from_a_handler_on_top_of_put(
    make_channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the interrupted put holds the channel's lock the drain cannot end: the wait raises
    # (after a short probe, shortened here); elsewhere it waits as usual.
    monkeypatch.setattr(_ending, "_LOCK_PROBE", 0.05)
    ch = make_channel(noop, workers=1, batch_items_max=5, batch_age_max=0.01)
    outcomes: list[object] = []

    def handler() -> None:
        try:
            outcomes.append(ch.wait_drained(0.001))
        except pd.ProcDispatchError as exc:
            outcomes.append(exc)

    ran = _run_at_every_line(
        {_admission.Admission.put_one.__code__}, handler, lambda: [ch.put(i) for i in range(20)]
    )
    assert ran == len(outcomes)
    refused = [x for x in outcomes if isinstance(x, pd.ProcDispatchError)]
    assert refused, outcomes  # some lines hold the lock
    assert False in outcomes  # and others do not: the wait ran (and timed out)
    assert all("interrupted put() or put_many() of the same channel" in str(x) for x in refused)
    assert ch.close_and_drain(30)
    assert ch.stats().items_delivered == 20
