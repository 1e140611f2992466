"""The coordinator's decisions at literal times, on a fake clock with fake workers.

Each test runs the real coordinator loop to the end in this thread (see tests/fakeworld.py):
the clock jumps from one deadline or scripted event to the next, so ten-second timeouts take
microseconds and every time asserted is exact.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from fakeworld import FakeLimiter, Plan, World, always, run, run_death_found_on_a_write, sends

import procdispatch as pd
from procdispatch import _pool, retry
from procdispatch._coordinator import MAX_WAIT, _bounded


def test_a_partly_filled_batch_is_cut_when_it_reaches_batch_age_max() -> None:
    r = run(
        always(Plan("done")),
        ["a", "b", "c"],
        close_at=None,
        script=[(30.0, lambda c: c.adm.request_close())],
        batch_items_max=10,
        batch_age_max=10.0,
    )
    assert sends(r) == [(10.0, 1, 1, ["a", "b", "c"])]
    assert (r.stats.items_delivered, r.stats.items_dropped) == (3, 0)


def test_close_cuts_the_batch_being_filled_at_once() -> None:
    r = run(always(Plan("done")), ["a", "b"], close_at=4.0, batch_items_max=10)
    assert sends(r) == [(4.0, 1, 1, ["a", "b"])]


def test_retries_wait_out_the_policy_s_delays() -> None:
    def fail_three_times(b: pd.Batch[Any], w: Any) -> Plan:
        if b.attempt <= 3:
            return Plan("fail", error=pd.TransientError("later"))
        return Plan("done")

    r = run(
        fail_three_times,
        ["x"],
        batch_items_max=1,
        retry=retry.exponential(initial=0.25, multiplier=2.0),
    )
    assert [(t, a) for t, _, a, _ in sends(r)] == [(0.0, 1), (0.25, 2), (0.75, 3), (1.75, 4)]
    assert [(t, attempt) for t, _, attempt, _ in r.errors] == [(0.0, 1), (0.25, 2), (0.75, 3)]
    assert r.stats.items_delivered == 1


def test_qps_tokens_space_the_sends() -> None:
    r = run(
        always(Plan("done")),
        list(range(5)),
        batch_items_max=1,
        limiter=lambda world: FakeLimiter(world, rate=8.0),
    )
    assert [t for t, _, _, _ in sends(r)] == [0.0, 0.125, 0.25, 0.375, 0.5]


def test_a_token_booked_ahead_and_not_used_is_refunded() -> None:
    limiters: list[FakeLimiter] = []

    def make(world: World) -> FakeLimiter:
        limiters.append(FakeLimiter(world, rate=25.0))  # a token every 0.04 s: booked ahead
        return limiters[0]

    # Workers take 0.1 s to be ready. "a" goes to worker 1 at 0.1; a token is booked for "b"
    # at 0.14 on worker 2, which dies at 0.12: when the token comes due no worker can take
    # "b", and the token must not be kept for later (next to a fresh one it could burst).
    r = run(
        always(Plan("done", after=1.0)),
        ["a", "b"],
        workers=2,
        batch_items_max=1,
        limiter=make,
        ready=0.1,
        script=[(0.12, lambda c: c.backend.workers[2].kill())],
    )
    (lim,) = limiters
    assert lim.refunds == [0.14]
    assert [(t, wid) for t, wid, _, _ in sends(r)] == [(0.1, 1), (0.22, 3)]
    assert lim.admitted == [0.1, 0.22]


def test_a_cancel_gives_back_a_token_booked_ahead() -> None:
    limiters: list[FakeLimiter] = []

    def make(world: World) -> FakeLimiter:
        limiters.append(FakeLimiter(world, rate=25.0))
        return limiters[0]

    r = run(
        always(Plan("done", after=1.0)),
        ["a", "b"],
        workers=2,
        batch_items_max=1,
        limiter=make,
        ready=0.1,
        close_at=None,
        script=[(0.12, lambda c: c.adm.request_cancel())],
    )
    (lim,) = limiters
    assert lim.refunds == [0.12]
    assert lim.admitted == [0.1]
    assert [(t, data) for t, _, _, data, _ in r.drops] == [(0.12, ["b"])]


def test_send_timeout_kills_the_worker_and_the_batch_is_retried_on_a_new_one() -> None:
    def hang_first(b: pd.Batch[Any], w: Any) -> Plan:
        return Plan("hang") if b.attempt == 1 else Plan("done")

    r = run(hang_first, ["x"], batch_items_max=1, send_timeout=1.0)
    assert r.rec.kills == [(1.0, 1)]
    assert r.rec.starts == [(0.0, 1), (1.0, 2)]
    ((t, bid, attempt, err),) = r.errors
    assert (t, bid, attempt, type(err)) == (1.0, 1, 1, pd.SendTimeout)
    assert sends(r) == [(0.0, 1, 1, ["x"]), (1.2, 2, 2, ["x"])]  # the default first delay
    assert r.stats.worker_restarts == 1


def test_min_qps_sends_keep_alive_batches_while_idle() -> None:
    r = run(always(Plan("done")), [], close_at=1.6, min_qps=2.0)
    assert [s.t for s in r.rec.sent if s.synthetic] == [0.5, 1.0, 1.5]
    assert r.stats.items_put == 0  # keep-alives are not items


def test_cancel_drops_what_is_queued_and_gives_sends_in_flight_their_grace() -> None:
    r = run(
        always(Plan("hang")),
        ["a", "b", "c"],
        close_at=None,
        script=[(1.0, lambda c: c.adm.request_cancel())],
        batch_items_max=1,
        cancel_grace=2.0,
    )
    assert sends(r) == [(0.0, 1, 1, ["a"])]
    assert [(t, data) for t, _, _, data, _ in r.drops] == [(1.0, ["b"]), (1.0, ["c"]), (3.0, ["a"])]
    assert r.rec.kills == [(3.0, 1)]
    assert all(why is None for *_, why in r.drops)


def test_a_second_interrupt_ends_the_grace_at_once() -> None:
    r = run(
        always(Plan("hang")),
        ["a"],
        close_at=None,
        script=[
            (1.0, lambda c: c.adm.request_cancel()),
            (1.5, lambda c: c.adm.request_cancel(kill=True)),
        ],
        batch_items_max=1,
        cancel_grace=60.0,
    )
    assert r.rec.kills == [(1.5, 1)]
    assert [(t, data) for t, _, _, data, _ in r.drops] == [(1.5, ["a"])]


def test_a_worker_is_handed_at_most_max_batches_per_worker_then_replaced() -> None:
    r = run(
        always(Plan("done", after=1.0)),
        list(range(5)),
        batch_items_max=1,
        max_batches_per_worker=2,
    )
    assert [(t, wid) for t, wid, _, _ in sends(r)] == [
        (0.0, 1),
        (1.0, 1),
        (2.0, 2),
        (3.0, 2),
        (4.0, 3),
    ]
    assert r.rec.stops == [(2.0, 1), (4.0, 2), (5.0, 3)]  # the last one at the shutdown
    assert r.rec.starts == [(0.0, 1), (2.0, 2), (4.0, 3)]


def quick_then_slow(quick_ids: int) -> Any:
    """Sends of the first ``quick_ids`` batches take a millisecond, the others a second."""
    return lambda b, w: Plan("done", after=0.001 if b.id <= quick_ids else 1.0)


def test_by_default_a_worker_holds_what_its_last_send_s_time_fits_into_5_ms() -> None:
    r = run(always(Plan("done", after=0.002)), list(range(6)), workers=1, batch_items_max=1)
    # 1 goes alone (nothing is known of the worker's sends yet); then 2 ms sends: the running
    # batch and 2 more (4 ms) fit into 5 ms, so each answer lets one more go.
    assert [t for t, _, _, _ in sends(r)] == pytest.approx([0, 0.002, 0.002, 0.002, 0.004, 0.006])
    assert r.stats.items_delivered == 6


def test_by_default_no_batch_is_queued_behind_a_slow_send() -> None:
    r = run(quick_then_slow(2), list(range(9)), workers=1, batch_items_max=1)
    # 1's millisecond lets the worker hold 6 (the running one and 5 ms of quick sends), and
    # so does 2's; 3 takes a second: 9 waits until the worker has nothing left.
    times = [t for t, _, _, _ in sends(r)]
    assert times == pytest.approx([0.0] + [0.001] * 6 + [0.002, 6.002])
    assert r.stats.items_delivered == 9


def test_a_failed_send_leaves_its_worker_one_batch_until_its_next_answer() -> None:
    def fail_second(b: pd.Batch[Any], w: Any) -> Plan:
        if b.id == 2:
            return Plan("fail", after=0.001, error=pd.TransientError("later"))
        return Plan("done", after=0.001)

    r = run(fail_second, list(range(10)), workers=1, batch_items_max=1, retry=retry.none())
    # 2 fails at 0.002: nothing goes then, though the worker holds 5 of 6; 3's answer at
    # 0.003 lets it hold 6 again.
    times = [t for t, _, _, _ in sends(r)]
    assert times == pytest.approx([0.0] + [0.001] * 6 + [0.003, 0.003, 0.004])
    assert (r.stats.items_delivered, r.stats.items_dropped) == (9, 1)


def test_an_explicit_max_leases_fills_every_worker_from_the_start() -> None:
    r = run(quick_then_slow(0), list(range(4)), workers=1, max_leases=2, batch_items_max=1)
    assert [t for t, _, _, _ in sends(r)] == [0.0, 0.0, 1.0, 2.0]


def test_delivery_timeout_drops_a_batch_waiting_for_its_retry_at_its_deadline() -> None:
    r = run(
        always(Plan("fail", after=0.1, error=pd.TransientError("down"))),
        ["x"],
        batch_items_max=1,
        retry=retry.limited(10, delay=1.0),
        delivery_timeout=2.5,
    )
    assert [t for t, _, _, _ in sends(r)] == [0.0, 1.1, 2.2]
    ((t, bid, attempt, data, why),) = r.drops
    assert (t, bid, attempt, data) == (2.5, 1, 3, ["x"])
    assert isinstance(why, pd.DeliveryTimeout)
    assert isinstance(why.last_error, pd.TransientError)


def test_a_send_in_flight_at_the_delivery_deadline_decides_by_its_result() -> None:
    r = run(
        always(Plan("done", after=5.0)),
        ["x"],
        batch_items_max=1,
        delivery_timeout=1.0,
    )
    assert r.drops == []
    assert r.stats.items_delivered == 1


def test_a_worker_not_ready_within_start_timeout_is_killed_and_counts_as_a_failed_start() -> None:
    with pytest.raises(pd.WorkerStartFailed, match="3 attempts failed in a row") as info:
        run(always(Plan("done")), ["x"], ready=float("inf"), start_timeout=5.0)
    assert "did not become ready within start_timeout=5.0s" in str(info.value.__cause__)


def test_age_cut_retry_and_timeouts_together_take_no_real_time() -> None:
    import time

    t0 = time.monotonic()
    r = run(
        always(Plan("done", after=3600.0)),
        list(range(3)),
        batch_items_max=1,
        max_leases=1,
    )
    assert [t for t, _, _, _ in sends(r)] == [0.0, 3600.0, 7200.0]
    assert time.monotonic() - t0 < 5  # three simulated hours (a bound, not a measurement)


# ---- deadlines of any finite length ----------------------------------------------------------


def longest_wait(r: Any) -> float:
    return max(t for _, t in r.world.waits if t is not None)


def test_a_month_long_send_timeout_kills_at_its_deadline_waiting_at_most_max_wait() -> None:
    month = 2.6e6  # beyond what the OS wait under the selector takes (about 24.8 days)

    def hang_first(b: pd.Batch[Any], w: Any) -> Plan:
        return Plan("hang") if b.attempt == 1 else Plan("done")

    r = run(hang_first, ["x"], batch_items_max=1, send_timeout=month, start_timeout=month)
    assert r.rec.kills == [(month, 1)]
    ((t, _, attempt, err),) = r.errors
    assert (t, attempt, type(err)) == (month, 1, pd.SendTimeout)
    assert r.stats.items_delivered == 1
    assert longest_wait(r) == MAX_WAIT


def test_a_retry_delay_of_1e300_waits_for_delivery_timeout_in_bounded_waits() -> None:
    r = run(
        always(Plan("fail", error=pd.TransientError("down"))),
        ["x"],
        batch_items_max=1,
        retry=lambda: iter([1e300]),
        delivery_timeout=2.5 * MAX_WAIT,
    )
    assert [t for t, _, _, _ in sends(r)] == [0.0]
    ((t, _, _, data, why),) = r.drops
    assert (t, data) == (2.5 * MAX_WAIT, ["x"])
    assert isinstance(why, pd.DeliveryTimeout)
    assert longest_wait(r) == MAX_WAIT


def test_a_qps_limit_of_one_send_in_four_months_spaces_sends_in_bounded_waits() -> None:
    r = run(
        always(Plan("done")),
        ["a", "b"],
        batch_items_max=1,
        limiter=lambda world: FakeLimiter(world, rate=1e-7),
    )
    assert [t for t, _, _, _ in sends(r)] == [0.0, 1e7]
    assert longest_wait(r) == MAX_WAIT


@pytest.mark.parametrize(
    ("option", "value"),
    [("batch_age_max", 1e308), ("send_timeout", 1e300), ("start_timeout", 1e300)],
)
def test_huge_deadlines_leave_the_loop_s_decisions_as_they_were(option: str, value: float) -> None:
    r = run(
        always(Plan("done", after=1.0)),
        ["a", "b", "c"],
        close_at=5.0,
        batch_items_max=2,
        **{option: value},
    )
    assert sends(r) == [(0.0, 1, 1, ["a", "b"]), (5.0, 1, 1, ["c"])]
    assert r.stats.items_delivered == 3
    assert longest_wait(r) <= MAX_WAIT


def test_a_cancel_grace_of_1e10_still_ends_at_a_second_interrupt() -> None:
    r = run(
        always(Plan("hang")),
        ["a"],
        close_at=None,
        script=[
            (1.0, lambda c: c.adm.request_cancel()),
            (2.0 * MAX_WAIT, lambda c: c.adm.request_cancel(kill=True)),
        ],
        batch_items_max=1,
        cancel_grace=1e10,
    )
    assert r.rec.kills == [(2.0 * MAX_WAIT, 1)]
    assert [(t, data) for t, _, _, data, _ in r.drops] == [(2.0 * MAX_WAIT, ["a"])]
    assert longest_wait(r) == MAX_WAIT


@pytest.mark.parametrize(
    ("timeout", "waited"),
    [
        (None, None),
        (0.25, 0.25),
        (-1.0, 0.0),
        (MAX_WAIT, MAX_WAIT),
        (2.6e6, MAX_WAIT),
        (1e300, MAX_WAIT),
        (math.inf, MAX_WAIT),
        (math.nan, MAX_WAIT),
    ],
)
def test_the_loop_s_wait_is_clamped(timeout: float | None, waited: float | None) -> None:
    assert _bounded(timeout) == waited


# ---- starts of workers that cost a core to start: at most START_LIMIT at once ---------------


def test_starts_beyond_the_limit_wait_their_turn_and_their_start_timeout_runs_from_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each worker is ready 4 s after its start begins; one start at a time. The third start
    # waits 8 s for its turn, longer than start_timeout, and is not given up: its own start
    # takes 4 s.
    monkeypatch.setattr(_pool, "START_LIMIT", 1)
    r = run(
        always(Plan("done", after=20.0)),
        ["a", "b", "c"],
        staggered=True,
        ready=4.0,
        workers=3,
        batch_items_max=1,
        start_timeout=5.0,
    )
    assert r.rec.starts == [(0.0, 1), (4.0, 2), (8.0, 3)]
    assert sends(r) == [(4.0, 1, 1, ["a"]), (8.0, 2, 1, ["b"]), (12.0, 3, 1, ["c"])]
    assert r.rec.kills == []
    assert (r.stats.items_delivered, r.stats.worker_restarts) == (3, 0)


def test_a_start_that_does_not_end_in_time_lets_the_next_one_begin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No worker ever becomes ready: each start is given up at its own start_timeout, and the
    # start waiting behind it begins then, until the failures in a row end the channel.
    monkeypatch.setattr(_pool, "START_LIMIT", 1)
    with pytest.raises(pd.WorkerStartFailed, match="4 attempts failed in a row") as info:
        run(
            always(Plan("done")),
            ["a", "b"],
            staggered=True,
            ready=float("inf"),
            workers=2,
            start_timeout=5.0,
        )
    # Workers 1 to 4 began at 0, 5, 10 and 15; the fourth was given up at 20.
    assert str(info.value.__cause__) == (
        "worker 4 (pid 10004) did not become ready within start_timeout=5.0s; it was killed"
    )


def test_a_cancel_abandons_the_starts_waiting_their_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pool, "START_LIMIT", 2)
    r = run(
        always(Plan("done")),
        ["a", "b"],
        close_at=None,
        script=[(1.0, lambda c: c.adm.request_cancel())],
        staggered=True,
        ready=4.0,
        workers=5,
        batch_items_max=1,
    )
    assert r.rec.starts == [(0.0, 1), (0.0, 2)]  # the other three never began
    assert r.rec.kills == [(1.0, 1), (1.0, 2)]
    assert [(t, data) for t, _, _, data, _ in r.drops] == [(1.0, ["a"]), (1.0, ["b"])]
    assert r.world.t == 1.0
    assert r.stats.workers_alive == 0


def test_without_a_cost_to_start_every_worker_starts_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_pool, "START_LIMIT", 1)
    r = run(always(Plan("done")), ["a", "b"], ready=4.0, workers=3, batch_items_max=1)
    assert r.rec.starts == [(0.0, 1), (0.0, 2), (0.0, 3)]


# ---- a worker that answers for a batch it is not sending -------------------------------------

STRAY_WHY = (
    "; a process forked by send_fn that did not end with os._exit may have answered in its place"
)


def test_a_worker_answering_for_a_batch_it_is_not_sending_is_killed_as_a_worker_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def stray_first(b: pd.Batch[Any], w: Any) -> Plan:
        return Plan("done", after=1.0, answer_as=(99, 1)) if b.attempt == 1 else Plan("done")

    r = run(stray_first, ["x"], batch_items_max=1)
    assert r.rec.kills == [(1.0, 1)]
    assert r.rec.starts == [(0.0, 1), (1.0, 2)]
    ((t, bid, attempt, err),) = r.errors
    assert (t, bid, attempt, type(err)) == (1.0, 1, 1, pd.WorkerCrashed)
    assert str(err) == (
        "worker 1 (pid 10001) was killed while sending batch 1 (attempt 1): it answered that "
        "batch 99 (attempt 1) succeeded, but it holds batch 1 (attempt 1) first" + STRAY_WHY
    )
    assert sends(r) == [(0.0, 1, 1, ["x"]), (1.2, 2, 2, ["x"])]  # retried as a worker fault
    assert (r.stats.items_delivered, r.stats.items_dropped) == (1, 0)
    assert any("killing worker 1 (pid 10001)" in m for m in caplog.messages)


def test_a_worker_answering_out_of_order_fails_the_batch_it_ran_and_returns_the_rest() -> None:
    # Two leases in its pipe; it answers for the second first: the first (the one it was
    # running) fails as a worker fault, the second never started and goes back, no attempt used.
    def second_first(b: pd.Batch[Any], w: Any) -> Plan:
        if b.attempt == 1 and b.data == ["a"]:
            return Plan("fail", after=1.0, error=ValueError("x"), answer_as=(2, 1))
        return Plan("done")

    r = run(second_first, ["a", "b"], batch_items_max=1, max_leases=2)
    ((_, bid, attempt, err),) = r.errors
    assert (bid, attempt, type(err)) == (1, 1, pd.WorkerCrashed)
    assert "it answered that batch 2 (attempt 1) failed, but it holds batch 1 (attempt 1)" in str(
        err
    )
    assert sorted((s.data[0], s.attempt) for s in r.rec.sent if not s.synthetic) == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("b", 1),
    ]
    assert (r.stats.items_delivered, r.stats.items_dropped) == (2, 0)


def test_a_worker_answering_while_it_holds_nothing_is_killed_and_nothing_is_lost() -> None:
    from procdispatch import _protocol as proto

    def stray(c: Any) -> None:
        c.backend.workers[1]._post(proto.Done(7, 1))

    r = run(
        always(Plan("done")),
        ["x"],
        close_at=5.0,
        script=[(2.0, stray)],
        batch_items_max=1,
    )
    assert r.rec.kills == [(2.0, 1)]
    assert r.errors == []
    assert (r.stats.items_delivered, r.stats.items_dropped) == (1, 0)


def test_a_death_found_on_a_write_reads_the_answers_the_worker_wrote_first() -> None:
    """Worker 1 answers "a" and dies in the same instant; the coordinator finds the death when
    it writes "b" to it. "a" was delivered (its answer is in the pipe): it is delivered, not
    charged with the crash, and "b", which never reached the worker, goes to the next worker
    with no attempt used."""
    r = run_death_found_on_a_write(["b"], max_leases=2, retry=retry.none)
    assert sends(r) == [(0.0, 1, 1, ["a"]), (1.0, 2, 1, ["b"])]  # the write to 1 failed
    assert (r.errors, r.drops) == ([], [])
    assert (r.stats.items_delivered, r.stats.items_dropped) == (2, 0)
