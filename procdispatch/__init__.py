"""procdispatch: feed slow or CPU-heavy consumers from a fast producer, over worker processes.

A producer calls ``ch.put(item)``; a coordinator thread batches the items (by count, size and
age) and leases the batches over pipes to worker processes that run ``send_fn``. Failed batches
are retried per a retry policy, a full buffer blocks, drops or grows, a shared token bucket caps
sends per second, and closing waits until every batch was delivered or dropped.

The names below are imported on first use (PEP 562): a worker process imports
``procdispatch._worker`` and, through this file, nothing of the parent's machinery, which keeps
worker start-up short.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

#: The working directory procdispatch was imported in: what ``''`` on sys.path (``python -c``,
#: the REPL) stands for in our workers and forkserver, which must import procdispatch from
#: where the parent did, even after the program has changed directory.
try:
    _IMPORTED_IN: str | None = os.getcwd()
except OSError:  # the directory was removed
    _IMPORTED_IN = None

if TYPE_CHECKING:
    from . import retry
    from ._admission import Stats
    from ._callbacks import (
        default_on_drop,
        default_on_error,
        drop_quiet,
        drop_summarized,
        retry_on,
    )
    from ._channel import ProcessChannel
    from ._limiter.limiter import RateLimiter
    from ._process_end import drain_on_sigterm
    from .backends.dask import DaskBackend as DaskBackend
    from .buffer import Batch, BlockNewItems, DropOldestBatch, FullBehavior, InfiniteGrowth
    from .errors import (
        BufferFull,
        ChannelClosed,
        DeliveryTimeout,
        InternalError,
        ItemsDropped,
        ItemTooLarge,
        ItemTooSmall,
        OptionsError,
        ProcDispatchError,
        RemoteError,
        SendTimeout,
        TransientError,
        WorkerCrashed,
        WorkerStartFailed,
    )

_WHERE = {
    # Not in __all__: it needs the dask extra, and a star import must not.
    "DaskBackend": ".backends.dask",
    "Batch": ".buffer",
    "BlockNewItems": ".buffer",
    "BufferFull": ".errors",
    "ChannelClosed": ".errors",
    "DeliveryTimeout": ".errors",
    "DropOldestBatch": ".buffer",
    "FullBehavior": ".buffer",
    "InfiniteGrowth": ".buffer",
    "InternalError": ".errors",
    "ItemTooLarge": ".errors",
    "ItemTooSmall": ".errors",
    "ItemsDropped": ".errors",
    "OptionsError": ".errors",
    "ProcDispatchError": ".errors",
    "ProcessChannel": "._channel",
    "RateLimiter": "._limiter.limiter",
    "RemoteError": ".errors",
    "SendTimeout": ".errors",
    "Stats": "._admission",
    "TransientError": ".errors",
    "WorkerCrashed": ".errors",
    "WorkerStartFailed": ".errors",
    "default_on_drop": "._callbacks",
    "default_on_error": "._callbacks",
    "drop_quiet": "._callbacks",
    "drop_summarized": "._callbacks",
    "retry": ".retry",
    "retry_on": "._callbacks",
    "drain_on_sigterm": "._process_end",
}

__all__ = [
    "Batch",
    "BlockNewItems",
    "BufferFull",
    "ChannelClosed",
    "DeliveryTimeout",
    "DropOldestBatch",
    "FullBehavior",
    "InfiniteGrowth",
    "InternalError",
    "ItemTooLarge",
    "ItemTooSmall",
    "ItemsDropped",
    "OptionsError",
    "ProcDispatchError",
    "ProcessChannel",
    "RateLimiter",
    "RemoteError",
    "SendTimeout",
    "Stats",
    "TransientError",
    "WorkerCrashed",
    "WorkerStartFailed",
    "default_on_drop",
    "default_on_error",
    "drop_quiet",
    "drop_summarized",
    "drain_on_sigterm",
    "retry",
    "retry_on",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'procdispatch' has no attribute {name!r}")
    module = importlib.import_module(where, __name__)
    value = module if name == "retry" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
