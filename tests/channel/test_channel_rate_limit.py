"""qps_limit across workers and across channels.

The bound holds where sends are admitted, in the coordinator: every test counts the admissions
its limiter recorded (AdmissionLog) in whole windows against the bound. Send start times in the
workers lag their admissions by a pipe hop and a wake-up whose length depends on the machine's
load, so at the workers the tests check what holds whatever the load: no send starts before
its admission (the k-th send to start comes after the k-th admission).
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any, ClassVar

import pytest
from pyrate_limiter import Duration, Rate
from workerfns import Log, Recorder

import procdispatch as pd


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The largest number of events in any half-open interval [t, t + window)."""
    ts = sorted(times)
    return max((bisect.bisect_left(ts, t + window) - i for i, t in enumerate(ts)), default=0)


def max_spans_in_window(spans: list[tuple[float, float]], window: float = 1.0) -> int:
    """The largest number of (earliest, latest) spans lying wholly in a closed [s, s + window]:
    events whose instant is only known to lie within their span."""
    spans = sorted(spans)
    best = 0
    for i, (start, _) in enumerate(spans):
        inside = [hi for lo, hi in spans[i:] if lo <= start + window]
        best = max(best, sum(hi <= start + window for hi in inside))
    return best


def starts(log: Log) -> list[float]:
    return [r["t"] for r in log.read() if r["ev"] == "start"]


def assert_no_send_before_its_admission(
    sends: list[float], admitted: list[tuple[float, float]]
) -> None:
    """Every send is preceded by its own admission, so the k-th earliest send start is no
    earlier than the k-th earliest admission (clocks read to the microsecond: 1 ms of slack)."""
    assert len(sends) == len(admitted)
    firsts = sorted(lo for lo, _ in admitted)
    early = [(t, a) for t, a in zip(sorted(sends), firsts, strict=True) if t < a - 0.001]
    assert not early, early[:5]


def test_max_in_window_helper():
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5]) == 3
    assert max_in_window([]) == 0
    assert max_spans_in_window([(0.0, 0.0), (0.5, 0.6), (0.9, 1.1), (1.0, 1.0)]) == 3
    assert max_spans_in_window([]) == 0


class AdmissionLog(pd.RateLimiter):
    """A RateLimiter that records every token taken by ``reserve`` and not given back by
    ``refund`` (the two calls a channel's coordinator makes): its admission time when the
    limiter decided it under its lock, else (a take from the pool) the span of the call."""

    made: ClassVar[list[AdmissionLog]] = []

    def _setup(self, *args: Any) -> None:  # every way of making a limiter goes through here
        super()._setup(*args)
        AdmissionLog.made.append(self)
        self.entries: list[list[float]] = []  # [earliest ns, latest ns, still counted]
        self._mine = threading.local()

    def reserve(self, weight: int = 1, *, within: float = 0.0) -> float:
        called = time.monotonic_ns()
        delay = super().reserve(weight, within=within)
        if delay <= within:
            at = self._last_admit_ns
            entry = [called, time.monotonic_ns(), 1] if at is None else [at, at, 1]
            self.entries.append(entry)
            self._mine.__dict__.setdefault("stack", []).append(entry)
        return delay

    def refund(self, weight: int = 1) -> None:
        super().refund(weight)
        self._mine.stack.pop()[2] = 0  # this thread's latest reserve, as refund documents

    def admissions(self) -> list[tuple[float, float]]:
        return [(lo / 1e9, hi / 1e9) for lo, hi, counted in self.entries if counted]


@pytest.fixture
def recorded_limiters(monkeypatch: pytest.MonkeyPatch) -> list[AdmissionLog]:
    """Every limiter a channel builds from its qps_limit records its admissions."""
    from procdispatch._limiter import limiter as _ratelimit

    AdmissionLog.made = []
    monkeypatch.setattr(_ratelimit, "RateLimiter", AdmissionLog)
    return AdmissionLog.made


