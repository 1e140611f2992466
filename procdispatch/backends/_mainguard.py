"""Whether the user's main script is making the channel outside its main guard.

A spawn or forkserver child that rebuilds ``__main__`` runs the script's top-level code again:
a channel made there, outside ``if __name__ == "__main__":``, would be made again in every
worker. :func:`unguarded_main_line` finds, on the caller's stack, the line of the main module's
top-level code that is running, and reads the script's source to tell whether that line lies
under the guard. The process backend refuses such a channel when its workers would rebuild
``__main__`` (:func:`._procstart.check_main_guard`); the Dask backend asks too.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ast

__all__ = ["unguarded_main_line"]


def unguarded_main_line() -> tuple[str, int] | None:
    """(path, line) when the main module's top-level code, outside ``if __name__ ==
    "__main__":``, is on this thread's stack: a spawned child would run that line again."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    if main is None or path is None or (spec_name or "").endswith("__main__"):
        return None  # nothing of it is run again (python -c, stdin, a package's __main__)
    line = _top_level_line(vars(main))
    if line is None or _guarded(str(path), line) is not False:
        return None
    return str(path), line


def _top_level_line(main_globals: dict[str, Any]) -> int | None:
    """The line the main module's top-level code is running, when it is on this stack."""
    frame = sys._getframe(1)
    line = None
    while frame is not None:
        if frame.f_globals is main_globals and frame.f_code.co_name == "<module>":
            line = frame.f_lineno
        frame = frame.f_back  # type: ignore[assignment]
    return line


def _guarded(path: str, line: int) -> bool | None:
    """Whether ``line`` of the script lies in the body of an ``if __name__ == "__main__":``
    (None when the source cannot be read or parsed)."""
    import ast

    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            end = node.body[-1].end_lineno or node.body[-1].lineno
            if node.body[0].lineno <= line <= end:
                return True
    return False


def _is_main_test(test: ast.expr) -> bool:
    import ast

    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1
