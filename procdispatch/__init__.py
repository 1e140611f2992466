"""procdispatch: feed slow or CPU-heavy consumers from a fast producer, over worker processes.

A producer calls ``ch.put(item)``; a coordinator thread batches the items (by count, size and
age) and leases the batches over pipes to worker processes that run ``send_fn``. Failed batches
are retried per a retry policy, a full buffer blocks, drops or grows, a shared token bucket caps
sends per second, and closing waits until every batch was delivered or dropped.
"""

from __future__ import annotations

from . import retry
from ._callbacks import default_on_drop, default_on_error, drop_quiet, drop_summarized
from ._channel import ProcessChannel
from ._coordinator import Stats
from ._ratelimit import RateLimiter
from .buffer import Batch, BlockNewItems, DropOldestBatch, FullBehavior, InfiniteGrowth
from .errors import (
    BufferFull,
    ChannelClosed,
    InternalError,
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

__all__ = [
    "Batch",
    "BlockNewItems",
    "BufferFull",
    "ChannelClosed",
    "DropOldestBatch",
    "FullBehavior",
    "InfiniteGrowth",
    "InternalError",
    "ItemTooLarge",
    "ItemTooSmall",
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
    "retry",
]
