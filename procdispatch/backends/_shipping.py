"""Shipping ``send_fn`` and ``worker_init`` to the worker processes.

Workers never run the user's main module (:mod:`procdispatch._procstart`), so whatever the
payload takes from ``__main__`` must travel by value; so must whatever cloudpickle itself sends by
value (lambdas, closures, local classes, and what comes from modules registered with
``register_pickle_by_value``). The rest -- functions and classes found by name in their module,
and objects made of them -- travels by reference, as cloudpickle would send it too.

The common payload (an importable function, a partial or an instance of importable things) is
pickled with the standard pickler, so that neither the parent nor the worker has to import
cloudpickle: worker start-up is a measured cost. Its ``reducer_override`` sees every function and
class the standard pickler is about to write by reference and gives up at the first one that must
travel by value; the finished pickle is also searched for the main module's names, which catches
references written by other routes (an object whose ``__reduce__`` returns a global's name). Only
then is the payload pickled with cloudpickle.

cloudpickle 3.1 writes ``"<dynamic-code>"`` as the file name of every code object it sends by
value, so that its output does not depend on where a function was defined. Our subclass sends
code objects through :mod:`marshal` instead, which keeps ``co_filename`` and the line table: a
worker's traceback names the user's script and line, and shows the source line wherever the
worker can read the file. Code from a pseudo-file (a notebook cell, interactive input) carries
the parent's linecache entry for it, which the worker installs in its own linecache.
"""

from __future__ import annotations

import io
import marshal
import pickle
import re
import sys
import types
from typing import Any

from ..errors import OptionsError
from ._procstart import check_main_guard

__all__ = ["dumps_by_value", "pickle_payload"]

PROTOCOL = 5
_MAIN_NAMES = ("__main__", "__mp_main__")
#: Either name in a pickle, found in one pass (about 2.5 GB/s; two ``in`` tests take twice that).
_names_main = re.compile(rb"__m(?:p_)?ain__").search

#: A linecache entry: (size, mtime, lines, full name).
_CacheEntry = tuple[int, None, list[str], str]


def pickle_payload(send_fn: Any, worker_init: Any, start_method: str) -> bytes:
    """Pickle what the workers run; OptionsError names what cannot be pickled. First, a channel
    whose workers could not start (see check_main_guard) fails here, before anything starts."""
    check_main_guard(start_method)
    payload = (send_fn, worker_init)
    by_value = _registered_by_value()
    buf = io.BytesIO()
    try:
        _ByReference(buf, by_value).dump(payload)
    except Exception:
        pass  # _MustGoByValue, or what only cloudpickle can pickle (lambdas, closures)
    else:
        data = buf.getvalue()
        if _names_main(data) is None:
            return data
    return _by_value(payload)


def dumps_by_value(obj: object) -> bytes:
    """Pickle with cloudpickle, sending code with its file name: for a lease, a result or an
    error that names the main module or that only cloudpickle can pickle."""
    buf = io.BytesIO()
    _value_pickler()(buf, PROTOCOL).dump(obj)
    return buf.getvalue()


class _MustGoByValue(Exception):
    """Raised inside the standard pickler at the first object that must travel by value."""


class _ByReference(pickle.Pickler):
    def __init__(self, file: io.BytesIO, by_value: tuple[str, ...]) -> None:
        super().__init__(file, PROTOCOL)
        self._by_value = by_value

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)) and _needs_value(
            getattr(obj, "__module__", None), self._by_value
        ):
            raise _MustGoByValue(obj)
        return NotImplemented


def _needs_value(module_name: object, by_value: tuple[str, ...]) -> bool:
    """Whether cloudpickle would send a function or class of this module by value."""
    if not isinstance(module_name, str):
        return False  # the standard pickler finds its module (the name search covers __main__)
    if module_name in _MAIN_NAMES:
        return True
    return any(module_name == m or module_name.startswith(m + ".") for m in by_value)


def _registered_by_value() -> tuple[str, ...]:
    """Modules registered with cloudpickle.register_pickle_by_value (none unless imported)."""
    cloudpickle = sys.modules.get("cloudpickle")
    if cloudpickle is None:
        return ()
    return tuple(sorted(cloudpickle.list_registry_pickle_by_value()))


def _by_value(payload: tuple[Any, Any]) -> bytes:
    pickler = _value_pickler()
    for name, fn in zip(("send_fn", "worker_init"), payload, strict=True):
        try:
            pickler(io.BytesIO(), PROTOCOL).dump(fn)
        except Exception as exc:
            raise OptionsError(
                f"{name} must be picklable with cloudpickle to reach the workers "
                f"(got {fn!r}: {type(exc).__name__}: {exc})"
            ) from exc
    buf = io.BytesIO()
    pickler(buf, PROTOCOL).dump(payload)
    return buf.getvalue()


_value_pickler_class: Any = None


def _value_pickler() -> Any:
    """cloudpickle's Pickler, sending code objects with their file name (imported on demand)."""
    global _value_pickler_class
    if _value_pickler_class is not None:
        return _value_pickler_class
    import cloudpickle

    class ValuePickler(cloudpickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is types.CodeType:
                try:
                    blob = marshal.dumps(obj)
                except ValueError:
                    pass  # a constant marshal cannot write: cloudpickle's own reduction
                else:
                    return _load_code, (blob, _pseudo_file(obj.co_filename))
            return super().reducer_override(obj)

    _value_pickler_class = ValuePickler
    return ValuePickler


def _pseudo_file(filename: str) -> _CacheEntry | None:
    """The parent's linecache entry for a file that is not on disk (interactive input, a
    notebook cell), if it has one; a worker reads real files itself. The entry itself is
    returned, so that a pickle holding many functions of one cell carries its lines once."""
    import linecache

    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4 or entry[1] is not None:
        return None
    return entry  # type: ignore[return-value]


def _load_code(blob: bytes, source: _CacheEntry | None) -> types.CodeType:
    """Worker side: rebuild a code object, and make its pseudo-file's lines known."""
    code: types.CodeType = marshal.loads(blob)
    if source is not None:
        import linecache

        linecache.cache.setdefault(code.co_filename, source)
    return code
