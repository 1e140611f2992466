"""Unit tests of the pure GCRA maths (procdispatch._gcra): literal times, then Hypothesis."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrate_limiter import Duration, Rate

from procdispatch._limiter.gcra import NS_PER_S, Gcra, State, Window, parse_rate
from procdispatch.errors import OptionsError

# ---- windows chosen from user rates -----------------------------------------------------------


def test_float_rate_emission_is_ceil_of_one_second_over_rate() -> None:
    assert parse_rate(200.0, 1).windows == (Window(5_000_000, 1),)
    assert parse_rate(3, 2).windows == (Window(333_333_334, 2),)
    assert parse_rate(0.5, 1).windows == (Window(2 * NS_PER_S, 1),)
    # A rate just below 200/s must not round to exactly 5 ms (that would be 200/s).
    assert parse_rate(math.nextafter(200.0, 0), 1).windows[0].emission_ns == 5_000_001


def test_rate_window_emission_keeps_the_window_limit_exact() -> None:
    # interval // (limit - burst + 1) + 1: strictly more than interval / (limit - burst + 1).
    assert parse_rate(Rate(20, Duration.SECOND), 1).windows == (Window(50_000_001, 1),)
    assert parse_rate(Rate(20, Duration.SECOND), 5).windows == (Window(62_500_001, 5),)
    parsed = parse_rate([Rate(20, Duration.SECOND), Rate(1000, Duration.MINUTE)], 1)
    assert parsed.windows == (Window(50_000_001, 1), Window(60_000_001, 1))
    for window, (limit, interval) in zip(
        parsed.windows, [(20, NS_PER_S), (1000, 60 * NS_PER_S)], strict=True
    ):
        assert window.max_units(interval) <= limit
    assert parsed.per_second == pytest.approx(1000 / 60)


def test_description_and_nominal_rate() -> None:
    assert parse_rate(200.0, 3).description == "200.0/s, burst=3"
    assert parse_rate(200.0, 3).per_second == 200.0
    assert parse_rate(Rate(20, Duration.SECOND), 5).per_second == 16.0


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [
        (0, 1, "rate must be a finite number of events per second > 0 (got 0)"),
        (-1.5, 1, "rate must be a finite number of events per second > 0 (got -1.5)"),
        (math.nan, 1, "rate must be a finite number of events per second > 0 (got nan)"),
        (math.inf, 1, "rate must be a finite number of events per second > 0 (got inf)"),
        (True, 1, "rate must be a number of events per second > 0, a pyrate-limiter Rate or a"),
        ("10", 1, "rate must be a number of events per second > 0, a pyrate-limiter Rate or a"),
        ([], 1, "rate must hold 1 to 32 Rate objects (got [])"),
        ([Rate(1, 1000)] * 33, 1, "rate must hold 1 to 32 Rate objects"),
        ([Rate(1, 1000), 5.0], 1, "rate must hold only pyrate_limiter.Rate objects (got 5.0)"),
        (10.0, 0, "burst must be an int >= 1 (got 0)"),
        (10.0, 2.0, "burst must be an int >= 1 (got 2.0)"),
        (10.0, True, "burst must be an int >= 1 (got True)"),
        (Rate(3, 1000), 4, "burst must be <= the smallest Rate.limit, 3 (got 4)"),
        (Rate(5, 1000, burst=6), 1, "Rate.burst of rate must be an int from 1 to the Rate's"),
        (Rate(5, 1000, burst=2), 2, "burst must be left at 1 when every Rate of rate has its"),
        (1e-12, 1, "rate must admit at least one event per 30 years (got 1e-12)"),
    ],
)
def test_invalid_rates_raise_options_error_naming_field_rule_and_value(
    rate: object, burst: object, message: str
) -> None:
    with pytest.raises(OptionsError) as info:
        parse_rate(rate, burst)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_rate_with_its_own_burst_lets_that_many_go_at_once_and_keeps_its_limit() -> None:
    # Rate(10, 1 s, burst=3): pyrate's "3 at once"; 10 - 3 + 1 = 8 intervals per second.
    parsed = parse_rate(Rate(10, Duration.SECOND, burst=3), 1)
    assert parsed.windows == (Window(NS_PER_S // 8 + 1, 3),)
    (window,) = parsed.windows
    assert window.max_units(0) == 3
    assert window.max_units(NS_PER_S) <= 10
    assert parsed.per_second == 8.0
    assert parsed.description == "[Rate(10, 1000 ms, burst=3)], burst=1"
    g = Gcra(parsed.windows)
    s = g.initial()
    for _ in range(3):
        s = admit(g, s, 10**12, 1)
    assert g.take(s, 10**12, 1)[1] is None  # the fourth at that instant: refused


def test_a_rates_own_burst_is_for_its_window_and_the_limiters_burst_for_the_others() -> None:
    parsed = parse_rate([Rate(10, Duration.SECOND, burst=3), Rate(100, Duration.MINUTE)], 2)
    assert [w.capacity for w in parsed.windows] == [3, 2]
    assert Gcra(parsed.windows).capacity == 2  # every window must hold a take at once
    # A burst equal to the limit is pyrate's default: the limiter's burst applies.
    assert parse_rate(Rate(5, Duration.SECOND, burst=5), 2).windows == (
        Window(NS_PER_S // 4 + 1, 2),
    )
    # The limiter's burst is checked against the Rates it applies to only.
    assert parse_rate([Rate(10, 1000, burst=4), Rate(3, 1000)], 3).windows[0].capacity == 4
    with pytest.raises(OptionsError, match=r"burst must be <= the smallest Rate.limit, 3 \(got 4"):
        parse_rate([Rate(10, 1000, burst=2), Rate(3, 1000)], 4)


@settings(max_examples=150, deadline=None)
@given(
    limits=st.lists(
        st.tuples(st.integers(1, 12), st.integers(1, 40), st.integers(1, 12)),
        min_size=1,
        max_size=2,
    ),
    steps=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 3), st.booleans()), max_size=200),
)
def test_rates_with_their_own_bursts_never_admit_more_than_burst_at_once_or_limit_per_interval(
    limits: list[tuple[int, int, int]], steps: list[tuple[int, int, bool]]
) -> None:
    rates = [Rate(limit, interval, burst=min(b, limit)) for limit, interval, b in limits]
    g = Gcra(parse_rate(rates, 1).windows)  # the limiter's burst, 1, for the Rates at default
    smallest_interval_ns = min(interval for _, interval, _ in limits) * 1_000_000
    state, now, events = g.initial(), 0, []
    for step, weight, book in steps:
        now += step * smallest_interval_ns // 10
        w = min(weight, g.capacity)
        wait, new = g.take(state, now, w, 10**12 if book else 0)
        if new is not None:
            state = new
            events.append(Admitted(now + wait, w, new[0]))
    for r in rates:
        assert max_units_in_span(events, r.interval * 1_000_000) <= r.limit
        at_once = r.burst if r.burst < r.limit else 1  # else the limiter's burst, 1 here
        assert max_units_in_span(events, 0) <= at_once


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [
        ("fast", 1, "qps_limit must be a number of events per second > 0, a pyrate-limiter "),
        (-2.0, 1, "qps_limit must be a finite number of events per second > 0 (got -2.0)"),
        ([], 1, "qps_limit must hold 1 to 32 Rate objects (got [])"),
        ([Rate(1, 1000), "x"], 1, "qps_limit must hold only pyrate_limiter.Rate objects"),
        (1e-12, 1, "qps_limit must admit at least one event per 30 years (got 1e-12)"),
        (5.0, 0, "qps_burst must be an int >= 1 (got 0)"),
        (Rate(2, 1000), 3, "qps_burst must be <= the smallest Rate.limit, 2 (got 3)"),
        (Rate(9, 1000, burst=2), 3, "qps_burst must be left at 1 when every Rate of qps_limit"),
        (Rate(2, 1000, burst=3), 1, "Rate.burst of qps_limit must be an int from 1 to the"),
    ],
)
def test_messages_name_the_options_as_the_caller_spelled_them(
    rate: object, burst: object, message: str
) -> None:
    with pytest.raises(OptionsError) as info:
        parse_rate(rate, burst, what="qps_limit", burst_what="qps_burst")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"), [("limit", 0), ("limit", -3), ("interval", 0), ("interval", -1000)]
)
def test_rate_with_non_positive_limit_or_interval_is_refused(field: str, value: int) -> None:
    rate = Rate(5, 1000)  # pyrate-limiter asserts on some of these itself: build, then break
    setattr(rate, field, value)
    with pytest.raises(
        OptionsError, match=rf"Rate.{field} of rate must be an int > 0 \(got {value} in"
    ):
        parse_rate([Rate(5, 1000), rate], 1)


# ---- GCRA with literal times ------------------------------------------------------------------


def admit(g: Gcra, s: State, now: int, weight: int) -> State:
    wait, new = g.take(s, now, weight)
    assert wait == 0
    assert new is not None
    return new


def test_burst_then_one_per_emission_interval() -> None:
    g = Gcra([Window(100, 3)])  # 3 at once, then one every 100 ns
    s = g.initial()
    for _ in range(3):
        s = admit(g, s, 1000, 1)
    assert s == (3, 1000, 1300)
    assert g.take(s, 1000, 1) == (100, None)  # nothing taken: next unit at 1100
    assert g.take(s, 1099, 1) == (1, None)
    assert g.take(s, 1100, 1) == (0, (4, 1100, 1400))
    assert g.take(s, 1000, 2) == (200, None)  # two units need two emission intervals
    assert g.take(s, 1200, 2) == (0, (5, 1200, 1500))


def test_a_full_bucket_does_not_save_up_beyond_its_capacity() -> None:
    g = Gcra([Window(100, 2)])
    s = admit(g, g.initial(), 0, 1)
    # Long idle: the TAT is in the past, which means full, and full is 2.
    s = admit(g, s, 10_000, 2)
    assert s == (3, 10_000, 10_200)
    assert g.take(s, 10_000, 1) == (100, None)


def test_booking_in_the_future_admits_at_the_earliest_instant() -> None:
    g = Gcra([Window(100, 1)])
    s = admit(g, g.initial(), 500, 1)
    assert s == (1, 500, 600)
    assert g.take(s, 520, 1, max_wait_ns=50) == (80, None)  # too far: nothing booked
    assert g.take(s, 520, 1, max_wait_ns=80) == (80, (2, 600, 700))
    # The next booking queues behind it, with no time lost.
    assert g.take((2, 600, 700), 530, 1, max_wait_ns=10**9) == (170, (3, 700, 800))


def test_weight_is_charged_as_that_many_units_at_once() -> None:
    g = Gcra([Window(10, 4)])
    s = admit(g, g.initial(), 100, 4)
    assert s == (4, 100, 140)
    assert g.wait_ns(s, 100, 1) == 10
    assert g.wait_ns(s, 100, 4) == 40


def test_several_windows_all_hold_and_take_all_or_nothing() -> None:
    fast, slow = Window(10, 2), Window(100, 3)
    g = Gcra([fast, slow])
    assert g.capacity == 2
    s1 = admit(g, g.initial(), 0, 2)
    assert s1 == (2, 0, 20, 200)
    # fast would admit at 20 but slow only at 100: refused as a whole, nothing taken.
    assert g.take(s1, 20, 2) == (80, None)
    assert g.take(s1, 20, 1) == (0, (3, 20, 30, 300))
    assert g.take(s1, 20, 2, max_wait_ns=100) == (80, (4, 100, 120, 400))


def test_refund_with_nothing_admitted_since_is_exact() -> None:
    g = Gcra([Window(100, 2)])
    s = admit(g, admit(g, g.initial(), 1000, 1), 1000, 1)
    assert s == (2, 1000, 1200)
    assert g.take(s, 1000, 1)[1] is None
    s = g.refund(s, 1, units_at_take=2)
    assert s == (2, 1000, 1100)
    assert g.take(s, 1000, 1)[1] is not None


def test_refund_never_returns_capacity_that_later_arrivals_used() -> None:
    # A reserves at t=0; the bucket refills; B is admitted at t=1000; then A cancels.
    # Subtracting A's cost would leave the bucket full again after B: B would be free.
    g = Gcra([Window(100, 1)])
    a = admit(g, g.initial(), 0, 1)
    assert a == (1, 0, 100)
    b = admit(g, a, 1000, 1)
    assert b == (2, 1000, 1100)
    after = g.refund(b, 1, units_at_take=1)
    assert after == b  # B already owns everything in the TAT: nothing to give back
    assert g.take(after, 1000, 1) == (100, None)


def test_partial_refund_and_refund_with_later_arrivals() -> None:
    g = Gcra([Window(10, 5)])
    s = admit(g, g.initial(), 0, 3)  # reservation r: units 3, TAT 30
    s = admit(g, s, 0, 1)  # a later arrival: TAT 40
    assert s == (4, 0, 40)
    # Undoing 2 units of r: the later arrival's term is at most last + 1*10 = 10; 40-20 = 20.
    assert g.refund(s, 2, units_at_take=3) == (4, 0, 20)
    with pytest.raises(ValueError, match="bad refund"):
        g.refund(s, 1, units_at_take=5)


# ---- Hypothesis: no window ever admits more than its bound ------------------------------------


@dataclass
class Admitted:
    at: int
    weight: int
    units_after: int


def max_units_in_span(events: list[Admitted], span_ns: int) -> int:
    """The largest total weight inside any closed span [s, s + span_ns]."""
    live = sorted((e.at, e.weight) for e in events if e.weight > 0)
    times = [t for t, _ in live]
    prefix = [0]
    for _, w in live:
        prefix.append(prefix[-1] + w)
    best = 0
    for i, t in enumerate(times):
        j = bisect.bisect_right(times, t + span_ns)
        best = max(best, prefix[j] - prefix[i])
    return best


op = st.tuples(
    st.one_of(st.just(0), st.integers(0, 120)),  # time step
    st.sampled_from(["take", "take", "book", "refund"]),
    st.integers(1, 5),  # weight
    st.integers(0, 400),  # how far a booking may wait
    st.integers(0, 10**6),  # which reservation to refund
)


@settings(max_examples=300, deadline=None)
@given(
    windows=st.lists(
        st.builds(Window, st.integers(1, 40), st.integers(1, 5)), min_size=1, max_size=3
    ),
    ops=st.lists(op, max_size=150),
    start=st.integers(0, 10**12),
)
def test_no_span_ever_admits_more_than_capacity_plus_span_over_emission(
    windows: list[Window], ops: list[tuple[int, str, int, int, int]], start: int
) -> None:
    g = Gcra(windows)
    state, now, events = g.initial(), start, []
    for step, kind, asked, reach, pick in ops:
        now += step
        weight = min(asked, g.capacity)
        if kind == "refund":
            outstanding = [e for e in events if e.weight > 0]
            if outstanding:
                e = outstanding[pick % len(outstanding)]
                back = 1 + pick % e.weight
                state = g.refund(state, back, e.units_after)
                e.weight -= back
            continue
        wait, new = g.take(state, now, weight, reach if kind == "book" else 0)
        if new is not None:
            state = new
            events.append(Admitted(now + wait, weight, new[0]))
        else:
            assert wait > (reach if kind == "book" else 0)
    for w in windows:
        for span in {0, w.emission_ns - 1, w.emission_ns, w.capacity * w.emission_ns, 97, 1000}:
            assert max_units_in_span(events, span) <= w.max_units(span)


@settings(max_examples=150, deadline=None)
@given(
    limits=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 40)), min_size=1, max_size=2),
    burst=st.integers(1, 12),
    steps=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 3), st.booleans()), max_size=200),
)
def test_rate_windows_never_admit_more_than_limit_per_interval(
    limits: list[tuple[int, int]], burst: int, steps: list[tuple[int, int, bool]]
) -> None:
    rates = [Rate(limit, interval_ms) for limit, interval_ms in limits]
    burst = min(burst, *(limit for limit, _ in limits))
    g = Gcra(parse_rate(rates, burst).windows)
    smallest_interval_ns = min(interval for _, interval in limits) * 1_000_000
    state, now, events = g.initial(), 0, []
    for step, weight, book in steps:
        now += step * smallest_interval_ns // 10
        w = min(weight, g.capacity)
        wait, new = g.take(state, now, w, 10**12 if book else 0)
        if new is not None:
            state = new
            events.append(Admitted(now + wait, w, new[0]))
    for limit, interval_ms in limits:
        assert max_units_in_span(events, interval_ms * 1_000_000) <= limit


@settings(max_examples=150, deadline=None)
@given(
    rate=st.floats(0.5, 400.0),
    burst=st.integers(1, 10),
    steps=st.lists(st.tuples(st.integers(0, 8_000_000), st.integers(1, 10)), max_size=300),
)
def test_float_rate_never_admits_more_than_rate_plus_burst_per_second(
    rate: float, burst: int, steps: list[tuple[int, int]]
) -> None:
    g = Gcra(parse_rate(rate, burst).windows)
    state, now, events = g.initial(), 0, []
    for step, weight in steps:
        now += step
        w = min(weight, burst)
        _, new = g.take(state, now, w)
        if new is not None:
            state = new
            events.append(Admitted(now, w, new[0]))
    assert max_units_in_span(events, NS_PER_S) <= rate + burst


# ---- what the pool needs: room, charge, take with reserved units ------------------------------


def test_room_is_what_conforms_now_one_by_one() -> None:
    g = Gcra([Window(10, 4)])  # 4 at once, then one per 10 ns
    s = g.initial()
    assert g.room(s, 1000) == 4
    s = admit(g, s, 1000, 1)  # TAT 1010
    assert g.room(s, 1000) == 3
    assert g.room(s, 1009) == 3
    assert g.room(s, 1010) == 4
    assert g.room(s, 10**9) == 4  # an idle window holds the burst, no more
    assert g.room((1, 1000, 1100), 1000) == 0  # booked beyond the tolerance
    two = Gcra([Window(10, 4), Window(100, 2)])
    assert two.room(two.initial(), 0) == 2  # the tighter window decides
    assert two.room((1, 0, 10, 100), 0) == 1


def test_charge_moves_every_tat_as_an_admission_even_past_the_tolerance() -> None:
    g = Gcra([Window(10, 4), Window(100, 2)])
    s = g.initial()
    assert g.charge(s, 1000, 0) is s
    assert g.charge(s, 1000, 3) == (3, 1000, 1030, 1300)
    assert g.charge((3, 1000, 1030, 1300), 1010, 10) == (13, 1010, 1130, 2300)
    with pytest.raises(ValueError, match="bad charge"):
        g.charge(s, 1000, -1)


def test_take_keeps_reserved_units_free() -> None:
    g = Gcra([Window(10, 4)])
    s = g.initial()
    assert g.take(s, 1000, 2, 0, 2) == (0, (2, 1000, 1020))  # 2 + 2 fit the burst of 4
    assert g.take(s, 1000, 2, 0, 3) == (10, None)  # 2 + 3 do not: one emission later
    assert g.take(s, 1000, 2, 10, 3) == (10, (2, 1010, 1030))  # booked there
    # From an idle window: the burst, no more, however long it has been idle.
    assert g.take((5, 0, 0), 10**9, 1, 0, 4) == (10, None)
    two = Gcra([Window(10, 4), Window(100, 2)])
    assert two.take(two.initial(), 0, 1, 0, 1) == (0, (1, 0, 10, 100))
    assert two.take(two.initial(), 0, 1, 10**6, 2) == (100, (1, 100, 110, 200))


@settings(max_examples=300, deadline=None)
@given(
    windows=st.lists(st.tuples(st.integers(1, 50), st.integers(1, 6)), min_size=1, max_size=3),
    steps=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 6)), max_size=20),
    probe=st.integers(0, 400),
)
def test_room_agrees_with_take(
    windows: list[tuple[int, int]], steps: list[tuple[int, int]], probe: int
) -> None:
    """room(now) units conform at now, one by one, with the rest of them kept free; one more
    does not (unless room is the capacity, the most a take may ever ask)."""
    g = Gcra([Window(e, b) for e, b in windows])
    state, now = g.initial(), 1000
    for step, weight in steps:
        now += step
        _, new = g.take(state, now, min(weight, g.capacity), 10**6)
        if new is not None:
            state = new
    now += probe
    room = g.room(state, now)
    assert 0 <= room <= g.capacity
    if room:
        assert g.take(state, now, 1, 0, room - 1)[1] is not None
        assert g.take(state, now, room)[1] is not None
    if room < g.capacity:
        assert g.take(state, now, 1, 0, room)[1] is None
