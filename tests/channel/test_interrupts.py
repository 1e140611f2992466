"""Ctrl-C (or any exception a signal handler raises) at any moment of a producer.

The randomized rounds run in a child interpreter (tests/interrupt_driver.py), where SIGINT
reaches a real main thread; each round checks that the ``with`` block is left within
``cancel_grace + 2 s``, that no lock is left held and that every item is accounted for exactly
once. The default run does 20 rounds; ``pytest -m soak`` runs 200.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent.parent
DRIVER = HERE / "interrupt_driver.py"


def _run_driver(tmp_path: Path, rounds: int, seed: int, modes: str | None = None) -> None:
    args = [sys.executable, str(DRIVER), str(rounds), str(seed), str(tmp_path)]
    if modes:
        args.append(modes)
    proc = subprocess.run(
        args, check=False, capture_output=True, text=True, timeout=60 + 3 * rounds
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    bad = [r for r in records if r["problems"]]
    detail = f"failed rounds: {bad}\nstderr (last 3000 chars):\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, detail
    assert not bad, detail
    assert len(records) == rounds, detail


def test_ctrl_c_inside_a_put_loop_never_hangs(tmp_path: Path) -> None:
    # The reported hang: `with ch: while True: ch.put(i)` and SIGINT from outside.
    _run_driver(tmp_path, rounds=10, seed=11, modes="put")


def test_random_interrupts(tmp_path: Path) -> None:
    _run_driver(tmp_path, rounds=20, seed=int(os.environ.get("PD_SEED", "20")))


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_random_interrupts_soak(tmp_path: Path) -> None:
    _run_driver(tmp_path, rounds=200, seed=int(os.environ.get("PD_SEED", "200")))


SECOND_CTRL_C = textwrap.dedent(
    """
    import logging, os, sys, time
    sys.path.insert(0, {tests!r})
    from workerfns import Gate, Log, Recorder
    import procdispatch as pd


    def main():
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
        log = Log({log!r})
        dropped = []
        ch = pd.ProcessChannel(
            Recorder(log, gate=Gate({gate!r})), workers=1, batch_items_max=1,
            batch_age_max=0.01, cancel_grace=60,
            on_drop=lambda b, f: b is not None and dropped.extend(b.data),
        )
        try:
            with ch:
                ch.put_many(["a", "b", "c"])
                while True:
                    time.sleep(0.01)
        except KeyboardInterrupt:
            pass
        s = ch.stats()
        print("RESULT", s.items_put, s.items_delivered, s.items_dropped, sorted(dropped))


    if __name__ == "__main__":
        main()
    """
)


def _read_until(proc: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line:
            lines.append(line)
            if needle in line:
                return lines
        else:
            time.sleep(0.01)
    raise AssertionError(f"{needle!r} not seen within {timeout}s; stderr so far: {lines}")


def test_first_ctrl_c_says_what_it_waits_for_and_a_second_stops_the_sends(
    tmp_path: Path,
) -> None:
    from workerfns import Log

    log = Log(tmp_path / "log")
    script = tmp_path / "second.py"
    script.write_text(
        SECOND_CTRL_C.format(tests=str(HERE), log=log.path, gate=str(tmp_path / "never"))
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log.wait_count(1, ev="start")  # the first send is under way (and held by the gate)
        proc.send_signal(signal.SIGINT)
        said = _read_until(proc, "Ctrl-C again", timeout=30)
        assert any("waiting up to 60.0s (cancel_grace) for 1 send(s) in flight" in x for x in said)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert "stopping 1 send(s) in flight now" in err, err
    result: Any = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT 3 0 3 ['a', 'b', 'c']"], (out, err)
