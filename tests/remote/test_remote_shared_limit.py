"""Four coordinators in four processes share one 50-per-second limit through one Redis-backed
pyrate-limiter Limiter: what their sinks see stays within the bound pyrate's algorithm gives,
and the four together get the rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redisfns import (  # noqa: F401 (fixtures: imported, not in a conftest; see redisfns)
    RedisServer,
    gcra_bound,
    max_in_window,
    read_floats,
    redis_server_fixture,
    redis_unstarted_fixture,
)

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
RATE = 50
CHANNELS = 4
ITEMS = 60  # per channel: about 5 s at the shared rate


def test_four_coordinator_processes_share_one_redis_limit(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    start = str(tmp_path / "start")
    outs = [str(tmp_path / f"coord{i}") for i in range(CHANNELS)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(TESTS), env.get("PYTHONPATH", "")])
    procs = []
    for out in outs:
        code = (
            "from redisfns import coordinator_main; "
            f"coordinator_main({redis_server.socket!r}, 'shared', {RATE}, {ITEMS}, {out!r}, "
            f"{start!r})"
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    Path(start).touch()
    for p in procs:
        output, _ = p.communicate(timeout=100)
        assert p.returncode == 0, output
    sends: list[list[float]] = []
    stamps: list[list[float]] = []
    for out in outs:
        summary = json.loads(Path(out).read_text())
        assert summary == {"delivered": ITEMS, "sent": ITEMS}
        s = read_floats(out + ".sends")
        p = [ms / 1000 for ms in read_floats(out + ".stamps")]
        assert len(s) == ITEMS
        # A channel acquires at most one token ahead of its sends: one spare at the end.
        assert len(p) - len(s) in (0, 1), (len(p), len(s))
        sends.append(s)
        stamps.append(p[: len(s)])

    # What pyrate's GCRA admits: its own timestamps never put more than 51 in a second.
    all_stamps = [t for p in stamps for t in p]
    assert max_in_window(all_stamps, 1.0) <= gcra_bound(1000, RATE)
    # One worker per channel sends in token order, so the k-th send used the k-th token; a
    # send comes after its token by a delay that varies (the loop's turn, the pipe, the
    # worker's wake-up, a spare waiting for the worker). A 1-second window of sends holds the
    # tokens of a window that much longer.
    delays = [t - a for s, p in zip(sends, stamps, strict=True) for t, a in zip(s, p, strict=True)]
    assert min(delays) >= -0.002, min(delays)  # no send before its token (clock in ms)
    spread = max(delays) - min(delays)
    all_sends = [t for s in sends for t in s]
    bound = gcra_bound(1000 * (1.0 + spread), RATE)
    seen = max_in_window(all_sends, 1.0)
    assert seen <= bound, (seen, bound, spread)

    # The rate is used: while all four ran, together they got at least half of it, and each
    # at least half of a fair share (generous: a shared 2-core machine).
    first = min(all_sends)
    busy_end = min(max(s) for s in sends)  # the first channel to finish
    span = busy_end - first
    assert span > 1.0, span
    together = sum(1 for t in all_sends if t <= busy_end) - 1
    assert together / span >= 0.5 * RATE, (together, span)
    for s in sends:
        mine = sum(1 for t in s if t <= busy_end)
        assert mine / span >= 0.5 * RATE / CHANNELS, (mine, span)
    print(
        f"sends {len(all_sends)}; max in 1 s: {seen} (bound {bound}, delay spread "
        f"{spread * 1000:.1f} ms); all four busy {span:.2f} s at {together / span:.1f}/s; "
        f"per channel {[sum(1 for t in s if t <= busy_end) for s in sends]}"
    )
