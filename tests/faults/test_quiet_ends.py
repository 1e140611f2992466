"""A worker whose parent went away while it was starting ends quietly: no traceback on the
standard error it shares with the user's program, and no process left. The parent may have
ended the channel (a cancel right after the channel was made), given that one start up, or died
(SIGKILL) while ``worker_init`` ran; the worker then finds its result pipe closed when it says it
is ready, and exits with PARENT_GONE instead of raising BrokenPipeError. A forkserver launch
given up between its payload and its pid kills its child whatever the descriptor numbers of a
process with many workers (select() refuses those above 1024)."""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import selectors
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import worker_processes
from scriptrun import RUN_TIMEOUT, run_program
from workerfns import Gate, GatedInit, Log, Recorder, delivered_items, wait_for

import procdispatch as pd
from procdispatch.backends import StartAborted, _procstart
from procdispatch.backends._procstart import WorkerContext
from procdispatch.backends._worker import PARENT_GONE
from procdispatch.backends.process import ProcessWorker

TESTS = str(Path(__file__).resolve().parent.parent)
METHODS = pytest.mark.parametrize("method", ["forkserver", "spawn"])

CANCEL_AT_ONCE = """
import json, time
import procdispatch as pd

def init():
    time.sleep(0.3)

def send(batch):
    pass

if __name__ == "__main__":
    ch = pd.ProcessChannel(send, workers=4, worker_init=init, start_method=METHOD,
                           on_drop=pd.drop_quiet)
    ch.cancel()
    drained = ch.wait_drained(30)
    ch2 = pd.ProcessChannel(send, workers=4, worker_init=init, start_method=METHOD,
                            on_drop=pd.drop_quiet)
    ch2.put_many(range(100))
    ch2.cancel()
    drained2 = ch2.wait_drained(30)
    print(json.dumps({"drained": [drained, drained2]}))
"""


@METHODS
def test_a_channel_cancelled_right_after_it_was_made_prints_nothing(tmp_path, method):
    ran = run_program(CANCEL_AT_ONCE.replace("METHOD", repr(method)), "file", tmp_path)
    assert ran.result == {"drained": [True, True]}
    assert "Traceback" not in ran.proc.stderr, ran.describe()
    assert "Error" not in ran.proc.stderr, ran.describe()


PARENT = textwrap.dedent(
    """
    import sys, threading
    sys.path[:0] = [{tests!r}]
    from workerfns import Log, Recorder, SlowInit
    import procdispatch as pd
    if __name__ == "__main__":
        log = Log(sys.argv[1])
        ch = pd.ProcessChannel(Recorder(log), workers=3, batch_items_max=1,
                               start_method=sys.argv[2], worker_init=SlowInit(log, 0.3))
        ch.put_many(range(10))
        threading.Event().wait(600)
    """
)


@METHODS
def test_workers_in_worker_init_when_the_parent_is_sigkilled_end_quietly(tmp_path, method):
    # Their worker_init ends before the watchdog's first look at the parent (half a second):
    # a worker then finds its result pipe closed when it says it is ready.
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=TESTS))
    log = Log(tmp_path / "log")
    proc = subprocess.Popen(
        [sys.executable, str(script), log.path, method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = {r["pid"] for r in log.wait_count(2, timeout=60, ev="init")}
        proc.kill()
        # The standard error ends when the last process holding it (every worker) has ended.
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    wait_for(lambda: not any(_alive(p) for p in pids), what="the workers to end")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@METHODS
def test_a_worker_whose_result_pipe_is_closed_when_it_is_ready_exits_quietly(
    tmp_path, method, capfd
):
    log, gate = Log(tmp_path / "log"), Gate(tmp_path / "gate")
    payload = pickle.dumps((Recorder(log), GatedInit(log, gate)), protocol=5)
    handle = ProcessWorker(WorkerContext(method), payload, 1)
    handle.start()
    try:
        log.wait_count(1, ev="init")
        conn, _ = handle.waitables()
        conn.close()  # the parent gives it up, and reads nothing more
        gate.open()
        assert handle.exitcode(20) == PARENT_GONE
    finally:
        handle.kill()
        handle.exitcode(10)
        handle.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


@contextlib.contextmanager
def descriptors_above_select_limit() -> Iterator[None]:
    """Hold the descriptors below 1100, so that new pipes get numbers select() refuses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        if hard != resource.RLIM_INFINITY and hard < 2048:
            pytest.skip(f"this process may not open 2048 descriptors (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    held: list[int] = []
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        while True:
            fd = os.dup(null)
            held.append(fd)
            if fd >= 1100:
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        os.close(null)
        if soft < 2048:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_forkserver_child_given_up_is_killed_whatever_its_descriptor_numbers():
    from multiprocessing import forkserver

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with descriptors_above_select_limit():
            r, w = os.pipe()  # what the server answers a launch with: the child's pid
            try:
                assert r >= 1024
                forkserver.write_signed(w, child.pid)
                _procstart._end_server_child(r)
            finally:
                os.close(r)
                os.close(w)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


def test_a_forkserver_launch_given_up_before_its_pid_kills_its_child_past_fd_1024(
    tmp_path, monkeypatch, capfd, caplog
):
    # The first launch writes its whole payload, then is given up while it waits for the
    # server's answer (the pid): its child, forked with a payload it can run, must be killed.
    real = _procstart._wait_for
    given_up: list[int] = []

    def give_up_the_first_wait_for_a_pid(fd: int, events: int, abort: Any) -> None:
        if events == selectors.EVENT_READ and not given_up:
            given_up.append(fd)
            raise StartAborted("given up before the pid came")
        real(fd, events, abort)

    monkeypatch.setattr(_procstart, "_wait_for", give_up_the_first_wait_for_a_pid)
    log = Log(tmp_path / "log")
    with descriptors_above_select_limit():
        ch = pd.ProcessChannel(Recorder(log), workers=1, start_method="forkserver")
        ch.put_many(range(4))
        assert ch.close_and_drain(60)  # the failed start is retried, and that one serves
    assert given_up
    assert given_up[0] >= 1024
    failed = [r for r in caplog.records if r.getMessage() == "could not start a worker"]
    assert [type(r.exc_info[1]) for r in failed if r.exc_info] == [StartAborted]
    assert sorted(delivered_items(log)) == [0, 1, 2, 3]
    assert worker_processes() == []
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
