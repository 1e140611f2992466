"""A worker start that blocks holds up that one start, never the channel: the coordinator starts
workers on starter threads and learns of a started worker through its selector. A start that
has not produced a worker within start_timeout is a failed start (WorkerStartFailed rules), and
cancel() and close_and_drain(timeout) keep their deadlines while a start hangs: a forkserver
stopped with SIGSTOP, a spawn child that does not read its large payload, a backend whose
start_worker blocks. When the channel has ended, no starter thread and no process is left."""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import worker_processes
from workerfns import Log, Recorder, delivered_items, wait_for

import procdispatch as pd
from procdispatch.backends import WorkerHandle
from procdispatch.backends.thread import ThreadBackend

#: More than a pipe holds (64 KiB on Linux): writing it into a child that does not read blocks.
BIG = 4 << 20


def starter_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("procdispatch-start-")]


def our_forkserver() -> psutil.Process:
    """The forkserver procdispatch's workers fork from (it preloads the worker module)."""
    servers = [
        p
        for p in psutil.Process().children()
        if "procdispatch.backends._worker" in " ".join(p.cmdline())
    ]
    assert len(servers) == 1, servers
    return servers[0]


@contextlib.contextmanager
def stopped(proc: psutil.Process) -> Iterator[None]:
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def recorder(log: Log, payload: int) -> Recorder:
    rec = Recorder(log)
    rec.ballast = bytes(payload)  # type: ignore[attr-defined]  # travels with send_fn
    return rec


def delivered_by_one_worker(ch: Any, log: Log) -> int:
    """Put "a" and return the pid of the worker that sent it, once the parent has its answer:
    the worker logs "sent" before it answers, and a worker killed between the two would have
    "a" sent again (or dropped)."""
    ch.put("a")
    wait_for(lambda: ch.stats().items_delivered == 1, what='"a" delivered')
    pid: int = log.wait_count(1, ev="sent")[0]["pid"]
    return pid


