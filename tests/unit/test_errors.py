"""Unit tests for procdispatch.errors: the exception tree, messages and pickling."""

from __future__ import annotations

import pickle
import signal

import cloudpickle
import pytest

import procdispatch
from procdispatch import errors
from procdispatch.errors import (
    BufferFull,
    ChannelClosed,
    InternalError,
    ItemTooLarge,
    ItemTooSmall,
    OptionsError,
    ProcDispatchError,
    RemoteError,
    SendTimeout,
    TransientError,
    WorkerCrashed,
    describe_exitcode,
)

# ---- the tree ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (OptionsError, (ProcDispatchError, ValueError)),
        (ChannelClosed, (ProcDispatchError,)),
        (BufferFull, (ProcDispatchError,)),
        (ItemTooLarge, (ProcDispatchError, ValueError)),
        (ItemTooSmall, (ProcDispatchError, ValueError)),
        (TransientError, (ProcDispatchError,)),
        (WorkerCrashed, (ProcDispatchError,)),
        (SendTimeout, (ProcDispatchError, TimeoutError)),
        (RemoteError, (ProcDispatchError,)),
        (InternalError, (ProcDispatchError,)),
    ],
)
def test_subclass_relations(cls: type[BaseException], bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(cls, base)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize(
    ("cls", "not_base"),
    [
        (ChannelClosed, ValueError),
        (BufferFull, ValueError),
        (TransientError, ValueError),
        (WorkerCrashed, TimeoutError),
        (RemoteError, ValueError),
        (OptionsError, TimeoutError),
        (ProcDispatchError, ValueError),
    ],
)
def test_no_unexpected_builtin_bases(cls: type[BaseException], not_base: type) -> None:
    assert not issubclass(cls, not_base)


def test_procdispatcherror_is_a_plain_exception() -> None:
    assert ProcDispatchError.__bases__ == (Exception,)


def test_send_timeout_is_caught_by_except_timeouterror() -> None:
    with pytest.raises(TimeoutError):
        raise SendTimeout(1.5, pid=10, worker=0, batch_id=3, attempt=1)


def test_options_error_is_caught_by_except_valueerror() -> None:
    with pytest.raises(ValueError, match="x must be"):
        raise OptionsError("x must be >= 1 (got 0)")


@pytest.mark.parametrize(
    "name",
    [
        "ProcDispatchError",
        "OptionsError",
        "ChannelClosed",
        "BufferFull",
        "ItemTooLarge",
        "ItemTooSmall",
        "TransientError",
        "WorkerCrashed",
        "SendTimeout",
        "RemoteError",
    ],
)
def test_reexported_at_top_level(name: str) -> None:
    assert getattr(procdispatch, name) is getattr(errors, name)


# ---- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exitcode", "text"),
    [
        (-9, "killed by SIGKILL"),
        (-15, "killed by SIGTERM"),
        (-11, "killed by SIGSEGV"),
        (1, "exited with code 1"),
        (0, "exited with code 0"),
        (None, "exit status unknown"),
        (-1000, "killed by signal 1000"),
    ],
)
def test_describe_exitcode(exitcode: int | None, text: str) -> None:
    assert describe_exitcode(exitcode) == text


def test_worker_crashed_decodes_sigkill() -> None:
    exc = WorkerCrashed(1234, -signal.SIGKILL)
    assert exc.pid == 1234
    assert exc.exitcode == -9
    text = str(exc)
    assert "SIGKILL" in text
    assert "1234" in text


def test_worker_crashed_message_names_worker_batch_and_attempt() -> None:
    exc = WorkerCrashed(77, -9, worker=2, batch_id=15, attempt=3)
    text = str(exc)
    assert "worker 2" in text
    assert "pid 77" in text
    assert "killed by SIGKILL" in text
    assert "batch 15" in text
    assert "attempt 3" in text


def test_worker_crashed_plain_exit_code() -> None:
    text = str(WorkerCrashed(5, 3))
    assert "exited with code 3" in text
    assert "SIG" not in text


def test_send_timeout_message() -> None:
    exc = SendTimeout(2.5, pid=99, worker=1, batch_id=4, attempt=2)
    text = str(exc)
    assert "2.5" in text
    assert "batch 4" in text
    assert "attempt 2" in text
    assert "pid 99" in text
    assert exc.timeout == 2.5


def test_remote_error_str_has_all_three_parts() -> None:
    exc = RemoteError("mymod.Weird", "it broke", 'Traceback:\n  File "x.py"\nWeird: it broke\n')
    text = str(exc)
    assert "mymod.Weird" in text
    assert "it broke" in text
    assert 'File "x.py"' in text


