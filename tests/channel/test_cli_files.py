"""What the command line takes as FILE: anything that opens for reading and is not a directory
(a named pipe, /dev/null, a process substitution's /dev/fd/N), and CSV with a NUL byte, which
is an input error on every Python version."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from clirun import Collect, cli, finish, json_lines

from procdispatch import _cli_input
from procdispatch import cli as pd_cli


def _run(
    monkeypatch: pytest.MonkeyPatch, files: list[str], fmt: str = "json", **kw: Any
) -> tuple[int, Collect, str]:
    sink = Collect()
    monkeypatch.setattr(pd_cli, "load_target", lambda target: sink)
    err = io.StringIO()
    args = pd_cli.RunArgs(
        target="x:y",
        files=files,
        fmt=fmt,
        options={"backend": "thread", "workers": 1, "batch_age_max": 0.05},
        progress=False,
        **kw,
    )
    return pd_cli.run(args, stderr=err), sink, err.getvalue()


class FifoWriter:
    """Writes ``data`` into the named pipe ``path`` from a thread; ``stop`` lets a writer still
    waiting for a reader go (a run that never opened the pipe) and joins it, with a deadline."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data = path, data
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY)  # waits for the reader
            try:
                os.write(fd, self.data)
            finally:
                os.close(fd)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(OSError):  # a reader for a writer that waits for one
                os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        self.thread.join(30)
        assert not self.thread.is_alive(), "the writer of the pipe never ended"


@pytest.mark.timeout(60)
def test_a_named_pipe_is_read_as_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    writer = FifoWriter(fifo, b'{"id": 1}\n{"id": 2}\n{"id": 3}\n')
    try:
        status, sink, err = _run(monkeypatch, [str(fifo)])
    finally:
        writer.stop()
    assert writer.error is None
    assert status == 0, err
    assert sorted(x["id"] for x in sink.got) == [1, 2, 3]


@pytest.mark.timeout(30)
def test_a_named_pipe_is_not_read_to_count_its_items(tmp_path: Path) -> None:
    # What a pipe holds can be read once: by the run, not by the progress bar's count.
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    assert _cli_input.count_items([str(fifo)], "json") is None  # returns without opening it
    assert _cli_input.count_items(["/dev/null"], "lines") is None


@pytest.mark.timeout(60)
def test_dev_null_is_an_empty_input(monkeypatch: pytest.MonkeyPatch) -> None:
    status, sink, err = _run(monkeypatch, ["/dev/null"])
    assert status == 0, err
    assert sink.got == []


@pytest.mark.timeout(120)
def test_a_process_substitution_is_read_as_a_file(tmp_path: Path) -> None:
    # What `run f <(cat in.jsonl)` passes: /dev/fd/N, an inherited pipe.
    r, w = os.pipe()
    out = tmp_path / "out.jsonl"
    try:
        proc = cli(
            "clifns:jsonl_sink",
            f"/dev/fd/{r}",
            "--workers",
            "1",
            "--no-progress",
            PD_CLI_OUT=str(out),
            pass_fds=(r,),
        )
    finally:
        os.close(r)
    try:
        os.write(w, b'{"id": 1}\n{"id": 2}\n')
    finally:
        os.close(w)
    status, output = finish(proc)
    assert status == 0, output
    assert sorted(x["id"] for x in json_lines(out)) == [1, 2]


def test_a_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(_cli_input.UsageError, match="FILE must be a readable file or '-'"):
        _run(monkeypatch, [str(tmp_path)])


def test_a_missing_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(_cli_input.UsageError, match="No such file or directory"):
        _run(monkeypatch, [str(tmp_path / "nope.jsonl")])


def test_a_named_pipe_cannot_also_be_the_dropped_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    with pytest.raises(_cli_input.UsageError, match="--dropped must not name an input"):
        _run(monkeypatch, [str(fifo)], dropped=str(link))  # refused before either is opened


@pytest.mark.timeout(120)
def test_csv_with_a_nul_byte_stops_the_reading_with_status_2(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(b"id,name\n1,a\n2,b\n3\0,c\n4,d\n")
    out = tmp_path / "out.jsonl"
    status, output = finish(
        cli("clifns:jsonl_sink", "--csv", str(src), "--workers", "1", PD_CLI_OUT=str(out))
    )
    assert status == 2, output
    assert "Traceback" not in output
    assert "in.csv:4: not CSV: line contains NUL" in output
    assert "2 items put, 2 delivered, 0 dropped" in output
    assert json_lines(out) == [{"id": "1", "name": "a"}, {"id": "2", "name": "b"}]
