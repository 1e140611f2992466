"""One send: ``send_fn`` called on a lease's batch, and the answer that says how it went.

:func:`run_lease` never raises. A send that returned is a ``Done``; one that raised is a
``Failed`` carrying the batch's change (:func:`diff_data`) and the exception, vetted first: an
exception the parent could not read as it will (a ``__str__`` that raises, a class that
overrides its chain's attributes) is reported as a :class:`~procdispatch.errors.RemoteError`
saying what could not be read. Worker processes (:mod:`._worker`), thread workers and Dask
workers all answer through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import _protocol as proto
from .._batch import Batch
from .._transient import attach
from ..errors import RemoteError

__all__ = ["diff_data", "run_lease", "send_leased"]


def diff_data(orig: list[Any], new: list[Any]) -> tuple[list[int] | None, list[Any] | None]:
    """Describe how ``send_fn`` changed a batch's data.

    (None, None) when unchanged; (kept indices, None) when it only removed items (the common
    case: drop what was delivered); (None, new list) for anything else. Identity, not
    equality, decides what is "the same item".
    """
    n = len(orig)
    if len(new) == n and all(a is b for a, b in zip(orig, new, strict=True)):
        return None, None
    kept: list[int] = []
    j = 0
    for x in new:
        while j < n and orig[j] is not x:
            j += 1
        if j == n:
            return None, list(new)
        kept.append(j)
        j += 1
    return kept, None


def run_lease(
    send_fn: Callable[[Batch[Any]], object], lease: proto.Lease, start: float | None = None
) -> proto.Done | proto.Failed:
    """Call ``send_fn`` on the lease's batch; capture its failure and its mutation.

    ``send_fn`` gets a copy of ``lease.data``, which stays as it was to diff against (for the
    thread backend it is the coordinator's own list, which nothing changes while it is leased).
    Never raises: whatever ``send_fn`` raises or leaves in the batch becomes the batch's answer.
    A Done says how long the lease took since ``start`` (``time.monotonic()`` when the worker
    began on it; by default, now).
    """
    if start is None:
        start = time.monotonic()
    res = send_leased(
        send_fn, lease.data, lease.meta, lease.batch_id, lease.attempt, lease.synthetic, start
    )
    if type(res) is float:
        return proto.Done(lease.batch_id, lease.attempt, res)
    assert isinstance(res, proto.Failed)
    return res


def send_leased(
    send_fn: Callable[[Batch[Any]], object],
    data: list[Any],
    meta: object,
    batch_id: int,
    attempt: int,
    synthetic: bool,
    start: float,
) -> float | proto.Failed:
    """:func:`run_lease` on a lease's parts: the seconds since ``start`` when ``send_fn``
    returned, else the Failed. The worker process's loop calls it once per lease, and its
    answer to a returned send is a frame, not a Done; the Lease is made only for a failure."""
    batch: Batch[Any] = Batch(list(data), meta, batch_id, attempt, synthetic)
    try:
        send_fn(batch)
    except BaseException as exc:
        lease = proto.Lease(batch_id, attempt, synthetic, data, meta)
        try:
            return _failed(lease, batch, exc)
        except BaseException as e:  # a last resort: _failed guards each of its steps
            return proto.Failed(
                batch_id, attempt, _unreadable(lease, exc, e), None, None, False, None
            )
    return time.monotonic() - start


_MISSING: Any = object()


def _failed(lease: proto.Lease, batch: Batch[Any], exc: BaseException) -> proto.Failed:
    bid, attempt = lease.batch_id, lease.attempt
    error = _vetted(lease, exc)
    meta = _read(batch, "meta")
    meta_sent = meta is not _MISSING  # a deleted meta is no change: the batch keeps its own
    if not meta_sent:
        meta = None
    data = _read(batch, "data")
    problem: str | None = None
    kept: list[int] | None = None
    new: list[Any] | None = None
    if data is _MISSING:
        problem = "deleted batch.data"
    else:
        try:
            if type(data) is list or isinstance(data, list):
                kept, new = diff_data(lease.data, data)
            else:
                problem = f"set batch.data to a {type(data).__name__}"
        except BaseException as e:
            problem = f"left in batch.data a list that could not be read ({type(e).__name__})"
    if problem is None:
        return proto.Failed(bid, attempt, error, kept, new, meta_sent, meta)
    # Not a change we can apply: the batch fails as it was sent, and says why.
    bad = TypeError(
        f"send_fn {problem} and then raised {type(exc).__name__}: "
        f"{proto.text_of(exc)}; batch.data must stay a list (remove from it the items that "
        "were delivered)"
    )
    bad.__cause__ = error
    return proto.Failed(bid, attempt, bad, None, None, meta_sent, meta)


def _read(batch: Batch[Any], name: str) -> Any:
    try:
        return getattr(batch, name)
    except BaseException:
        return _MISSING


def _vetted(lease: proto.Lease, exc: BaseException) -> BaseException:
    """The exception to report for ``exc``: ``exc`` itself when the parent can read it as it
    will (its text, repr, args and chain, and its ``__cause__`` set), else a RemoteError
    saying what could not be read, which keeps what can be read of the chain (so the default
    ``on_error`` still finds a ConnectionError whose ``reason`` raises transient)."""
    _, chain_problem = proto.safe_chain(exc)
    if chain_problem is not None:
        return _unreadable(lease, exc, None, chain_problem)
    overridden = _overridden_chain_attrs(type(exc))
    if overridden:
        return _unreadable(lease, exc, None, f"its class overrides {overridden}")
    for what, read in _READS:
        try:
            read(exc)
        except BaseException as e:
            return _unreadable(lease, exc, e, f"its {what} raised {type(e).__name__}")
    return exc


_CHAIN_ATTRS = ("__cause__", "__context__", "__suppress_context__", "__traceback__")


def _overridden_chain_attrs(cls: type) -> str:
    """The chain attributes a class redefines: the parent sets ``__cause__`` (to the worker's
    traceback) on the exception it rebuilds, and reads the others."""
    found = [
        name
        for klass in cls.__mro__
        if klass is not BaseException and klass is not object
        for name in _CHAIN_ATTRS
        if name in vars(klass)
    ]
    return ", ".join(sorted(set(found)))


_READS: tuple[tuple[str, Callable[[BaseException], object]], ...] = (
    ("str()", lambda e: str(e).__len__()),
    ("repr()", lambda e: repr(e).__len__()),
    ("args", lambda e: tuple(e.args)),
)


def _unreadable(
    lease: proto.Lease, exc: BaseException, why: BaseException | None, what: str = ""
) -> RemoteError:
    """A RemoteError standing for an exception that cannot travel or be read as it is."""
    type_name = proto.type_name_of(exc)
    if not what:
        what = f"reading it raised {type(why).__name__}"
    message = (
        f"send_fn raised {type_name} in batch {lease.batch_id} (attempt {lease.attempt}), and "
        f"{what}: {proto.text_of(exc)}"
    )
    err = RemoteError(type_name, message, proto.format_remote_tb(exc, type_name, message))
    attach(err, proto.safe_chain(exc)[0])
    return err
