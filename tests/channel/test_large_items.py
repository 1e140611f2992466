"""Large bytes items through shared memory: send_fn gets what was put, and the segments are
gone whatever ends the worker or the program (see procdispatch.backends._arena)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from largefns import HOLD, Describe, RemoveHalfThenFail, describe
from workerfns import Gate, Log, wait_for

import procdispatch as pd
from procdispatch.backends import _arena, process
from procdispatch.backends._arena import OOB_MIN

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/dev/shm"), reason="the segments are looked for in /dev/shm"
)

TESTS = str(Path(__file__).resolve().parent.parent)


def _segments(pid: int | None = None) -> list[str]:
    """The arenas a process made (by default, this one) that still exist."""
    prefix = f"pd{os.getpid() if pid is None else pid}-"
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(prefix))


def _sent(log: Log) -> list[list[Any]]:
    return [item for r in log.read() if r["ev"] == "sent" for item in r["items"]]


ITEMS: list[Any] = [
    b"a" * 100_000,
    bytearray(b"b" * 20_000),
    5,
    b"small",
    b"c" * OOB_MIN,  # the smallest that goes through the arena
    bytearray(OOB_MIN - 1),  # the largest that does not
    "text",
    b"d" * (3 * OOB_MIN),
]


def test_large_items_reach_send_fn_as_the_types_that_were_put(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    ch = make_channel(Describe(log), workers=2, batch_items_max=4)
    ch.put_many(ITEMS * 3)
    assert ch.close_and_drain(60)
    assert sorted(_sent(log)) == sorted(describe(x) for x in ITEMS * 3)
    assert _segments() == []


def test_items_removed_by_a_failed_send_are_delivered_and_the_rest_retried(tmp_path, make_channel):
    delivered: list[list[Any]] = []
    log = Log(tmp_path / "log")
    ch = make_channel(
        RemoveHalfThenFail(log),
        workers=1,
        batch_items_max=4,
        on_error=lambda b, e: True,
        retry=pd.retry.limited(1, 0.0),
        on_delivered=lambda b: delivered.append([describe(x) for x in b.data]),
    )
    items = [b"e" * 50_000, bytearray(b"f" * 50_000), b"g" * 50_000, b"h" * 10]
    ch.put_many(items)
    assert ch.close_and_drain(60)
    s = ch.stats()
    assert (s.items_delivered, s.batches_failed, s.batches_retried) == (4, 1, 1)
    assert sorted(x for d in delivered for x in d) == sorted(describe(x) for x in items)
    assert sorted(_sent(log)) == sorted(describe(x) for x in items[2:])  # the retry
    assert _segments() == []


@pytest.mark.needs("processes", why="the worker is killed with SIGKILL")
def test_a_worker_killed_mid_send_leaves_no_shared_memory_behind(tmp_path, make_channel):
    log, gate = Log(tmp_path / "log"), Gate(tmp_path / "gate")
    errors: list[BaseException] = []
    ch = make_channel(
        Describe(log, gate),
        workers=1,
        batch_items_max=2,
        retry=pd.retry.limited(1, 0.0),
        on_error=lambda b, e: errors.append(e) or True,
    )
    items = [HOLD + b"x" * 100_000, bytearray(b"y" * 50_000)]
    ch.put_many(items)
    try:
        (first,) = log.wait_count(1, ev="start")
        (arena,) = _segments()  # the lease came through the worker's arena
        os.kill(first["pid"], signal.SIGKILL)
        second = log.wait_count(2, ev="start")[1]  # the retry, held by the new worker
        assert second["pid"] != first["pid"]
        (now,) = _segments()
        assert now != arena  # the dead worker's arena went with it; the new one has its own
    finally:
        gate.open()
    assert ch.close_and_drain(60)
    (exc,) = errors
    assert isinstance(exc, pd.WorkerCrashed)
    assert _sent(log) == [describe(x) for x in items]
    assert _segments() == []


PARENT = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}]
    from largefns import HOLD, Describe
    from workerfns import Gate, Log
    import procdispatch as pd
    if __name__ == "__main__":
        ch = pd.ProcessChannel(
            Describe(Log(sys.argv[1]), Gate(sys.argv[2])), workers=1, batch_items_max=1
        )
        ch.put(HOLD + b"x" * 100_000)
        ch.wait_drained()  # never: the test kills this process
    """
)


