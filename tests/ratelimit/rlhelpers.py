"""Helpers for the RateLimiter tests: child-process bodies (importable by spawn and forkserver
children), unique names, the leftover-files check and the sliding-window count."""

from __future__ import annotations

import fcntl
import os
import random
import secrets
import signal
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

from procdispatch._limiter.limiter import RateLimiter
from procdispatch._limiter.shmpage import paths, prefix, segment_dir

NS = 1_000_000_000


def unique_name() -> str:
    """A limiter name that the leftover check below attributes to this test process."""
    return f"t{os.getpid()}x{secrets.token_hex(6)}"


def our_files() -> list[str]:
    """Shared-memory files of limiters created by this test process (named or anonymous)."""
    mine = (f"{prefix()}nt{os.getpid()}x", f"{prefix()}na{os.getpid()}x")
    return sorted(f for f in os.listdir(segment_dir()) if f.startswith(mine))


def judge_later(base: str, seconds: float = 1e8) -> None:
    """Let the sweep judge one set of files (by its path without suffix) as it would
    ``seconds`` from now: a kept page then owes nothing, so it goes unless someone holds it."""
    from procdispatch._limiter import page as _rlpage
    from procdispatch._limiter import state as _rlstate
    from procdispatch._limiter.shmpage import Files, base_paths

    real = _rlstate._now
    _rlstate._now = lambda: real() + int(seconds * NS)
    try:
        f = Files()
        try:
            _rlpage._sweep_one(f, *base_paths(base))
        finally:
            f.release()
    finally:
        _rlstate._now = real


def discard(name: str) -> None:
    """Remove a named limiter's files that stay for their debt (nobody may hold them)."""
    judge_later(paths(name)[0][: -len(".rl")])


def check_no_leftovers() -> Iterator[None]:
    """Fixture body: every limiter a test opens must be gone when it ends, except a named one's
    files kept for tokens they still owe: those nobody may hold, and they must go once they owe
    nothing (judged as much later; that also clears them away)."""
    before = set(our_files())
    yield
    left = sorted(set(our_files()) - before)
    unnamed = [f for f in left if f.startswith(f"{prefix()}na")]
    assert not unnamed, f"an unnamed limiter's files were left behind: {unnamed}"
    for base in sorted({os.path.join(segment_dir(), f.rsplit(".", 1)[0]) for f in left}):
        judge_later(base)
    left = sorted(set(our_files()) - before)
    assert not left, f"shared-memory files left behind (held, or kept for ever): {left}"


