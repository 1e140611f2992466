"""Starts on starter threads (procdispatch._starting): whatever a start makes is ended exactly
once, by the starter thread when the start was given up before it returned, by the coordinator
when it had already been posted; an abortable start ends as soon as it is given up."""

from __future__ import annotations

import select
import threading
import time
from typing import Any

import pytest

from procdispatch._starting import Starts
from procdispatch.backends import Backend, StartAbort, StartAborted, WorkerHandle


class Handle(WorkerHandle):
    """A worker that records what was done to it."""

    def __init__(self, wid: int) -> None:
        self.wid = wid
        self.calls: list[str] = []

    def send_lease(self, batch: Any) -> bool:
        raise AssertionError("no lease expected")

    def waitables(self) -> tuple[Any, Any]:
        return None, None

    def receive(self) -> tuple[list[Any], bool]:
        return [], False

    def drain(self) -> list[Any]:
        return []

    def exitcode(self, wait: float) -> int | None:
        self.calls.append("exitcode")
        return -9 if "kill" in self.calls else None

    def kill(self) -> None:
        self.calls.append("kill")

    def stop(self) -> bool:
        self.calls.append("stop")
        return False

    def close(self) -> None:
        self.calls.append("close")


class Starter(Backend):
    """Starts return a Handle once ``release`` is set; with ``abortable``, a start waits on its
    abort too and raises StartAborted once it is set."""

    start_blocks = True

    def __init__(self, *, released: bool = True, abortable: bool = False) -> None:
        super().__init__()
        self.release = threading.Event()
        if released:
            self.release.set()
        self.abortable = abortable
        self.made: list[Handle] = []
        self.aborted: list[int] = []

    def prepare(self, send_fn: Any, options: Any) -> None:
        pass

    def start_worker(self, wid: int) -> WorkerHandle:
        self.release.wait(30)
        handle = Handle(wid)
        self.made.append(handle)
        return handle

    def start_worker_abortable(self, wid: int, abort: StartAbort) -> WorkerHandle:
        if not self.abortable:
            return super().start_worker_abortable(wid, abort)
        select.select([abort.fileno()], [], [], 30)
        self.aborted.append(wid)
        abort.check()
        raise AssertionError("the abort's descriptor became readable without an abort")


def wait_posted(starts: Starts) -> None:
    readable, _, _ = select.select([starts.fileno()], [], [], 10)
    assert readable, "no start was posted"


def test_a_posted_start_is_taken_and_its_thread_ends() -> None:
    starts = Starts()
    backend = Starter()
    starting = starts.begin(1, backend)
    wait_posted(starts)
    assert starts.collect() == [starting]
    handle = starting.take()
    assert handle is backend.made[0]
    starting.thread.join(10)
    assert not starting.thread.is_alive()
    starts.shutdown(time.monotonic())
    assert backend.made[0].calls == []  # the coordinator owns it now


def test_a_start_given_up_after_it_was_posted_is_ended_by_the_coordinator() -> None:
    starts = Starts()
    backend = Starter()
    starting = starts.begin(1, backend)
    wait_posted(starts)
    starting.kill()  # start_timeout ran out before the coordinator saw the start return
    made = backend.made[0]
    assert made.calls == ["kill"]
    assert starting.exitcode(1.0) == -9
    starting.close()
    assert made.calls == ["kill", "exitcode", "close"]
    assert starts.collect() == [starting]
    assert starting.take() is None
    starts.shutdown(time.monotonic())
    assert made.calls == ["kill", "exitcode", "close"]  # ended once


def test_a_start_given_up_before_it_returns_is_ended_by_its_thread() -> None:
    starts = Starts()
    backend = Starter(released=False)
    starting = starts.begin(1, backend)
    starting.kill()
    assert starting.exitcode(1.0) is None  # nothing to wait for: the coordinator never waits
    starting.close()
    backend.release.set()
    starting.thread.join(10)
    assert not starting.thread.is_alive()
    assert backend.made[0].calls == ["kill", "exitcode", "close"]
    assert starts.collect() == []
    starts.shutdown(time.monotonic())


def test_an_abortable_start_ends_when_given_up_and_the_end_joins_it() -> None:
    starts = Starts()
    backend = Starter(abortable=True)
    starting = starts.begin(1, backend)
    starting.kill()
    starts.shutdown(time.monotonic())
    assert not starting.thread.is_alive()
    assert backend.aborted == [1]
    assert backend.made == []


def test_a_start_that_raises_is_posted_with_its_error() -> None:
    class Raising(Starter):
        def start_worker(self, wid: int) -> WorkerHandle:
            raise OSError(24, "Too many open files (simulated)")

    starts = Starts()
    starting = starts.begin(1, Raising())
    wait_posted(starts)
    assert starts.collect() == [starting]
    assert starting.take() is None
    assert isinstance(starting.error, OSError)
    starts.shutdown(time.monotonic())


def test_start_abort_wakes_a_waiter_set_before_or_after_fileno() -> None:
    early = StartAbort()
    early.set()
    assert select.select([early.fileno()], [], [], 0)[0]
    with pytest.raises(StartAborted):
        early.check()
    early.close()
    late = StartAbort()
    fd = late.fileno()
    assert not select.select([fd], [], [], 0)[0]
    late.check()
    late.set()
    assert select.select([fd], [], [], 0)[0]
    late.close()
    late.set()  # after close: only recorded
    assert late.is_set()