def test_the_arena_of_a_program_killed_with_sigkill_is_unlinked(tmp_path):
    """multiprocessing's resource tracker unlinks it once the program and its workers are
    gone (it warns about a leaked segment on its way)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=TESTS))
    log, gate = Log(tmp_path / "log"), Gate(tmp_path / "gate")
    proc = subprocess.Popen(
        [sys.executable, str(script), log.path, gate.path], stderr=subprocess.DEVNULL
    )
    try:
        log.wait_count(1, timeout=60, ev="start")
        assert len(_segments(proc.pid)) == 1
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not _segments(proc.pid), timeout=30, what="the segment to be unlinked")
    finally:
        gate.open()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.needs("processes", why="only worker processes have an arena")
def test_leases_the_arena_has_no_room_for_go_through_the_pipe(tmp_path, make_channel, monkeypatch):
    monkeypatch.setattr(_arena, "ARENA_SIZE", 150_000)
    log = Log(tmp_path / "log")
    ch = make_channel(Describe(log), workers=1, batch_items_max=2)
    items = [b"i" * 100_000, b"j" * 100_000] * 3 + [b"k" * 60_000, b"l" * 60_000]
    ch.put_many(items)  # 200 kB batches: through the pipe; the last one (120 kB) fits
    assert ch.close_and_drain(60)
    assert sorted(_sent(log)) == sorted(describe(x) for x in items)
    assert _segments() == []


@pytest.mark.needs("processes", why="only worker processes have an arena")
def test_a_worker_whose_arena_cannot_be_made_gets_its_items_through_the_pipe(
    tmp_path, make_channel, monkeypatch, caplog
):
    class NoSharedMemory(_arena.Arena):
        def __init__(self, size: int | None = None) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(process, "Arena", NoSharedMemory)
    caplog.set_level("INFO", logger="procdispatch")
    log = Log(tmp_path / "log")
    ch = make_channel(Describe(log), workers=1, batch_items_max=4)
    ch.put_many(ITEMS * 2)
    assert ch.close_and_drain(60)
    assert sorted(_sent(log)) == sorted(describe(x) for x in ITEMS * 2)
    (msg,) = [r.getMessage() for r in caplog.records if "large items go through" in r.getMessage()]
    assert "No space left on device" in msg
    assert _segments() == []


@pytest.mark.needs("processes", why="only worker processes have an arena")
def test_leases_the_arena_is_full_for_wait_for_room_instead_of_the_pipe(
    tmp_path, make_channel, monkeypatch
):
    """A worker with quick sends of large items is handed many at once; those the arena has
    no room for yet go back to the queue and reach it through the arena later."""
    monkeypatch.setattr(_arena, "ARENA_SIZE", 1 << 20)
    piped: list[int] = []
    encode = process.proto.encode_lease

    def counting(batch: Any) -> Any:
        if isinstance(batch.data[0], bytes) and len(batch.data[0]) >= OOB_MIN:
            piped.append(batch.id)
        return encode(batch)

    monkeypatch.setattr(process.proto, "encode_lease", counting)
    log = Log(tmp_path / "log")
    ch = make_channel(Describe(log), workers=1, batch_items_max=1)
    items = [bytes([i]) * 300_000 for i in range(40)]  # three fit in the arena at once
    ch.put_many(items)
    assert ch.close_and_drain(60)
    assert sorted(_sent(log)) == sorted(describe(x) for x in items)  # each exactly once
    assert piped == []
    s = ch.stats()
    assert (s.items_delivered, s.batches_sent, s.batches_failed) == (40, 40, 0)
    assert _segments() == []
