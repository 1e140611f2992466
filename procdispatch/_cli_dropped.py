"""The command line's ``--dropped FILE``: opened before anything runs, appended to whole lines
at a time from the coordinator thread (``on_drop``) and the main thread (lines that are not
JSON, lines read and not put); a write that fails is reported once, and every line it and
later writes held is counted as not saved.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Callable
from typing import IO

from ._cli_input import UsageError

__all__ = ["DroppedFile", "open_dropped"]


def open_dropped(
    path: str, files: list[str], stdin: IO[str] | None, report: Callable[[str], None]
) -> DroppedFile:
    """``--dropped``, refused (UsageError) when it is an input or cannot be opened."""
    for name in files:
        if _same_file(path, name, stdin):
            what = "the file on standard input" if name == "-" else f"the input FILE {name!r}"
            raise UsageError(
                f"--dropped must not name an input: {path!r} is {what}, which appending to "
                "would change while it is read"
            )
    try:
        return DroppedFile(path, report)
    except OSError as exc:
        raise UsageError(
            f"--dropped {path!r} cannot be opened for appending: {exc.strerror or exc}"
        ) from exc


def _same_file(path: str, name: str, stdin: IO[str] | None) -> bool:
    try:
        if name != "-":
            return os.path.exists(path) and os.path.samefile(path, name)
        if stdin is None:
            return False
        return os.path.samestat(os.fstat(stdin.fileno()), os.stat(path))
    except (OSError, ValueError, io.UnsupportedOperation):
        return False  # not both there (or not a file at all): not the same file


class DroppedFile:
    """``--dropped FILE``, opened for appending; lines written whole, from any thread."""

    def __init__(self, path: str, report: Callable[[str], None]) -> None:
        self.path = path
        #: The first write that failed (None: every line was saved).
        self.error: OSError | None = None
        #: Lines that could not be written.
        self.unsaved = 0
        self._report = report
        self._lock = threading.Lock()
        # Opened (and, for a path that is not there yet, created) before anything runs, so
        # that a path that cannot be written stops the command before it reads a line.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd: int | None = os.open(path, flags, 0o666)

    def write(self, lines: list[str]) -> None:
        """Append ``lines`` (each without its line break)."""
        data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
        with self._lock:
            if self._fd is None:
                self.unsaved += len(lines)
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self.unsaved += len(lines)
                self._fail(
                    exc,
                    "cannot write",
                    "the command stops reading, and dropped items are counted from here on, "
                    "not saved",
                )

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    os.close(fd)
                except OSError as exc:
                    self._fail(exc, "cannot close", "what was written to it may be incomplete")

    def _fail(self, exc: OSError, what: str, then: str) -> None:
        """Under the lock: keep the first error, stop writing, and say so once."""
        self.error = exc
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # the write's own error is the one to report
                os.close(fd)
        self._report(f"--dropped {self.path!r}: {what}: {exc.strerror or exc}; {then}")
