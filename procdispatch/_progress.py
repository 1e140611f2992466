"""Progress reporting: a tqdm bar, plain status lines, or a user callable, fed from stats().

The ``progress`` option picks a *sink*: ``True`` draws a tqdm bar on stderr when stderr is a
terminal and writes a plain status line every :data:`LINE_EVERY` seconds when it is not (a log
file or a CI console would fill up with bar redraws); a tqdm instance given by the user is
updated and closed; any other callable receives a :class:`~procdispatch.Stats` snapshot.

Threads. A daemon thread of the parent (``procdispatch-progress``) takes a snapshot and feeds
the sink at most every :data:`REFRESH` seconds (bars and callables) or :data:`LINE_EVERY`
seconds (lines). It never runs on the coordinator thread, so a slow terminal or callable
delays only the display, never a batch. It is a daemon so that it never keeps the process
alive. The coordinator's shutdown ends it as a step of its own, after the last ``on_drop`` and
before ``on_drained``: :meth:`Reporter.finish` asks for the final report and waits for it at
most :data:`FINISH_WAIT` seconds, so that the final refresh -- the totals after the drain -- is
on screen before ``wait_drained()`` returns and the program prints anything else. A sink still
busy after that bound (a blocked callable, a stderr nobody reads) is named in a WARNING and the
drain goes on; the final report, with the final totals, is made when the sink returns.

Failures. Whatever a sink raises, of whatever class, is its own failure: the first is logged
once at WARNING (naming the sink, with its traceback) and the reports go on; a sink that
failed again is named once more at the end, with the count. A ``SystemExit`` or
``KeyboardInterrupt`` is no exception to that: on this thread it can only come from the sink
itself (Python delivers signals to the main thread), and it must not end the reports.

The total is ``progress_total`` when given, else the sum of the lengths of the sized
iterables given to ``put_many`` and ``aput_many`` (None when there were none: the bar then
shows a count and a rate only).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sized
from typing import IO, Any

from ._admission import Stats
from .errors import OptionsError

__all__ = ["FINISH_WAIT", "LINE_EVERY", "REFRESH", "Reporter", "check_progress"]

#: Seconds between two refreshes of a bar or two calls of a progress callable.
REFRESH = 0.1
#: Seconds between two status lines when stderr is not a terminal.
LINE_EVERY = 5.0
#: Longest the end of a channel waits for the final report: a blocked callable or stderr holds
#: the drain no longer than this.
FINISH_WAIT = 1.0

_EXTRA = "pip install 'procdispatch[progress]'"

log = logging.getLogger("procdispatch")


def is_tqdm(value: object) -> bool:
    """True for a tqdm bar (any of tqdm's classes, or a look-alike with the same methods)."""
    return all(hasattr(value, a) for a in ("update", "refresh", "close", "set_postfix", "n"))


def check_progress(progress: object, progress_total: object) -> None:
    """Validate ``progress`` and ``progress_total``; OptionsError names the option."""
    if not (isinstance(progress, bool) or is_tqdm(progress) or callable(progress)):
        raise OptionsError(
            f"progress must be a bool, a tqdm bar or a callable taking Stats (got {progress!r})"
        )
    if progress is True:
        try:
            import tqdm  # noqa: F401
        except ImportError as exc:
            raise OptionsError(
                f"progress=True needs tqdm, an optional extra: {_EXTRA} "
                f"(got progress=True; tqdm cannot be imported: {exc})"
            ) from exc
    total = progress_total
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
        raise OptionsError(f"progress_total must be an int >= 0 or None (got {progress_total!r})")


class Reporter:
    """One channel's progress display; see the module docstring."""

    def __init__(
        self,
        progress: object,
        total: int | None,
        snapshot: Callable[[], Stats],
        stream: IO[str] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._fixed_total = total
        self._announced: int | None = None
        self._lock = threading.Lock()
        self._stream: IO[str] = stream if stream is not None else sys.stderr
        self._bar: Any = None
        self._call: Callable[[Stats], object] | None = None
        self._interval = REFRESH
        self._own_bar = progress is True and _isatty(self._stream)
        if progress is True:
            if not self._own_bar:
                self._interval = LINE_EVERY
        elif is_tqdm(progress):
            self._bar = progress
        else:
            assert callable(progress)
            self._call = progress
        self._started = time.monotonic()
        self._last_delivered = 0
        self._last_line = self._started
        self._failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procdispatch-progress", daemon=True)

    def start(self) -> None:
        """Draw the bar (if it is ours) and start reporting: once the channel runs."""
        if self._own_bar:
            from tqdm import tqdm

            # mininterval=0: every update draws, and this thread alone paces the draws.
            self._bar = tqdm(
                total=self.total, unit="item", file=self._stream, mininterval=0, miniters=1
            )
        self._started = time.monotonic()
        self._last_line = self._started
        self._thread.start()

    def is_current_thread(self) -> bool:
        """Whether this is the reporting thread (the drain waits for its last report)."""
        return threading.current_thread() is self._thread

    def announce(self, n: int) -> None:
        """``put_many`` or ``aput_many`` was given a sized iterable of ``n`` items."""
        with self._lock:
            self._announced = (self._announced or 0) + n

    @property
    def total(self) -> int | None:
        return self._fixed_total if self._fixed_total is not None else self._announced

    def finish(self) -> None:
        """The channel drained: make the final report, then return. Waits at most
        FINISH_WAIT seconds (and never from the reporting thread itself); a sink still busy
        then is named in a WARNING, and makes the final report when it returns."""
        self._stop.set()
        if not self._thread.is_alive() or threading.current_thread() is self._thread:
            return
        self._thread.join(FINISH_WAIT)
        if self._thread.is_alive():
            log.warning(
                "%s has not returned after %.1fs: the drain goes on without waiting for the "
                "final progress report, which is made when it returns",
                self.describe(),
                FINISH_WAIT,
            )

    def describe(self) -> str:
        """The sink, for a log line: the user's callable or bar by name."""
        from ._outcomes import _name_of

        if self._call is not None:
            return f"progress callable {_name_of(self._call)}"
        if self._own_bar:
            return "the progress bar on stderr"
        if self._bar is not None:
            return f"progress bar {_name_of(type(self._bar))}"
        return "the progress lines on stderr"

    # ---- the reporting thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._report(final=False)
        self._report(final=True)
        if self._failures > 1:
            log.warning(
                "%s failed %d times in all (only the first is logged)",
                self.describe(),
                self._failures,
            )

    def _report(self, *, final: bool) -> None:
        try:
            s = self._snapshot()
            if self._call is not None:
                self._call(s)
            elif self._bar is not None:
                self._draw(s, final)
            else:
                self._line(s, final)
        except BaseException as exc:  # the sink's own failure: see the module docstring
            self._failures += 1
            if self._failures == 1:
                log.warning(
                    "%s raised %s: %s; the progress reports go on",
                    self.describe(),
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )

    def _draw(self, s: Stats, final: bool) -> None:
        bar = self._bar
        total = self.total
        if total is not None and bar.total != total:
            bar.total = total
        bar.set_postfix(
            dropped=s.items_dropped,
            in_flight=s.items_in_flight,
            retried=s.batches_retried,
            refresh=False,
        )
        before = getattr(bar, "last_print_t", None)
        delta = s.items_delivered - bar.n
        if delta:
            bar.update(delta)
        if not delta or getattr(bar, "last_print_t", None) == before:
            bar.refresh()  # update() did not draw: the postfix may still have changed
        if final:
            bar.close()

    def _line(self, s: Stats, final: bool) -> None:
        elapsed = time.monotonic() - self._started
        total = self.total
        of = f"/{total}" if total is not None else ""
        if final:
            rate = s.items_delivered / elapsed if elapsed > 0 else 0.0
            text = (
                f"procdispatch: done in {elapsed:.1f}s: {s.items_put} items put, "
                f"{s.items_delivered} delivered, {s.items_dropped} dropped ({rate:.1f} items/s, "
                f"{s.batches_sent} sends, {s.batches_retried} retried)"
            )
        else:
            now = time.monotonic()
            span = now - self._last_line
            rate = (s.items_delivered - self._last_delivered) / span if span > 0 else 0.0
            self._last_line = now
            text = (
                f"procdispatch: {s.items_delivered}{of} delivered, {s.items_dropped} dropped, "
                f"{s.items_in_flight} in flight, {s.batches_retried} retried "
                f"({rate:.1f} items/s)"
            )
        self._last_delivered = s.items_delivered
        self._stream.write(text + "\n")
        self._stream.flush()


def sized_length(items: object) -> int | None:
    """The length of a sized iterable, or None (a generator's length is not known ahead)."""
    if isinstance(items, Sized):
        try:
            return len(items)
        except Exception:
            return None
    return None


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False
