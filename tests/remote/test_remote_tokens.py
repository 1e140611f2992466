"""The token source over a pyrate-limiter Limiter, with in-process Limiters (no Redis): the
hand-over through the wake-up, at most one spare, failures retried with backoff and logged
once per run, the helper thread's end, and a channel whose Limiter stalls."""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import pytest
from pyrate_limiter import InMemoryBucket, Limiter, Rate, RateItem
from workerfns import noop, wait_for

from procdispatch._limiter import remote
from procdispatch._limiter.remote import RemoteTokens


class ScriptedLimiter(Limiter):  # type: ignore[misc]
    """A Limiter whose answers the test decides: grant, deny, raise, or stall until let go.
    Counts what it granted, and records the threads that called it."""

    def __init__(self) -> None:
        super().__init__(InMemoryBucket([Rate(1000, 1000)]))
        self.mode = "grant"
        self.granted = 0
        self.calls = 0
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def try_acquire(self, name: str = "pyrate", weight: int = 1, **kw: Any) -> Any:
        with self.lock:
            self.calls += 1
            self.threads.add(threading.current_thread().name)
            mode = self.mode
        if mode == "stall":
            self.release.wait(60)
            mode = "grant"
        if mode == "raise":
            raise ConnectionError("redis is down (scripted)")
        if mode == "deny":
            return False
        if mode == "awaitable":

            async def never() -> bool:
                return True

            return never()
        with self.lock:
            self.granted += 1
        return True


def _source(limiter: Any) -> tuple[RemoteTokens, threading.Event]:
    woke = threading.Event()
    return RemoteTokens(limiter, woke.set), woke


def test_a_token_goes_to_the_loop_through_its_wake_up() -> None:
    limiter = ScriptedLimiter()
    tokens, woke = _source(limiter)
    try:
        assert tokens.reserve() == math.inf  # none held: not before a wake-up
        assert woke.wait(20)
        assert tokens.reserve() == 0.0
        assert tokens.thread is not None
        assert tokens.thread.name == "procdispatch-qps-tokens"
    finally:
        tokens.close()


def test_at_most_one_token_is_held_ahead_of_need() -> None:
    limiter = ScriptedLimiter()
    tokens, woke = _source(limiter)
    taken = 0
    try:
        for _ in range(200):
            woke.clear()
            if tokens.reserve() == 0.0:
                taken += 1
            else:
                assert woke.wait(20)
            # Granted tokens are the ones taken, plus at most the one spare.
            assert taken <= limiter.granted <= taken + 1
        wait_for(lambda: limiter.granted == taken + 1, what="the spare fetched")
        assert limiter.granted == taken + 1
        # A refund (a token handed out, not used) is the spare again: nothing is fetched.
        assert tokens.reserve() == 0.0
        tokens.refund()
        assert tokens.reserve() == 0.0
        wait_for(lambda: limiter.granted == taken + 2, what="the next spare")
    finally:
        tokens.close()


def test_failures_are_retried_and_logged_once_per_run(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "BACKOFF_MIN", 0.001)
    limiter = ScriptedLimiter()
    limiter.mode = "raise"
    tokens, woke = _source(limiter)
    try:
        with caplog.at_level(logging.WARNING, logger="procdispatch"):
            assert tokens.reserve() == math.inf
            wait_for(lambda: limiter.calls >= 5, what="five failed calls")
            limiter.mode = "grant"
            assert woke.wait(20)
            assert tokens.reserve() == 0.0
        failed = [r for r in caplog.records if "Limiter failed" in r.getMessage()]
        again = [r for r in caplog.records if "answers again" in r.getMessage()]
        assert len(failed) == 1, [r.getMessage() for r in failed]  # not one per attempt
        assert "ConnectionError: redis is down (scripted)" in failed[0].getMessage()
        assert failed[0].levelno == logging.WARNING
        assert len(again) == 1
    finally:
        tokens.close()


def test_backoff_grows_and_is_capped() -> None:
    failures = remote._Failures()
    pauses = [failures.failed(ConnectionError("down")) for _ in range(12)]
    assert pauses[0] == remote.BACKOFF_MIN
    assert pauses[1] == 2 * remote.BACKOFF_MIN
    assert pauses == sorted(pauses)
    assert pauses[-1] == remote.BACKOFF_MAX


