"""The limiter's state on a shared page, and every operation on it under the page's lock.

Theory of operation
-------------------
The budget is a GCRA state (units admitted, latest admission, one TAT per window) on a page
(:mod:`.shmpage`), changed only under the page's lock; the decisions are the pure
:class:`.gcra.Gcra`. A :class:`Ledger` reads and writes that state for one set of windows, on
whichever page's :class:`.shmpage.Files` it is given (a user moving to a new page works on two).

*The pool* is the page's FIFO: one byte per token that conforms now and that nobody has taken.
A take that finds enough bytes reads them, one atomic ``read`` without the lock (see
:mod:`.limiter`). Under the lock, an update

1. *settles* (:meth:`Ledger.settled`): the page remembers how many bytes it left in the pool
   (``pool``); fewer are there now, so the difference were taken since, and are charged to the
   GCRA as admitted *now*, the clock read after that count (so later than they were really
   taken, which can only make the limiter stricter);
2. decides its own take with the pool's bytes kept free (``Gcra.take(reserved=...)``): a token
   in the pool may be used at any moment, so nothing may be promised that leaves no room for it;
3. *refills* (:meth:`Ledger.publish`): as many bytes as now conform beyond those already in the
   pool (``Gcra.room``), recording the new count before writing them.

So every token is charged once, at or after its use, and at any instant the pool holds no more
than the GCRA lets through at that instant. A process killed (or interrupted) with tokens read
is charged for them; one killed between recording a refill and writing it is charged for bytes
that never existed: both err on the strict side, and so does every other point an update can
stop at, since the state only ever changes by one publishing store (below).

*Leaving* (:meth:`Ledger.retire`): the last user of a page drains the pool (its bytes were
never charged) and records it empty, so that nothing depends on a FIFO whose contents vanish
with its last holder; the page may then go only if it owes nothing (:meth:`.gcra.Gcra.owes`),
which is what lets a named limiter keep its budget between users whose lifetimes do not
overlap. Only a page made for a name given by the user is *kept* (``kept``, set by its creator):
nobody can open an unnamed limiter's page once its last user has gone, so it goes then. A page
whose last user died is settled the same way by the next user or sweep; its pool's bytes are
then gone, so all of them are charged, as if taken (strict).

*Moving* (:meth:`Ledger.evacuate`, :meth:`Ledger.absorb`, :meth:`Ledger.clear`): a page that
lost its files (a temporary-file cleaner) is drained and its debt added to the page its path
names now (:meth:`.gcra.Gcra.merge`) before it is cleared and marked dead; a page whose FIFO
was replaced is charged for everything its old FIFO may still hold (:meth:`Ledger.repair`).

The page, in native int64 words::

    0 magic   1 window count   2 seq   3 kept   4.. (emission ns, capacity) per window (32 max)
    slot 0, slot 1: (units admitted, latest admission ns, TAT of each window, pool)
    the last words: the page's own (FIFO pairing, dead mark; see .shmpage)

*No torn state*: ``seq``'s parity names the live slot. An update writes the whole new state into
the idle slot, then publishes it by storing ``seq + 1``, one aligned 8-byte write. A writer
stopped at any instruction leaves the old live slot or the new one: never half an update. The
magic word is written last when a page is initialised, so a page whose creator died half-way is
initialised again by the next opener.

*Time* is ``time.monotonic_ns()``: CLOCK_MONOTONIC on Linux and the boot-relative clock on
macOS, one system-wide clock that every process reads alike; the TATs are absolute times on it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import termios
import time
from collections.abc import Sequence

from ..errors import OptionsError
from .gcra import MAX_WINDOWS, Gcra, State, Window
from .shmpage import W_FIFO, W_MOVED, Files

__all__ = ["REFILL_MAX", "SLOTS", "W_SEQ", "Ledger", "describe", "ledger_for"]

_MAGIC = 0x32_4C_52_44_50_43_52_50
_W_MAGIC, _W_COUNT, W_SEQ, _W_KEPT, _W_PARAMS = 0, 1, 2, 3, 4  # word offsets
_SLOT_WORDS = 3 + MAX_WINDOWS
SLOTS = tuple(8 * (_W_PARAMS + 2 * MAX_WINDOWS + i * _SLOT_WORDS) for i in (0, 1))  # bytes
REFILL_MAX = 1 << 16  # bytes written to the pool at once, and the most it is sized for
_ZEROS = memoryview(bytes(REFILL_MAX))
_FIONREAD = termios.FIONREAD
_INT = struct.Struct("i")
_now = time.monotonic_ns
_read, _write = os.read, os.write


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
            done += _write(pipe, _ZEROS[: min(n - done, REFILL_MAX)])
        except BlockingIOError:
            break
    return done


def describe(windows: Sequence[Window]) -> str:
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


def ledger_for(mv: memoryview) -> Ledger | None:
    """The ledger of an initialised page, from the windows it records (None: no state)."""
    windows = _windows_in(mv)
    return None if windows is None else Ledger(windows)


class Ledger:
    """The GCRA state of one set of windows on a page: every method but :meth:`setup` runs under
    the page's lock, on the page whose :class:`.shmpage.Files` it is given."""

    def __init__(self, windows: tuple[Window, ...], *, kept: bool = False) -> None:
        self.windows = windows
        self.kept = kept  # what a page this ledger initialises records
        self.gcra = Gcra(windows)
        self._room = self.gcra.room
        #: Where each slot counts the pool's bytes (its last word) and the units admitted.
        self.pool_word = tuple(at // 8 + 2 + len(windows) for at in SLOTS)
        self.units_word = tuple(at // 8 for at in SLOTS)
        slot = struct.Struct(f"{3 + len(windows)}q")  # one slot: native int64s
        self.unpack, self._pack = slot.unpack_from, slot.pack_into

    def setup(self, name: str, mv: memoryview, mm: mmap.mmap) -> None:
        """At open, under the page lock: initialise a fresh page, or check its parameters."""
        existing = _windows_in(mv)
        if existing is not None:
            if existing != self.windows:
                raise OptionsError(
                    f"rate must match the limiter already open under name={name!r} "
                    f"({describe(existing)}) (got {describe(self.windows)})"
                )
            return
        mv[_W_MAGIC] = 0
        mv[_W_COUNT] = len(self.windows)
        for i, w in enumerate(self.windows):
            mv[_W_PARAMS + 2 * i], mv[_W_PARAMS + 2 * i + 1] = w.emission_ns, w.capacity
        mv[W_SEQ] = 0
        mv[_W_KEPT] = int(self.kept)
        for offset in SLOTS:
            self._pack(mm, offset, *self.gcra.initial(), 0)
        mv[_W_MAGIC] = _MAGIC

    def live(self, f: Files) -> tuple[int, State, int]:
        """(seq, the live state, the pool's recorded count), as the page says."""
        seq = f.mv[W_SEQ]
        slot = self.unpack(f.mm, SLOTS[seq & 1])
        return seq, slot[:-1], slot[-1]

    def settled(self, f: Files, take: int = 0) -> tuple[int, State, int, int]:
        """(seq, GCRA state with the pool's takes since charged, bytes in the pool, now). With
        ``take``, up to that many bytes are first taken out of the pool, as free capacity again
        (they were never charged), and left out of the count.

        ``now`` is read after the pool's last look: takes charged at it happened before it,
        and bytes counted as there may be taken at it or later, never earlier."""
        seq, state, recorded = self.live(f)
        if not recorded:  # bytes go in only after being counted here: none can be there
            return seq, state, 0, _now()
        there = _pool_count(f.pipe)
        pool = there - _read_some(f.pipe, min(take, there)) if take and there else there
        now = _now()
        if recorded > there:
            return seq, self.gcra.charge(state, now, recorded - there), pool, now
        return seq, state, pool, now

    def publish(
        self, f: Files, seq: int, state: State, pool: int, now: int, *, refill: bool = True
    ) -> None:
        """Make ``state`` (with the pool's count) the live state, first refilling the pool with
        what now conforms beyond ``pool`` bytes (unless not ``refill``)."""
        mm, mv = f.mm, f.mv
        more = min(self._room(state, now) - pool, REFILL_MAX) if refill else 0
        if more > 0:
            # Recorded before written: a writer stopped in between is charged for bytes that
            # never went in (strict), never the reverse.
            self._pack(mm, SLOTS[~seq & 1], *state, pool + more)
            seq += 1
            mv[W_SEQ] = seq
            put = _write_some(f.pipe, more)
            if put == more:
                return
            pool += put
        self._pack(mm, SLOTS[~seq & 1], *state, pool)
        mv[W_SEQ] = seq + 1  # the one 8-byte store that publishes the new state

    def drained(self, f: Files | None) -> tuple[int, State, int]:
        """(seq, state, now) with the pool emptied: its bytes read out (never charged, they are
        free capacity again) and everything else recorded charged as taken. Without a FIFO
        (``f.pipe`` unreachable: None), every recorded byte is charged."""
        assert f is not None
        seq, state, recorded = self.live(f)
        there = _pool_count(f.pipe) if f.pipe >= 0 else 0
        got = _read_some(f.pipe, there) if there else 0
        now = _now()
        taken = recorded - got  # negative if the pool holds bytes already charged (repair)
        return seq, self.gcra.charge(state, now, taken) if taken > 0 else state, now

    def retire(self, f: Files) -> bool:
        """The last user leaves: drain the pool and record it empty; whether the page must stay
        (it is kept, and still owes tokens)."""
        seq, state, now = self.drained(f)
        self.publish(f, seq, state, 0, now, refill=False)
        return self.stays(f, state, now)

    def stays(self, f: Files, state: State, now: int) -> bool:
        """Whether a page nobody holds, in ``state`` at ``now``, must stay."""
        return bool(f.mv[_W_KEPT]) and self.gcra.owes(state, now)

    def evacuate(self, f: Files) -> State:
        """A page to be left: its state, drained (and recorded so), to be added to its users'
        new page; the debt stays here too until :meth:`clear`, once it is safely elsewhere."""
        seq, state, now = self.drained(f)
        self.publish(f, seq, state, 0, now, refill=False)
        return state

    def clear(self, f: Files) -> None:
        """After :meth:`evacuate` and the debt's :meth:`absorb` elsewhere: drop the debt and
        mark the page dead (its pool is empty and only a locked update could refill it)."""
        seq, state, now = self.drained(f)
        cleared = (*state[:2], *(tat if tat < now else now for tat in state[2:]))
        self.publish(f, seq, cleared, 0, now, refill=False)
        f.mv[W_MOVED] = 1

    def absorb(self, f: Files, debt: State) -> None:
        """Add another page's outstanding debt to this one's state."""
        seq, state, pool, now = self.settled(f)
        self.publish(f, seq, self.gcra.merge(state, debt, now), pool, now)

    def repair(self, f: Files, *, dead: bool = False) -> State:
        """The page's recorded pool is in a FIFO this user cannot see (replaced, or gone with
        its last holder): charge all of it as taken and record the pool empty; with ``dead``,
        mark the page dead too. Returns the state left."""
        seq, state, recorded = self.live(f)
        now = _now()
        state = self.gcra.charge(state, now, recorded)
        self.publish(f, seq, state, 0, now, refill=False)
        if dead:
            f.mv[W_MOVED] = 1
        return state

    def paired(self, f: Files) -> bool:
        """Whether ``f.pipe`` is the FIFO the page's counts refer to."""
        return f.mv[W_FIFO] == f.fifo_ino()
