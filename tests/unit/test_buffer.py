"""Unit tests for the pure buffer (procdispatch.buffer), with literal times.

Every time passed to the buffer is a literal (``now=0.0``, ``1.0``, ...): the buffer never reads a
clock, so nothing here sleeps or depends on the machine's speed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import pytest

from procdispatch import retry
from procdispatch.buffer import (
    DERIVED,
    Batch,
    BlockNewItems,
    Buffer,
    BufferOptions,
    BufferStats,
    DropOldestBatch,
    FullBehavior,
    InfiniteGrowth,
)
from procdispatch.errors import (
    BufferFull,
    ItemTooLarge,
    ItemTooSmall,
    OptionsError,
    ProcDispatchError,
)


def make(**kwargs: Any) -> Buffer[Any]:
    return Buffer(BufferOptions(**kwargs))


def lease_all(buf: Buffer[Any], now: float) -> list[Batch[Any]]:
    """Lease batches until lease_one says no."""
    out = []
    while (b := buf.lease_one(now)) is not None:
        out.append(b)
    return out


def stats_tuple(buf: Buffer[Any]) -> tuple[int, int, int, int]:
    s = buf.stats()
    return (s.unleased_items, s.unleased_size, s.leased_items, s.leased_size)


class RecordingRetry:
    """A retry factory handing batch number k (in creation order) the delays ``plans[k]``."""

    def __init__(self, *plans: list[float]) -> None:
        self.plans = list(plans)
        self.calls = 0
        self.taken: list[list[float]] = []

    def __call__(self) -> Iterator[float]:
        plan = self.plans[self.calls]
        taken: list[float] = []
        self.taken.append(taken)
        self.calls += 1

        def gen() -> Iterator[float]:
            for d in plan:
                taken.append(d)
                yield d

        return gen()


# =============================================================================================
# Option validation
# =============================================================================================


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_leases": 0}, "max_leases must be an int >= 1 (got 0)"),
        ({"max_leases": -1}, "max_leases must be an int >= 1 (got -1)"),
        ({"max_leases": None}, "max_leases must be an int >= 1 (got None)"),
        ({"max_leases": 2.0}, "max_leases must be an int >= 1 (got 2.0)"),
        ({"max_leases": True}, "max_leases must be an int >= 1 (got True)"),
        ({"batch_items_max": 0}, "batch_items_max must be >= 1 or None (got 0)"),
        ({"batch_items_max": -1}, "batch_items_max must be >= 1 or None (got -1)"),
        ({"batch_items_max": 1.5}, "batch_items_max must be >= 1 or None (got 1.5)"),
        ({"batch_items_max": False}, "batch_items_max must be >= 1 or None (got False)"),
        ({"batch_size_max": 0}, "batch_size_max must be >= 1 or None (got 0)"),
        ({"batch_size_max": -1}, "batch_size_max must be >= 1 or None (got -1)"),
        ({"batch_size_max": "10"}, "batch_size_max must be >= 1 or None (got '10')"),
        ({"batch_age_max": 0}, "batch_age_max must be a number of seconds > 0 (got 0)"),
        ({"batch_age_max": -1.5}, "batch_age_max must be a number of seconds > 0 (got -1.5)"),
        ({"batch_age_max": math.nan}, "batch_age_max must be a number of seconds > 0 (got nan)"),
        ({"batch_age_max": None}, "batch_age_max must be a number of seconds > 0 (got None)"),
        ({"batch_age_max": True}, "batch_age_max must be a number of seconds > 0 (got True)"),
        ({"batch_age_max": "1"}, "batch_age_max must be a number of seconds > 0 (got '1')"),
        ({"fifo": True}, "fifo=True needs max_leases == 1 (got 4)"),
        ({"fifo": True, "max_leases": 2}, "fifo=True needs max_leases == 1 (got 2)"),
        ({"fifo": "yes", "max_leases": 1}, "fifo must be a bool (got 'yes')"),
        (
            {"full_behavior": "block"},
            "full_behavior must be BlockNewItems, DropOldestBatch or InfiniteGrowth (got 'block')",
        ),
        ({"retry": 5}, "retry must be a callable returning an iterator (got 5)"),
    ],
)
def test_buffer_options_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError) as info:
        make(**kwargs)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_validation_checks_fields_in_order() -> None:
    with pytest.raises(OptionsError, match=r"^max_leases "):
        make(max_leases=0, batch_items_max=0, batch_age_max=0)
    with pytest.raises(OptionsError, match=r"^batch_items_max "):
        make(batch_items_max=0, batch_size_max=0)
    with pytest.raises(OptionsError, match=r"^batch_size_max "):
        make(batch_size_max=0, batch_age_max=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_leases": 1},
        {"batch_items_max": 1},
        {"batch_items_max": None},
        {"batch_size_max": 1},
        {"batch_age_max": 0.001},
        {"batch_age_max": 5},
        {"batch_age_max": math.inf},
        {"fifo": True, "max_leases": 1},
        {"full_behavior": InfiniteGrowth()},
        {"retry": retry.none()},
    ],
)
def test_valid_options_are_accepted(kwargs: dict[str, Any]) -> None:
    buf = make(**kwargs)
    assert buf.stats() == BufferStats()


def test_validated_options_are_normalized() -> None:
    buf = make(batch_age_max=5)
    assert buf.options.batch_age_max == 5.0
    assert isinstance(buf.options.batch_age_max, float)
    assert isinstance(buf.options.full_behavior, BlockNewItems)
    assert callable(buf.options.retry)


POLICIES = [
    pytest.param(BlockNewItems, "max_items", "max_size", id="BlockNewItems"),
    pytest.param(DropOldestBatch, "max_live_items", "max_live_size", id="DropOldestBatch"),
]


@pytest.mark.parametrize(("policy", "items", "size"), POLICIES)
@pytest.mark.parametrize(
    ("batch_kwargs", "fb_kwargs", "template"),
    [
        ({}, {"items": 0}, "{P}.{items} must be >= 1 or None (got 0)"),
        ({}, {"items": -1}, "{P}.{items} must be >= 1 or None (got -1)"),
        ({}, {"items": 2.5}, "{P}.{items} must be >= 1 or None (got 2.5)"),
        ({}, {"items": True}, "{P}.{items} must be >= 1 or None (got True)"),
        (
            {"batch_items_max": 20},
            {"items": 19},
            "{P}.{items} must be >= batch_items_max (20) or None (got 19)",
        ),
        (
            {"batch_items_max": 5000},
            {"items": 1000},
            "{P}.{items} must be >= batch_items_max (5000) or None (got 1000)",
        ),
        ({}, {"size": 50}, "{P}.{size} may only be set when batch_size_max is set (got 50)"),
        (
            {"batch_size_max": 100},
            {"size": 99},
            "{P}.{size} must be >= batch_size_max (100) or None (got 99)",
        ),
        ({"batch_size_max": 100}, {"size": 0}, "{P}.{size} must be >= 1 or None (got 0)"),
        ({"batch_size_max": 100}, {"size": -1}, "{P}.{size} must be >= 1 or None (got -1)"),
        (
            {"batch_size_max": 100},
            {"items": None, "size": None},
            "{P} must keep one of {items} or {size} (got both None)",
        ),
        # the size limit derived from batch_size_max=None is None too
        ({}, {"items": None}, "{P} must keep one of {items} or {size} (got both None)"),
    ],
)
def test_full_behavior_validation(
    policy: type[FullBehavior],
    items: str,
    size: str,
    batch_kwargs: dict[str, Any],
    fb_kwargs: dict[str, Any],
    template: str,
) -> None:
    names = {"items": items, "size": size}
    fb = policy(**{names[k]: v for k, v in fb_kwargs.items()})
    with pytest.raises(OptionsError) as info:
        make(full_behavior=fb, **batch_kwargs)
    assert str(info.value) == template.format(P=policy.__name__, items=items, size=size)


@pytest.mark.parametrize(("policy", "items", "size"), POLICIES)
@pytest.mark.parametrize(
    ("batch_kwargs", "fb_kwargs", "expected"),
    [
        ({}, {}, (1000, None)),
        ({"batch_items_max": 20}, {"items": 20}, (20, None)),  # equal to the batch limit is fine
        ({"batch_items_max": None}, {"items": 1}, (1, None)),  # no batch limit, no lower bound
        ({"batch_items_max": None}, {}, (1000, None)),
        ({"batch_items_max": 999}, {}, (1000, None)),
        ({"batch_items_max": 1000}, {}, (1000, None)),
        ({"batch_items_max": 5000}, {}, (5000, None)),  # max(1000, batch_items_max)
        ({"batch_size_max": 100}, {}, (1000, 500)),  # 5 * batch_size_max
        ({"batch_size_max": 100}, {"size": 100}, (1000, 100)),
        ({"batch_size_max": 100}, {"items": None}, (None, 500)),
        ({"batch_items_max": 3}, {"items": 3}, (3, None)),
        ({"batch_size_max": 100}, {"size": None}, (1000, None)),
        ({"batch_items_max": 3, "batch_size_max": 7}, {"items": 3, "size": 8}, (3, 8)),
    ],
)
def test_full_behavior_derived_defaults(
    policy: type[FullBehavior],
    items: str,
    size: str,
    batch_kwargs: dict[str, Any],
    fb_kwargs: dict[str, Any],
    expected: tuple[int | None, int | None],
) -> None:
    names = {"items": items, "size": size}
    fb = policy(**{names[k]: v for k, v in fb_kwargs.items()})
    buf = make(full_behavior=fb, **batch_kwargs)
    resolved = buf.options.full_behavior
    assert type(resolved) is policy
    assert (getattr(resolved, items), getattr(resolved, size)) == expected


@pytest.mark.parametrize(
    ("batch_kwargs", "expected"),
    [
        ({}, BlockNewItems(max_items=1000, max_size=None)),
        ({"batch_items_max": None}, BlockNewItems(max_items=1000, max_size=None)),
        ({"batch_items_max": 5000}, BlockNewItems(max_items=5000, max_size=None)),
        ({"batch_size_max": 10}, BlockNewItems(max_items=1000, max_size=50)),
    ],
)
def test_default_full_behavior(batch_kwargs: dict[str, Any], expected: BlockNewItems) -> None:
    assert make(**batch_kwargs).options.full_behavior == expected


def test_users_policy_object_is_not_mutated() -> None:
    fb = BlockNewItems()
    dob = DropOldestBatch(max_live_items=50)
    opts = BufferOptions(batch_size_max=10, full_behavior=fb)
    buf = make(batch_size_max=10, full_behavior=fb)
    buf2 = make(batch_size_max=10, full_behavior=dob)
    assert fb.max_items is DERIVED
    assert fb.max_size is DERIVED
    assert dob.max_live_items == 50
    assert dob.max_live_size is DERIVED
    assert buf.options.full_behavior is not fb
    assert buf2.options.full_behavior is not dob
    Buffer(opts)
    assert opts.full_behavior is fb
    assert opts.retry is None


def test_one_policy_object_resolves_separately_per_buffer() -> None:
    fb = BlockNewItems()
    small = make(batch_size_max=10, full_behavior=fb)
    unlimited = make(full_behavior=fb)
    large = make(batch_size_max=300, batch_items_max=2000, full_behavior=fb)
    assert small.options.full_behavior == BlockNewItems(max_items=1000, max_size=50)
    assert unlimited.options.full_behavior == BlockNewItems(max_items=1000, max_size=None)
    assert large.options.full_behavior == BlockNewItems(max_items=2000, max_size=1500)


def test_default_policy_is_fresh_per_buffer() -> None:
    # P11: in Go the first buffer froze the shared default; here order does not matter.
    first = make(batch_size_max=100)
    second = make()
    third = make(batch_size_max=7)
    assert first.options.full_behavior == BlockNewItems(max_items=1000, max_size=500)
    assert second.options.full_behavior == BlockNewItems(max_items=1000, max_size=None)
    assert third.options.full_behavior == BlockNewItems(max_items=1000, max_size=35)


def test_two_buffers_do_not_share_state() -> None:
    opts = BufferOptions(batch_items_max=2)
    a: Buffer[str] = Buffer(opts)
    b: Buffer[str] = Buffer(opts)
    a.add(0.0, "a1")
    a.add(0.0, "a2")
    a.add(0.0, "a3")
    assert b.stats() == BufferStats()
    assert b.lease_one(100.0) is None
    b.add(0.0, "b1")
    b.flush(0.0)
    (bb,) = lease_all(b, 0.0)
    assert (bb.id, bb.data) == (1, ["b1"])  # ids are per buffer
    (ba1, ba2) = lease_all(a, 100.0)
    assert (ba1.id, ba1.data, ba2.id, ba2.data) == (1, ["a1", "a2"], 2, ["a3"])


def test_default_retry_is_exponential() -> None:
    buf = make(batch_items_max=1)
    buf.add(0.0, "x")
    b = buf.lease_one(0.0)
    assert b is not None
    assert buf.nack(1.0, b, RuntimeError("x")) is None
    assert buf.next_send_time() == pytest.approx(1.2)
    assert buf.lease_one(1.19) is None
    assert buf.lease_one(1.2) is b
    buf.nack(2.0, b)
    assert buf.next_send_time() == pytest.approx(2.24)


# =============================================================================================
# Item sizes
# =============================================================================================


@pytest.mark.parametrize(
    ("batch_size_max", "size", "error", "fragment"),
    [
        (None, -1, ItemTooSmall, "(got -1)"),
        (None, -100, ItemTooSmall, "(got -100)"),
        (10, -1, ItemTooSmall, "(got -1)"),
        (10, 0, ItemTooSmall, "(got 0)"),
        (10, 11, ItemTooLarge, "(got 11)"),
        (1, 2, ItemTooLarge, "(got 2)"),
    ],
)
def test_bad_item_sizes_are_rejected(
    batch_size_max: int | None, size: int, error: type[Exception], fragment: str
) -> None:
    buf = make(batch_size_max=batch_size_max)
    buf.add(0.0, "ok", 1)
    before = stats_tuple(buf)
    with pytest.raises(error) as info:
        buf.add(0.0, "bad", size)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)
    assert stats_tuple(buf) == before
    if batch_size_max is not None and size > batch_size_max:
        assert str(batch_size_max) in str(info.value)
    # nothing entered: the batch being filled still holds only "ok", and no id was used up
    buf.flush(0.0)
    (b,) = lease_all(buf, 0.0)
    assert (b.id, b.data) == (1, ["ok"])


@pytest.mark.parametrize(
    ("batch_size_max", "size"),
    [(None, 0), (None, 1), (None, 10**9), (10, 1), (10, 10), (1, 1)],
)
def test_good_item_sizes_are_accepted(batch_size_max: int | None, size: int) -> None:
    buf = make(batch_size_max=batch_size_max)
    assert buf.add(0.0, "x", size) is None
    assert buf.stats() == BufferStats(unleased_items=1, unleased_size=size)


def test_size_is_checked_before_fullness() -> None:
    buf = make(batch_size_max=10, full_behavior=BlockNewItems(max_items=None, max_size=10))
    buf.add(0.0, "a", 10)
    assert not buf.can_add()
    with pytest.raises(ItemTooSmall):
        buf.add(0.0, "b", 0)
    with pytest.raises(ItemTooLarge):
        buf.add(0.0, "b", 11)
    with pytest.raises(BufferFull):
        buf.add(0.0, "b", 1)


# =============================================================================================
# Batch cutting
# =============================================================================================


def test_cut_by_count() -> None:
    buf = make(batch_items_max=3, batch_age_max=10.0)
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    assert buf.lease_one(0.0) is None  # 2 of 3: still being filled
    buf.add(1.0, "c")  # the third item cuts the batch at once
    assert buf.next_send_time() == 1.0
    b = buf.lease_one(1.0)
    assert b is not None
    assert (b.id, b.data) == (1, ["a", "b", "c"])
    buf.add(1.0, "d")
    assert buf.lease_one(1.0) is None
    assert buf.stats().unleased_items == 1


def test_no_count_limit() -> None:
    buf = make(batch_items_max=None, full_behavior=InfiniteGrowth())
    for i in range(5000):
        buf.add(0.0, i)
    assert buf.lease_one(9.99) is None
    (b,) = lease_all(buf, 10.0)
    assert b.data == list(range(5000))


def test_cut_by_size_before_an_overflowing_item() -> None:
    buf = make(batch_size_max=10, batch_items_max=None)
    buf.add(0.0, "a", 4)
    buf.add(0.0, "b", 4)
    assert buf.lease_one(0.0) is None
    buf.add(2.0, "c", 4)  # 12 > 10: the partial batch is cut, "c" starts a new one
    b = buf.lease_one(2.0)
    assert b is not None
    assert (b.id, b.data) == (1, ["a", "b"])
    assert buf.lease_one(2.0) is None  # "c" is still being filled
    assert buf.stats() == BufferStats(1, 4, 2, 8)
    assert buf.next_send_time() == 12.0  # "c"'s batch was created at 2.0


def test_cut_when_size_is_reached_exactly() -> None:
    buf = make(batch_size_max=10, batch_items_max=None)
    buf.add(0.0, "a", 4)
    buf.add(0.0, "b", 6)  # exactly 10: cut at once
    b = buf.lease_one(0.0)
    assert b is not None
    assert b.data == ["a", "b"]


def test_exact_size_item_double_flush() -> None:
    # An item of size == batch_size_max cuts the partial batch, then itself.
    buf = make(batch_size_max=10, batch_items_max=None)
    buf.add(0.0, "a", 3)
    buf.add(1.0, "big", 10)
    assert buf.next_send_time() == 1.0
    b1 = buf.lease_one(1.0)
    b2 = buf.lease_one(1.0)
    assert b1 is not None
    assert b2 is not None
    assert (b1.id, b1.data, b2.id, b2.data) == (1, ["a"], 2, ["big"])
    assert buf.next_send_time() is None  # nothing left being filled
    buf.add(1.0, "c", 1)
    assert buf.lease_one(1.0) is None
    assert buf.stats().unleased_items == 1


def test_exact_size_item_into_empty_buffer() -> None:
    buf = make(batch_size_max=10)
    buf.add(0.0, "big", 10)
    buf.add(0.0, "small", 1)
    b = buf.lease_one(0.0)
    assert b is not None
    assert b.data == ["big"]
    assert buf.lease_one(0.0) is None


def test_cut_by_age_lazily_at_lease_time() -> None:
    buf = make(batch_age_max=5.0, batch_items_max=None)
    buf.add(0.0, "a")
    buf.add(4.0, "b")  # the deadline stays first item + age = 5.0
    assert buf.next_send_time() == 5.0
    assert buf.lease_one(4.999) is None
    # past the deadline but nobody leased: the batch keeps growing (P19)
    buf.add(6.0, "c")
    buf.add(7.0, "d")
    assert buf.stats().unleased_items == 4
    b = buf.lease_one(8.0)
    assert b is not None
    assert (b.id, b.data) == (1, ["a", "b", "c", "d"])
    buf.add(8.0, "e")  # a fresh batch with a fresh deadline
    assert buf.next_send_time() == 13.0
    assert buf.lease_one(12.9) is None
    b2 = buf.lease_one(13.0)
    assert b2 is not None
    assert (b2.id, b2.data) == (2, ["e"])


def test_aged_batch_keeps_growing_while_no_lease_is_free() -> None:
    buf = make(max_leases=1, batch_items_max=3, batch_age_max=1.0)
    buf.add(0.0, "a")
    first = buf.lease_one(1.0)
    assert first is not None
    buf.add(1.0, "b")
    assert buf.lease_one(5.0) is None  # aged, but the only lease is taken
    buf.add(5.0, "c")
    buf.ack(first)
    second = buf.lease_one(5.0)
    assert second is not None
    assert second.data == ["b", "c"]


def test_aged_batch_still_cut_by_count() -> None:
    buf = make(max_leases=1, batch_items_max=2, batch_age_max=1.0)
    buf.add(0.0, "x")
    held = buf.lease_one(1.0)
    assert held is not None
    for i, t in enumerate([2.0, 3.0, 4.0]):
        buf.add(t, i)
    buf.ack(held)
    b = buf.lease_one(4.0)
    assert b is not None
    assert b.data == [0, 1]


def test_cut_by_flush() -> None:
    buf = make(batch_age_max=10.0)
    buf.add(0.0, "a")
    buf.flush(2.0)
    assert buf.next_send_time() == 2.0
    assert buf.lease_one(1.9) is None
    b = buf.lease_one(2.0)
    assert b is not None
    assert b.data == ["a"]


def test_flush_without_current_batch_is_a_noop() -> None:
    buf = make()
    buf.flush(0.0)
    buf.flush(1.0)
    assert buf.next_send_time() is None
    assert buf.lease_one(100.0) is None
    buf.add(2.0, "a")
    buf.flush(2.0)
    buf.flush(3.0)  # double flush: no empty batch, no id used up
    buf.add(3.0, "b")
    buf.flush(3.0)
    b1, b2 = lease_all(buf, 3.0)
    assert (b1.id, b1.data, b2.id, b2.data) == (1, ["a"], 2, ["b"])
    assert buf.lease_one(100.0) is None


def test_items_keep_insertion_order_and_ids_increase() -> None:
    buf = make(batch_items_max=3, max_leases=100)
    for i in range(10):
        buf.add(float(i), i)
    buf.flush(10.0)
    batches = lease_all(buf, 10.0)
    assert [b.id for b in batches] == [1, 2, 3, 4]
    assert [x for b in batches for x in b.data] == list(range(10))


# =============================================================================================
# Ordering, FIFO, max_leases
# =============================================================================================


def test_retried_batch_is_overtaken_by_newer_data() -> None:
    buf = make(max_leases=2, batch_items_max=1, retry=retry.limited(5, 10.0))
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    a = buf.lease_one(0.0)
    assert a is not None
    assert a.id == 1
    buf.nack(1.0, a)  # next send 11.0
    buf.add(2.0, "c")
    b = buf.lease_one(2.0)
    c = buf.lease_one(3.0)
    assert b is not None
    assert c is not None
    assert (b.id, c.id) == (2, 3)
    buf.ack(b)
    buf.ack(c)
    assert buf.next_send_time() == 11.0
    assert buf.lease_one(10.9) is None
    again = buf.lease_one(11.0)
    assert again is a
    assert a.attempt == 2


def test_order_is_next_send_time_then_id() -> None:
    # batch 1 retries after 5 s, batch 2 after 1 s, batch 3 was cut at 0.0
    policy = RecordingRetry([5.0], [1.0], [])
    buf = make(max_leases=3, batch_items_max=1, retry=policy)
    for x in "abc":
        buf.add(0.0, x)
    b1 = buf.lease_one(0.0)
    b2 = buf.lease_one(0.0)
    assert b1 is not None
    assert b2 is not None
    buf.nack(0.0, b1)  # ready at 5.0
    buf.nack(0.0, b2)  # ready at 1.0
    got = [buf.lease_one(10.0) for _ in range(3)]
    assert [b.id for b in got if b is not None] == [3, 2, 1]


def test_due_retry_goes_before_a_batch_cut_later() -> None:
    buf = make(max_leases=1, batch_items_max=1, retry=retry.limited(1, 1.0))
    buf.add(0.0, "a")
    a = buf.lease_one(0.0)
    assert a is not None
    buf.nack(0.0, a)  # ready at 1.0
    buf.add(5.0, "b")  # cut at 5.0
    assert buf.lease_one(5.0) is a  # (1.0, id 1) before (5.0, id 2)


def test_batch_cut_earlier_goes_before_a_later_retry() -> None:
    buf = make(max_leases=1, batch_items_max=1, retry=retry.limited(1, 3.0))
    buf.add(0.0, "a")
    a = buf.lease_one(0.0)
    assert a is not None
    buf.add(1.0, "b")  # cut at 1.0
    buf.nack(1.0, a)  # ready at 4.0
    buf.add(2.0, "c")  # cut at 2.0
    got = [buf.lease_one(10.0) for _ in range(3)]
    assert [b.data for b in got if b is not None] == [["b"]]  # max_leases=1


def test_ties_in_send_time_go_to_the_lower_id() -> None:
    policy = RecordingRetry([2.0], [2.0])
    buf = make(max_leases=2, batch_items_max=1, retry=policy)
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    b1 = buf.lease_one(0.0)
    b2 = buf.lease_one(0.0)
    assert b1 is not None
    assert b2 is not None
    buf.nack(1.0, b2)  # both ready at 3.0
    buf.nack(1.0, b1)
    first = buf.lease_one(3.0)
    assert first is b1


def test_ready_queued_batch_beats_aged_current_batch() -> None:
    buf = make(max_leases=1, batch_items_max=2, batch_age_max=1.0)
    buf.add(0.0, "a")
    buf.add(0.0, "b")  # batch 1, cut at 0.0
    buf.add(0.5, "c")  # batch 2, deadline 1.5
    b = buf.lease_one(2.0)
    assert b is not None
    assert b.id == 1


def test_fifo_retry_holds_back_every_later_batch() -> None:
    buf = make(max_leases=1, fifo=True, batch_items_max=1, retry=retry.limited(3, 10.0))
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    a = buf.lease_one(0.0)
    assert a is not None
    assert a.id == 1
    buf.nack(1.0, a)  # next send 11.0
    assert buf.lease_one(2.0) is None  # "b" is ready but must wait behind "a"
    assert buf.lease_one(10.99) is None
    assert buf.next_send_time() == 11.0
    assert buf.lease_one(11.0) is a
    buf.ack(a)
    b = buf.lease_one(11.0)
    assert b is not None
    assert b.data == ["b"]


def test_fifo_retry_holds_back_an_aged_current_batch() -> None:
    # Strict FIFO: the aged batch being filled must not jump the queue either.
    buf = make(
        max_leases=1, fifo=True, batch_items_max=2, batch_age_max=5.0, retry=retry.limited(3, 10.0)
    )
    buf.add(0.0, "a0")
    buf.add(0.0, "a1")  # batch 1, cut
    a = buf.lease_one(0.0)
    assert a is not None
    buf.nack(1.0, a)  # next send 11.0
    buf.add(2.0, "c")  # batch 2 being filled, deadline 7.0
    assert buf.lease_one(8.0) is None
    assert buf.next_send_time() == 11.0  # not 7.0: the current batch is not due first
    assert buf.stats().unleased_items == 3
    assert buf.lease_one(11.0) is a
    assert a.attempt == 2
    buf.ack(a)
    c = buf.lease_one(11.0)
    assert c is not None
    assert (c.id, c.data) == (2, ["c"])


def test_without_fifo_the_aged_current_batch_overtakes_the_retry() -> None:
    # The same story as above without fifo: the control for the FIFO test.
    buf = make(max_leases=1, batch_items_max=2, batch_age_max=5.0, retry=retry.limited(3, 10.0))
    buf.add(0.0, "a0")
    buf.add(0.0, "a1")
    a = buf.lease_one(0.0)
    assert a is not None
    buf.nack(1.0, a)
    buf.add(2.0, "c")
    assert buf.next_send_time() == 7.0
    c = buf.lease_one(8.0)
    assert c is not None
    assert c.data == ["c"]


def test_fifo_leases_by_id_not_by_send_time() -> None:
    policy = RecordingRetry([1.0], [])
    buf = make(max_leases=1, fifo=True, batch_items_max=1, retry=policy)
    buf.add(0.0, "a")
    a = buf.lease_one(0.0)
    assert a is not None
    buf.add(0.5, "b")  # batch 2, cut at 0.5
    buf.nack(0.5, a)  # batch 1 ready at 1.5, after batch 2
    assert buf.lease_one(1.0) is None
    assert buf.lease_one(1.5) is a


def test_max_leases() -> None:
    buf = make(max_leases=2, batch_items_max=1)
    for x in "abcd":
        buf.add(0.0, x)
    b1 = buf.lease_one(0.0)
    b2 = buf.lease_one(0.0)
    assert b1 is not None
    assert b2 is not None
    assert buf.leased == 2
    assert buf.lease_one(0.0) is None
    assert buf.next_send_time() == 0.0  # due, although nothing can be leased now
    buf.ack(b1)
    b3 = buf.lease_one(0.0)
    assert b3 is not None
    assert b3.data == ["c"]
    assert buf.lease_one(0.0) is None
    buf.nack(0.0, b2)  # a nack frees the slot too
    b4 = buf.lease_one(0.0)
    assert b4 is not None
    assert b4.data == ["d"]


def test_lease_one_on_empty_buffer() -> None:
    buf = make()
    assert buf.lease_one(0.0) is None
    assert buf.lease_one(1e9) is None
    assert buf.next_send_time() is None


def test_lease_moves_accounting_from_unleased_to_leased() -> None:
    buf = make(batch_items_max=2, batch_size_max=10)
    buf.add(0.0, "a", 3)
    buf.add(0.0, "b", 4)
    buf.add(0.0, "c", 5)
    assert stats_tuple(buf) == (3, 12, 0, 0)
    b = buf.lease_one(0.0)
    assert b is not None
    assert stats_tuple(buf) == (1, 5, 2, 7)
    buf.ack(b)
    assert stats_tuple(buf) == (1, 5, 0, 0)


def test_next_send_time() -> None:
    buf = make(batch_items_max=2, batch_age_max=5.0, retry=retry.limited(1, 20.0))
    assert buf.next_send_time() is None
    buf.add(1.0, "a")
    assert buf.next_send_time() == 6.0  # the deadline of the batch being filled
    buf.add(2.0, "b")  # cut at 2.0
    assert buf.next_send_time() == 2.0
    buf.add(3.0, "c")  # new current, deadline 8.0; queued batch still first
    assert buf.next_send_time() == 2.0
    b = buf.lease_one(3.0)
    assert b is not None
    assert buf.next_send_time() == 8.0
    buf.nack(3.0, b)  # ready at 23.0
    assert buf.next_send_time() == 8.0


def test_attempt_counts_leases() -> None:
    buf = make(batch_items_max=1, retry=retry.limited(5, 0.0))
    buf.add(0.0, "a")
    b = buf.lease_one(0.0)
    assert b is not None
    assert b.attempt == 1
    for expected in (2, 3, 4):
        buf.nack(0.0, b)
        assert buf.lease_one(0.0) is b
        assert b.attempt == expected
    buf.ack(b)
    assert b.attempt == 4


def test_force_lease_all() -> None:
    buf = make(max_leases=1, batch_items_max=1, retry=retry.limited(1, 100.0))
    for x in "abc":
        buf.add(0.0, x)
    a = buf.lease_one(0.0)
    assert a is not None
    buf.nack(0.0, a)  # not due before 100.0
    buf.add(1.0, "d")  # batch 4 is cut too (batch_items_max=1)
    got = buf.force_lease_all()
    assert [b.id for b in got] == [1, 2, 3, 4]  # ignores send times and max_leases; by id
    assert got[0] is a
    assert a.attempt == 2
    assert [b.attempt for b in got[1:]] == [1, 1, 1]
    assert buf.leased == 4
    assert buf.stats() == BufferStats(leased_items=4)
    assert buf.force_lease_all() == []
    for b in got:
        buf.ack(b)
    assert buf.stats().empty


def test_force_lease_all_leaves_the_current_batch() -> None:
    buf = make(batch_items_max=3)
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    assert buf.force_lease_all() == []
    assert buf.stats().unleased_items == 2
    buf.flush(0.0)
    (b,) = buf.force_lease_all()
    assert b.data == ["a", "b"]


# =============================================================================================
# ack / nack
# =============================================================================================


def test_ack_forgets_the_batch() -> None:
    buf = make(batch_items_max=1)
    buf.add(0.0, "a")
    b = buf.lease_one(0.0)
    assert b is not None
    buf.ack(b)
    assert buf.stats() == BufferStats()
    assert buf.leased == 0
    assert buf.lease_one(1e9) is None


def _leased(buf: Buffer[Any]) -> Batch[Any]:
    buf.add(0.0, "a")
    buf.flush(0.0)
    b = buf.lease_one(0.0)
    assert b is not None
    return b


def test_double_ack_raises() -> None:
    buf = make()
    b = _leased(buf)
    buf.ack(b)
    with pytest.raises(ProcDispatchError, match="not leased"):
        buf.ack(b)


def test_ack_of_unknown_batch_raises() -> None:
    buf = make()
    with pytest.raises(ProcDispatchError, match="not leased"):
        buf.ack(Batch(["x"]))
    with pytest.raises(ProcDispatchError, match="not leased"):
        buf.nack(0.0, Batch(["x"], id=1))


def test_ack_of_another_buffers_batch_raises() -> None:
    mine = make()
    other = make()
    b_mine = _leased(mine)
    b_other = _leased(other)
    assert b_mine.id == b_other.id
    with pytest.raises(ProcDispatchError):
        mine.ack(b_other)
    mine.ack(b_mine)  # my lease was not disturbed


def test_nack_after_ack_raises() -> None:
    buf = make()
    b = _leased(buf)
    buf.ack(b)
    with pytest.raises(ProcDispatchError, match="not leased"):
        buf.nack(0.0, b, RuntimeError("x"))
    assert buf.stats() == BufferStats()


def test_double_nack_and_ack_after_nack_raise() -> None:
    buf = make(retry=retry.limited(3, 1.0))
    b = _leased(buf)
    buf.nack(0.0, b)
    with pytest.raises(ProcDispatchError):
        buf.nack(0.0, b)
    with pytest.raises(ProcDispatchError):
        buf.ack(b)
    assert buf.stats() == BufferStats(unleased_items=1)


def test_ack_of_a_dropped_batch_raises() -> None:
    buf = make(batch_items_max=1, full_behavior=DropOldestBatch(max_live_items=1))
    buf.add(0.0, "a")
    dropped = buf.add(0.0, "b")
    assert dropped is not None
    with pytest.raises(ProcDispatchError):
        buf.ack(dropped)


def test_nack_requeues_after_the_delay() -> None:
    buf = make(batch_items_max=2, batch_size_max=10, retry=retry.limited(2, 3.0))
    buf.add(0.0, "a", 2)
    buf.add(0.0, "b", 3)
    b = buf.lease_one(0.0)
    assert b is not None
    b.meta = {"nonce": 7}
    assert buf.nack(1.0, b, RuntimeError("boom")) is None
    assert stats_tuple(buf) == (2, 5, 0, 0)
    assert buf.lease_one(3.99) is None
    again = buf.lease_one(4.0)
    assert again is b
    assert again.meta == {"nonce": 7}  # the same object: meta survives
    assert again.data == ["a", "b"]
    assert stats_tuple(buf) == (0, 0, 2, 5)


def test_nack_shrinks_accounting_when_send_removed_items() -> None:
    buf = make(batch_items_max=4, batch_size_max=100, retry=retry.limited(5, 1.0))
    for x in "abcd":
        buf.add(0.0, x, 5)
    b = buf.lease_one(0.0)
    assert b is not None
    assert stats_tuple(buf) == (0, 0, 4, 20)
    del b.data[:2]  # the send delivered two items, then failed
    assert stats_tuple(buf) == (0, 0, 4, 20)  # nothing changes until the nack
    assert buf.nack(0.0, b) is None
    assert b.item_count == 2
    assert stats_tuple(buf) == (2, 10, 0, 0)
    assert buf.lease_one(1.0) is b
    assert stats_tuple(buf) == (0, 0, 2, 10)
    b.data.pop()
    buf.nack(1.0, b)
    assert stats_tuple(buf) == (1, 5, 0, 0)


def test_nack_shrinks_size_with_mixed_item_sizes() -> None:
    buf = make(batch_items_max=4, batch_size_max=100, retry=retry.limited(5, 1.0))
    for x, size in zip("abcd", [1, 2, 3, 4], strict=True):
        buf.add(0.0, x, size)
    b = buf.lease_one(0.0)
    assert b is not None
    b.data[:] = ["b", "c"]  # sizes 2 + 3 are left
    buf.nack(0.0, b)
    s = buf.stats()
    assert s.unleased_items == 2
    assert 5 <= s.unleased_size < 10  # smaller; never below what is really left


def test_growing_data_never_increases_accounting() -> None:
    buf = make(batch_items_max=3, batch_size_max=100, retry=retry.limited(5, 1.0))
    for x in "abc":
        buf.add(0.0, x, 4)
    b = buf.lease_one(0.0)
    assert b is not None
    b.data.extend(["x", "y", "z"])
    buf.nack(0.0, b)
    assert b.item_count == 3
    assert stats_tuple(buf) == (3, 12, 0, 0)
    assert buf.lease_one(1.0) is b
    assert stats_tuple(buf) == (0, 0, 3, 12)
    b.data[:] = ["only"]  # replaced by fewer items: counted items shrink
    buf.nack(1.0, b)
    assert b.item_count == 1
    assert buf.stats().unleased_items == 1
    assert buf.stats().unleased_size <= 4


def test_batch_emptied_by_send_is_finished_not_requeued() -> None:
    policy = RecordingRetry([1.0, 1.0, 1.0])
    buf = make(batch_items_max=2, batch_size_max=10, retry=policy)
    buf.add(0.0, "a", 3)
    buf.add(0.0, "b", 3)
    b = buf.lease_one(0.0)
    assert b is not None
    b.data.clear()
    assert buf.nack(0.0, b, RuntimeError("late failure")) is None
    assert buf.stats() == BufferStats()
    assert buf.stats().empty
    assert buf.next_send_time() is None
    assert buf.lease_one(1e9) is None
    assert all(taken == [] for taken in policy.taken)  # no retry delay was consumed
    with pytest.raises(ProcDispatchError):
        buf.ack(b)


def test_retry_delays_come_from_each_batchs_own_iterator() -> None:
    # Every batch gets a fresh iterator from the factory: a shared one would hand b2 the 11.
    policy = RecordingRetry([10.0, 11.0], [10.0, 11.0])
    buf = make(max_leases=2, batch_items_max=1, retry=policy)
    buf.add(0.0, "one")
    buf.add(0.0, "two")
    b1 = buf.lease_one(0.0)
    b2 = buf.lease_one(0.0)
    assert b1 is not None
    assert b2 is not None
    buf.nack(0.0, b1)  # b1's first delay: 10
    buf.nack(1.0, b2)  # b2's first delay: 10 as well -> 11
    assert buf.next_send_time() == 10.0
    assert buf.lease_one(10.0) is b1
    buf.nack(10.0, b1)  # b1's second delay: 11 -> 21
    assert buf.next_send_time() == 11.0
    assert buf.lease_one(11.0) is b2
    buf.nack(11.0, b2)  # b2's second: 11 -> 22
    assert buf.next_send_time() == 21.0
    assert buf.lease_one(21.0) is b1
    assert buf.nack(21.0, b1) is b1  # b1 exhausted...
    assert buf.next_send_time() == 22.0  # ...b2 not
    assert buf.lease_one(22.0) is b2
    assert buf.nack(22.0, b2) is b2
    assert policy.calls == 2  # one iterator per batch, none made for retries
    assert policy.taken == [[10.0, 11.0], [10.0, 11.0]]


def test_retry_exhaustion_returns_the_batch_for_dropping() -> None:
    buf = make(batch_items_max=3, batch_size_max=10, retry=retry.limited(2, 0.0))
    buf.add(0.0, "a", 1)
    buf.add(0.0, "b", 2)
    buf.flush(0.0)
    b = buf.lease_one(0.0)
    assert b is not None
    assert buf.nack(0.0, b) is None  # retry 1
    assert buf.lease_one(0.0) is b
    assert buf.nack(0.0, b) is None  # retry 2
    assert buf.lease_one(0.0) is b
    b.data.remove("a")  # this attempt delivered "a"
    assert buf.nack(0.0, b) is b  # exhausted: handed back, for on_drop
    assert b.data == ["b"]
    assert buf.stats() == BufferStats()
    assert buf.lease_one(1e9) is None
    with pytest.raises(ProcDispatchError):
        buf.ack(b)


def test_retry_none_drops_at_first_nack() -> None:
    buf = make(retry=retry.none())
    b = _leased(buf)
    assert buf.nack(0.0, b, RuntimeError("x")) is b
    assert buf.stats().empty


# =============================================================================================
# Full behaviours
# =============================================================================================


def test_block_new_items_by_count_in_flight_counts() -> None:
    buf = make(batch_items_max=2, full_behavior=BlockNewItems(max_items=3))
    for x in "abc":
        assert buf.can_add()
        buf.add(0.0, x)
    assert not buf.can_add()
    with pytest.raises(BufferFull, match="buffer is full"):
        buf.add(0.0, "d")
    assert buf.stats().total == 3
    b = buf.lease_one(0.0)
    assert b is not None
    assert not buf.can_add()  # in-flight items still count
    with pytest.raises(BufferFull):
        buf.add(0.0, "d")
    buf.ack(b)
    assert buf.can_add()
    buf.add(0.0, "d")
    buf.flush(0.0)
    assert [x for bb in lease_all(buf, 0.0) for x in bb.data] == ["c", "d"]


def test_block_new_items_full_changes_nothing() -> None:
    buf = make(batch_items_max=5, full_behavior=BlockNewItems(max_items=5))
    for i in range(4):
        buf.add(0.0, i)
    buf.add(0.0, 4)  # cuts batch 1
    with pytest.raises(BufferFull):
        buf.add(1.0, "late")
    assert buf.stats() == BufferStats(unleased_items=5)
    assert buf.next_send_time() == 0.0  # no batch was started for "late"
    b = buf.lease_one(0.0)
    assert b is not None
    buf.ack(b)
    buf.add(2.0, "next")
    buf.flush(2.0)
    (b2,) = lease_all(buf, 2.0)
    assert b2.id == 2  # the refused add used up no id


def test_block_new_items_by_size_is_a_soft_cap() -> None:
    buf = make(batch_size_max=10, full_behavior=BlockNewItems(max_items=None, max_size=10))
    buf.add(0.0, "a", 9)
    assert buf.can_add()  # 9 < 10
    buf.add(0.0, "b", 10)  # allowed: the total is checked before the insert, overshoot to 19
    assert buf.stats().total_size == 19
    assert not buf.can_add()
    with pytest.raises(BufferFull):
        buf.add(0.0, "c", 1)
    b = buf.lease_one(0.0)
    assert b is not None
    assert b.data == ["a"]
    assert not buf.can_add()  # 10 left, still >= 10
    buf.ack(b)
    assert not buf.can_add()
    b2 = buf.lease_one(0.0)
    assert b2 is not None
    buf.ack(b2)
    assert buf.can_add()


def test_block_new_items_size_limit_reached_exactly() -> None:
    buf = make(batch_size_max=5, batch_items_max=None, full_behavior=BlockNewItems(max_size=10))
    buf.add(0.0, "a", 5)
    buf.add(0.0, "b", 5)
    assert not buf.can_add()
    with pytest.raises(BufferFull):
        buf.add(0.0, "c", 1)


def test_block_new_items_either_limit_blocks() -> None:
    buf = make(batch_size_max=10, full_behavior=BlockNewItems(max_items=1000, max_size=10))
    buf.add(0.0, "a", 10)
    assert not buf.can_add()
    buf2 = make(
        batch_items_max=2, batch_size_max=10, full_behavior=BlockNewItems(max_items=2, max_size=10)
    )
    buf2.add(0.0, "a", 1)
    buf2.add(0.0, "b", 1)
    assert not buf2.can_add()


def test_nack_requeue_ignores_capacity() -> None:
    buf = make(batch_items_max=1, full_behavior=BlockNewItems(max_items=2), retry=retry.limited(1))
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    b = buf.lease_one(0.0)
    assert b is not None
    assert buf.nack(0.0, b) is None  # never raises BufferFull
    assert buf.stats() == BufferStats(unleased_items=2)


def test_drop_oldest_drops_the_oldest_queued_batch() -> None:
    buf = make(batch_items_max=2, full_behavior=DropOldestBatch(max_live_items=4))
    for x in "abcd":
        assert buf.add(0.0, x) is None
    assert buf.can_add()  # never blocks
    dropped = buf.add(0.0, "e")  # 4 >= 4: drop first
    assert dropped is not None
    assert (dropped.id, dropped.data) == (1, ["a", "b"])
    assert buf.stats().total == 3
    b = buf.lease_one(0.0)
    assert b is not None
    assert b.data == ["c", "d"]


def test_drop_oldest_picks_the_lowest_id_even_when_it_is_retrying() -> None:
    buf = make(
        batch_items_max=1,
        max_leases=2,
        full_behavior=DropOldestBatch(max_live_items=3),
        retry=retry.limited(1, 50.0),
    )
    buf.add(0.0, "a")
    a = buf.lease_one(0.0)
    assert a is not None
    buf.nack(0.0, a)  # re-queued with its old id, ready at 50
    buf.add(1.0, "b")
    buf.add(1.0, "c")
    dropped = buf.add(1.0, "d")
    assert dropped is a


def test_drop_oldest_never_drops_a_leased_batch() -> None:
    buf = make(batch_items_max=1, max_leases=4, full_behavior=DropOldestBatch(max_live_items=2))
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    a = buf.lease_one(0.0)
    assert a is not None
    dropped = buf.add(0.0, "c")
    assert dropped is not None
    assert dropped.data == ["b"]  # not "a", which is in flight
    assert buf.leased == 1
    buf.ack(a)  # the lease is intact


def test_drop_oldest_falls_back_to_the_current_batch() -> None:
    buf = make(batch_items_max=2, max_leases=4, full_behavior=DropOldestBatch(max_live_items=3))
    buf.add(0.0, "a")
    buf.add(0.0, "b")  # batch 1 cut
    b1 = buf.lease_one(0.0)
    assert b1 is not None
    buf.add(1.0, "c")  # batch 2 being filled
    dropped = buf.add(2.0, "d")  # total 3: nothing queued, so the current batch goes
    assert dropped is not None
    assert (dropped.id, dropped.data) == (2, ["c"])
    assert buf.stats() == BufferStats(unleased_items=1, leased_items=2)
    buf.flush(2.0)
    b3 = buf.lease_one(2.0)
    assert b3 is not None
    assert (b3.id, b3.data) == (3, ["d"])


def test_drop_oldest_accepts_without_dropping_when_all_is_in_flight() -> None:
    buf = make(batch_items_max=1, max_leases=4, full_behavior=DropOldestBatch(max_live_items=2))
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    assert len(lease_all(buf, 0.0)) == 2
    assert buf.add(0.0, "c") is None  # nothing that is not in flight to drop: the item goes in
    assert buf.stats() == BufferStats(unleased_items=1, leased_items=2)


def test_drop_oldest_p7_reproduction_does_not_raise() -> None:
    # The reference panics here ("NO undropped data"); this buffer accepts the item.
    buf = make(batch_items_max=1, max_leases=2, full_behavior=DropOldestBatch(max_live_items=1))
    assert buf.add(0.0, "A") is None
    a = buf.lease_one(0.0)
    assert a is not None
    assert buf.add(0.0, "B") is None  # A is in flight: not dropped
    b = buf.lease_one(0.0)
    assert b is not None
    buf.ack(b)
    assert buf.add(0.0, "C") is None  # A alone keeps total >= 1, and there is nothing to drop
    dropped = buf.add(0.0, "D")  # C is queued now: it is the one dropped
    assert dropped is not None
    assert dropped.data == ["C"]
    buf.ack(a)
    d = buf.lease_one(0.0)
    assert d is not None
    assert d.data == ["D"]


def test_drop_oldest_by_size() -> None:
    buf = make(
        batch_size_max=10,
        batch_items_max=None,
        full_behavior=DropOldestBatch(max_live_items=None, max_live_size=10),
    )
    assert buf.add(0.0, "a", 6) is None
    assert buf.add(0.0, "b", 5) is None  # 6 + 5 > 10: "a" is cut; total size 11, checked before
    dropped = buf.add(0.0, "c", 4)  # 11 >= 10: drop the oldest
    assert dropped is not None
    assert dropped.data == ["a"]
    assert buf.stats() == BufferStats(unleased_items=2, unleased_size=9)


def test_drop_oldest_returned_batch_is_out_of_the_buffer() -> None:
    buf = make(batch_items_max=1, max_leases=10, full_behavior=DropOldestBatch(max_live_items=1))
    buf.add(0.0, "a")
    dropped = buf.add(0.0, "b")
    assert dropped is not None
    assert dropped.data == ["a"]
    assert [b.data for b in lease_all(buf, 0.0)] == [["b"]]


def test_infinite_growth_never_blocks_or_drops() -> None:
    buf = make(batch_items_max=1, full_behavior=InfiniteGrowth())
    for i in range(3000):
        assert buf.can_add()
        assert buf.add(0.0, i) is None
    assert buf.stats().total == 3000


# =============================================================================================
# stats / can_add
# =============================================================================================


def test_stats_snapshot() -> None:
    buf = make(batch_items_max=2, max_leases=4)
    assert buf.stats() == BufferStats(0, 0, 0, 0)
    assert buf.stats().empty
    buf.add(0.0, "a", 3)  # sizes are tracked even without batch_size_max
    buf.add(0.0, "b", 4)
    buf.add(0.0, "c", 5)
    s = buf.stats()
    assert (s.unleased_items, s.unleased_size, s.leased_items, s.leased_size) == (3, 12, 0, 0)
    b = buf.lease_one(0.0)
    assert b is not None
    s2 = buf.stats()
    assert (s2.unleased_items, s2.unleased_size, s2.leased_items, s2.leased_size) == (1, 5, 2, 7)
    assert (s2.total, s2.total_size, s2.empty) == (3, 12, False)
    assert s == BufferStats(3, 12, 0, 0)  # a snapshot: the earlier one did not change
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.unleased_items = 0  # type: ignore[misc]


def test_stats_properties() -> None:
    s = BufferStats(unleased_items=2, unleased_size=7, leased_items=3, leased_size=11)
    assert s.total == 5
    assert s.total_size == 18
    assert not s.empty
    assert BufferStats().empty
    assert BufferStats(unleased_size=3).empty  # counts only


def test_can_add_per_policy() -> None:
    assert make(full_behavior=InfiniteGrowth()).can_add()
    drop = make(batch_items_max=1, full_behavior=DropOldestBatch(max_live_items=1))
    drop.add(0.0, "a")
    assert drop.can_add()
    block = make(batch_items_max=1, full_behavior=BlockNewItems(max_items=1))
    assert block.can_add()
    block.add(0.0, "a")
    assert not block.can_add()


# =============================================================================================
# add_many
# =============================================================================================


def _drain_record(buf: Buffer[Any]) -> list[tuple[int, list[Any]]]:
    buf.flush(1e6)
    return [(b.id, list(b.data)) for b in buf.force_lease_all()]


EQUIVALENCE_CASES = [
    pytest.param({"batch_items_max": 3}, None, id="block-bulk"),
    pytest.param(
        {"batch_items_max": 3, "full_behavior": BlockNewItems(max_items=7)}, None, id="block-cap"
    ),
    pytest.param({"batch_items_max": None}, None, id="block-no-count-limit"),
    pytest.param(
        {"batch_items_max": 3, "batch_size_max": 6, "full_behavior": BlockNewItems(max_size=12)},
        [1, 2, 3, 6, 1, 1, 4, 2, 5, 1, 3, 3],
        id="block-sizes",
    ),
    pytest.param(
        {"batch_items_max": 2, "full_behavior": DropOldestBatch(max_live_items=5)},
        None,
        id="drop",
    ),
    pytest.param(
        {
            "batch_items_max": 4,
            "batch_size_max": 5,
            "full_behavior": DropOldestBatch(max_live_items=None, max_live_size=9),
        },
        [5, 1, 2, 3, 1, 4, 4, 1, 2, 2, 5, 1],
        id="drop-sizes",
    ),
    pytest.param({"batch_items_max": 4, "full_behavior": InfiniteGrowth()}, None, id="infinite"),
    pytest.param(
        {"batch_items_max": 4, "full_behavior": InfiniteGrowth()},
        [0, 3, 1, 0, 2, 2, 0, 9, 1, 1, 0, 0],
        id="infinite-sizes",
    ),
]


@pytest.mark.parametrize(("kwargs", "sizes"), EQUIVALENCE_CASES)
@pytest.mark.parametrize("prefill", [0, 1, 2])
def test_add_many_equals_repeated_add(
    kwargs: dict[str, Any], sizes: list[int] | None, prefill: int
) -> None:
    items = list(range(100, 112))
    one: Buffer[int] = make(**kwargs)
    many: Buffer[int] = make(**kwargs)
    pre_size = 1 if "batch_size_max" in kwargs else 0
    for buf in (one, many):
        for i in range(prefill):
            buf.add(0.0, i, pre_size)
        if prefill:
            leased = buf.lease_one(100.0)  # an in-flight batch counts too
            assert leased is not None

    dropped_one: list[Batch[int]] = []
    count_one = 0
    for i, item in enumerate(items):
        try:
            d = one.add(1.0, item, sizes[i] if sizes is not None else 0)
        except BufferFull:
            break
        count_one += 1
        if d is not None:
            dropped_one.append(d)

    count_many, dropped_many = many.add_many(1.0, items, sizes)
    assert count_many == count_one
    assert [(d.id, d.data) for d in dropped_many] == [(d.id, d.data) for d in dropped_one]
    assert many.stats() == one.stats()
    assert many.can_add() == one.can_add()
    assert many.next_send_time() == one.next_send_time()
    assert _drain_record(many) == _drain_record(one)


def test_add_many_stops_at_capacity_and_returns_the_count() -> None:
    buf = make(batch_items_max=2, full_behavior=BlockNewItems(max_items=5))
    buf.add(0.0, "x")
    count, dropped = buf.add_many(0.0, list(range(10)))
    assert (count, dropped) == (4, [])
    assert buf.stats().total == 5
    assert not buf.can_add()
    assert buf.add_many(0.0, [99]) == (0, [])
    assert buf.stats().total == 5


def test_add_many_with_sizes_stops_at_size_capacity() -> None:
    buf = make(batch_size_max=5, full_behavior=BlockNewItems(max_items=None, max_size=8))
    count, _ = buf.add_many(0.0, ["a", "b", "c", "d"], [4, 3, 2, 1])
    assert count == 3  # 0 < 8, 4 < 8, 7 < 8 -> 9; then full
    assert buf.stats().total_size == 9


def test_add_many_empty() -> None:
    assert make().add_many(0.0, []) == (0, [])
    assert make(batch_size_max=3).add_many(0.0, []) == (0, [])


def test_add_many_checks_every_size_before_adding_anything() -> None:
    buf = make(batch_size_max=5)
    with pytest.raises(ItemTooLarge):
        buf.add_many(0.0, ["a", "b", "c"], [1, 2, 6])
    with pytest.raises(ItemTooSmall):
        buf.add_many(0.0, ["a", "b", "c"], [1, 0, 1])
    with pytest.raises(ItemTooSmall):
        buf.add_many(0.0, ["a", "b"])  # no sizes means size 0, refused with batch_size_max
    assert buf.stats() == BufferStats()
    assert buf.next_send_time() is None


def test_add_many_sizes_must_match_items() -> None:
    buf = make()
    with pytest.raises(ValueError, match="sizes must be as long as items"):
        buf.add_many(0.0, ["a", "b"], [1])
    assert buf.stats() == BufferStats()


def test_add_many_drop_oldest_returns_dropped_batches_in_order() -> None:
    buf = make(batch_items_max=2, full_behavior=DropOldestBatch(max_live_items=2))
    count, dropped = buf.add_many(0.0, list(range(7)))
    assert count == 7
    assert [(d.id, d.data) for d in dropped] == [(1, [0, 1]), (2, [2, 3]), (3, [4, 5])]
    assert buf.stats().total == 1


# =============================================================================================
# add_synthetic
# =============================================================================================


def test_add_synthetic_gives_a_one_item_batch() -> None:
    buf = make(batch_size_max=10)  # size 0 would be refused for a real item
    assert buf.add_synthetic(3.0) is None
    assert buf.stats() == BufferStats(unleased_items=1)
    assert buf.next_send_time() == 3.0  # ready at once
    b = buf.lease_one(3.0)
    assert b is not None
    assert b.data == [None]
    assert b.synthetic is True
    assert (b.id, b.attempt) == (1, 1)
    buf.ack(b)
    assert buf.stats().empty


def test_add_synthetic_does_not_mix_with_real_items() -> None:
    buf = make(batch_items_max=5)
    buf.add(0.0, "real")
    buf.add_synthetic(1.0)
    buf.add(1.0, "later")
    buf.flush(1.0)
    got = lease_all(buf, 1.0)
    assert [(b.id, b.data, b.synthetic) for b in got] == [
        (1, ["real"], False),
        (2, [None], True),
        (3, ["later"], False),
    ]


def test_real_batches_are_not_synthetic() -> None:
    buf = make()
    b = _leased(buf)
    assert b.synthetic is False
    assert b.meta is None


# =============================================================================================
# ready / release / total (coordinator helpers)
# =============================================================================================


def test_ready_predicts_lease_one() -> None:
    buf = make(max_leases=1, batch_items_max=2, batch_age_max=5.0)
    assert not buf.ready(0.0)
    buf.add(0.0, "a")
    assert not buf.ready(4.9)
    assert buf.ready(5.0)  # the batch being filled is due
    b = buf.lease_one(5.0)
    assert b is not None
    buf.add(5.0, "b")
    buf.add(5.0, "c")  # cut
    assert not buf.ready(5.0)  # due, but the only lease is taken
    buf.ack(b)
    assert buf.ready(5.0)


def test_ready_respects_strict_fifo() -> None:
    buf = make(max_leases=1, fifo=True, batch_items_max=2, batch_age_max=1.0)
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    a = buf.lease_one(0.0)
    assert a is not None
    buf.nack(0.0, a)  # default retry: 0.2 s
    buf.add(0.0, "c")  # due at 1.0 but behind "a"
    assert not buf.ready(0.1)
    assert buf.ready(0.2)


def test_release_requeues_without_counting_an_attempt() -> None:
    buf = make(max_leases=1, batch_items_max=1, batch_size_max=10)
    buf.add(0.0, "a", 3)
    buf.add(1.0, "b", 4)
    a = buf.lease_one(1.0)
    assert a is not None
    assert a.attempt == 1
    buf.release(a)
    assert a.attempt == 0
    assert buf.leased == 0
    assert buf.stats() == BufferStats(unleased_items=2, unleased_size=7)
    again = buf.lease_one(1.0)  # queued again where it was: still first
    assert again is a
    assert a.attempt == 1
    with pytest.raises(ProcDispatchError):
        buf.release(Batch(["x"], id=2))


def test_total_property() -> None:
    buf = make(batch_items_max=2)
    buf.add(0.0, "a")
    buf.add(0.0, "b")
    buf.add(0.0, "c")
    assert buf.lease_one(0.0) is not None
    assert buf.total == buf.stats().total == 3
