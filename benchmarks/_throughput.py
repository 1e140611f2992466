"""Child side of the throughput workloads (P1-P4, P13): one system, one mode, one measurement.

Every function takes the parameters the runner chose and returns ``{metric: value}``. Three
modes:

* ``cold`` -- the clock starts before the pool or channel is constructed and stops when the
  last result is back *and* the pool has shut down (``close_and_drain`` / ``shutdown(wait=True)``
  / ``close()+join()``). The forkserver process itself is started, and has finished its
  preload, before the clock (a one-time cost of the program, measured separately by P7).
* ``steady`` -- the pool is built and warmed (every worker has run a few calls, then 0.3 s of
  idle time), the clock runs from the first submitted item to the last result back in the
  parent; shutdown is not timed.
* ``warm`` -- steady with shutdown: built and warmed like ``steady``, but the clock runs from
  the first submitted item to the end of the shutdown (``close_and_drain()``,
  ``shutdown(wait=True)``, ``close()+join()``, mpire's ``stop_and_join()``): what a batch script
  that already has its pool pays for the rest of its life.

procdispatch has no per-item results: "last result back" is its ``on_delivered`` callback,
called in the parent once per delivered batch (as a pool's parent receives each result), seeing
the count (:class:`Deliveries`). Polling ``stats()`` instead (see :func:`wait_until`) puts a
thread in the parent that wakes thousands of times a second, which takes a core from the
workers when they use every core: in P4 (2 workers, CPU-bound) it cost 5-40 % of the rate.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from typing import Any

import _bench_fns as fns

Params = dict[str, Any]
Result = dict[str, float]

POLL_MIN, POLL_MAX, POLL_SHARE = 0.0002, 0.010, 0.002
SETTLE = 0.3


#: The forkservers known to have finished their preload in this process.
_READY: set[str] = set()


def _wait_ready(name: str, process: Callable[[], Any]) -> None:
    """Wait until a forkserver just started has finished its preload: ``ensure_running``
    returns once the server's process exists, and the server imports what it preloads before
    it serves its first fork. Left running, that preload falls inside the clock that follows
    and competes with it for the cores. One process through the server, joined, waits for it."""
    if name in _READY:
        return
    proc = process()
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the {name} forkserver's first process failed ({proc.exitcode})")
    _READY.add(name)


def context(method: str = "forkserver") -> Any:
    """A multiprocessing context; for forkserver, the server is started now, and ready (its
    preload done), before any clock."""
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        multiprocessing.forkserver.ensure_running()
        _wait_ready("multiprocessing", lambda: ctx.Process(target=fns.noop, args=(None,)))
    return ctx


def procdispatch_server() -> None:
    """Start procdispatch's own forkserver now (untimed), as :func:`context` does for
    multiprocessing's, and waits until it is ready. Its workers fork from a server of its own,
    which preloads the worker module and never the main module (see
    ``procdispatch.backends._procstart``); left to the first channel, its start would fall
    inside the cold clock of procdispatch only. Like the standard server's, it is a
    once-per-program cost, and P7 measures it."""
    from procdispatch.backends import _procstart

    if _procstart.avoids_main("forkserver"):
        _procstart._forkserver().ensure_running()
        ctx = _procstart.WorkerContext("forkserver")
        _wait_ready("procdispatch", lambda: ctx.Process(target=fns.noop, args=(None,)))


class Deliveries:
    """procdispatch's ``on_delivered`` for the steady clock: counts the items delivered and
    sets an event once they reach the count :meth:`expect` was given."""

    def __init__(self) -> None:
        self.count = 0
        self._target = math.inf
        self._reached = threading.Event()

    def __call__(self, batch: Any) -> None:  # on the channel's coordinator thread
        self.count += len(batch.data)
        if self.count >= self._target:
            self._reached.set()

    def expect(self, target: int) -> None:
        """Set before the items are put, so that the callback sees the target."""
        self._reached.clear()
        self._target = target
        if self.count >= target:
            self._reached.set()

    def wait(self, deadline: float, what: str) -> None:
        if not self._reached.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"timed out waiting for {what}")


def wait_until(pred: Callable[[], bool], deadline: float, what: str) -> None:
    """Poll ``pred``; the pause grows with the time waited (0.2 % of it, 0.2 to 10 ms), which
    bounds the timing error to about 0.2 % while keeping the poller off the CPU the workers use
    (the pools' parents block on a result instead of polling)."""
    start = time.monotonic()
    while not pred():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(min(POLL_MAX, max(POLL_MIN, (now - start) * POLL_SHARE)))


def _items(p: Params, n: int) -> list[Any]:
    if p.get("work") == "spin":
        return [int(p["spin_n"])] * n
    size = int(p.get("item_bytes", 0))
    if size:
        # Distinct objects with distinct contents: pickle memoizes a repeated object, which would
        # send one copy per batch instead of one per item.
        return [i.to_bytes(8, "little") * (size // 8) for i in range(n)]
    return list(range(n))


def _warm_count(p: Params) -> int:
    """Enough calls for every worker to have run some: four batches per worker."""
    return int(p["batch"]) * int(p["workers"]) * 4


def _result(p: Params, n: int, seconds: float) -> Result:
    """Items (or tasks) per second; bytes per second for the payload workloads."""
    per_item = int(p.get("item_bytes", 0)) or 1
    return {str(p["mode"]): n * per_item / seconds}


# ---- procdispatch ---------------------------------------------------------------------------


def run_procdispatch(p: Params) -> Result:
    import procdispatch as pd

    n = int(p["n"])
    items = _items(p, n)
    warm = _items(p, _warm_count(p))
    deadline = time.monotonic() + float(p["budget"])
    fb_spec = str(p.get("full_behavior", "infinite"))
    fb: Any = (
        pd.InfiniteGrowth()
        if fb_spec == "infinite"
        else None  # the channel's default
        if fb_spec == "default"
        else pd.BlockNewItems(max_items=int(fb_spec.split(":")[1]))
    )
    send = fns.spin_batch if p.get("work") == "spin" else fns.noop_batch

    def feed(ch: Any, xs: list[Any]) -> None:
        if p["producer"] == "put":
            put = ch.put
            for x in xs:
                put(x)
        else:
            ch.put_many(xs)

    def delivered(ch: Any, count: int) -> Callable[[], bool]:
        return lambda: bool(ch.stats().items_delivered >= count)

    # The package loads its channel module on first use of the name: take it before any clock,
    # as the pools' modules are (see _import_pool).
    channel_cls = pd.ProcessChannel

    steady = p["mode"] == "steady"
    deliveries = Deliveries()

    def make() -> Any:
        return channel_cls(
            send,
            workers=int(p["workers"]),
            max_leases=p.get("max_leases"),
            batch_items_max=int(p["batch"]),
            full_behavior=fb,
            on_delivered=deliveries if steady else None,
        )

    context()
    procdispatch_server()
    ch: Any = None
    try:
        if p["mode"] == "cold":
            t0 = time.perf_counter()
            ch = make()
            feed(ch, items)
            if not ch.close_and_drain(max(1.0, deadline - time.monotonic())):
                raise TimeoutError("close_and_drain timed out")
            t1 = time.perf_counter()
            _check_pd(ch, n)
            return _result(p, n, t1 - t0)
        ch = make()
        feed(ch, warm)
        wait_until(delivered(ch, len(warm)), deadline, "warm-up")
        time.sleep(SETTLE)
        deliveries.expect(len(warm) + n)
        t0 = time.perf_counter()
        feed(ch, items)
        if steady:
            deliveries.wait(deadline, "all items delivered")
            t1 = time.perf_counter()
        if not ch.close_and_drain(max(1.0, deadline - time.monotonic())):
            raise TimeoutError("close_and_drain timed out")
        if p["mode"] == "warm":
            t1 = time.perf_counter()
        _check_pd(ch, len(warm) + n)
        return _result(p, n, t1 - t0)
    finally:
        if ch is not None and not ch.drained:
            ch.cancel()
            ch.wait_drained(10.0)


def _check_pd(ch: Any, n: int) -> None:
    s = ch.stats()
    if s.items_delivered != n or s.items_dropped:
        raise RuntimeError(f"procdispatch lost items: {s}")


# ---- the stdlib and peers -------------------------------------------------------------------


def _fn(p: Params) -> Callable[[Any], Any]:
    return fns.spin if p.get("work") == "spin" else fns.noop


def _pool_map(p: Params, ex: Any, xs: list[int]) -> None:
    """Run ``xs`` through an executor-like object the way ``p["api"]`` says; wait for all."""
    api = p["api"]
    fn = _fn(p)
    cs = int(p["batch"])
    if api == "imap_unordered":
        for _ in ex.imap_unordered(fn, xs, chunksize=cs):
            pass
    elif api == "mpire_imap_unordered":
        for _ in ex.imap_unordered(fn, xs, chunk_size=cs):
            pass
    elif api == "map":
        for _ in ex.map(fn, xs, chunksize=cs):
            pass
    elif api == "submit":
        import concurrent.futures as cf

        futs = [ex.submit(fn, x) for x in xs]
        for f in cf.as_completed(futs):
            f.result()
    elif api == "schedule":  # pebble
        import concurrent.futures as cf

        futs = [ex.schedule(fn, args=(x,)) for x in xs]
        for f in cf.as_completed(futs):
            f.result()
    else:
        raise ValueError(f"unknown api {api!r}")


def _make_pool(p: Params) -> tuple[Any, Callable[[], None], Callable[[], None]]:
    """(pool, graceful shutdown, forced shutdown) for ``p["lib"]``."""
    workers = int(p["workers"])
    lib = p["lib"]
    if lib == "pool":
        pool = context().Pool(workers)

        def close() -> None:
            pool.close()
            pool.join()

        return pool, close, pool.terminate
    if lib == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        ex = ProcessPoolExecutor(workers, mp_context=context())
        return ex, lambda: ex.shutdown(wait=True), lambda: _kill_ppe(ex)
    if lib == "loky":
        import loky

        lex = loky.get_reusable_executor(max_workers=workers)
        return lex, lambda: lex.shutdown(wait=True), lambda: lex.shutdown(kill_workers=True)
    if lib == "pebble":
        import pebble

        pp: Any = pebble.ProcessPool(max_workers=workers, context=context())

        def pclose() -> None:
            pp.close()
            pp.join()

        def pkill() -> None:
            pp.stop()
            pp.join()

        return pp, pclose, pkill
    if lib == "mpire":
        from mpire import WorkerPool

        # keep_alive: the workers outlive one imap call, so a warmed pool stays warm
        wp: Any = WorkerPool(n_jobs=workers, start_method="forkserver", keep_alive=True)
        return wp, wp.stop_and_join, wp.terminate
    raise ValueError(f"unknown lib {lib!r}")


def _import_pool(lib: str) -> None:
    """Import the pool's module before any clock, as procdispatch's channel module is."""
    import importlib

    module = {
        "pool": "multiprocessing.pool",
        "ppe": "concurrent.futures.process",
        "loky": "loky",
        "pebble": "pebble",
        "mpire": "mpire",
    }[lib]
    importlib.import_module(module)


def _kill_ppe(ex: Any) -> None:
    for proc in list(getattr(ex, "_processes", {}).values()):
        proc.kill()
    ex.shutdown(wait=False, cancel_futures=True)


def run_pool(p: Params) -> Result:
    """multiprocessing.Pool, ProcessPoolExecutor, loky, pebble, mpire."""
    n = int(p["n"])
    items = _items(p, n)
    warm = _items(p, _warm_count(p))
    context()
    _import_pool(str(p["lib"]))
    t0 = time.perf_counter()
    pool, close, kill = _make_pool(p)
    done = False
    try:
        if p["mode"] == "cold":
            _pool_map(p, pool, items)
            close()
            done = True
            return _result(p, n, time.perf_counter() - t0)
        _pool_map(p, pool, warm)
        time.sleep(SETTLE)
        t0 = time.perf_counter()
        _pool_map(p, pool, items)
        t1 = time.perf_counter()
        close()
        done = True
        if p["mode"] == "warm":
            t1 = time.perf_counter()
        return _result(p, n, t1 - t0)
    finally:
        if not done:
            kill()


# ---- the raw pipe ceiling -------------------------------------------------------------------


def _chunks(items: Sequence[int], size: int) -> Iterator[bytes]:
    import pickle

    for i in range(0, len(items), size):
        yield pickle.dumps(items[i : i + size], 5)


def _pump(conns: list[Any], frames: Iterator[bytes]) -> None:
    """One chunk in flight per worker; send the next to whichever worker acked."""
    busy: list[Any] = []
    for c in conns:
        frame = next(frames, None)
        if frame is None:
            break
        c.send_bytes(frame)
        busy.append(c)
    while busy:
        for c in wait(busy):
            assert isinstance(c, multiprocessing.connection.Connection)
            c.recv_bytes()
            frame = next(frames, None)
            if frame is None:
                busy.remove(c)
            else:
                c.send_bytes(frame)


def run_raw(p: Params) -> Result:
    n = int(p["n"])
    size = int(p["batch"])
    items = list(range(n))
    ctx = context()
    t0 = time.perf_counter()
    conns: list[Any] = []
    procs: list[Any] = []
    try:
        for _ in range(int(p["workers"])):
            mine, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=fns.raw_worker, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            conns.append(mine)
            procs.append(proc)
        if p["mode"] in ("steady", "warm"):
            _pump(conns, _chunks(list(range(_warm_count(p))), size))
            time.sleep(SETTLE)
            t0 = time.perf_counter()
        _pump(conns, _chunks(items, size))
        t1 = time.perf_counter()
        for c in conns:
            c.send_bytes(b"")
        for proc in procs:
            proc.join(10.0)
        if p["mode"] in ("cold", "warm"):
            t1 = time.perf_counter()
        return _result(p, n, t1 - t0)
    finally:
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
                proc.join(1.0)
        for c in conns:
            c.close()
