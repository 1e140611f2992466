"""The command line's grammar: ``python -m procdispatch run``'s parser, and :class:`RunArgs`.

:func:`parse_args` turns a command line into a :class:`RunArgs` with argparse; bad usage (an
unknown flag, a value a flag refuses) prints the usage and exits with status 2, before anything
runs. A flag that sets a channel option (``_FLAGS``) is checked by the channel's own
validation, so the two cannot differ, and its error names the flag, never the option. What a
RunArgs does is :mod:`procdispatch.cli`'s; the two halves are usable, and tested, apart.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunArgs", "build_parser", "parse_args", "run_parser"]


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
        "Read items (JSON lines by default; UTF-8) from FILEs or stdin and send them, in "
        "batches, through FUNCTION (it takes a procdispatch.Batch; raise to fail the batch, "
        "remove from batch.data the items it delivered) in worker processes. Each item is put "
        "as soon as its line is read."
    )
    p.epilog = (
        "Exit status: 0 when every item was delivered; 1 when anything was dropped (or a JSON "
        "line did not parse); 2 on bad usage (nothing is read) or an input error: a line that "
        "is not UTF-8, an input that cannot be read, a --dropped FILE that cannot be written "
        "(the reading stops there, what was read before is sent, and the final statistics are "
        "printed); 130 after Ctrl-C (the channel is cancelled; what was read and not sent is "
        "in --dropped)."
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


#: Each flag's dest and the channel option it sets.
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
    """The command line as a RunArgs; bad usage prints the usage and exits with status 2 (a
    value a flag refuses is named by its flag, with the channel option's rule)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "run":
        build_parser().parse_args(argv)  # help, or the error for an unknown command
    # Intermixed: flags may come after FILEs and FILEs after flags, as with most tools.
    parser = run_parser()
    ns = parser.parse_intermixed_args(argv[1:])
    options: dict[str, Any] = {}
    for dest, option in _FLAGS.items():
        value = getattr(ns, dest)
        if value is not None:
            problem = _refused(option, value)
            if problem is not None:
                parser.error(f"--{dest.replace('_', '-')}: {problem}")
            options[option] = value
    if ns.retries is not None:
        from . import retry

        if ns.retries < 0:
            parser.error(f"--retries: must be an int >= 0 (got {ns.retries})")
        options["retry"] = retry.limited(ns.retries)
    return RunArgs(
        target=ns.target,
        files=ns.files or ["-"],
        fmt=ns.fmt or "json",
        options=options,
        progress=ns.progress,
        dropped=ns.dropped,
    )


def _refused(option: str, value: Any) -> str | None:
    """Why the channel refuses ``option=value`` (its rule, without the option's name: the
    caller names the flag), or None. The channel's own check, so the two cannot differ."""
    from ._options import Options
    from .errors import OptionsError

    try:
        Options(**{option: value}).resolve()
    except OptionsError as exc:
        message = str(exc)
        if message.startswith(f"{option} "):
            message = message[len(option) + 1 :]
        return message.replace(" or None (got", " (got")  # None cannot be typed
    return None
