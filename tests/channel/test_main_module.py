"""Workers never run the user's main module: a script without ``if __name__ == "__main__":``
works with every start method, a guarded one still does, the script's directory still reaches
the workers' sys.path, and where workers would have to run the script again the channel fails
at once with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scriptrun import run_program

METHODS = pytest.mark.parametrize("method", [None, "forkserver", "spawn", "fork"])

# The example at the top of the README, as a user writes it: no main guard, default options but
# small sizes. Every run of the script's top level leaves a line in RUNS.
README_EXAMPLE = """
import json, os
import procdispatch as pd

with open(RUNS_PATH, "a") as f:
    f.write(f"{os.getpid()}\\n")

def post_rows(rows):
    with open(LOG_PATH, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\\n")

def read_rows():
    for i in range(40):
        yield {"id": i, "name": f"row {i}"}

def send(batch: pd.Batch[dict]) -> None:      # runs in a worker process
    post_rows(batch.data)                     # raise to fail the batch

with pd.ProcessChannel(send, workers=2, batch_items_max=5, batch_age_max=0.5,
                       qps_limit=200, start_method=METHOD) as ch:
    for row in read_rows():
        ch.put(row)                           # blocks while the buffer is full
# leaving the block: close + wait until every batch is acked or dropped
print(json.dumps({"delivered": ch.stats().items_delivered, "pid": os.getpid()}))
"""


def _fill(source: str, tmp_path: Path, method: str | None) -> str:
    return (
        source.replace("RUNS_PATH", repr(str(tmp_path / "runs")))
        .replace("LOG_PATH", repr(str(tmp_path / "log")))
        .replace("METHOD", repr(method))
    )


def _runs(tmp_path: Path) -> list[int]:
    return [int(x) for x in (tmp_path / "runs").read_text().split()]


@METHODS
def test_the_unguarded_readme_example_delivers_every_item(tmp_path, method):
    ran = run_program(_fill(README_EXAMPLE, tmp_path, method), "file", tmp_path)
    result = ran.result
    assert result["delivered"] == 40, ran.describe()
    rows = [json.loads(x) for x in (tmp_path / "log").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(40))
    assert _runs(tmp_path) == [result["pid"]]  # the script ran once: no worker ran it
    assert "Traceback" not in ran.proc.stderr, ran.describe()


GUARDED = """
import json, os, sys
import procdispatch as pd
import beside_the_script  # a module next to the script, found through sys.path[0]

with open(RUNS_PATH, "a") as f:
    f.write(f"{os.getpid()}\\n")

def send(batch):
    with open(LOG_PATH, "a") as f:
        for x in batch.data:
            f.write(beside_the_script.tag(x) + "\\n")

def main():
    with pd.ProcessChannel(send, workers=2, batch_items_max=3, start_method=METHOD) as ch:
        ch.put_many(range(10))
    print(json.dumps({"delivered": ch.stats().items_delivered, "pid": os.getpid()}))

if __name__ == "__main__":
    main()
"""


@METHODS
def test_a_guarded_script_works_and_runs_once_with_its_directory_on_sys_path(tmp_path, method):
    app = tmp_path / "app"
    app.mkdir()
    (app / "beside_the_script.py").write_text("def tag(x):\n    return f'tagged {x}'\n")
    # Run from another directory: only sys.path, not the working directory, finds the module.
    ran = run_program(_fill(GUARDED, tmp_path, method), "file", tmp_path, name="app/main.py")
    assert ran.result["delivered"] == 10, ran.describe()
    lines = (tmp_path / "log").read_text().splitlines()
    assert sorted(lines) == sorted(f"tagged {i}" for i in range(10))
    assert _runs(tmp_path) == [ran.result["pid"]]


# The start the standard way (what happens where the launch of our own cannot be used).
STANDARD_START = "import procdispatch.backends._procstart as ps\nps._launchers = {}\n"


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_where_workers_must_run_the_script_an_unguarded_channel_fails_at_once(tmp_path, method):
    source = STANDARD_START + _fill(README_EXAMPLE, tmp_path, method)
    ran = run_program(source, "file", tmp_path, check=False)
    err = ran.proc.stderr
    assert ran.proc.returncode == 1, ran.describe()
    assert err.count("Traceback") == 1, ran.describe()
    assert "procdispatch.errors.OptionsError: start_method must be 'fork'" in err
    assert 'if __name__ == "__main__":' in err
    assert f"(got {method!r} at {tmp_path / 'prog.py'}, line " in err
    assert "bootstrapping phase" not in err
    assert not (tmp_path / "log").exists()


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_the_standard_start_still_serves_a_guarded_script(tmp_path, method):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "beside_the_script.py").write_text("def tag(x):\n    return str(x)\n")
    source = STANDARD_START + _fill(GUARDED, tmp_path, method)
    ran = run_program(source, "file", tmp_path, name="app/main.py")
    assert ran.result["delivered"] == 10, ran.describe()


def test_the_standard_start_with_fork_serves_an_unguarded_script(tmp_path):
    source = STANDARD_START + _fill(README_EXAMPLE, tmp_path, "fork")
    assert run_program(source, "file", tmp_path).result["delivered"] == 40


ITEMS_OF_MAIN = """
import dataclasses, json
import procdispatch as pd

@dataclasses.dataclass
class Row:
    n: int

class Retry(Exception):
    pass

def send(batch):
    if batch.attempt == 1:
        batch.data[0] = Row(100)  # the mutation travels back, and so does the exception
        raise Retry("once more")
    with open(LOG_PATH, "a") as f:
        for row in batch.data:
            f.write(f"{type(row).__name__} {row.n}\\n")

errors = []

def on_error(batch, exc):
    errors.append(type(exc) is Retry)
    return type(exc) is Retry

if __name__ == "__main__":
    with pd.ProcessChannel(send, workers=1, batch_items_max=3, on_error=on_error,
                           on_drop=pd.drop_quiet, start_method=METHOD) as ch:
        ch.put_many([Row(1), Row(2), Row(3)])
    print(json.dumps({"delivered": ch.stats().items_delivered, "errors": errors}))
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_items_of_classes_defined_in_the_main_module_reach_the_workers(tmp_path, method):
    ran = run_program(_fill(ITEMS_OF_MAIN, tmp_path, method), "file", tmp_path)
    assert ran.result == {"delivered": 3, "errors": [True]}, ran.describe()
    lines = (tmp_path / "log").read_text().splitlines()
    assert sorted(lines) == ["Row 100", "Row 2", "Row 3"]
