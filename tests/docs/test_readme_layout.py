"""The README's layout section names every module of the package, so it cannot fall behind."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1]
    match = re.search(r"```\n(procdispatch/.*?)```", section, re.S)
    assert match, "the README's Layout section has no tree"
    return match.group(1)


def test_every_module_and_package_of_procdispatch_is_in_the_readme_layout() -> None:
    block = _layout_block()
    named = set(re.findall(r"^\s*([\w.]+/?)", block, re.M))
    pkg = ROOT / "procdispatch"
    missing = [
        str(path.relative_to(pkg))
        for path in sorted(pkg.rglob("*.py"))
        if "__pycache__" not in path.parts
        and path.name not in named
        and not (path.name == "__init__.py" and path.parent != pkg)
    ]
    missing += [
        f"{d.name}/"
        for d in sorted(p for p in pkg.iterdir() if p.is_dir() and p.name != "__pycache__")
        if f"{d.name}/" not in named
    ]
    assert not missing, f"modules missing from the README's layout: {missing}"
