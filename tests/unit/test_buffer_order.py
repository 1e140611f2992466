"""Lease order of the pure buffer against a reference queue, under Hypothesis.

The buffer keeps its queue in two parts (cut batches, and runs of whole batches added at once, in
a deque; re-queued ones in a heap); the reference is one plain dict of queued batches, searched
in full at every lease. With
``batch_items_max=1`` every add cuts a batch at once, so the reference knows every key: the cut
time for a new batch, ``now + delay`` after a nack, the old send time after a release.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procdispatch.buffer import Batch, Buffer, BufferOptions, InfiniteGrowth

ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add_many", "lease", "lease", "nack", "release", "ack"]),
        st.sampled_from([0.0, 0.0, 0.25, 1.0, 3.0]),  # time advance
        st.integers(min_value=0, max_value=10**6),  # which lease (modulo how many there are)
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    fifo=st.booleans(),
    max_leases=st.integers(min_value=1, max_value=4),
    delays=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.5]), min_size=1, max_size=4),
    script=ops,
)
def test_leases_come_in_send_time_then_id_order(
    fifo: bool, max_leases: int, delays: list[float], script: list[tuple[str, float, int]]
) -> None:
    if fifo:
        max_leases = 1  # what fifo requires

    def retry_factory() -> Iterator[float]:
        return itertools.cycle(delays)  # each batch's own iterator starts from the first

    buf: Buffer[int] = Buffer(
        BufferOptions(
            max_leases=max_leases,
            batch_items_max=1,
            batch_age_max=1e9,
            full_behavior=InfiniteGrowth(),
            retry=retry_factory,
            fifo=fifo,
        )
    )
    now = 0.0
    queued: dict[int, float] = {}  # id -> when it may be sent
    leased: dict[int, tuple[Batch[int], float]] = {}  # id -> (batch, its send time)
    nacks: dict[int, int] = {}
    next_id = 1
    for op, advance, pick in script:
        now += advance
        if op == "add":
            assert buf.add(now, next_id) is None
            queued[next_id] = now
            next_id += 1
            continue
        if op == "add_many":  # whole batches at once: queued as one run
            items = list(range(next_id, next_id + pick % 5 + 1))
            assert buf.add_many(now, items) == (len(items), [])
            queued.update(dict.fromkeys(items, now))
            next_id += len(items)
            continue
        if op == "lease":
            if len(leased) >= max_leases or not queued:
                expected = None
            elif fifo:
                first = min(queued)
                expected = first if queued[first] <= now else None
            else:
                due = [(t, i) for i, t in queued.items() if t <= now]
                expected = min(due)[1] if due else None
            assert buf.ready(now) is (expected is not None)
            b = buf.lease_one(now)
            assert (b.id if b is not None else None) == expected
            if b is not None:
                leased[b.id] = (b, queued.pop(b.id))
            continue
        if not leased:
            continue
        bid = sorted(leased)[pick % len(leased)]
        b, sent_at = leased.pop(bid)
        if op == "ack":
            buf.ack(b)
        elif op == "release":
            buf.release(b)
            queued[bid] = sent_at
        else:
            assert buf.nack(now, b) is None  # a cycle never runs out
            queued[bid] = now + delays[nacks.get(bid, 0) % len(delays)]
            nacks[bid] = nacks.get(bid, 0) + 1
        # The next send time: of the lowest id with fifo (it holds back the rest), else the
        # earliest of all.
        head = (queued[min(queued)] if fifo else min(queued.values())) if queued else None
        assert buf.next_send_time() == head


def test_a_cut_earlier_than_the_last_one_still_leases_in_order() -> None:
    """A caller's clock that steps back: the later cut goes to the heap, and order holds."""
    buf: Buffer[str] = Buffer(BufferOptions(max_leases=3, batch_items_max=1))
    buf.add(5.0, "a")  # (5.0, 1)
    buf.add(3.0, "b")  # (3.0, 2): earlier than the deque's tail
    buf.add(4.0, "c")  # (4.0, 3)
    assert buf.next_send_time() == 3.0
    got = [buf.lease_one(6.0) for _ in range(3)]
    assert [b.data for b in got if b is not None] == [["b"], ["c"], ["a"]]


