"""Child side of P13's references: the machine's memcpy and raw pipe bandwidth, in bytes/s.

The big-payload rows (procdispatch, Pool, PPE with batches of 1 MB and 10 MB) run through
``_throughput``; these two say what the hardware allows in the same run, so a row reads as a
share of it:

* ``memcpy`` -- one copy of a 64 MB buffer into another, already allocated and touched (no
  page faults): the best of 5.
* ``pipe`` -- frames of ``frame_bytes`` from the parent to one process that reads and discards
  them (``Connection.send_bytes``/``recv_bytes``, the framing every pool here uses), then one ack
  back; started and warmed before the clock. The send side builds nothing: it is the pipe alone.
"""

from __future__ import annotations

import time

import _bench_fns as fns
from _throughput import Params, Result, context

MEMCPY_BYTES = 64 * 1024 * 1024


def run_memcpy(p: Params) -> Result:
    src = bytes(MEMCPY_BYTES)
    dst = bytearray(MEMCPY_BYTES)
    dst[:] = src  # touch every page of the destination before the clock
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst[:] = src
        best = min(best, time.perf_counter() - t0)
    return {str(p["mode"]): MEMCPY_BYTES / best}


def run_pipe_bw(p: Params) -> Result:
    frame = bytes(int(p["frame_bytes"]))
    total = int(p["total_bytes"])
    count = max(1, total // len(frame))
    ctx = context()
    mine, theirs = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=fns.sink_worker, args=(theirs,), daemon=True)
    proc.start()
    theirs.close()
    try:
        for _ in range(4):  # warm: the reader runs, the pipe's pages are in use
            mine.send_bytes(frame)
        mine.send_bytes(b"ack")
        mine.recv_bytes()
        t0 = time.perf_counter()
        for _ in range(count):
            mine.send_bytes(frame)
        mine.send_bytes(b"ack")
        mine.recv_bytes()
        t1 = time.perf_counter()
        mine.send_bytes(b"")
        proc.join(10.0)
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join(1.0)
        mine.close()
    return {str(p["mode"]): count * len(frame) / (t1 - t0)}
