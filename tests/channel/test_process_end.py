"""Channels when their process ends: interpreter exit, a collected channel, SIGTERM, fork.

Each case is a small script run in a child interpreter, as a user's script would be; the sink
is a JSON-lines file the workers append to, read here after the script has ended.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from workerfns import Log

HERE = Path(__file__).resolve().parent.parent

HEAD = """
import logging, os, sys, time
sys.path.insert(0, {tests!r})
from workerfns import Gate, Log, Recorder
import procdispatch as pd
from procdispatch import _process_end
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
log = Log({log!r})
"""


def _script(tmp_path: Path, body: str, log: Log) -> Path:
    path = tmp_path / "script.py"
    code = textwrap.dedent(HEAD).format(tests=str(HERE), log=log.path)
    code += textwrap.dedent(body)
    path.write_text(code)
    return path


def _run(path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(path)], check=False, capture_output=True, text=True, timeout=timeout
    )


def _delivered(log: Log) -> list[object]:
    return sorted((x for r in log.read() if r["ev"] == "sent" for x in r["data"]), key=str)


def test_a_channel_collected_while_open_still_delivers_everything(tmp_path: Path) -> None:
    log = Log(tmp_path / "log")
    body = """
    def feed():
        ch = pd.ProcessChannel(Recorder(log), workers=1, batch_items_max=3,
                               on_drop=lambda b, f: b is not None and print("DROPPED", b.data))
        ch.put_many(range(10))
        # returns without closing: the channel object is collected here

    if __name__ == "__main__":
        feed()
        import gc; gc.collect()
        print("FED", flush=True)
    """
    proc = _run(_script(tmp_path, body, log))
    assert proc.returncode == 0, proc.stderr
    assert "FED" in proc.stdout
    assert "DROPPED" not in proc.stdout
    assert _delivered(log) == sorted(range(10), key=str)


def test_on_drop_still_sees_the_drops_of_a_collected_channel(tmp_path: Path) -> None:
    log = Log(tmp_path / "log")
    body = """
    def fail(batch):
        raise ValueError("permanent")

    def feed():
        ch = pd.ProcessChannel(fail, workers=1, batch_items_max=5,
                               on_drop=lambda b, f: b is not None and print("DROPPED", b.data,
                                                                         flush=True))
        ch.put_many(range(10))

    if __name__ == "__main__":
        feed()
    """
    proc = _run(_script(tmp_path, body, log))
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")) == [
        "",
        "DROPPED [0, 1, 2, 3, 4]",
        "DROPPED [5, 6, 7, 8, 9]",
    ]


def test_close_then_script_end_still_sends_everything_buffered(tmp_path: Path) -> None:
    log = Log(tmp_path / "log")
    body = """
    if __name__ == "__main__":
        _process_end.EXIT_LOG_EVERY = 0.2
        ch = pd.ProcessChannel(Recorder(log, sleep=0.05), workers=1, batch_items_max=2)
        ch.put_many(range(40))
        ch.close()
        print("CLOSED", ch.stats().items_delivered < 40, flush=True)
    """
    proc = _run(_script(tmp_path, body, log))
    assert proc.returncode == 0, proc.stderr
    assert "CLOSED True" in proc.stdout  # the script really ended with items still buffered
    assert _delivered(log) == sorted(range(40), key=str)
    assert "draining 1 channel(s) at interpreter exit" in proc.stderr
    assert "WARNING procdispatch: waiting at exit (Ctrl-C cancels): 1 channel(s)" in proc.stderr


def test_ctrl_c_during_the_exit_drain_cancels(tmp_path: Path) -> None:
    log = Log(tmp_path / "log")
    body = """
    if __name__ == "__main__":
        ch = pd.ProcessChannel(Recorder(log, gate=Gate({gate!r})), workers=1,
                               batch_items_max=1, cancel_grace=0.2,
                               on_drop=lambda b, f: b is not None and print("DROPPED", b.data,
                                                                         flush=True))
        ch.put_many(range(5))
    """.replace("{gate!r}", repr(str(tmp_path / "never")))
    proc = subprocess.Popen(
        [sys.executable, str(_script(tmp_path, body, log))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log.wait_count(1, ev="start")  # at exit, with a send held
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert "Ctrl-C at exit: cancelling 1 channel(s)" in err, err
    dropped = sorted(int(x) for line in out.splitlines() for x in line[9:-1].split(", "))
    assert dropped == list(range(5)), out


SIGTERM_BODY = """
if __name__ == "__main__":
    pd.drain_on_sigterm({timeout})
    other = pd.ProcessChannel(Recorder(log, sleep={sleep}), workers=1, batch_items_max=1,
                              on_drop=lambda b, f: b is not None and print("DROPPED", b.data,
                                                                        flush=True))
    other.put_many(["x1", "x2"])  # a channel no with block owns: drained by the exit hook
    with pd.ProcessChannel(Recorder(log, sleep={sleep}), workers=1, batch_items_max=1,
                           cancel_grace=0.2,
                           on_drop=lambda b, f: b is not None and print("DROPPED", b.data,
                                                                     flush=True)) as ch:
        ch.put_many(range(6))
        print("READY", flush=True)
        while True:
            time.sleep(0.01)
