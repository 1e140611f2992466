"""on_delivered: one call per delivered batch, with exactly the items delivered; with on_drop
it accounts for every item put, exactly once."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import pytest
from progressfns import PartialSender
from workerfns import Log, Recorder, wait_for

import procdispatch as pd
from procdispatch import _outcomes
from procdispatch._delivery import removed_items


class Seen:
    """on_delivered and on_drop that record what they were given, and on which thread."""

    def __init__(self, key: Any = lambda x: x) -> None:
        self.key = key
        self.delivered: list[Any] = []
        self.dropped: list[Any] = []
        self.calls: list[tuple[int, int, int]] = []  # (batch id, attempt, items)
        self.threads: set[str] = set()

    def on_delivered(self, batch: pd.Batch[Any]) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append((batch.id, batch.attempt, len(batch.data)))
        self.delivered.extend(self.key(x) for x in batch.data)

    def on_drop(self, batch: pd.Batch[Any] | None, flush: bool) -> None:
        if batch is not None:
            self.dropped.extend(self.key(x) for x in batch.data)


def _on_error_removing(batch: pd.Batch[Any], exc: BaseException) -> bool:
    """on_error that takes the items ``x % 11 == 5`` out of the batch: they count delivered."""
    batch.data[:] = [x for x in batch.data if _n(x) % 11 != 5]
    return pd.default_on_error(batch, exc)


def _n(x: Any) -> int:
    return x["n"] if isinstance(x, dict) else int(x)


@pytest.mark.parametrize("replace", [False, True], ids=["removed", "replaced"])
def test_every_item_is_delivered_or_dropped_exactly_once(make_channel: Any, replace: bool) -> None:
    n = 300
    seen = Seen(key=_n)
    ch = make_channel(
        PartialSender(replace=replace),
        workers=2,
        batch_items_max=10,
        retry=pd.retry.limited(3),
        on_error=_on_error_removing,
        on_delivered=seen.on_delivered,
        on_drop=seen.on_drop,
    )
    items = [{"n": i} for i in range(n)] if replace else list(range(n))
    ch.put_many(items)
    assert ch.close_and_drain(60)
    counts = collections.Counter(seen.delivered + seen.dropped)
    assert counts == collections.Counter(range(n))  # every item, exactly once
    s = ch.stats()
    assert s.items_delivered == len(seen.delivered)
    assert s.items_dropped == len(seen.dropped)
    delivered, dropped = set(seen.delivered), set(seen.dropped)
    # Removed by the first attempt, by on_error, by the second attempt: delivered.
    assert {i for i in range(n) if i % 3 in (0, 1) or i % 11 == 5} <= delivered
    # Dropped: what was left of a batch holding an item x % 4 == 0 after its second attempt.
    assert dropped
    assert all(i % 3 == 2 and i % 11 != 5 for i in dropped)
    # A batch whose second attempt still held an item x % 4 == 0 failed for good.
    assert {i for i in range(n) if i % 3 == 2 and i % 4 == 0 and i % 11 != 5} <= dropped
    # Partial reports carry the batch's id and attempt: several per batch, never empty.
    assert all(k > 0 for _, _, k in seen.calls)
    assert {a for _, a, _ in seen.calls} == {1, 2}
    assert seen.threads == {"procdispatch-coordinator"}


def test_a_batch_delivered_whole_is_reported_once_with_its_items(
    tmp_path: Any, make_channel: Any
) -> None:
    seen = Seen()
    ch = make_channel(
        Recorder(Log(tmp_path / "log")),
        workers=2,
        batch_items_max=7,
        on_delivered=seen.on_delivered,
    )
    ch.put_many(list(range(100)))
    assert ch.close_and_drain(60)
    assert sorted(seen.delivered) == list(range(100))
    assert len(seen.calls) == len({bid for bid, _, _ in seen.calls}) == 15


@pytest.mark.parametrize("kind", [ValueError, SystemExit, KeyboardInterrupt, GeneratorExit])
def test_a_raising_on_delivered_is_logged_and_loses_nothing(
    make_channel: Any, caplog: pytest.LogCaptureFixture, kind: type[BaseException]
) -> None:
    # Whatever it raises is its own failure: the channel reports the next batches, and drains.
    calls: list[int] = []

    def on_delivered(batch: pd.Batch[int]) -> None:
        calls.append(batch.id)
        raise kind("report failed")

    ch = make_channel(lambda b: None, workers=2, batch_items_max=5, on_delivered=on_delivered)
    ch.put_many(list(range(50)))
    assert ch.close_and_drain(60)
    s = ch.stats()
    assert (s.items_put, s.items_delivered, s.items_dropped) == (50, 50, 0)
    assert len(calls) == 10
    assert f"on_delivered raised for batch {calls[0]}: {kind.__name__}: report failed" in (
        caplog.text
    )


def test_a_slow_on_delivered_is_reported(
    make_channel: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_outcomes, "SLOW_CALLBACK", 0.0)  # every call counts as slow

    def on_delivered(batch: pd.Batch[int]) -> None:
        pass

    ch = make_channel(lambda b: None, workers=1, on_delivered=on_delivered)
    ch.put(1)
    with caplog.at_level(logging.WARNING, logger="procdispatch"):
        assert ch.close_and_drain(60)
    assert "on_delivered (" in caplog.text
    assert "took" in caplog.text


def test_keep_alive_batches_are_never_reported(tmp_path: Any, make_channel: Any) -> None:
    log = Log(tmp_path / "log")
    seen = Seen()
    ch = make_channel(Recorder(log), workers=1, min_qps=50, on_delivered=seen.on_delivered)
    log.wait_count(2, ev="sent", synthetic=True)
    ch.put("real")
    assert ch.close_and_drain(60)
    assert seen.delivered == ["real"]


def test_on_delivered_must_be_callable() -> None:
    with pytest.raises(pd.OptionsError, match=r"on_delivered must be callable or None \(got 3\)"):
        pd.ProcessChannel(lambda b: None, on_delivered=3, backend="thread")


def test_removed_items_by_kept_indices_identity_and_equality() -> None:
    a, b, c, d = [1], [2], [1], [3]
    assert removed_items([a, b, c, d], [1, 3], [b, d], 2) == [a, c]
    assert removed_items([a, b, c, d], None, [c, d], 2) == [a, b]  # identity: c stays, not a
    # New objects: matched by equality, each against one original; duplicates count.
    assert removed_items([[1], [1], [2]], None, [[1]], 2) == [[1], [2]]
    # Never more than the accounting counts delivered.
    assert removed_items([[1], [2]], None, [[5], [6]], 0) == []
    assert removed_items([[1], [2], [3]], None, [[5]], 2) == [[1], [2]]


class _Unequal:
    """An item whose ``==`` raises what is not an Exception (user code on the coordinator)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        raise KeyboardInterrupt("no comparing")

    __hash__ = object.__hash__


def test_an_item_whose_equality_raises_anything_is_matched_to_nothing() -> None:
    a, b = _Unequal(1), _Unequal(2)
    # The send came back with a new list holding a copy of b: nothing can be matched to it,
    # so the items taken as delivered are the first ones, up to the count.
    assert removed_items([a, b], None, [_Unequal(2)], 1) == [a]


def test_a_batch_is_reported_as_soon_as_it_is_delivered(make_channel: Any) -> None:
    got: list[pd.Batch[int]] = []
    ch = make_channel(lambda b: None, workers=1, batch_age_max=0.05, on_delivered=got.append)
    ch.put(7)
    wait_for(lambda: got, what="a delivery report before close")
    assert got[0].data == [7]
    assert ch.close_and_drain(60)