def kill_worker(pid: int) -> None:
    """SIGKILL a worker and wait until it is dead (a zombie, while its forkserver is stopped).
    The channel learns of it from its end of file, on the coordinator's next turn."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid not in [p.pid for p in worker_processes()], what=f"worker {pid} dead")


# ---- a stopped forkserver ---------------------------------------------------------------------

STOPPED = pytest.mark.needs("processes", why="a forkserver process is stopped with SIGSTOP")


@STOPPED
@pytest.mark.parametrize("payload", [0, BIG], ids=["small-payload", "payload-fills-the-pipe"])
def test_cancel_and_the_drain_deadline_hold_while_a_start_hangs_on_a_stopped_forkserver(
    tmp_path: Path, make_channel: Any, payload: int
) -> None:
    log = Log(tmp_path / "log")
    ch = make_channel(
        recorder(log, payload),
        workers=1,
        batch_items_max=1,
        start_method="forkserver",
        start_timeout=600.0,
    )
    first = delivered_by_one_worker(ch, log)
    server = our_forkserver()
    with stopped(server):
        kill_worker(first)  # its replacement will wait on the server
        wait_for(lambda: ch.stats().worker_restarts == 1, what="the replacement's start")
        ch.put("b")
        assert ch.close_and_drain(timeout=1.0) is False  # no worker: "b" cannot go
        ch.cancel()
        assert ch.wait_drained(20), "cancel() did not end a channel whose start hangs"
        assert starter_threads() == []
        assert worker_processes() == []
    # The server forks the request given up once it runs again: that child ends by itself.
    wait_for(lambda: not worker_processes(), what="no worker process left")
    assert delivered_items(log) == ["a"]
    s = ch.stats()
    # The replacement did start (and hang): the cancel above ended a channel with a start
    # under way.
    assert (s.items_put, s.items_delivered, s.items_dropped, s.worker_restarts) == (2, 1, 1, 1)


@STOPPED
def test_a_start_hanging_on_a_stopped_forkserver_times_out_as_a_failed_start(
    tmp_path: Path, make_channel: Any
) -> None:
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log), workers=1, batch_items_max=1, start_method="forkserver", start_timeout=0.5
    )
    first = delivered_by_one_worker(ch, log)
    server = our_forkserver()
    with stopped(server):
        kill_worker(first)
        ch.put("b")
        with pytest.raises(pd.WorkerStartFailed) as ei:
            ch.close_and_drain(20)
        assert ch.wait_drained(20)
        assert starter_threads() == []
        assert worker_processes() == []
    assert "workers cannot start: 3 attempts failed in a row" in str(ei.value)
    cause = ei.value.__cause__
    assert isinstance(cause, TimeoutError)
    assert str(cause) == (
        "worker 4 (no pid: its start had not returned) did not become ready within "
        "start_timeout=0.5s; the start was given up"
    )
    wait_for(lambda: not worker_processes(), what="no worker process left")
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped, s.worker_restarts) == (1, 1, 3)


# ---- a spawn child that does not read its payload ---------------------------------------------


@pytest.mark.needs("processes", why="a spawned child process is stopped with SIGSTOP")
def test_a_spawn_start_whose_payload_write_blocks_holds_up_only_that_start(
    tmp_path: Path, make_channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every spawned child but the first is stopped as soon as it exists, so writing its
    payload (send_fn closes over 4 MiB) blocks: the first worker must still get every item,
    and the drain must end the blocked start and its child."""
    real_spawn = multiprocessing.util.spawnv_passfds
    spawned: list[int] = []

    def spawn_then_stop(path: Any, args: Any, passfds: Any) -> int:
        pid: int = real_spawn(path, args, passfds)
        if not any("spawn_main" in str(a) for a in args):
            return pid  # multiprocessing's resource tracker
        spawned.append(pid)
        if len(spawned) > 1:
            os.kill(pid, signal.SIGSTOP)  # it reads nothing of its payload
        return pid

    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", spawn_then_stop)
    log = Log(tmp_path / "log")
    ch = make_channel(recorder(log, BIG), workers=2, batch_items_max=1, start_method="spawn")
    try:
        ch.put_many(range(10))  # more than one item: the second worker starts
        wait_for(lambda: len(spawned) == 2, what="the second worker spawned")
        assert ch.close_and_drain(60)
        assert starter_threads() == []
        assert worker_processes() == []
        assert not psutil.pid_exists(spawned[1])  # killed and reaped
    finally:
        for pid in spawned[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert sorted(delivered_items(log)) == list(range(10))
    assert {r["pid"] for r in log.read() if r["ev"] == "sent"} == {spawned[0]}
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped, s.worker_restarts) == (10, 0, 0)


# ---- a backend whose start_worker blocks ------------------------------------------------------


class BlockingStarts(ThreadBackend):
    """Thread workers whose start_worker blocks until ``release`` is set, and cannot be
    aborted: the channel must not wait for it, and must end what it returns late."""

    start_blocks = True

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered: list[int] = []
        self.returned: list[WorkerHandle] = []

    def start_worker(self, wid: int) -> WorkerHandle:
        self.entered.append(wid)
        self.release.wait(60)
        handle = super().start_worker(wid)
        self.returned.append(handle)
        return handle


BLOCKING = pytest.mark.only("thread", why="a Backend object of its own, built on thread workers")


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("procdispatch-thread-worker")]


