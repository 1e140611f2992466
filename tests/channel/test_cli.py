"""``python -m procdispatch run``: parsing and running apart, and end to end in a subprocess
(a 100k-line JSONL file into SQLite through a sink module of the current directory)."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from clifns import create_table
from clirun import cli, finish
from workerfns import wait_for

import procdispatch as pd
from procdispatch import cli as pd_cli


def _rows(n: int, fail: int | None = None) -> list[str]:
    return [
        json.dumps({"id": i, "name": f"row {i}", **({"fail": True} if i == fail else {})})
        for i in range(n)
    ]


def _ids(db: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return [i for (i,) in con.execute("SELECT id FROM rows ORDER BY id")]


@pytest.mark.parametrize("fail", [None, 54_321], ids=["clean", "one-line-fails"])
def test_the_cli_loads_a_100k_line_jsonl_file_into_sqlite(tmp_path: Path, fail: int | None) -> None:
    n = 100_000
    lines = _rows(n, fail)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    db = tmp_path / "out.sqlite"
    create_table(str(db))
    dropped = tmp_path / "dropped.jsonl"
    proc = cli(
        "clifns:sqlite_sink",
        str(src),
        "--workers",
        "2",
        "--batch-items",
        "500",
        "--batch-age",
        "0.2",
        "--dropped",
        str(dropped),
        PD_CLI_DB=str(db),
    )
    status, output = finish(proc)
    ids = _ids(db)
    if fail is None:
        assert status == 0, output
        assert ids == list(range(n))
        assert dropped.read_text() == ""
        assert f"{n} items put, {n} delivered, 0 dropped" in output
    else:
        assert status == 1, output
        assert ids == [i for i in range(n) if i != fail]
        assert dropped.read_text() == lines[fail] + "\n"  # exactly that line, ready to replay
        assert f"{n} items put, {n - 1} delivered, 1 dropped" in output


def test_the_dropped_file_replays(tmp_path: Path) -> None:
    db = tmp_path / "out.sqlite"
    create_table(str(db))
    dropped = tmp_path / "dropped.jsonl"
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(_rows(50, fail=7)) + "\n")
    args = ["clifns:sqlite_sink", "--workers", "1", "--batch-age", "0.05"]
    status, output = finish(cli(*args, str(src), "--dropped", str(dropped), PD_CLI_DB=str(db)))
    assert status == 1, output
    # Fixed upstream, the dropped line goes through: replayed from the dropped file.
    dropped.write_text(dropped.read_text().replace(', "fail": true', ""))
    status, output = finish(cli(*args, str(dropped), PD_CLI_DB=str(db)))
    assert status == 0, output
    assert _ids(db) == list(range(50))


def test_ctrl_c_cancels_and_exits_130(tmp_path: Path) -> None:
    started = tmp_path / "started"
    dropped = tmp_path / "dropped.jsonl"
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(_rows(5)) + "\n")
    proc = cli(
        "clifns:held_sink",
        str(src),
        "--workers",
        "1",
        "--batch-age",
        "0.05",
        "--dropped",
        str(dropped),
        PD_CLI_STARTED=str(started),
    )
    wait_for(started.exists, 60, "the first send")
    proc.send_signal(signal.SIGINT)
    status, output = finish(proc)
    assert status == 130, output
    assert "interrupted" in output
    # The batch in flight was dropped at the end of the cancel grace, so it is in the file.
    assert sorted(json.loads(x)["id"] for x in dropped.read_text().splitlines()) == list(range(5))


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    for args in (
        ["clifns:sqlite_sink", "--workers", "zero"],  # argparse
        ["clifns:sqlite_sink", "--workers", "0"],  # the channel's own option check
        ["clifns:no_such_function"],
        ["no_such_module:send"],
        ["clifns"],
        ["clifns:sqlite_sink", str(tmp_path / "missing.jsonl")],
        ["clifns:sqlite_sink", "--lines", "--csv"],
    ):
        proc = cli(*args)
        proc.stdin = None
        status, output = finish(proc)
        assert status == 2, (args, output)
        assert "usage:" in output, output


def test_help_explains_every_flag() -> None:
    text = pd_cli.run_parser().format_help()
    for flag in (
        "--workers",
        "--batch-items",
        "--batch-age",
        "--qps",
        "--retries",
        "--delivery-timeout",
        "--send-timeout",
        "--start-method",
        "--progress",
        "--no-progress",
        "--dropped",
        "--lines",
        "--csv",
        "--json",
        "MODULE:FUNCTION",
    ):
        assert flag in text, flag
    assert "Exit status" in text


def test_flags_become_channel_options() -> None:
    a = pd_cli.parse_args(
        [
            "run",
            "m:f",
            "a.jsonl",
            "b.jsonl",
            "--workers",
            "3",
            "--batch-items",
            "7",
            "--batch-age",
            "0.5",
            "--qps",
            "12.5",
            "--retries",
            "2",
            "--delivery-timeout",
            "30",
            "--send-timeout",
            "4",
            "--start-method",
            "spawn",
            "--no-progress",
            "--dropped",
            "d",
        ]
    )
    retry = a.options.pop("retry")
    assert a.options == {
        "workers": 3,
        "batch_items_max": 7,
        "batch_age_max": 0.5,
        "qps_limit": 12.5,
        "delivery_timeout": 30.0,
        "send_timeout": 4.0,
        "start_method": "spawn",
    }
    assert list(retry()) == [0.0, 0.0]  # retry.limited(2)
    assert (a.target, a.files, a.fmt, a.progress, a.dropped) == (
        "m:f",
        ["a.jsonl", "b.jsonl"],
        "json",
        False,
        "d",
    )
    b = pd_cli.parse_args(["run", "m:f", "--csv", "--progress"])
    assert (b.files, b.fmt, b.progress, b.options) == (["-"], "csv", True, {})


class Collect:
    """A send function for in-process runs (thread backend): keeps what it was given, and
    refuses the items listed."""

    def __init__(self, refuse: list[Any]) -> None:
        self.got: list[Any] = []
        self.refuse = refuse

    def __call__(self, batch: pd.Batch[Any]) -> None:
        self.got.extend(x for x in batch.data if x not in self.refuse)
        batch.data[:] = [x for x in batch.data if x in self.refuse]
        if batch.data:
            raise ValueError("refused")


def _run_in_process(
    monkeypatch: pytest.MonkeyPatch, fmt: str, text: str, refuse: list[Any], dropped: Path
) -> tuple[int, Collect, str]:
    sink = Collect(refuse)
    monkeypatch.setattr(pd_cli, "load_target", lambda target: sink)
    err = io.StringIO()
    args = pd_cli.RunArgs(
        target="x:y",
        fmt=fmt,
        options={"backend": "thread", "workers": 1, "batch_age_max": 0.05},
        dropped=str(dropped),
    )
    status = pd_cli.run(args, stdin=io.StringIO(text), stderr=err)
    return status, sink, err.getvalue()


def test_lines_from_stdin_and_their_dropped_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped = tmp_path / "d.jsonl"
    status, sink, err = _run_in_process(
        monkeypatch, "lines", "alpha\nbeta gamma\n\n{not json}\n", ["beta gamma"], dropped
    )
    assert status == 1, err
    assert sink.got == ["alpha", "", "{not json}"]
    assert dropped.read_text() == '"beta gamma"\n'  # a JSON string: replays in JSON mode


def test_csv_rows_are_dicts_and_drop_as_json_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped = tmp_path / "d.jsonl"
    text = 'id,name\n1,ann\n2,"bob, jr"\n3,cy\n'
    status, sink, err = _run_in_process(
        monkeypatch, "csv", text, [{"id": "2", "name": "bob, jr"}], dropped
    )
    assert status == 1, err
    assert sink.got == [{"id": "1", "name": "ann"}, {"id": "3", "name": "cy"}]
    assert [json.loads(x) for x in dropped.read_text().splitlines()] == [
        {"id": "2", "name": "bob, jr"}
    ]


def test_a_json_line_that_does_not_parse_is_reported_and_counts_as_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped = tmp_path / "d.jsonl"
    status, sink, err = _run_in_process(monkeypatch, "json", '{"a": 1}\n{oops\n2\n', [], dropped)
    assert status == 1
    assert sink.got == [{"a": 1}, 2]
    assert "-:2: not JSON" in err
    assert dropped.read_text() == "{oops\n"


def test_everything_delivered_is_status_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status, sink, err = _run_in_process(monkeypatch, "json", "1\n2\n3\n", [], tmp_path / "d")
    assert status == 0, err
    assert sorted(sink.got) == [1, 2, 3]
    assert "3 items put, 3 delivered, 0 dropped" in err
