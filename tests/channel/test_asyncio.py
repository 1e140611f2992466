"""asyncio on both sides: aput / aput_many / await_drained / aclose_and_drain / async with in the
producer, async send_fn and worker_init in the workers. Every test runs on every backend."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiofns import AsyncInit, AsyncSender, ReturnsAwaitable, failing_init, sleep_forever
from workerfns import Gate, Log, Recorder, delivered_items, wait_for

import procdispatch as pd


def test_ten_thousand_aputs_from_three_tasks_are_each_delivered_once(make_channel, tmp_path):
    log = Log(tmp_path / "log")
    total = 10_000
    # A small buffer, so that the aputs keep waiting for room.
    ch = make_channel(
        Recorder(log),
        workers=2,
        batch_items_max=100,
        batch_age_max=0.05,
        full_behavior=pd.BlockNewItems(max_items=300),
    )

    async def produce(k: int) -> None:
        for i in range(k, total, 3):
            await ch.aput(i)

    async def main() -> None:
        async with ch:
            await asyncio.gather(*(produce(k) for k in range(3)))

    asyncio.run(main())
    assert ch.drained
    assert sorted(delivered_items(log)) == list(range(total))
    s = ch.stats()
    assert (s.items_put, s.items_delivered, s.items_dropped) == (total, total, 0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cancelled_aputs_never_break_accounting(make_channel, tmp_path, seed):
    """Tasks aput (and aput_many) into a full buffer while others cancel them after random
    numbers of loop iterations: an aput that raised CancelledError added nothing, one that
    returned added its item, an aput_many added exactly ``exc.added`` items, and after the
    drain the delivered items and the stats are exactly those."""
    rng = random.Random(seed)
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log),
        workers=2,
        batch_items_max=3,
        batch_age_max=0.01,
        full_behavior=pd.BlockNewItems(max_items=6),
    )
    added: list[int] = []
    outcomes: Counter[str] = Counter()

    async def one(item: int) -> None:
        try:
            await ch.aput(item)
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            raise
        outcomes["returned"] += 1
        added.append(item)

    async def many(items: list[int]) -> None:
        try:
            n = await ch.aput_many(items)
        except asyncio.CancelledError as exc:
            outcomes["many-cancelled"] += 1
            added.extend(items[: exc.added])  # type: ignore[attr-defined]
            raise
        assert n == len(items)
        added.extend(items)

    async def cancel_later(task: asyncio.Task[None], spins: int) -> None:
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()

    async def main() -> None:
        tasks: list[asyncio.Task[None]] = []
        cancellers: list[asyncio.Task[None]] = []
        item = 0
        for _ in range(400):
            if rng.random() < 0.2:
                k = rng.randint(2, 8)
                task = asyncio.ensure_future(many(list(range(item, item + k))))
                item += k
            else:
                task = asyncio.ensure_future(one(item))
                item += 1
            tasks.append(task)
            if rng.random() < 0.5:
                cancellers.append(asyncio.ensure_future(cancel_later(task, rng.randint(0, 60))))
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        await asyncio.gather(*cancellers)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert await ch.aclose_and_drain(60)

    asyncio.run(main())
    # Both kinds of ending happened, or the run tested nothing.
    assert outcomes["cancelled"] > 0
    assert outcomes["returned"] > 0
    delivered = delivered_items(log)
    assert len(delivered) == len(set(delivered))  # each once
    assert sorted(delivered) == sorted(added)
    s = ch.stats()
    assert (s.items_put, s.items_delivered, s.items_dropped) == (len(added), len(added), 0)


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(-1, ValueError), (float("nan"), ValueError), (True, TypeError), ("1", TypeError)],
)
def test_a_bad_timeout_of_the_async_methods_is_refused_as_put_refuses_it(
    make_channel, tmp_path, timeout, error
):
    ch = make_channel(Recorder(Log(tmp_path / "log")), workers=1)

    async def main() -> None:
        with pytest.raises(error, match=r"aput\(\): 'timeout'"):
            await ch.aput(1, timeout=timeout)
        with pytest.raises(error, match=r"aput_many\(\): 'timeout'"):
            await ch.aput_many([1], timeout=timeout)
        with pytest.raises(error, match=r"await_drained\(\): 'timeout'"):
            await ch.await_drained(timeout=timeout)
        assert ch.stats().items_put == 0

    try:
        asyncio.run(main())
    finally:
        assert ch.close_and_drain(60)


def test_aput_and_aput_many_time_out_on_a_full_buffer(make_channel, tmp_path):
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    ch = make_channel(
        Recorder(log, gate),
        workers=1,
        batch_items_max=2,
        batch_age_max=0.01,
        full_behavior=pd.BlockNewItems(max_items=4),
    )

    async def main() -> None:
        await ch.aput_many([0, 1, 2])
        with pytest.raises(TimeoutError) as many:
            await ch.aput_many([3, 4, 5], timeout=0.2)
        assert many.value.added == 1  # type: ignore[attr-defined]
        with pytest.raises(TimeoutError):
            await ch.aput(6, timeout=0.2)
        with pytest.raises(TimeoutError):
            await ch.aput(7, timeout=0)
        assert ch.stats().items_put == 4
        gate.open()
        await ch.aput(8, timeout=30)  # room comes back once the held send ends
        assert await ch.aclose_and_drain(60)

    try:
        asyncio.run(main())
    finally:
        gate.open()
    assert sorted(delivered_items(log)) == [0, 1, 2, 3, 8]


def test_await_drained_times_out_then_sees_the_drain(make_channel, tmp_path):
    gate = Gate(tmp_path / "gate")
    ch = make_channel(Recorder(Log(tmp_path / "log"), gate), workers=1, batch_age_max=0.01)

    async def main() -> None:
        await ch.aput(1)
        ch.close()
        assert await ch.await_drained(0.1) is False
        gate.open()
        assert await ch.await_drained(60) is True

    try:
        asyncio.run(main())
    finally:
        gate.open()
    assert ch.drained


def test_an_exception_in_async_with_cancels_the_channel(make_channel, tmp_path):
    """Unlike ``with`` (where an exception drains), the held sends are not waited for: the
    channel is cancelled, and what it held is dropped."""
    gate = Gate(tmp_path / "gate")  # opened only at the end: the sends hang until cancelled
    dropped: list[int] = []
    ch = make_channel(
        Recorder(Log(tmp_path / "log"), gate),
        workers=1,
        batch_items_max=2,
        batch_age_max=0.01,
        cancel_grace=0.3,
        on_drop=lambda b, final: dropped.extend(b.data if b is not None else []),
    )

    async def main() -> None:
        async with ch:
            await ch.aput_many(range(10))
            raise ValueError("boom")

    try:
        with pytest.raises(ValueError, match="boom"):
            asyncio.run(main())
        assert ch.drained
        s = ch.stats()
        assert s.items_put == 10
        assert s.items_delivered == 0
        assert sorted(dropped) == list(range(10))
    finally:
        gate.open()


def test_cancelling_the_task_in_async_with_cancels_the_channel(make_channel, tmp_path):
    gate = Gate(tmp_path / "gate")
    ch = make_channel(
        Recorder(Log(tmp_path / "log"), gate),
        workers=1,
        batch_items_max=2,
        batch_age_max=0.01,
        cancel_grace=0.3,
        full_behavior=pd.BlockNewItems(max_items=4),
    )

    async def body(started: asyncio.Event) -> None:
        async with ch:
            await ch.aput_many(range(4))
            started.set()
            await ch.aput(99)  # the buffer is full: waits until cancelled

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.ensure_future(body(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
        assert ch.drained
        s = ch.stats()
        assert (s.items_put, s.items_delivered, s.items_dropped) == (4, 0, 4)
    finally:
        gate.open()


def test_aput_into_a_closed_channel_raises_channel_closed(make_channel, tmp_path):
    ch = make_channel(Recorder(Log(tmp_path / "log")), workers=1)

    async def main() -> None:
        await ch.aput(1)
        ch.close()
        with pytest.raises(pd.ChannelClosed):
            await ch.aput(2)
        with pytest.raises(pd.ChannelClosed) as many:
            await ch.aput_many([3, 4])
        assert many.value.added == 0  # type: ignore[attr-defined]
        assert await ch.await_drained(60)

    asyncio.run(main())
    assert ch.stats().items_put == 1


def test_a_waiting_aput_is_released_by_close(make_channel, tmp_path):
    gate = Gate(tmp_path / "gate")
    ch = make_channel(
        Recorder(Log(tmp_path / "log"), gate),
        workers=1,
        batch_items_max=1,
        full_behavior=pd.BlockNewItems(max_items=2),
    )

    async def main() -> None:
        await ch.aput_many([0, 1])
        waiting = asyncio.ensure_future(ch.aput_many([2, 3]))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()
        ch.close()
        with pytest.raises(pd.ChannelClosed) as closed:
            await waiting
        assert closed.value.added == 0  # type: ignore[attr-defined]
        gate.open()
        assert await ch.await_drained(60)

    try:
        asyncio.run(main())
    finally:
        gate.open()


def test_a_sized_aput_many_stops_at_a_bad_item_after_adding_the_ones_before(make_channel, tmp_path):
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=1, batch_size_max=10, item_size=lambda x: x)

    async def main() -> None:
        with pytest.raises(pd.ItemTooLarge) as bad:
            await ch.aput_many([1, 2, 30, 4])
        assert bad.value.added == 2  # type: ignore[attr-defined]
        with pytest.raises(pd.ItemTooLarge):
            await ch.aput(40)
        await ch.aput(3)
        assert await ch.aclose_and_drain(60)

    asyncio.run(main())
    assert sorted(delivered_items(log)) == [1, 2, 3]


def test_async_send_fn_uses_the_client_its_async_worker_init_made(make_channel, tmp_path):
    log = Log(tmp_path / "log")
    ch = make_channel(
        AsyncSender(log),
        worker_init=AsyncInit(log),
        workers=2,
        batch_items_max=5,
        batch_age_max=0.01,
        retry=pd.retry.none(),
    )

    async def main() -> None:
        async with ch:
            for i in range(200):
                await ch.aput(i)

    asyncio.run(main())
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped) == (200, 0)
    recs = log.read()
    inits = {r["worker"]: r["loop"] for r in recs if r["ev"] == "init"}
    sent = [r for r in recs if r["ev"] == "sent"]
    assert sorted(x for r in sent for x in r["data"]) == list(range(200))
    # Each worker's sends ran on the loop its init ran on (the one loop of its life).
    assert all(r["loop"] == inits[r["worker"]] for r in sent)
    # At the exit of each worker that served, its loop was closed: the background task was
    # cancelled. A worker whose init ran but whose start the parent had not yet seen when the
    # drain ended is still starting there, and is killed, not stopped: it closes nothing.
    served = {r["worker"] for r in sent}
    log.wait_count(len(served), ev="loop-closing")
    closed = {r["worker"] for r in log.read() if r["ev"] == "loop-closing"}
    assert served <= closed <= set(inits)


def test_a_callable_returning_an_awaitable_runs_on_one_loop_per_worker(make_channel, tmp_path):
    log = Log(tmp_path / "log")
    ch = make_channel(ReturnsAwaitable(log), workers=1, batch_items_max=3, batch_age_max=0.01)
    ch.put_many(range(30))
    assert ch.close_and_drain(60)
    sent = [r for r in log.read() if r["ev"] == "sent"]
    assert sorted(x for r in sent for x in r["data"]) == list(range(30))
    assert len({(r["worker"], r["loop"]) for r in sent}) == 1


def test_an_async_worker_init_that_raises_is_a_failed_start(make_channel):
    ch = make_channel(sleep_forever, worker_init=failing_init, workers=1, start_timeout=30)

    async def main() -> None:
        await ch.aput(1)
        with pytest.raises(pd.WorkerStartFailed):
            await ch.aclose_and_drain(60)

    asyncio.run(main())


@pytest.mark.needs("kill", why="an overrunning send is killed with its worker, not abandoned")
def test_an_async_send_overrunning_send_timeout_is_killed(make_channel):
    drops: list[Any] = []
    ch = make_channel(
        sleep_forever,
        workers=1,
        send_timeout=0.3,
        retry=pd.retry.none(),
        on_drop=lambda b, final: drops.append(b) if b is not None else None,
    )
    ch.put(1)
    assert ch.close_and_drain(60)
    s = ch.stats()
    assert (s.items_dropped, s.batches_failed) == (1, 1)
    assert len(drops) == 1


def test_await_drained_from_a_loop_other_than_the_producer(make_channel, tmp_path: Path):
    """The drained latch wakes waiters of several loops (one per thread) at once."""
    import threading

    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=1, batch_age_max=0.01)
    results: list[bool] = []

    def other_loop() -> None:
        results.append(asyncio.run(ch.await_drained(60)))

    t = threading.Thread(target=other_loop)
    t.start()
    ch.put_many(range(5))
    assert asyncio.run(ch.aclose_and_drain(60))
    t.join(60)
    assert results == [True]
    assert sorted(delivered_items(log)) == list(range(5))


def test_room_freed_just_before_an_aput_registers_is_not_missed(make_channel, tmp_path):
    """The race a waiter must not lose: the aput finds the buffer full, and the last item in
    the channel is delivered (releasing every waiter registered so far) before this aput's
    waiter is registered. Nothing else will free room, so only the try after registering
    lets the aput in."""
    gate = Gate(tmp_path / "gate")
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log, gate),
        workers=1,
        batch_items_max=1,
        full_behavior=pd.BlockNewItems(max_items=1),
    )
    adm = ch._adm
    register = adm.add_waiter

    def late_register(waiter: Any) -> None:
        gate.open()
        wait_for(lambda: ch.stats().items_delivered == 1, what="the held item's delivery")
        register(waiter)

    adm.add_waiter = late_register

    async def main() -> None:
        await ch.aput(0)
        # Full until the delivery late_register waits for; a missed wake-up would wait for ever.
        await asyncio.wait_for(ch.aput(1), 10)
        assert await ch.aclose_and_drain(60)

    try:
        asyncio.run(main())
    finally:
        gate.open()
    assert sorted(delivered_items(log)) == [0, 1]
