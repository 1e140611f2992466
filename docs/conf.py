"""Sphinx configuration of procdispatch's documentation.

The pages are MyST Markdown; the API reference comes from the docstrings (autodoc), and the
options table is generated from the code's one declaration of the options at every build (the
``procdispatch_docs`` extension beside this file), so neither can drift from the code.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))
# The package documented is the one of this checkout, installed or not.
sys.path.insert(0, os.path.dirname(HERE))

project = "procdispatch"
author = "the procdispatch authors"
copyright = "the procdispatch authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "procdispatch_docs",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# One parameter per line once a signature is long (ProcessChannel has 26 options).
maximum_signature_line_length = 100

html_theme = "furo"
html_title = "procdispatch"
html_static_path: list[str] = []
