"""The documentation's code runs: each Python block of docs/**/*.md, and each recipe command.

Every ```python block is written to a script of its own and run in a fresh interpreter (as a
reader would run it: the block is the whole program, with warnings as errors), from an empty
directory, with a timeout; it must exit with status 0, and print exactly its expected output
where the page gives one. Recipe pages' ``python examples/...`` commands run from the
repository's root. The page rules are in :mod:`mdblocks`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mdblocks import DOCS, REPO, Block, Command, DocsError, pages, python_blocks, recipe_commands

#: Seconds one block or recipe command may take (a block takes about a second).
RUN_TIMEOUT = 90.0


def _collect() -> tuple[list[Block], list[Command], list[str]]:
    blocks: list[Block] = []
    commands: list[Command] = []
    errors: list[str] = []
    for page in pages():
        try:
            blocks += python_blocks(page)
            if page.parent == DOCS / "recipes":
                commands += recipe_commands(page)
        except DocsError as exc:
            errors.append(str(exc))
    return blocks, commands, errors


BLOCKS, COMMANDS, ERRORS = _collect()


def _env() -> dict[str, str]:
    """The environment of a run: this checkout's procdispatch comes first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_every_block_is_run_or_marked_with_a_reason():
    assert not ERRORS, "\n".join(ERRORS)


def test_the_collector_sees_every_python_fence():
    """A plain count of ```python fence lines matches what the collector found (run or
    marked), so that a block the parser misread cannot go unrun."""
    fence = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*python\s*$")
    marked = re.compile(r"^%\s*norun\b")
    counted = 0
    exempt = 0
    for page in pages():
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if fence.match(line):
                counted += 1
                prev = next((x for x in reversed(lines[:i]) if x.strip()), "")
                exempt += bool(marked.match(prev.strip()))
    assert counted == len(BLOCKS) + exempt
    assert len(BLOCKS) >= 10  # the pages hold far more; zero would mean a broken collector


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_block_runs(block: Block, tmp_path: Path):
    name = re.sub(r"\W", "_", block.where) + ".py"
    script = tmp_path / name
    script.write_text(block.code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"{block.where}:\n{block.code}\n{_describe(proc)}"
    if block.expected_output is not None:
        assert proc.stdout == block.expected_output, f"{block.where}:\n{_describe(proc)}"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_recipe_command_runs(command: Command):
    argv = [sys.executable, *command.argv[1:]]
    assert (REPO / command.argv[1]).is_file(), f"{command.where}: no such example"
    proc = subprocess.run(
        argv,
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"{command.where}: {' '.join(command.argv)}\n{_describe(proc)}"


def test_every_recipe_page_has_a_command():
    recipes = sorted((DOCS / "recipes").glob("*.md"))
    assert recipes
    for page in recipes:
        assert recipe_commands(page), f"{page.name}: a recipe page shows how to run its example"