# ---- pickling ---------------------------------------------------------------------------------


PICKLERS = [
    pytest.param(lambda e: pickle.loads(pickle.dumps(e)), id="pickle"),
    pytest.param(
        lambda e: pickle.loads(pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)), id="pickle-hp"
    ),
    pytest.param(lambda e: pickle.loads(cloudpickle.dumps(e)), id="cloudpickle"),
]


@pytest.mark.parametrize("roundtrip", PICKLERS)
def test_worker_crashed_pickles(roundtrip: object) -> None:
    exc = WorkerCrashed(4321, -9, worker=3, batch_id=8, attempt=2)
    got = roundtrip(exc)  # type: ignore[operator]
    assert type(got) is WorkerCrashed
    assert (got.pid, got.exitcode, got.worker, got.batch_id, got.attempt) == (4321, -9, 3, 8, 2)
    assert str(got) == str(exc)


@pytest.mark.parametrize("roundtrip", PICKLERS)
def test_a_worker_crashed_that_says_why_it_was_killed_pickles_with_it(roundtrip: object) -> None:
    exc = WorkerCrashed(4321, -9, worker=3, batch_id=8, attempt=2, why="it said nonsense")
    got = roundtrip(exc)  # type: ignore[operator]
    assert type(got) is WorkerCrashed
    assert got.why == "it said nonsense"
    assert str(got) == str(exc)
    assert str(got) == (
        "worker 3 (pid 4321) was killed while sending batch 8 (attempt 2): it said nonsense"
    )


@pytest.mark.parametrize("roundtrip", PICKLERS)
def test_worker_crashed_minimal_pickles(roundtrip: object) -> None:
    got = roundtrip(WorkerCrashed(None, None))  # type: ignore[operator]
    assert (got.pid, got.exitcode, got.worker, got.batch_id, got.attempt) == (
        None,
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize("roundtrip", PICKLERS)
def test_send_timeout_pickles(roundtrip: object) -> None:
    exc = SendTimeout(0.75, pid=55, worker=0, batch_id=12, attempt=4)
    got = roundtrip(exc)  # type: ignore[operator]
    assert type(got) is SendTimeout
    assert (got.timeout, got.pid, got.worker, got.batch_id, got.attempt) == (0.75, 55, 0, 12, 4)
    assert str(got) == str(exc)
    assert isinstance(got, TimeoutError)


@pytest.mark.parametrize("roundtrip", PICKLERS)
def test_where_a_remote_worker_ran_is_named_and_pickles(roundtrip: object) -> None:
    crashed = WorkerCrashed(77, None, worker=2, batch_id=5, attempt=1, where="tcp://10.0.0.1:4000")
    assert str(crashed) == (
        "worker 2 (pid 77) on tcp://10.0.0.1:4000 was lost while sending batch 5 (attempt 1)"
    )
    got = roundtrip(crashed)  # type: ignore[operator]
    assert (got.where, str(got)) == ("tcp://10.0.0.1:4000", str(crashed))
    hung = SendTimeout(1.0, pid=7, worker=1, batch_id=3, attempt=2, where="tcp://h:1", killed=False)
    assert str(hung) == (
        "send of batch 3 (attempt 2) ran longer than send_timeout=1.0s; worker 1 (pid 7) was "
        "abandoned: the send may run on (on tcp://h:1)"
    )
    back = roundtrip(hung)  # type: ignore[operator]
    assert (back.where, back.killed, str(back)) == ("tcp://h:1", False, str(hung))


@pytest.mark.parametrize("roundtrip", PICKLERS)
def test_remote_error_pickles(roundtrip: object) -> None:
    exc = RemoteError("a.B", "msg with\nnewline", "tb line 1\ntb line 2\n")
    got = roundtrip(exc)  # type: ignore[operator]
    assert type(got) is RemoteError
    assert (got.type_name, got.message, got.remote_traceback) == (
        "a.B",
        "msg with\nnewline",
        "tb line 1\ntb line 2\n",
    )
    assert str(got) == str(exc)


@pytest.mark.parametrize(
    "exc",
    [
        OptionsError("max_leases must be an int >= 1 (got 0)"),
        ChannelClosed("closed"),
        BufferFull("buffer is full"),
        ItemTooLarge("too large"),
        ItemTooSmall("too small"),
        TransientError("again"),
        InternalError("bug"),
    ],
)
def test_simple_exceptions_pickle(exc: ProcDispatchError) -> None:
    got = pickle.loads(pickle.dumps(exc))
    assert type(got) is type(exc)
    assert str(got) == str(exc)
