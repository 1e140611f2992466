"""A rate limit shared by many hosts: a pyrate-limiter ``Limiter`` as ``qps_limit``.

Theory of operation. The coordinator consults its limiter on its own loop, which must never
block; a pyrate-limiter ``Limiter`` over a Redis bucket costs a network round trip per token,
and a stalled server can hold a call for as long as the client's socket timeout. So the
Limiter is never called on the loop: :class:`RemoteTokens` runs it on a helper thread of its
own and hands the loop whole tokens, through the same two calls the loop makes of a
:class:`~procdispatch.RateLimiter` (:class:`TokenSource`).

* The loop's :meth:`RemoteTokens.reserve` is a flag check under a lock: a token held is taken
  (0.0); otherwise nothing is taken and the answer is ``inf``, "not before a wake-up", and the
  helper is asked for one. The loop then waits on its other deadlines only (send timeouts,
  cancel grace, expiry), so a slow Limiter delays sends and nothing else.
* The helper acquires one token at a time, only while the loop wants one and none is held, and
  when it gets one it rouses the loop through the channel's wake-up pipe (the ``wake``
  callback). Taking a token asks for the next, so one is fetched just ahead of need: at most
  one spare per channel. pyrate buckets have no refund, so a spare the channel never uses is
  spent; and a spare used later than it was acquired can add one send per channel to what the
  Limiter's own bound allows in a window.
* The helper calls ``Limiter.try_acquire(blocking=False)``, each call with a fresh timestamp,
  and waits between calls itself, on its own condition (so that closing interrupts the wait):
  as long as the Limiter's bucket says (``bucket.waiting()``, the retry-after of its last
  answer) when the Limiter is ``Limiter(bucket)``, else one interval of the tightest rate;
  never longer than ``SLICE``. The Limiter's own blocking loop is not used: it re-puts an
  item whose timestamp it advances by the time it meant to sleep, so that under contention
  the stamps fall behind the clock and a share of the rate is lost; its ``buffer_ms`` has no
  part here. A call that raises (Redis down, refused, timed out) is retried with exponential
  backoff; the first failure of a run is logged at WARNING, then at most one WARNING per
  ``LOG_EVERY`` seconds while it lasts, and the recovery once.
* :meth:`RemoteTokens.close` (the coordinator's shutdown) tells the helper to stop and returns
  at once: the helper ends as soon as its current call returns, which the client's socket
  timeout bounds. The user's Limiter stays open: it is theirs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import OptionsError

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "LOG_EVERY",
    "SLICE",
    "RemoteLimit",
    "RemoteTokens",
    "TokenSource",
    "remote_limit",
]

log = logging.getLogger("procdispatch")

#: Longest wait between two ``Limiter.try_acquire`` calls the Limiter denied, in seconds.
SLICE = 0.5
#: First and longest pause after a Limiter call that raised, in seconds.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
#: While the Limiter keeps failing, at most one WARNING per this many seconds.
LOG_EVERY = 30.0
#: Shortest wait after a denial, in seconds (the bucket's retry-after has a 1 ms grain).
MIN_DENIED = 0.001


class TokenSource(Protocol):
    """What the coordinator asks of its limiter: a :class:`~procdispatch.RateLimiter` and
    :class:`RemoteTokens` both are one."""

    def reserve(self, weight: int = 1, *, within: float = 0.0) -> float:
        """0.0 with the tokens taken; else the seconds to wait (``inf``: until a wake-up),
        with nothing taken unless the result is ``<= within`` (a booking)."""
        ...

    def refund(self, weight: int = 1) -> None:
        """Give back the latest reserve's tokens, unused."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RemoteLimit:
    """``qps_limit`` given as a pyrate-limiter ``Limiter``, validated."""

    limiter: Any
    #: The tightest of the Limiter's rates, per second, when its bucket is known (None: a
    #: bucket factory that makes buckets on demand).
    per_second: float | None
    #: The bucket of ``Limiter(bucket)`` (None for another bucket factory).
    bucket: Any

    def tokens(self, wake: Callable[[], None]) -> RemoteTokens:
        """A channel's source of tokens from this Limiter; ``wake`` rouses its coordinator."""
        return RemoteTokens(self.limiter, wake, bucket=self.bucket, per_second=self.per_second)


def remote_limit(qps_limit: object, qps_burst: object) -> RemoteLimit | None:
    """``qps_limit`` as a :class:`RemoteLimit` if it is a pyrate-limiter ``Limiter`` (else
    None); OptionsError for what cannot work: a ``qps_burst`` of its own, an async bucket, a
    redis client without a socket timeout."""
    from pyrate_limiter import Limiter

    if not isinstance(qps_limit, Limiter):
        return None
    if qps_burst != 1:
        raise OptionsError(
            "qps_burst must be left at 1 with a pyrate-limiter Limiter as qps_limit: the "
            f"Limiter's rates decide its bursts (got {qps_burst!r})"
        )
    buckets = _buckets(qps_limit)
    for bucket in buckets:
        for client in (getattr(bucket, "redis", None), _store_client(bucket)):
            if client is not None:
                _check_client(client)
    rates = [r for b in buckets for r in (getattr(b, "rates", None) or ())]
    per_second = min((r.limit * 1000.0 / r.interval for r in rates), default=None)
    return RemoteLimit(qps_limit, per_second, getattr(qps_limit.bucket_factory, "bucket", None))


