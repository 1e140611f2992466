"""Pickling for the wire: the standard pickler, or cloudpickle by value when it must.

Leases, results and errors are pickled with protocol 5 by the standard pickler, which is fast
and the usual case; what names the sender's main module, or what only cloudpickle can serialise
(lambdas, local classes), goes by value through :mod:`procdispatch.backends._shipping`.
"""

from __future__ import annotations

import io
import pickle
import threading
from types import FunctionType
from typing import TYPE_CHECKING, Any

from ._messages import PROTOCOL

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["dumps", "dumps_out_of_band"]

_MAIN_NAMES = ("__main__", "__mp_main__")


class _MustGoByValue(Exception):
    """Raised inside the pickler at the first object that only the sender's main module has."""


class _ByReference(pickle.Pickler):
    """The standard pickler, refusing what names the sender's main module.

    Workers never run the user's main module (see ``_procstart``), and a worker's ``__main__``
    is not the user's, so a class, function or instance of one defined there must travel by
    value. ``reducer_override`` is never called for the atoms and builtin containers that make
    up most data, so it costs nothing there; it is called once per other object.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, FunctionType)):
            module = getattr(obj, "__module__", None)
        else:
            module = type(obj).__module__
        if module in _MAIN_NAMES:
            raise _MustGoByValue
        return NotImplemented


_reuse = threading.local()


def dumps(obj: object) -> bytes:
    """Pickle a lease, a result or an error: the standard pickler, or cloudpickle by value for
    what names the main module or what only cloudpickle can pickle (lambdas, local classes).

    One pickler per thread is reused: making one per call costs more than a small lease's
    pickling, and writing to its buffer spares large ``bytes`` items a copy.
    """
    try:
        pickler, buf = _reuse.pickler, _reuse.buf
    except AttributeError:
        buf = io.BytesIO()
        pickler = _ByReference(buf, PROTOCOL)
        _reuse.pickler, _reuse.buf = pickler, buf
    try:
        pickler.dump(obj)
        data: bytes = buf.getvalue()
    except Exception:
        del _reuse.pickler  # a pickler whose dump failed half-way is not reused
        from .backends._shipping import (
            dumps_by_value,  # only when needed: cloudpickle is slow to import
        )

        return dumps_by_value(obj)
    except BaseException:
        # A __reduce__ raising SystemExit, say: not retried by value, but the half-used
        # pickler must not be reused either.
        del _reuse.pickler
        raise
    finally:
        buf.seek(0)
        buf.truncate()
        pickler.clear_memo()
    return data


def dumps_out_of_band(obj: object, buffer_callback: Callable[[pickle.PickleBuffer], Any]) -> bytes:
    """Pickle with protocol 5, handing buffers to ``buffer_callback`` (a false answer keeps
    one out of band); raises what pickling raised (nothing is retried by value)."""
    out = io.BytesIO()
    _ByReference(out, PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return out.getvalue()
