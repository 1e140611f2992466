"""Posting batches to an HTTP service under a rate limit, with the service's 503s retried.

The program starts a small HTTP service of its own on 127.0.0.1 (a free port, served by a
thread of this process) that stores the items POSTed to it and counts how often it got each
one. About one request in 7 (a seeded random draw) it answers 503 Service Unavailable and
stores nothing. The workers'
send_fn POSTs each batch as JSON and turns a 503 into a TransientError, which the channel
retries; qps_limit caps the requests per second across all workers. Once a second the program
prints what that second saw (requests sent, requests retried, items stored). At the end it
asks the service's counts whether every item arrived exactly once: exit status 0 if so, 1 if
not.

    python examples/http_sink.py [--items N] [--batch B] [--qps Q] [--workers W] [--fail-one-in K]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

import procdispatch as pd

Item = dict[str, Any]


class Store:
    """What the service received: how often each item id was stored, and its request counts."""

    def __init__(self, fail_one_in: int, seed: int = 7) -> None:
        self.fail_one_in = fail_one_in
        self._rng = random.Random(seed)
        self.counts: Counter[int] = Counter()
        self.requests = 0
        self.rejected = 0
        self.stored = 0
        self._lock = threading.Lock()

    def receive(self, items: list[Item]) -> bool:
        """Store a request's items, or refuse the whole request (one in fail_one_in, drawn
        at random: a fixed period could keep hitting the same retried batch)."""
        with self._lock:
            self.requests += 1
            if self.fail_one_in and self._rng.randrange(self.fail_one_in) == 0:
                self.rejected += 1
                return False
            self.counts.update(int(item["id"]) for item in items)
            self.stored += len(items)
            return True

    def totals(self) -> tuple[int, int, int]:
        """(requests, requests answered 503, items stored) so far."""
        with self._lock:
            return self.requests, self.rejected, self.stored


class SinkServer(ThreadingHTTPServer):
    """The service: ``POST /items`` with ``{"items": [...]}``, on a free port of 127.0.0.1."""

    daemon_threads = True

    def __init__(self, store: Store) -> None:
        super().__init__(("127.0.0.1", 0), SinkHandler)
        self.store = store

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/items"


class SinkHandler(BaseHTTPRequestHandler):
    server: SinkServer

    def do_POST(self) -> None:
        if self.path != "/items":
            self._answer(404, {"error": f"no such resource {self.path}"})
            return
        length = int(self.headers.get("Content-Length", "0"))
        items = json.loads(self.rfile.read(length))["items"]
        if self.server.store.receive(items):
            self._answer(200, {"stored": len(items)})
        else:
            self._answer(503, {"error": "busy, try again"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the service quiet: the program prints its own per-second summary."""


def make_sender(url: str) -> Callable[[pd.Batch[Item]], None]:
    """The send_fn: POST the batch; a 503 is a TransientError (retried), any other HTTP error
    a RuntimeError (the default on_error gives up on it)."""

    def send(batch: pd.Batch[Item]) -> None:
        body = json.dumps({"items": batch.data}).encode()
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 503:
                raise pd.TransientError(
                    f"batch {batch.id} attempt {batch.attempt}: the service answered 503"
                ) from None
            raise RuntimeError(
                f"batch {batch.id} attempt {batch.attempt}: the service answered {exc.code}"
            ) from None

    return send


def report_each_second(
    ch: pd.ProcessChannel[Item], store: Store, stop: threading.Event, out: TextIO
) -> None:
    """Print one line per second of what changed, and a last one for the part-second at the
    end (after ``stop`` is set), so that the lines add up to the totals."""
    start = time.monotonic()
    sent = retried = stored = 0
    second = 0
    while True:
        second += 1
        finished = stop.wait(max(0.0, start + second - time.monotonic()))
        stats = ch.stats()
        now_stored = store.totals()[2]
        out.write(
            f"{second:4d}s: sent {stats.batches_sent - sent:4d} requests, "
            f"retried {stats.batches_retried - retried:3d}, "
            f"stored {now_stored - stored:5d} items\n"
        )
        out.flush()
        sent, retried, stored = stats.batches_sent, stats.batches_retried, now_stored
        if finished:
            return


def check(counts: Mapping[int, int], items: int) -> list[str]:
    """What is wrong with the service's counts for items 0..items-1 (nothing: an empty list)."""
    problems = []
    missing = [i for i in range(items) if counts.get(i, 0) == 0]
    twice = sorted(i for i, c in counts.items() if c > 1)
    unknown = sorted(i for i in counts if not 0 <= i < items)
    for what, ids in (("missing", missing), ("stored more than once", twice)):
        if ids:
            problems.append(f"{len(ids)} items {what} (first: {ids[:5]})")
    if unknown:
        problems.append(f"{len(unknown)} items that were never put (first: {unknown[:5]})")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--items", type=int, default=3000, help="items to send")
    ap.add_argument("--batch", type=int, default=25, help="items per request")
    ap.add_argument("--qps", type=float, default=40.0, help="requests per second, all workers")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--fail-one-in", type=int, default=7, help="answer 503 to one request in K (0: never)"
    )
    args = ap.parse_args(argv)

    store = Store(args.fail_one_in)
    server = SinkServer(store)
    serving = threading.Thread(target=server.serve_forever, name="http-sink", daemon=True)
    serving.start()
    print(
        f"service listening on {server.url}; sending {args.items} items, "
        f"at most {args.qps:g} requests/s"
    )
    stop = threading.Event()
    reporter = threading.Thread(target=lambda: None)
    t0 = time.perf_counter()
    try:
        with pd.ProcessChannel(
            make_sender(server.url),
            workers=args.workers,
            batch_items_max=args.batch,
            batch_age_max=0.2,
            qps_limit=args.qps,
            retry=pd.retry.exponential(initial=0.05, max_delay=1.0),
        ) as ch:
            reporter = threading.Thread(
                target=report_each_second, args=(ch, store, stop, sys.stdout), daemon=True
            )
            reporter.start()
            for i in range(args.items):
                ch.put({"id": i, "reading": (i * 7919) % 1000 / 10})
        # Leaving the block waited until every batch was stored or dropped.
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        if reporter.is_alive():
            reporter.join()
        server.shutdown()
        server.server_close()

    stats = ch.stats()
    requests, rejected, stored = store.totals()
    print(
        f"service: {requests} requests in {elapsed:.2f}s, {rejected} answered 503; "
        f"{stored} items stored, {len(store.counts)} distinct"
    )
    print(
        f"channel: {stats.batches_sent} sends, {stats.batches_retried} retried, "
        f"{stats.items_delivered} items delivered, {stats.items_dropped} dropped"
    )
    problems = check(store.counts, args.items)
    if stats.items_delivered != args.items:
        problems.append(f"the channel delivered {stats.items_delivered} of {args.items} items")
    for problem in problems:
        print(f"MISMATCH: {problem}")
    if not problems:
        print(f"OK: every one of the {args.items} items arrived exactly once")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
