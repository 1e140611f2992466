"""User callables are untrusted input: whatever a retry policy, on_error, on_drop, item_size or
send_fn does, no item is lost, only the batch concerned is affected, and the channel goes on.

Items 0..5 go out in batches of two; the misbehaviour hits the batch holding item 0 ([0, 1]).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import pytest
from faultfns import FailsFirst
from workerfns import Gate, Log, Recorder, delivered_items

import procdispatch as pd
from procdispatch import _outcomes


def _run(make_channel: Any, send_fn: Any, items: list[Any], **kw: Any) -> dict[str, Any]:
    errors: list[tuple[BaseException, list[Any], int, int]] = []
    drops: list[tuple[list[Any], int, int]] = []

    use_default = kw.pop("_default", True)

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        errors.append((e, list(b.data), b.id, b.attempt))
        return pd.default_on_error(b, e) if use_default else True

    kw.setdefault("on_error", on_error)
    ch = make_channel(
        send_fn,
        workers=1,
        batch_items_max=2,
        on_drop=lambda b, f: b is not None and drops.append((list(b.data), b.id, b.attempt)),
        **kw,
    )
    ch.put_many(items)
    assert ch.close_and_drain(60)
    return {"errors": errors, "drops": drops, "stats": ch.stats()}


def _accounted(out: dict[str, Any], log: Log, n: int) -> None:
    s = out["stats"]
    dropped = sorted(x for d in out["drops"] for x in d[0])
    assert s.items_put == n
    assert s.items_put == s.items_delivered + s.items_dropped
    assert s.items_dropped == len(dropped)
    assert sorted(delivered_items(log) + dropped) == list(range(n))


# ---- retry policies ---------------------------------------------------------------------------


def _yields(*delays: Any) -> Any:
    return lambda: iter(delays)


def _raises_on_call() -> Any:
    raise RuntimeError("the retry factory broke")


def _raising_iterator() -> Any:
    yield from ()
    raise RuntimeError("the retry iterator broke")


BAD_POLICIES = {
    "non_iterator": (lambda: 5, "retry must return an iterator of delays"),
    "factory_raises": (_raises_on_call, "the retry factory broke"),
    "iterator_raises": (_raising_iterator, "the retry iterator broke"),
    "nan": (_yields(math.nan), "retry delays must be finite numbers of seconds >= 0 (got nan"),
    "inf": (_yields(math.inf), "(got inf"),
    "negative": (_yields(-1.0), "(got -1.0"),
    "not_a_number": (_yields("soon"), "(got 'soon'"),
}


@pytest.mark.parametrize("name", sorted(BAD_POLICIES))
def test_a_misbehaving_retry_policy_drops_only_its_batch(
    tmp_path: Any, make_channel: Any, caplog: Any, name: str, backend: str
) -> None:
    policy, message = BAD_POLICIES[name]
    log = Log(tmp_path / "log")
    with caplog.at_level(logging.ERROR, logger="procdispatch"):
        out = _run(
            make_channel,
            FailsFirst(log, "transient"),
            list(range(6)),
            retry=policy,
            backend=backend,
        )
    assert [d[0] for d in out["drops"]] == [[0, 1]]
    assert sorted(delivered_items(log)) == [2, 3, 4, 5]
    _accounted(out, log, 6)
    failed = [r for r in caplog.records if "the retry policy failed for batch" in r.message]
    assert len(failed) == 1
    assert message in failed[0].message


def test_a_nan_delay_does_not_spin(tmp_path: Any, make_channel: Any) -> None:
    # Before, the batch was queued at NaN: never leasable, and the loop woke without end.
    log = Log(tmp_path / "log")
    out = _run(make_channel, FailsFirst(log, "transient"), [0, 1], retry=_yields(math.nan))
    assert out["drops"] == [([0, 1], 1, 1)]


def test_retry_must_be_callable_at_construction() -> None:
    with pytest.raises(pd.OptionsError, match="retry must be a callable returning an iterator"):
        pd.ProcessChannel(print, retry=5)  # type: ignore[arg-type]


# ---- callbacks that raise ---------------------------------------------------------------------


def test_on_error_that_raises_drops_the_batch_and_the_channel_goes_on(
    tmp_path: Any, make_channel: Any, caplog: Any
) -> None:
    log = Log(tmp_path / "log")

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        raise KeyError("on_error broke")

    with caplog.at_level(logging.ERROR, logger="procdispatch"):
        out = _run(make_channel, FailsFirst(log, "transient"), list(range(6)), on_error=on_error)
    assert [d[0] for d in out["drops"]] == [[0, 1]]
    _accounted(out, log, 6)
    assert any("on_error raised for batch 1" in r.message for r in caplog.records)


def test_on_drop_that_raises_still_counts_the_drop(tmp_path: Any, make_channel: Any) -> None:
    log = Log(tmp_path / "log")
    seen: list[list[Any]] = []

    def on_drop(b: pd.Batch[Any] | None, flush: bool) -> None:
        if b is not None:
            seen.append(list(b.data))
            raise KeyError("on_drop broke")

    ch = make_channel(FailsFirst(log, "runtime"), workers=1, batch_items_max=2, on_drop=on_drop)
    ch.put_many(range(6))
    assert ch.close_and_drain(60)
    s = ch.stats()
    assert seen == [[0, 1]]
    assert (s.items_put, s.items_delivered, s.items_dropped) == (6, 4, 2)


def test_a_slow_callback_is_reported_with_its_name(
    tmp_path: Any, make_channel: Any, caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_outcomes, "SLOW_CALLBACK", 0.05)
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")

    def patient_on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        gate.wait()  # the test opens it once the call has lasted long enough
        return False

    import threading

    threading.Timer(0.2, gate.open).start()
    with caplog.at_level(logging.WARNING, logger="procdispatch"):
        _run(make_channel, FailsFirst(log, "runtime"), [0, 1], on_error=patient_on_error)
    slow = [r.message for r in caplog.records if "on the coordinator thread" in r.message]
    assert len(slow) == 1
    assert "on_error" in slow[0]
    assert "patient_on_error" in slow[0]


# ---- callables that raise what is not an Exception ------------------------------------------

#: Each user callable the coordinator runs, and what its raising must lead to: the batch
#: holding item 0 ([0, 1], which fails its first send) dropped or not, and the ERROR that
#: names the callable.
COORDINATOR_CALLABLES = {
    "on_error": (True, "on_error raised for batch 1 (attempt 1): {kind}"),
    "on_drop": (True, "on_drop raised for batch 1: {kind}"),
    "on_delivered": (False, "on_delivered raised for batch 1: {kind}"),
    "on_drained": (False, "on_drained raised: {kind}"),
    "retry factory": (True, "the retry policy failed for batch 1 (attempt 1): {kind}"),
    "retry iterator": (True, "the retry policy failed for batch 1 (attempt 1): {kind}"),
}


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt, GeneratorExit])
@pytest.mark.parametrize("where", sorted(COORDINATOR_CALLABLES))
def test_a_callable_raising_a_base_exception_is_only_its_own_failure(
    tmp_path: Any, make_channel: Any, caplog: Any, where: str, kind: type[BaseException]
) -> None:
    # SystemExit, KeyboardInterrupt and GeneratorExit out of a callback on the coordinator
    # thread are that callback's failure, as any Exception is: never the channel's.
    log = Log(tmp_path / "log")
    reported: list[list[Any]] = []

    def boom() -> None:
        raise kind(f"raised by {where}")

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        if where == "on_error":
            boom()
        return where != "on_drop"  # retry, except where a drop is what is tested

    def on_drop(b: pd.Batch[Any] | None, flush: bool) -> None:
        if where == "on_drop" and b is not None:
            boom()

    def on_delivered(b: pd.Batch[Any]) -> None:
        reported.append(list(b.data))
        if where == "on_delivered":
            boom()

    def on_drained() -> None:
        if where == "on_drained":
            boom()

    def factory() -> Any:
        if where == "retry factory":
            boom()
        return iterator()

    def iterator() -> Any:
        if where == "retry iterator":
            boom()
        yield 0.0

    ch = make_channel(
        FailsFirst(log, "transient"),
        workers=1,
        batch_items_max=2,
        on_error=on_error,
        on_drop=on_drop,
        on_delivered=on_delivered,
        on_drained=on_drained,
        retry=factory,
    )
    ch.put_many(range(6))
    with caplog.at_level(logging.ERROR, logger="procdispatch"):
        assert ch.close_and_drain(60)  # no InternalError: the channel lived on
    dropped, message = COORDINATOR_CALLABLES[where]
    s = ch.stats()
    lost = [0, 1] if dropped else []
    assert sorted(delivered_items(log)) == [x for x in range(6) if x not in lost]
    assert (s.items_put, s.items_delivered, s.items_dropped) == (6, 6 - len(lost), len(lost))
    assert sorted(x for r in reported for x in r) == sorted(delivered_items(log))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    expected = message.format(kind=f"{kind.__name__}: raised by {where}")
    assert [m for m in errors if expected in m], errors
    assert not [m for m in errors if "coordinator failed" in m], errors


# ---- item_size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizer", "error"),
    [
        (lambda x: 1 // 0 if x == 3 else 1, ZeroDivisionError),
        (lambda x: "big" if x == 3 else 1, TypeError),
        (lambda x: 2.5 if x == 3 else 1, TypeError),
    ],
)
def test_item_size_that_fails_fails_the_put_and_the_item_never_counts(
    tmp_path: Any, make_channel: Any, sizer: Any, error: type[BaseException]
) -> None:
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=1, batch_items_max=2, item_size=sizer)
    ch.put(0)
    with pytest.raises(error):
        ch.put(3)
    with pytest.raises(error) as info:
        ch.put_many([1, 2, 3, 4])
    assert info.value.added == 2  # type: ignore[attr-defined]
    assert ch.close_and_drain(60)
    s = ch.stats()
    assert (s.items_put, s.items_delivered, s.items_dropped) == (3, 3, 0)
    assert sorted(delivered_items(log)) == [0, 1, 2]


# ---- callables whose body a call does not run ------------------------------------------------


def _gen(*args: Any) -> Any:
    yield args


async def _agen(*args: Any) -> Any:
    yield args


async def _coro(*args: Any) -> None:
    pass


class _GenCall:
    def __call__(self, *args: Any) -> Any:
        yield args


LAZY = {
    "generator": (_gen, "a generator function", "a generator"),
    "async generator": (_agen, "an async generator function", "an async generator"),
    "partial of a generator": (
        functools.partial(_gen, 1),
        "a generator function",
        "a generator",
    ),
    "object whose __call__ yields": (_GenCall(), "a generator function", "a generator"),
    "coroutine": (_coro, "a coroutine function", "a coroutine"),
}


@pytest.mark.parametrize("option", ["send_fn", "worker_init"])
@pytest.mark.parametrize("name", sorted(LAZY))
def test_a_worker_callable_whose_body_would_not_run_is_refused(option: str, name: str) -> None:
    fn, kind, made = LAZY[name]
    send_fn = fn if option == "send_fn" else _coro
    kw: dict[str, Any] = {"worker_init": fn} if option == "worker_init" else {}
    if kind == "a coroutine function":
        # A worker awaits a coroutine (each runs an event loop): supported.
        ch = pd.ProcessChannel(send_fn, backend="thread", **kw)
        ch.put(1)
        assert ch.close_and_drain(60)
        assert ch.stats().items_delivered == 1
        return
    with pytest.raises(pd.OptionsError) as info:
        pd.ProcessChannel(send_fn, backend="thread", **kw)
    text = str(info.value)
    assert text.startswith(
        f"{option} must not be {kind} (got {fn!r}): calling it only makes "
        f"{made}, which a worker does not iterate, so its body would never run"
    )
    assert "an async def (a worker awaits its coroutine)" in text


@pytest.mark.parametrize(
    "option", ["on_error", "on_drop", "on_delivered", "on_drained", "item_size", "progress"]
)
@pytest.mark.parametrize("name", sorted(LAZY))
def test_a_parent_callback_whose_body_would_not_run_is_refused(option: str, name: str) -> None:
    # The parent calls its callbacks as plain functions: a coroutine's body would not run
    # either (on_error's coroutine would even count as "retry", for ever).
    fn, kind, made = LAZY[name]
    kw: dict[str, Any] = {option: fn}
    if option == "item_size":
        kw["batch_size_max"] = 10
    with pytest.raises(pd.OptionsError) as info:
        pd.ProcessChannel(print, backend="thread", **kw)
    assert str(info.value).startswith(
        f"{option} must not be {kind} (got {fn!r}): calling it only makes {made}, and the "
        f"parent calls {option} as a plain function"
    )


# ---- what send_fn leaves behind ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["data_none", "data_tuple"])
def test_a_send_fn_that_breaks_batch_data_fails_only_its_batch_with_a_type_error(
    tmp_path: Any, make_channel: Any, backend: str, how: str
) -> None:
    log = Log(tmp_path / "log")
    out = _run(
        make_channel,
        FailsFirst(log, how),
        list(range(6)),
        retry=pd.retry.limited(1),
        backend=backend,
        _default=False,
    )
    ((exc, data, bid, attempt),) = out["errors"]
    assert type(exc) is TypeError
    assert "batch.data must stay a list" in str(exc)
    assert "after setting data to" in str(exc)
    assert (data, bid, attempt) == ([0, 1], 1, 1)  # the batch as it was sent
    assert sorted(delivered_items(log)) == list(range(6))  # the retry delivered it
    assert out["stats"].worker_restarts == 0


@pytest.mark.needs("pickling", why="answers are pickled by the worker and unpickled here")
@pytest.mark.parametrize("what", ["meta", "data"])
def test_an_answer_the_parent_cannot_unpickle_fails_only_its_batch(
    tmp_path: Any, make_channel: Any, what: str
) -> None:
    log = Log(tmp_path / "log")
    out = _run(
        make_channel,
        FailsFirst(log, f"{what}_undecodable"),
        list(range(6)),
        retry=pd.retry.limited(1),
        _default=False,
    )
    ((exc, data, _, _),) = out["errors"]
    assert isinstance(exc, pd.RemoteError)
    assert f"change to batch.{what}" in str(exc)
    assert "could not be unpickled in the parent" in str(exc)
    assert "failed with" in str(exc)  # the send's own error is named too
    assert data == [0, 1]
    assert sorted(delivered_items(log)) == list(range(6))
    assert out["stats"].items_dropped == 0


# ---- batches the callbacks see -----------------------------------------------------------------


@pytest.mark.needs("pickling", why="leases are pickled to reach the worker")
def test_an_unpicklable_item_is_reported_alone_with_its_position(
    tmp_path: Any, make_channel: Any
) -> None:
    import threading

    log = Log(tmp_path / "log")
    lock = threading.Lock()
    out = _run(make_channel, Recorder(log), [0, 1, 2, lock, 4, 5], _default=False)
    ((exc, data, bid, attempt),) = out["errors"]
    assert data == [lock]
    assert bid >= 1
    assert attempt == 1
    assert "item 1 of batch 2 (attempt 1) cannot be pickled" in str(exc)
    assert "lock" in str(exc.__cause__)
    assert out["drops"] == [([lock], bid, 1)]
    assert bid not in {1, 2, 3}  # an id of its own
    assert sorted(delivered_items(log)) == [0, 1, 2, 4, 5]


def test_items_dropped_by_cancel_come_in_real_batches(make_channel: Any, tmp_path: Any) -> None:
    drops: list[tuple[int, int, int]] = []
    ch = make_channel(
        Recorder(Log(tmp_path / "log"), gate=Gate(tmp_path / "never")),
        workers=1,
        batch_items_max=3,
        full_behavior=pd.InfiniteGrowth(),
        on_drop=lambda b, f: b is not None and drops.append((b.id, b.attempt, len(b.data))),
    )
    ch.put_many(range(2000))
    ch.cancel()  # most of them are still on their way to the buffer
    assert ch.wait_drained(60)
    assert sum(n for _, _, n in drops) == 2000
    assert all(bid >= 1 for bid, _, _ in drops), drops[:5]
    assert all(attempt >= 1 for _, attempt, _ in drops), drops[:5]
    assert all(1 <= n <= 3 for _, _, n in drops), drops[:5]
    assert len({bid for bid, _, _ in drops}) == len(drops)


# ---- the pure buffer ---------------------------------------------------------------------------


def test_buffer_ack_and_nack_of_none_raise_the_documented_error() -> None:
    from procdispatch.buffer import Buffer

    buf: Buffer[Any] = Buffer()
    with pytest.raises(pd.ProcDispatchError, match="needs a leased Batch"):
        buf.ack(None)  # type: ignore[arg-type]
    with pytest.raises(pd.ProcDispatchError, match="needs a leased Batch"):
        buf.nack(0.0, None, RuntimeError("x"))  # type: ignore[arg-type]