def test_qps_limit_holds_across_four_workers(tmp_path, make_channel, recorded_limiters):
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log), workers=4, batch_items_max=1, qps_limit=50, qps_burst=1, batch_age_max=0.01
    )
    ch.put_many(range(130))
    assert ch.close_and_drain(60)
    (limiter,) = recorded_limiters
    admitted = limiter.admissions()
    assert len(admitted) == 130
    assert max_spans_in_window(admitted, 1.0) <= 50 + 1  # rate + burst, in every whole second
    ts = starts(log)
    assert len(ts) == 130
    assert_no_send_before_its_admission(ts, admitted)
    assert ch.stats().batches_sent == 130


def test_two_channels_sharing_one_limiter_stay_under_it(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    with AdmissionLog(30, burst=2) as limiter:
        a = make_channel(Recorder(log), workers=2, batch_items_max=1, qps_limit=limiter)
        b = make_channel(Recorder(log), workers=2, batch_items_max=1, qps_limit=limiter)
        a.put_many(range(45))
        b.put_many(range(45))
        assert a.close_and_drain(60)
        assert b.close_and_drain(60)
        assert not limiter.closed  # the user's limiter is left open for them
        admitted = limiter.admissions()
    # Exactly at admission (both coordinators drew on the one budget); at the workers, as the
    # module docstring explains.
    assert len(admitted) == 90
    assert max_spans_in_window(admitted) <= 30 + 2
    # The spans are calls of a few microseconds: the check above counts (nearly) all of them.
    assert sum(hi - lo < 0.005 for lo, hi in admitted) >= 0.8 * len(admitted)
    ts = starts(log)
    assert len(ts) == 90
    assert_no_send_before_its_admission(ts, admitted)


def test_rate_windows_as_qps_limit(tmp_path, make_channel, recorded_limiters):
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log),
        workers=2,
        batch_items_max=1,
        qps_limit=[Rate(25, Duration.SECOND), Rate(40, 2 * Duration.SECOND)],
    )
    ch.put_many(range(60))
    assert ch.close_and_drain(60)
    (limiter,) = recorded_limiters
    admitted = limiter.admissions()
    assert len(admitted) == 60
    assert max_spans_in_window(admitted, 1.0) <= 25  # each window whole, at admission
    assert max_spans_in_window(admitted, 2.0) <= 40
    ts = starts(log)
    assert len(ts) == 60
    assert_no_send_before_its_admission(ts, admitted)


def test_batches_keep_filling_while_the_limit_holds_them_back(tmp_path, make_channel):
    log = Log(tmp_path / "log")
    ch = make_channel(Recorder(log), workers=2, batch_items_max=10, qps_limit=2, batch_age_max=60)
    ch.put_many(range(50))
    assert ch.close_and_drain(60)
    sent = [r["data"] for r in log.read() if r["ev"] == "sent"]
    assert sorted(x for d in sent for x in d) == list(range(50))
    assert all(len(d) == 10 for d in sent)  # full batches, not a send per item


@pytest.mark.needs("processes", why="the limiter is shared by worker processes")
def test_workers_pace_sub_requests_with_a_shared_limiter(tmp_path, make_channel):
    from workerfns import PacedSender

    log = Log(tmp_path / "log")
    with pd.RateLimiter(40, burst=1) as limiter:
        ch = make_channel(PacedSender(log, limiter), workers=2, batch_items_max=10)
        ch.put_many(range(60))
        assert ch.close_and_drain(60)
    subs = [r for r in log.read() if r["ev"] == "sub"]
    assert sorted(r["item"] for r in subs) == list(range(60))
    assert len({r["pid"] for r in subs}) == 2  # both workers drew on the one budget
    # Each token was taken between the call and its return: count the calls lying wholly in a
    # window (a worker delayed by the machine's load after its take shifts only its return).
    assert max_spans_in_window([(r["asked"], r["t"]) for r in subs]) <= 40 + 1