def test_a_run_earlier_than_the_last_cut_still_leases_in_order() -> None:
    buf: Buffer[str] = Buffer(BufferOptions(max_leases=4, batch_items_max=1))
    buf.add(5.0, "a")  # (5.0, 1)
    assert buf.add_many(3.0, ["b", "c"]) == (2, [])  # (3.0, 2) and (3.0, 3): to the heap
    buf.add(4.0, "d")  # (4.0, 4)
    got = [buf.lease_one(6.0) for _ in range(4)]
    assert [b.data for b in got if b is not None] == [["b"], ["c"], ["d"], ["a"]]


def test_add_many_fills_the_current_batch_then_whole_batches_then_a_new_one() -> None:
    buf: Buffer[int] = Buffer(BufferOptions(max_leases=10, batch_items_max=3, batch_age_max=5.0))
    buf.add(0.0, 0)
    assert buf.add_many(1.0, list(range(1, 11))) == (10, [])
    assert buf.stats().unleased_items == 11
    assert buf.next_send_time() == 1.0  # the first batch was cut when it filled up, at 1.0
    got = [buf.lease_one(1.0) for _ in range(4)]
    assert [(b.id, b.data, b.attempt) for b in got if b is not None] == [
        (1, [0, 1, 2], 1),
        (2, [3, 4, 5], 1),
        (3, [6, 7, 8], 1),
    ]
    assert got[3] is None  # 9 and 10 wait in the current batch, due at 6.0
    assert buf.next_send_time() == 6.0
    last = buf.lease_one(6.0)
    assert last is not None
    assert (last.id, last.data) == (4, [9, 10])
    assert buf.stats().leased_items == 11


@pytest.mark.parametrize("fifo", [False, True])
def test_force_lease_all_takes_the_runs_in_id_order(fifo: bool) -> None:
    buf: Buffer[int] = Buffer(
        BufferOptions(max_leases=1, batch_items_max=2, fifo=fifo, full_behavior=InfiniteGrowth())
    )
    assert buf.add_many(0.0, list(range(6))) == (6, [])
    first = buf.lease_one(0.0)
    assert first is not None
    assert first.data == [0, 1]
    buf.add(0.0, 6)
    buf.flush(0.0)
    assert [(b.id, b.data) for b in buf.force_lease_all()] == [(2, [2, 3]), (3, [4, 5]), (4, [6])]
    assert buf.stats().unleased_items == 0


def test_an_aged_current_batch_goes_before_a_waiting_retry() -> None:
    """The current batch, cut by age at lease time, passes a re-queued batch not yet due;
    the retry then comes when due."""
    buf: Buffer[str] = Buffer(
        BufferOptions(
            max_leases=2,
            batch_items_max=2,
            batch_age_max=1.0,
            retry=lambda: iter([10.0]),
        )
    )
    buf.add(0.0, "a")
    buf.add(0.0, "b")  # batch 1, full: cut at 0.0
    first = buf.lease_one(0.0)
    assert first is not None
    assert first.id == 1
    assert buf.nack(0.0, first) is None  # due again at 10.0, in the heap
    buf.add(0.5, "c")  # batch 2, the current one, due by age at 1.5
    assert buf.next_send_time() == 1.5
    assert not buf.ready(1.4)
    assert buf.lease_one(1.4) is None
    assert buf.ready(2.0)
    second = buf.lease_one(2.0)
    assert second is not None
    assert second.data == ["c"]
    assert buf.next_send_time() == 10.0
    assert buf.lease_one(9.9) is None
    again = buf.lease_one(10.0)
    assert again is first
    assert again.attempt == 2
