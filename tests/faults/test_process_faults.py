"""Process-level faults: poison batches, recycling, parent death, Ctrl-C, and a chaos run."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import worker_processes
from faultfns import Fault
from workerfns import Log, Recorder, delivered_items, wait_for

import procdispatch as pd

TESTS = str(Path(__file__).resolve().parent.parent)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.needs("processes", why="a worker that crashes or is killed is a process of its own")
def test_poison_batch_is_dropped_after_three_worker_faults(tmp_path, make_channel, caplog):
    caplog.set_level(logging.INFO, logger="procdispatch")
    log = Log(tmp_path / "log")
    drops: list[list[int]] = []
    ch = make_channel(
        Fault(log, "sigkill", trigger=2, attempts=99),
        workers=2,
        batch_items_max=2,
        retry=pd.retry.limited(10, 0.0),
        on_drop=lambda b, f: b is not None and drops.append(list(b.data)),
    )
    ch.put_many(range(6))
    assert ch.close_and_drain(60)
    assert drops == [[2, 3]]
    assert sorted(delivered_items(log)) == [0, 1, 4, 5]
    s = ch.stats()
    assert (s.batches_failed, s.batches_retried, s.worker_restarts) == (3, 2, 3)
    assert (s.items_delivered, s.items_dropped) == (4, 2)
    msgs = [r.getMessage() for r in caplog.records if r.name == "procdispatch"]
    assert any("poison: it crashed or timed out a worker 3 times" in m for m in msgs)
    assert sum("transient error, will retry" in m for m in msgs) == 2


@pytest.mark.needs("processes", why="workers are told apart by their process ids")
def test_recycling_after_n_batches(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=1, batch_items_max=1, max_batches_per_worker=3)
    for i in range(10):
        ch.put(i)
    assert ch.close_and_drain(60)
    per_pid: dict[int, int] = {}
    for r in log.read():
        if r["ev"] == "sent":
            per_pid[r["pid"]] = per_pid.get(r["pid"], 0) + 1
    assert sorted(per_pid.values()) == [1, 3, 3, 3]
    s = ch.stats()
    assert s.items_delivered == 10
    assert s.batches_failed == 0
    assert s.worker_restarts == 3


@pytest.mark.needs("processes", why="a worker's memory is its process's")
def test_recycling_above_max_worker_memory(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    # Any real process is above 1 byte of RSS: every worker is replaced after each batch.
    ch = make_channel(Recorder(log), workers=1, batch_items_max=1, max_worker_memory=1)
    for i in range(4):
        ch.put(i)
    assert ch.close_and_drain(60)
    pids = [r["pid"] for r in log.read() if r["ev"] == "sent"]
    assert len(pids) == 4
    assert len(set(pids)) == 4
    assert ch.stats().items_delivered == 4


PARENT = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{tests!r}]
    from workerfns import Gate, Log, Recorder
    import procdispatch as pd
    if __name__ == "__main__":
        ch = pd.ProcessChannel(Recorder(Log(sys.argv[1]), gate=Gate(sys.argv[2])),
                               workers=2, batch_items_max=1, start_method=sys.argv[3])
        ch.put(1)
        ch.put(2)
        time.sleep(600)
    """
)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_exit_when_the_parent_is_sigkilled(tmp_path, method):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=TESTS))
    log = Log(tmp_path / "log")
    proc = subprocess.Popen([sys.executable, str(script), log.path, str(tmp_path / "gate"), method])
    try:
        recs = log.wait_count(2, timeout=60, ev="start")
        pids = {r["pid"] for r in recs}
        assert len(pids) == 2
        proc.kill()
        proc.wait(10)
        killed = time.monotonic()
        # Workers are mid-send (held at a gate that never opens): only the watchdog saves us.
        wait_for(lambda: all(_gone(p) for p in pids), timeout=3.0, what="orphaned workers to exit")
        assert time.monotonic() - killed < 3.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


INTERRUPTED = textwrap.dedent(
    """
    import json, sys, time
    sys.path[:0] = [{tests!r}]
    from workerfns import Log, Recorder
    import procdispatch as pd
    if __name__ == "__main__":
        drops = []
        errors = []
        ch = pd.ProcessChannel(
            Recorder(Log(sys.argv[1]), sleep=0.05), workers=2, batch_items_max=5,
            cancel_grace=1.0,
            on_drop=lambda b, f: b is not None and drops.extend(b.data),
            on_error=lambda b, e: errors.append(repr(e)) or True,
        )
        try:
            with ch:
                for i in range(1_000_000):
                    ch.put(i)
        except KeyboardInterrupt:
            left = time.monotonic()
            s = ch.stats()
            print(json.dumps(dict(left=left, put=s.items_put, delivered=s.items_delivered,
                                  dropped=s.items_dropped, restarts=s.worker_restarts,
                                  drops=len(drops), unique_drops=len(set(drops)),
                                  errors=errors, drained=ch.drained)))
            sys.exit(0)
        sys.exit(1)
    """
)


def test_ctrl_c_inside_the_with_block_cancels_and_reports_every_item(tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED.format(tests=TESTS))
    log = Log(tmp_path / "log")
    proc = subprocess.Popen(
        [sys.executable, str(script), log.path],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        log.wait_count(4, timeout=60, ev="sent")
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal does
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    res = json.loads(out)
    assert res["left"] - interrupted < 1.0 + 1.0  # cancel_grace + 1 s
    assert res["drained"]
    assert res["errors"] == []  # workers ignored SIGINT: nothing crashed
    assert res["restarts"] == 0
    assert res["put"] == res["delivered"] + res["dropped"]
    assert res["drops"] == res["unique_drops"] == res["dropped"] > 0
    sent = delivered_items(log)
    assert len(sent) == len(set(sent)) == res["delivered"]


class _Jitter(Recorder):
    def __call__(self, batch: pd.Batch[Any]) -> None:
        time.sleep(random.random() * 0.002)
        super().__call__(batch)


@pytest.mark.needs("processes", why="a worker that crashes or is killed is a process of its own")
def test_chaos_random_sigkills(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    dropped: list[int] = []
    lock = threading.Lock()

    def on_drop(b: pd.Batch[int] | None, flush: bool) -> None:
        if b is not None:
            with lock:
                dropped.extend(b.data)

    ch = make_channel(
        _Jitter(log),
        workers=4,
        batch_items_max=20,
        batch_age_max=0.05,
        retry=pd.retry.exponential(initial=0.01, max_delay=0.1),
        on_drop=on_drop,
    )
    stop = threading.Event()
    kills: list[int] = []

    def killer() -> None:
        rng = random.Random(7)
        while not stop.wait(rng.uniform(0.03, 0.12)):
            recs = [r for r in log.read()[-50:] if r["ev"] == "start"]
            if recs:
                pid = recs[-1]["pid"]
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass

    t = threading.Thread(target=killer)
    t.start()
    try:
        ch.put_many(range(20_000))
        ch.close()
        assert ch.wait_drained(240), "did not drain within the deadline"
    finally:
        stop.set()
        t.join()
    delivered = delivered_items(log)
    s = ch.stats()
    assert kills
    assert s.worker_restarts >= 1
    assert set(delivered) | set(dropped) == set(range(20_000))
    assert len(dropped) == len(set(dropped)) == s.items_dropped
    assert s.items_put == 20_000 == s.items_delivered + s.items_dropped
    assert s.items_buffered == s.items_in_flight == 0
    assert not worker_processes()
