"""Find the code blocks of the documentation's Markdown pages, for the tests that run them.

A page's fenced blocks are read with the CommonMark fence rules that matter here: a fence is a
line of at least three backticks (or tildes), indented by at most three spaces, and the block
ends at a line of the same character at least as long. What the tests do with them:

* every ```` ```python ```` block (``py`` too) is a program run on its own;
* a comment line ``% norun: <why>`` right before a block exempts it, and must give a reason;
* a ```` ```text ```` block right after a comment line ``% expected output`` is the exact
  standard output of the Python block before it;
* in a recipe page, every ``python examples/...`` line of a shell block is a command to run.

Anything that looks like Python but is not one of those forms is reported as an error rather
than skipped, so that no block can silently stop being run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"

PYTHON_INFOS = frozenset({"python", "py"})
SHELL_INFOS = frozenset({"bash", "sh", "shell", "console"})
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`]*?)\s*$")
_NORUN = re.compile(r"^%\s*norun\b:?\s*(.*)$")
_EXPECTED = re.compile(r"^%\s*expected output\s*$")


class DocsError(Exception):
    """A page breaks the rules above (the message names the page and line)."""


@dataclass(frozen=True)
class Fence:
    """One fenced block: its info string, its text, and the 1-based line of its opening."""

    page: Path
    line: int
    info: str
    text: str
    before: str  # the nearest non-blank line before the opening fence ("" at the top)

    @property
    def where(self) -> str:
        return f"{_shown(self.page)}:{self.line}"


@dataclass(frozen=True)
class Block:
    """A Python block to run, with the output it must print (None: not checked)."""

    fence: Fence
    expected_output: str | None

    @property
    def where(self) -> str:
        return self.fence.where

    @property
    def code(self) -> str:
        return self.fence.text


@dataclass(frozen=True)
class Command:
    """A recipe's shell command, as its words."""

    where: str
    argv: list[str]


def _shown(page: Path) -> str:
    """A page's name in messages and test ids: its path inside docs/."""
    return page.relative_to(DOCS).as_posix() if page.is_relative_to(DOCS) else page.name


def fences(page: Path) -> list[Fence]:
    """Every fenced block of a Markdown page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Fence] = []
    before = ""
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            if lines[i].strip():
                before = lines[i].strip()
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3)
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        if j == len(lines):
            raise DocsError(f"{_shown(page)}:{i + 1}: the code fence is never closed")
        out.append(Fence(page, i + 1, info, "\n".join(body) + "\n", before))
        before = ""
        i = j + 1
    return out


def pages() -> list[Path]:
    """Every Markdown page of the docs, generated ones and build output left out."""
    skip = {"_build", "_generated"}
    return sorted(p for p in DOCS.rglob("*.md") if not skip & set(p.relative_to(DOCS).parts[:-1]))


def _is_python(info: str) -> bool:
    return info.split(maxsplit=1)[0].lower() in PYTHON_INFOS if info else False


def _looks_like_python(info: str) -> bool:
    return "python" in info.lower() or info.lower().split()[:1] == ["py"]


def python_blocks(page: Path) -> list[Block]:
    """The page's Python blocks to run; raises DocsError for a block it cannot classify."""
    found = fences(page)
    out: list[Block] = []
    for k, f in enumerate(found):
        if _EXPECTED.match(f.before):
            if f.info != "text":
                raise DocsError(f"{f.where}: '% expected output' must precede a ```text block")
            if not out or out[-1].fence is not found[k - 1]:
                raise DocsError(
                    f"{f.where}: '% expected output' must follow a ```python block that runs"
                )
            continue
        if not _looks_like_python(f.info):
            continue
        if not _is_python(f.info) or f.info.strip() != f.info.split()[0]:
            raise DocsError(
                f"{f.where}: a Python block must be fenced as ```python with nothing after it "
                f"(got ```{f.info}), so that the test suite runs it"
            )
        norun = _NORUN.match(f.before)
        if norun is not None:
            if not norun.group(1).strip():
                raise DocsError(f"{f.where}: '% norun' must say why the block cannot run")
            continue
        expected = None
        nxt = found[k + 1] if k + 1 < len(found) else None
        if nxt is not None and _EXPECTED.match(nxt.before):
            expected = nxt.text
        out.append(Block(f, expected))
    return out


def recipe_commands(page: Path) -> list[Command]:
    """The ``python examples/...`` commands of a recipe page's shell blocks."""
    out: list[Command] = []
    for f in fences(page):
        if not f.info or f.info.split()[0] not in SHELL_INFOS:
            continue
        for n, raw in enumerate(f.text.splitlines(), start=1):
            line = raw.strip().removeprefix("$ ").strip()
            if line.startswith("python examples/"):
                where = f"{f.where}+{n}"
                if any(c in line for c in "|;&<>`$\\"):
                    raise DocsError(f"{where}: a recipe command must be one plain command")
                out.append(Command(where, line.split()))
    return out
