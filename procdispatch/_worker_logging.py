"""Worker logging: what ``send_fn`` and ``worker_init`` log in a worker reaches the parent's
logging, under its own logger name, with the worker number and the batch id (None outside a
batch) as the record attributes ``procdispatch_worker`` and ``procdispatch_batch``.

*Process workers* log into a :class:`Shipper`, the only handler of the worker's root logger. The
root logger is set to the level the parent's root logger effectively had when the channel was
made, so that a record below it is never even made (a DEBUG-heavy ``send_fn`` costs nothing
while the parent logs at WARNING). The shipper turns a record into a dict of plain values -- the
message merged with its args (unpicklable args cannot break it), ``exc_info`` as text -- and
writes it up the result pipe as a log frame, before the answer of the batch it belongs to. A
record that cannot be pickled is replaced by a WARNING saying so. At most
:data:`RECORDS_PER_BATCH` records are sent per batch (and during ``worker_init``); the rest are
counted, and one WARNING says how many were not sent.

The coordinator hands each record to ``logging.getLogger(name).handle`` (:func:`handle_record`),
where the parent's levels, filters and handlers decide what becomes of it.

*Thread workers* need nothing shipped: their records reach the parent's handlers already. A
record factory (installed once, wrapping the current one) stamps the two attributes on records
made on a worker thread, which sets :data:`current` around each batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import pickle
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "BATCH_ATTR",
    "RECORDS_PER_BATCH",
    "WORKER_ATTR",
    "Shipper",
    "current",
    "handle_record",
    "install_shipper",
    "stamp_thread_records",
    "unreadable_record",
]

WORKER_ATTR = "procdispatch_worker"
BATCH_ATTR = "procdispatch_batch"
#: Records a worker sends per batch; the rest are counted and summarized by one record.
RECORDS_PER_BATCH = 1000
_PROTOCOL = 5
_MAX_QUOTED = 500  # characters of a message quoted by a record that replaces it

log = logging.getLogger("procdispatch")


class Shipper(logging.Handler):
    """The handler of a worker process's root logger: each record goes to ``write`` as the
    pickled dict of its attributes (see :func:`record_attrs`)."""

    def __init__(self, wid: int, level: int, write: Callable[[bytes], None]) -> None:
        super().__init__(level)
        self.wid = wid
        self.batch: int | None = None
        self._write = write
        self._sent = 0
        self._dropped = 0
        self._inside = threading.local()

    def begin(self, batch: int | None) -> None:
        """A batch starts (None: no batch): a fresh allowance of records."""
        lock = self.lock  # not _lock(): this and end() run for every lease
        assert lock is not None
        with lock:
            self.batch = batch
            self._sent = self._dropped = 0

    def end(self) -> None:
        """A batch (or ``worker_init``) ended: say how many of its records were not sent."""
        lock = self.lock
        assert lock is not None
        with lock:
            dropped, self._dropped = self._dropped, 0
            if dropped:
                where = "worker_init" if self.batch is None else f"batch {self.batch}"
                self._ship(
                    logging.makeLogRecord(
                        {
                            "name": log.name,
                            "levelno": logging.WARNING,
                            "levelname": "WARNING",
                            "msg": f"worker {self.wid} logged {dropped} more records during "
                            f"{where} than the {RECORDS_PER_BATCH} sent per batch; they were "
                            "not sent to the parent",
                        }
                    )
                )
            self.batch = None

    def _lock(self) -> threading.RLock:
        lock = self.lock
        assert lock is not None  # made by Handler.__init__
        return lock

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock here. A record made while this thread ships another
        # (a __reduce__ that logs) is counted, not sent: sending it would recurse.
        if getattr(self._inside, "on", False) or self._sent >= RECORDS_PER_BATCH:
            self._dropped += 1
            return
        self._sent += 1
        self._ship(record)

    def _ship(self, record: logging.LogRecord) -> None:
        self._inside.on = True
        try:
            self._write(self._encode(record))
        except Exception:  # the pipe is gone: the worker is ending anyway
            pass
        finally:
            self._inside.on = False

    def _encode(self, record: logging.LogRecord) -> bytes:
        attrs = record_attrs(record)
        attrs[WORKER_ATTR] = self.wid
        attrs[BATCH_ATTR] = self.batch
        try:
            return pickle.dumps(attrs, _PROTOCOL)
        except BaseException as e:
            why = f"{type(e).__name__}: {_text(e)}"
            return pickle.dumps(unreadable_record(attrs, f"could not be pickled ({why})"))

    def handleError(self, record: logging.LogRecord) -> None:
        """Nothing to report to: a worker's stderr is not the parent's logging."""


def record_attrs(record: logging.LogRecord) -> dict[str, Any]:
    """A record's attributes, with its message merged with its args and its exception as
    text: what is left to pickle is plain values, and any extra attributes."""
    attrs = dict(record.__dict__)
    try:
        message = record.getMessage()
    except BaseException as e:
        message = f"<the message {_text(record.msg, repr)} could not be formatted with its args: "
        message += f"{type(e).__name__}: {_text(e)}>"
    attrs["msg"] = message
    attrs["args"] = None
    attrs.pop("message", None)  # a Formatter's cache of the merged message
    if record.exc_info:
        if not record.exc_text:
            try:
                attrs["exc_text"] = logging.Formatter().formatException(record.exc_info)
            except BaseException as e:
                attrs["exc_text"] = f"<the exception could not be formatted: {type(e).__name__}>"
        attrs["exc_info"] = None
    return attrs


def unreadable_record(attrs: dict[str, Any], what: str) -> dict[str, Any]:
    """A WARNING standing for a record that ``what`` (could not be pickled or unpickled),
    quoting its message; it keeps the record's logger, time and origin."""
    keep = ("name", "created", "msecs", "relativeCreated", "process", "processName", "thread")
    out: dict[str, Any] = {k: attrs[k] for k in keep if isinstance(attrs.get(k), (str, int, float))}
    out.update(
        {k: attrs.get(k) for k in (WORKER_ATTR, BATCH_ATTR) if isinstance(attrs.get(k), int)}
    )
    level = attrs.get("levelname")
    message = attrs.get("msg")
    quoted = message[:_MAX_QUOTED] if isinstance(message, str) else "?"
    out.update(
        levelno=logging.WARNING,
        levelname="WARNING",
        msg=f"a {level if isinstance(level, str) else ''} log record of a worker {what}: {quoted}",
    )
    return out


