"""Run a user's program in a fresh interpreter, the ways a user runs one: as a script file, with
``python -c``, or fed on stdin. Each program prints one JSON line last, which the test reads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

MODES = ("file", "-c", "stdin")
modes = pytest.mark.parametrize("mode", MODES)

RUN_TIMEOUT = 90.0


class Ran:
    def __init__(self, proc: subprocess.CompletedProcess[str], script: str) -> None:
        self.proc = proc
        self.script = script  # the file name the program's code objects carry

    @property
    def result(self) -> Any:
        lines = [x for x in self.proc.stdout.splitlines() if x.startswith("{")]
        assert lines, f"no JSON line in the output:\n{self.describe()}"
        return json.loads(lines[-1])

    def describe(self) -> str:
        p = self.proc
        return f"exit status {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def run_program(
    source: str, mode: str, tmp_path: Path, name: str = "prog.py", check: bool = True
) -> Ran:
    """Run ``source`` in ``tmp_path`` and return what it printed; with ``check``, assert that
    it exited 0."""
    source = textwrap.dedent(source)
    if mode == "file":
        path = tmp_path / name
        path.write_text(source)
        cmd, stdin, script = [sys.executable, str(path)], None, str(path)
    elif mode == "-c":
        cmd, stdin, script = [sys.executable, "-c", source], None, "<string>"
    else:
        cmd, stdin, script = [sys.executable, "-"], source, "<stdin>"
    proc = subprocess.run(
        cmd,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    ran = Ran(proc, script)
    if check:
        assert proc.returncode == 0, ran.describe()
    return ran
