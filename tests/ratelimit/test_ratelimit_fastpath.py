"""try_acquire's single-window path works on the page's words directly instead of calling the
pure Gcra.take, and keeps spare tokens; here it and a model built on Gcra.take see the same
literal clock and must agree at every step."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rlhelpers import check_no_leftovers, unique_name

from procdispatch import _ratelimit
from procdispatch._gcra import Gcra, State
from procdispatch._ratelimit import RateLimiter


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield from check_no_leftovers()


steps = st.lists(
    st.tuples(
        st.sampled_from(["try", "acquire", "reserve", "refund"]),
        st.integers(min_value=0, max_value=3),  # clock advance, in emissions
        st.integers(min_value=0, max_value=999),  # and thousandths of one
        st.integers(min_value=1, max_value=6),  # weight (capped at the burst below)
    ),
    min_size=1,
    max_size=60,
)


def claim_in_model(gcra: Gcra, state: State, now: int, weight: int, extra_max: int) -> int:
    """How many spare tokens a take of ``weight`` should claim: the most, up to ``extra_max``,
    for which the whole take still conforms now (found by trying, not by the formula; Gcra.take
    leaves the capacity check to its caller)."""
    for extra in range(min(extra_max, gcra.capacity - weight), 0, -1):
        if gcra.take(state, now, weight + extra)[1] is not None:
            return extra
    return 0


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    emission=st.sampled_from([1, 997, 20_000, 400_000, 999_999, 1_000_000, 3_000_000]),
    burst=st.sampled_from([1, 2, 5, 70]),
    start=st.integers(min_value=0, max_value=10**12),
    script=steps,
)
def test_try_acquire_matches_gcra_take_step_by_step(
    monkeypatch: pytest.MonkeyPatch,
    emission: int,
    burst: int,
    start: int,
    script: list[tuple[str, int, int, int]],
) -> None:
    """The model: a take that reaches the page claims as many more tokens as conform now, up
    to a millisecond's worth and 64 in all; later takes are served from those spares first
    (acquire too, where the rate allows spares); close gives the spares back. The page must
    hold exactly the model's GCRA state."""
    clock = [start]
    monkeypatch.setattr(_ratelimit, "_now", lambda: clock[0])
    name = unique_name()
    with (
        RateLimiter(1e9 / emission, burst=burst, name=name) as observer,
        RateLimiter(1e9 / emission, burst=burst, name=name) as lim,
    ):
        window = lim._windows[0]
        emission = window.emission_ns  # the rate in ns per token, rounded as the limiter does
        extra_max = max(1, min(64, burst, 1_000_000 // emission)) - 1
        gcra = Gcra([window])
        expected = gcra.initial()
        spare, last_claim = 0, (0, 0)
        reserved: list[tuple[int, int]] = []  # (units after take, weight), as the limiter keeps
        for op, whole, thousandths, drawn in script:
            clock[0] += whole * emission + thousandths * emission // 1000
            weight = min(drawn, burst)
            new: State | None = None
            if op in ("try", "acquire") and spare >= weight:
                spare -= weight
                ok = True
            elif op == "try" or (op == "acquire" and extra_max):  # acquire tries first
                _, new = gcra.take(expected, clock[0], weight)
                ok = new is not None
                if new is not None:
                    extra = claim_in_model(gcra, expected, clock[0], weight, extra_max)
                    _, new = gcra.take(expected, clock[0], weight + extra)
                    assert new is not None
                    if extra:
                        spare += extra
                        last_claim = (new[0], extra)
            elif op == "acquire":  # no spares at this rate: a plain take
                _, new = gcra.take(expected, clock[0], weight)
                ok = new is not None
            elif op == "reserve":
                _, new = gcra.take(expected, clock[0], weight, 5_000)
                assert (lim.reserve(weight, within=5e-6) <= 5e-6) is (new is not None)
                if new is not None:
                    reserved.append((new[0], weight))
            elif reserved:
                units_at_take, w = reserved.pop()
                new = gcra.refund(expected, w, units_at_take)
                lim.refund(w)
            if op == "try":
                assert lim.try_acquire(weight) is ok
            elif op == "acquire":
                assert lim.acquire(weight, timeout=0) is ok
            if new is not None:
                expected = new
            assert lim._spare == spare
            assert lim._state_for_tests() == expected
        lim.close()
        if spare:
            units_at_take, claimed = last_claim
            expected = gcra.refund(expected, min(spare, claimed), units_at_take)
        assert observer._state_for_tests() == expected


def test_try_acquire_keeps_a_later_booked_admission_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refunded booking leaves its admission time as the latest; a try_acquire that succeeds
    before that time must not move it back (later refunds rely on it)."""
    ms = 1_000_000
    t0 = 10**12
    clock = [t0]
    monkeypatch.setattr(_ratelimit, "_now", lambda: clock[0])
    with RateLimiter(1000.0, burst=2) as lim:  # 1 ms per token
        assert lim.try_acquire(2)
        assert lim.reserve(2, within=0.01) == pytest.approx(0.002)  # booked at +2 ms
        assert lim._last_admit_ns == t0 + 2 * ms
        lim.refund(2)
        clock[0] = t0 + ms - 1
        assert lim.try_acquire(1) is False
        clock[0] = t0 + ms
        assert lim.try_acquire(1)  # one token fits before the cancelled booking's time
        assert lim._state_for_tests() == (5, t0 + 2 * ms, t0 + 3 * ms)
