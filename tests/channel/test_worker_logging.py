"""Worker logging reaches the parent: records that send_fn and worker_init log in a worker are
handled by the parent's loggers, under their own names, with the worker number and the batch id
(None during worker_init) as ``procdispatch_worker`` / ``procdispatch_batch``. Process workers
send what their parent's root level let through when the channel was made, with the message
merged with its args and the exception as text, at most 1000 records per batch."""

from __future__ import annotations

import logging
from typing import Any

import logfns
import pytest
from workerfns import noop

import procdispatch as pd

SHIPPED = pytest.mark.needs("pickling", why="records are sent from worker processes")
LOGS = pytest.mark.needs(
    "worker-logs", why="records logged in a worker reach the parent (a Dask worker keeps its own)"
)


def _from(caplog: Any, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def _drain(make_channel: Any, send_fn: Any, n: int = 1, **kw: Any) -> pd.Stats:
    kw.setdefault("batch_items_max", 1)
    ch = make_channel(send_fn, workers=1, **kw)
    ch.put_many(range(n))
    assert ch.close_and_drain(60)
    return ch.stats()


@LOGS
def test_a_warning_logged_in_send_fn_reaches_the_parent_with_worker_and_batch(
    make_channel: Any, caplog: Any
) -> None:
    _drain(make_channel, logfns.warn_x)
    (rec,) = [r for r in _from(caplog, "root") if r.getMessage() == "x"]
    assert rec.levelno == logging.WARNING
    assert rec.procdispatch_worker == 1  # type: ignore[attr-defined]
    assert rec.procdispatch_batch == 1  # type: ignore[attr-defined]


@LOGS
def test_worker_init_records_carry_no_batch(make_channel: Any, caplog: Any) -> None:
    _drain(make_channel, noop, worker_init=logfns.init_logs)
    (rec,) = _from(caplog, "tests.logfns")
    assert rec.getMessage() == "init of the worker"
    assert rec.procdispatch_worker == 1  # type: ignore[attr-defined]
    assert rec.procdispatch_batch is None  # type: ignore[attr-defined]


@LOGS
def test_a_logged_exception_arrives_with_its_traceback(make_channel: Any, caplog: Any) -> None:
    _drain(make_channel, logfns.logs_exception)
    (rec,) = _from(caplog, "tests.logfns")
    assert rec.getMessage() == "batch 1 failed inside"
    assert rec.levelno == logging.ERROR
    text = caplog.text
    assert "ZeroDivisionError: division in the worker" in text
    assert "logfns.py" in text
    assert "in logs_exception" in text


@LOGS
def test_unpicklable_args_are_merged_into_the_message(make_channel: Any, caplog: Any) -> None:
    _drain(make_channel, logfns.unpicklable_arg)
    (rec,) = _from(caplog, "tests.logfns")
    assert rec.getMessage() == "holding the lock holder"


@LOGS
@SHIPPED
def test_a_record_that_cannot_be_pickled_is_replaced_by_a_warning_saying_so(
    make_channel: Any, caplog: Any
) -> None:
    _drain(make_channel, logfns.unpicklable_extra)
    (rec,) = _from(caplog, "tests.logfns")
    assert rec.levelno == logging.WARNING
    msg = rec.getMessage()
    assert msg.startswith("a WARNING log record of a worker could not be pickled (TypeError: ")
    assert msg.endswith(": with an extra"), msg
    assert (rec.procdispatch_worker, rec.procdispatch_batch) == (1, 1)  # type: ignore[attr-defined]


@LOGS
@SHIPPED
def test_workers_send_only_what_the_parent_logged_at_when_the_channel_was_made(
    make_channel: Any, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING)
    ch = make_channel(logfns.every_level, workers=1, batch_items_max=1)
    caplog.set_level(logging.DEBUG)  # too late for this channel: its workers send WARNING up
    ch.put(0)
    assert ch.close_and_drain(60)
    assert [r.getMessage() for r in _from(caplog, "tests.logfns")] == ["warning 1"]

    caplog.clear()
    caplog.set_level(logging.INFO)
    _drain(make_channel, logfns.every_level)
    assert [r.getMessage() for r in _from(caplog, "tests.logfns")] == ["info 1", "warning 1"]


def test_the_parents_logger_levels_still_decide(make_channel: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.ERROR, logger="tests.logfns")
    _drain(make_channel, logfns.every_level)
    assert _from(caplog, "tests.logfns") == []


@LOGS
def test_a_flood_of_records_is_cut_at_1000_per_batch_with_a_summary(
    make_channel: Any, caplog: Any, backend: str
) -> None:
    from conftest import CAPABILITIES

    _drain(make_channel, logfns.flood, n=2)
    got = [r.getMessage() for r in _from(caplog, "tests.logfns")]
    first = [m for m in got if m.endswith("of batch 1")]
    second = [m for m in got if m.endswith("of batch 2")]
    assert second == [f"flood {i} of batch 2" for i in range(3)]  # a fresh allowance
    summaries = [
        r for r in _from(caplog, "procdispatch") if "more records during" in r.getMessage()
    ]
    if "pickling" in CAPABILITIES[backend]:
        assert first == [f"flood {i} of batch 1" for i in range(1000)]
        (summary,) = summaries
        assert summary.levelno == logging.WARNING
        assert summary.getMessage() == (
            "worker 1 logged 1500 more records during batch 1 than the 1000 sent per batch; "
            "they were not sent to the parent"
        )
        assert summary.procdispatch_batch == 1  # type: ignore[attr-defined]
    else:  # in-process records are not sent anywhere: nothing to bound
        assert len(first) == 2500
        assert summaries == []


@LOGS
@SHIPPED
def test_a_parent_handler_that_raises_costs_only_its_record(make_channel: Any, caplog: Any) -> None:
    class Raising(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("this handler is broken")

    broken = logging.getLogger("tests.raising")
    handler = Raising()
    broken.addHandler(handler)
    try:
        s = _drain(make_channel, logfns.to_raising_logger, n=3)
    finally:
        broken.removeHandler(handler)
    assert (s.items_delivered, s.worker_restarts) == (3, 0)
    assert len(_from(caplog, "tests.logfns")) == 3
    errors = [r for r in _from(caplog, "procdispatch") if "could not be handled" in r.message]
    assert len(errors) == 3
    assert "this handler is broken" in caplog.text


@LOGS
def test_a_batch_s_records_are_handled_before_its_outcome(make_channel: Any, caplog: Any) -> None:
    seen: list[list[str]] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        seen.append([r.getMessage() for r in _from(caplog, "tests.logfns")])
        return False

    _drain(make_channel, logfns.logs_then_fails, n=2, on_error=on_error)
    assert seen == [["about to fail batch 1"], ["about to fail batch 1", "about to fail batch 2"]]
