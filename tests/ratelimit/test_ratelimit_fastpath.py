"""The pool: takes that need no lock, charged at the next settle. With a literal clock: what a
take from the pool, a refund of one and a short read do to the page; that a steady caller
still gets the whole rate; and, over random scripts of every operation by three instances,
that the admissions never break the bound of any window."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pyrate_limiter import Rate
from rlhelpers import check_no_leftovers, unique_name

from procdispatch._limiter import limiter as _ratelimit
from procdispatch._limiter import locked as _rllocked
from procdispatch._limiter import state as _rlstate
from procdispatch._limiter.limiter import RateLimiter


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield from check_no_leftovers()


@contextlib.contextmanager
def sharing(rate: float | tuple[Rate, ...], burst: int, n: int) -> Iterator[list[RateLimiter]]:
    """``n`` instances of one limiter (one name), as separate processes would hold it."""
    name = unique_name()
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(RateLimiter(rate, burst=burst, name=name)) for _ in range(n)]


def literal_clock(monkeypatch: pytest.MonkeyPatch, start: int) -> list[int]:
    """The limiter's clock, as ``clock[0]`` nanoseconds that only the test moves."""
    clock = [start]
    monkeypatch.setattr(_ratelimit, "_now", lambda: clock[0])
    monkeypatch.setattr(_rlstate, "_now", lambda: clock[0])
    return clock


def test_takes_from_the_pool_are_charged_at_the_next_settle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = literal_clock(monkeypatch, 10**12)
    with RateLimiter(1000.0, burst=4) as lim:  # 1 ms per token
        assert lim.try_acquire()  # pool empty: decided under the lock, then the pool refilled
        assert lim._last_admit_ns == clock[0]
        assert lim._pool_for_tests() == (3, 3)
        assert lim.try_acquire(2)  # from the pool: one read, nothing charged yet
        assert lim._last_admit_ns is None
        assert lim._pool_for_tests() == (3, 1)
        clock[0] += 500_000
        # A settle charges the two taken at its own time (later than they were used: strict).
        assert lim._state_for_tests() == (3, 10**12 + 500_000, 10**12 + 3_000_000)
        assert lim._pool_for_tests() == (1, 1)
        assert lim.try_acquire()
        assert lim.try_acquire() is False  # one of the 4 ms left after the charge, now used


