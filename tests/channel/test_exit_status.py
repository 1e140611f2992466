"""The status a process exits with when a signal interrupts the drain at interpreter exit.

Each case is a script run in a child interpreter; it leaves a channel open, so the exit hook
drains it, and the test signals it once the first send of that drain is under way (the sink's
"start" record), then reads its exit status, stdout (what on_drop saw) and stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from workerfns import Gate, Log, wait_for

HERE = Path(__file__).resolve().parent.parent

SCRIPT = """
import logging, os, sys, time
sys.path.insert(0, {tests!r})
from workerfns import Gate, Log, Recorder
import procdispatch as pd
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
log = Log({log!r})

def on_drop(b, flush):
    if flush:
        print("FLUSH", flush=True)  # the last report of the cancel
    elif b is not None:
        print("DROPPED", *b.data, flush=True)

if {sigterm!r}:
    pd.drain_on_sigterm({sigterm})
ch = pd.ProcessChannel(Recorder(log, gate=Gate({gate!r})), workers=1, batch_items_max=1,
                       cancel_grace=0.2, on_drop=on_drop)
ch.put_many(range(5))
print("END OF SCRIPT", flush=True)
sys.exit({status})
"""


def _run(
    tmp_path: Path, signals: list[int], sigterm: float | None = None, status: int = 0
) -> tuple[int, str, str]:
    """Run the script; send ``signals`` once the exit drain's first send has started (the
    second after the first was seen to act), then open the gate so that sends can end."""
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    path = tmp_path / "script.py"
    path.write_text(
        textwrap.dedent(SCRIPT).format(
            tests=str(HERE), log=log.path, gate=gate.path, sigterm=sigterm, status=status
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        log.wait_count(1, ev="start")  # the script ended: the exit hook drains
        for n, sig in enumerate(signals):
            proc.send_signal(sig)
            if n + 1 < len(signals):
                _wait_in(tmp_path, proc, sig)
        if sigterm is not None:
            gate.open()  # a SIGTERM drain goes on: let it
        out, err = proc.communicate(timeout=60)
    finally:
        gate.open()
        proc.kill()
        proc.wait()
    return proc.returncode, out, err


def _wait_in(tmp_path: Path, proc: subprocess.Popen[str], sig: int) -> None:
    """Wait until the hook answered the first signal (it logs a line for SIGINT); keep what
    stderr said meanwhile in ``stderr-head``."""
    assert proc.stderr is not None
    stderr = proc.stderr
    os.set_blocking(stderr.fileno(), False)
    seen: list[str] = []

    def answered() -> bool:
        line = stderr.readline()
        if line:
            seen.append(line)
        return any("Ctrl-C at exit" in x for x in seen)

    wait_for(answered, 30, "the exit hook's answer to the first Ctrl-C")
    (tmp_path / "stderr-head").write_text("".join(seen))


def test_ctrl_c_during_the_exit_drain_exits_130_after_the_drops_were_reported(
    tmp_path: Path,
) -> None:
    code, out, err = _run(tmp_path, [signal.SIGINT])
    assert code == 130, (out, err)
    assert "Ctrl-C at exit: cancelling 1 channel(s)" in err, err
    lines = out.splitlines()
    assert lines[0] == "END OF SCRIPT"
    dropped = sorted(
        int(x) for line in lines if line.startswith("DROPPED") for x in line[8:].split()
    )
    assert dropped == [0, 1, 2, 3, 4], out
    assert lines[-1] == "FLUSH", out  # the status came after on_drop's last call


def test_a_second_ctrl_c_at_exit_still_exits_130(tmp_path: Path) -> None:
    code, out, err = _run(tmp_path, [signal.SIGINT, signal.SIGINT])
    head = (tmp_path / "stderr-head").read_text()
    assert code == 130, (out, head + err)
    assert out.splitlines()[-1] == "FLUSH", out


def test_sigterm_during_the_exit_drain_exits_143_after_draining(tmp_path: Path) -> None:
    code, out, err = _run(tmp_path, [signal.SIGTERM], sigterm=30.0)
    assert code == 143, (out, err)
    assert "DROPPED" not in out  # the drain had time: everything was sent
    assert sorted(r["data"][0] for r in Log(tmp_path / "log").read() if r["ev"] == "sent") == [
        0,
        1,
        2,
        3,
        4,
    ]


@pytest.mark.parametrize("status", [0, 3])
def test_an_uninterrupted_exit_drain_keeps_the_scripts_own_status(
    tmp_path: Path, status: int
) -> None:
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    gate.open()
    path = tmp_path / "script.py"
    path.write_text(
        textwrap.dedent(SCRIPT).format(
            tests=str(HERE), log=log.path, gate=gate.path, sigterm=5.0, status=status
        )
    )
    proc = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == status, proc.stderr
    assert "DROPPED" not in proc.stdout
