"""Worker-side functions of the benchmark suite.

Everything here runs in worker processes, so it lives in a small module that workers can import
by name (``run.py`` puts this directory on ``sys.path``; spawn and forkserver children inherit
it). It imports only the standard library: a worker's start-up cost is then the pool's own.

Each system gets the same kind of no-op: procdispatch's ``send_fn`` takes a whole batch and
does nothing; the pools' functions take one item and do nothing (that is what their ``chunksize``
batches); the raw pipe worker unpickles a chunk and acks it.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
from multiprocessing.connection import Connection
from typing import Any

_STAMP = struct.Struct("<d")
_reporter: socket.socket | None = None
_reporter_path = ""


def noop(item: object) -> None:
    """The pools' no-op: one call per item."""
    return None


def noop_batch(batch: Any) -> None:
    """procdispatch's no-op: one call per batch."""
    return None


def spin(n: int) -> int:
    """Pure-Python integer arithmetic, about ``n`` loop turns (CPU-bound, holds the GIL)."""
    x = 0
    for i in range(n):
        x = (x + i * i) % 1_000_003
    return x


def spin_batch(batch: Any) -> None:
    """procdispatch's CPU-bound send: ``spin`` each item (an iteration count)."""
    for n in batch.data:
        spin(n)


def raw_worker(conn: Connection) -> None:
    """The raw pipe ceiling: receive a pickled chunk, unpickle it, ack; an empty frame stops."""
    while True:
        buf = conn.recv_bytes()
        if not buf:
            return
        pickle.loads(buf)
        conn.send_bytes(b"a")


def sink_worker(conn: Connection) -> None:
    """Read and discard frames; answer ``b"ack"`` with an ack; an empty frame stops."""
    while True:
        buf = conn.recv_bytes()
        if not buf:
            return
        if buf == b"ack":
            conn.send_bytes(b"a")


def echo_worker(conn: Connection) -> None:
    """Echo every frame back (pipe round-trip time); an empty frame stops."""
    while True:
        buf = conn.recv_bytes()
        if not buf:
            return
        conn.send_bytes(buf)


def gate_send(gate_path: str, batch: Any) -> None:
    """Hold the send until ``gate_path`` exists (keeps a channel's buffer full while measured)."""
    deadline = time.monotonic() + 300.0
    while not os.path.exists(gate_path) and time.monotonic() < deadline:
        time.sleep(0.005)


def init_reporter(path: str) -> None:
    """Worker init: open a datagram socket to the parent's ``path``."""
    global _reporter, _reporter_path
    _reporter = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    _reporter_path = path


def _report() -> None:
    now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    assert _reporter is not None, "init_reporter did not run in this worker"
    _reporter.sendto(_STAMP.pack(now), _reporter_path)


def report_batch(batch: Any) -> None:
    """procdispatch send: tell the parent when the send started."""
    _report()


def report_item(item: object) -> None:
    """Pool function: tell the parent when the call started."""
    _report()


def decode_stamp(buf: bytes) -> float:
    """The parent's side of :func:`_report`."""
    value: float = _STAMP.unpack(buf)[0]
    return value
