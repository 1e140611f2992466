"""Constructor validation, the public surface, and the default callbacks."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from conftest import worker_processes
from workerfns import noop

import procdispatch as pd

DOCUMENTED = {
    "Batch",
    "BlockNewItems",
    "BufferFull",
    "ChannelClosed",
    "DeliveryTimeout",
    "DropOldestBatch",
    "FullBehavior",
    "InfiniteGrowth",
    "InternalError",
    "ItemTooLarge",
    "ItemTooSmall",
    "ItemsDropped",
    "OptionsError",
    "ProcDispatchError",
    "ProcessChannel",
    "RateLimiter",
    "RemoteError",
    "SendTimeout",
    "Stats",
    "TransientError",
    "WorkerCrashed",
    "WorkerStartFailed",
    "default_on_drop",
    "default_on_error",
    "drop_quiet",
    "drop_summarized",
    "drain_on_sigterm",
    "retry",
    "retry_on",
}


def test_all_is_exactly_the_documented_api():
    assert set(pd.__all__) == DOCUMENTED
    for name in pd.__all__:
        assert getattr(pd, name) is not None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"workers": 0}, "workers must be an int >= 1 (got 0)"),
        ({"workers": 1.5}, "workers must be an int >= 1 (got 1.5)"),
        ({"max_leases": 0}, "max_leases must be an int >= 1 or None (got 0)"),
        ({"batch_items_max": 0}, "batch_items_max must be >= 1 or None (got 0)"),
        ({"batch_size_max": -1}, "batch_size_max must be >= 1 or None (got -1)"),
        ({"batch_age_max": 0}, "batch_age_max must be a number of seconds > 0 (got 0)"),
        ({"batch_size_max": 10}, "batch_size_max needs item_size to measure items"),
        ({"start_timeout": 0}, "start_timeout must be a number > 0 (got 0)"),
        ({"delivery_timeout": -1}, "delivery_timeout must be a number > 0 or None (got -1)"),
        ({"raise_on_drop": 1}, "raise_on_drop must be a bool (got 1)"),
        ({"fifo": True, "workers": 2}, "fifo=True needs max_leases == 1 (got 2)"),
        ({"qps_limit": 0}, "qps_limit must be a finite number of events per second > 0"),
        ({"qps_limit": float("inf")}, "qps_limit must be a finite number"),
        (
            {"qps_limit": "fast"},
            "qps_limit must be a number of events per second > 0, a pyrate-limiter Rate or a "
            "sequence of Rates (got 'fast')",
        ),
        ({"qps_limit": 5, "qps_burst": 0}, "qps_burst must be an int >= 1 (got 0)"),
        ({"qps_burst": 0}, "qps_burst must be an int >= 1 (got 0)"),
        ({"min_qps": 0}, "min_qps must be a number > 0 or None (got 0)"),
        ({"min_qps": 10, "qps_limit": 5}, "min_qps must be <= qps_limit (5 per second) (got 10)"),
        ({"send_timeout": 0}, "send_timeout must be a number > 0 or None (got 0)"),
        ({"cancel_grace": -1}, "cancel_grace must be a number >= 0 (got -1)"),
        ({"max_batches_per_worker": 0}, "max_batches_per_worker must be an int >= 1 or None"),
        ({"max_worker_memory": 0}, "max_worker_memory must be an int >= 1 or None (got 0)"),
        ({"start_method": "teleport"}, "start_method must be one of"),
        (
            {"backend": "gpu"},
            "backend must be one of process, thread, dask or a Backend object (got 'gpu')",
        ),
        ({"on_error": 3}, "on_error must be callable or None (got 3)"),
        (
            {"full_behavior": pd.BlockNewItems(max_items=5)},
            "BlockNewItems.max_items must be >= batch_items_max (20) or None (got 5)",
        ),
        (
            {"full_behavior": pd.DropOldestBatch(max_live_size=10)},
            "DropOldestBatch.max_live_size may only be set when batch_size_max is set (got 10)",
        ),
        ({"full_behavior": "block"}, "full_behavior must be BlockNewItems, DropOldestBatch"),
    ],
)
def test_invalid_options_raise_options_error(kw: dict[str, Any], message: str):
    with pytest.raises(pd.OptionsError) as ei:
        pd.ProcessChannel(noop, **kw)
    assert message in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_unpicklable_send_fn_raises_and_leaves_no_process():
    before = {p.pid for p in worker_processes()}
    lock = threading.Lock()

    def send(batch: pd.Batch[Any]) -> None:
        lock.acquire()

    with pytest.raises(pd.OptionsError, match="send_fn must be picklable with cloudpickle"):
        pd.ProcessChannel(send)
    with pytest.raises(pd.OptionsError, match="worker_init must be picklable"):
        pd.ProcessChannel(noop, worker_init=lambda: lock)
    with pytest.raises(pd.OptionsError, match="send_fn must be callable"):
        pd.ProcessChannel(42)  # type: ignore[arg-type]
    assert {p.pid for p in worker_processes()} == before
    assert not [t for t in threading.enumerate() if t.name == "procdispatch-coordinator"]


def test_the_thread_backend_needs_no_pickling(make_channel):
    lock = threading.Lock()
    got: list[int] = []

    def send(batch: pd.Batch[int]) -> None:
        with lock:
            got.extend(batch.data)

    ch = make_channel(send, backend="thread", workers=2)
    ch.put_many(range(100))
    assert ch.close_and_drain(30)
    assert sorted(got) == list(range(100))


def test_bad_item_sizes_fail_in_the_caller(make_channel):
    ch = make_channel(noop, batch_size_max=10, item_size=lambda x: x, batch_items_max=None)
    with pytest.raises(pd.ItemTooLarge, match=r"item size must be <= batch_size_max \(10\)"):
        ch.put(11)
    with pytest.raises(pd.ItemTooSmall):
        ch.put(0)
    with pytest.raises(pd.ItemTooSmall):
        ch.put(-1)
    with pytest.raises(TypeError, match="item_size must return an int"):
        ch.put("x")
    with pytest.raises(pd.ItemTooLarge) as ei:
        ch.put_many([1, 2, 30, 4])
    assert ei.value.added == 2  # type: ignore[attr-defined]
    ch.put(10)
    assert ch.close_and_drain(30)
    s = ch.stats()
    assert (s.items_put, s.items_delivered) == (3, 3)  # refused items never count


def test_default_on_error_classifies_and_logs(caplog):
    caplog.set_level(logging.INFO, logger="procdispatch")
    b: pd.Batch[int] = pd.Batch([1, 2], id=7, attempt=1)
    assert pd.default_on_error(b, pd.TransientError("x"))
    assert pd.default_on_error(b, ConnectionResetError("x"))
    assert pd.default_on_error(b, pd.SendTimeout(1.0))
    assert pd.default_on_error(b, pd.WorkerCrashed(1, -9))
    assert not pd.default_on_error(b, ValueError("x"))
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.INFO] * 4 + [logging.ERROR]
    assert "failed to send batch 7 (attempt 1, 2 items" in caplog.records[0].getMessage()
    b._faults = 3
    assert not pd.default_on_error(b, pd.WorkerCrashed(1, -9))
    assert "poison" in caplog.records[-1].getMessage()


def test_default_on_drop_levels(caplog):
    from procdispatch.buffer import Buffer, BufferOptions

    caplog.set_level(logging.INFO, logger="procdispatch")
    b: pd.Batch[int] = pd.Batch([1, 2, 3], id=4)
    pd.default_on_drop(b, False)  # a failure given up on, a cancel...: WARNING
    pd.default_on_drop(None, True)  # the flush call is ignored
    buf: Buffer[int] = Buffer(
        BufferOptions(batch_items_max=1, full_behavior=pd.DropOldestBatch(max_live_items=1))
    )
    buf.add(0.0, 1)
    evicted = buf.add(0.0, 2)  # made room for the new item: DropOldestBatch's job, INFO
    assert evicted is not None
    pd.default_on_drop(evicted, False)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
    assert caplog.records[0].getMessage() == "dropping batch 4 (3 items, meta None)"


def test_drop_summarized_counts_items_and_logs_at_most_every_period(caplog):
    caplog.set_level(logging.INFO, logger="procdispatch")
    now = [100.0]
    on_drop = pd.drop_summarized(10.0, clock=lambda: now[0])
    on_drop(pd.Batch([1, 2]), False)
    now[0] = 105.0
    on_drop(pd.Batch([3]), False)
    assert not caplog.records
    now[0] = 111.0
    on_drop(pd.Batch([4, 5, 6]), False)
    now[0] = 112.0
    on_drop(pd.Batch([7]), False)
    on_drop(None, True)
    assert [r.getMessage() for r in caplog.records] == [
        "dropped 6 items over 11.000s",
        "dropped 1 items over 1.000s",
    ]
    on_drop(None, True)  # nothing pending: no line
    assert len(caplog.records) == 2


def test_where_table_matches_all_and_workers_import_light():
    import subprocess
    import sys

    from procdispatch import _WHERE  # type: ignore[attr-defined]

    # DaskBackend is an attribute, not in __all__: a star import must not need the dask extra.
    assert set(_WHERE) == set(pd.__all__) | {"DaskBackend"}
    assert "DaskBackend" not in pd.__all__
    code = (
        "import sys, procdispatch.backends._worker; "
        "print(sorted(m for m in sys.modules if m.startswith('procdispatch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)
    assert "procdispatch._channel" not in loaded
    assert "procdispatch._coordinator" not in loaded
    assert "procdispatch._limiter.limiter" not in loaded


def test_the_constructor_signature_is_the_options_declaration():
    import dataclasses
    import inspect

    from procdispatch._options import Options

    params = list(inspect.signature(pd.ProcessChannel.__init__).parameters.values())
    assert [p.name for p in params[:2]] == ["self", "send_fn"]
    declared = [(f.name, f.default) for f in dataclasses.fields(Options)]
    assert [(p.name, p.default) for p in params[2:]] == declared
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])


def test_the_readme_options_table_is_the_generated_one():
    from pathlib import Path

    from procdispatch._options import options_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert options_table() in readme
