"""RateLimiter across processes: children (spawn, forkserver) and unrelated processes."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from pyrate_limiter import Duration, Rate
from rlhelpers import (
    NS,
    Event,
    check_no_leftovers,
    count_tries,
    hammer,
    max_in_window,
    unique_name,
)

from procdispatch._limiter.limiter import RateLimiter

HOURLY = 1 / 3600
CTX = multiprocessing.get_context("forkserver")


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield from check_no_leftovers()


def run_hammers(limiter: RateLimiter, modes: list[str], seconds: float) -> list[tuple[int, int]]:
    """Run one hammer process per mode for ``seconds`` from a common start; merged admissions."""
    pipes, procs = [], []
    for mode in modes:
        ours, theirs = CTX.Pipe()
        p = CTX.Process(target=hammer, args=(limiter, theirs, mode))
        p.start()
        pipes.append(ours)
        procs.append(p)
    try:
        for conn in pipes:
            assert conn.poll(60), "hammer process did not start"
            assert conn.recv() == "ready"
        end = time.monotonic_ns() + int(seconds * NS)
        for conn in pipes:
            conn.send(end)
        events: list[Event] = []
        for conn in pipes:
            assert conn.poll(seconds + 60), "hammer process did not report"
            events += conn.recv()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        check_pinned(events)
        return events
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def check_pinned(events: list[Event]) -> None:
    """Takes from the pool are known only to lie within their call; the window checks count
    them only where the whole call fits, so they must mostly be short for those checks to
    mean anything (a call is a few microseconds unless the process was preempted)."""
    total = sum(e[-1] for e in events)
    pinned = sum(e[-1] for e in events if len(e) == 2 or e[1] - e[0] < 5_000_000)
    assert pinned >= 0.8 * total, f"only {pinned} of {total} admissions pinned within 5 ms"


def test_four_processes_at_200_per_second_never_exceed_rate_plus_burst_in_any_second() -> None:
    burst = 5
    with RateLimiter(200.0, burst=burst) as lim:
        events = run_hammers(lim, ["acquire", "acquire2", "reserve", "try"], seconds=3.0)
    assert events, "no process got a single token"
    # A hard guarantee of the algorithm, checked over every closed 1-second window.
    assert max_in_window(events, NS) <= 200 + burst
    assert max_in_window(events, 0) <= burst


def test_multi_window_limits_hold_across_processes() -> None:
    rates = [Rate(10, 200), Rate(30, Duration.SECOND)]
    with RateLimiter(rates, burst=3) as lim:
        events = run_hammers(lim, ["acquire", "book", "reserve", "try"], seconds=2.0)
    assert events
    assert max_in_window(events, 200_000_000) <= 10
    assert max_in_window(events, NS) <= 30


def test_spawn_child_gets_the_same_budget_through_pickling() -> None:
    ctx = multiprocessing.get_context("spawn")
    with RateLimiter(HOURLY, burst=3) as lim:
        assert lim.try_acquire() is True
        reader, writer = ctx.Pipe(duplex=False)
        child = ctx.Process(target=count_tries, args=(lim, 5, writer))
        child.start()
        assert reader.poll(60), "spawn child did not answer"
        assert reader.recv() == 2
        child.join(30)
        assert child.exitcode == 0
        assert lim.try_acquire() is False


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unrelated_process_opening_the_name_shares_the_budget() -> None:
    name = unique_name()
    with RateLimiter(HOURLY, burst=5, name=name) as lim:
        assert lim.try_acquire(2) is True
        done = run_python(f"""
            from procdispatch._limiter.limiter import RateLimiter
            with RateLimiter({HOURLY!r}, burst=5, name={name!r}) as lim:
                print(sum(lim.try_acquire() for _ in range(10)))
        """)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["3"]
        assert lim.try_acquire() is False


def test_a_pickle_opened_by_an_unrelated_process_shares_the_budget() -> None:
    with RateLimiter(HOURLY, burst=4) as lim:
        assert lim.try_acquire() is True
        done = run_python(f"""
            import pickle
            lim = pickle.loads(bytes.fromhex({pickle.dumps(lim).hex()!r}))
            print(sum(lim.try_acquire() for _ in range(10)))
            lim.close()
        """)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["3"]
        assert lim.try_acquire() is False


def test_unrelated_process_with_other_rate_for_the_name_gets_options_error() -> None:
    name = unique_name()
    with RateLimiter(HOURLY, burst=5, name=name):
        done = run_python(f"""
            from procdispatch._limiter.limiter import RateLimiter
            from procdispatch.errors import OptionsError
            try:
                RateLimiter(10.0, burst=5, name={name!r})
            except OptionsError as exc:
                print("refused:", exc)
        """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        f"refused: rate must match the limiter already open under name='{name}'"
    )
