"""Render every Graphviz ``.dot`` file of this folder to an ``.svg`` beside it.

Each SVG records the SHA-256 of the source it was drawn from, in a comment after the XML
declaration, so a test can tell whether the committed picture still matches its source::

    python docs/diagrams/render.py          # render every diagram (needs Graphviz's dot)
    python docs/diagrams/render.py --check  # exit 1 if an SVG is missing or out of date
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAMP = re.compile(r"<!-- procdispatch-diagram source=(\S+) sha256=([0-9a-f]{64}) -->")


def source_hash(dot_file: Path) -> str:
    return hashlib.sha256(dot_file.read_bytes()).hexdigest()


def recorded(svg: str) -> tuple[str, str] | None:
    """(source name, hash) recorded in an SVG's text, or None if it has no stamp."""
    m = STAMP.search(svg)
    return (m.group(1), m.group(2)) if m else None


def render_svg(dot_file: Path, dot: str = "dot") -> str:
    """The SVG that ``dot`` draws from ``dot_file``, stamped with the source's hash."""
    svg = subprocess.run(
        [dot, "-Tsvg", str(dot_file)], capture_output=True, text=True, check=True
    ).stdout
    stamp = f"<!-- procdispatch-diagram source={dot_file.name} sha256={source_hash(dot_file)} -->"
    head, sep, rest = svg.partition("?>\n")
    if not sep:  # no XML declaration: the stamp goes first
        return stamp + "\n" + svg
    return head + sep + stamp + "\n" + rest


def stale(folder: Path = HERE) -> list[str]:
    """The diagrams whose SVG is missing or was drawn from another version of the source."""
    out = []
    for dot_file in sorted(folder.glob("*.dot")):
        svg_file = dot_file.with_suffix(".svg")
        current = (dot_file.name, source_hash(dot_file))
        if not svg_file.exists() or recorded(svg_file.read_text(encoding="utf-8")) != current:
            out.append(dot_file.name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that every SVG is current")
    args = ap.parse_args()
    if args.check:
        bad = stale()
        for name in bad:
            print(f"{name}: its SVG is missing or out of date; run {Path(__file__).name}")
        return 1 if bad else 0
    for dot_file in sorted(HERE.glob("*.dot")):
        dot_file.with_suffix(".svg").write_text(render_svg(dot_file), encoding="utf-8")
        print(f"rendered {dot_file.with_suffix('.svg').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
