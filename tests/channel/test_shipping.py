"""Shipping send_fn and worker_init to the workers: whatever cloudpickle can ship arrives, from a
script, ``python -c`` or stdin alike; what comes from the main module travels by value (workers
never run the main module), importable things by reference with the standard pickler; and a
worker's traceback names the user's file and line."""

from __future__ import annotations

import functools
import pickle
import sys
import types
from typing import Any

import pytest
from scriptrun import modes, run_program
from workerfns import Log, Recorder, noop

import procdispatch as pd
from procdispatch._protocol import dumps
from procdispatch.backends._shipping import pickle_payload

CALLABLES = """
import functools, json
import procdispatch as pd

LOG = LOG_PATH

def record(tag, batch):
    with open(LOG, "a") as f:
        for x in batch.data:
            f.write(f"{tag} {x}\\n")

def init(tag):
    with open(LOG, "a") as f:
        f.write(f"init {tag}\\n")

def plain(batch):
    record("plain", batch)

class Sender:
    def __init__(self, tag):
        self.tag = tag

    def send(self, batch):
        record(self.tag, batch)

    def __call__(self, batch):
        record(self.tag, batch)

def make_closure(tag):
    def send(batch):
        record(tag, batch)
    return send

senders = {
    "partial": functools.partial(record, "partial"),
    "bound_method": Sender("bound_method").send,
    "callable_instance": Sender("callable_instance"),
    "closure": make_closure("closure"),
    "plain": plain,
    "lambda": lambda batch: record("lambda", batch),
}

if __name__ == "__main__":
    delivered = {}
    for tag, fn in senders.items():
        with pd.ProcessChannel(
            fn, workers=1, worker_init=functools.partial(init, tag), on_drop=pd.drop_quiet
        ) as ch:
            ch.put_many([1, 2])
        delivered[tag] = ch.stats().items_delivered
    print(json.dumps(delivered))
"""


@modes
def test_every_kind_of_callable_from_the_main_module_reaches_the_workers(tmp_path, mode):
    log = tmp_path / "log"
    ran = run_program(CALLABLES.replace("LOG_PATH", repr(str(log))), mode, tmp_path)
    tags = ["partial", "bound_method", "callable_instance", "closure", "plain", "lambda"]
    assert ran.result == dict.fromkeys(tags, 2), ran.describe()
    lines = log.read_text().splitlines()
    for tag in tags:
        assert f"init {tag}" in lines
        assert lines.count(f"{tag} 1") == 1
        assert lines.count(f"{tag} 2") == 1


FAILING = """
import json
import procdispatch as pd

tracebacks = []

def send(batch):
    raise ValueError("boom")  # the line the worker's traceback must name

def on_error(batch, exc):
    tracebacks.append(exc.__cause__.tb)
    return False

# At module level, without a main guard: workers never run this script.
with pd.ProcessChannel(send, workers=1, on_error=on_error, on_drop=pd.drop_quiet) as ch:
    ch.put(1)
print(json.dumps({"tb": tracebacks[0]}))
"""


@modes
def test_a_worker_traceback_names_the_users_file_and_line(tmp_path, mode):
    ran = run_program(FAILING, mode, tmp_path)
    tb = ran.result["tb"]
    source = FAILING.splitlines()
    line = next(i for i, x in enumerate(source, 1) if 'raise ValueError("boom")' in x)
    assert f'File "{ran.script}", line {line}, in send' in tb, tb
    assert "<dynamic-code>" not in tb
    if mode == "file":  # the worker reads the script for the source line
        assert 'raise ValueError("boom")  # the line the worker' in tb, tb


NOTEBOOK = """
import json, linecache
import procdispatch as pd

CELL = 'def send(batch):\\n    size = len(batch.data)\\n    raise KeyError(size)\\n'
# What a notebook does with a cell: its source is known to linecache under a pseudo-file name.
linecache.cache["<cell-7>"] = (len(CELL), None, CELL.splitlines(True), "<cell-7>")
exec(compile(CELL, "<cell-7>", "exec"))

tracebacks = []

def on_error(batch, exc):
    tracebacks.append(exc.__cause__.tb)
    return False

with pd.ProcessChannel(send, workers=1, on_error=on_error, on_drop=pd.drop_quiet) as ch:
    ch.put(1)
print(json.dumps({"tb": tracebacks[0]}))
"""


def test_source_lines_of_a_notebook_cell_reach_the_worker_traceback(tmp_path):
    tb = run_program(NOTEBOOK, "-c", tmp_path).result["tb"]
    assert 'File "<cell-7>", line 3, in send' in tb, tb
    assert "raise KeyError(size)" in tb, tb


# ---- in this process ------------------------------------------------------------------------


def test_importable_callables_travel_by_reference_without_cloudpickle(tmp_path):
    log = Log(tmp_path / "log")
    for fn in (noop, functools.partial(noop), Recorder(log), pd.drop_quiet):
        payload = pickle_payload(fn, None, "forkserver")
        assert b"cloudpickle" not in payload, fn
        assert pickle.loads(payload)[0] is not None


def test_code_sent_by_value_keeps_its_file_name_and_lines():
    def nested(batch: Any) -> int:
        return len(batch)  # a line of this file

    send_fn, init = pickle.loads(pickle_payload(nested, lambda: None, "forkserver"))
    assert send_fn.__code__.co_filename == __file__
    assert send_fn.__code__.co_firstlineno == nested.__code__.co_firstlineno
    assert init.__code__.co_filename == __file__
    assert send_fn([1, 2]) == 2


def test_a_module_registered_to_travel_by_value_does(tmp_path):
    import cloudpickle

    (tmp_path / "shipped_by_value.py").write_text("def send(batch):\n    return 42\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import shipped_by_value  # type: ignore[import-not-found]

        cloudpickle.register_pickle_by_value(shipped_by_value)
        try:
            payload = pickle_payload(shipped_by_value.send, None, "forkserver")
        finally:
            cloudpickle.unregister_pickle_by_value(shipped_by_value)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("shipped_by_value", None)
    # Loads where the module cannot be imported: the function came by value.
    send_fn, _ = pickle.loads(payload)
    assert send_fn(None) == 42


def test_what_names_the_main_module_is_pickled_by_value(monkeypatch):
    main = types.ModuleType("__main__")

    class Row:
        def __init__(self, n: int) -> None:
            self.n = n

    Row.__module__ = "__main__"
    Row.__qualname__ = "Row"
    main.Row = Row  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__main__", main)
    data = dumps([Row(1)])
    # The standard pickler would name __main__.Row; this pickle carries the class itself.
    assert b"cloudpickle" in data
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    (row,) = pickle.loads(data)
    assert row.n == 1
    assert dumps([1, "a"]) == pickle.dumps([1, "a"], 5)


@pytest.mark.needs("processes", why="cloudpickle is imported in the parent that runs the tests")
def test_recorder_in_the_workers_sees_no_cloudpickle(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    ch = make_channel(ModuleProbe(log), workers=1)
    ch.put("x")
    assert ch.close_and_drain(60)
    (rec,) = [r for r in log.read() if r["ev"] == "probe"]
    assert rec["cloudpickle"] is False


class ModuleProbe:
    """send_fn reporting whether the worker had to import cloudpickle."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def __call__(self, batch: pd.Batch[Any]) -> None:
        self.log.write(ev="probe", cloudpickle="cloudpickle" in sys.modules)
