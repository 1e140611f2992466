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
then is the payload pickled with cloudpickle. Two wrappers are reduced by name alone and so get
their own checks: a bound method (``getattr(instance, name)``, which rebuilds nothing when the
function is not the instance's attribute of that name, as with ``types.MethodType(lambda ...,
obj)``), and an ``lru_cache`` wrapper (its module and qualified name). Sent by value, an
``lru_cache`` wrapper travels as its function and cache parameters and is wrapped again in the
worker, with an empty cache.

A worker that cannot load the payload all the same (a module the parent has and the worker
cannot import) fails its start with a message naming what the payload holds
(:func:`describe_payload`) and the fix (:data:`FIX`).

cloudpickle 3.1 writes ``"<dynamic-code>"`` as the file name of every code object it sends by
value, so that its output does not depend on where a function was defined. Our subclass sends
code objects through :mod:`marshal` instead, which keeps ``co_filename`` and the line table: a
worker's traceback names the user's script and line, and shows the source line wherever the
worker can read the file. Code from a pseudo-file (a notebook cell, interactive input) carries
the parent's linecache entry for it, which the worker installs in its own linecache.
"""

from __future__ import annotations

import functools
import io
import marshal
import pickle
import re
import sys
import types
from collections.abc import Callable
from typing import Any

from ..errors import OptionsError
from ._procstart import check_main_guard

__all__ = ["FIX", "describe_payload", "dumps_by_value", "pickle_payload"]

PROTOCOL = 5
_MAIN_NAMES = ("__main__", "__mp_main__")
#: Either name in a pickle, found in one pass (about 2.5 GB/s; two ``in`` tests take twice that).
_names_main = re.compile(rb"__m(?:p_)?ain__").search

#: A linecache entry: (size, mtime, lines, full name).
_CacheEntry = tuple[int, None, list[str], str]


def pickle_payload(send_fn: Any, worker_init: Any, start_method: str | None) -> bytes:
    """Pickle what the workers run; OptionsError names what cannot be pickled. First, a channel
    whose workers could not start (see check_main_guard) fails here, before anything starts
    (``start_method`` None: the workers are not started by multiprocessing, nothing to check)."""
    if start_method is not None:
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


#: How to fix what cannot reach the workers, for the messages that say so.
FIX = (
    "define it, and what it uses, in a module the workers can import, or have that module "
    "sent by value with cloudpickle.register_pickle_by_value(module) before making the channel"
)


def describe_payload(send_fn: Any, worker_init: Any) -> str:
    """Names what the payload holds, for a worker that cannot load it to say what failed."""
    what = f"send_fn ({describe(send_fn)})"
    if worker_init is not None:
        what += f" or worker_init ({describe(worker_init)})"
    return what


def describe(obj: Any) -> str:
    """A callable's module and qualified name, through partials and bound methods."""
    try:
        if isinstance(obj, functools.partial):
            return f"functools.partial of {describe(obj.func)}"
        if isinstance(obj, types.MethodType):
            return f"{describe(obj.__func__)} bound to a {_name_of(type(obj.__self__))}"
        if isinstance(obj, (types.FunctionType, type, _LRU_WRAPPER)):
            return _name_of(obj)
        return f"a {_name_of(type(obj))} instance"
    except Exception:
        return f"a {type(obj).__name__}"


def _name_of(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


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
        if isinstance(obj, (types.FunctionType, type)):
            if _needs_value(getattr(obj, "__module__", None), self._by_value):
                raise _MustGoByValue(obj)
        elif isinstance(obj, types.MethodType):
            # The standard reduction is getattr(instance, name): it names neither the function
            # nor its module, and rebuilds nothing when the function is not the instance's
            # attribute of that name (a lambda bound with MethodType).
            if not _found_on_instance(obj):
                raise _MustGoByValue(obj)
        elif isinstance(obj, _LRU_WRAPPER) and _lru_by_value(obj, self._by_value):
            raise _MustGoByValue(obj)
        return NotImplemented


#: What functools.lru_cache (and functools.cache) return: pickled by its module and name only.
_LRU_WRAPPER: type = functools._lru_cache_wrapper


def _found_on_instance(method: types.MethodType) -> bool:
    """Whether ``getattr(method.__self__, name)`` gives this method back, as the standard
    reduction of a bound method relies on."""
    try:
        return bool(getattr(method.__self__, method.__func__.__name__) == method)
    except Exception:
        return False


def _lru_by_value(wrapper: Any, by_value: tuple[str, ...]) -> bool:
    """Whether an lru_cache wrapper must travel by value: it comes from the main module or
    a module sent by value, or its module does not hold it under its name (a cached lambda)."""
    module = getattr(wrapper, "__module__", None)
    return _needs_value(module, by_value) or not _found_by_name(wrapper, module)


def _found_by_name(obj: Any, module_name: object) -> bool:
    try:
        found: Any = sys.modules[module_name]  # type: ignore[index]
        for part in obj.__qualname__.split("."):
            found = getattr(found, part)
    except Exception:
        return False
    return found is obj


def _lru_cached(fn: Callable[..., Any], maxsize: int | None, typed: bool) -> Any:
    """Worker side: the lru_cache wrapper of a function that came by value (empty cache)."""
    return functools.lru_cache(maxsize=maxsize, typed=typed)(fn)


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
                f"(got {fn!r}: {type(exc).__name__}: {exc}); {FIX}"
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
            if isinstance(obj, _LRU_WRAPPER) and _lru_by_value(obj, _registered_by_value()):
                # cloudpickle writes an lru_cache wrapper by name, which a worker that never
                # ran the main module cannot find: send the function, wrap it again there.
                wrapper: Any = obj
                params = wrapper.cache_parameters()
                return _lru_cached, (wrapper.__wrapped__, params["maxsize"], params["typed"])
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
