from __future__ import annotations

from collections.abc import Iterator

import pytest
from redisfns import REDIS_SERVER, RedisServer


@pytest.fixture
def redis_unstarted() -> Iterator[RedisServer]:
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


@pytest.fixture
def redis_server(redis_unstarted: RedisServer) -> RedisServer:
    """A running redis-server on a unix socket, with persistence off."""
    redis_unstarted.start()
    return redis_unstarted
