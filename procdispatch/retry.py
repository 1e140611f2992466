"""Retry policies: factories of per-batch delay iterators.

A policy is a zero-argument callable returning a fresh iterator of delays in float seconds, one
iterator per batch. Each failed send that ``on_error`` wants retried takes the next delay; when
the iterator is exhausted (``StopIteration``) the batch is given up and reported to ``on_drop``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import OptionsError, ProcDispatchError

if TYPE_CHECKING:
    from ._batch import Batch

__all__ = ["RetryFactory", "exponential", "limited", "next_delay", "none"]

RetryFactory = Callable[[], Iterator[float]]


def _check_delay(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionsError(f"{name} must be a number of seconds >= 0 (got {value!r})")
    if math.isnan(value) or value < 0:
        raise OptionsError(f"{name} must be a number of seconds >= 0 (got {value!r})")
    return float(value)


def exponential(
    initial: float = 0.2,
    multiplier: float = 1.2,
    max_delay: float = 60.0,
    max_attempts: int | None = None,
) -> RetryFactory:
    """Delays ``initial``, ``initial*multiplier``, ... capped at ``max_delay``.

    ``max_attempts`` counts sends, so ``max_attempts=3`` allows two retries; ``None`` retries
    for ever (the default policy).
    """
    initial = _check_delay("exponential.initial", initial)
    max_delay = _check_delay("exponential.max_delay", max_delay)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise OptionsError(f"exponential.multiplier must be a number >= 1 (got {multiplier!r})")
    if math.isnan(multiplier) or multiplier < 1:
        raise OptionsError(f"exponential.multiplier must be a number >= 1 (got {multiplier!r})")
    if max_attempts is not None and (
        isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
    ):
        raise OptionsError(f"exponential.max_attempts must be >= 1 or None (got {max_attempts!r})")
    mult = float(multiplier)

    def factory() -> Iterator[float]:
        delay = initial
        retries = None if max_attempts is None else max_attempts - 1
        while retries is None or retries > 0:
            if retries is not None:
                retries -= 1
            yield min(delay, max_delay)
            delay = min(delay * mult, max_delay)

    return factory


def limited(retries: int, delay: float = 0.0) -> RetryFactory:
    """``retries`` retries, each after ``delay`` seconds, then give up."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise OptionsError(f"limited.retries must be an int >= 0 (got {retries!r})")
    d = _check_delay("limited.delay", delay)

    def factory() -> Iterator[float]:
        for _ in range(retries):
            yield d

    return factory


def none() -> RetryFactory:
    """Never retry: the first failure drops the batch."""

    def factory() -> Iterator[float]:
        return iter(())

    return factory


def next_delay(factory: RetryFactory, batch: Batch[Any]) -> float | None:
    """The batch's next retry delay from its own iterator (made by ``factory`` on first use);
    None when it is exhausted. A policy is user code: a factory that raises or returns no
    iterator, or a delay that is not a finite number of seconds >= 0, raises here."""
    it = batch._retry
    if it is None:  # made on first use: most batches never fail
        made = factory()
        try:
            it = iter(made)
        except TypeError:
            raise TypeError(
                f"retry must return an iterator of delays in seconds (it returned {made!r})"
            ) from None
        batch._retry = it
    delay = next(it, None)
    if delay is None:
        return None
    if (
        isinstance(delay, bool)
        or not isinstance(delay, (int, float))
        or not math.isfinite(delay)
        or delay < 0
    ):
        raise ProcDispatchError(
            f"retry delays must be finite numbers of seconds >= 0 (got {delay!r} for batch "
            f"{batch.id}, attempt {batch.attempt})"
        )
    return float(delay)
