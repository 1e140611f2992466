"""``python -m procdispatch run``'s input: each line goes out as soon as it is read, a Ctrl-C
loses no line that was read, and an input that cannot be read stops the run cleanly (status 2)
after sending what came before it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from clirun import TESTS, Collect, cli, final_stats, finish, json_lines, killed_on_failure
from workerfns import wait_for

from procdispatch import _cli_input
from procdispatch import cli as pd_cli


def _ids(items: list[Any]) -> list[int]:
    return sorted(x["id"] for x in items)


def test_a_slow_producer_s_lines_go_out_as_they_come(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = cli(
        "clifns:jsonl_sink",
        "--workers",
        "1",
        "--batch-age",
        "0.05",
        stdin=subprocess.PIPE,
        PD_CLI_OUT=str(out),
    )
    assert proc.stdin is not None
    with killed_on_failure(proc):
        for i in range(3):
            proc.stdin.write(json.dumps({"id": i}) + "\n")
            proc.stdin.flush()
            # Delivered while the producer still holds stdin open: not waiting for more lines.
            wait_for(lambda i=i: _ids(json_lines(out)) == list(range(i + 1)), 60, f"item {i}")
        status, output = finish(proc)
    assert status == 0, output
    assert "3 items put, 3 delivered, 0 dropped" in output


def _held_cli(tmp_path: Path, stdin: Any) -> tuple[subprocess.Popen[str], Path, Path]:
    started = tmp_path / "started"
    dropped = tmp_path / "dropped.jsonl"
    proc = cli(
        "clifns:held_sink",
        "--workers",
        "1",
        "--batch-items",
        "2",
        "--batch-age",
        "0.05",
        "--dropped",
        str(dropped),
        stdin=stdin,
        PD_CLI_STARTED=str(started),
    )
    return proc, started, dropped


def test_ctrl_c_while_the_producer_still_writes_loses_no_line_read(tmp_path: Path) -> None:
    proc, started, dropped = _held_cli(tmp_path, subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write("".join(json.dumps({"id": i}) + "\n" for i in range(5)))
    proc.stdin.flush()  # and stdin stays open: the CLI waits for more when the signal comes
    with killed_on_failure(proc):
        wait_for(started.exists, 60, "the first send")
        proc.send_signal(signal.SIGINT)
        status, output = finish(proc)
    assert status == 130, output
    stats = final_stats(output)
    assert stats["put"] == stats["delivered"] + stats["dropped"], output
    assert stats["put"] + stats["not_put"] == 5, output
    # Nothing was delivered (the sink holds its batch): every line is in the dropped file.
    assert _ids(json_lines(dropped)) == list(range(5))


def test_ctrl_c_while_put_waits_for_room_loses_no_line_read(tmp_path: Path) -> None:
    n = 3000  # the channel takes 1000 before it blocks: the rest waits in the reader
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(n)))
    with open(src, "rb") as f:
        proc, started, dropped = _held_cli(tmp_path, f)
        with killed_on_failure(proc):
            wait_for(started.exists, 60, "the first send")
            proc.send_signal(signal.SIGINT)
            status, output = finish(proc)
        # The CLI shares this file's offset: what it consumed, it read.
        consumed = os.lseek(f.fileno(), 0, os.SEEK_CUR)
    read = src.read_bytes()[:consumed].count(b"\n")
    assert status == 130, output
    stats = final_stats(output)
    assert stats["put"] == stats["delivered"] + stats["dropped"], output
    assert stats["put"] + stats["not_put"] == read, (read, output)
    assert _ids(json_lines(dropped)) == list(range(read))


class InterruptingStream(io.TextIOBase):
    """A text stream of ``{"id": i}`` lines that sends this process SIGINT while it reads line
    ``at``."""

    def __init__(self, n: int, at: int) -> None:
        self.n = n
        self.at = at
        self.given = 0

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:
        i = self.given
        if i >= self.n:
            return ""
        self.given += 1
        if i == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return json.dumps({"id": i}) + "\n"


def test_the_line_read_when_ctrl_c_comes_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = Collect()
    monkeypatch.setattr(pd_cli, "load_target", lambda target: sink)
    stream = InterruptingStream(10, at=4)
    dropped = tmp_path / "d.jsonl"
    err = io.StringIO()
    args = pd_cli.RunArgs(
        target="x:y",
        options={"backend": "thread", "workers": 1, "batch_age_max": 0.05},
        dropped=str(dropped),
    )
    before = signal.getsignal(signal.SIGINT)
    status = pd_cli.run(args, stdin=stream, stderr=err)
    assert signal.getsignal(signal.SIGINT) is before  # given back
    output = err.getvalue()
    assert status == 130, output
    assert stream.given == 5  # the reading stopped at the interrupt
    stats = final_stats(output)
    assert stats["put"] == stats["delivered"] + stats["dropped"], output
    assert stats["put"] + stats["not_put"] == 5, output
    assert sorted(x["id"] for x in sink.got) + _ids(json_lines(dropped)) == list(range(5))


def _bad_input(fmt: str, n: int, bad: int) -> tuple[bytes, int, list[Any]]:
    """``n`` items in ``fmt``, the one at index ``bad`` not UTF-8; that line's number, and the
    items before it."""
    if fmt == "csv":
        rows = [b"id,name"] + [f"{i},row {i}".encode() for i in range(n)]
        rows[bad + 1] = f"{bad},row \xe9".encode("latin-1")
        return (
            b"\n".join(rows) + b"\n",
            bad + 2,
            [{"id": str(i), "name": f"row {i}"} for i in range(bad)],
        )
    lines = [json.dumps({"id": i}) for i in range(n)]
    data = [x.encode() for x in lines]
    data[bad] = b'{"id": "caf\xe9"}'
    before: list[Any] = lines[:bad] if fmt == "lines" else [{"id": i} for i in range(bad)]
    return b"\n".join(data) + b"\n", bad + 1, before


@pytest.mark.parametrize("fmt", ["json", "lines", "csv"])
def test_a_line_that_is_not_utf8_stops_the_reading_cleanly_with_status_2(
    tmp_path: Path, fmt: str
) -> None:
    data, lineno, before = _bad_input(fmt, 10, bad=5)
    src = tmp_path / f"in.{fmt}"
    src.write_bytes(data)
    out = tmp_path / "out.jsonl"
    status, output = finish(
        cli("clifns:jsonl_sink", f"--{fmt}", str(src), "--workers", "1", PD_CLI_OUT=str(out))
    )
    assert status == 2, output
    assert "Traceback" not in output
    errors = [x for x in output.splitlines() if "error:" in x]
    assert len(errors) == 1, output
    assert f"in.{fmt}:{lineno}: not UTF-8 (byte 0xe9" in errors[0]
    # What came before the bad line was sent; it and what follows were not.
    assert "5 items put, 5 delivered, 0 dropped" in output
    assert json_lines(out) == before


def test_a_closed_stdin_is_a_usage_error() -> None:
    command = [sys.executable, "-m", "procdispatch", "run", "clifns:jsonl_sink"]
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" <&-', "sh", *command],
        check=False,
        cwd=TESTS,
        env=dict(os.environ, PYTHONPATH=str(TESTS.parent)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    assert "error: standard input is closed" in output


def _run_files(
    monkeypatch: pytest.MonkeyPatch, files: list[str], fmt: str
) -> tuple[int, Collect, str]:
    sink = Collect()
    monkeypatch.setattr(pd_cli, "load_target", lambda target: sink)
    err = io.StringIO()
    args = pd_cli.RunArgs(
        target="x:y",
        files=files,
        fmt=fmt,
        options={"backend": "thread", "workers": 1, "batch_age_max": 0.05},
    )
    return pd_cli.run(args, stderr=err), sink, err.getvalue()


def test_a_byte_order_mark_is_skipped_and_line_ends_are_kept_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(b'\xef\xbb\xbfid,note\r\n1,"two\r\nlines"\r\n2,caf\xc3\xa9\r\n')
    status, sink, err = _run_files(monkeypatch, [str(src)], "csv")
    assert status == 0, err
    assert sink.got == [{"id": "1", "note": "two\r\nlines"}, {"id": "2", "note": "café"}]
    lines = tmp_path / "in.txt"
    lines.write_bytes(b"\xef\xbb\xbfa\r\n\nb\r\r\nlast")
    status, sink, err = _run_files(monkeypatch, [str(lines)], "lines")
    assert status == 0, err
    assert sink.got == ["a", "", "b\r", "last"]


def test_lines_are_whole_whatever_the_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cli_input, "READ_SIZE", 3)  # every line spans reads
    r, w = os.pipe()
    try:
        os.write(w, b'{"a": 1}\n\n{"long": "' + b"x" * 50 + b'"}\n[1,')
        os.close(w)
        w = -1
        chunks = list(_cli_input._raw_blocks("-", r, None))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    lines = b"\n".join(chunks).split(b"\n")
    assert lines == [b'{"a": 1}', b"", b'{"long": "' + b"x" * 50 + b'"}', b"[1,"]
