"""qps_limit as a pyrate-limiter Limiter over a real redis-server, on every backend: what the
options accept, sends paced by Redis, Redis down at construction, a stalled Redis (SIGSTOP)
that delays sends but never cancel or a drain's deadline, and the helper thread's end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pyrate_limiter import GCRA, Limiter, Rate, RedisBucket, RedisStateStore, StateBucket
from redisfns import (  # noqa: F401 (fixtures: imported, not in a conftest; see redisfns)
    RedisServer,
    StampSink,
    gcra_limiter,
    read_floats,
    redis_server_fixture,
    redis_unstarted_fixture,
)
from workerfns import noop, wait_for

import procdispatch as pd

redis = pytest.importorskip("redis", reason="redis-py is not installed (the redis extra)")


def _no_retry_client(server: RedisServer, socket_timeout: float) -> Any:
    """A client that reports a timeout at once (redis-py retries a timed-out call itself
    otherwise, several times)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return server.client(socket_timeout=socket_timeout, retry=Retry(NoBackoff(), 0))


# ---- options ---------------------------------------------------------------------------


def test_qps_burst_with_a_limiter_is_an_options_error(redis_unstarted: RedisServer) -> None:
    limiter = gcra_limiter(redis_unstarted.client(), "k", 10)
    with pytest.raises(pd.OptionsError, match=r"qps_burst must be left at 1 .*\(got 3\)"):
        pd.ProcessChannel(noop, qps_limit=limiter, qps_burst=3)


def test_a_client_without_socket_timeout_is_an_options_error(
    redis_unstarted: RedisServer,
) -> None:
    limiter = gcra_limiter(redis_unstarted.client(socket_timeout=None), "k", 10)
    with pytest.raises(pd.OptionsError, match=r"socket_timeout .*\(got socket_timeout=None"):
        pd.ProcessChannel(noop, qps_limit=limiter)


def test_an_async_client_is_an_options_error(redis_unstarted: RedisServer) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis(unix_socket_path=redis_unstarted.socket, socket_timeout=1)
    bucket = StateBucket([Rate(10, 1000)], GCRA(), RedisStateStore(client, "k"))
    with pytest.raises(pd.OptionsError, match="synchronous redis client"):
        pd.ProcessChannel(noop, qps_limit=Limiter(bucket))


def test_min_qps_above_the_limiter_s_rate_is_an_options_error(
    redis_unstarted: RedisServer,
) -> None:
    limiter = gcra_limiter(redis_unstarted.client(), "k", 10)
    with pytest.raises(pd.OptionsError, match=r"min_qps must be <= qps_limit \(10 per second\)"):
        pd.ProcessChannel(noop, qps_limit=limiter, min_qps=20)


# ---- sends through Redis ---------------------------------------------------------------


