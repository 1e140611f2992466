"""The coordinator survives whatever option values, user code and worker answers throw at it.

Every finite option value the validators accept is a valid deadline, however far; and whatever
a callback, a retry policy, an item's pickling or a worker's answer raises -- a SystemExit or a
KeyboardInterrupt too -- is the failure of the batch concerned, never of the coordinator: after
the drain every item is delivered or dropped, and no worker is left.
"""

from __future__ import annotations

from typing import Any

from faultfns import FailsFirst
from workerfns import Log, Recorder, delivered_items, wait_for

import procdispatch as pd

MONTH = 2.6e6  # beyond the longest wait the OS takes under the selector (about 24.8 days)


def _no_coordinator_failure(caplog: Any) -> None:
    assert not [r for r in caplog.records if "coordinator failed" in r.getMessage()]


def _accounted(ch: pd.ProcessChannel[Any], delivered: list[Any], dropped: list[Any]) -> None:
    s = ch.stats()
    assert s.items_put == s.items_delivered + s.items_dropped
    assert (s.items_delivered, s.items_dropped) == (len(delivered), len(dropped))


# ---- deadlines of any finite length ---------------------------------------------------------


def test_month_long_timeouts_drain_normally(tmp_path: Any, make_channel: Any, caplog: Any) -> None:
    log = Log(tmp_path / "log")
    ch = make_channel(
        Recorder(log),
        workers=1,
        batch_items_max=2,
        batch_age_max=MONTH,
        start_timeout=MONTH,
        send_timeout=MONTH,
        cancel_grace=1e10,
        delivery_timeout=1e10,
    )
    ch.put_many(range(5))  # the last batch is cut by the close, not by its age
    assert ch.close_and_drain(60)
    assert sorted(delivered_items(log)) == list(range(5))
    _accounted(ch, list(range(5)), [])
    _no_coordinator_failure(caplog)


def test_a_retry_delay_of_1e300_waits_until_the_cancel(
    tmp_path: Any, make_channel: Any, caplog: Any
) -> None:
    log = Log(tmp_path / "log")
    drops: list[list[Any]] = []
    ch = make_channel(
        FailsFirst(log, "transient"),
        workers=1,
        batch_items_max=2,
        retry=lambda: iter([1e300]),
        on_drop=lambda b, f: b is not None and drops.append(list(b.data)),
    )
    ch.put_many(range(6))
    wait_for(lambda: sorted(delivered_items(log)) == [2, 3, 4, 5], what="the other batches")
    wait_for(lambda: ch.stats().batches_retried == 1, what="the retry to be queued")
    ch.cancel()
    assert ch.wait_drained(60)
    assert drops == [[0, 1]]
    _accounted(ch, [2, 3, 4, 5], [0, 1])
    _no_coordinator_failure(caplog)
