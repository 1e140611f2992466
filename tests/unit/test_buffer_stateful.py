"""Stateful property test of the pure buffer against a model ledger.

Hypothesis drives random add / add_many / flush / lease / ack / nack / release / time-advance
sequences (plus deliberate misuse: ack or nack of a finished batch) over
randomly drawn valid options (all three full behaviours, fifo on and off, sizes on and off). The
model keeps one ledger entry per added item -- unleased, leased, dropped or delivered (acked, or
removed from ``data`` by a send that then failed) -- and after every step the buffer's
statistics must match it exactly.

Items are consecutive ints (the n-th accepted item is ``n``), which makes "batches hold
consecutive items in order, and ids grow with age" easy to check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from procdispatch import retry
from procdispatch.buffer import (
    DERIVED,
    Batch,
    BlockNewItems,
    Buffer,
    BufferOptions,
    DropOldestBatch,
    FullBehavior,
    InfiniteGrowth,
)
from procdispatch.errors import BufferFull, ProcDispatchError

UNLEASED = "unleased"
LEASED = "leased"
DROPPED = "dropped"
DELIVERED = "delivered"


@dataclass(frozen=True)
class Config:
    options: BufferOptions
    retry_factory: Callable[[], Iterator[float]]
    sizes: st.SearchStrategy[int]
    explicit_sizes: bool  # True when batch_size_max is set: sizes must be passed


@st.composite
def configs(draw: st.DrawFn) -> Config:
    fifo = draw(st.booleans())
    max_leases = 1 if fifo else draw(st.integers(1, 4))
    batch_items_max = draw(st.none() | st.integers(1, 6))
    batch_size_max = draw(st.none() | st.integers(1, 10))
    batch_age_max = draw(st.sampled_from([0.25, 0.5, 1.0, 3.0]))

    kind = draw(st.sampled_from(["block", "drop", "infinite"]))
    fb: FullBehavior
    if kind == "infinite":
        fb = InfiniteGrowth()
    else:
        low = batch_items_max or 1
        items: Any = draw(st.none() | st.integers(low, low + 12) | st.just(DERIVED))
        size: Any
        if batch_size_max is None:
            size = draw(st.sampled_from([None, DERIVED]))
            if items is None:
                items = low + 3
        else:
            size = draw(
                st.none() | st.integers(batch_size_max, 3 * batch_size_max) | st.just(DERIVED)
            )
            if items is None and size is None:
                size = batch_size_max
        fb = BlockNewItems(items, size) if kind == "block" else DropOldestBatch(items, size)

    retry_factory = draw(
        st.sampled_from(
            [
                retry.none(),
                retry.limited(1, 0.0),
                retry.limited(2, 0.5),
                retry.limited(3, 2.0),
                retry.limited(4, 5.0),
                retry.limited(10, 3.0),
                retry.exponential(initial=0.1, multiplier=2.0, max_delay=1.0, max_attempts=4),
                retry.exponential(initial=1.0, multiplier=1.5, max_delay=3.0),
                retry.exponential(initial=2.0, multiplier=2.0, max_delay=8.0, max_attempts=5),
            ]
        )
    )
    options = BufferOptions(
        max_leases=max_leases,
        batch_items_max=batch_items_max,
        batch_size_max=batch_size_max,
        batch_age_max=batch_age_max,
        full_behavior=fb,
        retry=retry_factory,
        fifo=fifo,
    )
    # sizes are tracked even when they are not enforced
    sizes = st.integers(0, 3) if batch_size_max is None else st.integers(1, batch_size_max)
    return Config(options, retry_factory, sizes, batch_size_max is not None)


@dataclass
class Lease:
    batch: Batch[int]
    items: list[int]
    count: int  # accounting the lease took
    size: int
    leased_at: float  # the batch was due by then


class BufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.buf: Buffer[int] = Buffer()
        self.cfg: Config | None = None
        self.now = 0.0
        self.next_item = 0
        self.size_of: dict[int, int] = {}
        self.state: dict[int, str] = {}
        self.leases: dict[int, Lease] = {}
        # Batches seen at least once (leased or dropped), by id.
        self.seen: dict[int, Batch[int]] = {}
        self.span: dict[int, tuple[int, int]] = {}  # id -> (first item, last item) at creation
        self.retry_iters: dict[int, Iterator[float]] = {}  # the model's copy of each iterator
        # Seen batches queued again (after a nack or a release): id -> (accounted size, due time;
        # for a release, the lease time, by which it was due)
        self.requeued: dict[int, tuple[int, float]] = {}
        self.finished: list[Batch[int]] = []

    # ---- set-up ---------------------------------------------------------------------------

    @initialize(cfg=configs())
    def setup(self, cfg: Config) -> None:
        self.cfg = cfg
        self.buf = Buffer(cfg.options)
        self.fb = self.buf.options.full_behavior
        self.max_leases = cfg.options.max_leases

    # ---- model helpers --------------------------------------------------------------------

    def items_in(self, state: str) -> list[int]:
        return [i for i, s in self.state.items() if s == state]

    def unleased_size(self) -> int:
        owned = {i for bid in self.requeued for i in self.seen[bid].data}
        loose = sum(self.size_of[i] for i in self.items_in(UNLEASED) if i not in owned)
        return loose + sum(size for size, _ in self.requeued.values())

    def totals(self) -> tuple[int, int]:
        count = len(self.items_in(UNLEASED)) + len(self.items_in(LEASED))
        size = self.unleased_size() + sum(lease.size for lease in self.leases.values())
        return count, size

    def limits(self) -> tuple[int | None, int | None]:
        fb = self.fb
        if isinstance(fb, BlockNewItems):
            return fb.max_items, fb.max_size  # type: ignore[return-value]
        if isinstance(fb, DropOldestBatch):
            return fb.max_live_items, fb.max_live_size  # type: ignore[return-value]
        return None, None

    def at_limit(self, count: int, size: int) -> bool:
        max_items, max_size = self.limits()
        return (max_items is not None and count >= max_items) or (
            max_size is not None and size >= max_size
        )

    def observe(self, batch: Batch[int]) -> None:
        """Check a batch's identity the first time it is seen (and that it is the same later)."""
        bid = batch.id
        if bid in self.seen:
            assert self.seen[bid] is batch, "two batch objects share an id"
            return
        assert bid >= 1
        assert not batch.synthetic
        data = batch.data
        assert data, "a batch with no items was handed out"
        first, last = data[0], data[-1]
        assert data == list(range(first, last + 1)), "a batch holds consecutive items in order"
        for other, (o_first, o_last) in self.span.items():
            if other < bid:
                assert o_last < first, "a lower id must hold older items"
            else:
                assert o_first > last, "a higher id must hold newer items"
        for i in data:
            assert self.state[i] == UNLEASED
        self.seen[bid] = batch
        self.span[bid] = (first, last)
        assert self.cfg is not None
        self.retry_iters[bid] = iter(self.cfg.retry_factory())

    def take_dropped(self, batch: Batch[int]) -> None:
        self.observe(batch)
        assert batch.id not in self.leases, "a leased batch was dropped"
        oldest = min(self.items_in(UNLEASED))
        assert oldest in batch.data, "the dropped batch is not the oldest one not in flight"
        for i in batch.data:
            assert self.state[i] == UNLEASED
            self.state[i] = DROPPED
        self.requeued.pop(batch.id, None)
        self.finished.append(batch)

    def accept(self, size: int) -> int:
        item = self.next_item
        self.next_item += 1
        self.size_of[item] = size
        self.state[item] = UNLEASED
        return item

    # ---- rules ----------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 2.0, 5.0]))
    def advance_and_lease(self, dt: float) -> None:
        self.now += dt
        self.lease()

    @rule(data=st.data())
    def add(self, data: st.DataObject) -> None:
        assert self.cfg is not None
        size = data.draw(self.cfg.sizes)
        count, total_size = self.totals()
        full = self.at_limit(count, total_size)
        has_unleased = bool(self.items_in(UNLEASED))
        if isinstance(self.fb, BlockNewItems) and full:
            with pytest.raises(BufferFull):
                self.buf.add(self.now, self.next_item, size)
            return
        dropped = self.buf.add(self.now, self.next_item, size)
        if isinstance(self.fb, DropOldestBatch) and full and has_unleased:
            assert dropped is not None
            self.take_dropped(dropped)
        else:
            assert dropped is None
        self.accept(size)

    @rule(data=st.data(), n=st.integers(0, 6))
    def add_many(self, data: st.DataObject, n: int) -> None:
        assert self.cfg is not None
        items = list(range(self.next_item, self.next_item + n))
        if self.cfg.explicit_sizes or data.draw(st.booleans()):
            sizes: list[int] | None = [data.draw(self.cfg.sizes) for _ in items]
        else:
            sizes = None
        size_list = sizes if sizes is not None else [0] * n
        expected = n
        if isinstance(self.fb, BlockNewItems):
            count, total_size = self.totals()
            expected = 0
            for s in size_list:
                if self.at_limit(count, total_size):
                    break
                count += 1
                total_size += s
                expected += 1
        before_unleased = set(self.items_in(UNLEASED))
        got, dropped = self.buf.add_many(self.now, items, sizes)
        assert got == expected
        for s in size_list[:got]:
            self.accept(s)
        if not isinstance(self.fb, DropOldestBatch):
            assert dropped == []
        ids = [d.id for d in dropped]
        assert ids == sorted(set(ids)), "dropped batches come oldest first, each once"
        for d in dropped:
            self.observe(d)
            assert d.id not in self.leases
            for i in d.data:
                assert i in before_unleased or i in items[:got]
                assert self.state[i] == UNLEASED
                self.state[i] = DROPPED
            self.requeued.pop(d.id, None)
            self.finished.append(d)

    @rule()
    def flush(self) -> None:
        self.buf.flush(self.now)

    @rule()
    def lease(self) -> None:
        slots_full = len(self.leases) >= self.max_leases
        predicted = self.buf.ready(self.now)
        b = self.buf.lease_one(self.now)
        assert predicted == (b is not None), "ready() must predict lease_one()"
        if b is None:
            if not slots_full and not self.cfg_fifo():
                for _, next_send in self.requeued.values():
                    assert next_send > self.now, "a due re-queued batch was not leased"
            return
        assert not slots_full, "max_leases exceeded"
        assert b.id not in self.leases, "batch leased twice at once"
        assert all(lease.batch is not b for lease in self.leases.values())
        if b.id in self.requeued:
            size, next_send = self.requeued.pop(b.id)
            assert self.seen[b.id] is b
            assert next_send <= self.now, "a batch was leased before its retry delay ran out"
        else:
            self.observe(b)
            size = sum(self.size_of[i] for i in b.data)
        if self.cfg_fifo():
            others = [i for i in self.items_in(UNLEASED) if i not in b.data]
            assert all(i > max(b.data) for i in others), "FIFO leased a batch out of order"
        for i in b.data:
            assert self.state[i] == UNLEASED
            self.state[i] = LEASED
        assert b.attempt >= 1
        self.leases[b.id] = Lease(b, list(b.data), len(b.data), size, self.now)

    def cfg_fifo(self) -> bool:
        assert self.cfg is not None
        return self.cfg.options.fifo

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        bid = data.draw(st.sampled_from(sorted(self.leases)))
        lease = self.leases.pop(bid)
        self.buf.ack(lease.batch)
        for i in lease.items:
            assert self.state[i] == LEASED
            self.state[i] = DELIVERED
        self.finished.append(lease.batch)

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        bid = data.draw(st.sampled_from(sorted(self.leases)))
        lease = self.leases.pop(bid)
        b = lease.batch
        # The send delivered (removed) some items before failing.
        keep = data.draw(st.lists(st.booleans(), min_size=len(b.data), max_size=len(b.data)))
        b.data[:] = [i for i, k in zip(b.data, keep, strict=True) if k]
        for i in lease.items:
            assert self.state[i] == LEASED
            self.state[i] = UNLEASED if i in b.data else DELIVERED
        before = self.buf.stats()
        result = self.buf.nack(self.now, b, RuntimeError("send failed"))
        after = self.buf.stats()
        assert after.leased_items == before.leased_items - lease.count
        assert after.leased_size == before.leased_size - lease.size
        if not b.data:
            assert result is None  # finished: everything was delivered
            assert after.unleased_items == before.unleased_items
            self.finished.append(b)
            return
        delay = next(self.retry_iters[bid], None)
        if delay is None:
            assert result is b, "retry exhaustion must hand the batch back"
            for i in b.data:
                self.state[i] = DROPPED
            assert after.unleased_items == before.unleased_items
            assert after.unleased_size == before.unleased_size
            self.finished.append(b)
            return
        assert result is None
        added_items = after.unleased_items - before.unleased_items
        added_size = after.unleased_size - before.unleased_size
        assert added_items == len(b.data) <= lease.count, "accounting grew on nack"
        true_size = sum(self.size_of[i] for i in b.data)
        assert true_size <= added_size <= lease.size, "accounting grew on nack"
        assert b.item_count == len(b.data)
        self.requeued[bid] = (added_size, self.now + delay)

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """The worker died before it started the batch: the lease is given back, unsent."""
        bid = data.draw(st.sampled_from(sorted(self.leases)))
        lease = self.leases.pop(bid)
        b = lease.batch
        attempt = b.attempt
        self.buf.release(b)
        assert b.attempt == attempt - 1
        for i in lease.items:
            assert self.state[i] == LEASED
            self.state[i] = UNLEASED
        self.requeued[bid] = (lease.size, lease.leased_at)

    @precondition(lambda self: bool(self.finished))
    @rule(data=st.data(), use_ack=st.booleans())
    def misuse(self, data: st.DataObject, use_ack: bool) -> None:
        b = data.draw(st.sampled_from(self.finished))
        before = self.buf.stats()
        if use_ack:
            with pytest.raises(ProcDispatchError):
                self.buf.ack(b)
        else:
            with pytest.raises(ProcDispatchError):
                self.buf.nack(self.now, b)
        assert self.buf.stats() == before

    # ---- invariants -----------------------------------------------------------------------

    @invariant()
    def ledger_matches_stats(self) -> None:
        if self.cfg is None:
            return
        assert len(self.state) == self.next_item  # every accepted item has exactly one state
        s = self.buf.stats()
        assert s.unleased_items == len(self.items_in(UNLEASED))
        assert s.leased_items == len(self.items_in(LEASED))
        assert s.leased_items == sum(lease.count for lease in self.leases.values())
        assert s.leased_size == sum(lease.size for lease in self.leases.values())
        assert s.unleased_size == self.unleased_size()
        assert s.empty == (s.total == 0)
        assert self.buf.total == s.total
        assert (s.total, s.total_size) == self.totals()

    @invariant()
    def leases_bounded(self) -> None:
        if self.cfg is None:
            return
        assert self.buf.leased == len(self.leases) <= self.max_leases

    @invariant()
    def can_add_matches_limits(self) -> None:
        if self.cfg is None:
            return
        if isinstance(self.fb, BlockNewItems):
            assert self.buf.can_add() == (not self.at_limit(*self.totals()))
        else:
            assert self.buf.can_add()

    @invariant()
    def next_send_time_iff_unleased(self) -> None:
        if self.cfg is None:
            return
        has_unleased = bool(self.items_in(UNLEASED))
        assert (self.buf.next_send_time() is not None) == has_unleased


BufferMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestBufferMachine = BufferMachine.TestCase
