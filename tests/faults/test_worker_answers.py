"""Whatever send_fn raises or leaves in its batch, the worker answers for that batch and serves
the next lease: an exception whose text, repr, args or chain cannot be read, an exception or a
batch change whose pickling raises SystemExit or KeyboardInterrupt or returns garbage, deleted
batch attributes. The batch fails with an error naming what could not be read or sent; no
worker dies (restarts stay 0), and the retry delivers.

Items 0..5 go out in batches of two; the misbehaviour hits the first attempt of the batch
holding item 0 ([0, 1], batch 1).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from answerfns import LeavesBehind
from workerfns import Log, delivered_items

import procdispatch as pd

#: how -> (type on_error sees, regex searched in str(exc)); "process" differs where pickling
#: is involved (the thread backend hands the live objects over).
SAME = {
    "reason_raises": (
        pd.RemoteError,
        r"ReasonRaises in batch 1 \(attempt 1\), and its cause chain could not be read "
        r"\(RuntimeError\): refused",
    ),
    "cause_raises": (
        pd.RemoteError,
        r"CauseRaises in batch 1 \(attempt 1\), and its cause chain could not be read "
        r"\(RuntimeError\): c",
    ),
    "cause_read_only": (
        pd.RemoteError,
        r"CauseReadOnly in batch 1 \(attempt 1\), and its class overrides __cause__: c",
    ),
    "str_raises": (
        pd.RemoteError,
        r"StrRaises in batch 1 \(attempt 1\), and its str\(\) raised RuntimeError",
    ),
    "str_not_text": (pd.RemoteError, r"StrNotText in batch 1 \(attempt 1\), and its str\(\) "),
    "repr_raises": (pd.RemoteError, r"ReprRaises in batch 1 \(attempt 1\), and its repr\(\) "),
    "args_raises": (
        pd.RemoteError,
        r"ArgsRaises in batch 1 \(attempt 1\), and its args raised KeyboardInterrupt",
    ),
    "del_data": (
        TypeError,
        r"^send_fn deleted batch\.data and then raised ValueError: after del_data; "
        r"batch\.data must stay a list",
    ),
    "del_meta": (ValueError, r"^after del_meta$"),
    "unreadable_list": (
        TypeError,
        r"^send_fn left in batch\.data a list that could not be read \(SystemExit\) and then "
        r"raised ValueError",
    ),
}
_KEPT = r"; the batch is kept as it was sent"
PICKLED = {
    "reduce_exits": (
        pd.RemoteError,
        r"ReduceExits: e \[it could not be pickled back to the parent \(SystemExit: pickling "
        r"this exception exits\)\]",
        "ReduceExits",
    ),
    "reduce_interrupts": (
        pd.RemoteError,
        r"ReduceInterrupts: k \[it could not be pickled back to the parent "
        r"\(KeyboardInterrupt: \)\]",
        "ReduceInterrupts",
    ),
    "reduce_garbage": (
        pd.RemoteError,
        r"ReduceGarbage: g \[it could not be pickled back to the parent",
        "ReduceGarbage",
    ),
    "data_exits": (
        pd.RemoteError,
        r"the send of batch 1 \(attempt 1\) failed \(builtins\.ValueError: after data_exits\) "
        r"and its change to batch\.data could not be pickled back to the parent \(SystemExit: "
        r"pickling this exits\)" + _KEPT,
        ValueError,
    ),
    "data_interrupts": (
        pd.RemoteError,
        r"its change to batch\.data could not be pickled back to the parent "
        r"\(KeyboardInterrupt: \)" + _KEPT,
        ValueError,
    ),
    "data_garbage": (
        pd.RemoteError,
        r"its change to batch\.data could not be pickled back to the parent \(PicklingError: ",
        ValueError,
    ),
    "meta_exits": (
        pd.RemoteError,
        r"its change to batch\.meta could not be pickled back to the parent \(SystemExit: "
        r"pickling this exits\)" + _KEPT,
        ValueError,
    ),
    "meta_interrupts": (
        pd.RemoteError,
        r"its change to batch\.meta could not be pickled back to the parent "
        r"\(KeyboardInterrupt: \)" + _KEPT,
        ValueError,
    ),
    "data_and_meta_exit": (
        pd.RemoteError,
        r"its change to batch\.data and batch\.meta could not be pickled back to the parent "
        r"\(batch\.data: SystemExit: pickling this exits; batch\.meta: SystemExit: pickling "
        r"this exits\)" + _KEPT,
        ValueError,
    ),
}


def _run(make_channel: Any, log: Log, how: str, **kw: Any) -> tuple[list[Any], pd.Stats]:
    errors: list[tuple[BaseException, list[Any], int, int, object]] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        errors.append((e, list(b.data), b.id, b.attempt, b.meta))
        return True

    kw.setdefault("on_error", on_error)
    ch = make_channel(
        LeavesBehind(log, how), workers=1, batch_items_max=2, retry=pd.retry.limited(1), **kw
    )
    ch.put_many(range(6))
    assert ch.close_and_drain(60)
    return errors, ch.stats()


def _type_name(exc: BaseException) -> str:
    return type(exc).__name__


def _check(errors: list[Any], s: pd.Stats, log: Log, want_type: Any, pattern: str) -> Any:
    assert len(errors) == 1, errors
    exc, data, bid, attempt, _ = errors[0]
    if isinstance(want_type, str):
        assert _type_name(exc) == want_type, repr(exc)
    else:
        assert type(exc) is want_type, repr(exc)
    assert re.search(pattern, str(exc)), str(exc)
    assert (bid, attempt) == (1, 1)
    assert [x for x in data if type(x) is int] == [0, 1]
    assert s.worker_restarts == 0  # the worker answered and went on
    assert sorted(delivered_items(log)) == list(range(6))  # the retry delivered
    return exc


@pytest.mark.parametrize("how", sorted(SAME))
def test_the_worker_answers_for_an_unreadable_failure_alike_on_every_backend(
    tmp_path: Any, make_channel: Any, how: str
) -> None:
    log = Log(tmp_path / "log")
    errors, s = _run(make_channel, log, how)
    exc = _check(errors, s, log, *SAME[how])
    if isinstance(exc, pd.RemoteError):
        assert exc.type_name == REMOTE_TYPES[how]
        assert "answerfns.py" in exc.remote_traceback  # the worker's frames are kept


REMOTE_TYPES = {
    "reason_raises": "answerfns.ReasonRaises",
    "cause_raises": "answerfns.CauseRaises",
    "cause_read_only": "answerfns.CauseReadOnly",
    "str_raises": "answerfns.StrRaises",
    "str_not_text": "answerfns.StrNotText",
    "repr_raises": "answerfns.ReprRaises",
    "args_raises": "answerfns.ArgsRaises",
}


@pytest.mark.parametrize("how", sorted(PICKLED))
def test_a_failure_whose_pickling_misbehaves_fails_only_its_batch(
    tmp_path: Any, make_channel: Any, backend: str, how: str
) -> None:
    log = Log(tmp_path / "log")
    errors, s = _run(make_channel, log, how)
    process_type, pattern, thread_type = PICKLED[how]
    if "pickling" in _capabilities(backend):
        exc = _check(errors, s, log, process_type, pattern)
        assert errors[0][4] is None  # the meta as it was sent
        assert isinstance(exc, pd.RemoteError)
    else:  # nothing is pickled: the send's own exception and change arrive as they are
        _check(errors, s, log, thread_type, ".")


def test_a_chain_that_cannot_be_read_still_decides_the_retry(
    tmp_path: Any, make_channel: Any
) -> None:
    """ReasonRaises is a ConnectionError whose ``reason`` raises: it arrives as a RemoteError,
    and what can be read of its chain (its own classes) makes it transient for the default
    on_error."""
    log = Log(tmp_path / "log")
    seen: list[BaseException] = []

    def on_error(b: pd.Batch[Any], e: BaseException) -> bool:
        seen.append(e)
        return pd.default_on_error(b, e)

    _, s = _run(make_channel, log, "reason_raises", on_error=on_error)
    assert [type(e) for e in seen] == [pd.RemoteError]
    assert sorted(delivered_items(log)) == list(range(6))
    assert (s.items_dropped, s.worker_restarts) == (0, 0)


def test_a_send_that_deletes_batch_data_and_returns_delivered_its_batch(
    tmp_path: Any, make_channel: Any
) -> None:
    log = Log(tmp_path / "log")
    errors, s = _run(make_channel, log, "del_data_and_return")
    assert errors == []
    assert sorted(delivered_items(log)) == [2, 3, 4, 5]  # batch 1 returned without recording
    assert (s.items_delivered, s.items_dropped, s.worker_restarts) == (6, 0, 0)


def _capabilities(backend: str) -> frozenset[str]:
    from conftest import CAPABILITIES

    return CAPABILITIES[backend]
