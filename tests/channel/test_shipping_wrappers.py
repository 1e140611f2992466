"""Wrapped callables from the main module reach the workers: bound methods made with
``types.MethodType`` (of a lambda, of a main-module function, on a main-module object or a
plain ``object()``), ``functools.lru_cache`` / ``functools.cache`` wrappers (of main-module
functions, of a lambda, and used by send_fn as globals), partials of those, and main-module
instances with ``__call__``; as send_fn and as worker_init, from a script file, ``python -c``
and stdin. What still cannot reach a worker fails the start with a message that names it and
says how to fix it."""

from __future__ import annotations

import functools
import pickle
import sys
import types
from typing import Any

import pytest
from scriptrun import modes, run_program

import procdispatch as pd
from procdispatch.backends._shipping import pickle_payload

WRAPPERS = """
import functools, json, types
import procdispatch as pd

LOG = LOG_PATH

def record(tag, batch):
    with open(LOG, "a") as f:
        for x in batch.data:
            f.write(f"{tag} {x}\\n")

def init(tag):
    with open(LOG, "a") as f:
        f.write(f"init {tag}\\n")

class Holder:
    def __init__(self, tag):
        self.tag = tag

def send_with_self(self, batch):
    record(self.tag, batch)

def init_with_self(self):
    init(self.tag)

class Sender:
    def __init__(self, tag):
        self.tag = tag

    def __call__(self, batch):
        record(self.tag, batch)

class Initer:
    def __init__(self, tag):
        self.tag = tag

    def __call__(self):
        init(self.tag)

@functools.lru_cache(maxsize=8)
def cached_send(batch):
    record("lru_send_fn", batch)

@functools.cache
def cached_init():
    init("lru_send_fn")

@functools.lru_cache(maxsize=None)
def tag_of(name):
    return name

def uses_cache(batch):
    record(tag_of("uses_cache"), batch)

def init_uses_cache():
    init(tag_of("uses_cache"))

@functools.lru_cache(maxsize=None, typed=True)
def cached_record(tag, batch):
    record(tag, batch)

@functools.lru_cache(maxsize=None)
def cached_tag_init(tag):
    init(tag)

ml = "method_of_lambda"
mo = "method_on_plain_object"
pm = "partial_of_method"
senders = {
    ml: (
        types.MethodType(lambda self, batch: record(self.tag, batch), Holder(ml)),
        types.MethodType(lambda self: init(self.tag), Holder(ml)),
    ),
    mo: (
        types.MethodType(lambda self, batch: record(mo, batch), object()),
        types.MethodType(lambda self: init(mo), object()),
    ),
    "method_of_main_function": (
        types.MethodType(send_with_self, Holder("method_of_main_function")),
        types.MethodType(init_with_self, Holder("method_of_main_function")),
    ),
    "lru_send_fn": (cached_send, cached_init),
    "lru_of_lambda": (
        functools.lru_cache(maxsize=None)(lambda batch: record("lru_of_lambda", batch)),
        functools.cache(lambda: init("lru_of_lambda")),
    ),
    "uses_cache": (uses_cache, init_uses_cache),
    pm: (
        functools.partial(types.MethodType(lambda self, tag, b: record(tag, b), object()), pm),
        functools.partial(types.MethodType(lambda self, tag: init(tag), Holder(pm)), pm),
    ),
    "partial_of_lru": (
        functools.partial(cached_record, "partial_of_lru"),
        functools.partial(cached_tag_init, "partial_of_lru"),
    ),
    "callable_instance": (Sender("callable_instance"), Initer("callable_instance")),
}

delivered = {}
for tag, (fn, init_fn) in senders.items():
    try:
        with pd.ProcessChannel(fn, workers=1, worker_init=init_fn, on_drop=pd.drop_quiet) as ch:
            ch.put_many([1, 2])
        delivered[tag] = ch.stats().items_delivered
    except Exception as e:  # each case on its own: one failing does not hide the others
        delivered[tag] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(delivered))
"""

TAGS = [
    "method_of_lambda",
    "method_on_plain_object",
    "method_of_main_function",
    "lru_send_fn",
    "lru_of_lambda",
    "uses_cache",
    "partial_of_method",
    "partial_of_lru",
    "callable_instance",
]


@modes
def test_wrapped_callables_from_the_main_module_reach_the_workers(tmp_path: Any, mode: str):
    log = tmp_path / "log"
    ran = run_program(WRAPPERS.replace("LOG_PATH", repr(str(log))), mode, tmp_path)
    assert ran.result == dict.fromkeys(TAGS, 2), ran.describe()
    lines = log.read_text().splitlines()
    for tag in TAGS:
        assert lines.count(f"init {tag}") == 1, (tag, ran.describe())
        assert lines.count(f"{tag} 1") == 1, (tag, ran.describe())
        assert lines.count(f"{tag} 2") == 1, (tag, ran.describe())


# ---- in this process ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _importable_cached(x: int) -> int:
    return x + 1


def _add(a: int, b: int) -> int:
    return a + b


def test_importable_wrappers_still_travel_by_reference_without_cloudpickle():
    for fn in (
        _importable_cached,
        functools.partial(_importable_cached),
        types.MethodType(_add, 1),  # not an attribute of 1: by value, as a whole
    ):
        payload = pickle_payload(fn, None, "forkserver")
        send_fn, _ = pickle.loads(payload)
        assert send_fn(2) == 3
    assert b"cloudpickle" not in pickle_payload(_importable_cached, None, "forkserver")
    assert pickle.loads(pickle_payload(_importable_cached, None, "forkserver"))[0] is (
        _importable_cached
    )


def test_an_lru_cache_sent_by_value_keeps_its_parameters():
    send_fn, _ = pickle.loads(
        pickle_payload(functools.lru_cache(maxsize=3, typed=True)(lambda x: x), None, "spawn")
    )
    assert send_fn.cache_parameters() == {"maxsize": 3, "typed": True}
    assert send_fn(5) == 5


@pytest.fixture
def module_only_here() -> Any:
    """A module that exists in this process only: what its functions are cannot be imported
    by a worker (and it is not registered to travel by value)."""
    mod = types.ModuleType("made_in_this_process_only")
    exec("def send(batch):\n    pass\n\ndef init():\n    pass\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_what_a_worker_cannot_load_is_named_with_the_fix(module_only_here: Any, method: str):
    ch = pd.ProcessChannel(
        module_only_here.send,
        workers=1,
        worker_init=functools.partial(module_only_here.init),
        on_drop=pd.drop_quiet,
        start_method=method,
    )

    def put_until_it_fails() -> None:
        for i in range(10_000):
            ch.put(i, timeout=30)

    try:
        with pytest.raises(pd.WorkerStartFailed) as ei:
            put_until_it_fails()
    finally:
        ch.cancel()
        assert ch.wait_drained(60)
    msg = str(ei.value)
    assert "workers cannot start" in msg
    assert (
        "send_fn (made_in_this_process_only.send) or worker_init (functools.partial of "
        "made_in_this_process_only.init) could not be loaded in worker "
    ) in msg, msg
    assert "ModuleNotFoundError: No module named 'made_in_this_process_only'" in msg, msg
    assert "in a module the workers can import" in msg
    assert "cloudpickle.register_pickle_by_value(module)" in msg
