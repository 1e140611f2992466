"""On the thread backend, send_fn and worker_init run on threads the drain waits for: a wait for
the drain made there raises, as one made from a callback does, instead of waiting for itself.
(The process backend runs them in another process, which holds no channel.)"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import procdispatch as pd


def _with_block(ch: pd.ProcessChannel[Any]) -> None:
    with ch:
        pass


async def _async_with_block(ch: pd.ProcessChannel[Any]) -> None:
    async with ch:
        pass


#: Waits made by a plain send_fn or worker_init.
SYNC_WAITS: dict[str, Callable[[pd.ProcessChannel[Any]], object]] = {
    "close_and_drain()": lambda ch: ch.close_and_drain(),
    "close_and_drain(5)": lambda ch: ch.close_and_drain(5),
    "wait_drained()": lambda ch: ch.wait_drained(),
    "wait_drained(5)": lambda ch: ch.wait_drained(5),
    "with": _with_block,
}
#: Awaits made by an async send_fn or worker_init (on the worker thread's event loop).
ASYNC_WAITS: dict[str, Callable[[pd.ProcessChannel[Any]], Any]] = {
    "aclose_and_drain()": lambda ch: ch.aclose_and_drain(),
    "aclose_and_drain(5)": lambda ch: ch.aclose_and_drain(5),
    "await_drained()": lambda ch: ch.await_drained(),
    "await_drained(5)": lambda ch: ch.await_drained(5),
    "async with": _async_with_block,
}


class Once:
    """Runs the wait once, on the first call, once the channel is known; keeps the outcome."""

    def __init__(self, wait: str) -> None:
        self.wait = wait
        self.known = threading.Event()
        self.ch: pd.ProcessChannel[Any] | None = None
        self.outcome: list[object] = []

    def channel(self) -> pd.ProcessChannel[Any] | None:
        if self.outcome:
            return None
        assert self.known.wait(30), "the test never gave the channel"
        return self.ch

    def run(self) -> None:
        ch = self.channel()
        if ch is not None:
            try:
                self.outcome.append(("returned", SYNC_WAITS[self.wait](ch)))
            except BaseException as exc:
                self.outcome.append(exc)

    async def arun(self) -> None:
        ch = self.channel()
        if ch is not None:
            try:
                self.outcome.append(("returned", await ASYNC_WAITS[self.wait](ch)))
            except BaseException as exc:
                self.outcome.append(exc)


def _check(once: Once, ch: pd.ProcessChannel[Any], where: str, fn: Callable[..., Any]) -> None:
    ch.close()  # refused waits do not close (the with blocks' do)
    assert ch.wait_drained(30)  # the channel went on and drained: nothing hung
    [err] = once.outcome
    assert isinstance(err, pd.ProcDispatchError), err
    text = str(err)
    if "with" in once.wait:
        article = "an" if once.wait == "async with" else "a"
        assert text.startswith(f"leaving {article} {once.wait} block of the channel cannot wait")
    else:
        method = once.wait.split("(", maxsplit=1)[0]
        assert text.startswith(f"{method}() cannot be called from {where} ({fn.__qualname__})")
    assert f"the drain waits for this worker's {where} to return" in text
    assert "would wait for itself" in text
    s = ch.stats()
    assert s.items_put == s.items_delivered == 3
    assert s.items_dropped == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wait", sorted(SYNC_WAITS) + sorted(ASYNC_WAITS))
def test_a_drain_wait_from_send_fn_on_a_thread_worker_raises(wait: str) -> None:
    once = Once(wait)
    if wait in SYNC_WAITS:

        def send(batch: pd.Batch[Any]) -> None:
            once.run()

        fn: Callable[..., Any] = send
    else:

        async def asend(batch: pd.Batch[Any]) -> None:
            await once.arun()

        fn = asend
    ch: pd.ProcessChannel[Any] = pd.ProcessChannel(fn, backend="thread", workers=1)
    once.ch = ch
    once.known.set()
    ch.put_many([1, 2, 3])
    _check(once, ch, "send_fn", fn)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wait", sorted(SYNC_WAITS) + sorted(ASYNC_WAITS))
def test_a_drain_wait_from_worker_init_on_a_thread_worker_raises(wait: str) -> None:
    once = Once(wait)
    if wait in SYNC_WAITS:

        def init() -> None:
            once.run()

        fn: Callable[..., Any] = init
    else:

        async def ainit() -> None:
            await once.arun()

        fn = ainit
    ch: pd.ProcessChannel[Any] = pd.ProcessChannel(
        lambda b: None, backend="thread", workers=1, worker_init=fn
    )
    once.ch = ch
    once.known.set()
    ch.put_many([1, 2, 3])
    _check(once, ch, "worker_init", fn)


@pytest.mark.timeout(60)
def test_a_thread_worker_may_wait_for_the_drain_of_another_channel() -> None:
    # Only the channel whose drain waits for this thread refuses: another drains normally.
    other: pd.ProcessChannel[Any] = pd.ProcessChannel(lambda b: None, backend="thread", workers=1)
    outcome: list[object] = []

    def send(batch: pd.Batch[Any]) -> None:
        if not outcome:
            other.put(1)
            outcome.append(other.close_and_drain(30))

    ch: pd.ProcessChannel[Any] = pd.ProcessChannel(send, backend="thread", workers=1)
    ch.put_many([1, 2])
    assert ch.close_and_drain(30)
    assert outcome == [True]
    assert other.stats().items_delivered == 1
