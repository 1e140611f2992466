"""RateLimiter in one process: the API contract, validation, sharing by name, file lifetime."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import stat
import sys
import threading
import time
import warnings
from collections.abc import Iterator

import pytest
from pyrate_limiter import Duration, Rate
from rlhelpers import check_no_leftovers, count_tries, discard, our_files, unique_name

from procdispatch._limiter.limiter import _SLOTS, _W_SEQ, RateLimiter
from procdispatch._limiter.shmpage import paths
from procdispatch.errors import OptionsError

HOURLY = 1 / 3600  # slow enough that nothing refills while a test runs


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield from check_no_leftovers()


def test_try_acquire_takes_the_burst_then_refuses() -> None:
    with RateLimiter(HOURLY, burst=3) as lim:
        assert [lim.try_acquire() for _ in range(4)] == [True, True, True, False]
        assert lim.try_acquire() is False


def test_reserve_returns_zero_and_takes_or_the_wait_and_takes_nothing() -> None:
    with RateLimiter(10.0, burst=2) as lim:
        assert lim.reserve() == 0.0
        assert lim.reserve(1) == 0.0
        wait = lim.reserve()
        assert 0.0 < wait <= 0.1
        assert lim.reserve() > 0.0  # a refused reserve took nothing: still refused
        lim.refund()  # gives back the second reservation
        assert lim.try_acquire() is True
        assert lim.try_acquire() is False


def test_reserve_within_books_a_near_slot_and_says_when() -> None:
    with RateLimiter(1 / 60, burst=1) as lim:  # one a minute: no test is slow enough to matter
        minute = lim._windows[0].emission_ns  # 60 s, give or take the rounding of 1/60
        assert lim.reserve(within=100) == 0.0
        first = lim._last_admit_ns
        delay = lim.reserve(within=100)  # booked for a minute after the first
        assert 50 < delay <= 60
        assert lim._last_admit_ns == first + minute
        # The next slot is two minutes out: nothing taken, and the answer exceeds `within`.
        assert lim.reserve(within=90) > 90
        assert lim.reserve() > 60
        lim.refund()  # cancels the booking: the next booking gets its slot again
        assert 50 < lim.reserve(within=100) <= 60
        assert lim._last_admit_ns == first + minute


@pytest.mark.parametrize("within", [-0.5, float("nan"), None, "1", True])
def test_bad_within_raises_options_error(within: object) -> None:
    with (
        RateLimiter(HOURLY) as lim,
        pytest.raises(
            OptionsError,
            match=r"^RateLimiter\.reserve\(\): within must be a number of seconds >= 0 \(got ",
        ),
    ):
        lim.reserve(within=within)  # type: ignore[arg-type]


def test_refund_cancels_this_threads_latest_reserve_and_no_more() -> None:
    with RateLimiter(HOURLY, burst=4) as lim:
        with pytest.raises(ValueError, match="must not exceed the 0 token"):
            lim.refund()
        assert lim.reserve(3) == 0.0
        with pytest.raises(ValueError, match=r"refund\(weight=4\) must not exceed the 3 token"):
            lim.refund(4)
        lim.refund(2)
        lim.refund(1)
        with pytest.raises(ValueError, match="must not exceed the 0 token"):
            lim.refund()
        assert [lim.try_acquire() for _ in range(5)] == [True] * 4 + [False]


def test_refund_belongs_to_the_thread_that_reserved() -> None:
    with RateLimiter(HOURLY, burst=2) as lim:
        assert lim.reserve() == 0.0
        errors: list[BaseException] = []

        def other() -> None:
            try:
                lim.refund()
            except ValueError as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1
        lim.refund()


def test_acquire_books_the_earliest_slot_and_sleeps_until_it() -> None:
    with RateLimiter(20.0, burst=1) as lim:  # one every 50 ms
        assert lim.acquire() is True
        first = lim._last_admit_ns
        assert lim.acquire(timeout=10) is True
        # Booked one emission interval later (or later still if this thread was held up), and
        # never returns before its slot.
        assert lim._last_admit_ns >= first + 50_000_000
        assert time.monotonic_ns() >= lim._last_admit_ns


def test_acquire_gives_up_at_once_when_the_slot_is_beyond_the_timeout() -> None:
    with RateLimiter(HOURLY, burst=1) as lim:
        assert lim.acquire(timeout=0) is True
        start = time.monotonic()
        assert lim.acquire(timeout=5.0) is False
        assert time.monotonic() - start < 5.0  # decided without waiting for the timeout
        assert lim.reserve() > 3000  # and nothing was booked


@pytest.mark.parametrize("weight", [0, -1, 4, 1.0, True, "1", None])
def test_bad_weights_raise_options_error(weight: object) -> None:
    with RateLimiter(HOURLY, burst=3) as lim:
        for call in (lim.try_acquire, lim.acquire, lim.reserve, lim.refund):
            with pytest.raises(OptionsError, match=r"weight must be an int from 1 to 3 .*\(got "):
                call(weight)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
def test_bad_timeouts_raise_options_error(timeout: object) -> None:
    with (
        RateLimiter(HOURLY) as lim,
        pytest.raises(
            OptionsError,
            match=r"^RateLimiter\.acquire\(\): timeout must be None or a number of seconds >= 0",
        ),
    ):
        lim.acquire(timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rate", "burst", "name", "message"),
    [
        (0.0, 1, None, "rate must be a finite number of events per second > 0 (got 0.0)"),
        (float("nan"), 1, None, "rate must be a finite number"),
        (float("inf"), 1, None, "rate must be a finite number"),
        (5.0, 0, None, "burst must be an int >= 1 (got 0)"),
        (5.0, 1.5, None, "burst must be an int >= 1 (got 1.5)"),
        ([], 1, None, "rate must hold 1 to 32 Rate objects (got [])"),
        (Rate(2, Duration.SECOND), 3, None, "burst must be <= the smallest Rate.limit, 2 (got 3)"),
        (5.0, 1, "", "name must be a non-empty str or None (got '')"),
        (5.0, 1, 7, "name must be a non-empty str or None (got 7)"),
    ],
)
def test_invalid_arguments_raise_options_error(
    rate: object, burst: object, name: object, message: str
) -> None:
    with pytest.raises(OptionsError) as info:
        RateLimiter(rate, burst=burst, name=name)  # type: ignore[arg-type]
    assert message in str(info.value)
    if name is None:
        with pytest.raises(OptionsError):
            RateLimiter.check_rates(rate, burst)
    assert not our_files()


def test_check_rates_names_the_options_as_the_caller_spelled_them() -> None:
    with pytest.raises(OptionsError) as info:
        RateLimiter.check_rates("fast", 1, what="qps_limit", burst_what="qps_burst")
    assert str(info.value) == (
        "qps_limit must be a number of events per second > 0, a pyrate-limiter Rate or a "
        "sequence of Rates (got 'fast')"
    )
    with pytest.raises(OptionsError, match=r"^qps_burst must be an int >= 1 \(got 0\)$"):
        RateLimiter.check_rates(5.0, 0, what="qps_limit", burst_what="qps_burst")
    with pytest.raises(OptionsError, match=r"^rate must be a finite number of events"):
        RateLimiter.check_rates(0.0)  # the constructor's own names by default
    RateLimiter.check_rates(Rate(5, Duration.SECOND, burst=2), what="qps_limit")
    assert not our_files()


def test_a_rate_with_its_own_burst_lets_that_many_go_at_once() -> None:
    with RateLimiter(Rate(4, Duration.HOUR, burst=2)) as lim:
        assert [lim.try_acquire() for _ in range(3)] == [True, True, False]
        with pytest.raises(OptionsError, match=r"weight must be an int from 1 to 2 "):
            lim.try_acquire(3)
        # Then 4 - 2 + 1 = 3 per hour: the third of the hour 20 minutes on.
        assert 1190 < lim.reserve() <= 1200
    with pytest.raises(OptionsError, match=r"Rate\.burst of rate must be an int from 1 to"):
        RateLimiter(Rate(4, Duration.HOUR, burst=5))


def test_two_instances_with_one_name_share_one_budget() -> None:
    name = unique_name()
    with RateLimiter(HOURLY, burst=5, name=name) as a, RateLimiter(HOURLY, burst=5, name=name) as b:
        assert a.try_acquire(3) is True
        assert b.try_acquire(3) is False
        assert b.try_acquire(2) is True
        assert a.try_acquire() is False


def test_any_string_is_a_name() -> None:
    name = f"{unique_name()} / with spaces, slashes and ünïcode " + "x" * 100
    with RateLimiter(HOURLY, burst=2, name=name) as a, RateLimiter(HOURLY, burst=2, name=name) as b:
        assert os.path.basename(paths(name)[0]).startswith("procdispatch-rl-")
        assert a.try_acquire(2) is True
        assert b.try_acquire() is False
    with RateLimiter(HOURLY, burst=2, name=name) as c:  # kept for its debt, under the hash
        assert c.try_acquire() is False
    discard(name)
    assert not os.path.exists(paths(name)[0])


def test_opening_a_name_with_other_rate_parameters_is_refused() -> None:
    name = unique_name()
    with RateLimiter(HOURLY, burst=5, name=name):
        with pytest.raises(
            OptionsError, match=rf"rate must match the limiter already open under name='{name}'"
        ):
            RateLimiter(HOURLY, burst=4, name=name)
        with pytest.raises(OptionsError, match="rate must match"):
            RateLimiter([Rate(5, 2 * Duration.HOUR)], burst=5, name=name)
    # Once every user is gone the name is free for any rate.
    with RateLimiter(2.0, name=name) as c:
        assert c.try_acquire() is True


def test_multi_window_limits_all_hold() -> None:
    # burst 3 of a 3-per-second window; the minute window allows 4 with the same burst.
    rates = [Rate(3, Duration.SECOND), Rate(4, Duration.MINUTE)]
    with RateLimiter(rates, burst=3) as lim:
        assert [lim.try_acquire() for _ in range(4)] == [True, True, True, False]
        # The second window decides: the 4th unit of the minute comes 30 s after the start.
        assert 29.0 < lim.reserve() <= 30.0
        assert lim.rate_per_second == pytest.approx(2 / 60)


def test_threads_sharing_an_instance_never_overdraw() -> None:
    with RateLimiter(HOURLY, burst=50) as lim:
        wins = [0] * 8

        def grab(i: int) -> None:
            for _ in range(40):
                wins[i] += lim.try_acquire()

        threads = [threading.Thread(target=grab, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(wins) == 50


def test_closed_limiter_refuses_use_and_pickling() -> None:
    lim = RateLimiter(5.0)
    lim.close()
    lim.close()  # idempotent
    assert lim.closed
    for call in (lim.try_acquire, lim.acquire, lim.reserve):
        with pytest.raises(ValueError, match="is closed"):
            call()
    with RateLimiter(HOURLY) as other:
        assert other.reserve() == 0.0
        other.close()
        with pytest.raises(ValueError, match="is closed"):
            other.refund()
    with pytest.raises(ValueError, match="cannot pickle"):
        pickle.dumps(lim)
    assert "(closed)" in repr(lim)


def test_repr_name_and_properties() -> None:
    with RateLimiter(200.0, burst=3, name=unique_name()) as lim:
        assert repr(lim).startswith("<RateLimiter 200.0/s, burst=3, name='t")
        assert lim.rate_per_second == 200.0
        assert not lim.closed
    with RateLimiter(Rate(20, Duration.SECOND)) as anon:
        assert anon.name.startswith(f"a{os.getpid()}x")
        assert "[Rate(20, 1000 ms)], burst=1" in repr(anon)


def test_files_exist_while_open_and_go_with_the_last_user_when_they_owe_nothing() -> None:
    name = unique_name()
    files = paths(name)  # the page, the users file and the pool's FIFO
    a = RateLimiter(5.0, burst=2, name=name)
    b = pickle.loads(pickle.dumps(a))
    assert all(os.path.exists(f) for f in files)
    assert stat.S_ISFIFO(os.stat(files[2]).st_mode)
    a.close()
    assert all(os.path.exists(f) for f in files)  # b still uses them
    b.close()  # nothing was ever taken: a fresh page would behave the same
    assert not any(os.path.exists(f) for f in files)


def test_an_unnamed_limiters_files_go_with_its_last_user_even_owing() -> None:
    # Nobody can open it again by its generated name once every copy is gone.
    a = RateLimiter(HOURLY, burst=2)
    b = pickle.loads(pickle.dumps(a))
    files = paths(a.name)
    assert a.try_acquire(2) is True
    a.close()
    assert all(os.path.exists(f) for f in files)
    b.close()
    assert not any(os.path.exists(f) for f in files)


def test_garbage_collected_limiter_releases_its_files() -> None:
    name = unique_name()
    RateLimiter(5.0, name=name)  # dropped at once
    assert not os.path.exists(paths(name)[0])


def test_a_torn_write_into_the_idle_slot_changes_nothing() -> None:
    # What a writer SIGKILLed mid-update leaves behind: garbage in the idle slot, seq untouched.
    with RateLimiter(HOURLY, burst=3) as lim:
        assert lim.try_acquire() is True
        before = lim._state_for_tests()
        f = lim._page.files
        idle = _SLOTS[~f.mv[_W_SEQ] & 1]
        f.mm[idle : idle + 24] = b"\xa5" * 24
        assert lim._state_for_tests() == before
        assert [lim.try_acquire() for _ in range(3)] == [True, True, False]


@pytest.mark.skipif(sys.platform != "linux", reason="the fork start method is a Linux default")
def test_fork_child_gets_its_own_lock_owner_and_shares_the_budget() -> None:
    ctx = multiprocessing.get_context("fork")
    with RateLimiter(HOURLY, burst=3) as lim:
        assert lim.try_acquire() is True
        reader, writer = ctx.Pipe(duplex=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
            with lim._locked_for_tests():
                child = ctx.Process(target=count_tries, args=(lim, 5, writer))
                child.start()
                # Sharing our open file description would let the child in right now.
                assert not reader.poll(0.2)
        assert reader.poll(30)
        assert reader.recv() == 2
        child.join(30)
        assert child.exitcode == 0
        assert lim.try_acquire() is False
