"""ProcessChannel behaviour with real worker processes (issue: the whole channel API)."""

from __future__ import annotations

import collections
import gc
import threading
import time
import traceback
import warnings
from typing import Any

import pytest
from conftest import CAPABILITIES, worker_processes
from workerfns import Gate, Log, Recorder, delivered_items, wait_for

import procdispatch as pd


class FailOnce:
    """Fails the first attempt of any batch holding one of ``bad``; records the rest."""

    def __init__(self, log: Log, bad: set[int], exc: type[BaseException] = pd.TransientError):
        self.rec = Recorder(log)
        self.bad = bad
        self.exc = exc

    def __call__(self, batch: pd.Batch[int]) -> None:
        if batch.attempt == 1 and self.bad.intersection(batch.data):
            raise self.exc(f"bad batch {batch.data}")
        self.rec(batch)


def test_in_order_delivery_and_transient_retry_arrives_last(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    ch = make_channel(
        FailOnce(log, {3}),
        workers=1,
        max_leases=1,
        batch_items_max=1,
        retry=pd.retry.limited(3, delay=1.0),
        on_error=lambda b, e: isinstance(e, pd.TransientError),
    )
    for i in range(10):
        ch.put(i)
    assert ch.close_and_drain(30)
    assert delivered_items(log) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 3]
    s = ch.stats()
    assert (s.items_put, s.items_delivered, s.items_dropped) == (10, 10, 0)
    assert (s.batches_failed, s.batches_retried) == (1, 1)


def test_on_error_false_drops_the_batch_and_the_rest_arrive(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    errors: list[tuple[list[int], str]] = []
    drops: list[tuple[Any, bool]] = []

    def on_error(b: pd.Batch[int], e: BaseException) -> bool:
        errors.append((list(b.data), type(e).__name__))
        return False

    ch = make_channel(
        FailOnce(log, {2, 5}, exc=ValueError),
        workers=2,
        batch_items_max=1,
        on_error=on_error,
        on_drop=lambda b, f: drops.append((None if b is None else list(b.data), f)),
    )
    ch.put_many(range(8))
    assert ch.close_and_drain(30)
    assert sorted(delivered_items(log)) == [0, 1, 3, 4, 6, 7]
    assert sorted(errors) == [([2], "ValueError"), ([5], "ValueError")]
    assert sorted(d for d in drops if d[0] is not None) == [([2], False), ([5], False)]
    assert drops[-1] == (None, True)
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped, s.batches_dropped) == (6, 2, 2)


def test_exception_keeps_its_type_with_worker_traceback_as_cause(make_channel, backend):
    seen: list[BaseException] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        seen.append(e)
        return False

    ch = make_channel(_raise_keyerror, workers=1, on_error=on_error)
    ch.put("x")
    assert ch.close_and_drain(30)
    (e,) = seen
    assert type(e) is KeyError
    if "pickling" in CAPABILITIES[backend]:  # the worker's traceback came back as text
        assert isinstance(e.__cause__, pd.errors.RemoteTraceback)
        assert "_raise_keyerror" in str(e.__cause__)
    else:  # the exception itself, with its own traceback
        assert "_raise_keyerror" in "".join(traceback.format_tb(e.__traceback__))


def _raise_keyerror(batch: pd.Batch[Any]) -> None:
    raise KeyError("missing-thing")


def test_drop_oldest_with_slow_send_delivers_newest(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    drops: list[list[int]] = []
    ch = make_channel(
        Recorder(log, gate=gate),
        workers=1,
        batch_items_max=2,
        full_behavior=pd.DropOldestBatch(max_live_items=4),
        on_drop=lambda b, f: b is not None and drops.append(list(b.data)),
    )
    ch.put_many([0, 1])
    log.wait_count(1, ev="start")  # batch [0, 1] is in flight and held at the gate
    ch.put_many(range(2, 20))
    # The coordinator takes in all 18 items (evicting as it goes) while [0, 1] is still held:
    # the newest two are then all that is left, whenever the gate opens.
    wait_for(lambda: ch.stats().items_dropped == 16, timeout=30)
    gate.open()
    assert ch.close_and_drain(30)
    delivered = delivered_items(log)
    dropped = [x for d in drops for x in d]
    assert sorted(delivered + dropped) == list(range(20))
    assert delivered[:2] == [0, 1]
    # Only the newest data survives: the 4 live items are the 2 in flight and the newest 2.
    assert delivered[2:] == [18, 19]
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped) == (4, 16)


def test_size_based_batching_cuts_where_the_spec_says(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log),
        workers=1,
        max_leases=1,
        fifo=True,
        batch_items_max=None,
        batch_size_max=10,
        item_size=len,
        batch_age_max=60,
    )
    # 4+4 fit; the third 4 would exceed 10 -> cut before it; "x"*10 is exactly the max -> the
    # batch before it is cut and it forms a batch of its own (the double flush); then a tail.
    for s in ["aaaa", "bbbb", "cccc", "xxxxxxxxxx", "dd", "eeeeee", "fff"]:
        ch.put(s)
    assert ch.close_and_drain(30)
    batches = [r["data"] for r in log.read() if r["ev"] == "sent"]
    assert batches == [["aaaa", "bbbb"], ["cccc"], ["xxxxxxxxxx"], ["dd", "eeeeee"], ["fff"]]
    with pytest.raises(pd.ItemTooLarge):
        make_channel(Recorder(log), batch_size_max=3, item_size=len).put("four")


