"""Pages generated from the code at every build, so that the docs cannot drift from it.

``_generated/options-table.md`` is :func:`procdispatch._options.options_table` -- the table
rendered from the one declaration of the channel's options -- and the Options page includes
it. The file is rewritten only when its text changes, so that an unchanged table does not make
Sphinx read the page again.
"""

from __future__ import annotations

import os
from typing import Any

GENERATED = "_generated"


def write_if_changed(path: str, text: str) -> bool:
    """Write ``text`` to ``path`` unless it already holds exactly that; True if written."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def generate(srcdir: str) -> list[str]:
    """Write every generated page under ``srcdir``; return their paths."""
    from procdispatch._options import options_table

    path = os.path.join(srcdir, GENERATED, "options-table.md")
    write_if_changed(path, options_table())
    return [path]


def _on_config_inited(app: Any, config: Any) -> None:
    generate(app.srcdir)


def setup(app: Any) -> dict[str, Any]:
    app.connect("config-inited", _on_config_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
