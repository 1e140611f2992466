"""Asynchronous send functions and worker inits used by the asyncio tests: importable in
worker processes.

Per-worker state lives in a ``threading.local``: a process worker has one thread running the
user's code, and a thread worker is a thread of the test's process, so either way each worker
sees its own client.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from workerfns import Log

import procdispatch as pd

_state = threading.local()


class FakeClient:
    """Stands for an asyncio client (a session, a pool): usable only on the loop it was made
    on, as such clients are."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sent = 0

    async def post(self, rows: list[Any]) -> None:
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("the client is used on another event loop than its own")
        await asyncio.sleep(0)
        self.sent += len(rows)


class AsyncInit:
    """An async worker_init: makes the worker's client, and starts a background task that logs
    its cancellation (which happens when the worker's loop is closed at its exit)."""

    def __init__(self, log: Log) -> None:
        self.log = log

    async def __call__(self) -> None:
        _state.client = FakeClient()
        _state.background = asyncio.ensure_future(self._background())
        self.log.write(ev="init", pid=os.getpid(), worker=_worker_id(), loop=id(_state.client.loop))

    async def _background(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.log.write(ev="loop-closing", pid=os.getpid(), worker=_worker_id())
            raise


class AsyncSender:
    """An async send_fn posting each batch with the worker's client, then logging it."""

    def __init__(self, log: Log) -> None:
        self.log = log

    async def __call__(self, batch: pd.Batch[Any]) -> None:
        client: FakeClient = _state.client
        await client.post(batch.data)
        self.log.write(
            ev="sent",
            pid=os.getpid(),
            worker=_worker_id(),
            loop=id(asyncio.get_running_loop()),
            data=list(batch.data),
            synthetic=batch.synthetic,
        )


class ReturnsAwaitable:
    """A plain callable whose result is an awaitable: it runs on the worker's loop too."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def __call__(self, batch: pd.Batch[Any]) -> Any:
        return self._send(list(batch.data))

    async def _send(self, data: list[Any]) -> None:
        await asyncio.sleep(0)
        loop = id(asyncio.get_running_loop())
        self.log.write(ev="sent", worker=_worker_id(), loop=loop, data=data, synthetic=False)


async def sleep_forever(batch: pd.Batch[Any]) -> None:
    await asyncio.Event().wait()


def _worker_id() -> str:
    return f"{os.getpid()}-{threading.get_ident()}"


async def failing_init() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("no client")
