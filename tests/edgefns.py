"""Objects whose pickling or unpickling runs code that raises, whatever it raises, for the
coordinator's edge tests (importable in worker processes)."""

from __future__ import annotations

import os
from typing import Any

from workerfns import Log, Recorder

import procdispatch as pd

#: What the code run by (un)pickling raises, by name.
RAISES: dict[str, type[BaseException]] = {
    "exit": SystemExit,
    "interrupt": KeyboardInterrupt,
    "value": ValueError,
}


def raise_named(how: str) -> Any:
    raise RAISES[how](f"raised while unpickling ({how})")


class Unrebuildable:
    """Pickles anywhere; unpickling it raises ``RAISES[how]``."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        return (raise_named, (self.how,))


class UnrebuildableError(Exception):
    """An exception that pickles in the worker; unpickling it raises ``RAISES[how]``."""

    def __init__(self, how: str) -> None:
        super().__init__(f"the send failed ({how})")
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        return (raise_named, (self.how,))


class Unpicklable:
    """Pickling it (in the parent, to send it) raises ``RAISES[how]``."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        raise RAISES[self.how](f"raised while pickling ({self.how})")

    def __repr__(self) -> str:
        return f"Unpicklable({self.how!r})"


class AnswersBadly:
    """send_fn: the first attempt of the batch holding item 0 fails, leaving in its answer
    something the parent cannot unpickle (``where``: the error itself, batch.meta or
    batch.data); every other send is recorded like Recorder."""

    def __init__(self, log: Log, where: str, how: str) -> None:
        self.rec = Recorder(log)
        self.where = where
        self.how = how

    def __call__(self, batch: pd.Batch[Any]) -> None:
        if 0 in batch.data and batch.attempt == 1:
            if self.where == "error":
                raise UnrebuildableError(self.how)
            if self.where == "meta":
                batch.meta = Unrebuildable(self.how)
            else:
                batch.data.append(Unrebuildable(self.how))
            raise ValueError(f"failed with a {self.where} the parent cannot unpickle")
        self.rec(batch)


class InitFailsBadly:
    """worker_init that raises an error the parent cannot unpickle."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __call__(self) -> None:
        raise UnrebuildableError(self.how)


class StrFailsElsewhere(Exception):
    """An exception whose ``str()`` works only in the process that raised it."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.pid = os.getpid()

    def __str__(self) -> str:
        if os.getpid() != self.pid:
            raise RuntimeError("str() of this error works only where it was raised")
        return str(self.args[0])


class InitFailsStrangely:
    """worker_init that raises an error whose str() fails in the parent."""

    def __call__(self) -> None:
        raise StrFailsElsewhere("init cannot start")
