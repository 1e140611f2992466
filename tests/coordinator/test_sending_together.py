"""Several leases handed to a worker at once (a handle with ``sends_together``, as the process
backend's): what the coordinator decides, on the fake clock (see tests/fakeworld.py).

A turn of the coordinator leases what every worker has room for and hands each worker its share
in one call. These are the cases where that call cannot simply succeed: the worker is found dead
on the write, a batch in the middle cannot be pickled, the worker reaches
``max_batches_per_worker`` on the way, and batches too few for every worker's room.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fakeworld import Plan, always, run, run_death_found_on_a_write, sends

from procdispatch import retry


def test_a_death_found_on_writing_several_leases_puts_them_all_back_unused() -> None:
    """Worker 1 answers "a" and dies in the same instant; the coordinator finds the death when
    it writes "b", "c" and "d" to it together. "a" is delivered (its answer was in the pipe),
    and the three go to the next worker with no attempt used and no send counted."""
    r = run_death_found_on_a_write(["b", "c", "d"], max_leases=4, retry=retry.none, together=True)
    assert sends(r) == [
        (0.0, 1, 1, ["a"]),
        (1.0, 2, 1, ["b"]),
        (1.0, 2, 1, ["c"]),
        (1.0, 2, 1, ["d"]),
    ]
    assert (r.errors, r.drops) == ([], [])
    assert (r.stats.items_delivered, r.stats.items_dropped) == (4, 0)
    assert (r.stats.batches_sent, r.stats.worker_restarts) == (4, 1)


@pytest.mark.parametrize("where", [0, 1, 3])
def test_a_batch_that_cannot_be_pickled_among_several_fails_alone(where: int) -> None:
    lock = threading.Lock()  # will not pickle, even by value
    items: list[Any] = ["a", "b", "c"]
    items.insert(where, lock)
    r = run(
        always(Plan("done", 1.0)),
        items,
        workers=1,
        max_leases=4,
        batch_items_max=1,
        together=True,
    )
    assert sends(r) == [(0.0, 1, 1, [x]) for x in ["a", "b", "c"]]
    ((t, bid, attempt, exc),) = r.errors
    assert (t, bid, attempt) == (0.0, 5, 1)  # the item went alone, as a batch of its own
    assert str(exc).startswith(
        f"item 0 of batch {where + 1} (attempt 1) cannot be pickled to reach a worker"
    )
    assert [(t, data) for t, _, _, data, _ in r.drops] == [(0.0, [lock])]
    assert (r.stats.items_delivered, r.stats.items_dropped, r.stats.batches_sent) == (3, 1, 3)


def test_a_worker_is_handed_no_more_than_max_batches_per_worker_in_one_turn() -> None:
    r = run(
        always(Plan("done", after=1.0)),
        list(range(5)),
        workers=1,
        max_leases=8,
        batch_items_max=1,
        max_batches_per_worker=2,
        together=True,
    )
    assert [(t, wid, data) for t, wid, _, data in sends(r)] == [
        (0.0, 1, [0]),
        (0.0, 1, [1]),
        (2.0, 2, [2]),
        (2.0, 2, [3]),
        (4.0, 3, [4]),
    ]
    assert r.rec.stops == [(2.0, 1), (4.0, 2), (5.0, 3)]  # each once it answered both
    assert r.stats.items_delivered == 5


def test_batches_too_few_for_every_worker_s_room_are_shared_level_by_level() -> None:
    """Two workers with room for 4 each and 3 batches: each gets one before either gets a
    second, in table order."""
    r = run(
        always(Plan("done", after=1.0)),
        ["a", "b", "c"],
        workers=2,
        max_leases=8,
        batch_items_max=1,
        together=True,
    )
    assert sorted((wid, data) for _, wid, _, data in sends(r)) == [
        (1, ["a"]),
        (1, ["c"]),
        (2, ["b"]),
    ]
    assert r.stats.items_delivered == 3
