"""How a failure crosses the pipe: a worker's exception and the batch's change, both ways.

Everything here is guarded against user code. On the worker's side, an exception's ``__str__``,
its cause chain, its pickling and the pickling of the batch's mutation may each raise anything
(a ``SystemExit`` too): the worker still answers, with a :class:`~procdispatch.errors.RemoteError`
made of text saying what could not be sent. On the parent's side, unpickling runs user code too
(``__reduce__``, ``__setstate__``): what it raises becomes that answer's RemoteError, never the
coordinator's exception.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from ._messages import HEADER, K_FAILED, K_INIT_FAILED, PARTS, PROTOCOL, Failed, InitFailed
from ._pickling import _reuse, dumps
from ._transient import _ATTR as CHAIN_ATTR
from ._transient import Chain, attach, chain_names
from .errors import RemoteError, RemoteTraceback

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "UnsendableItems",
    "unsendable",
    "decode_failed",
    "decode_init_failed",
    "describe_error",
    "encode_failed",
    "encode_init_failed",
    "encode_unencodable",
    "format_remote_tb",
    "safe_chain",
    "text_of",
    "type_name_of",
]

_REMOTE_ERROR = "procdispatch.errors.RemoteError"


# ---- parent side ---------------------------------------------------------------------------


def decode_failed(buf: bytes) -> Failed:
    """A Failed frame: header, part sizes, then the error, the data change and the meta
    change, each pickled alone. A part that cannot be unpickled here (a ``__reduce__`` that
    raises in the parent, whatever it raises, a class the parent cannot import) fails the
    batch with a RemoteError that says so, and its change is not applied; it never reaches the
    coordinator as an exception."""
    _, bid, attempt, _ = HEADER.unpack_from(buf)
    err_size, data_size = PARTS.unpack_from(buf, HEADER.size)
    at = HEADER.size + PARTS.size
    blob, type_name, message, tb, chain = pickle.loads(buf[at : at + err_size])
    answer = f"the worker's answer for batch {bid} (attempt {attempt})"
    exc = _exception_from(blob, type_name, message, tb, chain, answer)
    at += err_size
    kept: list[int] | None = None
    new_data: list[Any] | None = None
    meta: object = None
    meta_sent = False
    undecodable: list[tuple[str, BaseException]] = []
    try:
        kept, new_data = _loads_foreign(buf[at : at + data_size])
    except BaseException as e:  # foreign bytes: see _loads_foreign
        undecodable.append(("batch.data", e))
    try:
        meta_sent, meta = _loads_foreign(buf[at + data_size :])
    except BaseException as e:  # foreign bytes: see _loads_foreign
        undecodable.append(("batch.meta", e))
    if undecodable:
        what = " and ".join(name for name, _ in undecodable)
        why = "; ".join(f"{name}: {describe_error(e)}" for name, e in undecodable)
        err = RemoteError(
            type_name,
            f"{message} (the send failed, and its change to {what} could not be unpickled in "
            "the parent: the batch is kept as it was sent)",
            tb,
            reason=f"{answer} could not be unpickled in the parent: {why}",
        )
        attach(err, chain)
        return Failed(bid, attempt, err, None, None, False, None)
    return Failed(bid, attempt, exc, kept, new_data, meta_sent, meta)


def _loads_foreign(data: bytes | memoryview) -> Any:
    """Unpickle what a worker sent that holds user objects. Unpickling runs their code
    (``__reduce__``'s callable, ``__setstate__``) here, in the parent: whatever it raises, of
    whatever class (a ``SystemExit``, a ``KeyboardInterrupt``), is that answer's failure, and
    the caller turns it into a RemoteError."""
    return pickle.loads(data)


def describe_error(e: BaseException) -> str:
    """``Type: message`` of an exception that may come from user code, whose ``__str__`` may
    raise (whatever it raises)."""
    name = type(e).__name__
    try:
        text = str(e)
    except BaseException:  # user code: a __str__ that raises
        text = "<str() of the exception failed>"
    return f"{name}: {text}" if text else name


def _exception_from(
    blob: bytes | None, type_name: str, message: str, tb: str, chain: Chain | None, answer: str
) -> BaseException:
    """The worker's exception rebuilt from ``blob``, its worker traceback as ``__cause__``; a
    RemoteError when it could not be pickled in the worker (``blob`` is None), or not be
    rebuilt here (saying with what error). ``answer`` names the message, for that text."""
    reason: str | None = None  # RemoteError's default: it could not be pickled in the worker
    if blob is not None:
        try:
            loaded = _loads_foreign(blob)
            if not isinstance(loaded, BaseException):
                raise TypeError(f"it holds a {type(loaded).__name__}, not an exception")
            if not isinstance(loaded, RemoteError):  # still user code: it may guard attributes
                loaded.__cause__ = RemoteTraceback(tb)
            if chain is not None:
                attach(loaded, chain)
            return loaded
        except BaseException as e:  # foreign bytes: see _loads_foreign
            reason = f"{answer} could not be unpickled in the parent: {describe_error(e)}"
    err = RemoteError(type_name, message, tb, reason=reason)
    if chain is not None:
        attach(err, chain)
    return err


def decode_init_failed(buf: bytes) -> InitFailed:
    """An InitFailed frame: the worker's start-up error, rebuilt as :func:`_exception_from` does."""
    blob, type_name, message, tb = pickle.loads(buf[1:])
    return InitFailed(
        _exception_from(blob, type_name, message, tb, None, "the worker's start-up error")
    )


# ---- worker side ---------------------------------------------------------------------------


def text_of(obj: object, how: Callable[[object], str] = str) -> str:
    """``str(obj)`` (or ``how(obj)``), or a placeholder saying why it could not be had: an
    exception's ``__str__`` is user code, and the worker must answer whatever it does."""
    try:
        text = how(obj)
        if type(text) is str:
            return text
        problem = f"returned a {type(text).__name__}"
    except BaseException as e:
        problem = f"raised {type(e).__name__}"
    return f"<{getattr(how, '__name__', 'str')}() of the {type(obj).__name__} {problem}>"


def type_name_of(exc: BaseException) -> str:
    return _class_name(type(exc))


def _class_name(cls: type) -> str:
    return f"{text_of(cls, _module_of)}.{text_of(cls, _qualname_of)}"


def _module_of(cls: object) -> str:
    return str(getattr(cls, "__module__", "?"))


def _qualname_of(cls: object) -> str:
    return str(getattr(cls, "__qualname__", "?"))


def safe_chain(exc: BaseException) -> tuple[Chain, str | None]:
    """The exception's chain as :func:`chain_names` reads it; when reading it raises (a
    ``reason``, ``__cause__`` or ``__context__`` that is a property of user code), the
    exception's own classes only, and what went wrong."""
    try:
        kept: Chain | None = vars(exc).get(CHAIN_ATTR)  # read once already, in the worker
        return (kept if kept is not None else chain_names(exc)), None
    except BaseException as e:
        own = tuple(_class_name(c) for c in type(exc).__mro__)
        return (own,), f"its cause chain could not be read ({type(e).__name__})"


def format_remote_tb(exc: BaseException, type_name: str, message: str) -> str:
    """The worker's traceback of ``exc`` as text; only its frames when the full report (the
    chain, the notes) cannot be formatted."""
    import traceback  # only when a send fails: a worker starts faster without it

    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        pass
    try:
        frames = "".join(traceback.format_tb(exc.__traceback__))
    except BaseException:
        frames = ""
    return f"Traceback (most recent call last):\n{frames}{type_name}: {message}\n"


def _dumps_guarded(obj: object) -> bytes:
    """:func:`dumps`, for what user code may make fail in any way (a ``__reduce__`` that
    raises SystemExit, returns garbage, or pickles to something too large): the error is
    raised as an Exception, and the thread's pickler is not reused after a BaseException."""
    try:
        return dumps(obj)
    except Exception:
        raise
    except BaseException as e:
        if hasattr(_reuse, "pickler"):
            del _reuse.pickler
        raise _EncodeError(f"{type(e).__name__}: {text_of(e)}") from None


class _EncodeError(Exception):
    """Pickling raised a BaseException that is not an Exception (SystemExit, say)."""


def _why(e: BaseException) -> str:
    """``Type: text`` of an encoding error (an _EncodeError's text already names its type)."""
    text = text_of(e)
    return text if isinstance(e, _EncodeError) else f"{type(e).__name__}: {text}"


def _describe(exc: BaseException) -> tuple[bytes | None, str, str, str, Chain]:
    """What crosses the pipe about an exception: itself pickled (None when it will not
    pickle), its type's name, its message, its traceback and its chain, as text. Every step
    is guarded, so that whatever the exception does, the worker can still answer; the
    message says what could not be read or pickled."""
    type_name = type_name_of(exc)
    message = text_of(exc)
    notes: list[str] = []
    chain, chain_problem = safe_chain(exc)
    if chain_problem is not None:
        notes.append(chain_problem)
    tb = format_remote_tb(exc, type_name, message)
    try:
        blob: bytes | None = _dumps_guarded(exc)
    except BaseException as e:
        blob = None
        notes.append(f"it could not be pickled back to the parent ({_why(e)})")
    if notes:
        message = f"{message} [{'; '.join(notes)}]"
    return blob, type_name, message, tb, chain


def encode_init_failed(exc: BaseException) -> bytes:
    return bytes([K_INIT_FAILED]) + pickle.dumps(_describe(exc)[:4], PROTOCOL)


def encode_failed(
    batch_id: int,
    attempt: int,
    exc: BaseException,
    kept: list[int] | None,
    new_data: list[Any] | None,
    meta_sent: bool,
    meta: object,
) -> bytes:
    """Frame a failure. A mutation that will not pickle (whatever its pickling does) fails the
    batch with a RemoteError instead, naming what could not be sent, and the batch is kept as
    it was sent."""
    head = HEADER.pack(K_FAILED, batch_id, attempt, 0)
    blob, type_name, message, tb, chain = _describe(exc)
    failures: dict[str, str] = {}
    try:
        data_part = _dumps_guarded((kept, new_data))
    except BaseException as e:
        failures["batch.data"] = _why(e)
    try:
        meta_part = _dumps_guarded((meta_sent, meta))
    except BaseException as e:
        failures["batch.meta"] = _why(e)
    if failures:
        what = " and ".join(failures)
        reasons = list(failures.values())
        if len(failures) > 1:
            reasons = [f"{k}: {v}" for k, v in failures.items()]
        why = "; ".join(reasons)
        err = RemoteError(
            type_name,
            f"the send of batch {batch_id} (attempt {attempt}) failed ({type_name}: {message}) "
            f"and its change to {what} could not be pickled back to the parent ({why}); the "
            "batch is kept as it was sent",
            tb,
        )
        blob, type_name, message = pickle.dumps(err, PROTOCOL), _REMOTE_ERROR, err.message
        data_part = _NO_DATA_CHANGE
        meta_part = _NO_META_CHANGE
    err_part = pickle.dumps((blob, type_name, message, tb, chain), PROTOCOL)
    sizes = PARTS.pack(len(err_part), len(data_part))
    return b"".join((head, sizes, err_part, data_part, meta_part))


_NO_DATA_CHANGE = pickle.dumps((None, None), PROTOCOL)
_NO_META_CHANGE = pickle.dumps((False, None), PROTOCOL)


def encode_unencodable(
    batch_id: int, attempt: int, exc: BaseException, why: BaseException
) -> bytes:
    """The last resort of :func:`~procdispatch._protocol.encode_result`: a RemoteError made
    of plain text only."""
    type_name = type_name_of(exc)
    message = (
        f"the failure of batch {batch_id} (attempt {attempt}) could not be encoded "
        f"({_why(why)}); the batch is kept as it was sent"
    )
    err_part = pickle.dumps((None, type_name, message, "", ()), PROTOCOL)
    head = HEADER.pack(K_FAILED, batch_id, attempt, 0)
    sizes = PARTS.pack(len(err_part), len(_NO_DATA_CHANGE))
    return b"".join((head, sizes, err_part, _NO_DATA_CHANGE, _NO_META_CHANGE))


# ---- a lease that cannot be sent ---------------------------------------------------------


class UnsendableItems(Exception):
    """A lease that cannot be encoded as it is (nothing was sent): ``items`` lists (index,
    error) for each item that will not pickle; ``meta_error`` is set when the meta will not."""

    def __init__(
        self, items: list[tuple[int, BaseException]], meta_error: BaseException | None
    ) -> None:
        self.items = items
        self.meta_error = meta_error
        super().__init__(items, meta_error)


def unsendable(data: list[Any], meta: object, whole: BaseException) -> UnsendableItems:
    """What of a lease will not pickle, ``whole`` being what pickling all of it raised. When
    each part pickles alone, the whole is what fails (its size, say, or a ``__reduce__`` that
    fails only sometimes): it is reported as the meta's error, so that the lease fails instead
    of being tried again and again."""
    items: list[tuple[int, BaseException]] = []
    for i, item in enumerate(data):
        try:
            dumps(item)
        except BaseException as exc:  # user code, as in _protocol.encode_lease
            items.append((i, exc))
    meta_error: BaseException | None = None
    try:
        dumps(meta)
    except BaseException as exc:  # user code, as in _protocol.encode_lease
        meta_error = exc
    if not items and meta_error is None:
        meta_error = whole
    return UnsendableItems(items, meta_error)
