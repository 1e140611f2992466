"""RateLimiter: the pure GCRA of :mod:`._gcra`, kept in a :class:`._shmpage.SharedPage`.

Theory of operation
-------------------
Every operation is one read-decide-write of a few integers, a few microseconds long, under the
page's cross-process lock (flock: released by the kernel the instant a holder dies, so a
SIGKILLed holder never wedges the others; see :mod:`._shmpage`). The decision is the pure
:class:`._gcra.Gcra`; this module only moves its state in and out of shared memory.

The page, in native int64 words::

    0 magic   1 window count   2 seq   3 -   4.. (emission ns, capacity) per window (32 max)
    slot 0, slot 1: (units admitted, latest admission ns, TAT of each window)

*No torn state*: ``seq``'s parity names the live slot. An update writes the whole new state into
the idle slot, then publishes it by storing ``seq + 1``, one aligned 8-byte write. A writer
killed at any instruction leaves the old live slot or the new one: never half an update, never
tokens taken from some windows and not others. The magic word is written last when a page is
initialised, so a page whose creator died half-way is initialised again by the next opener.

*Time* is ``time.monotonic_ns()``: CLOCK_MONOTONIC on Linux and the boot-relative clock on
macOS, one system-wide clock that every process reads alike; the TATs are absolute times on it.

*Sharing*: the window parameters live in the page, so opening a name with other parameters is
refused. An instance pickles by name (spawn, forkserver, ``copy``), so every copy shares the
budget; an unrelated process of the same user opens it with ``name=``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import mmap
import os
import secrets
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ._gcra import MAX_WINDOWS, NS_PER_S, Gcra, ParsedRate, State, Window, parse_rate
from ._shmpage import SharedPage, sweep
from .errors import OptionsError

if TYPE_CHECKING:
    from pyrate_limiter import Rate

__all__ = ["RateLimiter"]

_MAGIC = 0x31_4C_52_44_50_43_52_50
_W_MAGIC, _W_COUNT, _W_SEQ, _W_PARAMS = 0, 1, 2, 4  # word offsets
_SLOT_WORDS = 2 + MAX_WINDOWS
_SLOTS = tuple(8 * (_W_PARAMS + 2 * MAX_WINDOWS + i * _SLOT_WORDS) for i in (0, 1))  # bytes
#: (live slot, idle slot) as word offsets, by the parity of ``seq``.
_SLOT_WORDS_BY_PARITY = ((_SLOTS[0] // 8, _SLOTS[1] // 8), (_SLOTS[1] // 8, _SLOTS[0] // 8))
_FOREVER_NS = 2**62
_now = time.monotonic_ns
_flock = fcntl.flock
_EX, _UN = fcntl.LOCK_EX, fcntl.LOCK_UN


def _describe(windows: Sequence[Window]) -> str:
    return "; ".join(f"{w.capacity} at once, then 1 per {w.emission_ns} ns" for w in windows)


def _windows_in(mv: memoryview) -> tuple[Window, ...] | None:
    """The windows recorded in an initialised page; None for a fresh (or half-made) one."""
    n = mv[_W_COUNT]
    if mv[_W_MAGIC] != _MAGIC or not 1 <= n <= MAX_WINDOWS:
        return None
    try:
        return tuple(Window(mv[_W_PARAMS + 2 * i], mv[_W_PARAMS + 2 * i + 1]) for i in range(n))
    except ValueError:  # not a page we wrote
        return None


def _init_or_check(
    name: str,
    windows: tuple[Window, ...],
    initial: State,
    slot: struct.Struct,
    mv: memoryview,
    mm: mmap.mmap,
) -> None:
    """Under the page lock at open: initialise a fresh page, or check its parameters."""
    existing = _windows_in(mv)
    if existing is not None:
        if existing != windows:
            raise OptionsError(
                f"rate must match the limiter already open under name={name!r} "
                f"({_describe(existing)}) (got {_describe(windows)})"
            )
        return
    mv[_W_MAGIC] = 0
    mv[_W_COUNT] = len(windows)
    for i, w in enumerate(windows):
        mv[_W_PARAMS + 2 * i], mv[_W_PARAMS + 2 * i + 1] = w.emission_ns, w.capacity
    mv[_W_SEQ] = 0
    for offset in _SLOTS:
        slot.pack_into(mm, offset, *initial)
    mv[_W_MAGIC] = _MAGIC


def _seconds_ns(value: float | None, field: str, *, none_ok: bool) -> int:
    """A timeout-like argument in nanoseconds (None: for ever, where allowed)."""
    if value is None:
        if none_ok:
            return _FOREVER_NS
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        ns = value * NS_PER_S
        return _FOREVER_NS if ns >= _FOREVER_NS else int(ns)
    rule = "None or a number" if none_ok else "a number"
    raise OptionsError(f"{field} must be {rule} of seconds >= 0 (got {value!r})")


class RateLimiter:
    """A token bucket (GCRA) in shared memory, shared by every copy and every same-name opener.

    ``rate`` is either events per second (a token bucket holding ``burst`` tokens, starting
    full: no 1-second window admits more than ``rate + burst``), or one or more pyrate-limiter
    ``Rate(limit, interval)`` windows that must all hold: no ``interval``-long window ever admits
    more than ``limit``. With Rates, ``burst`` (at most the smallest limit) is how many may go at
    once; ``burst=1`` spaces events evenly at the full rate, a larger burst lowers the sustained
    rate to ``limit - burst + 1`` per interval so that the window limit still holds.

    ``name`` lets unrelated processes of the same user share the budget; they must give the same
    rate and burst. Without a name the limiter is shared by this instance and its copies
    (pickles, multiprocessing children) only.
    """

    def __init__(
        self, rate: float | Rate | Sequence[Rate], *, burst: int = 1, name: str | None = None
    ) -> None:
        parsed = parse_rate(rate, burst)
        if name is None:
            name = f"a{os.getpid()}x{secrets.token_hex(8)}"
        elif not isinstance(name, str) or not name or "\0" in name:
            raise OptionsError(f"name must be a non-empty str or None (got {name!r})")
        sweep()
        self._setup(name, parsed)

    @staticmethod
    def check_rates(rate: object, burst: object = 1) -> None:
        """Validate constructor arguments without creating anything (raises OptionsError)."""
        parse_rate(rate, burst)

    def _setup(self, name: str, parsed: ParsedRate) -> None:
        self._name, self._parsed, self._windows = name, parsed, parsed.windows
        self._gcra = Gcra(parsed.windows)
        self._take_state = self._gcra.take
        self._capacity = self._gcra.capacity
        w = parsed.windows[0]
        #: (emission, tolerance) for the single-window fast path of try_acquire.
        self._one = (
            (w.emission_ns, w.capacity * w.emission_ns) if len(parsed.windows) == 1 else None
        )
        slot = struct.Struct(f"{2 + len(parsed.windows)}q")  # one slot: native int64s
        self._unpack, self._pack = slot.unpack_from, slot.pack_into
        self._last_admit_ns = 0  # admission time of this instance's latest take (for tests)
        # The setup must not refer to self: a cycle would keep a dropped limiter's page open.
        setup = functools.partial(_init_or_check, name, parsed.windows, self._gcra.initial(), slot)
        self._page = SharedPage(name, setup)

    # -- state access, under the page lock -------------------------------------------------

    def _take(self, weight: int, max_wait_ns: int) -> tuple[int, State | None, int]:
        """Admit at the earliest instant within ``max_wait_ns``: (wait, new state or None, now)."""
        if type(weight) is not int or not 0 < weight <= self._capacity:
            self._bad_weight(weight)
        page = self._page
        tlock = page.tlock
        tlock.acquire()  # not `with`: this is a hot path, and `with` costs 0.3 us more
        try:
            if page.closed:
                raise ValueError(f"{self!r} is closed")
            fd, mm, mv = page.fd, page.mm, page.mv
            _flock(fd, _EX)
            try:
                now = _now()
                seq = mv[_W_SEQ]
                state = self._unpack(mm, _SLOTS[seq & 1])
                wait, new = self._take_state(state, now, weight, max_wait_ns)
                if new is not None:
                    self._pack(mm, _SLOTS[~seq & 1], *new)
                    mv[_W_SEQ] = seq + 1  # the one 8-byte store that publishes the new state
                    self._last_admit_ns = now + wait
            finally:
                _flock(fd, _UN)
        finally:
            tlock.release()
        return wait, new, now

    def _give_back(self, weight: int, units_at_take: int) -> None:
        page = self._page
        with page.tlock:
            if page.closed:
                raise ValueError(f"{self!r} is closed")
            fd, mm, mv = page.fd, page.mm, page.mv
            try:
                _flock(fd, _EX)
                seq = mv[_W_SEQ]
                state = self._unpack(mm, _SLOTS[seq & 1])
                if state[0] >= units_at_take:  # else the limiter was recreated meanwhile
                    new = self._gcra.refund(state, weight, units_at_take)
                    self._pack(mm, _SLOTS[~seq & 1], *new)
                    mv[_W_SEQ] = seq + 1
            finally:
                _flock(fd, _UN)

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
        return self._page.closed

    def try_acquire(self, weight: int = 1) -> bool:
        """Take ``weight`` tokens if the rate allows it now; never sleeps (it may wait a few
        microseconds for the lock)."""
        if weight.__class__ is not int or not 0 < weight <= self._capacity:
            self._bad_weight(weight)
        one = self._one
        if one is None:
            return self._take(weight, 0)[1] is not None
        # One window: Gcra.take spelled out on the page's words (the cost of this path is the
        # cost of the limiter; tests check it against Gcra.take step by step).
        cost = weight * one[0]
        tolerance = one[1]
        page = self._page
        tlock = page.tlock
        tlock.acquire()
        try:
            if page.closed:
                raise ValueError(f"{self!r} is closed")
            fd = page.fd
            _flock(fd, _EX)
            try:
                now = _now()
                mv = page.mv
                seq = mv[_W_SEQ]
                src, dst = _SLOT_WORDS_BY_PARITY[seq & 1]
                tat = mv[src + 2]
                if tat + cost - tolerance > now:
                    return False
                last = mv[src + 1]
                mv[dst] = mv[src] + weight
                mv[dst + 1] = last if last > now else now
                mv[dst + 2] = (tat if tat > now else now) + cost
                mv[_W_SEQ] = seq + 1  # the one 8-byte store that publishes the new state
            finally:
                _flock(fd, _UN)
        finally:
            tlock.release()
        self._last_admit_ns = now
        return True

    def acquire(self, weight: int = 1, timeout: float | None = None) -> bool:
        """Take ``weight`` tokens, sleeping until the rate allows it. False, at once and with
        nothing taken, if that is later than ``timeout`` seconds from now.

        The earliest slot is booked before sleeping, so waiters queue in order and no time is
        lost to oversleeping; an exception during the sleep gives the slot back.
        """
        wait, new, now = self._take(weight, _seconds_ns(timeout, "timeout", none_ok=True))
        if new is None:
            return False
        if wait:
            try:
                while (left := now + wait - _now()) > 0:
                    time.sleep(left / NS_PER_S)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._give_back(weight, new[0])
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
        wait, new, _ = self._take(weight, _seconds_ns(within, "within", none_ok=False))
        if new is None:
            return max(wait / NS_PER_S, math.nextafter(within, math.inf))
        stack: list[list[int]] = self._page.local.__dict__.setdefault("reserved", [])
        stack.append([new[0], weight])
        del stack[:-64]  # only recent reservations can be cancelled
        return min(wait / NS_PER_S, within)

    def refund(self, weight: int = 1) -> None:
        """Give back ``weight`` tokens of this thread's latest successful :meth:`reserve`.

        Exact if nothing else was admitted since; tokens that later admissions already relied
        on stay spent, so a refund can never let the rate be exceeded.
        """
        if type(weight) is not int or not 0 < weight <= self._capacity:
            self._bad_weight(weight)
        stack: list[list[int]] = self._page.local.__dict__.get("reserved", [])
        left = stack[-1][1] if stack else 0
        if weight > left:
            raise ValueError(
                f"refund(weight={weight}) must not exceed the {left} token(s) left of this "
                "thread's latest reserve()"
            )
        self._give_back(weight, stack[-1][0])
        if left == weight:
            stack.pop()
        else:
            stack[-1][1] = left - weight

    def close(self) -> None:
        """Release this instance; the shared memory goes when its last user closes (or dies)."""
        self._page.close()

    def __enter__(self) -> RateLimiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        page = getattr(self, "_page", None)
        if page is not None and not page.closed:
            with contextlib.suppress(Exception):
                page.close()

    def __reduce__(self) -> tuple[Any, ...]:
        if self.closed:
            raise ValueError(f"cannot pickle {self!r}: it is closed")
        return (_reopen, (self._name, self._parsed))

    def __repr__(self) -> str:
        closed = " (closed)" if self.closed else ""
        return f"<RateLimiter {self._parsed.description}, name={self._name!r}{closed}>"

    # -- test hooks ------------------------------------------------------------------------

    def _locked_for_tests(self) -> contextlib.AbstractContextManager[None]:
        """Hold the cross-process lock (to be SIGKILLed while holding it, say)."""
        return self._page.locked()

    def _state_for_tests(self) -> State:
        page = self._page
        with page.locked():
            return self._unpack(page.mm, _SLOTS[page.mv[_W_SEQ] & 1])


def _reopen(name: str, parsed: ParsedRate) -> RateLimiter:
    """Unpickle: attach to the limiter by name (recreating it if every user has gone)."""
    limiter = RateLimiter.__new__(RateLimiter)
    limiter._setup(name, parsed)
    return limiter