def install_shipper(wid: int, level: int, write: Callable[[bytes], None]) -> Shipper:
    """Worker process side: make the shipper the root logger's only handler, at ``level``.
    Handlers a forked worker inherited would write the parent's records a second time."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    shipper = Shipper(wid, level, write)
    root.addHandler(shipper)
    root.setLevel(level)
    return shipper


def handle_record(attrs: dict[str, Any]) -> None:
    """Parent side, on the coordinator thread: hand a worker's record to its logger, whose
    level, filters and handlers decide. A handler that raises costs only this record."""
    try:
        record = logging.makeLogRecord(attrs)
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
    except Exception:
        # When the same handlers fail again, nothing is left to tell.
        with contextlib.suppress(Exception):
            log.exception(
                "a log record from worker %s could not be handled", attrs.get(WORKER_ATTR)
            )


def _text(obj: object, how: Callable[[object], str] = str) -> str:
    try:
        return how(obj)
    except BaseException:
        return f"<a {type(obj).__name__}>"


# ---- thread workers -------------------------------------------------------------------------

#: (worker number, batch id or None) on a thread worker; None elsewhere.
current: contextvars.ContextVar[tuple[int, int | None] | None] = contextvars.ContextVar(
    "procdispatch_worker", default=None
)
_stamp_lock = threading.Lock()
_stamping = False


def stamp_thread_records() -> None:
    """Install, once, a record factory that stamps the worker and batch on records made on a
    thread worker (it wraps the factory in place then, and changes nothing elsewhere)."""
    global _stamping
    with _stamp_lock:
        if _stamping:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            where = current.get()
            if where is not None:
                setattr(record, WORKER_ATTR, where[0])
                setattr(record, BATCH_ATTR, where[1])
            return record

        logging.setLogRecordFactory(factory)
        _stamping = True
