"""Large buffers of leases through shared memory: one arena per worker process.

Through the lease pipe, each byte of a large ``bytes`` item is copied four times: pickled into
the coordinator's buffer, written into the pipe, read out of it, unpickled into a new object.
Through the arena it is copied twice: into shared memory by the coordinator, out of it by the
worker's unpickling (``send_fn`` gets ``bytes`` and ``bytearray`` items as it would have: new
objects of the types that were put), and no large write or read goes through the pipe.

How. A batch whose first item is a ``bytes`` or ``bytearray`` of at least :data:`OOB_MIN`
bytes is pickled with protocol 5, each of its items that large wrapped so that it pickles as
``type(item)(buffer)`` with the buffer *out of band* (:class:`pickle.PickleBuffer`). The
buffers are copied into the worker's arena, and the lease frame (``K_LEASE_OOB``) carries
their places in it besides the rest of the pickle. A batch that is not like that goes
through the pipe as before. One whose buffers fit in the arena, but not in its free space now,
waits for that space when it is one of the batches a worker is handed at once (it goes back to
the queue unsent, and is leased again once the worker's answers free the space); a lease sent
alone (with a rate limit, each send is admitted apart) goes through the pipe.

The arena is a POSIX shared memory segment of :data:`ARENA_SIZE` bytes, made by the
coordinator the first time a worker is handed such a batch and named to the worker in a
``K_ARENA`` frame ahead of that lease. Its pages are reserved (``posix_fallocate``) as the ring
first reaches them, a few MiB at a time: a ``/dev/shm`` without room is then a lease that goes
through the pipe, never a SIGBUS in the middle of a copy. Space is
handed out as a ring: a worker answers its leases in the order it got them, so each answer
frees the oldest allocation. The coordinator alone owns the segment: it unlinks it when it
closes the worker's handle, whatever ended the worker (a ``kill -9`` too), and it is
registered with multiprocessing's resource tracker, which unlinks it if the coordinator's
process itself dies first. The worker maps it read-only and never registers it.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import pickle
import struct
from typing import TYPE_CHECKING, Any

from .. import _protocol as proto

if TYPE_CHECKING:
    from .._batch import Batch

__all__ = ["ARENA_SIZE", "OOB_MIN", "Arena", "WorkerArena", "wants_arena"]

#: Bytes of shared memory per worker that has been handed a batch of large buffers.
ARENA_SIZE = 32 << 20
#: The smallest ``bytes`` / ``bytearray`` item that travels through the arena.
OOB_MIN = 8 << 10
#: The arena's pages are reserved this much at a time, as its ring first reaches them.
_RESERVE_STEP = 4 << 20
#: A K_LEASE_OOB frame: the lease header, then how many buffers, then (offset, size) each.
_COUNT = struct.Struct("<I")
_PLACE = struct.Struct("<QQ")
_TRACKED = "shared_memory"  # the resource tracker's name for POSIX shared memory


def _shm() -> Any:
    """CPython's POSIX shared memory calls (those multiprocessing.shared_memory makes)."""
    import _posixshmem  # type: ignore[import-not-found]

    return _posixshmem


def wants_arena(data: list[Any]) -> bool:
    """Whether a batch looks like one of large buffers (only its first item is looked at: a
    scan of every item would cost batches of small items more than it saves)."""
    if not data:
        return False
    first = data[0]
    return (type(first) is bytes or type(first) is bytearray) and len(first) >= OOB_MIN


class _OutOfBand:
    """Pickles ``obj`` (a bytes or bytearray) as ``type(obj)(buffer)``, its buffer out of band."""

    __slots__ = ("obj",)

    def __init__(self, obj: bytes | bytearray) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return type(self.obj), (pickle.PickleBuffer(self.obj),)


