"""A named limiter's files and budget over time: kept while they owe tokens, gone once they owe
nothing (by the last user or a later sweep), and rejoined by a user whose files were removed
under it. Also what the FIFO holding the pool is sized to, and that a small one is still
correct. Each test keeps its files in a directory of its own, so that no other sweep (another
checkout's tests sharing /dev/shm, say) can judge them."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import sys
from pathlib import Path

import pytest
from rlhelpers import NS, max_in_window, take_burst_then_wait, try_once_named

from procdispatch._limiter import limiter as _ratelimit
from procdispatch._limiter import shmpage as _shmpage
from procdispatch._limiter.limiter import RateLimiter
from procdispatch._limiter.shmpage import paths

CTX = multiprocessing.get_context("forkserver")
HOURLY = 1 / 3600


def page_module() -> object | None:
    return sys.modules.get("procdispatch._limiter.page")


def state_module() -> object:
    return sys.modules.get("procdispatch._limiter.state", _ratelimit)


@pytest.fixture(autouse=True)
def own_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(_shmpage, "segment_dir", lambda: str(tmp_path))
    if page_module() is not None:
        monkeypatch.setattr(page_module(), "segment_dir", lambda: str(tmp_path))
    return str(tmp_path)


def literal_clock(monkeypatch: pytest.MonkeyPatch, start: int) -> list[int]:
    clock = [start]
    for module in (_ratelimit, state_module()):
        monkeypatch.setattr(module, "_now", lambda: clock[0])
    return clock


def test_five_users_one_after_another_keep_to_one_budget(own_dir: str) -> None:
    """Each process opens RateLimiter(1, name=n), tries once and closes; none overlaps the next.
    One budget: no 1-second span holds more than rate + burst = 2 successes, and the first
    takes the only token there is at once."""
    name = "sequential"
    seen = []
    for _ in range(5):
        reader, writer = CTX.Pipe(duplex=False)
        p = CTX.Process(target=try_once_named, args=(own_dir, name, 1.0, 1, writer))
        p.start()
        assert reader.poll(60), "a user did not report"
        seen.append(reader.recv())
        p.join(30)
        assert p.exitcode == 0
    assert seen[0][2] is True
    admitted = [(called, returned, 1) for called, returned, got in seen if got]
    assert max_in_window(admitted, NS) <= 2, seen
    last = seen[-1][1]
    if last - seen[0][0] < NS:  # (all five within a second, as on any machine not overloaded)
        assert len(admitted) == 1


def test_a_kept_limiters_files_stay_while_owed_and_go_once_nothing_is_owed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = 10**9
    clock = literal_clock(monkeypatch, 1000 * s)
    name = "kept"
    with RateLimiter(1.0, burst=3, name=name) as lim:
        assert lim.try_acquire(3)
    assert all(os.path.exists(p) for p in paths(name))  # owes 3 s
    clock[0] += 1 * s
    with RateLimiter(1.0, burst=3, name=name) as again:  # the budget goes on
        assert [again.try_acquire() for _ in range(2)] == [True, False]
    clock[0] += 2 * s  # 2 s after the last take: 1 s of the 3 still owed
    with RateLimiter(5.0):  # any construction sweeps: still owed, so still there
        assert all(os.path.exists(p) for p in paths(name))
    clock[0] += 1 * s  # now a fresh page would behave the same
    with RateLimiter(5.0):
        assert not any(os.path.exists(p) for p in paths(name))


def test_a_last_user_that_owes_nothing_takes_the_files_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = 10**9
    clock = literal_clock(monkeypatch, 1000 * s)
    with RateLimiter(1.0, burst=3, name="gone") as lim:
        assert lim.try_acquire(3)
        clock[0] += 3 * s  # everything taken is paid back by the time it closes
    assert not any(os.path.exists(p) for p in paths("gone"))


def test_a_dead_last_users_page_stays_while_it_owes_and_its_budget_holds(own_dir: str) -> None:
    name = "dead-owing"
    reader, writer = CTX.Pipe(duplex=False)
    owner = CTX.Process(target=take_burst_then_wait, args=(own_dir, name, HOURLY, 4, writer))
    owner.start()
    assert reader.poll(60)
    assert reader.recv() is True
    owner.kill()
    owner.join(30)
    with RateLimiter(5.0):  # a sweep: nobody holds the page, but it owes
        assert os.path.exists(paths(name)[0])
    with RateLimiter(HOURLY, burst=4, name=name) as lim:
        assert lim.try_acquire() is False  # the dead user's takes still count
        assert lim.reserve() > 600


def test_a_user_whose_files_were_removed_moves_to_the_new_ones_with_its_debt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cleaner removes the files under user a; b opens the name and gets new files. At a's
    next update under the lock (its pool is empty), a notices, moves to b's files and brings
    its debt: from then on one budget for both."""
    if page_module() is not None:
        monkeypatch.setattr(page_module(), "RECHECK_NS", 0)
    name = "moved"
    with RateLimiter(HOURLY, burst=5, name=name) as a:
        assert a.try_acquire(5)  # the whole burst: a's pool is empty, a owes 5
        for p in paths(name):
            os.unlink(p)
        with RateLimiter(HOURLY, burst=5, name=name) as b:
            assert os.path.exists(paths(name)[0])
            assert a.try_acquire() is False  # a moves here, carrying its 5
            assert b.try_acquire() is False  # so b's fresh files are spent too
            assert a.reserve() > 3000
            assert a._page.files.ino == b._page.files.ino == os.stat(paths(name)[0]).st_ino


