"""try_acquire's single-window path works on the page's words directly instead of calling the
pure Gcra.take; here both see the same literal clock and must agree at every step."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rlhelpers import check_no_leftovers, unique_name

from procdispatch import _ratelimit
from procdispatch._gcra import Gcra
from procdispatch._ratelimit import RateLimiter


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield from check_no_leftovers()


steps = st.lists(
    st.tuples(
        st.sampled_from(["try", "reserve", "refund"]),
        st.integers(min_value=0, max_value=3_000),  # clock advance, ns
        st.integers(min_value=1, max_value=4),  # weight (capped at the burst below)
    ),
    min_size=1,
    max_size=60,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    emission=st.integers(min_value=1, max_value=1_000),
    burst=st.integers(min_value=1, max_value=4),
    start=st.integers(min_value=0, max_value=10**12),
    script=steps,
)
def test_try_acquire_matches_gcra_take_step_by_step(
    monkeypatch: pytest.MonkeyPatch,
    emission: int,
    burst: int,
    start: int,
    script: list[tuple[str, int, int]],
) -> None:
    clock = [start]
    monkeypatch.setattr(_ratelimit, "_now", lambda: clock[0])
    with RateLimiter(1e9 / emission, burst=burst) as lim:
        window = lim._windows[0]
        gcra = Gcra([window])
        expected = gcra.initial()
        reserved: list[tuple[int, int]] = []  # (units after take, weight), as the limiter keeps
        for op, advance, drawn in script:
            clock[0] += advance
            weight = min(drawn, burst)
            if op == "try":
                _, new = gcra.take(expected, clock[0], weight)
                assert lim.try_acquire(weight) is (new is not None)
                if new is not None:
                    assert lim._last_admit_ns == clock[0]
            elif op == "reserve":
                _, new = gcra.take(expected, clock[0], weight, 5_000)
                assert (lim.reserve(weight, within=5e-6) <= 5e-6) is (new is not None)
                if new is not None:
                    reserved.append((new[0], weight))
            elif reserved:
                units_at_take, w = reserved.pop()
                new = gcra.refund(expected, w, units_at_take)
                lim.refund(w)
            else:
                continue
            if new is not None:
                expected = new
            assert lim._state_for_tests() == expected


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


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    emission=st.sampled_from([1, 1_000, 50_000]),
    burst=st.sampled_from([1, 3, 64]),
    script=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2),  # which instance
            st.sampled_from([0, 0, 1, 7, 100, 10_000, 10**6, 10**8]),  # clock advance, ns
            st.integers(min_value=1, max_value=64),  # weight (capped at the burst below)
        ),
        min_size=1,
        max_size=80,
    ),
)
def test_instances_sharing_a_limiter_never_exceed_its_bound(
    monkeypatch: pytest.MonkeyPatch,
    emission: int,
    burst: int,
    script: list[tuple[int, int, int]],
) -> None:
    """The promise itself, not a model of the code: however three instances of one limiter
    take tokens, the units that succeed at any set of instants never exceed the burst plus the
    span at the rate (Window.max_units), checked over every span the admissions define."""
    clock = [10**12]
    monkeypatch.setattr(_ratelimit, "_now", lambda: clock[0])
    name = unique_name()
    with (
        RateLimiter(1e9 / emission, burst=burst, name=name) as a,
        RateLimiter(1e9 / emission, burst=burst, name=name) as b,
        RateLimiter(1e9 / emission, burst=burst, name=name) as c,
    ):
        window = a._windows[0]
        events: list[tuple[int, int]] = []
        for which, advance, drawn in script:
            clock[0] += advance
            weight = min(drawn, burst)
            if (a, b, c)[which].try_acquire(weight):
                events.append((clock[0], weight))
        times = sorted({t for t, _ in events})
        for i, start in enumerate(times):
            for end in times[i:]:
                got = sum(w for t, w in events if start <= t <= end)
                assert got <= window.max_units(end - start), (start, end, events)