@BLOCKING
def test_cancel_ends_a_channel_whose_backend_start_blocks(make_channel: Any) -> None:
    backend = BlockingStarts()
    sent: list[Any] = []
    ch = make_channel(lambda b: sent.extend(b.data), backend=backend, workers=1)
    try:
        ch.put("a")
        wait_for(lambda: backend.entered == [1], what="the start under way")
        assert ch.close_and_drain(timeout=0.5) is False
        ch.cancel()
        assert ch.wait_drained(30), "cancel() did not end a channel whose start blocks"
        # The start cannot be aborted: its thread runs on until start_worker returns.
        assert [t.name for t in starter_threads()] == ["procdispatch-start-1"]
    finally:
        backend.release.set()
    wait_for(lambda: not starter_threads(), what="the starter thread ended")
    # The worker it returned late was ended (a thread worker: abandoned and stopped).
    assert len(backend.returned) == 1
    wait_for(lambda: not worker_threads(), what="the late worker's thread ended")
    assert sent == []
    s = ch.stats()
    assert (s.items_put, s.items_dropped, s.workers_alive) == (1, 1, 0)


@BLOCKING
def test_a_backend_start_that_never_returns_times_out_as_a_failed_start(
    make_channel: Any,
) -> None:
    backend = BlockingStarts()
    ch = make_channel(lambda b: None, backend=backend, workers=1, start_timeout=0.3)
    try:
        ch.put("a")
        with pytest.raises(pd.WorkerStartFailed) as ei:
            ch.close_and_drain(20)
        assert ch.wait_drained(30)
        assert "did not become ready within start_timeout=0.3s" in str(ei.value)
        # A start given up need not have reached start_worker yet; each one does.
        wait_for(lambda: len(backend.entered) == 3, what="the third start under way")
        assert sorted(backend.entered) == [1, 2, 3]
    finally:
        backend.release.set()
    wait_for(lambda: not starter_threads(), what="the starter threads ended")
    assert len(backend.returned) == 3
    wait_for(lambda: not worker_threads(), what="the late workers' threads ended")


@BLOCKING
def test_a_backend_start_that_returns_late_but_in_time_serves(make_channel: Any) -> None:
    backend = BlockingStarts()
    sent: list[Any] = []
    ch = make_channel(lambda b: sent.extend(b.data), backend=backend, workers=2)
    ch.put_many(range(5))
    # The two starter threads run in either order.
    wait_for(lambda: sorted(backend.entered) == [1, 2], what="both starts under way")
    backend.release.set()
    assert ch.close_and_drain(30)
    assert sorted(sent) == list(range(5))
    assert starter_threads() == []


# ---- the thread backend starts on the coordinator thread, as it always did -----------------


class RecordingThreads(ThreadBackend):
    def __init__(self) -> None:
        super().__init__()
        self.callers: list[str] = []

    def start_worker(self, wid: int) -> WorkerHandle:
        self.callers.append(threading.current_thread().name)
        return super().start_worker(wid)


@pytest.mark.only("thread", why="how the thread backend starts its workers")
def test_the_thread_backend_starts_its_workers_at_once_on_the_coordinator(
    make_channel: Any,
) -> None:
    backend = RecordingThreads()
    sent: list[Any] = []
    ch = make_channel(lambda b: sent.extend(b.data), backend=backend, workers=3)
    ch.put_many(range(6))
    assert ch.close_and_drain(30)
    assert backend.callers == ["procdispatch-coordinator"] * 3
    assert sorted(sent) == list(range(6))


def test_a_forkserver_launch_given_up_mid_payload_kills_its_child_quietly(capfd, monkeypatch):
    # The launch is given up after the server forked the child and before the payload was all
    # written (here: before any of it): the child must be killed before it reads a payload cut
    # short, which it would report on stderr as an EOFError, and must not outlive the channel.
    from procdispatch.backends import StartAborted, _procstart

    real = _procstart._write_all
    calls = []

    def cut_short(fd: int, data: Any, abort: Any) -> None:
        if abort is None or calls:
            real(fd, data, abort)
            return
        calls.append(fd)
        raise StartAborted("given up mid-payload")

    monkeypatch.setattr(_procstart, "_write_all", cut_short)
    log = Log("/dev/null")
    ch = pd.ProcessChannel(Recorder(log), workers=1, start_method="forkserver")
    ch.put_many(range(4))
    assert ch.close_and_drain(60)  # the failed start is retried, and that one serves
    assert calls
    assert not worker_processes()
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
