"""The programs of examples/ run, at a small size, the way a user runs them.

Each one runs in a fresh interpreter (warnings are errors) from an empty directory, and must
exit 0 and print the lines that say what it checked; the numbers in those lines must agree
with each other. Each program's own verdict comes from a ``check`` function, which is also
fed outcomes that are wrong, so that a program cannot pass by checking nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

#: Seconds one program may take; each takes a few at the sizes used here.
RUN_TIMEOUT = 90.0


def run_example(name: str, *args: str, cwd: Path) -> list[str]:
    """Run examples/<name> with ``args``; assert it exited 0 and return its output lines."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    described = (
        f"exit status {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    assert proc.returncode == 0, described
    assert "MISMATCH" not in proc.stdout, described
    return proc.stdout.splitlines()


def the_line(lines: list[str], pattern: str) -> re.Match[str]:
    """The one output line that matches ``pattern`` (from its start)."""
    found = [m for m in (re.match(pattern, x) for x in lines) if m is not None]
    assert len(found) == 1, f"expected one line matching {pattern!r} in:\n" + "\n".join(lines)
    return found[0]


def load(name: str) -> ModuleType:
    """Import examples/<name> as a module (its main does not run)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested_here_and_listed_in_the_readme_and_the_recipes():
    # Run here, in test_etl_sqlite.py, or (asyncio_producer.py) by its recipe's command in
    # tests/docs, which checks its exit status.
    tested = {
        "demo_pipeline.py",
        "http_sink.py",
        "latest_state.py",
        "partial_success.py",
        "etl_sqlite.py",
        "asyncio_producer.py",
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
    recipes = "\n".join(p.read_text() for p in (REPO / "docs" / "recipes").glob("*.md"))
    readme = (REPO / "README.md").read_text()
    # The README's example commands are the recipes' ones, which the docs tests run.
    listed = re.findall(r"`(python examples/[^`]+)`", readme)
    assert sorted(c.split()[1].removeprefix("examples/") for c in listed) == sorted(tested)
    for command in listed:
        assert f"\n{command}\n" in recipes, f"the README's {command!r} is in no recipe"


# http_sink.py


def test_http_sink_delivers_every_item_once_through_503s(tmp_path: Path):
    lines = run_example(
        "http_sink.py", "--items", "400", "--batch", "10", "--qps", "40", cwd=tmp_path
    )
    each_second = [
        re.match(r"\s*\d+s: sent\s+(\d+) requests, retried\s+(\d+), stored\s+(\d+) items$", x)
        for x in lines
    ]
    seconds = [tuple(map(int, m.groups())) for m in each_second if m is not None]
    assert seconds, "\n".join(lines)
    service = the_line(
        lines,
        r"service: (\d+) requests in [\d.]+s, (\d+) answered 503; (\d+) items stored, "
        r"(\d+) distinct$",
    )
    requests, rejected, stored, distinct = map(int, service.groups())
    channel = the_line(
        lines, r"channel: (\d+) sends, (\d+) retried, (\d+) items delivered, (\d+) dropped$"
    )
    sends, retried, delivered, dropped = map(int, channel.groups())
    assert (stored, distinct, delivered, dropped) == (400, 400, 400, 0)
    assert rejected > 0  # the service's draws are seeded: 503s come within the first requests
    assert requests == sends >= 40 + rejected
    assert retried == rejected  # every 503 was retried, and nothing else failed
    # The per-second lines add up to the totals: none was left out at the end.
    assert sum(s[0] for s in seconds) == sends
    assert sum(s[1] for s in seconds) == retried
    assert sum(s[2] for s in seconds) == stored
    the_line(lines, r"OK: every one of the 400 items arrived exactly once$")


def test_http_sink_check_finds_what_is_wrong():
    check = load("http_sink.py").check
    assert check({0: 1, 1: 1, 2: 1}, 3) == []
    problems = check({0: 1, 1: 2, 7: 1}, 3)
    assert problems == [
        "1 items missing (first: [2])",
        "1 items stored more than once (first: [1])",
        "1 items that were never put (first: [7])",
    ]


def test_http_sink_service_refuses_one_request_in_k():
    store = load("http_sink.py").Store(fail_one_in=7)
    answers = [store.receive([{"id": i}]) for i in range(700)]
    requests, rejected, stored = store.totals()
    assert (requests, rejected + stored) == (700, 700)
    assert rejected == answers.count(False)
    assert 50 <= rejected <= 150  # one in 7 on average: 100
    assert sorted(store.counts) == [i for i, ok in enumerate(answers) if ok]


# latest_state.py


def test_latest_state_keeps_fresh_readings_and_the_newest(tmp_path: Path):
    lines = run_example("latest_state.py", "--readings", "3000", cwd=tmp_path)
    final = the_line(
        lines,
        r"kept (\d+) of 3000 readings, dropped (\d+) \(in (\d+) batches, counted by "
        r"on_drop\); the newest reading #2999 reached the sink$",
    )
    kept, dropped, dropped_batches = map(int, final.groups())
    assert kept + dropped == 3000
    # 3000 readings at 5000/s against a sink taking 50 readings per 0.05 s: it cannot keep all.
    assert dropped > 0
    assert dropped_batches > 0
    assert kept >= 50  # the newest batch at least
    channel = the_line(lines, r"channel: (\d+) delivered, (\d+) dropped in (\d+) batches$")
    assert tuple(map(int, channel.groups())) == (kept, dropped, dropped_batches)


def test_latest_state_check_finds_what_is_wrong():
    check = load("latest_state.py").check
    assert check([0, 1, 4], [2, 3], 5) == []
    assert check([0, 2, 1, 4], [3], 5) == [
        "the sink saw a reading older than one it had already seen"
    ]
    assert check([0, 1, 1, 4], [2, 3], 5) == ["1 readings reached the sink twice"]
    assert check([0, 1, 4], [1, 2], 5) == [
        "1 readings were both received and dropped",
        "1 readings were neither received nor dropped",
    ]
    assert check([0, 1, 2], [3, 4], 5) == ["the newest reading #4 did not reach the sink"]


# partial_success.py


def test_partial_success_retries_only_what_the_sink_refused(tmp_path: Path):
    lines = run_example("partial_success.py", "--items", "500", "--batch", "50", cwd=tmp_path)
    first = the_line(
        lines,
        r"500 items in (\d+) batches; (\d+) sends \((\d+) of them retries\), "
        r"(\d+) items offered in all$",
    )
    batches, sends, retries, offered = map(int, first.groups())
    assert batches == 10
    assert sends == batches + retries
    # Were whole batches retried, a retry would offer 50 items; only the refused ones are.
    reoffered = int(the_line(lines, r"retries offered (\d+) items again").group(1))
    assert offered == 500 + reoffered
    assert 0 < reoffered < 50 * retries
    channel = the_line(lines, r"channel: (\d+) items delivered, (\d+) retries, (\d+) dropped$")
    assert tuple(map(int, channel.groups())) == (500, retries, 0)
    the_line(lines, r"OK: each of the 500 items was accepted exactly once$")


def test_partial_success_check_finds_what_is_wrong():
    check = load("partial_success.py").check

    def rec(batch: int, attempt: int, accepted: list[int], refused: list[int]) -> dict:
        return {"batch": batch, "attempt": attempt, "accepted": accepted, "refused": refused}

    good = [rec(1, 1, [0, 2], [1]), rec(1, 2, [1], []), rec(2, 1, [3], [])]
    assert check(good, 4) == []
    # The send left delivered items in batch.data: the retry offers item 0 again.
    resent = [rec(1, 1, [0, 2], [1]), rec(1, 2, [0, 1, 2], []), rec(2, 1, [3], [])]
    assert check(resent, 4) == [
        "2 items accepted more than once (first: [0, 2])",
        "2 items offered again after they were accepted (first: [0, 2])",
    ]
    lost = [rec(1, 1, [0, 2], [1]), rec(2, 1, [3], [])]
    assert check(lost, 4) == ["1 items never accepted (first: [1])"]


# demo_pipeline.py


def test_demo_pipeline_delivers_every_reading_once(tmp_path: Path):
    lines = run_example(
        "demo_pipeline.py", "--readings", "3000", "--workers", "2", "--rounds", "20", cwd=tmp_path
    )
    the_line(lines, r"delivered 3000 of 3000 readings in [\d.]+s")
    the_line(lines, r"score checksum \d+; missing 0; delivered twice 0$")
    assert lines[-1] == "OK"
