"""Run ``python -m procdispatch run`` in a subprocess, from the tests folder (so that the sinks
of ``clifns`` load as a module of the current directory), and read what it printed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
RUN_TIMEOUT = 240.0


def cli(
    *args: str,
    stdin: int | IO[Any] | None = None,
    pass_fds: tuple[int, ...] = (),
    **env: str,
) -> subprocess.Popen[str]:
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = str(REPO)  # not the tests folder: clifns comes from the current dir
    return subprocess.Popen(
        [sys.executable, "-m", "procdispatch", "run", *args],
        cwd=TESTS,
        env=full,
        stdin=stdin,
        pass_fds=pass_fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Close its stdin (if a pipe), wait for the end, and return the status and the output."""
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    return proc.returncode, out + err


@contextlib.contextmanager
def killed_on_failure(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """A test that fails midway leaves no process behind."""
    try:
        yield proc
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=RUN_TIMEOUT)
        raise


def final_stats(output: str) -> dict[str, int]:
    """The counts of the final statistics line: put, delivered, dropped, and (0 when not
    shown) not_json and not_put."""
    m = re.search(
        r"procdispatch: (\d+) items put, (\d+) delivered, (\d+) dropped"
        r"(?:, (\d+) lines not JSON)?(?:, (\d+) read after the interrupt and not put)? in ",
        output,
    )
    assert m, f"no final statistics line in:\n{output}"
    put, delivered, dropped, not_json, not_put = (int(g or 0) for g in m.groups())
    return {
        "put": put,
        "delivered": delivered,
        "dropped": dropped,
        "not_json": not_json,
        "not_put": not_put,
    }


def json_lines(path: Path) -> list[Any]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


class Collect:
    """send_fn of the in-process CLI runs (thread backend): every item it was sent, in one
    list shared by the worker threads."""

    def __init__(self) -> None:
        self.got: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, batch: Any) -> None:
        with self.lock:
            self.got.extend(batch.data)