def test_sends_take_their_tokens_from_redis(
    make_channel: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    stamps = str(tmp_path / "stamps")
    limiter = gcra_limiter(redis_server.client(), "paced", 40, stamps=stamps, buffer_ms=0)
    sink = StampSink(str(tmp_path / "sends"))
    asked = _commands(redis_server)
    ch = make_channel(sink, workers=2, batch_items_max=1, qps_limit=limiter)
    tokens = ch._coord._limiter
    ch.put_many(range(20))
    assert ch.close_and_drain(60)
    assert ch.stats().items_delivered == 20
    assert len(read_floats(tmp_path / "sends")) == 20
    assert 20 <= len(read_floats(stamps)) <= 21  # admitted by the Redis bucket; one spare
    # The shared state lives in Redis: a round trip to it per token (its key may have expired
    # since, once the bucket was full again).
    assert _commands(redis_server) - asked >= 20
    wait_for(lambda: not tokens.thread.is_alive(), what="the helper thread to end")
    assert limiter.try_acquire(blocking=False) in (True, False)  # the Limiter is still open


def test_a_redis_bucket_sliding_log_works_too(make_channel: Any, redis_server: RedisServer) -> None:
    client = redis_server.client()
    limiter = Limiter(RedisBucket.init([Rate(10, 1000)], client, "log"))
    ch = make_channel(noop, workers=1, batch_items_max=1, qps_limit=limiter)
    ch.put_many(range(12))
    assert ch.close_and_drain(60)
    assert ch.stats().items_delivered == 12
    assert 12 <= client.zcard("log") <= 13  # one entry per token, one spare at most


def test_redis_down_at_construction_sends_wait_then_go(
    make_channel: Any, redis_unstarted: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = gcra_limiter(_no_retry_client(redis_unstarted, 1.0), "late", 50, buffer_ms=0)
    with caplog.at_level(logging.WARNING, logger="procdispatch"):
        ch = make_channel(noop, workers=2, batch_items_max=1, qps_limit=limiter)
        ch.put_many(range(5))
        wait_for(
            lambda: any("Limiter failed" in r.getMessage() for r in caplog.records),
            what="the WARNING that the Limiter fails",
        )
        assert ch.stats().items_delivered == 0  # no token without Redis
        redis_unstarted.start()
        assert ch.close_and_drain(60)
    assert ch.stats().items_delivered == 5
    failed = [r.getMessage() for r in caplog.records if "Limiter failed" in r.getMessage()]
    assert len(failed) == 1, failed  # rate-limited: not one per attempt
    assert "ConnectionError" in failed[0]
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_cancel_while_redis_is_down(make_channel: Any, redis_unstarted: RedisServer) -> None:
    limiter = gcra_limiter(_no_retry_client(redis_unstarted, 1.0), "down", 50)
    ch = make_channel(noop, workers=1, batch_items_max=1, qps_limit=limiter)
    tokens = ch._coord._limiter
    ch.put_many(range(5))
    wait_for(lambda: tokens.thread is not None, what="the helper thread")
    assert not ch.close_and_drain(timeout=0.2)
    ch.cancel()
    assert ch.wait_drained(30)
    assert ch.stats().items_dropped == 5
    wait_for(lambda: not tokens.thread.is_alive(), what="the helper thread to end")


def test_a_stalled_redis_delays_sends_never_cancel(
    make_channel: Any, redis_server: RedisServer
) -> None:
    # A socket timeout far beyond the test's deadlines: a loop that waited on Redis would show.
    limiter = gcra_limiter(_no_retry_client(redis_server, 60.0), "stall", 50, buffer_ms=0)
    ch = make_channel(noop, workers=1, batch_items_max=1, qps_limit=limiter, cancel_grace=5.0)
    tokens = ch._coord._limiter
    ch.put(0)
    wait_for(lambda: ch.stats().items_delivered == 1, what="the first send")
    redis_server.stop_process()
    try:
        ch.put_many(range(1, 6))
        assert not ch.close_and_drain(timeout=0.5)  # sends wait for tokens
        assert ch.stats().items_delivered <= 2  # the spare, at most, went
        ch.cancel()
        assert ch.wait_drained(30)  # with Redis still stopped
        s = ch.stats()
        assert (s.items_delivered + s.items_dropped, s.items_dropped >= 4) == (6, True)
        assert tokens.thread.is_alive()  # its call waits on the stopped server
    finally:
        redis_server.resume_process()
    wait_for(lambda: not tokens.thread.is_alive(), what="the helper thread to end")


def test_sends_resume_after_a_stall(make_channel: Any, redis_server: RedisServer) -> None:
    limiter = gcra_limiter(_no_retry_client(redis_server, 60.0), "resume", 50, buffer_ms=0)
    ch = make_channel(noop, workers=2, batch_items_max=1, qps_limit=limiter)
    ch.put(0)
    wait_for(lambda: ch.stats().items_delivered == 1, what="the first send")
    redis_server.stop_process()
    try:
        ch.put_many(range(1, 8))
        assert ch.stats().items_delivered <= 2
    finally:
        redis_server.resume_process()
    assert ch.close_and_drain(60)
    assert ch.stats().items_delivered == 8


def test_a_stall_past_the_socket_timeout_is_logged_and_retried(
    make_channel: Any, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = gcra_limiter(_no_retry_client(redis_server, 0.2), "timeout", 50, buffer_ms=0)
    with caplog.at_level(logging.WARNING, logger="procdispatch"):
        ch = make_channel(noop, workers=2, batch_items_max=1, qps_limit=limiter)
        ch.put(0)
        wait_for(lambda: ch.stats().items_delivered == 1, what="the first send")
        redis_server.stop_process()
        try:
            ch.put_many(range(1, 6))
            wait_for(
                lambda: any("Limiter failed" in r.getMessage() for r in caplog.records),
                what="the WARNING that the Limiter timed out",
            )
        finally:
            redis_server.resume_process()
        assert ch.close_and_drain(60)
    assert ch.stats().items_delivered == 6
    failed = [r.getMessage() for r in caplog.records if "Limiter failed" in r.getMessage()]
    assert "TimeoutError" in failed[0]


def _commands(server: RedisServer) -> int:
    """The commands the Redis server has processed so far (this INFO call not included)."""
    return int(server.client().info("stats")["total_commands_processed"])
