"""Wire messages between the coordinator (parent) and a worker, their encoding and framing.

Every message is a small slotted class, made once and never changed; its docstring says its
direction. This module owns everything that crosses a pipe, both ways: a backend that moves
bytes (processes) sends what :func:`encode_lease` and the ``encode_*`` functions make and reads
with :class:`FrameSplitter` / :class:`FrameReader`; one that needs no bytes (threads) hands over
the message objects themselves.

*Framing*: each message is one frame, a 4-byte big-endian size (or -1 and an 8-byte size, for
frames of 2 GiB or more) then the body; the body's first byte names its kind. Leases and results
carry a fixed binary header (batch id, attempt) *outside* the pickle, so that a worker that
cannot unpickle a lease's items can still say which batch failed, and the common result (Done)
needs no pickling at all. A batch crosses the pipe as a plain list of items.

Pickling uses the standard pickler (protocol 5) and cloudpickle by value for what names the
sender's main module or what only cloudpickle can serialise (lambdas, local classes). What cannot
be sent at all turns into a message rather than a dead pipe: an exception that will not pickle
travels as text (:class:`~procdispatch.errors.RemoteError`), and so does a mutation that will
not pickle back.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import threading
from types import FunctionType
from typing import TYPE_CHECKING, Any

from ._transient import _ATTR as CHAIN_ATTR
from ._transient import Chain, attach, chain_names
from .errors import RemoteError, RemoteTraceback

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._batch import Batch

__all__ = [
    "STOP",
    "Done",
    "Failed",
    "FrameSplitter",
    "InitFailed",
    "Lease",
    "Log",
    "Ready",
    "UnsendableItems",
    "decode_lease",
    "decode_from_worker",
    "describe_error",
    "dumps",
    "dumps_out_of_band",
    "encode_done",
    "framed_done",
    "encode_failed",
    "encode_init_failed",
    "encode_lease",
    "encode_log",
    "encode_ready",
    "encode_result",
    "FrameReader",
    "frame",
    "lease_parts",
    "write_frame",
]

PROTOCOL = 5
K_LEASE = 0x4C  # "L"  parent -> worker
K_LEASE_OOB = 0x4F  # "O"  parent -> worker: a lease with buffers in the arena (backends._arena)
K_ARENA = 0x41  # "A"  parent -> worker: the arena's name and size
K_STOP = 0x53  # "S"   parent -> worker
K_READY = 0x52  # "R"  worker -> parent
K_INIT_FAILED = 0x49  # "I"
K_DONE = 0x44  # "D"
K_FAILED = 0x46  # "F"
K_LOG = 0x47  # "G"    worker -> parent: a log record

HEADER = struct.Struct("<BQIB")  # kind, batch id, attempt, synthetic flag
DONE = struct.Struct("<BQIBd")  # a Done frame: the header, then the send's seconds
_DONE_FRAME = 4 + DONE.size  # a Done frame with its size
PARTS = struct.Struct("<II")  # a Failed frame: sizes of its error part and of its data part
SIZE = struct.Struct("!i")  # a frame's size, or -1 then BIG
BIG = struct.Struct("!Q")
_SMALL_LIMIT = 0x7FFFFFFF
#: The most a worker reads from its lease pipe at once (a pipe holds 64 KiB by default).
READ_SIZE = 1 << 16
#: Frames up to this size are made as one bytes object (a copy, written with one write);
#: larger ones as parts, written together with one writev and never copied.
COPY_MAX = 16384
_DONE_HEAD = SIZE.pack(DONE.size)
STOP_FRAME = bytes([K_STOP])
#: The stop request, framed.
STOP = SIZE.pack(1) + STOP_FRAME
_REMOTE_ERROR = "procdispatch.errors.RemoteError"


_MAIN_NAMES = ("__main__", "__mp_main__")


class _MustGoByValue(Exception):
    """Raised inside the pickler at the first object that only the sender's main module has."""


