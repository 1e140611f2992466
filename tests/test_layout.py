"""Every module of the package stays the size the style guide asks (about 400 lines at most):
a module that outgrows it is split along a seam a reader recognises, not left to grow."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "procdispatch"
#: The guide's "~400 lines", with the slack "about" allows.
MAX_LINES = 420


def test_no_module_of_the_package_exceeds_the_line_limit() -> None:
    sizes = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    assert sizes, f"no module found under {PACKAGE}"
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them): {too_long}"
