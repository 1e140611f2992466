"""When a producer blocked under BlockNewItems is woken (procdispatch._admission).

The coordinator's side is driven by hand (``take_pending``, ``publish`` with a ledger), so
every step is deterministic: a blocked ``admit`` waits on a lock of its own, and whether
``publish`` released it is read from that lock right after the call.
"""

from __future__ import annotations

import threading
from typing import Any

from workerfns import wait_for

from procdispatch._admission import Admission
from procdispatch._handover import Ledger
from procdispatch.buffer import BlockNewItems

CAP = 8  # max_items; a quarter of it (2) is the room a large blocked put_many waits for


def _full() -> Admission:
    adm = Admission(BlockNewItems(max_items=CAP))
    assert adm.admit(list(range(CAP)), None, block=False, deadline=None) == CAP
    taken, _, _, _ = adm.take_pending()
    assert len(taken) == CAP
    return adm


class _Producer:
    """``admit`` of ``count`` items on a thread of its own; ``waiter`` is the lock it blocks on."""

    def __init__(self, adm: Admission, count: int) -> None:
        self.adm = adm
        self.outcome: list[Any] = []
        self.thread = threading.Thread(target=self._run, args=(count,), daemon=True)
        self.thread.start()
        self.waiter: Any = wait_for(lambda: list(adm._waiters), what="a blocked producer")[0]

    def _run(self, count: int) -> None:
        try:
            self.outcome.append(self.adm.admit(list(range(count)), None, block=True, deadline=None))
        except RuntimeError as exc:
            self.outcome.append(exc)

    def stop(self) -> None:
        self.adm.set_fatal(RuntimeError("test over"))
        self.thread.join(20.0)
        assert not self.thread.is_alive()


def _deliver(adm: Admission, items: int, batches_in_flight: int) -> None:
    led = Ledger()
    led.book(delivered=items)
    adm.publish(led, batches_in_flight)


def test_large_put_many_sleeps_until_a_quarter_of_the_room_is_free() -> None:
    adm = _full()
    producer = _Producer(adm, 16)
    try:
        _deliver(adm, 1, batches_in_flight=3)
        assert producer.waiter.locked(), "woken for one free slot while answers were coming"
        _deliver(adm, 1, batches_in_flight=2)
        assert not producer.waiter.locked()
        # It adds what fits (2) and blocks again, on a new waiter.
        wait_for(lambda: adm._waiters and adm._waiters[0] is not producer.waiter)
        assert len(adm._pending) == 2
    finally:
        producer.stop()
    assert len(producer.outcome) == 1
    assert isinstance(producer.outcome[0], RuntimeError)


def test_any_room_wakes_a_producer_when_nothing_is_in_flight() -> None:
    # No answer may come to free more room (a partial batch waiting for its age, a retry's
    # delay), so the one free slot is handed over at once.
    adm = _full()
    producer = _Producer(adm, 16)
    try:
        _deliver(adm, 1, batches_in_flight=0)
        assert not producer.waiter.locked()
    finally:
        producer.stop()


def test_a_producer_wanting_less_than_a_quarter_is_woken_when_it_fits() -> None:
    adm = _full()
    producer = _Producer(adm, 1)
    try:
        _deliver(adm, 1, batches_in_flight=3)
        assert not producer.waiter.locked()
        producer.thread.join(20.0)
        assert producer.outcome == [1]
    finally:
        producer.stop()
