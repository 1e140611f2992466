"""A process worker's handle writing several leases at once (``ProcessWorker.send_leases``),
into a real pipe with no worker behind it: what reaches the pipe, in what order, and how many
leases of that size the handle says are worth queueing (``lease_cap``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from procdispatch import _protocol as proto
from procdispatch.backends.process import PIPE_BYTES, PIPE_LEASES, ProcessWorker
from procdispatch.buffer import Batch


class _Reader:
    """The leases in the pipe so far, as (batch id, items)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.split = proto.FrameSplitter()

    def __call__(self) -> list[tuple[int, list[Any]]]:
        out = []
        while True:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return out
            for body in self.split.split(chunk):
                out.append((proto.HEADER.unpack_from(body)[1], proto.lease_items(body)[0]))


@pytest.fixture
def handle() -> Iterator[tuple[ProcessWorker, _Reader]]:
    r, w = os.pipe()
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    h = ProcessWorker(None, b"", 1)
    h._lease_fd = w
    yield h, _Reader(r)
    os.close(r)
    os.close(w)


@pytest.mark.parametrize(
    "item",
    [
        1,  # tiny: no cap below what any pool holds
        list(range(1000)),  # a few KB a lease: as many as the pipe holds
        "x" * 100_000,  # larger than the pipe: 8 all the same
    ],
)
def test_leases_reach_the_pipe_whole_and_in_order(
    handle: tuple[ProcessWorker, _Reader], item: Any
) -> None:
    h, read = handle
    batches: list[Batch[Any]] = [Batch([item], id=i, attempt=1) for i in range(1, 11)]
    n, waits, err = h.send_leases(batches)
    assert (n, err) == (10, None)
    got = read()
    while waits:  # what the pipe did not take waits in the handle
        waits = not h.flush()
        got += read()
    assert got == [(i, [item]) for i in range(1, 11)]
    assert h.unsent() == 0
    size = sum(len(p) for p in proto.encode_lease(batches[-1]))
    assert h.lease_cap == max(PIPE_LEASES, PIPE_BYTES // size)


def test_a_batch_that_cannot_be_encoded_ends_the_run_after_those_before_it(
    handle: tuple[ProcessWorker, _Reader],
) -> None:
    h, read = handle
    items = ["a", threading.Lock(), "c"]
    batches: list[Batch[Any]] = [Batch([x], id=i, attempt=1) for i, x in enumerate(items, 1)]
    n, waits, err = h.send_leases(batches)
    assert (n, waits) == (1, False)
    assert isinstance(err, proto.UnsendableItems)
    assert read() == [(1, ["a"])]


def test_a_gone_worker_counts_every_lease_not_yet_written_as_unsent() -> None:
    r, w = os.pipe()
    os.close(r)
    h = ProcessWorker(None, b"", 1)
    h._lease_fd = w
    big = list(range(5000))  # 25 KB: each lease is written as soon as it is encoded
    try:
        with pytest.raises(BrokenPipeError):
            h.send_leases([Batch([big], id=i, attempt=1) for i in range(1, 5)])
        assert h.unsent() == 4
    finally:
        os.close(w)
