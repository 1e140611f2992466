"""The rules by which the docs' blocks are found: what runs, what is exempt, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from mdblocks import DocsError, fences, python_blocks, recipe_commands


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    return page


def test_python_blocks_with_their_expected_output(tmp_path: Path):
    page = _page(
        tmp_path,
        "# T\n\n```python\nprint(1)\n```\n\n% expected output\n```text\n1\n```\n\n"
        "````python\nx = '```'\n````\n\n```bash\necho no\n```\n",
    )
    blocks = python_blocks(page)
    assert [(b.code, b.expected_output, b.fence.line) for b in blocks] == [
        ("print(1)\n", "1\n", 3),
        ("x = '```'\n", None, 12),
    ]


def test_a_norun_mark_needs_a_reason(tmp_path: Path):
    ok = _page(tmp_path, "% norun: a fragment of the block above\n```python\nch.put(1)\n```\n")
    assert python_blocks(ok) == []
    bare = _page(tmp_path, "% norun\n```python\nch.put(1)\n```\n")
    with pytest.raises(DocsError, match="must say why"):
        python_blocks(bare)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("```{code-block} python\nx = 1\n```\n", "must be fenced as ```python"),
        ("```python title='x'\nx = 1\n```\n", "must be fenced as ```python"),
        ("```python\nx = 1\n", "never closed"),
        ("% expected output\n```text\n1\n```\n", "must follow a ```python block"),
        (
            "% norun: shows a shape\n```python\nx\n```\n% expected output\n```text\n1\n```\n",
            "must follow a ```python block that runs",
        ),
        ("```python\nprint(1)\n```\n% expected output\n```\n1\n```\n", "precede a ```text"),
    ],
)
def test_blocks_that_would_not_run_are_refused(tmp_path: Path, text: str, message: str):
    with pytest.raises(DocsError, match=message):
        python_blocks(_page(tmp_path, text))


def test_indented_fences_lose_their_indentation(tmp_path: Path):
    (f,) = fences(_page(tmp_path, "* item\n\n  ```python\n  if x:\n      y()\n  ```\n"))
    assert f.text == "if x:\n    y()\n"


def test_recipe_commands(tmp_path: Path):
    page = _page(
        tmp_path,
        "```bash\npip install -e .\npython examples/a.py --n 3\n$ python examples/b.py\n```\n",
    )
    assert [c.argv for c in recipe_commands(page)] == [
        ["python", "examples/a.py", "--n", "3"],
        ["python", "examples/b.py"],
    ]
    with pytest.raises(DocsError, match="one plain command"):
        recipe_commands(_page(tmp_path, "```bash\npython examples/a.py | head\n```\n"))