"""


def _sigterm(tmp_path: Path, timeout: float, sleep: float) -> tuple[int, str, str, float]:
    log = Log(tmp_path / "log")
    body = SIGTERM_BODY.format(timeout=timeout, sleep=sleep)
    proc = subprocess.Popen(
        [sys.executable, str(_script(tmp_path, body, log))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log.wait_count(1, ev="start")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, out, err, took


def test_sigterm_drains_every_channel_then_exits_143(tmp_path: Path) -> None:
    code, out, err, _ = _sigterm(tmp_path, timeout=30, sleep=0.02)
    assert code == 143, err
    assert "DROPPED" not in out
    assert _delivered(Log(tmp_path / "log")) == sorted([0, 1, 2, 3, 4, 5, "x1", "x2"], key=str)


def test_sigterm_cancels_what_is_left_at_its_deadline(tmp_path: Path) -> None:
    code, out, err, _ = _sigterm(tmp_path, timeout=0.5, sleep=0.4)
    assert code == 143, err
    delivered = _delivered(Log(tmp_path / "log"))
    dropped = [
        x.strip(" '")
        for line in out.splitlines()
        if line.startswith("DROPPED")
        for x in line[9:-1].split(",")
    ]
    assert dropped, out  # the drain could not finish in 0.5 s
    assert sorted([*map(str, delivered), *dropped]) == sorted(
        ["0", "1", "2", "3", "4", "5", "x1", "x2"]
    )


FORK_BODY = """
import threading

def child_checks(ch):
    # Every method raises the same clear error; nothing waits for the parent's coordinator.
    calls = [lambda: ch.put(1), lambda: ch.put_many([1]), lambda: ch.put_nowait(1),
             lambda: ch.wait_drained(1), lambda: ch.close_and_drain(1), ch.stats, ch.close,
             ch.cancel]
    ok = []
    for call in calls:
        try:
            call()
        except pd.ProcDispatchError as exc:
            ok.append("inherited through os.fork()" in str(exc))
        else:
            ok.append(False)
    ok.append("inherited through os.fork()" in repr(ch))
    return all(ok)

if __name__ == "__main__":
    ch = pd.ProcessChannel(Recorder(log), workers=1, batch_items_max=10,
                           full_behavior=pd.BlockNewItems(max_items=200))
    stop = threading.Event()
    def produce():  # holds the admission lock often, so some forks happen while it is held
        i = 0
        while not stop.is_set():
            ch.put(("t", i)); i += 1
    t = threading.Thread(target=produce); t.start()
    results = []
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            sys.exit(0 if child_checks(ch) else 1)  # a normal exit: the exit hook runs
        _, status = os.waitpid(pid, 0)
        results.append(os.waitstatus_to_exitcode(status))
    stop.set(); t.join()
    ch.put("parent still works")
    assert ch.close_and_drain(60)
    s = ch.stats()
    print("RESULTS", results, s.items_put == s.items_delivered, flush=True)
"""


def test_a_channel_inherited_through_fork_raises_in_the_child_and_never_hangs(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path / "log")
    proc = _run(_script(tmp_path, FORK_BODY, log), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"RESULTS {[0] * 20} True" in proc.stdout, (proc.stdout, proc.stderr)
    assert "parent still works" in _delivered(log)


def test_a_forked_child_forgets_every_worker_process_of_the_parent() -> None:
    # A worker between its start and its slot (or killed and not yet reaped) is in
    # multiprocessing's table of children without being any handle's: a forked child's exit
    # hook would SIGTERM it. The table the child inherits holds no worker of the parent's.
    import multiprocessing.process as mpp
    import os

    import procdispatch._process_end  # noqa: F401 (its fork hook: a channel imports it)

    class Stand:
        _name = "procdispatch-worker-7"

    class Other:
        _name = "someone-else"

    stand, other = Stand(), Other()
    mpp._children.update((stand, other))  # type: ignore[attr-defined]
    try:
        pid = os.fork()
        if pid == 0:
            kids = mpp._children  # type: ignore[attr-defined]
            os._exit(0 if stand not in kids and other in kids else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        mpp._children.discard(stand)  # type: ignore[attr-defined]
        mpp._children.discard(other)  # type: ignore[attr-defined]
