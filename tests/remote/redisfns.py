"""A real redis-server for the tests of a Limiter shared through Redis, and what the tests
build on it: limiters whose admissions are recorded, a timestamping sink, the bound pyrate's
GCRA gives.

The server listens on a unix socket in a short temporary directory (a socket path must fit in
108 bytes), with persistence off; the test owns its process, so that it can stop it (SIGSTOP),
resume it, or start it late.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pyrate_limiter import GCRA, Limiter, Rate, RateItem, RedisStateStore, StateBucket
from workerfns import wait_for

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """One redis-server process on a unix socket; :meth:`start` may be called late."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pdredis")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                "0",
                "--unixsocket",
                self.socket,
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 20, "redis-server to answer on its socket")

    def _answers(self) -> bool:
        import redis

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with status {self.proc.returncode}")
        try:
            return bool(self.client(socket_timeout=1).ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def client(self, *, socket_timeout: float | None = 1.0, **kw: Any) -> Any:
        import redis

        return redis.Redis(unix_socket_path=self.socket, socket_timeout=socket_timeout, **kw)

    def stop_process(self) -> None:  # SIGSTOP: the server holds every connection, unanswered
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume_process(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM late
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# The fixtures live here, imported by the test modules that use them: a conftest.py in this
# directory would be found as the module ``conftest`` by worker processes of other test
# directories, which import the root one under that name (the directories share sys.path).


@pytest.fixture(name="redis_unstarted")
def redis_unstarted_fixture() -> Iterator[RedisServer]:
    """A redis-server the test starts itself (or never), stopped at teardown."""
    pytest.importorskip("redis", reason="redis-py is not installed (the project's redis extra)")
    if REDIS_SERVER is None:
        pytest.skip(
            "redis-server is not installed (Debian package redis-server; .ci/run installs it)"
        )
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(name="redis_server")
def redis_server_fixture(redis_unstarted: RedisServer) -> RedisServer:
    """A running redis-server on a unix socket, with persistence off."""
    redis_unstarted.start()
    return redis_unstarted


class StampedBucket(StateBucket):  # type: ignore[misc]
    """A StateBucket that appends the timestamp (epoch ms) of each unit it admits to a file:
    the instants at which pyrate's algorithm counted them."""

    def __init__(self, stamps: str, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.stamps = stamps

    def put(self, item: RateItem) -> bool:
        ok = bool(super().put(item))
        if ok:
            append_line(self.stamps, str(item.timestamp))
        return ok


def gcra_limiter(
    client: Any, key: str, per_second: int, *, stamps: str | None = None, buffer_ms: int = 50
) -> Limiter:
    """``per_second`` units a second, one at a time (burst 1), shared through ``key``."""
    rates = [Rate(per_second, 1000, burst=1)]
    store = RedisStateStore(client, key)
    bucket = (
        StateBucket(rates, GCRA(), store)
        if stamps is None
        else StampedBucket(stamps, rates, GCRA(), store)
    )
    return Limiter(bucket, buffer_ms=buffer_ms)


def gcra_bound(window_ms: float, per_second: int, burst: int = 1) -> int:
    """The most units pyrate's GCRA admits with timestamps inside a closed span of
    ``window_ms`` milliseconds.

    With emission interval E (microseconds per unit, rounded up) the state is a theoretical
    arrival time TAT; an arrival at ``now`` is admitted when ``max(TAT, now) + E - burst * E
    <= now``, and then ``TAT = max(TAT, now) + E``. Every admission raises TAT by at least E,
    and the first admission in the span leaves it at least ``t0 + E``: before the n-th one TAT
    is at least ``t0 + (n - 1) * E``, and admitting it at ``now <= t0 + window`` needs
    ``TAT <= now + (burst - 1) * E``. So ``n <= burst + window / E``, whatever the order in
    which clients' calls reach Redis.
    """
    emission_ms = math.ceil(1000 * 1000 / per_second) / 1000
    return burst + math.floor(window_ms / emission_ms + 1e-9)


def max_in_window(times: Sequence[float], window: float) -> int:
    """The largest number of ``times`` inside any closed span ``[t, t + window]``."""
    ts = sorted(times)
    best = 0
    j = 0
    for i, t in enumerate(ts):
        while j < len(ts) and ts[j] <= t + window:
            j += 1
        best = max(best, j - i)
    return best


def append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_floats(path: str | Path) -> list[float]:
    try:
        with open(path) as f:
            return [float(x) for x in f if x.endswith("\n")]
    except FileNotFoundError:
        return []


class StampSink:
    """send_fn that appends the wall-clock time of each send to a file (one line each)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, batch: Any) -> None:
        append_line(self.path, repr(time.time()))


def coordinator_main(socket: str, key: str, rate: int, items: int, out: str, start: str) -> None:
    """One coordinator of the shared-limit test, as a process of its own: a channel with one
    worker (so sends happen in token order), paced by the shared Limiter, sending ``items``
    one-item batches once the ``start`` file exists; a summary is written to ``out``."""
    import redis

    import procdispatch as pd

    client = redis.Redis(unix_socket_path=socket, socket_timeout=5)
    limiter = gcra_limiter(client, key, rate, stamps=out + ".stamps")
    sink = StampSink(out + ".sends")
    with pd.ProcessChannel(
        sink, workers=1, max_leases=1, batch_items_max=1, qps_limit=limiter
    ) as ch:
        wait_for(lambda: os.path.exists(start), 60, "the common start")
        ch.put_many(range(items))
    stats = ch.stats()
    with open(out, "w") as f:
        json.dump({"delivered": stats.items_delivered, "sent": stats.batches_sent}, f)
