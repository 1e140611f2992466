"""Child side of the start-up, drain, memory and latency workloads (P7-P10).

Each function runs in a fresh interpreter started by ``run.py`` and returns ``{metric: value}``.
"""

from __future__ import annotations

import functools
import gc
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import _bench_fns as fns
from _throughput import SETTLE, Params, Result, context, wait_until

# ---- P7: start-up ---------------------------------------------------------------------------


def run_startup(p: Params) -> Result:
    """Construct -> first call acked (P7), and on to the end of the shutdown (P7'), twice in
    one interpreter: ``cold`` then ``warm``. PPE's cycle is its ``with`` block (submit one, take
    the result, leave the block: ``shutdown(wait=True)``).

    Cold is the first start of the process: for forkserver it includes starting the forkserver
    process, for both systems alike. Warm is the next start (forkserver up, modules imported).
    The library is imported before the clock for both systems.
    """
    import multiprocessing

    # Both packages load their pool module lazily, on first access to the name: take the name
    # here, before the start-up clock, for both; the import is timed on its own (this
    # interpreter has imported nothing of either yet).
    t_import = time.perf_counter()
    if p["lib"] == "procdispatch":
        from procdispatch import ProcessChannel
    else:
        from concurrent.futures import ProcessPoolExecutor
    import_ms = (time.perf_counter() - t_import) * 1e3

    method = str(p["method"])
    deadline = time.monotonic() + float(p["budget"])

    def one() -> tuple[float, float]:
        """(construct -> first ack, construct -> first ack -> shut down), in ms."""
        if p["lib"] == "procdispatch":
            t0 = time.perf_counter()
            ch = ProcessChannel(fns.noop_batch, workers=2, batch_items_max=1, start_method=method)
            try:
                ch.put(0)
                wait_until(lambda: ch.stats().items_delivered >= 1, deadline, "first ack")
                t1 = time.perf_counter()
                if not ch.close_and_drain(30.0):
                    raise TimeoutError("close_and_drain timed out")
                t2 = time.perf_counter()
            finally:
                if not ch.drained:
                    ch.cancel()
                    ch.wait_drained(10.0)
            return (t1 - t0) * 1e3, (t2 - t0) * 1e3
        t0 = time.perf_counter()
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as ex:
            ex.submit(fns.noop, 0).result(timeout=max(1.0, deadline - time.monotonic()))
            t1 = time.perf_counter()
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t0) * 1e3

    cold, cold_cycle = one()
    warm, warm_cycle = one()
    return {
        "import_ms": import_ms,
        "cold_ms": cold,
        "warm_ms": warm,
        "cold_cycle_ms": cold_cycle,
        "warm_cycle_ms": warm_cycle,
    }


# ---- P8: drain of an idle channel -----------------------------------------------------------


def run_drain(p: Params) -> Result:
    """Workers up and idle (each ran a call, then 0.3 s idle); time the close/shutdown."""
    deadline = time.monotonic() + float(p["budget"])
    lib = p["lib"]
    if lib == "procdispatch":
        import procdispatch as pd

        context()
        ch = pd.ProcessChannel(fns.noop_batch, workers=2, batch_items_max=1)
        try:
            ch.put_many([0, 1, 2, 3])
            wait_until(lambda: ch.stats().items_delivered >= 4, deadline, "warm-up")
            time.sleep(SETTLE)
            t0 = time.perf_counter()
            ok = ch.close_and_drain(max(1.0, deadline - time.monotonic()))
            t1 = time.perf_counter()
            if not ok:
                raise TimeoutError("close_and_drain timed out")
        finally:
            if not ch.drained:
                ch.cancel()
                ch.wait_drained(10.0)
        return {"ms": (t1 - t0) * 1e3}
    if lib == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        ex = ProcessPoolExecutor(2, mp_context=context())
        list(ex.map(fns.noop, range(4)))
        time.sleep(SETTLE)
        t0 = time.perf_counter()
        ex.shutdown(wait=True)
        return {"ms": (time.perf_counter() - t0) * 1e3}
    pool = context().Pool(2)
    try:
        pool.map(fns.noop, range(4))
        time.sleep(SETTLE)
        t0 = time.perf_counter()
        pool.close()
        pool.join()
        return {"ms": (time.perf_counter() - t0) * 1e3}
    finally:
        pool.terminate()


