"""send_fns that leave hostile things behind: exceptions whose attributes or pickling raise,
batch data and meta that will not pickle, deleted batch attributes (importable in workers).

Each misbehaves on the first attempt of the batch holding item 0, then records what it sent,
like workerfns.Recorder, keeping only the int items (what a test put)."""

from __future__ import annotations

import os
from typing import Any

from workerfns import Log

import procdispatch as pd


class ReasonRaises(ConnectionError):
    @property
    def reason(self) -> Any:
        raise RuntimeError("the reason property broke")


class CauseRaises(Exception):
    @property  # type: ignore[override]
    def __cause__(self) -> Any:
        raise RuntimeError("the __cause__ property broke")


class CauseReadOnly(Exception):
    """Its chain reads fine, but the parent cannot set its ``__cause__``."""

    @property  # type: ignore[override]
    def __cause__(self) -> Any:
        return None


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("the __str__ broke")


class StrNotText(Exception):
    def __str__(self) -> str:
        return 42  # type: ignore[return-value]  # noqa: PLE0307


class ReprRaises(Exception):
    def __repr__(self) -> str:
        raise SystemExit("the __repr__ exits")


class ArgsRaises(Exception):
    @property  # type: ignore[override]
    def args(self) -> Any:
        raise KeyboardInterrupt


class ReduceExits(Exception):
    def __reduce__(self) -> Any:
        raise SystemExit("pickling this exception exits")


class ReduceInterrupts(Exception):
    def __reduce__(self) -> Any:
        raise KeyboardInterrupt


class ReduceGarbage(Exception):
    def __reduce__(self) -> Any:
        return 42


class ExitsOnPickle:
    def __reduce__(self) -> Any:
        raise SystemExit("pickling this exits")


class InterruptsOnPickle:
    def __reduce__(self) -> Any:
        raise KeyboardInterrupt


class GarbageOnPickle:
    def __reduce__(self) -> Any:
        return ("not", "a", "reduction", "at", "all", "really", "no")


class UnreadableList(list):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        raise SystemExit("iterating this list exits")


EXCEPTIONS: dict[str, Any] = {
    "reason_raises": lambda: ReasonRaises("refused"),
    "cause_raises": lambda: CauseRaises("c"),
    "cause_read_only": lambda: CauseReadOnly("c"),
    "str_raises": lambda: StrRaises("s"),
    "str_not_text": lambda: StrNotText("s"),
    "repr_raises": lambda: ReprRaises("r"),
    "args_raises": lambda: ArgsRaises("a"),
    "reduce_exits": lambda: ReduceExits("e"),
    "reduce_interrupts": lambda: ReduceInterrupts("k"),
    "reduce_garbage": lambda: ReduceGarbage("g"),
}


class LeavesBehind:
    """On the first attempt of the batch holding item 0, does ``how`` (see :meth:`misbehave`);
    every send that returns is recorded to ``log``."""

    def __init__(self, log: Log, how: str) -> None:
        self.log = log
        self.how = how

    def __call__(self, batch: pd.Batch[Any]) -> None:
        if 0 in batch.data and batch.attempt == 1 and self.misbehave(batch):
            return
        ints = [x for x in batch.data if type(x) is int]
        self.log.write(ev="sent", pid=os.getpid(), id=batch.id, data=ints, synthetic=False)

    def misbehave(self, batch: pd.Batch[Any]) -> bool:
        """Raises, or returns True when the send is to return (leaving the batch as it is)."""
        h = self.how
        if h in EXCEPTIONS:
            raise EXCEPTIONS[h]()
        if h == "data_exits":
            batch.data.append(ExitsOnPickle())
        elif h == "data_interrupts":
            batch.data.append(InterruptsOnPickle())
        elif h == "data_garbage":
            batch.data.append(GarbageOnPickle())
        elif h == "meta_exits":
            batch.meta = ExitsOnPickle()
        elif h == "meta_interrupts":
            batch.meta = InterruptsOnPickle()
        elif h == "data_and_meta_exit":
            batch.data.append(ExitsOnPickle())
            batch.meta = ExitsOnPickle()
        elif h == "del_data":
            del batch.data
        elif h == "del_meta":
            del batch.meta
        elif h == "unreadable_list":
            batch.data = UnreadableList(batch.data)
        elif h == "del_data_and_return":
            del batch.data
            return True
        else:
            raise AssertionError(h)
        raise ValueError(f"after {h}")