def test_files_removed_without_a_new_user_are_made_again_by_the_old_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if page_module() is not None:
        monkeypatch.setattr(page_module(), "RECHECK_NS", 0)
    name = "remade"
    with RateLimiter(HOURLY, burst=2, name=name) as a:
        assert a.try_acquire(2)
        for p in paths(name):
            os.unlink(p)
        assert a.try_acquire() is False
        assert all(os.path.exists(p) for p in paths(name))  # there again, for others to join
        with RateLimiter(HOURLY, burst=2, name=name) as b:
            assert b.try_acquire() is False  # a's debt came along


def test_a_page_whose_fifo_was_replaced_is_not_trusted_with_its_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the FIFO is removed, and b makes a new one: the page's counts refer to the old FIFO,
    where a still has 3 tokens. b's first update charges them; long after, that charge is
    forgotten (the bucket is full again) and b's refills count bytes in its own FIFO: a must not
    then read the old FIFO's 3 on top of a full bucket. b moves both to new files instead, and
    a, finding its pool recorded empty, follows at its next update."""
    s = 10**9
    clock = literal_clock(monkeypatch, 1000 * s)
    name = "refifo"
    with RateLimiter(1.0, burst=4, name=name) as a:
        assert a.try_acquire()  # decided under the lock: the other 3 wait in a's pool
        os.unlink(paths(name)[2])
        with RateLimiter(1.0, burst=4, name=name) as b:
            assert b.try_acquire() is False  # the 3 in a's pool are charged now
            clock[0] += 100 * s
            got = int(b.try_acquire())  # b's refill: the page counts 3 in the pool again
            # Both read while the page still counts 3 (nobody has fallen short yet): b from its
            # FIFO, a from the old one, unless a knows better.
            got += sum(lim.try_acquire() for lim in (b, b, a, a, a, b, a, b, a, b))
            assert got == 4  # the burst at one instant, no more
            files = getattr(a._page, "files", None)
            assert files is not None
            assert files.ino == b._page.files.ino


def pipe_size(lim: RateLimiter) -> int:
    files = getattr(lim._page, "files", lim._page)
    return int(fcntl.fcntl(files.pipe, fcntl.F_GETPIPE_SZ))


@pytest.mark.skipif(not hasattr(fcntl, "F_GETPIPE_SZ"), reason="pipe sizes are a Linux thing")
def test_the_fifo_is_sized_to_what_the_pool_can_hold() -> None:
    """Pipe memory is a per-user budget (/proc/sys/fs/pipe-user-pages-soft): a limiter's FIFO
    holds at most its burst (capped by the refill chunk), so it is never grown beyond the
    default 64 KiB, and small bursts get the two pages that are enough."""
    with RateLimiter(5.0, burst=3) as small, RateLimiter(1e9, burst=10**6) as huge:
        assert pipe_size(small) == 2 * 4096
        assert pipe_size(huge) == 65536


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="pipe sizes are a Linux thing")
def test_a_fifo_smaller_than_the_burst_still_admits_the_burst_and_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As when the kernel refuses to grow a pipe (a user over its pipe budget gets one page):
    the pool holds less than the burst, takes go through the lock sooner, the bound is kept."""
    s = 10**9
    clock = literal_clock(monkeypatch, 1000 * s)
    burst = 20_000
    with RateLimiter(1000.0, burst=burst) as lim:
        files = getattr(lim._page, "files", lim._page)
        fcntl.fcntl(files.pipe, fcntl.F_SETPIPE_SZ, 4096)
        assert pipe_size(lim) == 4096
        got = 0
        while lim.try_acquire():
            got += 1
            assert got <= burst
        assert got == burst
        clock[0] += s // 1000  # one more token conforms
        assert lim.try_acquire() is True
        assert lim.try_acquire() is False
