"""The README's install works for programs and for static tools alike.

``pip install -e .`` in a fresh virtual environment must leave procdispatch importable from
anywhere *and* visible to mypy (and so to IDEs, which also read ``.pth`` path lines but cannot
run an import hook); a built wheel must hold every subpackage and the ``py.typed`` marker.
These tests build with the project's real build backend, fetched by pip as a user's pip would,
so they need the package index.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Seconds a pip install or a wheel build may take (it fetches the build backend).
PIP_TIMEOUT = 300.0

PROBE = """\
import procdispatch as pd
from procdispatch.backends import registered_backends


def total(stats: pd.Stats) -> str:
    return stats.items_put


names: list[int] = registered_backends()
"""

#: What mypy must say about PROBE: each line is wrong only by procdispatch's own annotations
#: (``items_put`` is an int, the backend names are strings), so these errors show that mypy
#: read the package, not an ``Any`` standing for a module it could not find.
EXPECTED_ERRORS = [
    'probe.py:6: error: Incompatible return value type (got "int", expected "str")  [return-value]',
    'probe.py:9: error: Incompatible types in assignment (expression has type "list[str]", '
    'variable has type "list[int]")  [assignment]',
]


def _run(cmd: list[str], cwd: Path, timeout: float = PIP_TIMEOUT) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    out = f"$ {' '.join(cmd)}\nexit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, out
    return proc.stdout


@pytest.fixture(scope="module")
def editable_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the project installed by the README's command."""
    env = tmp_path_factory.mktemp("editable") / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "-e", "."], cwd=REPO)
    return env


@pytest.mark.slow
@pytest.mark.timeout(2 * PIP_TIMEOUT)
def test_editable_install_is_importable_from_elsewhere(editable_env: Path, tmp_path: Path):
    python = editable_env / "bin" / "python"
    where = _run(
        [str(python), "-c", "import procdispatch; print(procdispatch.__file__)"], cwd=tmp_path
    )
    assert Path(where.strip()) == REPO / "procdispatch" / "__init__.py"


@pytest.mark.slow
@pytest.mark.timeout(2 * PIP_TIMEOUT)
def test_mypy_finds_the_editable_install(editable_env: Path, tmp_path: Path):
    """mypy, run on a file outside the repository against the fresh environment, reads
    procdispatch's own annotations: no import-not-found, and exactly the two errors that
    only those annotations explain."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--python-executable",
            str(editable_env / "bin" / "python"),
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--show-error-codes",
            probe.name,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
        check=False,
    )
    out = f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "import-not-found" not in out, out
    assert "import-untyped" not in out, out
    errors = [x for x in proc.stdout.splitlines() if ": error: " in x]
    assert errors == EXPECTED_ERRORS, out


@pytest.mark.slow
@pytest.mark.timeout(2 * PIP_TIMEOUT)
def test_wheel_holds_every_subpackage_and_py_typed(tmp_path: Path):
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), "."],
        cwd=REPO,
    )
    (wheel,) = tmp_path.glob("procdispatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "procdispatch").rglob("*")
        if p.suffix in {".py", ".typed"} and "__pycache__" not in p.parts
    }
    assert "procdispatch/py.typed" in expected
    assert "procdispatch/backends/__init__.py" in expected
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"


def test_the_default_install_does_not_pull_dask_and_the_extra_does() -> None:
    text = (REPO / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "dask" not in deps
    assert "distributed" not in deps
    extra = text.split("\ndask = [", 1)[1].split("]", 1)[0]
    assert '"distributed>=' in extra
