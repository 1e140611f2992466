"""The rules option values must follow, each check raising one OptionsError shape.

:meth:`Options.resolve <procdispatch._options.Options.resolve>` runs these. A message reads
"*option* must be *rule* (got *value*)", with the option named as the user spelled it. Also
here: what a value is normalised to (``qps_limit``'s limiter or parsed rate, plain floats) and
the derived default of ``start_method``.
"""

from __future__ import annotations

import math
import multiprocessing
import sys
from typing import TYPE_CHECKING

from .backends._usercode import lazy_kind
from .errors import OptionsError

if TYPE_CHECKING:
    from ._limiter.gcra import ParsedRate
    from ._limiter.limiter import RateLimiter
    from ._limiter.remote import RemoteLimit

__all__ = [
    "check_body_runs",
    "check_bool",
    "check_callable",
    "check_int",
    "check_min_qps",
    "check_number",
    "check_start_method",
    "default_start_method",
    "float_or_none",
    "normalise_qps",
]


def default_start_method() -> str:
    """The platform's safe default: forkserver where it exists (Linux), else spawn.

    ``fork`` is never the default: the parent runs a coordinator thread (and often producer
    threads), and forking a process that runs threads can deadlock the child.
    """
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "forkserver" in methods:
        return "forkserver"
    return "spawn"


def check_number(
    name: str, value: object, *, minimum: float, strict: bool, allow_none: bool
) -> None:
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


def check_int(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        rule = "an int >= 1" + (" or None" if allow_none else "")
        raise OptionsError(f"{name} must be {rule} (got {value!r})")


def check_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise OptionsError(f"{name} must be callable or None (got {value!r})")


#: What a call of each kind of function (see ``lazy_kind``) makes instead of running its body.
_BUILDS = {
    "a generator function": "a generator",
    "an async generator function": "an async generator",
    "a coroutine function": "a coroutine",
}


def check_body_runs(name: str, value: object, *, in_worker: bool) -> None:
    """Refuse a callable whose call would only build a generator (or, in the parent, where
    nothing awaits, a coroutine): its body would never run, and nothing would say so. Workers
    await coroutines (``send_fn``, ``worker_init``); the parent calls its callbacks as plain
    functions."""
    kind = lazy_kind(value) if value is not None else None
    if kind is None or (in_worker and kind == "a coroutine function"):
        return
    made = f"calling it only makes {_BUILDS[kind]}"
    if in_worker:
        outcome = _NEVER_RUN.get(name, "")
        raise OptionsError(
            f"{name} must not be {kind} (got {value!r}): {made}, which a worker does not "
            f"iterate, so its body would never run{outcome}; make it a plain function, or an "
            "async def (a worker awaits its coroutine)"
        )
    raise OptionsError(
        f"{name} must not be {kind} (got {value!r}): {made}, and the parent calls {name} as a "
        "plain function (it neither iterates nor awaits what that returns), so its body would "
        "never run; make it a plain function"
    )


#: What a worker-side callable whose body never runs would silently lead to.
_NEVER_RUN = {
    "send_fn": " and every batch would count as delivered",
    "worker_init": " and workers would start without it",
}


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionsError(f"{name} must be a bool (got {value!r})")


def float_or_none(value: float | None) -> float | None:
    return float(value) if value is not None else None


def normalise_qps(
    qps_limit: object, qps_burst: object
) -> RateLimiter | ParsedRate | RemoteLimit | None:
    """``qps_limit`` normalised once; OptionsError names the options as the user spelled them."""
    if qps_limit is None:
        check_int("qps_burst", qps_burst, allow_none=False)
        return None
    from ._limiter.limiter import RateLimiter  # only with a limit: it is not needed otherwise

    if isinstance(qps_limit, RateLimiter):
        check_int("qps_burst", qps_burst, allow_none=False)
        if qps_limit.closed:
            raise OptionsError(f"qps_limit must be an open RateLimiter (got {qps_limit!r})")
        return qps_limit
    from ._limiter.remote import remote_limit

    remote = remote_limit(qps_limit, qps_burst)
    if remote is not None:
        return remote
    from ._limiter.gcra import parse_rate

    return parse_rate(qps_limit, qps_burst, what="qps_limit", burst_what="qps_burst")


def _per_second(qps: RateLimiter | ParsedRate | RemoteLimit) -> float | None:
    """The long-run sends per second a normalised ``qps_limit`` allows (one formula:
    :func:`~procdispatch._limiter.gcra.parse_rate`'s; a Limiter's tightest rate), or None when
    a Limiter's buckets are made on demand."""
    from ._limiter.gcra import ParsedRate
    from ._limiter.remote import RemoteLimit

    if isinstance(qps, (ParsedRate, RemoteLimit)):
        return qps.per_second
    return qps.rate_per_second


def check_min_qps(
    min_qps: float | None, qps: RateLimiter | ParsedRate | RemoteLimit | None
) -> None:
    """``min_qps``: None, or a finite number > 0 no greater than what ``qps_limit`` allows
    (``qps`` is its normalised form; a Limiter making its buckets on demand allows any)."""
    check_number("min_qps", min_qps, minimum=0, strict=True, allow_none=True)
    if min_qps is not None:
        if math.isinf(min_qps):
            raise OptionsError(f"min_qps must be finite (got {min_qps!r})")
        cap = None if qps is None else _per_second(qps)  # None: not known
        if cap is not None and min_qps > cap:
            raise OptionsError(
                f"min_qps must be <= qps_limit ({cap:g} per second) (got {min_qps!r})"
            )


def check_start_method(start_method: object) -> None:
    """``start_method``: None, or one of the platform's multiprocessing start methods."""
    methods = multiprocessing.get_all_start_methods()
    if start_method is not None and start_method not in methods:
        raise OptionsError(
            f"start_method must be one of {', '.join(methods)} or None (got {start_method!r})"
        )
