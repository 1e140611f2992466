"""The rate limiter's locked paths: a take the pool falls short of, and a give-back.

:class:`LockedPaths` is the part of :class:`~.limiter.RateLimiter` that decides under the
locks, the instance's thread lock and then the page's cross-process lock (``flock``); the
fast path, a take from the page's pool with no lock at all, is :mod:`.limiter`'s. The thread
lock is held with ``with``, and the page lock is taken inside the ``try`` whose ``finally``
releases it, so that an interrupt anywhere leaves neither held. A page found dead or gone is
left for the one its name has now (``rejoin``), and the decision is made there.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable

from .gcra import Gcra, State
from .page import SharedPage
from .shmpage import Files, _flock
from .state import W_SEQ as _W_SEQ
from .state import Ledger, _write_some

__all__ = ["LockedPaths"]

_EX, _UN = fcntl.LOCK_EX, fcntl.LOCK_UN


class LockedPaths:
    """Takes and give-backs decided under the locks; see the module docstring."""

    # Set by RateLimiter._setup.
    _page: SharedPage
    _ledger: Ledger
    _gcra: Gcra
    _take_state: Callable[..., tuple[int, State | None]]
    _last_admit_ns: int | None

    def _take(
        self,
        weight: int,
        max_wait_ns: int,
        returned: int = 0,
        seq_read: int = -1,
        files_read: Files | None = None,
    ) -> tuple[int, int, int, Files]:
        """After the pool fell short: admit ``weight`` at the earliest instant within
        ``max_wait_ns``, with the pool's bytes kept free. ``returned`` bytes, read by the caller
        from ``files_read``'s pool (seen at ``seq_read``) and not enough, go back if the page is
        still at ``seq_read``, else stay spent. Returns (wait, ticket, now, files): ticket 0 if
        nothing was taken, else ``units`` after the admission (a take from the pool has
        ``-1 - seq``), for :meth:`_give_back`; ``files``: the page it was decided on."""
        page = self._page  # (the weight was checked by the caller, before its pool read)
        ledger = self._ledger
        with page.tlock:
            while True:
                if page.closed:
                    raise ValueError(f"{self!r} is closed")
                f = page.files
                if f.fd < 0 or f.ufd < 0:  # lost in a fork: go to the path's page
                    page.rejoin()
                    continue
                fd = f.fd
                try:
                    _flock(fd, _EX)
                    if page.current(f):
                        if returned and files_read is f and f.mv[_W_SEQ] == seq_read:
                            # No settle since they were read: as if never taken. Else they were
                            # charged as used and stay spent (back in the pool they could
                            # outlast their charge, forgotten once the window has refilled).
                            _write_some(f.pipe, returned)
                        # Pool bytes taken under the lock are free capacity again: a take may
                        # use them and what conforms beyond them together.
                        seq, state, pool, now = ledger.settled(f, weight)
                        wait, new = self._take_state(state, now, weight, max_wait_ns, pool)
                        if new is None:
                            ledger.publish(f, seq, state, pool, now)
                            return wait, 0, now, f
                        ledger.publish(f, seq, new, pool, now)
                        self._last_admit_ns = now + wait
                        return wait, new[0], now, f
                finally:
                    _flock(fd, _UN)
                page.rejoin()  # the page is dead or gone: move, then decide there

    def _give_back(self, weight: int, ticket: int, floor: int, files: Files) -> None:
        """Undo ``weight`` tokens of a take that ``_take`` ticketed on ``files``, or of a take
        from its pool (ticket ``-1 - seq``) after which the unit count is at least ``floor``
        once charged (0: unknown). Tokens stay spent where that is unknown, or if the limiter
        has moved to another page since."""
        page = self._page
        ledger = self._ledger
        with page.tlock:
            if page.closed:
                raise ValueError(f"{self!r} is closed")
            f = page.files
            if f is not files or f.fd < 0:
                return
            fd = f.fd
            try:
                _flock(fd, _EX)
                if not page.current(f):
                    return
                if ticket < 0 and f.mv[_W_SEQ] == -1 - ticket:
                    # No settle since the take: back in the pool, it is as if never taken.
                    _write_some(f.pipe, weight)
                    ticket = 0
                seq, state, pool, now = ledger.settled(f)
                if ticket < 0:
                    # A settle has charged them, with the pool's other takes, as one admission
                    # after which the count was at least ``floor``: refunded as from that
                    # admission, which can only be stricter than the truth (Gcra.refund).
                    ticket = floor
                if ticket > 0 and state[0] >= ticket:
                    state = self._gcra.refund(state, weight, ticket)
                ledger.publish(f, seq, state, pool, now)
            finally:
                _flock(fd, _UN)
