"""RateLimiter and os.fork (gunicorn --preload, a user's own fork): a child inherits the limiter
while other threads of the parent may be inside it, holding its thread lock or the page lock.
The child must be able to use it at once (sharing the budget), never wait on what the parent's
threads hold, and never share the parent's lock ownership."""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

import pytest
from rlhelpers import check_no_leftovers

from procdispatch._limiter import locked as _rllocked
from procdispatch._limiter import shmpage as _shmpage
from procdispatch._limiter.limiter import RateLimiter

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
HOURLY = 1 / 3600


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield from check_no_leftovers()


def in_child(body: Callable[[int], None]) -> tuple[int, int]:
    """Fork; the child runs ``body(write_fd)`` and exits (status 0, or 1 if it raised). Returns
    (child pid, read end of the pipe the child writes its report to)."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # the child: never return into the test runner
        code = 1
        try:
            os.close(r)
            body(w)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def read_report(r: int, timeout: float = 30.0) -> bytes:
    """The child's report, or b"" if it says nothing within ``timeout`` (it is stuck)."""
    import select

    ready, _, _ = select.select([r], [], [], timeout)
    return os.read(r, 100) if ready else b""


def reap(pid: int, timeout: float = 30.0) -> int:
    """The child's exit code; a child still running after ``timeout`` is stuck: killed."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.01)


def test_a_child_forked_while_a_parent_thread_holds_the_page_lock_uses_the_pool_at_once() -> None:
    """A parent thread holds the page lock until the child reports; the child takes tokens from
    the pool (no lock needed), finds the page lock held by the parent (its own description, not
    a share of the parent's), then, once the parent lets go, takes under the lock too."""
    with RateLimiter(HOURLY, burst=5) as lim:
        lim._state_for_tests()  # the pool holds the burst
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with lim._locked_for_tests():
                holding.set()
                release.wait(60)

        t = threading.Thread(target=hold)
        t.start()
        assert holding.wait(30)
        try:

            def child(w: int) -> None:
                got = sum(lim.try_acquire() for _ in range(3))  # from the pool
                try:
                    fcntl.flock(lim._page.files.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    exclusive = b"shared"  # the parent's description: it would let us in
                except BlockingIOError:
                    exclusive = b"own"
                os.write(w, f"{got} ".encode() + exclusive)
                more = sum(lim.try_acquire() for _ in range(5))  # waits for the parent's lock
                os.write(w, f" {more}".encode())

            pid, r = in_child(child)
            report = read_report(r)
            assert report == b"3 own", f"child report while the parent holds the lock: {report!r}"
        finally:
            release.set()
            t.join()
        assert read_report(r) == b" 2"  # the last 2 of the burst: shared with the parent
        os.close(r)
        assert reap(pid) == 0
        assert lim.try_acquire() is False


def test_a_child_forked_while_a_parent_thread_holds_the_thread_lock_takes_under_the_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A parent thread is inside try_acquire, holding the instance's thread lock (stopped just
    before it takes the page lock); the fork copies that lock held. The child gets a lock of its
    own and decides under the page lock at once."""
    inside, go = threading.Event(), threading.Event()
    real = _rllocked._flock

    def slow_flock(fd: int, op: int) -> None:
        if threading.current_thread().name == "taker" and op == fcntl.LOCK_EX:
            inside.set()
            go.wait(60)
        real(fd, op)

    monkeypatch.setattr(_rllocked, "_flock", slow_flock)
    with RateLimiter(HOURLY, burst=2) as lim:  # pool empty: every take goes to the lock
        t = threading.Thread(target=lim.try_acquire, name="taker")
        t.start()
        assert inside.wait(30)
        try:
            assert lim._page.tlock.locked()

            def child(w: int) -> None:
                os.write(w, b"%d" % sum(lim.try_acquire() for _ in range(3)))

            pid, r = in_child(child)
            assert read_report(r) == b"2", "the child could not take under the lock"
        finally:
            go.set()
            t.join()
        os.close(r)
        assert reap(pid) == 0
        assert lim.try_acquire() is False  # the child took the burst; the parent's taker none


@pytest.mark.skipif(sys.platform != "linux", reason="Linux reopens through /proc/self/fd")
def test_a_child_that_cannot_reach_the_files_again_moves_to_the_names_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the inherited files cannot be reopened as the child's own (no /proc, say), the
    child is left without a lock of its own on them, and its first update under the lock moves
    it to the page the name has (here, the same one): it still shares the budget."""
    monkeypatch.setattr(_shmpage, "_reopen", lambda fd, path: -1)
    with RateLimiter(HOURLY, burst=3, name=f"t{os.getpid()}xfork") as lim:
        assert lim.try_acquire() is True  # decided under the lock; 2 left in the pool

        def child(w: int) -> None:
            assert lim._page.files.fd == -1
            assert lim.reserve() == 0.0  # from the pool, no lock needed
            lim.refund()  # no lock of its own to give it back under: it stays spent
            os.write(w, b"%d" % sum(lim.try_acquire() for _ in range(5)))

        pid, r = in_child(child)
        assert read_report(r) == b"1"
        os.close(r)
        assert reap(pid) == 0
        assert lim.try_acquire() is False


def test_a_child_forked_while_a_parent_thread_is_inside_the_close_machinery_can_close() -> None:
    """Closing points the pipe at a dead pipe made once per process under a lock; a child
    forked while a parent thread holds that lock must not inherit it held."""
    with RateLimiter(HOURLY, burst=2) as lim:
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with _shmpage._dead_lock:
                holding.set()
                release.wait(60)

        t = threading.Thread(target=hold)
        t.start()
        assert holding.wait(30)
        try:

            def child(w: int) -> None:
                lim.close()
                os.write(w, b"closed")

            pid, r = in_child(child)
            report = read_report(r, timeout=10.0)
        finally:
            release.set()
            t.join()
        os.close(r)
        code = reap(pid, timeout=10.0)
        assert report == b"closed", "the child could not close"
        assert code == 0
