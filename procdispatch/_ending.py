"""How a channel ends: close, cancel, the waits for the drain, and the end of a ``with`` block.

:class:`Ending` is the channel's part for all of it. It holds the admission (where close and
cancel requests go, and where the drained latch is), the coordinator (for the options and the
first drop's error) and the progress reporter -- never the channel itself, whose collection
closes it. The public methods of :class:`~procdispatch.ProcessChannel` and the asyncio ones
(:mod:`._aio`) call it.

Leaving a ``with`` block normally closes and drains. An exception closes and drains too (and is
re-raised); a KeyboardInterrupt or SystemExit cancels: the first Ctrl-C logs how many sends it
waits for and for how long (``cancel_grace``), a second one ends them at once. A channel left
open at interpreter exit, or collected while open, is closed and drained (see
:mod:`._process_end`).

Waits that would wait for themselves raise instead of hanging. The callbacks ``on_error``,
``on_drop``, ``on_delivered``, ``on_drained`` and the retry policy run on the coordinator
thread, which alone makes room and ends the drain: from there every wait, synchronous or
asynchronous (``asyncio.run`` of it), raises :class:`~.errors.ProcDispatchError` naming the
method and the callback when it would wait -- ``wait_drained``, ``close_and_drain``, leaving a
``with`` block, ``await_drained``, ``aclose_and_drain``, leaving an ``async with`` block, and a
``put``, ``put_many``, ``aput`` or ``aput_many`` that would wait for room
(:class:`~.errors.BufferFull` for those); :func:`reentry_errors` builds these errors. The drain
ends with the last report of a ``progress`` callable, made on its own thread: from there the
waits for the drain raise as well. So does a drain waited for by a signal handler that
interrupted a ``put`` of the same channel in the lock the drain needs. Calls that do not wait
are fine anywhere: a ``put`` or ``aput`` with room, ``put_nowait``, ``stats``, ``close``,
``cancel``. Every ``timeout=`` follows ``queue.Queue``'s rules (see
:func:`._waits.check_timeout`) and is checked before the call does anything.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import CodeType
from typing import TYPE_CHECKING, Any

from . import _process_end
from ._admission import Admission
from ._outcomes import _name_of
from ._waits import check_timeout
from .errors import BufferFull, ItemsDropped, ProcDispatchError

if TYPE_CHECKING:
    from ._coordinator import Coordinator
    from ._progress import Reporter

__all__ = ["Ending", "reentry_errors"]

log = logging.getLogger("procdispatch")

#: How long a drain waited for from a signal handler lets the admission lock stay taken
#: before deciding that the put the handler interrupted holds it.
_LOCK_PROBE = 1.0


class Ending:
    """One channel's close, cancel and drain waits; see the module docstring."""

    def __init__(
        self,
        adm: Admission,
        coord: Coordinator,
        progress: Reporter | None,
        user_code: Mapping[str, object],
    ) -> None:
        self.adm = adm
        self.opts = coord.opts
        self._coord = coord
        self._progress = progress
        #: the user's callables that run on a worker, by option name (for the reentry error)
        self._user_code = user_code

    def check_not_inherited(self) -> None:
        if self.adm.inherited_by_fork:
            self.adm._check_open(0)  # raises the error that explains it

    def close(self) -> None:
        self.check_not_inherited()
        self.adm.request_close()

    def cancel(self) -> None:
        self.check_not_inherited()
        self.adm.request_cancel()

    def wait_drained(self, timeout: float | None) -> bool:
        self.check_not_inherited()
        seconds = check_timeout("wait_drained", timeout)
        if seconds != 0 and not self.adm.drained.is_set():
            self.check_can_wait("wait_drained() cannot be called")
        return self.adm.drained.wait(seconds)

    def close_and_drain(self, timeout: float | None) -> bool:
        self.check_not_inherited()
        seconds = check_timeout("close_and_drain", timeout)
        if seconds != 0 and not self.adm.drained.is_set():
            self.check_can_wait("close_and_drain() cannot be called")
        self.close()
        ok = self.adm.drained.wait(seconds)
        if ok:
            self.raise_after_drain()
        return ok

    def raise_after_drain(self) -> None:
        """Once drained: the error that killed the channel, then ItemsDropped if asked for."""
        if self.adm.fatal is not None:
            raise self.adm.fatal
        if self.opts.raise_on_drop:
            dropped = self.adm.snapshot().items_dropped
            if dropped:
                raise ItemsDropped(dropped, self._coord.first_drop_error)

    # ---- waits that would wait for themselves -------------------------------------------------

    def reentry(self, what: str) -> BaseException | None:
        """The error for a wait for the drain made on a thread the drain waits for: the
        coordinator's, the one that makes the last progress report, or a worker thread of the
        thread backend running the user's code; None elsewhere."""
        if self.adm.coordinator_ident == threading.get_ident():
            err: BaseException = self.adm.reentry_error(what)
            return err
        user_code = self.opts.backend.running_user_code()
        if user_code is not None:
            name = _name_of(self._user_code.get(user_code))
            return ProcDispatchError(
                f"{what} from {user_code} ({name}) on a worker of the channel: the drain waits "
                f"for this worker's {user_code} to return, so it would wait for itself (call "
                "close() or cancel() there: they do not wait)"
            )
        progress = self._progress
        if progress is not None and progress.is_current_thread():
            name = _name_of(self.opts.progress)
            return ProcDispatchError(
                f"{what} from the progress callable ({name}): the drain ends with its last "
                "report, made on this thread, so it would wait for itself (call close() or "
                "cancel() there: they do not wait)"
            )
        return None

    def check_can_wait(self, what: str) -> None:
        """Raise instead of waiting for the drain when the wait would wait for itself."""
        adm = self.adm
        err = self.reentry(what)
        if err is not None:
            raise err
        if adm.lock.locked() and _interrupts_a_producer(adm):
            # A signal handler on top of put(): if that put holds the lock, the coordinator
            # cannot take what was put, and the drain never ends. Another thread holding the
            # lock lets it go within microseconds.
            deadline = time.monotonic() + _LOCK_PROBE
            while adm.lock.locked():
                if time.monotonic() >= deadline:
                    raise ProcDispatchError(
                        f"{what} from a signal handler that interrupted put() or put_many() of "
                        "the same channel: that call holds the lock the drain needs, so it "
                        "would wait for itself (call close() or cancel() there, and wait after "
                        "the put returned)"
                    )
                time.sleep(_LOCK_PROBE / 100)

    # ---- the end of a with block ---------------------------------------------------------------

    def exit(self, exc_type: type[BaseException] | None) -> None:
        """Leaving a ``with`` block; see the module docstring."""
        if self.adm.inherited_by_fork:
            return  # nothing of it runs in this process
        err = self.reentry("leaving a with block of the channel cannot wait")
        if err is not None:
            # In a callback: end the channel as the block would, but do not wait for it.
            if exc_type is None or issubclass(exc_type, (Exception, GeneratorExit)):
                self.close()
            else:
                self.cancel()
            raise err
        if exc_type is not None and not issubclass(exc_type, (Exception, GeneratorExit)):
            deadline = _process_end.sigterm_deadline()
            if issubclass(exc_type, SystemExit) and deadline is not None:
                self._drain_until(deadline)  # SIGTERM under drain_on_sigterm
            else:
                self._cancel_and_wait(f"{exc_type.__name__} in the with block")
            return
        try:
            self.close()
            self.wait_drained(None)
        except BaseException as interrupt:
            self._cancel_and_wait(f"{type(interrupt).__name__} while draining")
            raise
        if exc_type is None:
            self.raise_after_drain()

    def _cancel_and_wait(self, why: str) -> None:
        """Cancel, say what is waited for, and wait; a Ctrl-C during the wait ends the sends
        still in flight at once (their batches still reach on_drop)."""
        self.cancel()
        n = self.adm.snapshot().batches_in_flight
        if n:
            log.warning(
                "%s: channel cancelled; waiting up to %.1fs (cancel_grace) for %d send(s) in "
                "flight; Ctrl-C again to stop them now (their batches are dropped)",
                why,
                self.opts.cancel_grace,
                n,
            )
        try:
            self.wait_drained(None)
        except KeyboardInterrupt:
            n = self.adm.snapshot().batches_in_flight
            log.warning("Ctrl-C again: stopping %d send(s) in flight now", n)
            self.adm.request_cancel(kill=True)
            self.wait_drained(None)

    def _drain_until(self, deadline: float) -> None:
        self.close()
        if not self.wait_drained(max(0.0, deadline - time.monotonic())):
            self._cancel_and_wait("SIGTERM drain timed out")


