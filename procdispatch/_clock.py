"""The coordinator's clock: every time it reads, and its one wait, go through here.

The coordinator never reads ``time.monotonic`` itself: it is given a :class:`Clock`. The real
one reads the monotonic clock and waits in the selector; a test's clock can stand still between
events and jump straight to the next deadline, so that a loop with ten-second timeouts is driven
through its decisions in milliseconds, at literal times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

__all__ = ["Clock", "RealClock"]

R = TypeVar("R")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (any origin)."""
        ...

    def wait(self, select: Callable[[float | None], R], timeout: float | None) -> R:
        """Wait in ``select`` (the coordinator's selector) for at most ``timeout`` seconds of
        this clock (None: until something is ready)."""
        ...


class RealClock:
    """The monotonic clock, and a real wait."""

    now = staticmethod(time.monotonic)

    @staticmethod
    def wait(select: Callable[[float | None], R], timeout: float | None) -> R:
        return select(timeout)
