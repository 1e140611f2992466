"""asyncio producers: what ``aput``, ``aput_many``, ``await_drained``, ``aclose_and_drain`` and
``async with`` of :class:`~procdispatch.ProcessChannel` do.

Theory of operation. Nothing here blocks the event loop, and no blocking ``put`` runs in a
thread (a thread's put cannot be taken back when the awaiting task is cancelled). An ``aput``
commits its item with the admission's non-blocking path (``put_nowait``'s: one lock round that
either appends the item to the pending list or leaves it out), and no ``await`` comes between
that commit and the return. When the buffer is full, the ``aput`` registers a
:class:`_LoopWaiter` with the admission, tries once more (room freed between the failed try and
the registration would otherwise go unnoticed), and awaits the waiter's future. Whatever frees
room (the coordinator publishing deliveries or drops, a close, a fatal error) releases every
registered waiter; a waiter's ``release`` only hands the future's result to its loop with
``call_soon_threadsafe``. So a CancelledError can only arise while the item is outside the
channel: ``aput`` is cancellation-atomic. ``aput_many`` commits what fits at each try and, on any
early exit (a cancellation included), tells how many items it added as ``exc.added``.

Fairness. There is no queue. When room appears, every waiting producer -- a ``put`` blocked in a
thread, an ``aput`` waiting on any event loop -- is woken, and they take the room in the order
they reach the admission's lock. Neither kind has priority, and a producer that came later may
overtake one that waited; the ``aput``s of one loop retry in the order they began waiting.

Draining. ``await_drained`` registers the same kind of waiter on the drained latch: no thread,
and a cancelled wait leaves nothing registered.

Waits that would wait for themselves. A callback on the coordinator thread (``on_error``,
``on_drop``, ``on_delivered``, ``on_drained``, the retry policy) may run an event loop there, with
``asyncio.run``: an await of a waiter there would block the only thread that can release it. So
each of these calls checks, at the moment it would wait (after its timeout was checked, and
after a try that may not need to wait), what the synchronous waits check, and raises the same
error, naming itself and the callback: a ``BufferFull`` for ``aput`` and ``aput_many``, a
``ProcDispatchError`` for the drain waits (from the ``progress`` callable's thread as well, since
the drain waits for its last report). An ``aput`` with room, like a ``put`` with room, is fine.

``async with``. A normal exit awaits ``aclose_and_drain``. An exception or a cancellation in the
block cancels the channel (as Ctrl-C does in ``with``; there, an ordinary exception drains) and
awaits the end of the sends in flight (``cancel_grace``); a cancellation during that wait ends
them at once and propagates. Under a SIGTERM drain (``drain_on_sigterm``) the block drains until
that drain's deadline instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import _process_end
from ._progress import sized_length
from ._waits import check_timeout
from .errors import BufferFull

if TYPE_CHECKING:
    from ._admission import Admission
    from ._channel import ProcessChannel
    from ._ending import Ending

__all__ = ["aexit", "await_drained", "close_and_drain", "put_many", "put_one"]

log = logging.getLogger("procdispatch")
monotonic = time.monotonic


class _LoopWaiter:
    """A waiter for the admission or the drained latch, woken from any thread: ``release``
    schedules the future's result on its loop, and neither blocks nor raises."""

    __slots__ = ("fut", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fut: asyncio.Future[None] = loop.create_future()

    def release(self) -> None:
        # A closed loop raises RuntimeError: nothing awaits the future any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_resolve, self.fut)

    async def wait(self, deadline: float | None) -> None:
        """Until released, or until ``deadline`` (a ``time.monotonic()`` instant)."""
        if deadline is None:
            await self.fut
            return
        timer = self.loop.call_later(max(0.0, deadline - monotonic()), _resolve, self.fut)
        try:
            await self.fut
        finally:
            timer.cancel()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # a cancelled wait, or the timer and a release both came
        fut.set_result(None)


def _deadline(method: str, timeout: float | None) -> float | None:
    seconds = check_timeout(method, timeout)  # the rules of put's timeout
    return None if seconds is None else monotonic() + seconds


def _try(adm: Admission, items: list[Any], sizes: list[int] | None, start: int) -> int:
    """Commit what fits now of ``items[start:]`` and return how many; anything but a full
    buffer raises, with ``exc.added`` counted from ``items[0]``."""
    try:
        rest = items[start:]  # a list of its own: the admission may keep it
        return adm.admit(rest, None if sizes is None else sizes[start:], block=False, deadline=None)
    except BufferFull as full:
        return int(full.added)  # type: ignore[attr-defined]
    except Exception as exc:
        exc.added = start + getattr(exc, "added", 0)  # type: ignore[attr-defined]
        raise


async def _admit(
    adm: Admission,
    items: list[Any],
    sizes: list[int] | None,
    deadline: float | None,
    method: str,
) -> int:
    """Add ``items`` in order, awaiting room under BlockNewItems; see the module docstring."""
    n = len(items)
    added = 0
    waiter: _LoopWaiter | None = None
    try:
        while True:
            added += _try(adm, items, sizes, added)
            if added == n:
                return n
            if waiter is None:
                if adm.coordinator_ident == threading.get_ident():
                    # As put() there: a timeout already over is a timeout, anything else a
                    # wait for room that only this thread could make.
                    if deadline is not None and monotonic() >= deadline:
                        raise TimeoutError("put timed out: buffer is full")
                    err = adm.wait_for_itself(method)
                    err.added = added  # type: ignore[attr-defined]
                    raise err
                # Registered before the next try, so that no release can fall between them.
                waiter = _LoopWaiter(asyncio.get_running_loop())
                adm.add_waiter(waiter)
                continue
            if deadline is not None and monotonic() >= deadline:
                raise TimeoutError("put timed out: buffer is full")
            await waiter.wait(deadline)  # the only await: nothing is committed across it
            adm.remove_waiter(waiter)  # (a release already took it off the list)
            waiter = None
    except (asyncio.CancelledError, TimeoutError) as exc:
        exc.added = added  # type: ignore[union-attr]
        raise
    finally:
        if waiter is not None:
            adm.remove_waiter(waiter)


async def put_one(ch: ProcessChannel[Any], item: Any, timeout: float | None) -> None:
    """``aput``: the non-blocking commit first, and the waiting path only when it is full."""
    deadline = _deadline("aput", timeout)
    size = ch._size_of(item) if ch._item_size is not None else None
    adm = ch._adm
    try:
        adm.put_one(item, size=size, block=False)
        return
    except BufferFull:
        pass
    await _admit(adm, [item], None if size is None else [size], deadline, "aput")


async def put_many(ch: ProcessChannel[Any], items: Iterable[Any], timeout: float | None) -> int:
    """``aput_many``: as ``put_many``, the items measured first; an item that cannot be
    measured stops the call after the ones before it were added."""
    deadline = _deadline("aput_many", timeout)  # before the iterable is consumed
    progress = ch._progress
    if progress is not None:
        n = sized_length(items)
        if n is not None:
            progress.announce(n)
    batch = list(items)
    adm = ch._adm
    if ch._item_size is None:
        return await _admit(adm, batch, None, deadline, "aput_many")
    sizes: list[int] = []
    try:
        for item in batch:
            sizes.append(ch._size_of(item))
    except Exception as exc:
        good = len(sizes)
        exc.added = await _admit(  # type: ignore[attr-defined]
            adm, batch[:good], sizes, deadline, "aput_many"
        )
        raise
    return await _admit(adm, batch, sizes, deadline, "aput_many")


async def await_drained(end: Ending, timeout: float | None) -> bool:
    """``await_drained``: True once drained, False at the timeout."""
    end.check_not_inherited()
    seconds = check_timeout("await_drained", timeout)
    if seconds != 0 and not end.adm.drained.is_set():
        end.check_can_wait("await_drained() cannot be called")
    return await _drained(end, seconds)


async def close_and_drain(end: Ending, timeout: float | None) -> bool:
    """``aclose_and_drain``: the timeout checked, and the wait allowed, before it closes."""
    end.check_not_inherited()
    seconds = check_timeout("aclose_and_drain", timeout)
    if seconds != 0 and not end.adm.drained.is_set():
        end.check_can_wait("aclose_and_drain() cannot be called")
    end.close()
    ok = await _drained(end, seconds)
    if ok:
        end.raise_after_drain()
    return ok


async def _drained(end: Ending, seconds: float | None) -> bool:
    """Await the drain for ``seconds`` (None: for ever), without any check."""
    latch = end.adm.drained
    if latch.is_set():
        return True
    deadline = None if seconds is None else monotonic() + seconds
    waiter = _LoopWaiter(asyncio.get_running_loop())
    if not latch.add_waiter(waiter):
        return True
    try:
        await waiter.wait(deadline)
    finally:
        latch.remove_waiter(waiter)
    return latch.is_set()


async def aexit(end: Ending, exc_type: type[BaseException] | None) -> None:
    """The end of ``async with``; see the module docstring."""
    if end.adm.inherited_by_fork:
        return  # nothing of it runs in this process
    err = end.reentry("leaving an async with block of the channel cannot wait")
    if err is not None:
        # In a callback: end the channel as the block would, but do not wait for it.
        if exc_type is None:
            end.close()
        else:
            end.cancel()
        raise err
    if exc_type is not None:
        deadline = _process_end.sigterm_deadline()
        if deadline is not None and issubclass(exc_type, (SystemExit, asyncio.CancelledError)):
            end.close()
            if not await _drained(end, max(0.0, deadline - monotonic())):
                await _cancel_and_wait(end, "SIGTERM drain timed out")
            return
        await _cancel_and_wait(end, f"{exc_type.__name__} in the async with block")
        return
    try:
        end.close()
        await _drained(end, None)
    except BaseException as interrupt:
        await _cancel_and_wait(end, f"{type(interrupt).__name__} while draining")
        raise
    end.raise_after_drain()


async def _cancel_and_wait(end: Ending, why: str) -> None:
    """Cancel, say what is waited for, and await the drain; a cancellation of that wait ends
    the sends still in flight at once (their batches still reach on_drop), then propagates."""
    end.cancel()
    adm = end.adm
    n = adm.snapshot().batches_in_flight
    if n:
        log.warning(
            "%s: channel cancelled; waiting up to %.1fs (cancel_grace) for %d send(s) in "
            "flight; cancel the task again to stop them now (their batches are dropped)",
            why,
            end.opts.cancel_grace,
            n,
        )
    try:
        await _drained(end, None)
    except asyncio.CancelledError:
        n = adm.snapshot().batches_in_flight
        log.warning("cancelled again: stopping %d send(s) in flight now", n)
        adm.request_cancel(kill=True)
        await _drained(end, None)
        raise
