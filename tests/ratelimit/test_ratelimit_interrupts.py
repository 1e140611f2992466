"""RateLimiter under interrupts (KeyboardInterrupt, or any exception a signal handler raises).

An interrupt reaches Python code at a function's entry, after a call returns, at a backward jump,
or as the failure of a blocking call (EINTR). The deterministic tests inject one
KeyboardInterrupt at every such point of an operation in turn (function entries and call
returns through ``sys.setprofile``; ``flock`` and ``sleep`` through wrappers that may also fail
before acting, as an interrupted blocking call does), catch it as an application would, and
check that no lock is held, in this process or for others, and that the state is consistent:
whatever was interrupted, the limiter is at worst stricter for a while, never looser, and soon
admits exactly its burst again. (Real signals at random instants: test_ratelimit_crash.)

Finalisers (``__del__``) are left out: Python reports and drops an exception raised in one, and
every lock is released before the object holding it can be finalised, so an interrupt there can
at most leave a descriptor number with nothing on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from rlhelpers import assert_nothing_held

from procdispatch._limiter import limiter as _ratelimit
from procdispatch._limiter import locked as _rllocked
from procdispatch._limiter import page as _rlpage
from procdispatch._limiter import shmpage as _shmpage
from procdispatch._limiter import state as _rlstate
from procdispatch._limiter.limiter import RateLimiter
from procdispatch._limiter.shmpage import paths

OURS = {
    os.path.abspath(m.__file__ or "")
    for m in (
        _ratelimit,
        _rllocked,
        _rlpage,
        _rlstate,
        _shmpage,
        sys.modules["procdispatch._limiter.gcra"],
    )
}
REAL_FLOCK = fcntl.flock
S = 1_000_000_000


class Interrupts:
    """Numbers the points where an interrupt can reach the limiter's code as it runs, and raises
    KeyboardInterrupt at point ``k`` (never, for k = -1)."""

    active: Interrupts | None = None

    def __init__(self, k: int) -> None:
        self.k, self.n, self.fired = k, 0, False

    def point(self) -> None:
        self.n += 1
        if self.n - 1 == self.k:
            self.fired = True
            sys.setprofile(None)
            raise KeyboardInterrupt(f"injected at point {self.k}")

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            if code in WRAPPERS or code.co_name == "__del__":
                return
            caller = frame.f_back
            if _ours(frame) or (caller is not None and _ours(caller)):
                self.point()
        elif event == "c_return" and _ours(frame) and frame.f_code.co_name != "__del__":
            self.point()

    @contextlib.contextmanager
    def armed(self) -> Iterator[Interrupts]:
        Interrupts.active = self
        sys.setprofile(self.profile)
        try:
            yield self
        finally:
            sys.setprofile(None)
            Interrupts.active = None


def _ours(frame: FrameType) -> bool:
    return frame.f_code.co_filename in OURS


def flock(fd: int, op: int) -> None:
    """fcntl.flock as an interrupt sees it: a blocking request may fail before it is granted;
    any request may be followed by an interrupt once it returns."""
    inj = Interrupts.active
    if inj is not None and op & (fcntl.LOCK_EX | fcntl.LOCK_SH) and not op & fcntl.LOCK_NB:
        inj.point()
    REAL_FLOCK(fd, op)
    if inj is not None:
        inj.point()


WRAPPERS = {flock.__code__}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """A literal clock for the limiter, a private directory for its files (nothing else's
    sweep can touch them), the flock wrapper, and a sleep that moves the clock."""
    now = [10**12]
    monkeypatch.setattr(_ratelimit, "_now", lambda: now[0])
    monkeypatch.setattr(_rlstate, "_now", lambda: now[0])
    monkeypatch.setattr(_shmpage, "segment_dir", lambda: str(tmp_path))
    monkeypatch.setattr(_rlpage, "segment_dir", lambda: str(tmp_path))
    monkeypatch.setattr(_rlpage, "RECHECK_NS", 0)
    for module in (_rllocked, _rlpage, _shmpage):
        monkeypatch.setattr(module, "_flock", flock)

    def sleep(seconds: float) -> None:
        inj = Interrupts.active
        if inj is not None:
            inj.point()  # interrupted while asleep
        now[0] += max(1, int(seconds * S))
        if inj is not None:
            inj.point()

    WRAPPERS.add(sleep.__code__)
    monkeypatch.setattr(_ratelimit.time, "sleep", sleep)
    return now


RATE, BURST = 1000.0, 4  # 1 ms per token
EMISSION = 1_000_000


def empty_pool(lim: RateLimiter) -> None:
    """Drain the pool under the lock (its bytes were never charged): the next take decides
    under the lock."""
    with lim._page.locked() as f:
        seq, state, now = lim._ledger.drained(f)
        lim._ledger.publish(f, seq, state, 0, now, refill=False)


def assert_sound(now: list[int], *limiters: RateLimiter) -> None:
    """The pool never holds more than the page counts, and once every debt is long past the
    limiter admits exactly its burst at one instant: interrupted operations may have cost
    tokens for a while (strict), never given any away, never damaged the state."""
    live = [lim for lim in limiters if not lim.closed]
    for lim in live:
        assert not lim._page.tlock.locked()
    recorded, there = live[0]._pool_for_tests()
    assert recorded >= there, (recorded, there)
    now[0] += 100 * EMISSION
    live[0]._state_for_tests()  # charges whatever an interrupted update left unaccounted
    now[0] += 100 * EMISSION
    got = 0
    for i in range(2 * BURST):
        got += live[i % len(live)].try_acquire()
    assert got == BURST


def each_point(
    prepare: Callable[[], RateLimiter], op: Callable[[RateLimiter], object]
) -> Iterator[tuple[RateLimiter, bool]]:
    """For k = 0, 1, ...: prepare, run ``op`` with an interrupt at point k; yield the instance
    and whether the interrupt happened, until a run has no point k left."""
    k = 0
    while True:
        lim = prepare()
        inj = Interrupts(k)
        try:
            with inj.armed():
                op(lim)
        except KeyboardInterrupt:
            assert inj.fired
        gc.collect(0)  # what the interrupt left goes now, not in the middle of the next run
        yield lim, inj.fired
        if not inj.fired:
            assert k >= 3  # the operation did run through some points
            return
        k += 1


@pytest.mark.parametrize(
    "path", ["from the pool", "under the lock", "refused", "short pool read", "acquire with a wait"]
)
def test_an_interrupt_anywhere_in_a_take_holds_nothing_and_harms_nothing(
    clock: list[int], path: str
) -> None:
    name = "interrupted-take"
    with (
        RateLimiter(RATE, burst=BURST, name=name) as a,
        RateLimiter(RATE, burst=BURST, name=name) as b,
    ):

        def prepare() -> RateLimiter:
            clock[0] += 100 * EMISSION
            b._state_for_tests()  # a full bucket, and a full pool
            if path == "under the lock":
                empty_pool(b)
            elif path == "refused":
                empty_pool(b)
                while b.try_acquire():
                    pass
            elif path == "short pool read":
                os.read(b._page.files.pipe, BURST - 2)  # 2 left: a take of 3 falls short
            elif path == "acquire with a wait":
                while b.try_acquire():
                    pass
            return a

        def op(lim: RateLimiter) -> object:
            if path == "acquire with a wait":
                return lim.acquire(2, timeout=1.0)
            return lim.try_acquire(3 if path == "short pool read" else 1)

        runs = 0
        for _, _ in each_point(prepare, op):
            assert_nothing_held(name, open_users=2)
            assert_sound(clock, a, b)
            runs += 1
        assert runs > 3


def test_an_interrupt_anywhere_in_reserve_and_refund_holds_nothing_and_harms_nothing(
    clock: list[int],
) -> None:
    name = "interrupted-reserve"
    with (
        RateLimiter(RATE, burst=BURST, name=name) as a,
        RateLimiter(RATE, burst=BURST, name=name) as b,
    ):
        for pool_path in (True, False):

            def prepare(pool_path: bool = pool_path) -> RateLimiter:
                clock[0] += 100 * EMISSION
                b._state_for_tests()
                if not pool_path:
                    empty_pool(b)
                return a

            for _, _ in each_point(prepare, lambda lim: lim.reserve(2, within=0.01)):
                assert_nothing_held(name, open_users=2)
                assert_sound(clock, a, b)

            def reserved(pool_path: bool = pool_path) -> RateLimiter:
                prepare(pool_path)
                a._page.local.__dict__.pop("reserved", None)
                assert a.reserve(2) == 0.0
                return a

            for lim, _ in each_point(reserved, lambda lim: lim.refund(2)):
                assert_nothing_held(name, open_users=2)
                stack = lim._page.local.__dict__.get("reserved", [])
                if stack:  # interrupted before it gave anything back: the caller may retry
                    lim.refund(2)
                with pytest.raises(ValueError, match="must not exceed the 0 token"):
                    lim.refund(1)  # never more than was taken, however it was interrupted
                got = sum(x.try_acquire() for x in (a, b, a, b, a, b))
                assert got <= BURST
                assert_sound(clock, a, b)


@pytest.mark.parametrize("others", ["another user", "last user", "last user, owing"])
def test_an_interrupt_anywhere_in_close_holds_nothing_and_close_again_finishes(
    clock: list[int], others: str
) -> None:
    name = "interrupted-close"
    b = RateLimiter(RATE, burst=BURST, name=name) if others == "another user" else None
    try:

        def prepare() -> RateLimiter:
            clock[0] += 100 * EMISSION
            lim = RateLimiter(RATE, burst=BURST, name=name)
            lim._state_for_tests()
            if others == "last user, owing":  # booked ahead: owed whatever came before
                assert lim.reserve(BURST, within=1.0) <= 1.0
            return lim

        for lim, _ in each_point(prepare, lambda lim: lim.close()):
            assert not lim._page.tlock.locked()
            assert_nothing_held(name, open_users=(1 if b else 0) + (not lim.closed))
            lim.close()  # finishes what the interrupt left
            assert lim.closed
            assert_nothing_held(name, open_users=1 if b else 0)
            # Interrupted before it judged the files, a close leaves them as a dead last user
            # would: the next sweep (any construction) judges them, charging a pool it cannot
            # account for (strict), so they may owe for a moment even if nothing was taken.
            _rlpage.sweep()
            if others != "another user":
                if others == "last user, owing":
                    assert os.path.exists(paths(name)[0]), "files must stay while owed"
                clock[0] += 100 * EMISSION
                _rlpage.sweep()
            kept = os.path.exists(paths(name)[0])
            assert kept == (others == "another user"), "files must go once nothing is owed"
            if b is not None:
                assert_sound(clock, b)
            else:
                clock[0] += 100 * EMISSION
                with RateLimiter(RATE, burst=BURST, name=name) as c:
                    assert_sound(clock, c)
    finally:
        if b is not None:
            b.close()


@pytest.mark.parametrize("existing", ["in use", "kept for its debt", "none"])
def test_an_interrupt_anywhere_in_the_constructor_leaves_nothing_held(
    clock: list[int], existing: str
) -> None:
    name = "interrupted-open"
    b = RateLimiter(RATE, burst=BURST, name=name)
    if existing == "kept for its debt":
        assert b.try_acquire(BURST)
    if existing != "in use":
        b.close()

    def prepare() -> None:  # type: ignore[return]
        clock[0] += EMISSION

    k = 0
    while True:
        prepare()
        inj = Interrupts(k)
        made: list[RateLimiter] = []
        try:
            with inj.armed():
                made.append(RateLimiter(RATE, burst=BURST, name=name))
        except KeyboardInterrupt:
            pass
        # What an interrupted constructor held goes with the garbage it left.
        gc.collect(0)
        assert_nothing_held(name, open_users=len(made) + (existing == "in use"))
        for lim in made:
            assert_sound(clock, lim, *([b] if existing == "in use" else []))
            lim.close()
        if not inj.fired:
            break
        k += 1
    assert k > 20
    if existing == "in use":
        b.close()


def test_an_interrupt_anywhere_in_a_move_to_new_files_holds_nothing(clock: list[int]) -> None:
    """The files are removed under a user (a cleaner) and a new user makes new ones: the old
    user's next update under the lock moves it there, carrying its debt."""
    name = "interrupted-move"
    with RateLimiter(RATE, burst=BURST, name=name) as c:
        olds: list[RateLimiter] = []

        def prepare() -> RateLimiter:
            clock[0] += 100 * EMISSION
            old = RateLimiter(RATE, burst=BURST, name=name)
            olds.append(old)
            for path in paths(name):
                os.unlink(path)
            for lim in (c, old):  # c moves first, making the new files; old still has its own
                empty_pool(lim)
            c.try_acquire()
            return old

        for old, _ in each_point(prepare, lambda lim: lim.try_acquire()):
            assert_nothing_held(name, open_users=2)
            assert_sound(clock, c, old)
            assert old._page.files.ino == c._page.files.ino  # one page again
            old.close()
        assert len(olds) > 20


def test_an_interrupt_anywhere_in_a_sweep_holds_nothing(clock: list[int]) -> None:
    name = "interrupted-sweep"
    k = 0
    while True:
        with RateLimiter(RATE, burst=BURST, name=name) as lim:
            assert lim.try_acquire(BURST)  # kept for its debt once closed
        clock[0] += 100 * EMISSION  # ... and by now it owes nothing
        inj = Interrupts(k)
        with contextlib.suppress(KeyboardInterrupt), inj.armed():
            _rlpage.sweep()
        gc.collect(0)
        if os.path.exists(paths(name)[1]):
            assert_nothing_held(name, open_users=0)
        _rlpage.sweep()  # the next sweep finishes the job
        assert not any(os.path.exists(p) for p in paths(name))
        if not inj.fired:
            break
        k += 1
    assert k > 20
