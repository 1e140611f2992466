"""A worker whose parent went away while it was starting ends quietly: no traceback on the
standard error it shares with the user's program, and no process left. The parent may have
ended the channel (a cancel right after the channel was made), given that one start up, or died
(SIGKILL) while ``worker_init`` ran; the worker then finds its result pipe closed when it says it
is ready, and exits with PARENT_GONE instead of raising BrokenPipeError."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from scriptrun import RUN_TIMEOUT, run_program
from workerfns import Gate, GatedInit, Log, Recorder, wait_for

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