def _buckets(limiter: Any) -> list[Any]:
    """The Limiter's buckets that can be found without making one: the single bucket of
    ``Limiter(bucket)``, and those its factory already holds."""
    found: list[Any] = []
    single = getattr(limiter.bucket_factory, "bucket", None)
    if single is not None:
        found.append(single)
    with contextlib.suppress(Exception):
        found += [b for b in limiter.buckets() if b is not single]
    return found


def _store_client(bucket: Any) -> Any:
    """The redis client of a ``StateBucket``'s ``RedisStateStore`` (None for any other)."""
    return getattr(getattr(bucket, "store", None), "redis", None)


def _check_client(client: Any) -> None:
    name = f"{type(client).__module__}.{type(client).__qualname__}"
    if type(client).__module__.startswith("redis.asyncio"):
        raise OptionsError(
            "qps_limit must be a Limiter over a synchronous redis client: its calls run on a "
            f"thread of the channel's own (got a bucket over {name})"
        )
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if isinstance(kwargs, dict) and kwargs.get("socket_timeout", 0) is None:
        raise OptionsError(
            "qps_limit's redis client must have a socket_timeout in seconds, so that a stalled "
            "server cannot hold the channel's token thread for ever (got socket_timeout=None "
            f"on {name})"
        )


class RemoteTokens:
    """Tokens from a pyrate-limiter ``Limiter``, fetched on a helper thread just ahead of
    need; see the module docstring. :meth:`reserve` and :meth:`refund` are the coordinator's;
    the helper starts at the first :meth:`reserve`."""

    def __init__(
        self,
        limiter: Any,
        wake: Callable[[], None],
        *,
        bucket: Any = None,
        per_second: float | None = None,
    ) -> None:
        self._limiter = limiter
        self._wake = wake
        self._bucket = bucket
        self._poll = min(SLICE, 1.0 / per_second) if per_second else SLICE / 10
        self._cond = threading.Condition(threading.Lock())
        self._held = 0  # tokens acquired and not yet handed out (0 or 1)
        self._wanted = False  # the loop asked for a token since the last one was fetched
        self._closed = False
        self.thread: threading.Thread | None = None

    # ---- the coordinator's side ----------------------------------------------------------

    def reserve(self, weight: int = 1, *, within: float = 0.0) -> float:
        if weight != 1:
            raise ValueError(f"weight must be 1 with a pyrate-limiter Limiter (got {weight!r})")
        with self._cond:
            if self._closed:
                raise ValueError("reserve() on a closed token source")
            took = self._held > 0
            if took:
                self._held -= 1
            self._wanted = True  # the next one, ahead of need (or the one missing now)
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name="procdispatch-qps-tokens", daemon=True
                )
                self.thread.start()
            self._cond.notify()
        return 0.0 if took else math.inf

    def refund(self, weight: int = 1) -> None:
        """A token handed out and not used goes back as the spare (the Limiter cannot take it
        back)."""
        with self._cond:
            self._held += weight

    def close(self) -> None:
        """Stop the helper (it ends when its current Limiter call returns); the Limiter stays
        open. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- the helper thread ---------------------------------------------------------------

    def _run(self) -> None:
        failing = _Failures()
        while True:
            with self._cond:
                while not self._closed and (self._held or not self._wanted):
                    self._cond.wait()
                if self._closed:
                    return
            try:
                got = self._acquire()
            except Exception as exc:
                self._pause(failing.failed(exc))
                continue
            failing.recovered()
            if not got:
                self._pause(self._denied_wait())
                continue
            with self._cond:
                self._held += 1
                self._wanted = False
            self._wake()

    def _pause(self, seconds: float) -> None:
        with self._cond:
            if not self._closed:
                self._cond.wait(seconds)

    def _denied_wait(self) -> float:
        """Seconds until the Limiter may admit a unit: its bucket's retry-after when it can be
        read, else one interval of the tightest rate."""
        wait = self._poll
        bucket = self._bucket
        if bucket is not None:
            # The retry-after its last put recorded: a local read for buckets of the current
            # contract. Another thread's call in between can make it stale: it is a hint.
            with contextlib.suppress(Exception):
                from pyrate_limiter import RateItem

                ms = bucket.waiting(RateItem("procdispatch", bucket.now(), 1))
                if isinstance(ms, int) and ms > 0:
                    wait = ms / 1000
        return min(SLICE, max(MIN_DENIED, wait))

    def _acquire(self) -> bool:
        result = self._limiter.try_acquire(blocking=False)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                "qps_limit's Limiter must be synchronous: try_acquire returned an awaitable "
                f"(got {type(result).__name__})"
            )
        return bool(result)


class _Failures:
    """The helper's run of failed Limiter calls: its backoff, and its rate-limited logging."""

    def __init__(self) -> None:
        self.count = 0
        self.since = 0.0
        self._logged_at = -math.inf

    def failed(self, exc: BaseException) -> float:
        """Count a failure, log it if due; the seconds to pause before the next call."""
        now = time.monotonic()
        if self.count == 0:
            self.since = now
        self.count += 1
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.warning(
                "procdispatch: qps_limit's Limiter failed %d time(s) in %.1fs (last: %s: %s); "
                "sends wait for a token, retrying with backoff",
                self.count,
                now - self.since,
                type(exc).__name__,
                exc,
            )
        return min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(self.count - 1, 16))

    def recovered(self) -> None:
        if self.count:
            log.warning(
                "procdispatch: qps_limit's Limiter answers again after %d failure(s) in %.1fs",
                self.count,
                time.monotonic() - self.since,
            )
            self.count = 0
            self._logged_at = -math.inf
