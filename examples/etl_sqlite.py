"""ETL into SQLite: JSON lines -> a CPU-heavy transform in worker processes -> a SQLite table.

The parent reads JSON lines (a file given on the command line, or rows it generates) and puts
each row into a ProcessChannel. Each worker opens one SQLite connection in ``worker_init`` (WAL
mode, a busy timeout), derives a key from each row (PBKDF2: CPU work that threads could not
spread over cores) and compresses its text (zlib), then writes its batch in one transaction.
A row that cannot be transformed is left in ``batch.data`` and the send raises: the rows
written are delivered, and only the failing one is retried or dropped. At the end the program
prints a report, checks the table against what was delivered (every delivered id exactly once,
keys recomputed for a sample), and exits with status 1 if anything was dropped or the check
failed.

    python examples/etl_sqlite.py [INPUT.jsonl] [--rows N] [--workers W] [--db PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import procdispatch as pd

SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    key TEXT NOT NULL,
    packed BLOB NOT NULL,
    crc INTEGER NOT NULL
)
"""

db: sqlite3.Connection | None = None  # one per worker process, opened by connect()


def connect(path: str) -> None:
    """worker_init: this worker's connection, reused by every batch it writes."""
    global db
    db = sqlite3.connect(path, timeout=30)
    db.execute("PRAGMA busy_timeout = 30000")  # wait for another worker's transaction
    db.execute("PRAGMA synchronous = NORMAL")  # safe under WAL, and much faster


def transform(row: dict[str, Any], rounds: int) -> tuple[int, str, str, bytes, int]:
    """CPU work: a PBKDF2 key of the text salted with the user, and the text compressed."""
    text = row["text"].encode()
    if not text:
        raise ValueError(f"row {row['id']}: empty text")
    key = hashlib.pbkdf2_hmac("sha256", text, row["user"].encode(), rounds).hex()
    return int(row["id"]), row["user"], key, zlib.compress(text, 9), zlib.crc32(text)


def make_loader(rounds: int) -> Any:
    def load(batch: pd.Batch[dict[str, Any]]) -> None:
        assert db is not None
        good: list[tuple[int, str, str, bytes, int]] = []
        bad: list[dict[str, Any]] = []
        errors: list[str] = []
        for row in batch.data:
            try:
                good.append(transform(row, rounds))
            except (KeyError, TypeError, ValueError) as exc:
                bad.append(row)
                errors.append(str(exc))
        with db:  # one transaction per batch; INSERT OR REPLACE: a resent batch is harmless
            db.executemany("INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?, ?)", good)
        # The rows written leave batch.data (delivered); only the failing ones stay behind.
        batch.data[:] = bad
        if bad:
            raise ValueError("; ".join(errors))

    return load


def generate(path: Path, rows: int, fail_row: int | None) -> None:
    rng = random.Random(7)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    with path.open("w") as f:
        for i in range(rows):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            if i == fail_row:
                text = ""  # cannot be transformed: fails on every attempt
            f.write(json.dumps({"id": i, "user": f"user{i % 97}", "text": text}) + "\n")


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def verify(path: str, delivered: set[int], rounds: int, source: Path) -> list[str]:
    """What is wrong with the table, given the ids delivered (empty: all good)."""
    problems: list[str] = []
    with contextlib.closing(sqlite3.connect(path)) as con:
        ids = [i for (i,) in con.execute("SELECT id FROM docs")]
        if len(ids) != len(delivered) or set(ids) != delivered:
            problems.append(f"table holds {len(ids)} ids, {len(delivered)} were delivered")
        sample = set(random.Random(1).sample(sorted(delivered), min(20, len(delivered))))
        for row in read_rows(source):
            if row["id"] in sample:
                got = con.execute(
                    "SELECT user, key, packed, crc FROM docs WHERE id = ?", (row["id"],)
                ).fetchone()
                want = transform(row, rounds)[1:]
                if got is None or tuple(got) != want:
                    problems.append(f"row {row['id']} differs from its transform")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", nargs="?", type=Path, help="JSON lines (default: generated)")
    ap.add_argument("--rows", type=int, default=20_000, help="rows to generate (no input)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=200, help="rows per transaction")
    ap.add_argument("--rounds", type=int, default=2_000, help="PBKDF2 iterations per row")
    ap.add_argument("--db", help="SQLite file to write (default: a temporary one)")
    ap.add_argument("--fail-row", type=int, help="generate this row so that it always fails")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="procdispatch-etl-") as tmp:
        source = args.input
        if source is None:
            source = Path(tmp) / "input.jsonl"
            generate(source, args.rows, args.fail_row)
        path = args.db or os.path.join(tmp, "etl.sqlite")
        with contextlib.closing(sqlite3.connect(path)) as con:
            con.execute("PRAGMA journal_mode = WAL")  # readers and one writer at a time
            con.execute(SCHEMA)

        delivered: set[int] = set()
        dropped: dict[int, str] = {}
        errors: dict[int, BaseException] = {}
        retry_locked = pd.retry_on(sqlite3.OperationalError)  # "database is locked" and kin

        def on_error(batch: pd.Batch[dict[str, Any]], exc: BaseException) -> bool:
            errors[batch.id] = exc
            return retry_locked(batch, exc)

        def on_drop(batch: pd.Batch[dict[str, Any]] | None, flush: bool) -> None:
            if batch is not None:
                why = errors.get(batch.id)
                for row in batch.data:
                    dropped[row["id"]] = f"{type(why).__name__}: {why}" if why else "dropped"

        def on_delivered(batch: pd.Batch[dict[str, Any]]) -> None:
            delivered.update(row["id"] for row in batch.data)

        t0 = time.perf_counter()
        with pd.ProcessChannel(
            make_loader(args.rounds),
            workers=args.workers,
            worker_init=functools.partial(connect, path),
            batch_items_max=args.batch,
            batch_age_max=0.5,
            retry=pd.retry.exponential(initial=0.1, max_attempts=5),
            on_error=on_error,
            on_drop=on_drop,
            on_delivered=on_delivered,
            progress=_have_tqdm(),
        ) as ch:
            for row in read_rows(source):
                ch.put(row)
        elapsed = time.perf_counter() - t0
        stats = ch.stats()
        problems = verify(path, delivered, args.rounds, source)

    print(
        f"{stats.items_put} rows read, {stats.items_delivered} written, "
        f"{stats.items_dropped} dropped in {elapsed:.2f}s "
        f"({stats.items_delivered / elapsed:,.0f} rows/s, {args.workers} workers, "
        f"{stats.batches_sent} transactions, {stats.batches_retried} retried)"
    )
    for row_id, why in sorted(dropped.items()):
        print(f"  dropped row {row_id}: {why}")
    for p in problems:
        print(f"  check failed: {p}")
    print("table verified" if not problems else "TABLE CHECK FAILED")
    return 0 if not dropped and not problems else 1


def _have_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        print("(no progress bar: pip install 'procdispatch[progress]')", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
