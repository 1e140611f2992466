"""Pure GCRA maths for the rate limiter: no clock, no locks, no I/O; time is an argument.

GCRA (the generic cell rate algorithm) is a token bucket kept as one number per window, the
*theoretical arrival time* (TAT). A :class:`Window` is two integers: the emission interval ``T``
(nanoseconds per unit) and the capacity ``b`` (units that may pass at once from rest). An
arrival of ``w`` units at ``now`` conforms when::

    max(TAT, now) + w*T - b*T <= now

and admitting it sets ``TAT = max(TAT, now) + w*T``. A TAT at or before ``now`` means "full"
(the state starts at TAT 0, so a new limiter starts full). Times are integer nanoseconds, so the
arithmetic is exact and nothing drifts by rounding.

Guarantee: each admitted unit pushes TAT forward by ``T`` and an admission never leaves TAT
more than ``b*T`` ahead of its own time, so the units admitted in any closed time span of length
``L`` number at most ``b + L // T`` (:meth:`Window.max_units`). :func:`parse_rate` picks ``T`` so
that this bound is the promise made to the user:

* ``r`` per second with burst ``b``: ``T = ceil(1 s / r)``, so no 1-second window holds more
  than ``b + floor(r) <= r + b`` units.
* ``Rate(limit, interval)`` (pyrate-limiter) with burst ``1 <= b <= limit``:
  ``T = interval // (limit - b + 1) + 1``, so no ``interval``-long window holds more than
  ``limit`` units. ``b = 1`` (the default) spaces units evenly at the full rate; a larger ``b``
  lets ``b`` units go at once and pays for it in sustained rate (``limit - b + 1`` per
  interval). The textbook mapping (``T = interval / limit``, ``b = limit``) would admit up to
  ``2*limit - 1`` in one window, which is why it is not used. ``b`` is the Rate's own
  ``burst`` when it was given one below its limit (``Rate(limit, interval, burst=b)``,
  pyrate's way to say "``b`` at once"), and the limiter's ``burst`` argument otherwise: a
  Rate's burst left at pyrate's default, the limit, cannot be told from one set to the limit,
  and both mean "the limiter's burst", as they always have.

Several windows all hold: an arrival is admitted only if every window admits it, and then every
TAT moves (all or nothing). :meth:`Gcra.take` can also admit *in the future*: with
``max_wait_ns > 0`` it books the earliest conforming instant ``now + wait``, which is how a
blocking acquire queues without losing the time it oversleeps.

Refunds. Giving back ``w`` units taken at time ``t_r`` cannot simply subtract ``w*T``: if other
arrivals came after ``t_r`` once the bucket had refilled, the refunded units no longer sit in the
TAT, and subtracting would hand out capacity twice. So the state also counts admitted units
(never decreased by refunds) and keeps the latest admission time. Each TAT is the largest, over
admissions ``j``, of ``t_j + T * (units admitted from j on)``: dropping ``w`` units of admission
``r`` lowers the terms for ``j <= r`` by ``w*T`` and leaves those for ``j > r``, each at most
``last + T * (units admitted after r)``. :meth:`Gcra.refund` keeps the larger of the two bounds:
exact when nothing was admitted since the reservation, never more generous than the truth.

Merging. When two states that were kept apart (one limiter's budget split over two pages, say)
become one again, each window's outstanding debt, ``TAT - now`` where positive, is added to the
other's: the merged window is as far from full as both were together (:meth:`Gcra.merge`).

A state is a flat tuple of ints, the layout of a slot in shared memory::

    (units admitted so far, latest admission time, TAT of window 0, TAT of window 1, ...)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from ..errors import OptionsError

__all__ = [
    "MAX_WINDOWS",
    "NS_PER_S",
    "Gcra",
    "ParsedRate",
    "State",
    "Window",
    "parse_rate",
    "seconds_ns",
]

NS_PER_S = 1_000_000_000
MAX_WINDOWS = 32
_MAX_SPAN_NS = 2**60  # keeps every TAT well inside int64
_FOREVER_NS = 2**62

State = tuple[int, ...]


@dataclass(frozen=True)
class Window:
    """One GCRA constraint: ``emission_ns`` per unit, ``capacity`` units at once from rest."""

    emission_ns: int
    capacity: int

    def __post_init__(self) -> None:
        if self.emission_ns < 1 or self.capacity < 1:
            raise ValueError(f"Window needs emission_ns >= 1 and capacity >= 1 (got {self!r})")

    def max_units(self, span_ns: int) -> int:
        """The most units this window can ever admit within a closed span of ``span_ns``."""
        return self.capacity + span_ns // self.emission_ns


class Take(Protocol):
    def __call__(
        self, state: State, now: int, weight: int, max_wait_ns: int = 0, reserved: int = 0
    ) -> tuple[int, State | None]: ...


def _take_one(emission: int, tolerance: int) -> Take:
    """:meth:`Gcra.take` for a single window, with its constants bound."""

    def take(
        state: State, now: int, weight: int, max_wait_ns: int = 0, reserved: int = 0
    ) -> tuple[int, State | None]:
        units, last, tat = state
        cost = weight * emission
        # From max(tat, now): an idle window holds ``capacity``, and no more, for both.
        wait = (tat if tat > now else now) + cost + reserved * emission - tolerance - now
        if wait > max_wait_ns:
            return wait, None
        at = now + wait if wait > 0 else now
        return wait if wait > 0 else 0, (
            units + weight,
            last if last > at else at,
            (tat if tat > at else at) + cost,
        )

    return take


def _room_one(emission: int, tolerance: int, capacity: int) -> Callable[[State, int], int]:
    """:meth:`Gcra.room` for a single window, with its constants bound."""

    def room(state: State, now: int) -> int:
        tat = state[2]
        free = (now + tolerance - (tat if tat > now else now)) // emission
        return capacity if free > capacity else (free if free > 0 else 0)

    return room


class Gcra:
    """GCRA over one or more windows. Immutable; every method is a pure function of its inputs."""

    __slots__ = ("_pairs", "capacity", "room", "take", "windows")

    def __init__(self, windows: Sequence[Window]) -> None:
        if not windows:
            raise ValueError("Gcra needs at least one Window")
        self.windows: tuple[Window, ...] = tuple(windows)
        #: The largest weight that can ever be admitted (every window must hold it at once).
        self.capacity: int = min(w.capacity for w in self.windows)
        self._pairs = tuple((w.emission_ns, w.capacity * w.emission_ns) for w in self.windows)
        #: ``take(state, now, weight, max_wait_ns=0, reserved=0) -> (wait, new_state)``: admit
        #: ``weight`` units at the earliest conforming instant, ``now + wait``, if
        #: ``wait <= max_wait_ns``; otherwise ``new_state`` is None and nothing is taken.
        #: ``weight`` must be between 1 and :attr:`capacity` (the caller checks). ``reserved``
        #: units are kept free: the instant is one at which ``weight + reserved`` would conform
        #: (they are not taken).
        self.take: Take = _take_one(*self._pairs[0]) if len(self._pairs) == 1 else self._take_many
        #: ``room(state, now) -> int``: how many units would conform at ``now`` under every
        #: window, taken one by one (at most :attr:`capacity`; 0 while any window is booked
        #: beyond its tolerance).
        self.room: Callable[[State, int], int] = (
            _room_one(*self._pairs[0], self.capacity) if len(self._pairs) == 1 else self._room
        )

    def initial(self) -> State:
        """A limiter that has never admitted anything: full."""
        return (0, 0) + (0,) * len(self._pairs)

    def wait_ns(self, state: State, now: int, weight: int) -> int:
        """Nanoseconds from ``now`` until ``weight`` units conform under every window (0: now)."""
        worst = 0
        for tat, (emission, tolerance) in zip(state[2:], self._pairs, strict=True):
            worst = max(worst, tat + weight * emission - tolerance - now)
        return worst

    def _room(self, state: State, now: int) -> int:
        free = self.capacity
        for tat, (emission, tolerance) in zip(state[2:], self._pairs, strict=True):
            free = min(free, (now + tolerance - (tat if tat > now else now)) // emission)
        return max(free, 0)

    def charge(self, state: State, now: int, units: int) -> State:
        """``units`` admitted at ``now`` without asking (they were taken already, elsewhere):
        every TAT moves as for an admission, booked beyond the tolerance if need be."""
        if units < 0:
            raise ValueError(f"bad charge: units={units}")
        if not units:
            return state
        last = state[1]
        head = (state[0] + units, last if last > now else now)
        if len(state) == 3:
            tat = state[2]
            return (*head, (tat if tat > now else now) + units * self._pairs[0][0])
        tats = [
            (tat if tat > now else now) + units * emission
            for tat, (emission, _) in zip(state[2:], self._pairs, strict=True)
        ]
        return (*head, *tats)

    def _take_many(
        self, state: State, now: int, weight: int, max_wait_ns: int = 0, reserved: int = 0
    ) -> tuple[int, State | None]:
        tats = state[2:]
        pairs = self._pairs
        need = weight + reserved
        wait = (
            max([max(t, now) + need * e - tol for t, (e, tol) in zip(tats, pairs, strict=True)])
            - now
        )
        if wait > max_wait_ns:
            return wait, None
        wait = max(wait, 0)
        at = now + wait
        new = [state[0] + weight, max(state[1], at)]
        for tat, (emission, _) in zip(tats, pairs, strict=True):
            new.append((tat if tat > at else at) + weight * emission)
        return wait, tuple(new)

    def owes(self, state: State, now: int) -> bool:
        """Whether any window is below full at ``now`` (some TAT after it): a state that owes
        nothing admits exactly what :meth:`initial` would."""
        for tat in state[2:]:  # noqa: SIM110 (a generator closed early can swallow an interrupt)
            if tat > now:
                return True
        return False

    def merge(self, state: State, other: State, now: int) -> State:
        """``state`` with ``other``'s outstanding debt at ``now`` added to every window (each
        TAT moves by ``other``'s ``TAT - now`` where positive). The unit count grows by the
        units that debt stands for, and the latest admission is the later one, so that refunds
        of admissions made before the merge count the merged ones as later: strict."""
        tats = []
        units = 0
        for mine, theirs, (emission, _) in zip(state[2:], other[2:], self._pairs, strict=True):
            debt = theirs - now if theirs > now else 0
            tats.append((mine if mine > now else now) + debt)
            units = max(units, -(-debt // emission))
        return (state[0] + units, max(state[1], other[1]), *tats)

    def refund(self, state: State, weight: int, units_at_take: int) -> State:
        """Give back ``weight`` units of an admission after which the unit count was
        ``units_at_take``. Exact when nothing was admitted since; never more generous."""
        units, last = state[0], state[1]
        later = units - units_at_take
        if weight < 1 or later < 0:
            raise ValueError(f"bad refund: weight={weight}, units_at_take={units_at_take}")
        tats = []
        for tat, (emission, _) in zip(state[2:], self._pairs, strict=True):
            lowered = tat - weight * emission
            if later:
                lowered = max(lowered, last + later * emission)
            tats.append(min(tat, lowered))
        return (units, last, *tats)


@dataclass(frozen=True)
class ParsedRate:
    """A validated ``RateLimiter(rate, burst=...)``: its windows and how to describe it."""

    windows: tuple[Window, ...]
    description: str
    per_second: float  # nominal long-run rate


def parse_rate(
    rate: Any, burst: Any = 1, *, what: str = "rate", burst_what: str = "burst"
) -> ParsedRate:
    """Validate a rate (events per second, a pyrate-limiter Rate or a sequence of them) and a
    burst into GCRA windows; raise OptionsError naming the option (``what`` for the rate,
    ``burst_what`` for the burst, as the caller's user spelled them), the rule and the value."""
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise OptionsError(f"{burst_what} must be an int >= 1 (got {burst!r})")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        if not math.isfinite(rate) or rate <= 0:
            raise OptionsError(
                f"{what} must be a finite number of events per second > 0 (got {rate!r})"
            )
        emission = -((-NS_PER_S) // Fraction(rate))  # exact ceil(1 s / rate)
        return _checked(
            rate, what, (Window(max(1, emission), burst),), f"{rate!r}/s, burst={burst}"
        )
    from pyrate_limiter import Rate  # imported only when used: it is slow to import

    if isinstance(rate, Rate):
        rates = [rate]
    elif isinstance(rate, Sequence) and not isinstance(rate, (str, bytes)):
        rates = list(rate)
    else:
        raise OptionsError(
            f"{what} must be a number of events per second > 0, a pyrate-limiter Rate or a "
            f"sequence of Rates (got {rate!r})"
        )
    if not 1 <= len(rates) <= MAX_WINDOWS:
        raise OptionsError(f"{what} must hold 1 to {MAX_WINDOWS} Rate objects (got {rates!r})")
    bursts = [_own_burst(r, what, Rate) for r in rates]
    shared = [r.limit for r, own in zip(rates, bursts, strict=True) if own is None]
    if shared and burst > min(shared):
        raise OptionsError(
            f"{burst_what} must be <= the smallest Rate.limit, {min(shared)} (got {burst})"
        )
    if not shared and burst != 1:
        raise OptionsError(
            f"{burst_what} must be left at 1 when every Rate of {what} has its own burst "
            f"(got {burst})"
        )
    used = [burst if own is None else own for own in bursts]
    windows = tuple(
        Window(r.interval * 1_000_000 // (r.limit - b + 1) + 1, b)
        for r, b in zip(rates, used, strict=True)
    )
    text = ", ".join(
        f"Rate({r.limit}, {r.interval} ms{'' if own is None else f', burst={own}'})"
        for r, own in zip(rates, bursts, strict=True)
    )
    per_second = min(
        (r.limit - b + 1) * 1000 / r.interval for r, b in zip(rates, used, strict=True)
    )
    return _checked(rate, what, windows, f"[{text}], burst={burst}", per_second)


def _own_burst(r: Any, what: str, rate_type: Any) -> int | None:
    """A Rate's own burst if it was given one below its limit, else None (the limiter's burst
    applies); raise OptionsError for anything that is not a valid Rate."""
    if not isinstance(r, rate_type):
        raise OptionsError(f"{what} must hold only pyrate_limiter.Rate objects (got {r!r})")
    for field in ("limit", "interval"):
        value = getattr(r, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise OptionsError(
                f"Rate.{field} of {what} must be an int > 0 (got {value!r} in {r!r})"
            )
    own = getattr(r, "burst", r.limit)
    if isinstance(own, bool) or not isinstance(own, int) or not 1 <= own <= r.limit:
        raise OptionsError(
            f"Rate.burst of {what} must be an int from 1 to the Rate's limit, {r.limit} "
            f"(got {own!r} in {r!r})"
        )
    return None if own == r.limit else own


def _checked(
    rate: Any, what: str, windows: tuple[Window, ...], text: str, per_second: float | None = None
) -> ParsedRate:
    for w in windows:
        if w.emission_ns * (w.capacity + 1) > _MAX_SPAN_NS:
            raise OptionsError(f"{what} must admit at least one event per 30 years (got {rate!r})")
    return ParsedRate(windows, text, float(rate) if per_second is None else per_second)


def seconds_ns(value: float | None, field: str, *, none_ok: bool) -> int:
    """A timeout-like argument in nanoseconds (None: for ever, where allowed)."""
    if value is None:
        if none_ok:
            return _FOREVER_NS
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        ns = value * NS_PER_S
        return _FOREVER_NS if ns >= _FOREVER_NS else int(ns)
    rule = "None or a number" if none_ok else "a number"
    raise OptionsError(f"{field} must be {rule} of seconds >= 0 (got {value!r})")
