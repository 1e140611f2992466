"""RateLimiter: a token bucket (GCRA) in shared memory, shared by processes.

Theory of operation
-------------------
The state and its updates under the page's lock are :mod:`.state`'s; the files, locks and
lifetime :mod:`.page`'s and :mod:`.shmpage`'s. This module is the API, and the *fast path*:
a take of tokens waiting in the page's pool (its FIFO) is one ``read``, with no lock of any
kind. Only a take the pool falls short of goes through :meth:`RateLimiter._take`, under this
instance's thread lock and the page's cross-process lock (see :mod:`.locked`).

Why the fast path needs no lock. It loads the instance's current :class:`.shmpage.Files` once
and uses only its mapping (``mv``, to see whether the pool holds anything) and its pipe number.
Neither is ever freed or reused while that object lives, and the fast path holds it: closing,
or moving to another page, points the pipe number at a dead pipe (``dup2``, atomic), after
which a read finds end-of-file and the take goes on to the locked path, which raises for a
closed limiter. A read that raced the close took tokens that existed before it, and a read is
atomic in the kernel, so two readers never share a byte. So there is no lock to leak: an
interrupt anywhere in the fast path leaves at worst tokens read and not used (they are charged
at the next update: strict). The locked paths are :mod:`.locked`'s.

*Sharing*: the window parameters live in the page, so opening a name with other parameters is
refused. An instance pickles by name (spawn, forkserver, ``copy``), so every copy shares the
budget; an unrelated process of the same user opens it with ``name=``; a child made by
``fork()`` shares its parent's instance, with descriptions and locks of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import OptionsError
from .gcra import NS_PER_S, ParsedRate, State, parse_rate, seconds_ns
from .locked import LockedPaths
from .page import SharedPage, sweep
from .shmpage import Files
from .state import REFILL_MAX, Ledger
from .state import SLOTS as _SLOTS  # noqa: F401 (the page layout, for tests)
from .state import W_SEQ as _W_SEQ

if TYPE_CHECKING:
    from pyrate_limiter import Rate

__all__ = ["RateLimiter"]

_now = time.monotonic_ns
_read = os.read
_EX, _UN = fcntl.LOCK_EX, fcntl.LOCK_UN
_RESERVED_KEPT = 64  # reservations a thread can still cancel


class RateLimiter(LockedPaths):
    """A token bucket (GCRA) in shared memory, shared by every copy and every same-name opener.

    ``rate`` is either events per second (a token bucket holding ``burst`` tokens, starting
    full: no 1-second window admits more than ``rate + burst``), or one or more pyrate-limiter
    ``Rate(limit, interval)`` windows that must all hold: no ``interval``-long window ever admits
    more than ``limit``. With Rates, ``burst`` (at most the smallest limit) is how many may go at
    once; ``burst=1`` spaces events evenly at the full rate, a larger burst lowers the sustained
    rate to ``limit - burst + 1`` per interval so that the window limit still holds. A Rate given
    its own burst below its limit, ``Rate(limit, interval, burst=b)``, uses ``b`` for its window
    instead (at most ``b`` at once, at most ``limit`` per interval); a Rate's burst left at
    pyrate's default, its limit, means the limiter's ``burst``. ``burst`` must stay 1 when every
    Rate has its own.

    ``name`` lets unrelated processes of the same user share the budget; they must give the same
    rate and burst. Without a name the limiter is shared by this instance and its copies
    (pickles, multiprocessing children) only. A named limiter keeps its budget between users
    whose lifetimes do not overlap: its files stay while they still owe tokens, and go once a
    fresh limiter would behave the same. If they are removed while in use (a temporary-file
    cleaner), each user notices at its next update under the lock and moves to the files the
    name has then, carrying its debt; until then the two sets of files each hold the bound.

    State changes under a lock that the kernel releases when its holder dies, so a process
    killed, or interrupted (KeyboardInterrupt) at any point of any method, never leaves it held
    and never leaves the others waiting. A process stopped (SIGSTOP, a debugger) while it holds
    the lock does block the others until it runs again.
    """

    def __init__(
        self, rate: float | Rate | Sequence[Rate], *, burst: int = 1, name: str | None = None
    ) -> None:
        parsed = parse_rate(rate, burst)
        kept = name is not None  # only a name given can be opened again once all users left
        if name is None:
            name = f"a{os.getpid()}x{secrets.token_hex(8)}"
        elif not isinstance(name, str) or not name or "\0" in name:
            raise OptionsError(f"name must be a non-empty str or None (got {name!r})")
        sweep()
        self._setup(name, parsed, kept)

    @classmethod
    def _for(cls, parsed: ParsedRate) -> RateLimiter:
        """An unnamed limiter for a rate the caller has already parsed (a channel's
        ``qps_limit``: parsed once, with the channel's option names in its messages)."""
        limiter = cls.__new__(cls)
        sweep()
        limiter._setup(f"a{os.getpid()}x{secrets.token_hex(8)}", parsed, False)
        return limiter

    @staticmethod
    def check_rates(
        rate: object, burst: object = 1, *, what: str = "rate", burst_what: str = "burst"
    ) -> None:
        """Validate constructor arguments without creating anything (raises OptionsError). The
        messages call the rate ``what`` and the burst ``burst_what``, so that a caller can name
        its own options: ``check_rates(qps_limit, qps_burst, what="qps_limit",
        burst_what="qps_burst")``."""
        parse_rate(rate, burst, what=what, burst_what=burst_what)

    def _setup(self, name: str, parsed: ParsedRate, kept: bool) -> None:
        self._name, self._parsed, self._windows = name, parsed, parsed.windows
        self._kept = kept
        self._ledger = ledger = Ledger(parsed.windows, kept=kept)
        self._gcra = ledger.gcra
        self._take_state = ledger.gcra.take
        self._pool_word, self._units_word = ledger.pool_word, ledger.units_word
        self._capacity = ledger.gcra.capacity
        #: Admission time of this instance's latest take, when it was decided under the lock
        #: (booked times included); None when it came from the pool (some instant during the
        #: call). For tests and benchmarks.
        self._last_admit_ns: int | None = 0
        # The page must not refer to self: a cycle would keep a dropped limiter's page open.
        self._page = SharedPage(name, ledger, min(self._capacity, REFILL_MAX))

    def _bad_weight(self, weight: object) -> NoReturn:
        raise OptionsError(
            f"weight must be an int from 1 to {self._capacity} (the burst: more can never be "
            f"admitted at once) (got {weight!r})"
        )

    # -- public API ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name under which other processes can open this limiter (generated if not given)."""
        return self._name

    @property
    def rate_per_second(self) -> float:
        """The nominal long-run rate: events per second, or the tightest Rate window's."""
        return self._parsed.per_second

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called: every method but ``close`` then raises."""
        return self._page.closed

    def try_acquire(self, weight: int = 1) -> bool:
        """Take ``weight`` tokens if the rate allows it now; never sleeps (it may wait a few
        microseconds for the lock)."""
        if weight.__class__ is not int or not 0 < weight <= self._capacity:
            self._bad_weight(weight)
        # _from_pool spelled out (without the unit count a refund needs): the hot path.
        f = self._page.files
        mv = f.mv
        seq = mv[_W_SEQ]
        if mv[self._pool_word[seq & 1]]:  # else the pool is empty: no read, no exception
            try:
                got = len(_read(f.pipe, weight))
            except BlockingIOError:
                got = 0
            if got == weight:  # from the pool: one read, no lock
                self._last_admit_ns = None
                return True
        else:
            got = 0
        return self._take(weight, 0, got, seq, f)[1] != 0

    def acquire(self, weight: int = 1, timeout: float | None = None) -> bool:
        """Take ``weight`` tokens, sleeping until the rate allows it. False, at once and with
        nothing taken, if that is later than ``timeout`` seconds from now.

        The earliest slot is booked before sleeping, so waiters queue in order and no time is
        lost to oversleeping; an exception during the sleep gives the slot back.
        """
        max_wait = seconds_ns(timeout, "RateLimiter.acquire(): timeout", none_ok=True)
        f, seq, _, got = self._from_pool(weight)
        if got == weight:
            return True
        wait, ticket, now, f = self._take(weight, max_wait, got, seq, f)
        if not ticket:
            return False
        if wait:
            try:
                while (left := now + wait - _now()) > 0:
                    time.sleep(left / NS_PER_S)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._give_back(weight, ticket, 0, f)
                raise
        return True

    def reserve(self, weight: int = 1, *, within: float = 0.0) -> float:
        """Non-blocking: 0.0 with the tokens taken if the rate allows them now, else the seconds
        until it would (> 0), with nothing taken. :meth:`refund` cancels a successful reserve.

        With ``within`` > 0 the tokens are also taken when the earliest instant that allows them
        is at most ``within`` seconds away: they are booked for that instant, and the result
        (then ``<= within``) says how long to wait before using them. A result ``> within``
        means nothing was taken. Booking avoids losing the time a sleep-and-retry oversleeps.
        """
        max_wait = seconds_ns(within, "RateLimiter.reserve(): within", none_ok=False)
        f, seq, units, got = self._from_pool(weight)
        if got == weight:
            wait, ticket = 0, -1 - seq
        else:
            wait, ticket, _, f = self._take(weight, max_wait, got, seq, f)
            if not ticket:
                return max(wait / NS_PER_S, math.nextafter(within, math.inf))
        stack: list[list[Any]] = self._page.local.__dict__.setdefault("reserved", [])
        stack.append([ticket, weight, units + weight if units >= 0 else 0, f])
        del stack[:-_RESERVED_KEPT]
        return min(wait / NS_PER_S, within) if wait > 0 else 0.0

    def refund(self, weight: int = 1) -> None:
        """Give back ``weight`` tokens of this thread's latest successful :meth:`reserve`.

        Exact if nothing else was admitted since (for tokens that came from the pool: if the
        page was not updated since either, and for the first part only of a reservation given
        back in parts); otherwise tokens that later admissions may have relied on stay spent,
        so a refund can never let the rate be exceeded.
        """
        if type(weight) is not int or not 0 < weight <= self._capacity:
            self._bad_weight(weight)
        stack: list[list[Any]] = self._page.local.__dict__.get("reserved", [])
        left = stack[-1][1] if stack else 0
        if weight > left:
            raise ValueError(
                f"refund(weight={weight}) must not exceed the {left} token(s) left of this "
                "thread's latest reserve()"
            )
        ticket, _, floor, files = entry = stack[-1]
        # Updated before the tokens go back, so that a refund interrupted and called again
        # never gives back more than was taken. Giving back a first part of a pool take may
        # charge the rest without it: later parts are refunded strictly (floor 0).
        if left == weight:
            stack.pop()
        else:
            entry[1] = left - weight
            entry[2] = 0
        self._give_back(weight, ticket, floor, files)

    def _from_pool(self, weight: int) -> tuple[Files, int, int, int]:
        """Read up to ``weight`` tokens from the pool, without any lock: (the page, its seq and
        unit count just before, how many came)."""
        if weight.__class__ is not int or not 0 < weight <= self._capacity:
            self._bad_weight(weight)
        f = self._page.files
        mv = f.mv
        seq = mv[_W_SEQ]
        # A lower bound of the count once the read is charged, if seq held while reading it
        # (else the slot may be an update whose writer died unpublished: -1, refunds strict).
        units = mv[self._units_word[seq & 1]]
        if mv[_W_SEQ] != seq:
            units = -1
        got = 0
        if mv[self._pool_word[seq & 1]]:
            with contextlib.suppress(BlockingIOError):
                got = len(_read(f.pipe, weight))
        if got == weight:
            self._last_admit_ns = None
        return f, seq, units, got

    def close(self) -> None:
        """Release this instance. A named limiter's files stay while they still owe tokens (so
        that the next user keeps to the budget) and go once they owe nothing. Called again after
        an interrupt, it finishes what is left."""
        self._page.close()

    def __enter__(self) -> RateLimiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        page = getattr(self, "_page", None)
        if page is not None and not page.closed:
            try:  # noqa: SIM105 (contextlib may be gone at shutdown)
                page.close()
            except Exception:  # also at interpreter shutdown, when modules are gone
                pass

    def __reduce__(self) -> tuple[Any, ...]:
        if self.closed:
            raise ValueError(f"cannot pickle {self!r}: it is closed")
        return (_reopen, (self._name, self._parsed, self._kept))

    def __repr__(self) -> str:
        closed = " (closed)" if self.closed else ""
        return f"<RateLimiter {self._parsed.description}, name={self._name!r}{closed}>"

    # -- test hooks ------------------------------------------------------------------------

    def _locked_for_tests(self) -> contextlib.AbstractContextManager[Files]:
        """Hold the cross-process lock (to be SIGKILLed while holding it, say)."""
        return self._page.locked()

    def _state_for_tests(self) -> State:
        """The GCRA state with every take from the pool so far charged (a settle, published)."""
        with self._page.locked() as f:
            seq, state, pool, now = self._ledger.settled(f)
            self._ledger.publish(f, seq, state, pool, now)
            return state

    def _pool_for_tests(self) -> tuple[int, int]:
        """(bytes the page says are in the pool, bytes there now)."""
        from .state import _pool_count

        with self._page.locked() as f:
            return self._ledger.live(f)[2], _pool_count(f.pipe)


def _reopen(name: str, parsed: ParsedRate, kept: bool = False) -> RateLimiter:
    """Unpickle: attach to the limiter by name (recreating it if every user has gone)."""
    limiter = RateLimiter.__new__(RateLimiter)
    limiter._setup(name, parsed, kept)
    return limiter