def _interrupts_a_producer(adm: Admission) -> bool:
    """Whether this thread's stack holds a put of ``adm`` (a signal handler runs on top)."""
    codes = (Admission.put_one.__code__, Admission.admit.__code__)
    f = sys._getframe(2)
    while f is not None:
        if f.f_code in codes and f.f_locals.get("self") is adm:
            return True
        f = f.f_back  # type: ignore[assignment]
    return False


def reentry_errors(opts: Any) -> Callable[[str], BaseException]:
    """The error for a wait from the coordinator thread, naming the callback that made it."""
    callbacks = {
        "on_error": opts.on_error,
        "on_drop": opts.on_drop,
        "on_drained": opts.on_drained,
        "on_delivered": opts.on_delivered,
        "the retry policy": opts.buffer.retry,
    }

    def build(what: str) -> BaseException:
        codes = {}
        for name, fn in callbacks.items():
            code = _code_of(fn)
            if code is not None:
                codes[code] = name
        name = "a callback (on_error, on_drop, on_drained, on_delivered or the retry policy)"
        f = sys._getframe(1)
        while f is not None:
            if f.f_code in codes:
                name = codes[f.f_code]
                break
            f = f.f_back  # type: ignore[assignment]
        if what.endswith("cannot wait for room"):
            return BufferFull(
                f"{what} from {name}: the buffer is full, and the coordinator thread, which "
                f"runs {name}, is what makes room, so it would wait for itself (use "
                "put_nowait() and handle BufferFull there)"
            )
        return ProcDispatchError(
            f"{what} from {name}: the coordinator thread runs {name} and ends the drain, so "
            "it would wait for itself (call close() or cancel() there: they do not wait)"
        )

    return build


def _code_of(fn: object) -> CodeType | None:
    """The code object a call of ``fn`` runs first (functions, methods, partials, objects)."""
    for _ in range(8):
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        code = getattr(fn, "__code__", None)
        if isinstance(code, CodeType):
            return code
        inner = getattr(fn, "__func__", None)
        if inner is not None:
            fn = inner
            continue
        if not callable(fn) or isinstance(fn, type):
            return None
        fn = type(fn).__call__
    return None