class Arena:
    """The coordinator's side of one worker's arena: the segment and its ring of allocations."""

    def __init__(self, size: int | None = None) -> None:
        _posixshmem = _shm()
        self.size = size = ARENA_SIZE if size is None else size
        self.name = f"/pd{os.getpid()}-{os.urandom(6).hex()}"
        fd = _posixshmem.shm_open(self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)  # sparse: pages are reserved as the ring first reaches them
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            _posixshmem.shm_unlink(self.name)
            raise
        self._fd = fd
        from multiprocessing import resource_tracker

        resource_tracker.register(self.name, _TRACKED)
        self._view = memoryview(self._map)
        #: Bytes from the start whose pages exist: a copy into a page /dev/shm has no room
        #: for would be a SIGBUS, so pages are reserved (posix_fallocate) before the first.
        self._reserved = 0
        #: (start, end) of each allocation, oldest first; the ring is [start of the oldest,
        #: end of the newest), wrapping around the end of the segment.
        self._allocs: collections.deque[tuple[int, int]] = collections.deque()
        self._owned = True

    #: Whether the last :meth:`alloc` failed only for want of free space now: ``n`` fits in
    #: the segment, and will once the worker answers the leases that hold the ring.
    short = False

    def alloc(self, n: int) -> int | None:
        """The offset of ``n`` free contiguous bytes, now allocated; None when they do not fit."""
        allocs = self._allocs
        self.short = False
        if not allocs:
            start = 0
            if n > self.size:
                return None
        else:
            head, tail = allocs[0][0], allocs[-1][1]
            if head < tail:  # not wrapped: room after the tail, then before the head
                if n <= self.size - tail:
                    start = tail
                elif n <= head:
                    start = 0
                else:
                    self.short = n <= self.size
                    return None
            elif n <= head - tail:  # wrapped: room between tail and head
                start = tail
            else:
                self.short = n <= self.size
                return None
        if start + n > self._reserved and not self._reserve(start + n):
            return None
        allocs.append((start, start + n))
        return start

    def newest(self) -> int:
        """The size of the newest allocation (0 when none is held)."""
        if not self._allocs:
            return 0
        start, end = self._allocs[-1]
        return end - start

    def _reserve(self, end: int) -> bool:
        """Make the pages up to ``end`` exist (a few MiB at a time); False when /dev/shm has
        no room for them."""
        new = min(self.size, -(-end // _RESERVE_STEP) * _RESERVE_STEP)
        try:
            os.posix_fallocate(self._fd, self._reserved, new - self._reserved)
        except OSError:
            return False
        self._reserved = new
        return True

    def free_oldest(self) -> None:
        self._allocs.popleft()

    def write(self, offset: int, buffers: list[memoryview]) -> list[tuple[int, int]]:
        """Copy ``buffers`` one after another from ``offset``; their (offset, size) places."""
        view = self._view
        places = []
        at = offset
        for b in buffers:
            n = b.nbytes
            view[at : at + n] = b
            places.append((at, n))
            at += n
        return places

    def disown(self) -> None:
        """In a child forked from the coordinator's process: the segment is the parent's."""
        self._owned = False

    def close(self) -> None:
        """Unmap and unlink the segment (only where it was made)."""
        self._allocs.clear()
        self._view.release()
        self._map.close()
        os.close(self._fd)
        if not self._owned:
            return
        self._owned = False
        from multiprocessing import resource_tracker

        with contextlib.suppress(FileNotFoundError):
            _shm().shm_unlink(self.name)
        resource_tracker.unregister(self.name, _TRACKED)


def encode_oob_lease(batch: Batch[Any], arena: Arena) -> tuple[bytes, ...] | None:
    """A K_LEASE_OOB frame for ``batch``, its large buffers copied into ``arena``; None (and
    nothing allocated) when it does not go that way: it does not pickle so (the in-band path
    then says why), or its buffers do not fit in the arena now."""
    ours: set[int] = set()
    data = []
    for x in batch.data:
        if (type(x) is bytes or type(x) is bytearray) and len(x) >= OOB_MIN:
            ours.add(id(x))
            data.append(_OutOfBand(x))
        else:
            data.append(x)
    raws: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        # Only the items wrapped above: a buffer of anything else (a numpy array) would be
        # unpickled as a view of the arena, which the next leases overwrite.
        raw = buffer.raw()
        if id(raw.obj) not in ours:
            return True  # in band
        raws.append(raw)
        return False

    try:
        payload = proto.dumps_out_of_band((data, batch.meta), out_of_band)
    except Exception:
        return None  # the in-band encoding tries again, by value, or reports what fails
    offset = arena.alloc(sum(r.nbytes for r in raws))
    if offset is None:
        return None
    places = arena.write(offset, raws)
    table = b"".join([_COUNT.pack(len(places)), *(_PLACE.pack(o, n) for o, n in places)])
    head = proto.HEADER.pack(proto.K_LEASE_OOB, batch.id, batch.attempt, batch.synthetic)
    return proto.frame(head + table + payload)


def arena_frame(arena: Arena) -> bytes:
    """The frame that names ``arena`` to its worker."""
    return b"".join(proto.frame(bytes([proto.K_ARENA]) + proto.dumps((arena.name, arena.size))))


class WorkerArena:
    """The worker's side: the segment mapped read-only."""

    def __init__(self, body: bytes | bytearray) -> None:
        name, size = pickle.loads(memoryview(body)[1:])
        fd = _shm().shm_open(name, os.O_RDONLY, mode=0o600)
        try:
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)

    def decode(self, body: bytes | bytearray) -> proto.Lease:
        """The lease in a K_LEASE_OOB frame body (raises what unpickling its items raised)."""
        _, bid, attempt, synthetic = proto.HEADER.unpack_from(body)
        at = proto.HEADER.size
        (count,) = _COUNT.unpack_from(body, at)
        at += _COUNT.size
        view = self._view
        buffers = []
        for _ in range(count):
            offset, n = _PLACE.unpack_from(body, at)
            at += _PLACE.size
            buffers.append(view[offset : offset + n])
        data, meta = pickle.loads(memoryview(body)[at:], buffers=buffers)
        return proto.Lease(bid, attempt, bool(synthetic), data, meta)
