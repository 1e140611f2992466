"""The documentation site cannot drift from the code: API coverage, the generated options table,
the data-flow picture, and references that stay inside the repository."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from mdblocks import DOCS, REPO, pages

import procdispatch as pd
from procdispatch._options import options_table

_DIRECTIVE = re.compile(r"^\.\. (auto\w+):: (\S+)\s*$")
_OPTION = re.compile(r"^\s+:(\w[\w-]*):\s*(.*)$")
_CONTINUATION = re.compile(r"^\s{6,}\S")


def _load(path: Path) -> ModuleType:
    name = f"docs_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _resolve(dotted: str) -> Any:
    """The object a dotted name names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _api_targets() -> list[str]:
    """Every object the API page documents: each autodoc directive's target, and for an
    ``automodule`` with a ``:members:`` list, each member named."""
    lines = (DOCS / "api.md").read_text(encoding="utf-8").splitlines()
    targets: list[str] = []
    module: str | None = None  # the automodule whose options are being read
    listing = False  # reading the continuation lines of its :members: list
    for line in lines:
        d = _DIRECTIVE.match(line)
        if d is not None:
            targets.append(d.group(2))
            module = d.group(2) if d.group(1) == "automodule" else None
            listing = False
            continue
        o = _OPTION.match(line)
        if o is not None:
            listing = o.group(1) == "members" and module is not None
            if listing:
                targets += [f"{module}.{m.strip()}" for m in o.group(2).split(",") if m.strip()]
            continue
        if listing and _CONTINUATION.match(line):
            targets += [f"{module}.{m.strip()}" for m in line.split(",") if m.strip()]
        else:
            listing = False
    return targets


def test_every_api_page_target_exists():
    targets = _api_targets()
    assert len(targets) >= 20
    for t in targets:
        _resolve(t)  # raises for a name the code no longer has


def test_the_api_page_documents_every_public_name():
    documented = {id(_resolve(t)) for t in _api_targets()}
    missing = [name for name in pd.__all__ if id(getattr(pd, name)) not in documented]
    assert not missing, f"public names missing from docs/api.md: {missing}"


def test_the_options_page_includes_the_table_generated_from_the_code(tmp_path: Path):
    ext = _load(DOCS / "_ext" / "procdispatch_docs.py")
    (written,) = ext.generate(str(tmp_path))
    assert Path(written).read_text(encoding="utf-8") == options_table()
    assert Path(written).relative_to(tmp_path).as_posix() == "_generated/options-table.md"
    page = (DOCS / "options.md").read_text(encoding="utf-8")
    assert "```{include} _generated/options-table.md\n```" in page
    assert "procdispatch_docs" in (DOCS / "conf.py").read_text(encoding="utf-8")


def test_no_page_holds_a_hand_copy_of_the_options_table():
    first_row = options_table().splitlines()[2]  # the header, the rule, then `workers`
    name_cell = first_row.split("|")[1].strip()
    for page in pages():
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            cells = line.split("|")
            assert not (len(cells) > 2 and cells[1].strip() == name_cell), (
                f"{page.name}:{n} copies a row of the options table; include the generated one"
            )


# ---- the data-flow picture -------------------------------------------------------------------

render = _load(DOCS / "diagrams" / "render.py")


def test_every_diagram_svg_was_rendered_from_its_current_source():
    sources = sorted((DOCS / "diagrams").glob("*.dot"))
    assert sources
    assert render.stale() == [], "run: python docs/diagrams/render.py"


def test_a_changed_source_is_detected(tmp_path: Path):
    for f in (DOCS / "diagrams").glob("dataflow.*"):
        shutil.copy(f, tmp_path / f.name)
    assert render.stale(tmp_path) == []
    dot_file = tmp_path / "dataflow.dot"
    dot_file.write_text(dot_file.read_text(encoding="utf-8") + "// changed\n", encoding="utf-8")
    assert render.stale(tmp_path) == ["dataflow.dot"]


def _texts(svg: str) -> list[str]:
    root = ET.fromstring(svg.encode("utf-8"))
    return sorted("".join(e.itertext()) for e in root.iter("{http://www.w3.org/2000/svg}text"))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_every_diagram_svg_is_what_dot_draws_from_its_source():
    """Layout coordinates differ between Graphviz versions; the text drawn does not."""
    for dot_file in sorted((DOCS / "diagrams").glob("*.dot")):
        committed = dot_file.with_suffix(".svg").read_text(encoding="utf-8")
        fresh = render.render_svg(dot_file)
        assert _texts(committed) == _texts(fresh), dot_file.name
        assert render.recorded(committed) == render.recorded(fresh)


# ---- references ---------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_DIRECTIVE_ARG = re.compile(r"^```\{(?:include|literalinclude|image|figure)\}\s+(\S+)")
_MENTION = re.compile(r"`([\w./-]+\.(?:md|py|dot|svg|toml|cfg|txt|json))`")


def _repo_files() -> set[str]:
    """The repository's files, relative to its root (hidden folders and build output left
    out)."""
    skip = {"__pycache__", "_build", "build", "dist"}
    out: set[str] = set()
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if any(p.startswith(".") or p in skip or p.endswith(".egg-info") for p in parts):
            continue
        if path.is_file():
            out.add("/".join(parts))
    return out


def _known(path: str, page: Path, files: set[str], names: set[str]) -> bool:
    """A path mentioned in a page names a file of the repository: from its root, from the
    page's folder, or (a bare file name) anywhere in it."""
    if path in files or ("/" not in path and path in names):
        return True
    target = (page.parent / path).resolve()
    return target.is_relative_to(REPO) and target.relative_to(REPO).as_posix() in files


def test_pages_refer_only_to_files_in_the_repository():
    files = _repo_files()
    names = {Path(f).name for f in files}
    bad: list[str] = []
    for page in pages():
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{page.relative_to(DOCS)}:{n}"
            refs = [m.group(1) for m in _LINK.finditer(line)]
            d = _DIRECTIVE_ARG.match(line)
            if d is not None:
                refs.append(d.group(1))
            for ref in refs:
                if re.match(r"^[a-z][a-z0-9+.-]*:", ref) or ref.startswith("#"):
                    continue  # a URL, or an anchor on the same page
                target = (page.parent / ref.split("#")[0]).resolve()
                generated = target.is_relative_to(DOCS / "_generated")
                if not target.is_relative_to(REPO) or not (target.exists() or generated):
                    bad.append(f"{where}: {ref}")
            for m in _MENTION.finditer(line):
                if not _known(m.group(1), page, files, names):
                    bad.append(f"{where}: `{m.group(1)}` is no file of the repository")
    assert not bad, "\n".join(bad)
