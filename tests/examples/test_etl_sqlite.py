"""examples/etl_sqlite.py runs end to end at a small size: exit 0 with the table verified, and
exit 1 when a row fails for good (only that row missing from the table)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "etl_sqlite.py"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(SCRIPT), "--rows", "400", "--workers", "2", "--rounds", "50"]
    return subprocess.run(
        [*cmd, "--db", str(tmp_path / "out.sqlite"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )


def _ids(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as con:
        return sorted(i for (i,) in con.execute("SELECT id FROM docs"))


def test_the_etl_example_loads_every_row(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "400 rows read, 400 written, 0 dropped" in proc.stdout
    assert "table verified" in proc.stdout
    assert _ids(tmp_path / "out.sqlite") == list(range(400))
    with contextlib.closing(sqlite3.connect(tmp_path / "out.sqlite")) as con:
        (mode,) = con.execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


def test_the_etl_example_fails_when_a_row_is_dropped(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--fail-row", "123")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "400 rows read, 399 written, 1 dropped" in proc.stdout
    assert "dropped row 123: ValueError: row 123: empty text" in proc.stdout
    assert "table verified" in proc.stdout  # the rows of its batch were written all the same
    assert _ids(tmp_path / "out.sqlite") == [i for i in range(400) if i != 123]
