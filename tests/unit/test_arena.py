"""The arena of large buffers, in one process: its ring of allocations, and leases encoded into
it and decoded from it (see procdispatch.backends._arena)."""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Iterator
from typing import Any

import pytest

from procdispatch import _protocol as proto
from procdispatch._batch import Batch
from procdispatch.backends._arena import (
    OOB_MIN,
    Arena,
    WorkerArena,
    arena_frame,
    encode_oob_lease,
    wants_arena,
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory")


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena(1 << 20)
    yield a
    a.close()


def _body(parts: tuple[bytes, ...]) -> bytes:
    """A frame's body (its parts joined, the size header cut off)."""
    whole = b"".join(parts)
    (size,) = proto.SIZE.unpack_from(whole)
    assert size == len(whole) - 4
    return whole[4:]


@pytest.mark.parametrize("seed", range(20))
def test_the_ring_never_hands_out_space_in_use(arena, seed):
    rng = random.Random(seed)
    live: list[tuple[int, int]] = []  # oldest first
    for _ in range(400):
        if live and rng.random() < 0.45:
            arena.free_oldest()
            live.pop(0)
            continue
        n = rng.choice([1, 100, 4096, 50_000, 300_000, 700_000])
        got = arena.alloc(n)
        if not live:
            assert got is not None  # an empty ring has room for anything up to its size
        if got is None:
            continue
        assert got >= 0
        assert got + n <= arena.size
        assert all(got + n <= s or e <= got for s, e in live), (got, n, live)
        live.append((got, got + n))


def test_a_lease_decodes_to_the_types_that_were_put(arena):
    data: list[Any] = [
        b"a" * OOB_MIN,
        bytearray(b"b" * 100_000),
        b"small",
        7,
        {"nested": b"c" * OOB_MIN},  # inside a container: in band
    ]
    assert wants_arena(data)
    batch: Batch[Any] = Batch(data, {"meta": 1}, id=9, attempt=2)
    parts = encode_oob_lease(batch, arena)
    assert parts is not None
    body = _body(parts)
    assert body[0] == proto.K_LEASE_OOB
    assert len(body) < OOB_MIN + 1000  # the nested item is in the frame, the others are not
    worker = WorkerArena(arena_frame(arena)[4:])
    lease = worker.decode(body)
    assert (lease.batch_id, lease.attempt, lease.meta) == (9, 2, {"meta": 1})
    assert lease.data == data
    assert [type(x) for x in lease.data] == [type(x) for x in data]
    assert lease.data[0] is not data[0]  # copies out of the arena, not views of it


class _OwnBuffer:
    """Exports a buffer of its own to pickle 5, as a numpy array does."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _OwnBuffer, (pickle.PickleBuffer(self.payload),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _OwnBuffer) and bytes(other.payload) == self.payload

    __hash__ = None  # type: ignore[assignment]


def test_only_the_large_items_go_out_of_band(arena):
    """Another object's buffer would be unpickled as a view of the arena, which later leases
    overwrite: it stays in band."""
    own = _OwnBuffer(b"z" * (2 * OOB_MIN))
    batch: Batch[Any] = Batch([b"a" * OOB_MIN, own], None, id=1, attempt=1)
    parts = encode_oob_lease(batch, arena)
    assert parts is not None
    body = _body(parts)
    assert len(body) > 2 * OOB_MIN  # own's buffer is in the frame
    lease = WorkerArena(arena_frame(arena)[4:]).decode(body)
    assert lease.data == [b"a" * OOB_MIN, own]
    assert isinstance(lease.data[1].payload, bytes)  # not a view of the arena


def test_a_lease_that_does_not_fit_takes_no_space(arena):
    big: Batch[Any] = Batch([b"x" * (arena.size // 2 + 1)] * 2, None, id=1, attempt=1)
    assert encode_oob_lease(big, arena) is None
    assert arena.alloc(arena.size) == 0  # nothing was left allocated


def test_small_first_items_go_through_the_pipe():
    assert not wants_arena([])
    assert not wants_arena([b"x" * (OOB_MIN - 1), b"y" * OOB_MIN])
    assert not wants_arena([memoryview(b"x" * OOB_MIN)])
    assert wants_arena([bytearray(OOB_MIN)])


def test_a_dev_shm_without_room_sends_the_lease_through_the_pipe(arena, monkeypatch):
    """Pages are reserved before the first copy into them: no room is a lease that does not
    go through the arena (never a SIGBUS in the copy), and the space stays free."""

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    batch: Batch[Any] = Batch([b"a" * OOB_MIN], None, id=1, attempt=1)
    assert encode_oob_lease(batch, arena) is None
    monkeypatch.undo()
    assert arena.alloc(arena.size) == 0  # the failed lease took no space
    arena.free_oldest()
    assert encode_oob_lease(batch, arena) is not None  # room again: the arena is still good
