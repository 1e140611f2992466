"""The command line's input, read line by line as it comes, and Ctrl-C (see
:mod:`procdispatch.cli` for what the command does with them; the ``--dropped`` file is in
:mod:`._cli_dropped`).

Input. Each FILE, and the process's standard input, is read from its file descriptor in
whatever amount it has ready (at most :data:`READ_SIZE` bytes), and split at each ``\\n``: the
items of the lines one read completed are put together, in one ``put_many``, before the next
read. So no line is held back waiting for more input (a slow producer's lines go out within
``--batch-age``), and a file goes in at the speed of ``put_many``. Before each read of a pipe
or a terminal the reader waits for the input *or* an interrupt (:func:`select.poll`), so a
Ctrl-C never waits for a producer. Lines are UTF-8, and a byte-order mark at the start of a
file is skipped; a line that is not UTF-8 is an :class:`InputError` naming the file and line:
the items before it are put, and the reading stops there. A text stream a program hands to
:func:`procdispatch.cli.run` as ``stdin`` is read as it is, a line at a time.

Ctrl-C (:class:`Interrupt`). While a run reads its input, SIGINT raises nothing: the handler
cancels the channel (lock-free, so safe from a handler) and the reader stops reading. An
exception raised by a handler could land between any two steps of the loop, just after lines
were read and before they were put, and they would be lost; a flag cannot. So every line read
is put, or, once the channel takes no more items, handed back to the caller as *not put*: a
``put_many`` waiting for room wakes up at the cancel with ``ChannelClosed`` and the count it
added, and the rest of its list is not put.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import os
import select
import signal
import stat
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from .errors import ChannelClosed

if TYPE_CHECKING:
    from ._cli_dropped import DroppedFile

__all__ = [
    "READ_SIZE",
    "InputError",
    "Interrupt",
    "UsageError",
    "check_inputs",
    "count_items",
    "feed",
    "read_chunks",
    "read_items",
]

#: Bytes asked of the input per read.
READ_SIZE = 1 << 14


class UsageError(Exception):
    """The command line cannot run as given (exit status 2)."""


class InputError(Exception):
    """The input cannot be read on (exit status 2); the message names the file and line."""


class Interrupt:
    """SIGINT during a run. While the input is read, a flag: it sets ``fired``, wakes the
    reader and cancels the channel. Once the reading is done (:meth:`done_reading`), nothing
    read is in hand, and SIGINT raises ``KeyboardInterrupt`` as usual, for the channel's
    ``with`` block to handle as it handles Ctrl-C: it says what it waits for, and a second
    Ctrl-C ends the sends still in flight at once."""

    def __init__(self) -> None:
        self.fired = False
        self._reading = True
        self._cancel: Callable[[], None] | None = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._previous: Any = None
        self._installed = False

    @property
    def fd(self) -> int:
        """Readable once the interrupt fired."""
        return self._r

    def install(self) -> None:
        """Handle SIGINT from now on (from the main thread only: others cannot get it)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def attach(self, cancel: Callable[[], None]) -> None:
        """What to call on an interrupt (at once if one came already)."""
        self._cancel = cancel
        if self.fired:
            cancel()

    def done_reading(self) -> None:
        """From now on SIGINT raises KeyboardInterrupt; one that came already is raised now."""
        self._reading = False
        if self.fired:
            raise KeyboardInterrupt

    def close(self) -> None:
        """Give SIGINT back to the handler it had."""
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGINT, previous)
            self._installed = False
        os.close(self._r)
        os.close(self._w)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._reading:
            self.fired = True
            raise KeyboardInterrupt
        if self.fired:
            return  # the reader is handing back what it read: a moment
        self.fired = True
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the reader is awake
            os.write(self._w, b"\0")
        if self._cancel is not None:
            self._cancel()


def read_items(
    files: list[str],
    fmt: str,
    stdin: IO[str],
    rejected: Callable[[str, str], None],
    *,
    interrupt: Interrupt | None = None,
) -> Iterator[Any]:
    """The items of ``files`` in order: :func:`read_chunks`, an item at a time."""
    for chunk in read_chunks(files, fmt, stdin, rejected, interrupt=interrupt):
        yield from chunk


