"""Which failures are worth a retry: decided from the live exception, where it was raised.

An error is *transient* when it, or an exception on its ``__cause__`` / ``__context__`` chain,
or the exception in its ``reason`` attribute (``urllib.error.URLError`` keeps the
``ConnectionRefusedError`` there), is a :class:`~procdispatch.errors.TransientError`, a
``ConnectionError`` or a ``TimeoutError``. So a ``URLError(ConnectionRefusedError())`` or a
``RuntimeError`` raised ``from`` a ``ConnectionError`` is transient; a plain ``RuntimeError`` is
not.

The chain does not survive the trip back from a worker (pickling keeps neither ``__cause__``
nor ``__context__``), so the worker describes it while the exception is live: for each exception
on the chain, the qualified names of its class and of every base class (:func:`chain_names`).
The parent attaches that description to the exception it rebuilds (:func:`attach`), and every
decision -- the default ``on_error``, :func:`~procdispatch.retry_on` -- reads it by name, so a
library's own exception types (requests, httpx) are found on the chain the same way, whether or
not the parent can import them.
"""

from __future__ import annotations

import contextlib

__all__ = ["TRANSIENT_NAMES", "attach", "chain_names", "matches", "qualified_name"]

#: Names that make an error transient wherever they appear on its chain.
TRANSIENT_NAMES = frozenset(
    {
        "builtins.ConnectionError",
        "builtins.TimeoutError",
        "procdispatch.errors.TransientError",
    }
)
_ATTR = "_procdispatch_chain"
_MAX_CHAIN = 16  # how many exceptions of a chain are looked at (chains can be long or cyclic)

Chain = tuple[tuple[str, ...], ...]


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def chain_names(exc: BaseException) -> Chain:
    """For ``exc`` and the exceptions it was raised from or while handling (and a ``reason``
    that is an exception), the qualified names of each one's classes, most derived first."""
    out: list[tuple[str, ...]] = []
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(out) < _MAX_CHAIN:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(tuple(qualified_name(c) for c in type(e).__mro__))
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
        elif e.__context__ is not None and not e.__suppress_context__:
            todo.append(e.__context__)
    return tuple(out)


def attach(exc: BaseException, chain: Chain) -> None:
    """Keep a worker's description of ``exc``'s chain on the exception rebuilt in the parent."""
    # An exception type that refuses attributes is then judged from itself alone.
    with contextlib.suppress(Exception):
        setattr(exc, _ATTR, chain)


def matches(exc: BaseException, names: frozenset[str]) -> bool:
    """True when a class named in ``names`` is on ``exc``'s chain (as the worker saw it, or
    from the live exception when it was raised in this process)."""
    chain: Chain | None = getattr(exc, _ATTR, None)
    if chain is None:
        chain = chain_names(exc)
    return any(name in names for classes in chain for name in classes)