def test_a_refunded_take_from_the_pool_goes_back_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    literal_clock(monkeypatch, 10**12)
    with RateLimiter(1000.0, burst=4) as lim:
        assert lim.try_acquire()
        before = lim._state_for_tests()
        assert lim._pool_for_tests() == (3, 3)
        assert lim.reserve(2) == 0.0  # from the pool
        assert lim._pool_for_tests() == (3, 1)
        lim.refund(2)  # no settle since: as if never taken
        assert lim._pool_for_tests() == (3, 3)
        assert lim._state_for_tests() == before
        assert lim.reserve(2) == 0.0
        assert lim._state_for_tests()[0] == before[0] + 2  # a settle in between charged them
        lim.refund(2)  # so it is taken off the charge (exact: nothing admitted since)
        # The units stay counted (they count admissions, never decreased); the TAT goes back.
        assert lim._state_for_tests() == (before[0] + 2, before[1], before[2])
        assert [lim.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_a_pool_reserve_refunded_in_parts_never_frees_more_than_it_took(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first part goes back into the pool uncharged; the update that does so charges the
    rest, so the second part is refunded from a count that leaves the first out."""
    s = 10**9
    clock = literal_clock(monkeypatch, 100 * s)
    with RateLimiter(1.0, burst=3) as lim:  # 1 s per token
        lim._state_for_tests()  # an update: the pool holds the burst
        assert lim.reserve(3) == 0.0  # all three from the pool at t=100
        lim.refund(1)
        clock[0] = 200 * s
        assert lim.try_acquire()  # at t=200
        lim.refund(2)
        more = 0
        while lim.try_acquire():
            more += 1
        assert 1 + more <= 3  # at most the burst at one instant


@pytest.mark.parametrize("where", ["before the count", "between the count and the take"])
def test_a_take_read_during_an_update_is_charged_no_earlier_than_it_happened(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Another process reads the pool while this one updates the page under its lock (here,
    injected 1 ms into the update): the update's time is read after its last look at the pool,
    so the booking it makes leaves room for that read."""
    s = 10**9
    clock = literal_clock(monkeypatch, 100 * s)
    with sharing(1.0, 2, 2) as (a, other):
        taken: list[int] = []
        armed = [False]

        def meanwhile() -> None:
            if armed[0]:
                armed[0] = False
                clock[0] += 1_000_000
                taken.extend([clock[0]] * len(os.read(other._page.files.pipe, 2)))

        real_count, real_read, real_flock = (
            _rlstate._pool_count,
            _rlstate._read_some,
            _rllocked._flock,
        )

        def count(pipe: int) -> int:
            if where == "before the count":
                meanwhile()
            return real_count(pipe)

        def read_some(pipe: int, n: int) -> int:
            if where != "before the count":
                meanwhile()
            return real_read(pipe, n)

        def flock(fd: int, op: int) -> None:
            if op == _rllocked._EX and fd == a._page.files.fd and not taken and not armed[0]:
                other._state_for_tests()  # the other process filled the pool meanwhile
                armed[0] = True
            real_flock(fd, op)

        monkeypatch.setattr(_rlstate, "_pool_count", count)
        monkeypatch.setattr(_rlstate, "_read_some", read_some)
        monkeypatch.setattr(_rllocked, "_flock", flock)
        assert a.reserve(1, within=5.0) > 0  # nothing in the pool when looked at: booked
        assert taken == [100 * s + 1_000_000] * 2
        booked = a._last_admit_ns
        assert booked is not None
        assert booked - taken[0] >= s  # 3 in a span shorter than 1 s would break burst 2


def test_an_interrupted_refund_called_again_gives_back_nothing_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = 10**9
    literal_clock(monkeypatch, 100 * s)
    with RateLimiter(1.0, burst=3) as lim:
        lim._state_for_tests()  # the pool holds the burst
        assert lim.reserve(3) == 0.0
        real = _rlstate._pool_count

        def interrupted(pipe: int) -> int:  # a Ctrl-C inside the refund's update
            monkeypatch.setattr(_rlstate, "_pool_count", real)
            raise KeyboardInterrupt

        monkeypatch.setattr(_rlstate, "_pool_count", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lim.refund(3)
        with pytest.raises(ValueError, match="must not exceed the 0 token"):
            lim.refund(3)  # the caller tries again: the reservation is already used up
        got = 0
        while lim.try_acquire():
            got += 1
        assert got <= 3


def test_a_pool_take_whose_count_may_be_torn_is_refunded_strictly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reserve reads seq, then the unit count of seq's slot. If the page moved on in between,
    that slot may hold an update whose writer was killed before publishing it (a count of
    takes that never happened): the refund must not trust it, so the tokens stay spent."""
    s = 10**9
    clock = literal_clock(monkeypatch, 100 * s)
    with sharing(1.0, 3, 2) as (a, other):
        other._state_for_tests()  # the pool holds the burst
        real = a._page.files.mv
        reads = [0]

        class Moving:  # the page as `a` sees it: another update publishes after seq is read
            def __getitem__(self, i: int) -> int:
                value = real[i]
                reads[0] += 1
                if reads[0] == 1:
                    other._state_for_tests()
                return int(value)

            def __setitem__(self, i: int, v: int) -> None:
                real[i] = v

        monkeypatch.setattr(a._page.files, "mv", Moving())
        assert a.reserve(1) == 0.0
        monkeypatch.setattr(a._page.files, "mv", real)
        assert a._page.local.reserved[-1][2] == 0  # floor unknown
        before = a._state_for_tests()
        clock[0] += 5 * s
        a.refund(1)  # a settle has charged it (seq moved): it stays spent
        assert a._state_for_tests()[2] == before[2]


def test_a_take_uses_the_pool_and_what_conforms_beyond_it_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = literal_clock(monkeypatch, 10**12)
    with RateLimiter(1000.0, burst=4) as lim:  # 1 ms per token
        assert lim.try_acquire(2)
        assert lim._pool_for_tests() == (2, 2)
        # 2 in the pool, nothing beyond: a short read, given back, and no charge.
        assert lim.try_acquire(3) is False
        assert lim._pool_for_tests() == (2, 2)
        assert lim._state_for_tests()[0] == 2
        clock[0] += 1_000_000
        # 3 conform now, 2 of them in the pool: taken together (else a weight whose sum with
        # the pool is above the burst could never go).
        assert lim.try_acquire(3)
        assert lim._pool_for_tests() == (0, 0)
        assert lim._state_for_tests() == (5, 10**12 + 1_000_000, 10**12 + 5_000_000)


def test_a_steady_caller_gets_the_full_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Charging takes from the pool late must not cost throughput: a caller trying every
    100 us at 1000/s gets the rate, plus the burst, to the token."""
    clock = literal_clock(monkeypatch, 10**12)
    with RateLimiter(1000.0, burst=3) as lim:
        got = 0
        for _ in range(20_000):  # 2 s
            got += lim.try_acquire()
            clock[0] += 100_000
        assert 1999 + 3 - 1 <= got <= 2000 + 3


ops = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2),  # which instance
        st.sampled_from(["try", "try", "reserve", "book", "refund", "acquire"]),
        st.sampled_from([0, 0, 1, 7, 100, 10_000, 10**6, 10**8]),  # clock advance, ns
        st.integers(min_value=1, max_value=64),  # weight (capped at the burst below)
    ),
    min_size=1,
    max_size=80,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(
    rate=(1e6, 3),
    script=[
        (0, "try", 0, 1),
        (0, "reserve", 0, 2),
        (0, "refund", 0, 1),
        (1, "try", 10_000, 1),
        (0, "refund", 0, 1),
        (1, "try", 0, 3),
        (1, "try", 0, 1),
        (1, "try", 0, 1),
    ],
)
@given(
    rate=st.sampled_from(
        [
            (1e9, 1),
            (1e9, 64),
            (1e6, 3),
            (2e4, 1),
            (2e4, 64),
            ((Rate(4, 10), Rate(10, 100)), 1),
            ((Rate(4, 10), Rate(10, 100)), 3),
        ]
    ),
    script=ops,
)
def test_instances_sharing_a_limiter_never_exceed_its_bound(
    monkeypatch: pytest.MonkeyPatch,
    rate: tuple[float | tuple[Rate, ...], int],
    script: list[tuple[int, str, int, int]],
) -> None:
    """The promise itself, not a model of the code: however three instances of one limiter
    take, book and give back tokens (from the pool or under the lock), the units admitted at
    any set of instants never exceed the burst plus the span at the rate (Window.max_units),
    checked over every span the admissions define. Booked tokens count at their booked time;
    refunded ones not at all."""
    clock = literal_clock(monkeypatch, 10**12)
    spec, burst = rate
    with sharing(spec, burst, 3) as (a, b, c):
        emission = min(w.emission_ns for w in a._windows)
        events: list[list[int]] = []  # [admission time, weight still counted]
        reserved: list[list[list[int]]] = [[], [], []]  # each instance's reserve() events
        for which, op, advance, drawn in script:
            clock[0] += advance
            lim = (a, b, c)[which]
            weight = min(drawn, burst)
            if op == "try":
                if lim.try_acquire(weight):
                    events.append([clock[0], weight])
            elif op == "acquire":
                if lim.acquire(weight, timeout=0):
                    events.append([clock[0], weight])
            elif op in ("reserve", "book"):
                within = 0.0 if op == "reserve" else 2e-6 * emission
                delay = lim.reserve(weight, within=within)
                if delay <= within:
                    at = clock[0] if lim._last_admit_ns is None else lim._last_admit_ns
                    events.append([at, weight])
                    reserved[which].append(events[-1])
            elif reserved[which]:
                entry = reserved[which][-1]
                back = min(weight, entry[1])
                lim.refund(back)
                entry[1] -= back
                if not entry[1]:
                    reserved[which].pop()
        counted = [(t, w) for t, w in events if w]
        times = sorted({t for t, _ in counted})
        for i, start in enumerate(times):
            for end in times[i:]:
                got = sum(w for t, w in counted if start <= t <= end)
                for window in a._windows:
                    assert got <= window.max_units(end - start), (window, start, end, counted)


def test_try_acquire_keeps_a_later_booked_admission_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refunded booking leaves its admission time as the latest; a try_acquire that succeeds
    before that time must not move it back (later refunds rely on it)."""
    ms = 1_000_000
    t0 = 10**12
    clock = literal_clock(monkeypatch, t0)
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
