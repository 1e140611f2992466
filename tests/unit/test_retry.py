"""Unit tests for procdispatch.retry: delay sequences and option validation."""

from __future__ import annotations

import itertools
import math

import pytest

from procdispatch import retry
from procdispatch.errors import OptionsError


def take(it: object, n: int) -> list[float]:
    return list(itertools.islice(it, n))  # type: ignore[call-overload]


# ---- exponential ------------------------------------------------------------------------------


def test_exponential_default_sequence_matches_reference() -> None:
    delays = take(retry.exponential()(), 5)
    assert delays == pytest.approx([0.2, 0.24, 0.288, 0.3456, 0.41472])


def test_exponential_caps_at_max_delay_then_constant_forever() -> None:
    it = retry.exponential(initial=1.0, multiplier=2.0, max_delay=5.0)()
    delays = take(it, 10)
    assert delays == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    # ...and it never stops.
    assert take(it, 1000) == [5.0] * 1000


def test_exponential_default_reaches_sixty_seconds_and_stays() -> None:
    delays = take(retry.exponential()(), 200)
    assert max(delays) == 60.0
    first_cap = delays.index(60.0)
    # 0.2 * 1.2**31 = 56.97..., 0.2 * 1.2**32 = 68.36... -> the 33rd delay is the first capped one.
    assert first_cap == 32
    assert delays[first_cap - 1] == pytest.approx(0.2 * 1.2**31)
    assert all(d == 60.0 for d in delays[first_cap:])
    assert all(a <= b for a, b in itertools.pairwise(delays))


def test_exponential_initial_above_max_delay_is_capped() -> None:
    assert take(retry.exponential(initial=10.0, max_delay=3.0)(), 3) == [3.0, 3.0, 3.0]


def test_exponential_multiplier_one_is_constant() -> None:
    assert take(retry.exponential(initial=0.5, multiplier=1)(), 4) == [0.5] * 4


@pytest.mark.parametrize(("max_attempts", "n_delays"), [(1, 0), (2, 1), (3, 2), (5, 4)])
def test_exponential_max_attempts_counts_sends(max_attempts: int, n_delays: int) -> None:
    delays = list(retry.exponential(max_attempts=max_attempts)())
    assert len(delays) == n_delays
    assert delays == pytest.approx([0.2, 0.24, 0.288, 0.3456][:n_delays])


def test_exponential_max_attempts_three_gives_exactly_two_delays() -> None:
    it = retry.exponential(max_attempts=3)()
    assert next(it) == pytest.approx(0.2)
    assert next(it) == pytest.approx(0.24)
    with pytest.raises(StopIteration):
        next(it)


def test_exponential_factory_gives_fresh_independent_iterators() -> None:
    factory = retry.exponential(max_attempts=3)
    a = factory()
    assert next(a) == pytest.approx(0.2)
    b = factory()
    assert next(b) == pytest.approx(0.2)  # b starts over
    assert next(a) == pytest.approx(0.24)  # a is not disturbed by b
    assert list(a) == []
    assert list(b) == pytest.approx([0.24])


def test_exponential_zero_initial_is_allowed() -> None:
    assert take(retry.exponential(initial=0)(), 3) == [0.0, 0.0, 0.0]


# ---- limited / none ---------------------------------------------------------------------------


def test_limited_yields_retries_delays_then_stops() -> None:
    assert list(retry.limited(3, 0.5)()) == [0.5, 0.5, 0.5]


def test_limited_default_delay_is_zero() -> None:
    assert list(retry.limited(2)()) == [0.0, 0.0]


def test_limited_zero_retries_stops_at_once() -> None:
    assert list(retry.limited(0, 1.0)()) == []


def test_limited_factory_gives_fresh_iterators() -> None:
    factory = retry.limited(1, 2.0)
    a = factory()
    assert list(a) == [2.0]
    assert list(a) == []
    assert list(factory()) == [2.0]


def test_limited_delays_are_floats() -> None:
    (d,) = retry.limited(1, 2)()
    assert isinstance(d, float)


def test_none_never_retries() -> None:
    factory = retry.none()
    with pytest.raises(StopIteration):
        next(factory())
    assert list(factory()) == []


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": -0.1}, "exponential.initial must be a number of seconds >= 0 (got -0.1)"),
        ({"initial": math.nan}, "exponential.initial must be a number of seconds >= 0 (got nan)"),
        ({"initial": "1"}, "exponential.initial must be a number of seconds >= 0 (got '1')"),
        ({"initial": True}, "exponential.initial must be a number of seconds >= 0 (got True)"),
        ({"max_delay": -1}, "exponential.max_delay must be a number of seconds >= 0 (got -1)"),
        ({"multiplier": 0.5}, "exponential.multiplier must be a number >= 1 (got 0.5)"),
        ({"multiplier": math.nan}, "exponential.multiplier must be a number >= 1 (got nan)"),
        ({"multiplier": None}, "exponential.multiplier must be a number >= 1 (got None)"),
        ({"max_attempts": 0}, "exponential.max_attempts must be >= 1 or None (got 0)"),
        ({"max_attempts": -2}, "exponential.max_attempts must be >= 1 or None (got -2)"),
        ({"max_attempts": 2.0}, "exponential.max_attempts must be >= 1 or None (got 2.0)"),
        ({"max_attempts": True}, "exponential.max_attempts must be >= 1 or None (got True)"),
    ],
)
def test_exponential_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(OptionsError) as info:
        retry.exponential(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1,), "limited.retries must be an int >= 0 (got -1)"),
        ((1.5,), "limited.retries must be an int >= 0 (got 1.5)"),
        ((True,), "limited.retries must be an int >= 0 (got True)"),
        ((None,), "limited.retries must be an int >= 0 (got None)"),
        ((1, -0.5), "limited.delay must be a number of seconds >= 0 (got -0.5)"),
        ((1, math.nan), "limited.delay must be a number of seconds >= 0 (got nan)"),
        ((1, "0"), "limited.delay must be a number of seconds >= 0 (got '0')"),
    ],
)
def test_limited_validation(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(OptionsError) as info:
        retry.limited(*args)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_validation_happens_when_the_factory_is_made_not_when_used() -> None:
    # A bad option must fail at construction time, not later inside the coordinator.
    with pytest.raises(OptionsError):
        retry.exponential(initial=-1)
    with pytest.raises(OptionsError):
        retry.limited(-1)