class _ByReference(pickle.Pickler):
    """The standard pickler, refusing what names the sender's main module.

    Workers never run the user's main module (see ``_procstart``), and a worker's ``__main__``
    is not the user's, so a class, function or instance of one defined there must travel by
    value. ``reducer_override`` is never called for the atoms and builtin containers that make
    up most data, so it costs nothing there; it is called once per other object.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, FunctionType)):
            module = getattr(obj, "__module__", None)
        else:
            module = type(obj).__module__
        if module in _MAIN_NAMES:
            raise _MustGoByValue
        return NotImplemented


_reuse = threading.local()


def dumps(obj: object) -> bytes:
    """Pickle a lease, a result or an error: the standard pickler, or cloudpickle by value for
    what names the main module or what only cloudpickle can pickle (lambdas, local classes).

    One pickler per thread is reused: making one per call costs more than a small lease's
    pickling, and writing to its buffer spares large ``bytes`` items a copy.
    """
    try:
        pickler, buf = _reuse.pickler, _reuse.buf
    except AttributeError:
        buf = io.BytesIO()
        pickler = _ByReference(buf, PROTOCOL)
        _reuse.pickler, _reuse.buf = pickler, buf
    try:
        pickler.dump(obj)
        data: bytes = buf.getvalue()
    except Exception:
        del _reuse.pickler  # a pickler whose dump failed half-way is not reused
        from .backends._shipping import (
            dumps_by_value,  # only when needed: cloudpickle is slow to import
        )

        return dumps_by_value(obj)
    except BaseException:
        # A __reduce__ raising SystemExit, say: not retried by value, but the half-used
        # pickler must not be reused either.
        del _reuse.pickler
        raise
    finally:
        buf.seek(0)
        buf.truncate()
        pickler.clear_memo()
    return data


def dumps_out_of_band(obj: object, buffer_callback: Callable[[pickle.PickleBuffer], Any]) -> bytes:
    """Pickle with protocol 5, handing buffers to ``buffer_callback`` (a false answer keeps
    one out of band); raises what pickling raised (nothing is retried by value)."""
    out = io.BytesIO()
    _ByReference(out, PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return out.getvalue()


class _Message:
    """Base of the messages: plain slotted classes. Five NamedTuple classes took 3-4 ms of
    every worker's start (the forkserver's, when it preloads this module); these take 0.4."""

    __slots__ = ()

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__name__}({fields})"


class Lease(_Message):
    """parent -> worker: send this batch (its items and meta) for attempt ``attempt``."""

    __slots__ = ("attempt", "batch_id", "data", "meta", "synthetic")

    def __init__(
        self, batch_id: int, attempt: int, synthetic: bool, data: list[Any], meta: object
    ) -> None:
        self.batch_id = batch_id
        self.attempt = attempt
        self.synthetic = synthetic
        self.data = data
        self.meta = meta


class Ready(_Message):
    """worker -> parent: ``worker_init`` ran; the worker takes leases from now on."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid


