"""RateLimiter: the pure GCRA of :mod:`._gcra`, kept in a :class:`._shmpage.SharedPage`.

Theory of operation
-------------------
The budget is a GCRA state (units admitted, latest admission, one TAT per window) on a shared
page, changed only under the page's cross-process lock (flock: released by the kernel the
instant a holder dies, so a SIGKILLed holder never wedges the others; see :mod:`._shmpage`).
The decisions are the pure :class:`._gcra.Gcra`; this module moves state in and out of shared
memory and keeps the *pool*.

*The pool* is the page's FIFO: one byte per token that conforms now and that nobody has taken.
A take that finds enough bytes reads them, one atomic ``read`` without the lock, and is done;
that is the common case and costs one system call. Only when the pool runs short does a taker
lock the page, and then it

1. *settles*: the page remembers how many bytes it left in the pool (``pool``); fewer are there
   now, so the difference were taken since, and are charged to the GCRA as admitted *now*,
   the clock read after that count (so later than they were really taken, which can only make
   the limiter stricter);
2. decides its own take with the pool's bytes kept free (``Gcra.take(reserved=...)``): a token
   in the pool may be used at any moment, so nothing may be promised that leaves no room for it;
3. *refills*: as many bytes as now conform beyond those already in the pool (``Gcra.room``),
   recording the new count before writing them.

So every token is charged once, at or after its use, and at any instant the pool holds no more
than the GCRA lets through at that instant: the admissions in any span obey the GCRA bound, as
if each had been decided under the lock at the moment of its settle. A process killed with
tokens read is charged for them; one killed between recording a refill and writing it is
charged for bytes that never existed: both err on the strict side. Tokens given back by a
take that got too few, or by ``refund``, go back into the pool when the page shows that no
settle charged them meanwhile. Otherwise a short take's stay spent (back in the pool they could
outlast their charge, which the GCRA forgets once a window has refilled), and a refund's are
taken off their charge by :meth:`._gcra.Gcra.refund`, from a unit count read before the take
(a lower bound of the count after the charge: never more generous than the truth; if the page
moved while it was read, or for later parts of a reservation refunded in parts, the tokens
stay spent).

The page, in native int64 words::

    0 magic   1 window count   2 seq   3 -   4.. (emission ns, capacity) per window (32 max)
    slot 0, slot 1: (units admitted, latest admission ns, TAT of each window, pool)

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
import termios
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ._gcra import MAX_WINDOWS, NS_PER_S, Gcra, ParsedRate, State, Window, parse_rate
from ._shmpage import SharedPage, sweep
from .errors import OptionsError

if TYPE_CHECKING:
    from pyrate_limiter import Rate

__all__ = ["RateLimiter"]

_MAGIC = 0x32_4C_52_44_50_43_52_50
_W_MAGIC, _W_COUNT, _W_SEQ, _W_PARAMS = 0, 1, 2, 4  # word offsets
_SLOT_WORDS = 3 + MAX_WINDOWS
_SLOTS = tuple(8 * (_W_PARAMS + 2 * MAX_WINDOWS + i * _SLOT_WORDS) for i in (0, 1))  # bytes
_FOREVER_NS = 2**62
_now = time.monotonic_ns
_flock = fcntl.flock
_EX, _UN = fcntl.LOCK_EX, fcntl.LOCK_UN
_read, _write = os.read, os.write
_REFILL_MAX = 1 << 16  # bytes written to the pool at once
_ZEROS = memoryview(bytes(_REFILL_MAX))
_FIONREAD = termios.FIONREAD
_INT = struct.Struct("i")


def _pool_count(pipe: int) -> int:
    """Bytes in the pool now."""
    return int(_INT.unpack(fcntl.ioctl(pipe, _FIONREAD, b"\0\0\0\0"))[0])


def _read_some(pipe: int, n: int) -> int:
    """Take up to ``n`` bytes from the pool; how many were there."""
    try:
        return len(_read(pipe, n))
    except BlockingIOError:
        return 0


def _write_some(pipe: int, n: int) -> int:
    """Put up to ``n`` bytes into the pool (fewer if the pipe is full); how many went in."""
    done = 0
    while done < n:
        try:
            done += _write(pipe, _ZEROS[: min(n - done, _REFILL_MAX)])
        except BlockingIOError:
            break
    return done


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
        slot.pack_into(mm, offset, *initial, 0)
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
    rate to ``limit - burst + 1`` per interval so that the window limit still holds. A Rate given
    its own burst below its limit, ``Rate(limit, interval, burst=b)``, uses ``b`` for its window
    instead (at most ``b`` at once, at most ``limit`` per interval); a Rate's burst left at
    pyrate's default, its limit, means the limiter's ``burst``. ``burst`` must stay 1 when every
    Rate has its own.

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
    def check_rates(
        rate: object, burst: object = 1, *, what: str = "rate", burst_what: str = "burst"
    ) -> None:
        """Validate constructor arguments without creating anything (raises OptionsError). The
        messages call the rate ``what`` and the burst ``burst_what``, so that a caller can name
        its own options: ``check_rates(qps_limit, qps_burst, what="qps_limit",
        burst_what="qps_burst")``."""
        parse_rate(rate, burst, what=what, burst_what=burst_what)

    def _setup(self, name: str, parsed: ParsedRate) -> None:
        self._name, self._parsed, self._windows = name, parsed, parsed.windows
        self._gcra = Gcra(parsed.windows)
        self._take_state = self._gcra.take
        self._room = self._gcra.room
        #: Where each slot counts the pool's bytes (its last word), by the parity of seq.
        self._pool_word = tuple(at // 8 + 2 + len(parsed.windows) for at in _SLOTS)
        self._units_word = tuple(at // 8 for at in _SLOTS)
        self._capacity = self._gcra.capacity
        slot = struct.Struct(f"{3 + len(parsed.windows)}q")  # one slot: native int64s
        self._unpack, self._pack = slot.unpack_from, slot.pack_into
        #: Admission time of this instance's latest take, when it was decided under the lock
        #: (booked times included); None when it came from the pool (some instant during the
        #: call). For tests and benchmarks.
        self._last_admit_ns: int | None = 0
        # The setup must not refer to self: a cycle would keep a dropped limiter's page open.
        setup = functools.partial(_init_or_check, name, parsed.windows, self._gcra.initial(), slot)
        self._page = SharedPage(name, setup)

    # -- state access, under the page lock -------------------------------------------------

    def _settled(self, take: int = 0) -> tuple[int, State, int, int]:
        """Under the lock: (seq, GCRA state with the pool's takes since charged, bytes in the
        pool, now). With ``take``, up to that many bytes are first taken out of the pool, as
        free capacity again (they were never charged), and left out of the count.

        ``now`` is read after the pool's last look: takes charged at it happened before it,
        and bytes counted as there may be taken at it or later, never earlier."""
        page = self._page
        seq = page.mv[_W_SEQ]
        slot = self._unpack(page.mm, _SLOTS[seq & 1])
        recorded = slot[-1]
        if not recorded:  # bytes go in only after being counted here: none can be there
            return seq, slot[:-1], 0, _now()
        there = _pool_count(page.pipe)
        pool = there - _read_some(page.pipe, min(take, there)) if take and there else there
        now = _now()
        if recorded > there:
            return seq, self._gcra.charge(slot[:-1], now, recorded - there), pool, now
        return seq, slot[:-1], pool, now

    def _publish(self, seq: int, state: State, pool: int, now: int) -> None:
        """Under the lock: refill the pool with what now conforms beyond ``pool`` bytes, and
        make ``state`` (with the pool's count) the live state."""
        page = self._page
        mm, mv = page.mm, page.mv
        refill = min(self._room(state, now) - pool, _REFILL_MAX)
        if refill > 0:
            # Recorded before written: a writer killed in between is charged for bytes that
            # never went in (strict), never the reverse.
            self._pack(mm, _SLOTS[~seq & 1], *state, pool + refill)
            seq += 1
            mv[_W_SEQ] = seq
            put = _write_some(page.pipe, refill)
            if put == refill:
                return
            pool += put
        self._pack(mm, _SLOTS[~seq & 1], *state, pool)
        mv[_W_SEQ] = seq + 1  # the one 8-byte store that publishes the new state

    def _take(
        self, weight: int, max_wait_ns: int, returned: int = 0, seq_read: int = -1
    ) -> tuple[int, int, int]:
        """Under the lock, after the pool fell short: admit ``weight`` at the earliest instant
        within ``max_wait_ns``, from the GCRA with the pool's bytes kept free (after taking
        what it needs of them back). ``returned`` bytes, read from the pool by the caller (after
        it saw the page at ``seq_read``) and not enough, go back into the pool if the page is
        still at ``seq_read`` and stay spent otherwise. Returns (wait, ticket, now): ticket 0
        if nothing was taken, else ``units`` after the admission (what :meth:`_give_back`
        needs; a take from the pool, outside, has ``-1 - seq``)."""
        page = self._page  # (the weight was checked by the caller, before its pool read)
        tlock = page.tlock
        tlock.acquire()  # not `with`: this is a hot path, and `with` costs 0.3 us more
        try:
            if page.closed:
                raise ValueError(f"{self!r} is closed")
            fd = page.fd
            _flock(fd, _EX)
            try:
                if returned and page.mv[_W_SEQ] == seq_read:
                    # No settle since they were read: back in the pool, as if never taken.
                    _write_some(page.pipe, returned)
                # Else a settle has charged them (or this one will), as used: they stay spent.
                # Given back, they could outlast their charge: a charge is forgotten once the
                # window has refilled, and the pool would then hold more than conforms.
                # Bytes taken out of the pool under the lock are free capacity again, so a take
                # may use the pool and what conforms beyond it together; the refill below puts
                # back what is left over.
                seq, state, pool, now = self._settled(weight)
                wait, new = self._take_state(state, now, weight, max_wait_ns, pool)
                if new is None:
                    self._publish(seq, state, pool, now)
                    return wait, 0, now
                self._publish(seq, new, pool, now)
                self._last_admit_ns = now + wait
                return wait, new[0], now
            finally:
                _flock(fd, _UN)
        finally:
            tlock.release()

    def _give_back(self, weight: int, ticket: int, floor: int = 0) -> None:
        """Undo ``weight`` tokens of a take that ``_take`` ticketed, or of a take from the pool
        (ticket ``-1 - seq``) after which the unit count is at least ``floor`` once charged
        (0: unknown, the tokens stay spent)."""
        page = self._page
        with page.tlock:
            if page.closed:
                raise ValueError(f"{self!r} is closed")
            fd = page.fd
            try:
                _flock(fd, _EX)
                if ticket < 0 and page.mv[_W_SEQ] == -1 - ticket:
                    # No settle since the take: back in the pool, it is as if never taken.
                    _write_some(page.pipe, weight)
                    ticket = 0
                seq, state, pool, now = self._settled()
                if ticket < 0:
                    # A settle has charged them, with the pool's other takes, as one admission
                    # after which the count was at least ``floor``: refunded as from that
                    # admission, which can only be stricter than the truth (Gcra.refund).
                    ticket = floor
                if ticket > 0 and state[0] >= ticket:  # else the limiter was recreated
                    state = self._gcra.refund(state, weight, ticket)
                self._publish(seq, state, pool, now)
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
        """True once :meth:`close` was called: every method but ``close`` then raises."""
        return self._page.closed

    def try_acquire(self, weight: int = 1) -> bool:
        """Take ``weight`` tokens if the rate allows it now; never sleeps (it may wait a few
        microseconds for the lock)."""
        if weight.__class__ is not int or not 0 < weight <= self._capacity:
            self._bad_weight(weight)
        # _from_pool spelled out (without the unit count a refund needs): the hot path.
        page = self._page
        tlock = page.tlock
        tlock.acquire()  # a close() in another thread must not free the descriptor under us
        try:
            if page.closed:
                raise ValueError(f"{self!r} is closed")
            mv = page.mv
            seq = mv[_W_SEQ]
            if mv[self._pool_word[seq & 1]]:  # else the pool is empty: no read, no exception
                try:
                    got = len(_read(page.pipe, weight))
                except BlockingIOError:
                    got = 0
            else:
                got = 0
        finally:
            tlock.release()
        if got == weight:  # from the pool: one read, no lock
            self._last_admit_ns = None
            return True
        return self._take(weight, 0, got, seq)[1] != 0

    def acquire(self, weight: int = 1, timeout: float | None = None) -> bool:
        """Take ``weight`` tokens, sleeping until the rate allows it. False, at once and with
        nothing taken, if that is later than ``timeout`` seconds from now.

        The earliest slot is booked before sleeping, so waiters queue in order and no time is
        lost to oversleeping; an exception during the sleep gives the slot back.
        """
        max_wait = _seconds_ns(timeout, "timeout", none_ok=True)
        seq, _, got = self._from_pool(weight)
        if got == weight:
            return True
        wait, ticket, now = self._take(weight, max_wait, got, seq)
        if not ticket:
            return False
        if wait:
            try:
                while (left := now + wait - _now()) > 0:
                    time.sleep(left / NS_PER_S)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._give_back(weight, ticket)
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
        max_wait = _seconds_ns(within, "within", none_ok=False)
        seq, units, got = self._from_pool(weight)
        if got == weight:
            wait, ticket = 0, -1 - seq
        else:
            wait, ticket, _ = self._take(weight, max_wait, got, seq)
            if not ticket:
                return max(wait / NS_PER_S, math.nextafter(within, math.inf))
        stack: list[list[int]] = self._page.local.__dict__.setdefault("reserved", [])
        stack.append([ticket, weight, units + weight if units >= 0 else 0])
        del stack[:-64]  # only recent reservations can be cancelled
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
        stack: list[list[int]] = self._page.local.__dict__.get("reserved", [])
        left = stack[-1][1] if stack else 0
        if weight > left:
            raise ValueError(
                f"refund(weight={weight}) must not exceed the {left} token(s) left of this "
                "thread's latest reserve()"
            )
        ticket, _, floor = entry = stack[-1]
        # The reservation is updated before the tokens go back, so that a refund interrupted
        # (KeyboardInterrupt) and called again never gives back more than was taken. The
        # update that gives back a first part of a take from the pool may charge the rest
        # without it: later parts are refunded strictly (floor 0: they stay spent).
        if left == weight:
            stack.pop()
        else:
            entry[1] = left - weight
            entry[2] = 0
        self._give_back(weight, ticket, floor)

    def _from_pool(self, weight: int) -> tuple[int, int, int]:
        """Read up to ``weight`` tokens from the pool, without the page lock: (the page's seq
        and unit count just before, how many came)."""
        if weight.__class__ is not int or not 0 < weight <= self._capacity:
            self._bad_weight(weight)
        page = self._page
        with page.tlock:
            if page.closed:
                raise ValueError(f"{self!r} is closed")
            mv = page.mv
            seq = mv[_W_SEQ]
            # A count from before the read: a lower bound of the count once the settle that
            # charges the read has run. Only if seq held while reading it: else the slot may
            # have been packed by an update that never published (its writer killed): -1,
            # unknown, makes a refund of this take strict.
            units = mv[self._units_word[seq & 1]]
            if mv[_W_SEQ] != seq:
                units = -1
            got = _read_some(page.pipe, weight) if mv[self._pool_word[seq & 1]] else 0
        if got == weight:
            self._last_admit_ns = None
        return seq, units, got

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
        """The GCRA state with every take from the pool so far charged (a settle, published)."""
        page = self._page
        with page.locked():
            seq, state, pool, now = self._settled()
            self._publish(seq, state, pool, now)
            return state

    def _pool_for_tests(self) -> tuple[int, int]:
        """(bytes the page says are in the pool, bytes there now)."""
        page = self._page
        with page.locked():
            return self._unpack(page.mm, _SLOTS[page.mv[_W_SEQ] & 1])[-1], _pool_count(page.pipe)


def _reopen(name: str, parsed: ParsedRate) -> RateLimiter:
    """Unpickle: attach to the limiter by name (recreating it if every user has gone)."""
    limiter = RateLimiter.__new__(RateLimiter)
    limiter._setup(name, parsed)
    return limiter
