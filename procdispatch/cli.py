"""The command line: ``python -m procdispatch run MODULE:FUNCTION [FILE ...]``.

A thin layer over the public API. :func:`parse_args` turns the command line into a
:class:`RunArgs` (argparse: bad usage exits with status 2; the grammar is in
:mod:`._cli_args`); :func:`run` reads the input, feeds a :class:`~procdispatch.ProcessChannel`
and reports, returning the exit status; :func:`main` joins the two. Each is usable alone, so
both halves can be tested without the other.

Input. Each FILE (``-``: standard input; none: standard input) is read in order, as JSON lines
(the default: one item per non-blank line), ``--lines`` (each line a string, without its line
break) or ``--csv`` (each row a dict, keyed by the file's header row). The input is UTF-8 (a
byte-order mark at the start of a file is skipped). Each item is put as soon as its line has
been read, so a slow producer's items go out within ``--batch-age``. A JSON line that does not
parse is reported on stderr, never put, and counts as dropped. A line that is not UTF-8 (or
an input that cannot be read, or CSV that does not parse) is an input error: it is reported
with its file and line number, the reading stops there, what was read before it is sent (the
channel drains as usual), and the exit status is 2: the bytes are most likely not the text
they were taken for (another encoding, a compressed file), which a line-by-line skip would
turn into as many errors as lines. The reading also stops when ``--dropped`` cannot be
written.

Dropped items. With ``--dropped FILE``, every item the channel drops (and every JSON line that
did not parse) is appended to FILE as one JSON line, the item re-encoded with ``json.dumps``:
JSON input gives back the same lines, ready to replay with the same command; a ``--lines``
item is written as a JSON string and a ``--csv`` row as a JSON object, so the file replays in
the default JSON mode with the very items the send function was given. FILE must not be one of
the input files (nor the file on standard input).

Exit status: 0 when every item was delivered; 1 when anything was dropped (or a JSON line did
not parse); 2 on bad usage (an unknown flag, a value a flag refuses, a MODULE:FUNCTION that
cannot be loaded, a FILE that cannot be read, a closed standard input, a ``--dropped`` that
cannot be opened or names an input; nothing is read) or an input or ``--dropped`` error while
running (see above; the final statistics are printed); 130 after a Ctrl-C: the channel is
cancelled (sends in flight get ``cancel_grace``, and what they held is dropped, so written to
``--dropped``) and the reading stops; every line read is sent, dropped, or, read after the
cancel, written to ``--dropped`` and counted as not put. The first that applies, in the order
130, 2, 1, is the status.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from ._cli_args import RunArgs, build_parser, parse_args, run_parser
from ._cli_dropped import open_dropped
from ._cli_input import (
    InputError,
    Interrupt,
    UsageError,
    check_inputs,
    count_items,
    feed,
    read_chunks,
    read_items,
)

__all__ = [
    "InputError",
    "RunArgs",
    "UsageError",
    "build_parser",
    "load_target",
    "main",
    "parse_args",
    "read_items",
    "run",
    "run_parser",
]


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
    """Do what ``args`` says; return the exit status (UsageError: bad usage, found before
    anything was read).

    ``stdin`` is read for ``-`` instead of the process's standard input (which is read from
    its file descriptor), as a text stream, line by line. In the main thread, SIGINT is
    handled while the channel runs (the previous handler is put back after): it cancels the
    channel and stops the reading, as Ctrl-C does on the command line.
    """
    import procdispatch as pd

    stdin = stdin if stdin is not None else sys.stdin
    err = stderr if stderr is not None else sys.stderr
    send_fn = load_target(args.target)
    check_inputs(args.files, stdin)
    assert stdin is not None  # check_inputs: or no FILE is '-'

    def report(message: str) -> None:
        print(f"procdispatch: error: {message}", file=err, flush=True)

    sink = open_dropped(args.dropped, args.files, stdin, report) if args.dropped else None
    rejected = 0
    not_put = 0

    def on_drop(batch: pd.Batch[Any] | None, flush: bool) -> None:
        if sink is not None and batch is not None and not batch.synthetic:
            sink.write([json.dumps(item) for item in batch.data])
        pd.default_on_drop(batch, flush)

    def on_rejected(line: str, why: str) -> None:
        nonlocal rejected
        rejected += 1
        print(f"procdispatch: {why}", file=err)
        if sink is not None:
            sink.write([line])

    def on_not_put(items: list[Any]) -> None:
        nonlocal not_put
        not_put += len(items)
        if sink is not None and items:
            sink.write([json.dumps(item) for item in items])

    options = dict(args.options)
    progress = _want_progress(args.progress, err)
    if progress:
        options["progress"] = True
        options["progress_total"] = count_items(args.files, args.fmt)
    t0 = time.monotonic()
    interrupt = Interrupt()
    interrupted = False
    input_error: InputError | None = None
    try:
        interrupt.install()
        try:
            ch: pd.ProcessChannel[Any] = pd.ProcessChannel(send_fn, on_drop=on_drop, **options)
        except pd.OptionsError as exc:
            raise UsageError(str(exc)) from exc
        interrupt.attach(ch.cancel)
        try:
            with ch:
                chunks = read_chunks(args.files, args.fmt, stdin, on_rejected, interrupt=interrupt)
                try:
                    feed(ch, chunks, interrupt, on_not_put, sink)
                except InputError as exc:
                    input_error = exc
                    report(str(exc))
                interrupt.done_reading()  # a Ctrl-C that came is raised now: the block cancels
        except KeyboardInterrupt:
            interrupted = True  # the with block cancelled the channel and waited for it
    finally:
        interrupt.close()
        if sink is not None:
            sink.close()
    s = ch.stats()
    elapsed = time.monotonic() - t0
    rate = s.items_delivered / elapsed if elapsed > 0 else 0.0
    extras = f", {rejected} lines not JSON" if rejected else ""
    if not_put:
        extras += f", {not_put} read after the interrupt and not put"
    saved = ""
    if sink is not None and sink.unsaved:
        saved = f"; {sink.unsaved} dropped lines could not be written to {args.dropped}"
    elif args.dropped and (s.items_dropped or rejected or not_put):
        saved = f"; dropped items in {args.dropped}"
    print(
        f"procdispatch: {s.items_put} items put, {s.items_delivered} delivered, "
        f"{s.items_dropped} dropped{extras} in {elapsed:.1f}s ({rate:.0f} items/s; "
        f"{s.batches_sent} sends, {s.batches_failed} failed, {s.batches_retried} retried, "
        f"{s.worker_restarts} worker restarts){saved}",
        file=err,
    )
    if interrupted or interrupt.fired:
        print("procdispatch: interrupted", file=err)
        return 130
    if input_error is not None or (sink is not None and sink.error is not None):
        return 2
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
