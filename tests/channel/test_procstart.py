"""How worker processes start: a module run with ``-m`` is not imported again, a forked child
gets a forkserver of its own, the main-guard check reads a script's guard correctly, and workers
import the parent's procdispatch whatever the working directory holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from scriptrun import RUN_TIMEOUT, run_program

import procdispatch as pd
from procdispatch.backends._mainguard import _guarded

MODULE = """
import json, os
import procdispatch as pd

with open(RUNS, "a") as f:
    f.write(f"{os.getpid()}\\n")

def send(batch):
    with open(LOG, "a") as f:
        f.write("".join(f"{x}\\n" for x in batch.data))

def main():
    with pd.ProcessChannel(send, workers=2, batch_items_max=2, start_method=METHOD) as ch:
        ch.put_many(range(6))
    print(json.dumps({"delivered": ch.stats().items_delivered, "pid": os.getpid()}))

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_module_run_with_dash_m_is_not_imported_again_by_the_workers(tmp_path, method):
    runs, log = tmp_path / "runs", tmp_path / "log"
    source = (
        textwrap.dedent(MODULE)
        .replace("RUNS", repr(str(runs)))
        .replace("LOG", repr(str(log)))
        .replace("METHOD", repr(method))
    )
    (tmp_path / "app_module.py").write_text(source)
    proc = subprocess.run(
        [sys.executable, "-m", "app_module"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["delivered"] == 6
    assert sorted(int(x) for x in log.read_text().split()) == list(range(6))
    assert [int(x) for x in runs.read_text().split()] == [result["pid"]]


FORKED = """
import json, multiprocessing, os
import procdispatch as pd

def send(batch):
    with open(LOG, "a") as f:
        f.write("".join(f"{os.getppid()} {x}\\n" for x in batch.data))

def deliver(tag):
    with pd.ProcessChannel(send, workers=1, start_method="forkserver") as ch:
        ch.put_many([f"{tag}-1", f"{tag}-2"])
    assert ch.stats().items_delivered == 2, ch.stats()

if __name__ == "__main__":
    deliver("parent")  # starts the forkserver of this process
    child = multiprocessing.get_context("fork").Process(target=deliver, args=("child",))
    child.start()
    child.join(60)
    print(json.dumps({"child_exit": child.exitcode}))
"""


def test_a_forked_child_starts_forkserver_workers_of_its_own(tmp_path):
    log = tmp_path / "log"
    ran = run_program(FORKED.replace("LOG", repr(str(log))), "file", tmp_path)
    assert ran.result == {"child_exit": 0}, ran.describe()
    items = sorted(line.split()[1] for line in log.read_text().splitlines())
    assert items == ["child-1", "child-2", "parent-1", "parent-2"]


SCRIPT = """\
import procdispatch as pd
ch = make()                      # line 2: unguarded
if __name__ == "__main__":
    ch = make()                  # line 4: guarded
else:
    ch = make()                  # line 6: the branch workers would run
if "__main__" == __name__:
    ch = make()                  # line 8: guarded, written the other way round
if __name__ != "__main__":
    ch = make()                  # line 10: not a main guard
"""


@pytest.mark.parametrize(
    ("line", "guarded"), [(2, False), (4, True), (6, False), (8, True), (10, False)]
)
def test_the_main_guard_is_read_from_the_script(tmp_path, line, guarded):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    assert _guarded(str(path), line) is guarded


def test_an_unreadable_script_is_not_judged(tmp_path):
    assert _guarded(str(tmp_path / "missing.py"), 1) is None
    (tmp_path / "broken.py").write_text("def (:\n")
    assert _guarded(str(tmp_path / "broken.py"), 1) is None


PRELOADED = """
import json, multiprocessing, sys
import procdispatch as pd

def send(batch):
    with open(LOG, "a") as f:
        f.write(json.dumps("preloaded_probe" in sys.modules) + "\\n")

if __name__ == "__main__":
    multiprocessing.set_forkserver_preload(["preloaded_probe"])
    with pd.ProcessChannel(send, workers=1, start_method="forkserver") as ch:
        ch.put(1)
    print(json.dumps({"parent_imported_it": "preloaded_probe" in sys.modules}))
"""


def test_what_the_user_preloads_in_the_forkserver_is_in_the_workers(tmp_path):
    # The server imports it (it runs in this directory), the parent never does.
    (tmp_path / "preloaded_probe.py").write_text("IMPORTED = True\n")
    log = tmp_path / "log"
    ran = run_program(PRELOADED.replace("LOG", repr(str(log))), "file", tmp_path)
    assert ran.result == {"parent_imported_it": False}, ran.describe()
    assert log.read_text().split() == ["true"]


# ---- workers run the parent's procdispatch, whatever the working directory holds -------------

WHICH = """
import json, os, sys
import procdispatch as pd

def send(batch):
    with open(LOG, "a") as f:
        f.write(pd.__file__ + "\\n")

if __name__ == "__main__":
    os.chdir(WORKDIR)
    with pd.ProcessChannel(send, workers=2, batch_items_max=1, start_method=METHOD) as ch:
        ch.put_many(range(4))
    print(json.dumps({"delivered": ch.stats().items_delivered, "parent": pd.__file__}))
"""

IMPOSTOR = """
raise RuntimeError("this procdispatch is not the parent's")
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
@pytest.mark.parametrize(
    ("how", "start_in", "work_in"),
    [
        # A script run from a directory that holds another procdispatch.
        ("script", "impostor", "impostor"),
        # python -c started elsewhere, moved into such a directory before the channel.
        ("-c", "home", "impostor"),
        # python -c run in a checkout: that checkout's procdispatch is the parent's.
        ("-c", "checkout", "checkout"),
    ],
)
def test_workers_import_the_parents_procdispatch_not_the_working_directorys(
    tmp_path, method, how, start_in, work_in
):
    real = os.path.dirname(os.path.dirname(pd.__file__))
    dirs = {name: tmp_path / name for name in ["impostor", "home", "checkout", "app"]}
    for d in dirs.values():
        d.mkdir()
    (dirs["impostor"] / "procdispatch").mkdir()
    (dirs["impostor"] / "procdispatch" / "__init__.py").write_text(IMPOSTOR)
    (dirs["checkout"] / "procdispatch").symlink_to(os.path.join(real, "procdispatch"))
    log = tmp_path / "log"
    source = (
        textwrap.dedent(WHICH)
        .replace("LOG", repr(str(log)))
        .replace("WORKDIR", repr(str(dirs[work_in])))
        .replace("METHOD", repr(method))
    )
    if how == "script":
        (dirs["app"] / "prog.py").write_text(source)
        cmd = [sys.executable, str(dirs["app"] / "prog.py")]
    else:
        cmd = [sys.executable, "-c", source]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [real, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=dirs[start_in],
        env=env,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    expected = dirs["checkout"] if start_in == "checkout" else real
    assert result == {
        "delivered": 4,
        "parent": os.path.join(str(expected), "procdispatch", "__init__.py"),
    }
    assert set(log.read_text().split()) == {result["parent"]}
    assert "Traceback" not in proc.stderr, proc.stderr


def test_our_forkserver_children_end_quietly_on_a_launch_cut_short(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A child whose launch the parent gave up part way reads an EOFError or a truncated
    pickle: it reports nothing; any other failure is reported as before."""
    import pickle

    from procdispatch.backends._forkserver import quiet_cut_launches

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    quiet_cut_launches()
    for exc in (EOFError("Ran out of input"), pickle.UnpicklingError("pickle data was truncated")):
        sys.excepthook(type(exc), exc, None)
    assert capsys.readouterr().err == ""
    other = pickle.UnpicklingError("invalid load key, 'x'.")
    sys.excepthook(type(other), other, None)
    assert "invalid load key" in capsys.readouterr().err


def test_what_a_worker_start_imports_leaves_out_inspect() -> None:
    """The forkserver preloads the worker module and this one, and a spawned worker imports
    both: ``inspect`` (about 6 ms, with ``ast`` and ``dis``) is only for the parent's check
    of multiprocessing's server, so neither start pays for it."""
    code = (
        "import sys, procdispatch.backends._worker, procdispatch.backends._procstart; "
        "print(sorted(m for m in ('inspect', 'ast', 'dis', 'dataclasses') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    assert out.stdout.strip() == "[]"
