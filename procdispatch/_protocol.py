"""The wire between the coordinator (parent) and a worker: framing, leases, and decoding.

This module is where the rest of the package reaches everything that crosses a pipe, both ways:
a backend that moves bytes (processes) sends what :func:`encode_lease` and the ``encode_*``
functions make and reads with :class:`FrameSplitter` / :class:`FrameReader`; one that needs no
bytes (threads) hands over the message objects themselves. The messages and their kinds are
:mod:`~procdispatch._messages`; pickling is :mod:`~procdispatch._pickling`; how a failure is
packed and rebuilt is :mod:`~procdispatch._wire_errors`. Their names are re-exported here.

*Framing*: each message is one frame, a 4-byte big-endian size (or -1 and an 8-byte size, for
frames of 2 GiB or more) then the body; the body's first byte names its kind. Leases and results
carry a fixed binary header (batch id, attempt) *outside* the pickle, so that a worker that
cannot unpickle a lease's items can still say which batch failed, and the common result (Done)
needs no pickling at all. A batch crosses the pipe as a plain list of items. What cannot be
sent at all turns into a message rather than a dead pipe (see :mod:`~procdispatch._wire_errors`).
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
from typing import TYPE_CHECKING, Any

from ._messages import (
    DONE,
    HEADER,
    K_ARENA,
    K_DONE,
    K_FAILED,
    K_INIT_FAILED,
    K_LEASE,
    K_LEASE_OOB,
    K_LOG,
    K_READY,
    K_STOP,
    PROTOCOL,
    Done,
    Failed,
    InitFailed,
    Lease,
    Log,
    Ready,
    WorkerMessage,
)
from ._pickling import dumps, dumps_out_of_band
from ._wire_errors import (
    UnsendableItems,
    decode_failed,
    decode_init_failed,
    describe_error,
    encode_failed,
    encode_init_failed,
    encode_unencodable,
    format_remote_tb,
    safe_chain,
    text_of,
    type_name_of,
    unsendable,
)

if TYPE_CHECKING:
    from ._batch import Batch

__all__ = [
    "BIG",
    "HEADER",
    "K_ARENA",
    "K_LEASE",
    "K_LEASE_OOB",
    "SIZE",
    "STOP",
    "Done",
    "Failed",
    "FrameReader",
    "FrameSplitter",
    "InitFailed",
    "Lease",
    "Log",
    "Ready",
    "UnsendableItems",
    "WorkerMessage",
    "decode_from_worker",
    "decode_lease",
    "lease_items",
    "describe_error",
    "dumps",
    "dumps_out_of_band",
    "encode_done",
    "encode_init_failed",
    "encode_lease",
    "encode_log",
    "encode_ready",
    "encode_result",
    "format_remote_tb",
    "frame",
    "framed_done",
    "lease_parts",
    "safe_chain",
    "text_of",
    "type_name_of",
    "write_frame",
]

_DONE_FRAME = 4 + DONE.size  # a Done frame with its size
_DONE_WHOLE = struct.Struct("<4s" + DONE.format[1:])  # a Done frame, its size as bytes
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
        """The frame bodies completed by ``chunk``, as bytes."""
        out: list[bytes] = self._cut(chunk, False)
        return out

    def messages(self, chunk: bytes) -> list[WorkerMessage]:
        """The messages from a worker in what was read (see :func:`decode_from_worker`): the
        answers of quick sends come many to a read, so a Done is decoded where it lies."""
        out: list[WorkerMessage] = self._cut(chunk, True)
        return out

    def _cut(self, chunk: bytes, decode: bool) -> list[Any]:
        """Cut where the frames lie in ``chunk`` unless one began before it (then in the
        buffer); keep what is left for the next read. ``decode``: messages, not bodies."""
        buf = self._buf
        data: bytes | bytearray = chunk
        if buf:
            buf += chunk
            data = buf
        out: list[Any] = []
        n = len(data)
        if decode and n % _DONE_FRAME == 0:  # often nothing but Done frames: unpacked in C
            for head, kind, bid, attempt, _, seconds in _DONE_WHOLE.iter_unpack(data):
                if head != _DONE_HEAD or kind != K_DONE:
                    break  # the loop below reads on from this frame
                out.append(Done(bid, attempt, seconds))
        pos = len(out) * _DONE_FRAME
        while n - pos >= 4:
            (size,) = SIZE.unpack_from(data, pos)
            if decode and size == DONE.size and n - pos >= _DONE_FRAME and data[pos + 4] == K_DONE:
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
            body = bytes(data[start : start + size])  # a slice of bytes is not copied again
            out.append(decode_from_worker(body) if decode else body)
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
    data, meta = batch.data, batch.meta
    try:
        if meta is None and len(data) == 1 and type(data[0]) in _PLAIN:
            # A lone int, str, bytes...: nothing in it can name the main module, so the
            # standard pickler's own function does, in half the time of the reused one.
            payload = _plain_dumps((data, None), PROTOCOL)
        else:
            payload = dumps((data, meta))
    except BaseException as exc:  # user code: see encode_lease
        raise unsendable(data, meta, exc) from None
    return HEADER.pack(K_LEASE, batch.id, batch.attempt, batch.synthetic), payload


#: Types whose pickles are the same by either pickler (see lease_parts).
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
_plain_dumps = pickle.dumps


def decode_from_worker(buf: bytes) -> WorkerMessage:
    """Decode one frame from a worker. Raises only on a corrupt frame (a protocol bug)."""
    kind = buf[0]
    if kind == K_DONE:
        _, bid, attempt, _, seconds = DONE.unpack_from(buf)
        return Done(bid, attempt, seconds)
    if kind == K_FAILED:
        return decode_failed(buf)
    if kind == K_LOG:
        return Log(_decode_log(buf))
    if kind == K_READY:
        return Ready(pickle.loads(buf[1:]))
    if kind == K_INIT_FAILED:
        return decode_init_failed(buf)
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
    data, meta = lease_items(body)
    return Lease(bid, attempt, bool(synthetic), data, meta)


def lease_items(body: bytes | bytearray) -> tuple[list[Any], object]:
    """The items and the meta of a lease frame body (its header is read apart: the worker's
    loop needs it even when the items cannot be unpickled)."""
    data, meta = pickle.loads(memoryview(body)[HEADER.size :])
    return data, meta


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
        return encode_unencodable(res.batch_id, res.attempt, res.error, e)


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