def read_chunks(
    files: list[str],
    fmt: str,
    stdin: IO[str],
    rejected: Callable[[str, str], None],
    *,
    interrupt: Interrupt | None = None,
) -> Generator[list[Any], None, None]:
    """The items of ``files`` in order (``-``: ``stdin``, from its file descriptor when it is
    the process's standard input), in lists: each holds the items of the lines one read of the
    input completed, given before the next read, so no item waits for more input.

    ``rejected(line, why)`` gets each JSON line that does not parse. Where the input cannot be
    read on, the items of the lines before are given, then :class:`InputError` is raised.
    With ``interrupt``, the reading stops once it fired (the lines read are still given).
    """
    for name in files:
        blocks = _blocks(name, stdin, interrupt)
        if fmt == "csv":
            yield from _csv_chunks(name, blocks)
            continue
        n = 0  # lines of the file before the block
        for block in blocks:
            if fmt == "lines":
                items = [line[:-1] if line.endswith("\r") else line for line in block]
            else:
                items = _json_items(name, n, block, rejected)
            n += len(block)
            if items:
                yield items


def _json_items(
    name: str, before: int, block: list[str], rejected: Callable[[str, str], None]
) -> list[Any]:
    items = []
    loads = json.loads
    for n, line in enumerate(block, start=before + 1):
        if not line or line.isspace():
            continue
        try:
            items.append(loads(line))
        except ValueError as exc:
            rejected(line.rstrip("\r"), f"{name}:{n}: not JSON: {exc}")
    return items


def _csv_chunks(name: str, blocks: Iterator[list[str]]) -> Iterator[list[Any]]:
    """The rows, in lists: one ends when the reader has used every line read so far (a row
    over several lines may take several reads)."""
    left = 0  # lines read and not yet taken by the CSV reader

    def lines() -> Iterator[str]:
        nonlocal left
        for block in blocks:
            left = len(block)
            for line in block:
                left -= 1
                yield line + "\n"

    reader = csv.DictReader(_no_nul(name, lines()))
    chunk: list[Any] = []
    try:
        for row in reader:
            chunk.append(row)
            if not left:
                yield chunk
                chunk = []
    except csv.Error as exc:
        if chunk:
            yield chunk
        raise InputError(f"{name}:{reader.line_num}: not CSV: {exc}") from exc
    except InputError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


def _no_nul(name: str, lines: Iterator[str]) -> Iterator[str]:
    """``lines``, refusing a line with a NUL byte (InputError), as ``csv`` does before Python
    3.11: every supported version reads the same CSV the same way."""
    for n, line in enumerate(lines, start=1):
        if "\0" in line:
            raise InputError(f"{name}:{n}: not CSV: line contains NUL")
        yield line


def _blocks(name: str, stdin: IO[str], interrupt: Interrupt | None) -> Iterator[list[str]]:
    """The lines of one input (without their ``\\n``): one list per read."""
    if name == "-" and stdin is not sys.stdin and stdin is not sys.__stdin__:
        for line in _stream_lines(name, stdin, interrupt):
            yield [line]
        return
    try:
        fd = stdin.fileno() if name == "-" else os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"cannot read {name!r}: {exc.strerror or exc}") from exc
    try:
        n = 0  # lines before the block
        for raw in _raw_blocks(name, fd, interrupt):
            if n == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]  # noqa: PLW2901
            try:
                lines = raw.decode("utf-8").split("\n")
            except UnicodeDecodeError as exc:
                k = raw.count(b"\n", 0, exc.start)  # lines before the bad one
                start = raw.rfind(b"\n", 0, exc.start) + 1
                if k:
                    yield raw[: start - 1].decode("utf-8").split("\n")
                raise InputError(
                    f"{name}:{n + k + 1}: not UTF-8 (byte {raw[exc.start]:#04x} at byte "
                    f"{exc.start - start + 1} of the line): the reading stopped there; the items "
                    "before that line are sent, that line and the rest of the input are not"
                ) from None
            n += len(lines)
            yield lines
    finally:
        if name != "-":
            os.close(fd)


