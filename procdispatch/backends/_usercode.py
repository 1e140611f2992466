"""The user's code as a worker runs it: ``worker_init`` once, then ``send_fn`` per batch, either
of them possibly asynchronous.

Theory of operation. A worker runs the user's code on one thread. When ``send_fn`` or
``worker_init`` is a coroutine function (or an object whose ``__call__`` is one, or a
``functools.partial`` of one), the worker makes one event loop as it starts, makes it that
thread's current loop, and runs ``worker_init`` on it, awaiting what it returns. Every send then
runs to completion on that same loop (``run_until_complete``), so the clients made in
``worker_init`` (sessions, connection pools) are used on the loop they were made on. A plain
callable that returns an awaitable is found out when it returns one: the loop is made then, and
kept. Between sends the loop does not run (the worker is waiting for its next lease), so the
background tasks of a client move on during sends only. When the worker ends, the loop's
remaining tasks are cancelled and awaited (for at most ``CLOSE_TIMEOUT`` seconds), its async
generators finalized, and the loop closed.

An asynchronous send is a send like any other: ``send_timeout`` and the end of ``cancel_grace``
kill its process (a thread worker, its loop with it, is abandoned).

asyncio is imported only by a worker whose code needs it, so that the others import light.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

__all__ = ["CLOSE_TIMEOUT", "UserCode", "lazy_kind"]

#: Seconds the tasks left on a worker's loop get to end after being cancelled at its exit.
CLOSE_TIMEOUT = 5.0
# Code flags (inspect.CO_*) of the functions whose call only builds an object.
_CO_GENERATOR = 0x20
_CO_COROUTINE = 0x80  # an ``async def``
_CO_ASYNC_GENERATOR = 0x200


class UserCode:
    """``send_fn`` and ``worker_init`` of one worker; constructing it runs ``worker_init``
    (what it raises is the worker's failed start)."""

    def __init__(
        self,
        send_fn: Callable[[Any], object],
        worker_init: Callable[[], object] | None,
    ) -> None:
        self._send_fn = send_fn
        self._loop: Any = None
        if _is_async(send_fn) or (worker_init is not None and _is_async(worker_init)):
            self._make_loop()
        if worker_init is not None:
            try:
                self._settle(worker_init())
            except BaseException:
                self.close()  # the worker ends here: a failed start
                raise

    def send(self, batch: Any) -> object:
        """What ``run_lease`` calls: ``send_fn``, awaited on the worker's loop when async."""
        return self._settle(self._send_fn(batch))

    def _settle(self, result: object) -> object:
        if result is None:
            return None  # the usual answer of a synchronous send: nothing to look into
        import inspect

        if not inspect.isawaitable(result):
            return result
        loop = self._loop if self._loop is not None else self._make_loop()
        return loop.run_until_complete(result)

    def _make_loop(self) -> Any:
        import asyncio

        self._loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        return loop

    def close(self) -> None:
        """End the worker's loop, if it has one; never raises (the worker is exiting)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        import asyncio

        try:
            with contextlib.suppress(Exception):
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in tasks:
                    t.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.wait(tasks, timeout=CLOSE_TIMEOUT))
                loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            with contextlib.suppress(Exception):
                asyncio.set_event_loop(None)
                loop.close()


def _is_async(fn: Callable[..., object]) -> bool:
    """Whether calling ``fn`` makes a coroutine, told from its code (no import of inspect)."""
    return bool(_flags_of(fn) & _CO_COROUTINE)


def lazy_kind(fn: object) -> str | None:
    """What calling ``fn`` only builds without running its body -- "a generator function",
    "an async generator function" or "a coroutine function" -- or None for a plain callable.
    Partials, bound methods and objects whose ``__call__`` is such a function count too."""
    flags = _flags_of(fn)
    if flags & _CO_GENERATOR:
        return "a generator function"
    if flags & _CO_ASYNC_GENERATOR:
        return "an async generator function"
    if flags & _CO_COROUTINE:
        return "a coroutine function"
    return None


def _flags_of(fn: object) -> int:
    """The code flags of what a call of ``fn`` runs first (0 when there is no code to read)."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__func__"):  # a bound method
            fn = fn.__func__
        else:
            break
    code = getattr(fn, "__code__", None)
    if code is None:  # an object: its __call__ decides
        call = type(fn).__call__ if callable(fn) else None
        code = getattr(call, "__code__", None)
    flags = getattr(code, "co_flags", 0)
    return flags if isinstance(flags, int) else 0
