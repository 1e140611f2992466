"""The command line: ``python -m procdispatch run MODULE:FUNCTION [FILE ...]``.

A thin layer over the public API. :func:`parse_args` turns the command line into a
:class:`RunArgs` (argparse: bad usage exits with status 2); :func:`run` reads the input, feeds
a :class:`~procdispatch.ProcessChannel` and reports, returning the exit status; :func:`main`
joins the two. Each is usable alone, so both halves can be tested without the other.

Input. Each FILE (``-``: standard input; none: standard input) is read in order, as JSON lines
(the default: one item per non-blank line), ``--lines`` (each line a string, without its line
break) or ``--csv`` (each row a dict, keyed by the file's header row). A JSON line that does
not parse is reported on stderr, never put, and counts as dropped.

Dropped items. With ``--dropped FILE``, every item the channel drops (and every JSON line that
did not parse) is appended to FILE as one JSON line, the item re-encoded with ``json.dumps``:
JSON input gives back the same lines, ready to replay with the same command; a ``--lines``
item is written as a JSON string and a ``--csv`` row as a JSON object, so the file replays in
the default JSON mode with the very items the send function was given.

Exit status: 0 when every item was delivered; 1 when anything was dropped; 2 on bad usage (an
unknown flag, an option the channel refuses, a MODULE:FUNCTION that cannot be loaded); 130
after a Ctrl-C (the channel is cancelled: sends in flight get ``cancel_grace``, and what they
held is dropped, so written to ``--dropped``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Any

__all__ = ["RunArgs", "UsageError", "load_target", "main", "parse_args", "read_items", "run"]

#: Items handed to the channel per ``put_many`` call.
CHUNK = 500


class UsageError(Exception):
    """The command line cannot run as given (exit status 2)."""


@dataclass(frozen=True)
class RunArgs:
    """What ``run`` was asked to do."""

    target: str
    files: list[str] = field(default_factory=lambda: ["-"])
    fmt: str = "json"  # "json", "lines" or "csv"
    #: Keyword arguments for ProcessChannel (only the options given on the command line).
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool | None = None  # None: on when stderr is a terminal and tqdm is installed
    dropped: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: its commands (``run``), each with its own parser."""
    parser = argparse.ArgumentParser(
        prog="python -m procdispatch",
        description="Feed items from files or stdin to a send function in worker processes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_arguments(
        sub.add_parser("run", help="send items read from files (or stdin) through MODULE:FUNCTION")
    )
    return parser


def run_parser() -> argparse.ArgumentParser:
    """The parser of ``run`` alone (its usage and ``--help``)."""
    return _add_run_arguments(argparse.ArgumentParser(prog="python -m procdispatch run"))


def _add_run_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = (
        "Read items (JSON lines by default) from FILEs or stdin and send them, in batches, "
        "through FUNCTION (it takes a procdispatch.Batch; raise to fail the batch, remove "
        "from batch.data the items it delivered) in worker processes. Exit status: 0 when "
        "every item was delivered, 1 when anything was dropped, 2 on bad usage, 130 after "
        "Ctrl-C."
    )
    p.add_argument(
        "target",
        metavar="MODULE:FUNCTION",
        help="the send function, e.g. mysink:send; MODULE is imported from the current "
        "directory too, as `python -m` would",
    )
    p.add_argument(
        "files", nargs="*", metavar="FILE", help="input files, read in order; '-' or none: stdin"
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        dest="fmt",
        action="store_const",
        const="json",
        help="each non-blank line is a JSON value (the default)",
    )
    fmt.add_argument(
        "--lines",
        dest="fmt",
        action="store_const",
        const="lines",
        help="each line is a string item (its line break removed)",
    )
    fmt.add_argument(
        "--csv",
        dest="fmt",
        action="store_const",
        const="csv",
        help="each CSV row is a dict item, keyed by the file's header row",
    )
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: CPUs)")
    p.add_argument("--batch-items", type=int, metavar="N", help="items per batch (default 20)")
    p.add_argument(
        "--batch-age",
        type=float,
        metavar="SECONDS",
        help="longest wait before a partly filled batch is sent (default 10)",
    )
    p.add_argument(
        "--qps", type=float, metavar="RATE", help="at most RATE sends per second, all workers"
    )
    p.add_argument(
        "--retries",
        type=int,
        metavar="N",
        help="retry a failed batch at most N times, at once (retry.limited(N)); transient "
        "errors only (default: retry transient errors with exponential back-off, without end)",
    )
    p.add_argument(
        "--delivery-timeout",
        type=float,
        metavar="SECONDS",
        help="drop a batch still failing this long after its first send",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        metavar="SECONDS",
        help="kill a send running longer (with its worker); the batch fails with SendTimeout",
    )
    p.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        help="how worker processes start (default: forkserver on Linux, else spawn)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (needs procdispatch[progress]); default: on when stderr "
        "is a terminal and tqdm is installed",
    )
    p.add_argument(
        "--dropped",
        metavar="FILE",
        help="append each dropped item to FILE as a JSON line, ready to replay: JSON input "
        "as it was read, a --lines item as a JSON string, a --csv row as a JSON object",
    )
    return p


_FLAGS = {
    "workers": "workers",
    "batch_items": "batch_items_max",
    "batch_age": "batch_age_max",
    "qps": "qps_limit",
    "delivery_timeout": "delivery_timeout",
    "send_timeout": "send_timeout",
    "start_method": "start_method",
}