@pytest.mark.parametrize("mode", ["raise", "deny"])
def test_close_ends_the_helper_while_it_waits(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Waits far longer than the test's deadline: only close() can end them in time.
    monkeypatch.setattr(remote, "BACKOFF_MIN", 600.0)
    monkeypatch.setattr(remote, "BACKOFF_MAX", 600.0)
    monkeypatch.setattr(remote, "SLICE", 600.0)
    limiter = ScriptedLimiter()
    limiter.mode = mode
    tokens = RemoteTokens(limiter, lambda: None, per_second=1 / 600)
    tokens.reserve()
    wait_for(lambda: limiter.calls >= 1, what="the first call")
    tokens.close()
    assert tokens.thread is not None
    tokens.thread.join(30)
    assert not tokens.thread.is_alive()
    assert limiter.calls == 1


def test_an_awaitable_answer_is_an_error_not_a_hang(caplog: pytest.LogCaptureFixture) -> None:
    limiter = ScriptedLimiter()
    limiter.mode = "awaitable"
    tokens, _ = _source(limiter)
    try:
        with caplog.at_level(logging.WARNING, logger="procdispatch"):
            tokens.reserve()
            wait_for(
                lambda: any("awaitable" in r.getMessage() for r in caplog.records),
                what="the warning",
            )
    finally:
        tokens.close()


def test_the_bucket_s_retry_after_paces_the_calls() -> None:
    # A bucket that admits one unit a second: after a denial the helper waits what the
    # bucket says (up to SLICE), not a busy loop of calls.
    bucket = InMemoryBucket([Rate(1, 1000)])
    limiter = Limiter(bucket, buffer_ms=0)
    assert limiter.try_acquire(blocking=False)
    tokens = RemoteTokens(limiter, lambda: None, bucket=bucket, per_second=1.0)
    try:
        assert not limiter.try_acquire(blocking=False)
        wait = tokens._denied_wait()
        assert 0 < wait <= remote.SLICE
        ms = bucket.waiting(RateItem("x", bucket.now(), 1))
        assert wait == pytest.approx(min(remote.SLICE, ms / 1000), abs=0.01)
    finally:
        tokens.close()


# ---- a channel over a Limiter, on every backend ----------------------------------------


def test_the_channel_calls_the_limiter_only_on_its_helper_thread(make_channel: Any) -> None:
    limiter = ScriptedLimiter()
    ch = make_channel(noop, workers=2, batch_items_max=1, qps_limit=limiter)
    tokens = ch._coord._limiter
    ch.put_many(range(30))
    assert ch.close_and_drain(60)
    assert ch.stats().items_delivered == 30
    assert limiter.threads == {"procdispatch-qps-tokens"}
    assert 30 <= limiter.granted <= 31  # one spare at most
    wait_for(lambda: not tokens.thread.is_alive(), what="the helper thread to end")


def test_a_stalled_limiter_delays_sends_never_cancel(make_channel: Any) -> None:
    limiter = ScriptedLimiter()
    ch = make_channel(noop, workers=1, batch_items_max=1, qps_limit=limiter, cancel_grace=5.0)
    tokens = ch._coord._limiter
    ch.put(0)
    wait_for(lambda: ch.stats().items_delivered == 1, what="the first send")
    limiter.mode = "stall"  # the spare, if fetched already, is the last token
    ch.put_many(range(1, 6))
    try:
        assert not ch.close_and_drain(timeout=0.5)  # sends wait for tokens
        assert ch.stats().items_delivered <= 2
        ch.cancel()
        assert ch.wait_drained(30)  # while the Limiter still stalls (it would for 60 s)
        s = ch.stats()
        assert s.items_delivered + s.items_dropped == 6
        assert s.items_dropped >= 4
        assert tokens.thread.is_alive()  # still inside the stalled call
    finally:
        limiter.release.set()
    wait_for(lambda: not tokens.thread.is_alive(), what="the helper thread to end")


def test_a_stalled_limiter_resumes(make_channel: Any) -> None:
    limiter = ScriptedLimiter()
    ch = make_channel(noop, workers=2, batch_items_max=1, qps_limit=limiter)
    ch.put(0)
    wait_for(lambda: ch.stats().items_delivered == 1, what="the first send")
    limiter.mode = "stall"
    ch.put_many(range(1, 10))
    assert ch.stats().items_delivered <= 2
    limiter.mode = "grant"
    limiter.release.set()
    assert ch.close_and_drain(60)
    assert ch.stats().items_delivered == 10
