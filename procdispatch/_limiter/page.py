"""SharedPage: a limiter's named page as one instance holds it: open, leave, move, sweep, fork.

Theory of operation
-------------------
The files and their locks are :mod:`.shmpage`'s, the state on the page :mod:`.state`'s.
This module decides when a page is joined, kept, removed or left for another:

*Open* (:meth:`SharedPage._open`): register as a user (LOCK_SH on the users file), open the page
and, under its lock, set it up (a fresh page is initialised, an existing one must have the same
windows) and open the FIFO it is paired with. A fresh page gets a fresh FIFO. A page whose FIFO
is gone or is another one can no longer be trusted with its counts: it is charged for all of
them, marked dead and unlinked, and its debt goes into the page opened in its place. A page
that its path no longer names, or a dead one still there, is passed over.

*Leave* (:meth:`SharedPage.close`): a user that finds itself the last (LOCK_EX on the users
file without waiting) drains and records the pool under the page lock (:meth:`.state.Ledger.
retire`), and removes the files only if the page owes nothing, marking it dead first. So a
named limiter's bound holds across users whose lifetimes do not overlap, and a page that goes
is one a fresh page would replace exactly. Holding LOCK_EX on the users file keeps new users
out until the decision is made; they then find the files gone, or kept.

*Sweep* (:func:`sweep`, at every construction): the same judgement for every page of this user
that nobody holds (a dead last user's, or one kept for its debt): settled (a dead user's pool is
charged in full), and removed once it owes nothing. It never waits for a page's lock.

*Move* (:meth:`SharedPage.rejoin`): a user notices at a locked update that its page is dead
(the mark, set by whoever removed it) or unlinked (``st_nlink``, checked at most every
:data:`RECHECK_NS`, the trace a temporary-file cleaner leaves). It opens the page its path names
now (making one if there is none) and, holding the old page's lock and then the new one's, adds
the old page's outstanding debt to the new one, clears the old one and marks it dead, so that
its other users move at their next update. The honest guarantee: between the files' removal and
the first old user's next locked update, the two pages each enforce the bound on their own
(together up to twice the bound); afterwards the old page's debt is carried, and from then on one
bound holds for all. A page whose FIFO is replaced is charged for the whole pool it recorded,
possibly twice (by its opener and by its old users): strict. A take from the old FIFO that had
already found it non-empty before the charge can still complete after it.

*Fork*: the child gets its own open file descriptions without waiting (see
:meth:`.shmpage.Files.after_fork`), a fresh thread lock and no reservations; where a file could
not be reached again, its next locked update moves it to the page its path names.

Lock order: a page's users-file lock is never awaited while holding a page lock, and page locks
nest only old page, then new page, on a move; so no wait can form a cycle.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterator

from . import state as _rlstate
from .gcra import State
from .shmpage import (
    _EX,
    _NB,
    _OPEN_FLAGS,
    _UN,
    W_FIFO,
    W_MOVED,
    Files,
    _flock,
    base_paths,
    check_owner,
    is_last,
    names_same_file,
    paths,
    prefix,
    register,
    segment_dir,
    unlink_set,
)
from .state import Ledger, ledger_for

__all__ = ["RECHECK_NS", "SharedPage", "sweep"]

#: How often (ns) a user checks, at a locked update, that its page file is still linked.
RECHECK_NS = 50_000_000
_OPEN_ATTEMPTS = 100
_LIVE: weakref.WeakSet[SharedPage] = weakref.WeakSet()


class SharedPage:
    """One instance's hold on a named page: ``files`` (replaced as a whole on a move), the
    ``tlock`` that serialises this instance's threads in front of the page lock, and ``local``
    scratch space per thread."""

    files: Files

    def __init__(self, name: str, ledger: Ledger, pool_max: int) -> None:
        self.name = name
        self.ledger = ledger
        self.pool_max = pool_max
        self.closed = True
        self.recheck_at = 0
        self.tlock = threading.Lock()
        #: Per-thread scratch space for the page's owner; a forked child starts with none.
        self.local = threading.local()
        _LIVE.add(self)
        self.files = self._open()
        self.closed = False

    # -- open ----------------------------------------------------------------------------------

    def _open(self) -> Files:
        """Hold the page the name's path names, set up and paired with its FIFO."""
        carried: State | None = None
        for _ in range(_OPEN_ATTEMPTS):
            f = Files()
            try:
                outcome = self._open_once(f, carried)
            except BaseException:
                f.release()
                raise
            if outcome is True:
                return f
            if isinstance(outcome, tuple):
                carried = outcome
            f.release()
        raise OSError(f"could not open the shared page of {self.name!r}: its files keep changing")

    def _open_once(self, f: Files, carried: State | None) -> State | bool | None:
        """One attempt: True when ``f`` holds the page; else None (again), or the debt of a page
        found unusable (to be carried into the next one)."""
        data_path, users_path, pool_path = paths(self.name)
        register(f, users_path)
        f.fd = os.open(data_path, _OPEN_FLAGS | os.O_CREAT, 0o600)
        check_owner(f.fd, data_path)
        fd = f.fd
        try:
            _flock(fd, _EX)
            f.map()
            if not names_same_file(fd, data_path):
                return None  # unlinked between our open and our lock
            mv = f.mv
            if mv[W_MOVED]:  # a dead page its mover did not get to unlink
                found = ledger_for(mv)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(data_path)
                same = found is not None and found.windows == self.ledger.windows
                return found.live(f)[1] if same and found is not None else None
            self.ledger.setup(self.name, mv, f.mm)
            paired = mv[W_FIFO]
            if not paired:
                f.open_fifo(pool_path, self.pool_max, fresh=True)
                ino = f.fifo_ino()
                self.ledger.repair(f)  # counts of a FIFO no longer there, if any: charged
                mv[W_FIFO] = ino
            elif not f.open_fifo(pool_path, self.pool_max, fresh=False) or f.fifo_ino() != paired:
                debt = self.ledger.repair(f, dead=True)
                if names_same_file(fd, data_path):
                    os.unlink(data_path)
                return debt
            if carried is not None:
                self.ledger.absorb(f, carried)
            return True
        finally:
            _flock(fd, _UN)

    # -- under the page lock: still the name's page? --------------------------------------------

    def current(self, f: Files) -> bool:
        """Under the page lock: False if this page is dead or unlinked (:meth:`rejoin`)."""
        if f.mv[W_MOVED]:
            return False
        now = time.monotonic_ns()
        if now >= self.recheck_at:
            self.recheck_at = now + RECHECK_NS
            if os.fstat(f.fd).st_nlink == 0:
                return False
        return True

    # -- move --------------------------------------------------------------------------------

    def rejoin(self) -> None:
        """Under ``tlock``, holding no page lock: move to the page the path names now, carrying
        the old page's debt into it."""
        old = self.files
        new = self._open()
        try:
            if old.fd >= 0 and new.ino != old.ino:
                ofd, nfd = old.fd, new.fd
                try:
                    _flock(ofd, _EX)
                    debt = self.ledger.evacuate(old)
                    try:
                        _flock(nfd, _EX)
                        self.ledger.absorb(new, debt)
                    finally:
                        _flock(nfd, _UN)
                    self.ledger.clear(old)
                finally:
                    _flock(ofd, _UN)
            self.files = new
        finally:
            if self.files is not new:
                new.release()
        self.recheck_at = 0
        old.release()

    # -- leave ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the page; its files go if this was the last user and it owes nothing. Safe to
        call again after an interrupt: it finishes what is left."""
        with self.tlock:
            self.closed = True
            f = self.files
            try:
                if f.fd >= 0 and f.ufd >= 0:
                    self._leave(f)
            finally:
                # The users file may be held exclusively here (the last user's judgement):
                # released inline, since a function's entry is a point an interrupt can reach.
                ufd, f.ufd = f.ufd, -1
                if ufd >= 0:
                    os.close(ufd)
                f.release()

    def _leave(self, f: Files) -> None:
        data_path, users_path, pool_path = paths(self.name)
        if not is_last(f.ufd, users_path):
            return
        fd = f.fd
        try:
            _flock(fd, _EX)
            if f.mv[W_MOVED] or not names_same_file(fd, data_path):
                return  # not the name's page any more: nothing of ours to keep or remove
            if not self.ledger.retire(f):
                f.mv[W_MOVED] = 1
                unlink_set(f, data_path, users_path, pool_path)
        finally:
            _flock(fd, _UN)

    @contextlib.contextmanager
    def locked(self) -> Iterator[Files]:
        """Hold the thread lock and the cross-process lock (for tests and benchmarks)."""
        with self.tlock:
            if self.closed:
                raise ValueError(f"shared page {self.name!r} is closed")
            f = self.files
            fd = f.fd
            try:
                _flock(fd, _EX)
                yield f
            finally:
                _flock(fd, _UN)


def sweep() -> None:
    """Settle every page of this user that nobody holds, and remove those that owe nothing
    (and the leftovers of sets whose page went)."""
    mine, where = prefix(), segment_dir()
    bases: set[str] = set()
    try:
        names = os.listdir(where)  # a list: nothing to close if an interrupt comes
    except OSError:
        return
    for name in names:
        if name.startswith(mine):
            for suffix in (".rl", ".users", ".pool"):
                if name.endswith(suffix):
                    bases.add(os.path.join(where, name[: -len(suffix)]))
    for base in sorted(bases):
        f = Files()
        try:
            with contextlib.suppress(OSError):
                _sweep_one(f, *base_paths(base))
        finally:
            ufd, f.ufd = f.ufd, -1  # held exclusively: released inline (see close)
            if ufd >= 0:
                os.close(ufd)
            f.release()


def _sweep_one(f: Files, data_path: str, users_path: str, pool_path: str) -> None:
    if not os.path.exists(data_path):  # companions of a page that went
        with contextlib.suppress(FileNotFoundError):
            f.ufd = os.open(users_path, _OPEN_FLAGS)
        if f.ufd < 0 or (is_last(f.ufd, users_path) and not os.path.exists(data_path)):
            for path in (pool_path, users_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return
    # A page whose users file went (a cleaner) is judged as unheld: if it goes, its dead mark
    # moves any user that still holds it.
    f.ufd = os.open(users_path, _OPEN_FLAGS | os.O_CREAT, 0o600)
    check_owner(f.ufd, users_path)
    if not is_last(f.ufd, users_path):
        return
    f.fd = os.open(data_path, _OPEN_FLAGS)
    check_owner(f.fd, data_path)
    fd = f.fd
    try:
        try:
            _flock(fd, _EX | _NB)
        except BlockingIOError:
            return  # someone is in there: theirs to judge
        f.map()
        if not names_same_file(fd, data_path):
            return
        ledger = ledger_for(f.mv)
        if ledger is not None and not f.mv[W_MOVED]:
            paired = f.mv[W_FIFO]
            pool_max = min(ledger.gcra.capacity, _rlstate.REFILL_MAX)
            if paired and f.open_fifo(pool_path, pool_max, fresh=False) and f.fifo_ino() == paired:
                if ledger.retire(f):
                    return
            elif ledger.stays(f, ledger.repair(f), _rlstate._now()):
                return
        f.mv[W_MOVED] = 1
        unlink_set(f, data_path, users_path, pool_path)
        if f.pipe < 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pool_path)
    finally:
        _flock(fd, _UN)


def _after_fork_in_child() -> None:
    for page in list(_LIVE):
        page.tlock = threading.Lock()
        page.local = threading.local()
        page.recheck_at = 0
        if page.closed:
            continue
        data_path, users_path, _ = paths(page.name)
        # On failure a field stays -1: the next locked update moves to the path's page.
        with contextlib.suppress(Exception):
            page.files.after_fork(users_path, data_path)


os.register_at_fork(after_in_child=_after_fork_in_child)