def parse_args(argv: list[str] | None = None) -> RunArgs:
    """The command line as a RunArgs; bad usage prints the usage and exits with status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "run":
        build_parser().parse_args(argv)  # help, or the error for an unknown command
    # Intermixed: flags may come after FILEs and FILEs after flags, as with most tools.
    ns = run_parser().parse_intermixed_args(argv[1:])
    options: dict[str, Any] = {}
    for flag, option in _FLAGS.items():
        value = getattr(ns, flag)
        if value is not None:
            options[option] = value
    if ns.retries is not None:
        from . import retry

        if ns.retries < 0:
            run_parser().error(f"--retries must be an int >= 0 (got {ns.retries})")
        options["retry"] = retry.limited(ns.retries)
    return RunArgs(
        target=ns.target,
        files=ns.files or ["-"],
        fmt=ns.fmt or "json",
        options=options,
        progress=ns.progress,
        dropped=ns.dropped,
    )


def load_target(target: str) -> Callable[[Any], object]:
    """Import MODULE (the current directory first, as ``python -m`` does) and return its
    FUNCTION (a dotted path inside the module is followed); UsageError when it cannot."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"MODULE:FUNCTION must name a module and a function (got {target!r})")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise UsageError(f"module {module_name!r} has no {attr!r} (got {target!r})") from exc
    if not callable(obj):
        raise UsageError(f"MODULE:FUNCTION must be callable (got {target!r}: {obj!r})")
    return obj  # type: ignore[no-any-return]


def read_items(
    files: list[str], fmt: str, stdin: IO[str], rejected: Callable[[str, str], None]
) -> Iterator[Any]:
    """The items of ``files`` in order; ``rejected(line, why)`` gets each JSON line that does
    not parse."""
    for name in files:
        f = stdin if name == "-" else open(name, newline="" if fmt == "csv" else None)  # noqa: SIM115
        try:
            if fmt == "csv":
                yield from csv.DictReader(f)
            elif fmt == "lines":
                for line in f:
                    yield line.rstrip("\r\n")
            else:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        rejected(line.rstrip("\r\n"), f"{name}:{n}: not JSON: {exc}")
        finally:
            if f is not stdin:
                f.close()


def _count_items(files: list[str], fmt: str) -> int | None:
    """The number of items, when it can be known before reading (regular files of lines)."""
    if fmt == "csv" or "-" in files:
        return None
    total = 0
    for name in files:
        with open(name, "rb") as f:
            total += sum(1 for line in f if line.strip()) if fmt == "json" else sum(1 for _ in f)
    return total


def _want_progress(asked: bool | None, stderr: IO[str]) -> bool:
    if asked is not None:
        return asked
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    try:
        return bool(stderr.isatty())
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


def run(args: RunArgs, *, stdin: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Do what ``args`` says; return the exit status (UsageError: bad usage)."""
    import procdispatch as pd

    stdin = stdin if stdin is not None else sys.stdin
    err = stderr if stderr is not None else sys.stderr
    send_fn = load_target(args.target)
    for name in args.files:
        if name != "-" and not os.path.isfile(name):
            raise UsageError(f"FILE must be a readable file or '-' (got {name!r})")
    sink = open(args.dropped, "a", encoding="utf-8") if args.dropped else None  # noqa: SIM115
    lock = threading.Lock()
    rejected = 0

    def write_dropped(item: Any) -> None:
        if sink is not None:
            with lock:
                sink.write(json.dumps(item) + "\n")
                sink.flush()

    def on_drop(batch: pd.Batch[Any] | None, flush: bool) -> None:
        if batch is not None and not batch.synthetic:
            for item in batch.data:
                write_dropped(item)
        pd.default_on_drop(batch, flush)

    def on_rejected(line: str, why: str) -> None:
        nonlocal rejected
        rejected += 1
        print(f"procdispatch: {why}", file=err)
        if sink is not None:
            with lock:
                sink.write(line + "\n")
                sink.flush()

    options = dict(args.options)
    progress = _want_progress(args.progress, err)
    if progress:
        options["progress"] = True
        options["progress_total"] = _count_items(args.files, args.fmt)
    t0 = time.monotonic()
    interrupted = False
    try:
        try:
            ch: pd.ProcessChannel[Any] = pd.ProcessChannel(send_fn, on_drop=on_drop, **options)
        except pd.OptionsError as exc:
            raise UsageError(str(exc)) from exc
        try:
            with ch:
                items = read_items(args.files, args.fmt, stdin, on_rejected)
                while chunk := list(islice(items, CHUNK)):
                    ch.put_many(chunk)
        except KeyboardInterrupt:
            interrupted = True  # the with block cancelled the channel and waited for it
    finally:
        if sink is not None:
            sink.close()
    s = ch.stats()
    elapsed = time.monotonic() - t0
    rate = s.items_delivered / elapsed if elapsed > 0 else 0.0
    print(
        f"procdispatch: {s.items_put} items put, {s.items_delivered} delivered, "
        f"{s.items_dropped} dropped{f', {rejected} lines not JSON' if rejected else ''} in "
        f"{elapsed:.1f}s ({rate:.0f} items/s; {s.batches_sent} sends, {s.batches_failed} failed, "
        f"{s.batches_retried} retried, {s.worker_restarts} worker restarts)"
        + (f"; dropped items in {args.dropped}" if args.dropped and s.items_dropped else ""),
        file=err,
    )
    if interrupted:
        print("procdispatch: interrupted", file=err)
        return 130
    return 1 if s.items_dropped or rejected else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m procdispatch``: parse, run, and return the exit status."""
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        run_parser().print_usage(sys.stderr)
        print(f"python -m procdispatch run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