def assert_nothing_held(name: str, *, open_users: int) -> None:
    """No thread lock of any instance is held, the page lock is free, and nobody holds the
    users file exclusively (which would keep new users waiting)."""
    data_path, users_path, _ = paths(name)
    if os.path.exists(users_path):  # (gone with a last user that owed nothing)
        fd = os.open(users_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # raises if someone holds LOCK_EX
            if not open_users:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody left registered
        finally:
            os.close(fd)
    if os.path.exists(data_path):
        fd = os.open(data_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the page lock is held
        finally:
            os.close(fd)


Event = tuple[int, int] | tuple[int, int, int]


def max_in_window(events: list[Event], span_ns: int) -> int:
    """Largest total weight of events certainly inside some closed [s, s + span_ns].

    An event is (time_ns, weight), or (earliest, latest, weight) when only bounds of its
    instant are known (a take from the pool happens at some instant during the call); it
    counts in a window only if both bounds lie inside."""
    spans = sorted((e[0], e[0], e[1]) if len(e) == 2 else e for e in events)
    best = 0
    for i, (start, _, _) in enumerate(spans):
        end = start + span_ns
        total = 0
        for lo, hi, w in spans[i:]:
            if lo > end:
                break
            if hi <= end:
                total += w
        best = max(best, total)
    return best


def admission(limiter: RateLimiter, called_ns: int, weight: int) -> tuple[int, int, int]:
    """The latest take's instant as (earliest, latest, weight): exact when the limiter decided
    it under its lock, else somewhere between the call and now."""
    at = limiter._last_admit_ns
    if at is None:
        return (called_ns, time.monotonic_ns(), weight)
    return (at, at, weight)


# ---- child-process bodies ---------------------------------------------------------------------


def hammer(limiter: RateLimiter, conn: Connection, mode: str) -> None:
    """Say ready, get an end time (monotonic ns), take tokens until then in the given style and
    send back the admissions as (admission time ns, weight)."""
    conn.send("ready")
    end = conn.recv()
    got: list[Event] = []
    rng = random.Random(os.getpid())
    while (left := end - (called := time.monotonic_ns())) > 0:
        if mode == "acquire":
            if limiter.acquire(timeout=left / NS):
                got.append(admission(limiter, called, 1))
        elif mode == "acquire2":
            if limiter.acquire(2, timeout=left / NS):
                got.append(admission(limiter, called, 2))
        elif mode == "book":
            within = left / NS
            delay = limiter.reserve(within=within)
            if delay <= within:
                got.append(admission(limiter, called, 1))
            time.sleep(min(delay, within))
        elif mode == "reserve":
            wait = limiter.reserve()
            if wait > 0:
                time.sleep(wait)
            elif rng.random() < 0.2:
                limiter.refund()  # reserve-then-cancel: not an admission
            else:
                got.append(admission(limiter, called, 1))
        elif limiter.try_acquire():
            got.append(admission(limiter, called, 1))
        else:
            time.sleep(0.0005)
    conn.send(got)
    limiter.close()


def count_tries(limiter: RateLimiter, tries: int, conn: Connection) -> None:
    conn.send(sum(limiter.try_acquire() for _ in range(tries)))
    limiter.close()


def hold_lock(limiter: RateLimiter, conn: Connection) -> None:
    """Take the cross-process lock, say so, then wait inside it until killed."""
    with limiter._locked_for_tests():
        conn.send("held")
        while True:
            signal.pause()


def answer_tries(limiter: RateLimiter, conn: Connection) -> None:
    """On each message, try once and send the result; stop on None."""
    while conn.recv() is not None:
        conn.send(limiter.try_acquire())
    limiter.close()


def open_named_and_wait(name: str, conn: Connection) -> None:
    """Create the named limiter, say so, and keep it open until killed."""
    limiter = RateLimiter(5.0, name=name)
    conn.send("open")
    while not limiter.closed:
        signal.pause()


def take_then_wait(limiter: RateLimiter, conn: Connection) -> None:
    conn.send(sum(limiter.try_acquire() for _ in range(3)))
    while True:
        signal.pause()


def sigint_rounds(conn: Connection, rate: float, burst: int) -> None:
    """Rounds on command, ``(name, end)``: open the named limiter and use it in every style
    until ``end`` (monotonic ns) while SIGINTs arrive, then close it and send back (admissions
    seen as (called, returned, weight), interrupts caught). A SIGINT raises KeyboardInterrupt
    wherever it lands inside an operation (opening and closing included), which is caught and
    the work goes on; between operations and between rounds it is dropped, so that the loop
    itself (whose backward jumps an interrupt can also reach) never loses one."""
    live = [False]

    def on_sigint(signum: int, frame: object) -> None:
        if live[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    rng = random.Random(os.getpid())
    conn.send("ready")
    while (job := conn.recv()) is not None:
        name, end = job
        got: list[Event] = []
        caught = 0
        lim: RateLimiter | None = None
        while (called := time.monotonic_ns()) < end:
            try:
                live[0] = True
                if lim is None or lim.closed:
                    lim = RateLimiter(rate, burst=burst, name=name)
                pick = rng.random()
                if pick < 0.35:
                    w = rng.randint(1, burst)
                    if lim.try_acquire(w):
                        got.append((called, time.monotonic_ns(), w))
                elif pick < 0.55:
                    cancel = rng.random() < 0.3
                    if lim.reserve() == 0.0:
                        if cancel:
                            lim.refund()
                        else:
                            got.append((called, time.monotonic_ns(), 1))
                elif pick < 0.95:
                    if lim.acquire(timeout=0.002):
                        got.append((called, time.monotonic_ns(), 1))
                else:
                    lim.close()
                live[0] = False
            except KeyboardInterrupt:
                live[0] = False
                caught += 1
        if lim is not None:
            lim.close()  # finishes a close an interrupt cut short
        conn.send((got, caught))


def open_try_close(name: str, rate: float, burst: int, conn: Connection) -> None:
    """A process that never used the limiter: open it by name, try once, close, report."""
    with RateLimiter(rate, burst=burst, name=name) as lim:
        tried = lim.try_acquire()
    conn.send(("done", tried))


def churn_logged(limiter: RateLimiter, log_path: str, conn: Connection) -> None:
    """Use every operation in a tight loop until killed, appending each admission to the log
    as a line "called returned weight" (one O_APPEND write: whole lines only)."""
    rng = random.Random(os.getpid())
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    conn.send("running")
    while True:
        called = time.monotonic_ns()
        pick = rng.random()
        w = 0
        if pick < 0.4:
            w = rng.randint(1, 3)
            if not limiter.try_acquire(w):
                w = 0
        elif pick < 0.8:
            if limiter.reserve() == 0.0:
                if rng.random() < 0.5:
                    limiter.refund()
                else:
                    w = 1
        elif limiter.acquire(timeout=0.002):
            w = 1
        if w:
            os.write(fd, f"{called} {time.monotonic_ns()} {w}\n".encode())


def read_log(log_path: str) -> list[Event]:
    with open(log_path) as f:
        return [
            (int(a), int(b), int(c))
            for a, b, c in (line.split() for line in f if line.endswith("\n"))
        ]


def use_dir(path: str) -> None:
    """Keep this process's limiter files in ``path`` (a test's own directory, which no other
    process sweeps)."""
    import sys

    from procdispatch._limiter import shmpage as _shmpage

    _shmpage.segment_dir = lambda: path  # type: ignore[assignment]
    page_module = sys.modules.get("procdispatch._limiter.page")
    if page_module is not None:
        page_module.segment_dir = lambda: path


def try_once_named(path: str, name: str, rate: float, burst: int, conn: Connection) -> None:
    """In ``path``: open the named limiter, try once, close; send (called, returned, got)."""
    use_dir(path)
    with RateLimiter(rate, burst=burst, name=name) as lim:
        called = time.monotonic_ns()
        got = lim.try_acquire()
        conn.send((called, time.monotonic_ns(), got))


def take_burst_then_wait(path: str, name: str, rate: float, burst: int, conn: Connection) -> None:
    """In ``path``: open the named limiter, take its whole burst, say so, wait to be killed."""
    use_dir(path)
    lim = RateLimiter(rate, burst=burst, name=name)
    conn.send(lim.try_acquire(burst))
    while True:
        signal.pause()