def test_cancel_releases_blocked_producer_and_drains(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")  # never opened: the in-flight send hangs
    drops: list[Any] = []
    ch = make_channel(
        Recorder(log, gate=gate),
        workers=1,
        batch_items_max=1,
        full_behavior=pd.BlockNewItems(max_items=3),
        cancel_grace=0.5,
        on_drop=lambda b, f: drops.append((None if b is None else list(b.data), f)),
    )
    outcome: dict[str, Any] = {}

    def producer() -> None:
        try:
            for i in range(100):
                ch.put(i)
                outcome["last"] = i
        except BaseException as e:
            outcome["exc"] = e

    t = threading.Thread(target=producer)
    t.start()
    log.wait_count(1, ev="start")
    wait_for(lambda: ch.stats().items_put == 3, what="the buffer to fill")
    assert t.is_alive()  # blocked in put
    ch.cancel()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(outcome["exc"], pd.ChannelClosed)
    assert ch.wait_drained(30)
    s = ch.stats()
    assert s.items_put == 3
    assert (s.items_delivered, s.items_dropped) == (0, 3)
    assert sorted(d[0] for d in drops if d[0] is not None) == [[0], [1], [2]]
    assert drops[-1] == (None, True)
    assert not any(r["ev"] == "sent" for r in log.read())
    with pytest.raises(pd.ChannelClosed):
        ch.put(1)
    assert not worker_processes()


def test_ten_thousand_items_exactly_once(tmp_path, make_channel, backend):
    log = Log(tmp_path / "log")
    spread = "processes" in CAPABILITIES[backend]
    gate = Gate(tmp_path / "go") if spread else None
    ch = make_channel(
        _JitterRecorder(log, gate=gate),
        workers=4,
        # Pipelined where a backend can; on Dask a lease is a task on a thread.
        max_leases=10 if "pipelining" in CAPABILITIES[backend] else 4,
        batch_items_max=50,
        batch_age_max=0.05,
    )
    if gate is not None:
        # The sends wait until two worker processes have started one: the first worker
        # ready holds at most 3 of the 10 leases, so the others get theirs as they come up
        # (on a loaded machine the first could otherwise send all 200 batches before the
        # others are ready, and the spread checked below would be a matter of timing).
        def two_started() -> None:
            wait_for(lambda: len({r["pid"] for r in log.read()}) >= 2, 60, "two workers")
            gate.open()

        threading.Thread(target=two_started, daemon=True).start()
    ch.put_many(range(10_000))
    assert ch.close_and_drain(60)
    got = delivered_items(log)
    assert len(got) == 10_000
    assert collections.Counter(got) == collections.Counter(range(10_000))
    s = ch.stats()
    assert (s.items_put, s.items_delivered, s.items_dropped) == (10_000, 10_000, 0)
    if spread:
        assert len({r["pid"] for r in log.read()}) >= 2


class _JitterRecorder(Recorder):
    def __call__(self, batch: pd.Batch[Any]) -> None:
        import random

        time.sleep(random.random() * 0.004)
        super().__call__(batch)


class HalfThenFail:
    """Delivers (removes) the first half of its data on attempt 1, sets meta, then fails."""

    def __init__(self, log: Log) -> None:
        self.rec = Recorder(log)

    def __call__(self, batch: pd.Batch[int]) -> None:
        if batch.attempt == 1:
            half = len(batch.data) // 2
            del batch.data[:half]
            batch.meta = {"delivered": half, "pid": 0}
            raise pd.TransientError("half done")
        assert batch.meta is not None
        self.rec(batch)


def test_mutation_round_trip(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    seen: list[tuple[list[int], Any]] = []

    def on_error(b: pd.Batch[int], e: BaseException) -> bool:
        seen.append((list(b.data), b.meta))
        return True

    ch = make_channel(
        HalfThenFail(log),
        workers=1,
        batch_items_max=10,
        retry=pd.retry.limited(2, 0.0),
        on_error=on_error,
    )
    ch.put_many(range(10))
    assert ch.close_and_drain(30)
    assert seen == [([5, 6, 7, 8, 9], {"delivered": 5, "pid": 0})]
    (sent,) = [r for r in log.read() if r["ev"] == "sent"]
    assert sent["data"] == [5, 6, 7, 8, 9]
    assert sent["attempt"] == 2
    assert sent["meta"] == repr({"delivered": 5, "pid": 0})
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped) == (10, 0)


def test_min_qps_only_while_idle_and_never_after_close(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log, sleep=0.05), workers=1, batch_items_max=1, min_qps=20, batch_age_max=0.01
    )
    log.wait_count(3, ev="sent", synthetic=True)
    for i in range(5):
        ch.put(i)
    log.wait_count(5, ev="sent", synthetic=False)
    log.wait_count(6, ev="sent", synthetic=True)
    ch.close()
    closed_at = time.monotonic()
    assert ch.wait_drained(30)
    recs = [r for r in log.read() if r["ev"] == "sent"]
    real = [r for r in recs if not r["synthetic"]]
    synth = [r for r in recs if r["synthetic"]]
    assert sorted(x for r in real for x in r["data"]) == [0, 1, 2, 3, 4]
    # Only while idle: with one worker no synthetic send overlaps a real one.
    for s in synth:
        for r in real:
            assert s["t1"] <= r["t0"] or s["t0"] >= r["t1"]
    # Never after close (a send leased just before close may still start a moment later).
    assert all(s["t0"] < closed_at + 0.2 for s in synth)
    st = ch.stats()
    assert (st.items_put, st.items_delivered) == (5, 5)  # synthetic items are not items
    assert st.batches_sent == 5 + len(synth)


