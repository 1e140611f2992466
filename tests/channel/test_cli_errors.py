"""``python -m procdispatch run``'s errors: each is one clean line naming the flag or the file,
with exit status 2, and never a traceback; a value a flag refuses is named by that flag."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from clirun import REPO, cli, final_stats, finish

from procdispatch import cli as pd_cli
from procdispatch._cli_args import _FLAGS


def _rows(n: int, fail: int | None = None) -> str:
    return "".join(
        json.dumps({"id": i, **({"fail": True} if i == fail else {})}) + "\n" for i in range(n)
    )


def _one_error(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [x for x in output.splitlines() if "error:" in x]
    assert len(errors) == 1, output
    return errors[0]


@pytest.mark.parametrize("where", ["directory", "missing-folder"])
def test_a_dropped_file_that_cannot_be_opened_is_a_usage_error(tmp_path: Path, where: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(_rows(3))
    target = tmp_path if where == "directory" else tmp_path / "no" / "such" / "d.jsonl"
    out = tmp_path / "out.jsonl"
    status, output = finish(
        cli("clifns:jsonl_sink", str(src), "--dropped", str(target), PD_CLI_OUT=str(out))
    )
    assert status == 2, output
    error = _one_error(output)
    assert f"--dropped {str(target)!r} cannot be opened for appending" in error
    assert "usage:" in output
    assert not out.exists()  # refused before anything was read


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_dropped_file_that_cannot_be_written_stops_the_run_with_status_2(
    tmp_path: Path,
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(_rows(3, fail=1))
    out = tmp_path / "out.jsonl"
    status, output = finish(
        cli(
            "clifns:jsonl_sink",
            str(src),
            "--workers",
            "1",
            "--batch-items",
            "1",
            "--retries",
            "0",
            "--dropped",
            "/dev/full",
            PD_CLI_OUT=str(out),
        )
    )
    assert status == 2, output
    error = _one_error(output)
    assert "--dropped '/dev/full': cannot write: No space left on device" in error
    stats = final_stats(output)
    assert stats["dropped"] == 1, output
    assert stats["put"] == stats["delivered"] + stats["dropped"], output
    assert "1 dropped lines could not be written to /dev/full" in output


# A value each flag mapped to a channel option refuses, and the rule the flag names.
REFUSED = {
    "workers": ("0", "must be an int >= 1 (got 0)"),
    "batch_items": ("0", "must be >= 1 (got 0)"),
    "batch_age": ("0", "must be a number of seconds > 0 (got 0.0)"),
    "qps": ("-1", "must be a finite number of events per second > 0 (got -1.0)"),
    "delivery_timeout": ("nan", "must be a number > 0 (got nan)"),
    "send_timeout": ("0", "must be a number > 0 (got 0.0)"),
    "start_method": ("thread", "invalid choice: 'thread'"),
}


def test_every_flag_mapped_to_an_option_has_a_refused_value_here() -> None:
    assert set(REFUSED) == set(_FLAGS)


@pytest.mark.parametrize("dest", sorted(REFUSED))
def test_a_refused_value_is_named_by_its_flag(
    dest: str, capsys: pytest.CaptureFixture[str]
) -> None:
    value, rule = REFUSED[dest]
    flag = "--" + dest.replace("_", "-")
    with pytest.raises(SystemExit) as exc:
        pd_cli.parse_args(["run", "m:f", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}: {rule}" in err
    assert _FLAGS[dest] not in err.replace(flag, "")  # never the option's own name


def test_retries_below_zero_is_named_by_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        pd_cli.parse_args(["run", "m:f", "--retries", "-1"])
    assert "--retries: must be an int >= 0 (got -1)" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["FILE", "stdin"])
def test_a_dropped_file_that_is_an_input_is_refused(tmp_path: Path, how: str) -> None:
    src = tmp_path / "in.jsonl"
    text = _rows(3, fail=1)
    src.write_text(text)
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)  # another name, the same file
    out = tmp_path / "out.jsonl"
    args = ["clifns:jsonl_sink", "--dropped", str(link)]
    if how == "FILE":
        proc = cli(*args, str(src), PD_CLI_OUT=str(out))
    else:
        with open(src, "rb") as f:
            proc = cli(*args, stdin=f, PD_CLI_OUT=str(out))
    status, output = finish(proc)
    assert status == 2, output
    error = _one_error(output)
    assert "--dropped must not name an input" in error
    assert repr(str(link)) in error
    assert src.read_text() == text  # untouched
    assert not out.exists()


def test_the_exit_statuses_are_documented_in_help_and_on_the_cli_page() -> None:
    text = " ".join(pd_cli.run_parser().format_help().split())
    for status in (
        "0 when every item was delivered",
        "1 when anything was dropped",
        "2 on bad usage (nothing is read) or an input error",
        "not UTF-8",
        "130 after Ctrl-C",
    ):
        assert status in text, status
    page = (REPO / "docs" / "cli.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", page, flags=re.M))
    assert set(rows) == {"0", "1", "2", "130"}
    assert "not UTF-8" in rows["2"]
    assert "--dropped" in rows["2"]
