"""Defaults that must not fail silently: retry classification, repeated-retry warnings,
delivery_timeout, raise_on_drop, and the derived full-behaviour limits."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import pytest
from faultfns import FailsFirst, LibraryError
from workerfns import Gate, Log, Recorder, delivered_items

import procdispatch as pd
from procdispatch import _transient
from procdispatch.buffer import Buffer, BufferOptions


def _errors_and_drops(
    make_channel: Any, send_fn: Any, items: list[Any], **kw: Any
) -> tuple[pd.ProcessChannel[Any], list[Any], list[Any]]:
    errors: list[Any] = []
    drops: list[Any] = []
    on_error = kw.pop("on_error", pd.default_on_error)

    def record_error(b: pd.Batch[Any], e: BaseException) -> bool:
        errors.append((type(e), b.attempt))
        return bool(on_error(b, e))

    ch = make_channel(
        send_fn,
        workers=1,
        batch_items_max=2,
        on_error=record_error,
        on_drop=lambda b, f: b is not None and drops.append((list(b.data), b.attempt)),
        **kw,
    )
    ch.put_many(items)
    return ch, errors, drops


# ---- which errors are transient ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "retried"),
    [
        ("url_refused", True),  # URLError(ConnectionRefusedError): the reason is transient
        ("runtime_from_connection", True),  # raise RuntimeError(...) from ConnectionError
        ("runtime_in_handler", True),  # raised while handling a TimeoutError
        ("runtime_while_timeout", False),  # ... but `from None` hides it on purpose
        ("runtime", False),  # a plain RuntimeError stays permanent
        ("transient", True),
    ],
)
def test_default_on_error_reads_the_cause_chain_in_the_worker(
    tmp_path: Any, make_channel: Any, backend: str, how: str, retried: bool
) -> None:
    log = Log(tmp_path / "log")
    ch, errors, drops = _errors_and_drops(
        make_channel,
        FailsFirst(log, how),
        [0, 1, 2, 3],
        retry=pd.retry.limited(1),
        backend=backend,
    )
    assert ch.close_and_drain(60)
    assert len(errors) == 1
    if retried:
        assert drops == []
        assert sorted(delivered_items(log)) == [0, 1, 2, 3]
    else:
        assert drops == [([0, 1], 1)]
        assert sorted(delivered_items(log)) == [2, 3]


def test_retry_on_retries_a_library_s_own_types(
    tmp_path: Any, make_channel: Any, backend: str
) -> None:
    log = Log(tmp_path / "log")
    ch, _, drops = _errors_and_drops(
        make_channel,
        FailsFirst(log, "library"),
        [0, 1],
        retry=pd.retry.limited(1),
        on_error=pd.retry_on(LibraryError),
        backend=backend,
    )
    assert ch.close_and_drain(60)
    assert drops == []
    assert sorted(delivered_items(log)) == [0, 1]
    # and without it, the same error is permanent
    log2 = Log(tmp_path / "log2")
    ch2, _, drops2 = _errors_and_drops(
        make_channel, FailsFirst(log2, "library"), [0, 1], retry=pd.retry.limited(1)
    )
    assert ch2.close_and_drain(60)
    assert drops2 == [([0, 1], 1)]


def test_retry_on_still_applies_the_default_rules() -> None:
    on_error = pd.retry_on(LibraryError)
    b: pd.Batch[int] = pd.Batch([1], id=1, attempt=1)
    assert on_error(b, ConnectionResetError("x"))
    assert not on_error(b, ValueError("x"))
    assert on_error.__name__ == "retry_on(LibraryError)"
    with pytest.raises(pd.OptionsError, match="retry_on takes exception classes"):
        pd.retry_on("requests.ConnectionError")  # type: ignore[arg-type]


def test_chain_names_follow_cause_context_and_reason_without_looping() -> None:
    import urllib.error

    a = RuntimeError("a")
    b = ValueError("b")
    a.__context__ = b
    b.__context__ = a  # a cycle
    names = _transient.chain_names(a)
    assert [n[0] for n in names] == ["builtins.RuntimeError", "builtins.ValueError"]
    url = urllib.error.URLError(ConnectionRefusedError(111, "refused"))
    assert _transient.matches(url, _transient.TRANSIENT_NAMES)
    assert not _transient.matches(urllib.error.URLError("no host"), _transient.TRANSIENT_NAMES)


# ---- retries made visible and bounded ---------------------------------------------------------


def test_a_batch_retried_many_times_warns_at_its_5th_attempt_and_each_doubling(
    tmp_path: Any, make_channel: Any, caplog: Any
) -> None:
    log = Log(tmp_path / "log")
    with caplog.at_level(logging.WARNING, logger="procdispatch"):
        ch, _, drops = _errors_and_drops(
            make_channel,
            FailsFirst(log, "transient", attempts=11),
            [0, 1],
            retry=pd.retry.limited(11),
        )
        assert ch.close_and_drain(60)
    assert drops == []
    warned = [r.message for r in caplog.records if "will be sent again" in r.message]
    assert [re.search(r"\(attempt (\d+)\)", m).group(1) for m in warned] == ["5", "10"]  # type: ignore[union-attr]
    assert "batch 1 has failed 4 times in" in warned[0]
    assert "TransientError: try again" in warned[0]
    assert "delivery_timeout" in warned[0]


def test_delivery_timeout_drops_a_batch_waiting_for_its_retry(
    tmp_path: Any, make_channel: Any, caplog: Any
) -> None:
    log = Log(tmp_path / "log")
    with caplog.at_level(logging.WARNING, logger="procdispatch"):
        ch, _, drops = _errors_and_drops(
            make_channel,
            FailsFirst(log, "transient", attempts=1000),
            [0, 1, 2, 3],
            retry=pd.retry.limited(5, delay=3600.0),  # without the timeout: an hour's wait
            delivery_timeout=0.3,
            raise_on_drop=True,
        )
        with pytest.raises(pd.ItemsDropped) as info:
            ch.close_and_drain(60)
    assert drops == [([0, 1], 1)]
    assert sorted(delivered_items(log)) == [2, 3]
    assert info.value.count == 2
    err = info.value.first_error
    assert isinstance(err, pd.DeliveryTimeout)
    assert isinstance(err.last_error, pd.TransientError)
    assert "batch 1 was not delivered within delivery_timeout=0.3s" in str(err)
    assert any("delivery_timeout=0.3s" in r.message for r in caplog.records)


@pytest.mark.parametrize(("how", "delivered"), [("slow_then_ok", True), ("slow_then_fail", False)])
def test_delivery_timeout_lets_a_send_in_flight_decide(
    tmp_path: Any, make_channel: Any, how: str, delivered: bool
) -> None:
    log = Log(tmp_path / "log")
    ch, _, drops = _errors_and_drops(
        make_channel, FailsFirst(log, how), [0, 1], delivery_timeout=0.1
    )
    assert ch.close_and_drain(60)
    if delivered:
        assert drops == []
        assert sorted(delivered_items(log)) == [0, 1]
    else:
        assert drops == [([0, 1], 1)]
        assert ch.stats().worker_restarts == 0  # the send was not killed


# ---- raise_on_drop ----------------------------------------------------------------------------


def test_raise_on_drop_fails_a_script_that_dropped_items(tmp_path: Any, make_channel: Any) -> None:
    log = Log(tmp_path / "log")
    ch, _, drops = _errors_and_drops(
        make_channel, FailsFirst(log, "runtime"), list(range(6)), raise_on_drop=True
    )
    with pytest.raises(pd.ItemsDropped) as info:
        ch.close_and_drain(60)
    assert info.value.count == 2
    assert isinstance(info.value.first_error, RuntimeError)
    assert "2 item(s) were dropped; the first drop was for RuntimeError: permanent" in str(
        info.value
    )
    assert drops == [([0, 1], 1)]  # on_drop still saw it


def test_raise_on_drop_in_a_with_block(tmp_path: Any) -> None:
    log = Log(tmp_path / "log")
    drops: list[Any] = []

    def run(fail: bool) -> None:
        with pd.ProcessChannel(
            FailsFirst(log, "runtime"),
            workers=1,
            batch_items_max=2,
            raise_on_drop=True,
            on_drop=lambda b, f: b is not None and drops.append(b.data),
        ) as ch:
            ch.put_many(range(4))
            if fail:
                raise KeyError("mine")

    with pytest.raises(pd.ItemsDropped):
        run(fail=False)
    assert drops == [[0, 1]]
    # an exception already in flight is never replaced by ItemsDropped
    with pytest.raises(KeyError):
        run(fail=True)
    assert drops == [[0, 1], [0, 1]]


def test_raise_on_drop_names_no_error_for_an_eviction(tmp_path: Any, make_channel: Any) -> None:
    gate = Gate(tmp_path / "gate")
    ch = make_channel(
        Recorder(Log(tmp_path / "log"), gate=gate),
        workers=1,
        batch_items_max=1,
        full_behavior=pd.DropOldestBatch(max_live_items=2),
        raise_on_drop=True,
    )
    ch.put_many(range(10))
    gate.open()
    with pytest.raises(pd.ItemsDropped) as info:
        ch.close_and_drain(60)
    assert info.value.first_error is None
    assert info.value.count == ch.stats().items_dropped > 0


def test_without_raise_on_drop_nothing_is_raised(tmp_path: Any, make_channel: Any) -> None:
    ch, _, drops = _errors_and_drops(
        make_channel, FailsFirst(Log(tmp_path / "log"), "runtime"), [0, 1]
    )
    assert ch.close_and_drain(60)
    assert drops == [([0, 1], 1)]


# ---- derived limits ---------------------------------------------------------------------------


@pytest.mark.needs("pipelining", why="max_leases above workers: leases wait behind the running one")
def test_the_channel_item_limit_leaves_room_for_every_lease(
    tmp_path: Any, make_channel: Any
) -> None:
    # workers=8, batch_items_max=500 used to keep six workers idle behind a 1,000-item cap.
    ch = make_channel(
        Recorder(Log(tmp_path / "log"), gate=Gate(tmp_path / "never")),
        workers=1,
        max_leases=8,
        batch_items_max=500,
    )
    for i in range(8000):  # max(1000, 2 * max_leases * batch_items_max)
        ch.put_nowait(i)
    with pytest.raises(pd.BufferFull):
        ch.put_nowait(8000)


def test_the_default_item_limit_grows_with_workers_not_with_the_default_max_leases(
    tmp_path: Any, make_channel: Any, backend: str
) -> None:
    # max_leases left out is 8 * workers on a backend that queues leases: the buffer is still
    # one batch running and one queued per worker, 2 * 2 * 500, not 2 * 16 * 500. A Dask lane
    # hears of its whole task's batches at once, so no refill a batch deep keeps it fed: there
    # the default max_leases (32 * workers) counts (Backend.answers_together), 2 * 64 * 500.
    limit = 2 * (64 if backend == "dask" else 2) * 500
    ch = make_channel(
        Recorder(Log(tmp_path / "log"), gate=Gate(tmp_path / "never")),
        workers=2,
        batch_items_max=500,
    )
    for i in range(limit):
        ch.put_nowait(i)
    with pytest.raises(pd.BufferFull):
        ch.put_nowait(limit)


@pytest.mark.parametrize(
    ("leases", "max_items"),
    [
        (4, 1000),  # 8 batches of 20: the 1,000 floor
        (25, 1000),
        (26, 1040),  # 52 batches of 20
        (64, 2560),
        (None, 1000),  # a pure buffer: max(1000, batch_items_max)
    ],
)
def test_the_derived_item_limit_is_every_lease_full_plus_as_much_queued(
    leases: int | None, max_items: int
) -> None:
    assert pd.BlockNewItems().resolve(20, None, leases=leases) == pd.BlockNewItems(
        max_items=max_items, max_size=None
    )
    assert pd.DropOldestBatch().resolve(20, None, leases=leases) == pd.DropOldestBatch(
        max_live_items=max_items, max_live_size=None
    )


def test_a_size_only_channel_does_not_block_at_1000_tiny_items(
    tmp_path: Any, make_channel: Any
) -> None:
    ch = make_channel(
        Recorder(Log(tmp_path / "log"), gate=Gate(tmp_path / "never")),
        workers=1,
        batch_items_max=None,
        batch_size_max=10_000,
        item_size=len,
    )
    for _ in range(5000):
        ch.put_nowait(b"x")  # max_size is 5 * batch_size_max; no item cap


def test_the_pure_buffer_keeps_its_own_default_and_the_none_rule() -> None:
    fb = Buffer(BufferOptions(batch_items_max=500)).options.full_behavior
    assert fb == pd.BlockNewItems(max_items=1000, max_size=None)
    fb = Buffer(BufferOptions(batch_items_max=None, batch_size_max=10)).options.full_behavior
    assert fb == pd.BlockNewItems(max_items=None, max_size=50)
    fb = Buffer(BufferOptions(batch_items_max=None)).options.full_behavior
    assert fb == pd.BlockNewItems(max_items=1000, max_size=None)
    drop = pd.DropOldestBatch().resolve(None, 10, leases=4)
    assert drop == pd.DropOldestBatch(max_live_items=None, max_live_size=50)


# ---- options and shutdown ---------------------------------------------------------------------


def test_a_closed_rate_limiter_is_refused_at_construction() -> None:
    limiter = pd.RateLimiter(10)
    limiter.close()
    with pytest.raises(pd.OptionsError, match="qps_limit must be an open RateLimiter"):
        pd.ProcessChannel(print, qps_limit=limiter)


def test_shutdown_goes_on_when_closing_its_limiter_raises(
    make_channel: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from procdispatch._limiter import limiter as _ratelimit

    def broken_close(self: Any) -> None:
        raise OSError("cannot close")

    monkeypatch.setattr(_ratelimit.RateLimiter, "close", broken_close)
    drained = threading.Event()
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=1, qps_limit=1000, on_drained=drained.set)
    ch.put_many(range(3))
    with caplog.at_level(logging.ERROR, logger="procdispatch"):
        assert ch.close_and_drain(60)
    assert drained.is_set()
    assert sorted(delivered_items(log)) == [0, 1, 2]
    assert any("close the channel's rate limiter" in r.message for r in caplog.records)