def test_no_child_process_or_resource_warning_after_drain(tmp_path):
    log = Log(tmp_path / "log")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pd.ProcessChannel(Recorder(log), workers=2, batch_items_max=5) as ch:
            ch.put_many(range(50))
            pids = {r["pid"] for r in log.wait_count(1, ev="sent")}
        assert ch.drained
        ch2 = pd.ProcessChannel(Recorder(log), workers=2)
        ch2.put(1)
        assert ch2.close_and_drain(30)
        del ch, ch2
        gc.collect()
    assert not worker_processes()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    import psutil

    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_put_from_four_threads_loses_nothing(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log), workers=2, batch_items_max=7, full_behavior=pd.BlockNewItems(max_items=50)
    )

    def produce(k: int) -> None:
        for i in range(500):
            ch.put(k * 1000 + i)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert ch.close_and_drain(60)
    got = delivered_items(log)
    assert sorted(got) == sorted(k * 1000 + i for k in range(4) for i in range(500))
    with pytest.raises(pd.ChannelClosed):
        ch.put(1)
    with pytest.raises(pd.ChannelClosed):
        ch.put_many([1, 2])


def test_put_nowait_and_put_timeout_when_full(tmp_path, make_channel):
    gate = Gate(tmp_path / "gate")
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log, gate=gate),
        workers=1,
        batch_items_max=1,
        full_behavior=pd.BlockNewItems(max_items=2),
    )
    ch.put(1)
    ch.put(2)
    with pytest.raises(pd.BufferFull):
        ch.put_nowait(3)
    with pytest.raises(TimeoutError):
        ch.put(3, timeout=0.05)
    with pytest.raises(TimeoutError) as ei:
        ch.put_many([3, 4], timeout=0.05)
    assert ei.value.added == 0  # type: ignore[attr-defined]
    gate.open()
    ch.put(3, timeout=30)
    assert ch.close_and_drain(30)
    assert sorted(delivered_items(log)) == [1, 2, 3]
    assert ch.stats().items_put == 3


def test_thread_backend_same_semantics(make_channel):
    seen: list[tuple[list[int], Any]] = []
    delivered: list[int] = []
    lock = threading.Lock()

    def send(batch: pd.Batch[int]) -> None:
        if batch.attempt == 1:
            batch.meta = "m"
            del batch.data[0]
            raise pd.TransientError("x")
        with lock:
            delivered.extend(batch.data)

    def on_error(b: pd.Batch[int], e: BaseException) -> bool:
        seen.append((list(b.data), b.meta))
        return True

    ch = make_channel(
        send,
        backend="thread",
        workers=2,
        batch_items_max=3,
        retry=pd.retry.limited(1),
        on_error=on_error,
    )
    ch.put_many(range(6))
    assert ch.close_and_drain(30)
    assert sorted(delivered) == [1, 2, 4, 5]
    assert sorted(seen) == [([1, 2], "m"), ([4, 5], "m")]
    s = ch.stats()
    assert (s.items_put, s.items_delivered, s.items_dropped) == (6, 6, 0)


def test_cancel_lets_in_flight_sends_finish_within_the_grace(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    drops: list[list[int]] = []
    ch = make_channel(
        Recorder(log, gate=gate),
        workers=1,
        batch_items_max=1,
        cancel_grace=30,
        on_drop=lambda b, f: b is not None and drops.append(list(b.data)),
    )
    ch.put_many(range(5))
    log.wait_count(1, ev="start")  # item 0 is in flight, 1..4 queued
    ch.cancel()
    gate.open()  # the in-flight send finishes well inside its grace
    assert ch.wait_drained(30)
    assert delivered_items(log) == [0]
    assert sorted(x for d in drops for x in d) == [1, 2, 3, 4]
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped, s.worker_restarts) == (1, 4, 0)


def test_small_and_large_leases_arrive_whole(tmp_path, make_channel):
    """Leases up to 16 KiB are framed by the coordinator itself, larger ones by Connection:
    both must reach the worker intact."""
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=2, batch_items_max=1)
    items = ["s", "m" * 16_000, "b" * 20_000, "h" * 3_000_000]
    ch.put_many(items)
    assert ch.close_and_drain(60)
    assert sorted(delivered_items(log)) == sorted(items)