# ---- P9: parent memory per buffered item ----------------------------------------------------


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def run_memory(p: Params) -> Result:
    """Bytes per buffered item that the channel adds on top of the caller's list of items.

    One worker holds the first batch in a send that waits on a gate file, so everything else
    stays buffered while the parent is measured. The caller keeps its own list alive, so the
    figure is what the channel adds (its batch lists, batch objects, bookkeeping), measured with
    tracemalloc (Python allocations) or as the RSS delta (everything, noisier).
    """
    import tracemalloc

    n = int(p["n"])
    how = str(p["how"])
    deadline = time.monotonic() + float(p["budget"])
    if p["lib"] == "list":  # the reference: a plain list of the same ints, per item
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        items = list(range(1_000_000, 1_000_000 + n))
        size = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        del items
        return {"bytes_per_item": size / n, "peak_bytes_per_item": size / n}

    import procdispatch as pd

    context()
    items = list(range(1_000_000, 1_000_000 + n))  # no small-int cache: a real int per item
    batch = int(p["batch"])
    with tempfile.TemporaryDirectory() as tmp:
        gate = os.path.join(tmp, "gate")
        ch = pd.ProcessChannel(
            functools.partial(fns.gate_send, gate),
            workers=1,
            batch_items_max=batch,
            full_behavior=pd.InfiniteGrowth(),
        )
        try:
            time.sleep(0.5)  # the worker starts: not a per-item cost
            gc.collect()
            if how == "tracemalloc":
                tracemalloc.start()
                tracemalloc.reset_peak()

            def measure() -> int:
                return tracemalloc.get_traced_memory()[0] if how == "tracemalloc" else _rss()

            base = measure()
            ch.put_many(items)
            wait_until(lambda: ch.stats().items_in_flight >= batch, deadline, "first lease")
            value = _settle(measure, deadline)
            peak = tracemalloc.get_traced_memory()[1] if how == "tracemalloc" else value
            if how == "tracemalloc":
                tracemalloc.stop()
            if ch.stats().items_delivered:
                raise RuntimeError("the gate leaked: items were delivered while measuring")
            with open(gate, "w"):
                pass
            if not ch.close_and_drain(max(1.0, deadline - time.monotonic())):
                raise TimeoutError("close_and_drain timed out")
            if ch.stats().items_delivered != n:
                raise RuntimeError(f"procdispatch lost items: {ch.stats()}")
        finally:
            with open(gate, "w"):
                pass
            if not ch.drained:
                ch.cancel()
                ch.wait_drained(10.0)
    return {"bytes_per_item": (value - base) / n, "peak_bytes_per_item": (peak - base) / n}


def _settle(measure: Any, deadline: float) -> int:
    """Sample every 50 ms until two samples in a row agree within 0.5 % (or 3 s pass)."""
    last = measure()
    stop = min(deadline, time.monotonic() + 3.0)
    while time.monotonic() < stop:
        time.sleep(0.05)
        cur = measure()
        if abs(cur - last) <= 0.005 * max(abs(last), 1):
            return int(cur)
        last = cur
    return int(last)


# ---- P10: latency at low load ---------------------------------------------------------------


def run_latency(p: Params) -> Result:
    """Median of ``count`` single puts (or submits): submit -> send start in the worker.

    Each put waits until its send has started (the worker writes ``time.monotonic()`` to a
    datagram socket the parent reads) plus 2 ms before the next, so the load stays low.
    """
    count = int(p["count"])
    lib = p["lib"]
    if lib == "pipe":
        return _pipe_rtt(count)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stamps")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(10.0)
        ctx = context()
        submit: Any
        close: Any
        if lib == "procdispatch":
            import procdispatch as pd

            ch = pd.ProcessChannel(
                fns.report_batch,
                workers=2,
                batch_age_max=float(p["age"]),
                worker_init=functools.partial(fns.init_reporter, path),
            )
            submit, close = ch.put, lambda: ch.close_and_drain(30.0)
        else:
            from concurrent.futures import ProcessPoolExecutor

            ex = ProcessPoolExecutor(
                2, mp_context=ctx, initializer=fns.init_reporter, initargs=(path,)
            )
            submit, close = (lambda i: ex.submit(fns.report_item, i)), ex.shutdown
        try:
            lat: list[float] = []
            for i in range(count + 5):
                t_put = time.monotonic()
                submit(i)
                t_start = fns.decode_stamp(sock.recv(64))
                if i >= 5:  # the first few start the workers
                    lat.append(t_start - t_put)
                time.sleep(0.002 if i >= 5 else SETTLE / 5)
        finally:
            close()
            sock.close()
    lat.sort()
    return {
        "median_ms": statistics.median(lat) * 1e3,
        "p90_ms": lat[int(0.9 * (len(lat) - 1))] * 1e3,
    }


def _pipe_rtt(count: int) -> Result:
    """One ``multiprocessing.Pipe`` round trip to an echoing worker process."""
    ctx = context()
    mine, theirs = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=fns.echo_worker, args=(theirs,), daemon=True)
    proc.start()
    theirs.close()
    try:
        rtts: list[float] = []
        for i in range(count + 10):
            t0 = time.perf_counter()
            mine.send_bytes(b"0123456789abcdef")
            mine.recv_bytes()
            if i >= 10:
                rtts.append(time.perf_counter() - t0)
            time.sleep(0.002)
        mine.send_bytes(b"")
        proc.join(5.0)
    finally:
        if proc.exitcode is None:
            proc.kill()
        mine.close()
    rtts.sort()
    return {
        "median_ms": statistics.median(rtts) * 1e3,
        "p90_ms": rtts[int(0.9 * (len(rtts) - 1))] * 1e3,
    }
