"""Send functions for the command-line tests, loaded by ``python -m procdispatch run
clifns:...`` from this directory (the current directory of the run).

``sqlite_sink`` writes each batch to the SQLite file named by ``PD_CLI_DB`` (table ``rows``:
``id`` and the item as JSON), through one connection per worker, in one transaction per batch.
An item with ``"fail": true`` is refused every time: the rest of its batch is written and
removed from ``batch.data``, and the send raises for it alone.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import procdispatch as pd

_db: sqlite3.Connection | None = None


def _connect() -> sqlite3.Connection:
    global _db
    if _db is None:
        _db = sqlite3.connect(os.environ["PD_CLI_DB"], timeout=30)
        _db.execute("PRAGMA busy_timeout = 30000")
        _db.execute("PRAGMA synchronous = NORMAL")
    return _db


def create_table(path: str) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    finally:
        con.close()


def sqlite_sink(batch: pd.Batch[dict[str, Any]]) -> None:
    db = _connect()
    good = [x for x in batch.data if not x.get("fail")]
    with db:
        db.executemany(
            "INSERT OR REPLACE INTO rows VALUES (?, ?)",
            [(int(x["id"]), json.dumps(x)) for x in good],
        )
    batch.data[:] = [x for x in batch.data if x.get("fail")]
    if batch.data:
        raise ValueError(f"refused: {[x['id'] for x in batch.data]}")


def held_sink(batch: pd.Batch[Any]) -> None:
    """Marks that a send started (the file ``PD_CLI_STARTED``), then never returns: only a
    cancel's kill ends it."""
    Path(os.environ["PD_CLI_STARTED"]).touch()
    threading.Event().wait()


def jsonl_sink(batch: pd.Batch[Any]) -> None:
    """Appends each batch's items to the file ``PD_CLI_OUT`` as JSON lines, in one write (so
    whole lines, whatever the workers); an item that is a dict with ``"fail": true`` is
    refused every time, as in ``sqlite_sink``."""
    good = [x for x in batch.data if not (isinstance(x, dict) and x.get("fail"))]
    if good:
        with open(os.environ["PD_CLI_OUT"], "a") as f:
            f.write("".join(json.dumps(x) + "\n" for x in good))
    batch.data[:] = [x for x in batch.data if x not in good]
    if batch.data:
        raise ValueError(f"refused: {batch.data}")
