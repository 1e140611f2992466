"""ProcessChannel options: every default and every validation rule, in one place.

Messages follow one shape -- "*option* must be *rule* (got *value*)" -- and every failure is an
:class:`~procdispatch.errors.OptionsError` raised before any thread or process exists.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ._fullbehavior import check_int_limit
from .buffer import BlockNewItems, BufferOptions, FullBehavior
from .errors import OptionsError

__all__ = ["BACKENDS", "ChannelOptions", "default_start_method"]

BACKENDS = ("process", "thread")


def default_start_method() -> str:
    """The platform's safe default: forkserver where it exists (Linux), else spawn.

    ``fork`` is never the default: the parent runs a coordinator thread (and often producer
    threads), and forking a process that runs threads can deadlock the child.
    """
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "forkserver" in methods:
        return "forkserver"
    return "spawn"


def _number(name: str, value: object, *, minimum: float, strict: bool, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    rule = f"a number {'>' if strict else '>='} {minimum:g}"
    if allow_none:
        rule += " or None"
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        assert isinstance(value, (int, float))
        ok = not math.isnan(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise OptionsError(f"{name} must be {rule} (got {value!r})")


def _int(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        rule = "an int >= 1" + (" or None" if allow_none else "")
        raise OptionsError(f"{name} must be {rule} (got {value!r})")


def _callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise OptionsError(f"{name} must be callable or None (got {value!r})")


@dataclass(frozen=True)
class ChannelOptions:
    """The validated options of one channel (the README's options table says what each means)."""

    workers: int
    max_leases: int
    buffer: BufferOptions
    item_size: Callable[[Any], int] | None
    qps_limit: object
    qps_burst: int
    min_qps: float | None
    on_error: Callable[[Any, BaseException], bool] | None
    on_drop: Callable[[Any, bool], None] | None
    on_drained: Callable[[], None] | None
    worker_init: Callable[[], object] | None
    send_timeout: float | None
    cancel_grace: float
    start_timeout: float
    delivery_timeout: float | None
    raise_on_drop: bool
    max_batches_per_worker: int | None
    max_worker_memory: int | None
    start_method: str
    backend: str

    @classmethod
    def build(
        cls,
        *,
        workers: int | None,
        max_leases: int | None,
        batch_items_max: int | None,
        batch_size_max: int | None,
        batch_age_max: float,
        item_size: Callable[[Any], int] | None,
        full_behavior: FullBehavior | None,
        retry: Callable[[], Iterator[float]] | None,
        fifo: bool,
        qps_limit: object,
        qps_burst: int,
        min_qps: float | None,
        on_error: Callable[[Any, BaseException], bool] | None,
        on_drop: Callable[[Any, bool], None] | None,
        on_drained: Callable[[], None] | None,
        worker_init: Callable[[], object] | None,
        send_timeout: float | None,
        cancel_grace: float,
        start_timeout: float,
        delivery_timeout: float | None,
        raise_on_drop: bool,
        max_batches_per_worker: int | None,
        max_worker_memory: int | None,
        start_method: str | None,
        backend: str,
    ) -> ChannelOptions:
        """Validate every option (the defaults live in ProcessChannel's signature)."""
        if workers is None:
            workers = os.cpu_count() or 1
        _int("workers", workers, allow_none=False)
        _int("max_leases", max_leases, allow_none=True)
        leases = max_leases if max_leases is not None else workers
        if full_behavior is None:
            full_behavior = BlockNewItems()
        if isinstance(full_behavior, FullBehavior):
            check_int_limit("batch_items_max", batch_items_max)  # before they are used here
            check_int_limit("batch_size_max", batch_size_max)
            # A channel's derived item limit leaves room for every lease full plus as much
            # queued; the pure buffer's smaller default would keep workers idle.
            full_behavior = full_behavior.resolve(batch_items_max, batch_size_max, leases=leases)
        buf = BufferOptions(
            max_leases=leases,
            batch_items_max=batch_items_max,
            batch_size_max=batch_size_max,
            batch_age_max=batch_age_max,
            full_behavior=full_behavior,
            retry=retry,
            fifo=fifo,
        ).validated()
        _callable("item_size", item_size)
        if batch_size_max is not None and item_size is None:
            raise OptionsError(
                f"batch_size_max needs item_size to measure items (got batch_size_max="
                f"{batch_size_max!r}, item_size=None)"
            )
        _int("qps_burst", qps_burst, allow_none=False)
        check_qps_limit(qps_limit)
        _number("min_qps", min_qps, minimum=0, strict=True, allow_none=True)
        if min_qps is not None:
            if math.isinf(min_qps):
                raise OptionsError(f"min_qps must be finite (got {min_qps!r})")
            cap = qps_rate(qps_limit)
            if cap is not None and min_qps > cap:
                raise OptionsError(
                    f"min_qps must be <= qps_limit ({cap:g} per second) (got {min_qps!r})"
                )
        for name, fn in (
            ("on_error", on_error),
            ("on_drop", on_drop),
            ("on_drained", on_drained),
            ("worker_init", worker_init),
        ):
            _callable(name, fn)
        _number("send_timeout", send_timeout, minimum=0, strict=True, allow_none=True)
        _number("cancel_grace", cancel_grace, minimum=0, strict=False, allow_none=False)
        _number("start_timeout", start_timeout, minimum=0, strict=True, allow_none=False)
        _number("delivery_timeout", delivery_timeout, minimum=0, strict=True, allow_none=True)
        if not isinstance(raise_on_drop, bool):
            raise OptionsError(f"raise_on_drop must be a bool (got {raise_on_drop!r})")
        _int("max_batches_per_worker", max_batches_per_worker, allow_none=True)
        _int("max_worker_memory", max_worker_memory, allow_none=True)
        if backend not in BACKENDS:
            raise OptionsError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        methods = multiprocessing.get_all_start_methods()
        if start_method is not None and start_method not in methods:
            raise OptionsError(
                f"start_method must be one of {', '.join(methods)} or None (got {start_method!r})"
            )
        return cls(
            workers=workers,
            max_leases=leases,
            buffer=buf,
            item_size=item_size,
            qps_limit=qps_limit,
            qps_burst=qps_burst,
            min_qps=float(min_qps) if min_qps is not None else None,
            on_error=on_error,
            on_drop=on_drop,
            on_drained=on_drained,
            worker_init=worker_init,
            send_timeout=float(send_timeout) if send_timeout is not None else None,
            cancel_grace=float(cancel_grace),
            start_timeout=float(start_timeout),
            delivery_timeout=float(delivery_timeout) if delivery_timeout is not None else None,
            raise_on_drop=raise_on_drop,
            max_batches_per_worker=max_batches_per_worker,
            max_worker_memory=max_worker_memory,
            start_method=start_method or default_start_method(),
            backend=backend,
        )


def check_qps_limit(qps_limit: object) -> None:
    """Validate ``qps_limit``: None, a rate > 0, pyrate-limiter Rate(s), or a RateLimiter."""
    if qps_limit is None:
        return
    from ._ratelimit import RateLimiter  # only with a limit: it is not needed otherwise

    if isinstance(qps_limit, RateLimiter):
        if qps_limit.closed:
            raise OptionsError(f"qps_limit must be an open RateLimiter (got {qps_limit!r})")
        return
    if isinstance(qps_limit, bool):
        raise OptionsError(
            f"qps_limit must be a rate > 0, Rate(s) or a RateLimiter (got {qps_limit!r})"
        )
    if isinstance(qps_limit, (int, float)):
        if math.isnan(qps_limit) or math.isinf(qps_limit) or qps_limit <= 0:
            raise OptionsError(
                f"qps_limit must be a finite number of sends per second > 0 or None "
                f"(got {qps_limit!r})"
            )
        return
    # Rate objects (or a sequence of them) are validated by RateLimiter itself.
    RateLimiter.check_rates(qps_limit)


def qps_rate(qps_limit: object) -> float | None:
    """The long-run sends per second that ``qps_limit`` allows (None: unlimited)."""
    if qps_limit is None:
        return None
    if isinstance(qps_limit, (int, float)) and not isinstance(qps_limit, bool):
        return float(qps_limit)
    from ._ratelimit import RateLimiter

    if isinstance(qps_limit, RateLimiter):
        return float(qps_limit.rate_per_second)
    rates: Sequence[Any] = qps_limit if isinstance(qps_limit, Sequence) else [qps_limit]
    return float(min(r.limit * 1000.0 / r.interval for r in rates))