class InitFailed(_Message):
    """worker -> parent: the worker could not start (``worker_init`` raised, or bad payload)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Done(_Message):
    """worker -> parent: ``send_fn`` returned for this lease; the worker spent ``seconds`` on
    it (infinite when not measured): how many batches the coordinator queues for a worker
    follows that time (see :data:`~procdispatch._options.QUICK_SEND`)."""

    __slots__ = ("attempt", "batch_id", "seconds")

    def __init__(self, batch_id: int, attempt: int, seconds: float = math.inf) -> None:
        self.batch_id = batch_id
        self.attempt = attempt
        self.seconds = seconds


class Failed(_Message):
    """worker -> parent: ``send_fn`` raised (or the lease could not be unpickled).

    The batch's mutation comes back with it, to be applied before ``on_error`` and any retry:
    ``kept`` lists the indices of the original items still in ``data`` when ``send_fn`` only
    removed items; ``new_data`` is the whole new list when it did anything else; both None
    when ``data`` is unchanged. ``meta`` is
    the worker's ``batch.meta`` when ``meta_sent``.
    """

    __slots__ = ("attempt", "batch_id", "error", "kept", "meta", "meta_sent", "new_data")

    def __init__(
        self,
        batch_id: int,
        attempt: int,
        error: BaseException,
        kept: list[int] | None,
        new_data: list[Any] | None,
        meta_sent: bool,
        meta: object,
    ) -> None:
        self.batch_id = batch_id
        self.attempt = attempt
        self.error = error
        self.kept = kept
        self.new_data = new_data
        self.meta_sent = meta_sent
        self.meta = meta


class Log(_Message):
    """worker -> parent: a record a worker logged, as the attributes of a ``LogRecord``
    (see :mod:`procdispatch._worker_logging`)."""

    __slots__ = ("attrs",)

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs


WorkerMessage = Ready | InitFailed | Done | Failed | Log


# ---- framing, both ways -------------------------------------------------------------------


def frame(body: bytes) -> tuple[bytes, ...]:
    """A frame of ``body``, as the parts to write (one, or a header and ``body`` uncopied)."""
    n = len(body)
    if n <= COPY_MAX:
        return (SIZE.pack(n) + body,)
    head = SIZE.pack(n) if n <= _SMALL_LIMIT else SIZE.pack(-1) + BIG.pack(n)
    return (head, body)


class FrameSplitter:
    """Cuts the bytes read from a pipe into frame bodies (what is left waits for the rest)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def split(self, chunk: bytes) -> list[bytes]:
        buf = self._buf
        buf += chunk
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = SIZE.unpack_from(buf, pos)
            head = 4
            if size == -1:
                if n - pos < 12:
                    break
                (size,) = BIG.unpack_from(buf, pos + 4)
                head = 12
            if n - pos - head < size:
                break
            start = pos + head
            out.append(bytes(buf[start : start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        return out

    def messages(self, chunk: bytes) -> list[WorkerMessage]:
        """The messages from a worker in what was read (see :func:`decode_from_worker`): the
        answers of quick sends come many to a read, so a Done is decoded where it lies."""
        buf = self._buf
        data: bytes | bytearray = chunk
        if buf:
            buf += chunk
            data = buf
        out: list[WorkerMessage] = []
        pos = 0
        n = len(data)
        while n - pos >= 4:
            (size,) = SIZE.unpack_from(data, pos)
            if size == DONE.size and n - pos >= _DONE_FRAME and data[pos + 4] == K_DONE:
                _, bid, attempt, _, seconds = DONE.unpack_from(data, pos + 4)
                out.append(Done(bid, attempt, seconds))
                pos += _DONE_FRAME
                continue
            head = 4
            if size == -1:
                if n - pos < 12:
                    break
                (size,) = BIG.unpack_from(data, pos + 4)
                head = 12
            if n - pos - head < size:
                break
            start = pos + head
            out.append(decode_from_worker(bytes(data[start : start + size])))
            pos = start + size
        if data is buf:
            del buf[:pos]
        elif pos < n:
            buf += data[pos:]
        return out


class FrameReader:
    """Frame bodies from a blocking descriptor (a worker's lease pipe), one per :meth:`read`;
    None at end of file. Each read takes whatever the pipe holds, up to ``READ_SIZE``: leases
    written one after another arrive with one system call instead of two each. A frame larger
    than that is read the rest of the way straight into its own buffer (no copy of a large
    lease)."""

    __slots__ = ("_fd", "_frames", "_split")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._split = FrameSplitter()
        self._frames: collections.deque[bytes | bytearray] = collections.deque()

    def read(self) -> bytes | bytearray | None:
        frames = self._frames
        while not frames:
            big = self._large_head()
            if big is not None:
                return big
            chunk = os.read(self._fd, READ_SIZE)
            if not chunk:
                return None
            frames.extend(self._split.split(chunk))
        return frames.popleft()

    def _large_head(self) -> bytearray | None:
        """The body of the frame begun in the buffer, read whole, when it is too large for
        one read; else None."""
        buf = self._split._buf
        n = len(buf)
        if n < 4:
            return None
        (size,) = SIZE.unpack_from(buf)
        head = 4
        if size == -1:
            if n < 12:
                return None
            (size,) = BIG.unpack_from(buf, 4)
            head = 12
        if head + size <= READ_SIZE:
            return None
        body = bytearray(size)
        have = n - head
        body[:have] = buf[head:]
        del buf[:]
        view = memoryview(body)
        while have < size:
            k = os.readv(self._fd, [view[have:]])
            if k == 0:
                return None  # the end of the pipe in the middle of a frame
            have += k
        return body


def write_frame(fd: int, body: bytes) -> None:
    """Write one frame to a blocking descriptor."""
    framed = frame(body)
    if len(framed) == 1:  # small (an answer, a log record): usually one write takes it all
        k = os.write(fd, framed[0])
        if k == len(framed[0]):
            return
        framed = (framed[0][k:],)
    parts = [memoryview(p) for p in framed]
    while parts:
        k = os.writev(fd, parts)
        while parts and k >= len(parts[0]):
            k -= len(parts[0])
            parts.pop(0)
        if k:
            parts[0] = parts[0][k:]


# ---- parent side ---------------------------------------------------------------------------


class UnsendableItems(Exception):
    """A lease that cannot be encoded as it is (nothing was sent): ``items`` lists (index,
    error) for each item that will not pickle; ``meta_error`` is set when the meta will not."""

    def __init__(
        self, items: list[tuple[int, BaseException]], meta_error: BaseException | None
    ) -> None:
        self.items = items
        self.meta_error = meta_error
        super().__init__(items, meta_error)


def encode_lease(batch: Batch[Any]) -> tuple[bytes, ...]:
    """A lease of ``batch`` (id, attempt, synthetic flag, data, meta), framed; raises
    UnsendableItems naming what will not pickle.

    Pickling runs the items' own code (``__reduce__``, ``__getstate__``): whatever it raises,
    of whatever class (a ``SystemExit`` too), is that item's failure, never the caller's."""
    head, payload = lease_parts(batch)
    n = len(head) + len(payload)
    if n <= COPY_MAX:
        return (SIZE.pack(n) + head + payload,)
    size = SIZE.pack(n) if n <= _SMALL_LIMIT else SIZE.pack(-1) + BIG.pack(n)
    return (size + head, payload)


def lease_parts(batch: Batch[Any]) -> tuple[bytes, bytes]:
    """A lease's body as (header, pickled items and meta), unframed: what a backend that moves
    whole messages (a Dask task's argument) sends, and :func:`decode_lease` reads once joined.
    Raises UnsendableItems as :func:`encode_lease` does."""
    try:
        payload = dumps((batch.data, batch.meta))
    except BaseException as exc:  # user code: see encode_lease
        raise _unsendable(batch.data, batch.meta, exc) from None
    return HEADER.pack(K_LEASE, batch.id, batch.attempt, batch.synthetic), payload


def _unsendable(data: list[Any], meta: object, whole: BaseException) -> UnsendableItems:
    """What of a lease will not pickle, ``whole`` being what pickling all of it raised. When
    each part pickles alone, the whole is what fails (its size, say, or a ``__reduce__`` that
    fails only sometimes): it is reported as the meta's error, so that the lease fails instead
    of being tried again and again."""
    items: list[tuple[int, BaseException]] = []
    for i, item in enumerate(data):
        try:
            dumps(item)
        except BaseException as exc:  # user code, as in encode_lease
            items.append((i, exc))
    meta_error: BaseException | None = None
    try:
        dumps(meta)
    except BaseException as exc:  # user code, as in encode_lease
        meta_error = exc
    if not items and meta_error is None:
        meta_error = whole
    return UnsendableItems(items, meta_error)


def _decode_failed(buf: bytes) -> Failed:
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


def decode_from_worker(buf: bytes) -> WorkerMessage:
    """Decode one frame from a worker. Raises only on a corrupt frame (a protocol bug)."""
    kind = buf[0]
    if kind == K_DONE:
        _, bid, attempt, _, seconds = DONE.unpack_from(buf)
        return Done(bid, attempt, seconds)
    if kind == K_FAILED:
        return _decode_failed(buf)
    if kind == K_LOG:
        return Log(_decode_log(buf))
    if kind == K_READY:
        return Ready(pickle.loads(buf[1:]))
    if kind == K_INIT_FAILED:
        blob, type_name, message, tb = pickle.loads(buf[1:])
        return InitFailed(
            _exception_from(blob, type_name, message, tb, None, "the worker's start-up error")
        )
    raise ValueError(f"unknown frame kind {kind!r} from worker")


def _decode_log(buf: bytes) -> dict[str, Any]:
    """A log record's attributes; one the parent cannot unpickle (an extra attribute of a
    class it cannot import) becomes a WARNING saying so."""
    from ._worker_logging import unreadable_record

    try:
        attrs = pickle.loads(buf[1:])
        if isinstance(attrs, dict):
            return attrs
        problem = f"arrived as a {type(attrs).__name__}"
    except Exception as e:
        problem = f"could not be unpickled in the parent ({type(e).__name__}: {e})"
    return unreadable_record({"name": "procdispatch"}, problem)


# ---- worker side ---------------------------------------------------------------------------


def decode_lease(body: bytes | bytearray) -> Lease:
    """The lease in a frame body (raises what unpickling its items raised)."""
    _, bid, attempt, synthetic = HEADER.unpack_from(body)
    data, meta = pickle.loads(memoryview(body)[HEADER.size :])
    return Lease(bid, attempt, bool(synthetic), data, meta)


def encode_result(res: Done | Failed) -> bytes:
    """A result, framed for the parent. Never raises: whatever ``send_fn`` raised or left in
    the batch, the parent hears about this batch (see :func:`encode_failed`)."""
    if isinstance(res, Done):
        return encode_done(res.batch_id, res.attempt, res.seconds)
    try:
        return encode_failed(
            res.batch_id, res.attempt, res.error, res.kept, res.new_data, res.meta_sent, res.meta
        )
    except BaseException as e:
        return _encode_unencodable(res.batch_id, res.attempt, res.error, e)


def encode_log(pickled_attrs: bytes) -> bytes:
    """A log record, from the pickled dict of its attributes."""
    return bytes([K_LOG]) + pickled_attrs


def encode_ready(pid: int) -> bytes:
    return bytes([K_READY]) + pickle.dumps(pid, PROTOCOL)


def encode_done(batch_id: int, attempt: int, seconds: float = math.inf) -> bytes:
    return DONE.pack(K_DONE, batch_id, attempt, 0, seconds)


def framed_done(batch_id: int, attempt: int, seconds: float) -> bytes:
    """A Done, framed: what the worker writes after most sends."""
    return _DONE_HEAD + DONE.pack(K_DONE, batch_id, attempt, 0, seconds)


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


def _encode_unencodable(
    batch_id: int, attempt: int, exc: BaseException, why: BaseException
) -> bytes:
    """The last resort of :func:`encode_result`: a RemoteError made of plain text only."""
    type_name = type_name_of(exc)
    message = (
        f"the failure of batch {batch_id} (attempt {attempt}) could not be encoded "
        f"({_why(why)}); the batch is kept as it was sent"
    )
    err_part = pickle.dumps((None, type_name, message, "", ()), PROTOCOL)
    head = HEADER.pack(K_FAILED, batch_id, attempt, 0)
    sizes = PARTS.pack(len(err_part), len(_NO_DATA_CHANGE))
    return b"".join((head, sizes, err_part, _NO_DATA_CHANGE, _NO_META_CHANGE))