def _raw_blocks(name: str, fd: int, interrupt: Interrupt | None) -> Iterator[bytes]:
    """The complete lines each read of ``fd`` gave, as one bytes without the last ``\\n``
    (and at the end of the input, a last line without a line break)."""
    try:
        waits = not stat.S_ISREG(os.fstat(fd).st_mode)  # a read of a file never waits long
    except OSError as exc:
        raise InputError(f"cannot read {name!r}: {exc.strerror or exc}") from exc
    poll = None
    if waits and interrupt is not None:
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        poll.register(interrupt.fd, select.POLLIN)
    pieces: list[bytes] = []  # the line under way, in the pieces it came in
    while interrupt is None or not interrupt.fired:
        if poll is not None:
            ready = {f for f, _ in poll.poll()}
            if interrupt is not None and interrupt.fd in ready:
                break
        try:
            chunk = os.read(fd, READ_SIZE)
        except OSError as exc:
            raise InputError(f"cannot read {name!r}: {exc.strerror or exc}") from exc
        if not chunk:
            if pieces:
                yield b"".join(pieces)
            return
        end = chunk.rfind(b"\n")
        if end < 0:
            pieces.append(chunk)
            continue
        if pieces:
            pieces.append(chunk[:end])
            block = b"".join(pieces)
            pieces.clear()
        else:
            block = chunk[:end]
        if end + 1 < len(chunk):
            pieces.append(chunk[end + 1 :])
        yield block
    if pieces:
        raise InputError(
            f"{name}: interrupted in the middle of a line: its first "
            f"{sum(len(p) for p in pieces)} bytes were read and are not sent"
        )


def _stream_lines(name: str, stream: IO[str], interrupt: Interrupt | None) -> Iterator[str]:
    """The numbered lines of a text stream, read as it is."""
    n = 0
    while interrupt is None or not interrupt.fired:
        try:
            line = stream.readline()
        except UnicodeDecodeError as exc:
            raise InputError(f"{name}:{n + 1}: not {exc.encoding}: {exc.reason}") from None
        except OSError as exc:
            raise InputError(f"cannot read {name!r}: {exc.strerror or exc}") from exc
        if not line:
            return
        n += 1
        yield line[:-1] if line.endswith("\n") else line


def check_inputs(files: list[str], stdin: IO[str] | None) -> None:
    """Every FILE can be read, and standard input is open if it is read (UsageError)."""
    for name in files:
        if name == "-":
            if stdin is None:
                raise UsageError("standard input is closed: name a FILE to read instead")
            continue
        try:
            mode = os.stat(name).st_mode
        except OSError as exc:
            raise UsageError(f"FILE {name!r} cannot be read: {exc.strerror or exc}") from exc
        except ValueError as exc:  # a NUL in the name
            raise UsageError(f"FILE {name!r} cannot be read: {exc}") from exc
        if stat.S_ISDIR(mode):
            raise UsageError(f"FILE must be a readable file or '-' (got the directory {name!r})")
        if stat.S_ISFIFO(mode):
            # Opening a pipe to try it would let its writer in, and closing it again would
            # break that writer's writes: its permissions say whether it can be read.
            if not os.access(name, os.R_OK):
                raise UsageError(f"FILE {name!r} cannot be read: Permission denied")
            continue
        try:
            os.close(os.open(name, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            raise UsageError(f"FILE {name!r} cannot be read: {exc.strerror or exc}") from exc


def count_items(files: list[str], fmt: str) -> int | None:
    """The number of items, when it can be known before reading (regular files of lines:
    what a pipe or a device holds can be read only once, by the run)."""
    if fmt == "csv" or "-" in files:
        return None
    total = 0
    try:
        if not all(stat.S_ISREG(os.stat(name).st_mode) for name in files):
            return None
        for name in files:
            with open(name, "rb") as f:
                total += (
                    sum(1 for line in f if line.strip()) if fmt == "json" else sum(1 for _ in f)
                )
    except OSError:
        return None  # the reading says what is wrong, with its line
    return total


def feed(
    ch: Any,
    chunks: Generator[list[Any], None, None],
    interrupt: Interrupt,
    not_put: Callable[[list[Any]], None],
    sink: DroppedFile | None,
) -> None:
    """Put each list of items as it is read. Once the channel is cancelled by an interrupt,
    the items read and not added go to ``not_put``; the reading stops at the interrupt, or
    after a failed write to ``--dropped``."""
    put_many = ch.put_many
    with contextlib.closing(chunks):
        for items in chunks:
            if interrupt.fired:
                not_put(items)
                continue
            try:
                put_many(iter(items))  # not a list: no progress total is made up of chunks
            except ChannelClosed as exc:
                not_put(items[exc.added :])  # type: ignore[attr-defined]
                if not interrupt.fired:
                    raise
                continue
            if sink is not None and sink.error is not None:
                return
