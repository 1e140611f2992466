"""The progress option: a tqdm bar on a terminal, status lines elsewhere, a user's bar, a
callable; all fed from a thread of the parent through the final drain."""

from __future__ import annotations

import asyncio
import io
import re
import sys
import threading
from typing import Any

import pytest
from progressfns import GatedItems
from workerfns import Gate, wait_for

import procdispatch as pd
from procdispatch import _progress


class FakeTTY(io.StringIO):
    """A stderr that says it is a terminal, and keeps what was drawn on it."""

    def isatty(self) -> bool:
        return True


def _last_render(text: str) -> str:
    frames = [f for f in re.split(r"[\r\n]", text) if f.strip()]
    return frames[-1] if frames else ""


def _shown(text: str) -> tuple[int, int] | None:
    m = re.search(r"(\d+)/(\d+) \[", _last_render(text))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "procdispatch-progress"]


def test_the_bar_advances_through_the_drain_and_ends_with_the_totals(
    tmp_path: Any, make_channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    first, last = Gate(tmp_path / "first"), Gate(tmp_path / "last")
    send = GatedItems({0: first.path, 49: last.path})
    ch = make_channel(
        send, workers=1, max_leases=1, batch_items_max=10, batch_age_max=0.05, progress=True
    )
    ch.put_many(list(range(50)))
    ch.close()
    # Closed, the first batch held: the bar shows the total and nothing delivered yet.
    wait_for(lambda: _shown(tty.getvalue()) == (0, 50), what="the bar at 0/50")
    first.open()
    # Four batches delivered, the last one held: the drain is under way and the bar follows.
    wait_for(lambda: _shown(tty.getvalue()) == (40, 50), what="the bar at 40/50")
    assert not ch.drained
    assert "in_flight=10" in _last_render(tty.getvalue())
    last.open()
    assert ch.wait_drained(60)
    text = tty.getvalue()
    final = _last_render(text)
    assert _shown(text) == (50, 50), final
    assert "dropped=0" in final
    assert "in_flight=0" in final
    assert text.endswith("\n")  # closed: the bar's line is finished
    assert not _progress_threads()


def test_the_bar_shows_what_was_dropped(
    tmp_path: Any, make_channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)

    ch = make_channel(
        _fail_odd_batches, workers=1, batch_items_max=5, retry=pd.retry.none(), progress=True
    )
    ch.put_many(list(range(20)))
    assert ch.close_and_drain(60)
    final = _last_render(tty.getvalue())
    assert _shown(tty.getvalue()) == (10, 20), final
    assert "dropped=10" in final


def _fail_odd_batches(batch: pd.Batch[int]) -> None:
    if batch.data[0] // 5 % 2:
        raise RuntimeError(f"batch starting at {batch.data[0]} refused")


def test_without_a_terminal_status_lines_and_a_final_line(
    tmp_path: Any, make_channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(_progress, "LINE_EVERY", 0.05)
    gate = Gate(tmp_path / "gate")
    ch = make_channel(GatedItems({29: gate.path}), workers=1, batch_items_max=10, progress=True)
    ch.put_many(list(range(30)))
    ch.close()
    wait_for(lambda: out.getvalue().count("\n") >= 2, what="two status lines")
    lines = out.getvalue().splitlines()
    assert all(re.match(r"procdispatch: \d+/30 delivered, 0 dropped", x) for x in lines), lines
    assert not ch.drained
    gate.open()
    assert ch.wait_drained(60)
    text = out.getvalue()
    assert "\r" not in text
    assert re.search(r"done in [\d.]+s: 30 items put, 30 delivered, 0 dropped", text), text
    assert text.splitlines()[-1].startswith("procdispatch: done")


def test_a_callable_gets_stats_at_each_refresh_and_once_at_the_end(
    tmp_path: Any, make_channel: Any
) -> None:
    calls: list[tuple[str, pd.Stats]] = []

    def report(s: pd.Stats) -> None:
        calls.append((threading.current_thread().name, s))

    gate = Gate(tmp_path / "gate")
    ch = make_channel(GatedItems({19: gate.path}), workers=1, batch_items_max=10, progress=report)
    ch.put_many(list(range(20)))
    wait_for(lambda: any(s.items_delivered == 10 for _, s in calls), what="a report at 10")
    gate.open()
    assert ch.close_and_drain(60)
    # The final report was made before the drain returned.
    assert calls[-1][1].items_delivered == 20
    assert calls[-1][1].items_put == 20
    assert {name for name, _ in calls} == {"procdispatch-progress"}
    n = len(calls)
    assert not _progress_threads()
    assert len(calls) == n


def test_a_bar_of_the_user_is_updated_and_closed(make_channel: Any) -> None:
    tqdm = pytest.importorskip("tqdm")
    out = io.StringIO()
    bar = tqdm.tqdm(file=out, desc="rows")
    ch = make_channel(lambda b: None, workers=2, batch_items_max=7, progress=bar)
    ch.put_many(list(range(100)))
    ch.put_many(iter(range(5)))  # not sized: the total stays what was announced
    assert ch.close_and_drain(60)
    assert bar.n == 105
    assert bar.total == 100
    assert bar.postfix is not None
    assert "dropped=0" in bar.postfix
    assert bar.disable  # closed
    assert "rows" in out.getvalue()


def test_aput_many_of_a_sized_iterable_adds_to_the_total_as_put_many_does(
    make_channel: Any,
) -> None:
    tqdm = pytest.importorskip("tqdm")
    bar = tqdm.tqdm(file=io.StringIO())
    ch = make_channel(lambda b: None, workers=2, batch_items_max=7, progress=bar)

    async def produce() -> None:
        assert await ch.aput_many(list(range(60))) == 60
        assert await ch.aput_many(range(40)) == 40
        assert await ch.aput_many(iter(range(5))) == 5  # not sized: the total stays

    asyncio.run(produce())
    assert ch.close_and_drain(60)
    assert bar.total == 100
    assert bar.n == 105


def test_progress_total_wins_over_put_many(make_channel: Any) -> None:
    tqdm = pytest.importorskip("tqdm")
    bar = tqdm.tqdm(file=io.StringIO())
    ch = make_channel(lambda b: None, workers=1, progress=bar, progress_total=1000)
    ch.put_many(list(range(10)))
    assert ch.close_and_drain(60)
    assert bar.total == 1000
    assert bar.n == 10


def test_a_bar_without_tqdm_is_an_options_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    with pytest.raises(pd.OptionsError, match=r"progress=True.*procdispatch\[progress\]"):
        pd.ProcessChannel(lambda b: None, progress=True, backend="thread")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"progress": 3}, r"progress must be a bool, a tqdm bar or a callable .*\(got 3\)"),
        ({"progress_total": -1}, r"progress_total must be an int >= 0 or None \(got -1\)"),
        ({"progress_total": 2.5}, r"progress_total must be an int >= 0 or None \(got 2.5\)"),
    ],
)
def test_bad_progress_options(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(pd.OptionsError, match=message):
        pd.ProcessChannel(lambda b: None, backend="thread", **kw)


def test_a_failing_callable_is_logged_and_never_harms_the_channel(
    make_channel: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def report(s: pd.Stats) -> None:
        raise ValueError("display broke")

    ch = make_channel(lambda b: None, workers=1, progress=report)
    ch.put_many(list(range(10)))
    assert ch.close_and_drain(60)
    s = ch.stats()
    assert s.items_delivered == 10
    assert "report raised ValueError: display broke" in caplog.text


class Reports:
    """A progress callable that keeps each Stats it gets and fails as told: ``raises`` on the
    first call (or on every call with ``always``)."""

    def __init__(self, raises: BaseException | None = None, always: bool = False) -> None:
        self.got: list[pd.Stats] = []
        self.raises = raises
        self.always = always

    def __call__(self, s: pd.Stats) -> None:
        self.got.append(s)
        if self.raises is not None and (self.always or len(self.got) == 1):
            raise self.raises


def _progress_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "progress" in r.getMessage()
    ]


@pytest.mark.parametrize(
    "error",
    [SystemExit(3), KeyboardInterrupt(), ValueError("display broke")],
    ids=["SystemExit", "KeyboardInterrupt", "ValueError"],
)
def test_a_raising_callable_is_logged_once_and_the_reports_go_on(
    tmp_path: Any, make_channel: Any, caplog: pytest.LogCaptureFixture, error: BaseException
) -> None:
    report = Reports(error)
    gate = Gate(tmp_path / "gate")
    ch = make_channel(GatedItems({0: gate.path}), workers=1, batch_items_max=5, progress=report)
    ch.put_many(list(range(20)))
    # The first call raised; the reports go on while the first batch is held.
    wait_for(lambda: len(report.got) >= 2, what="a report after the failing one")
    assert report.got[0].items_delivered == 0
    gate.open()
    assert ch.close_and_drain(60)
    final = report.got[-1]
    assert (final.items_put, final.items_delivered, final.items_in_flight) == (20, 20, 0)
    warnings = _progress_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert type(error).__name__ in warnings[0]
    assert "Reports" in warnings[0]  # the callable, by name
    assert not _progress_threads()


def test_a_callable_that_always_raises_is_logged_once_then_counted(
    make_channel: Any, caplog: pytest.LogCaptureFixture
) -> None:
    report = Reports(SystemExit(1), always=True)
    ch = make_channel(lambda b: None, workers=1, progress=report)
    ch.put_many(list(range(10)))
    assert ch.close_and_drain(60)
    assert report.got[-1].items_delivered == 10  # the final report ran, with the totals
    warnings = _progress_warnings(caplog)
    assert 1 <= len(warnings) <= 2, warnings
    if len(report.got) > 1:
        # Failed again after the first: one more line, at the end, with the count.
        assert f"failed {len(report.got)} times" in warnings[-1], warnings


class Blocking:
    """A progress callable that blocks, once the channel is drained, until ``release``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.release = threading.Event()
        self.blocked = threading.Event()
        self.got: list[pd.Stats] = []

    def __call__(self, s: pd.Stats) -> None:
        if s.items_delivered == self.total and not self.release.is_set():
            self.blocked.set()
            self.release.wait(120)
        self.got.append(s)


def test_a_blocked_callable_does_not_hold_the_drain_and_the_final_report_follows(
    make_channel: Any, caplog: pytest.LogCaptureFixture
) -> None:
    report = Blocking(10)
    drained: list[bool] = []
    ch = make_channel(
        lambda b: None, workers=1, progress=report, on_drained=lambda: drained.append(True)
    )
    try:
        ch.put_many(list(range(10)))
        # The drain ends while the callable is still blocked: the final report does not wait
        # for it beyond its bound, and on_drained still runs.
        assert ch.close_and_drain(60)
        assert drained == [True]
        assert report.blocked.is_set()
        assert not report.release.is_set()
        assert _progress.FINISH_WAIT == 1.0  # the bound the progress option's docs state
        warnings = _progress_warnings(caplog)
        assert any("Blocking" in w and "has not returned" in w for w in warnings), warnings
        assert not any("_finish_progress_first" in r.getMessage() for r in caplog.records)
    finally:
        report.release.set()
    # Released, the callable returns, and the final report is made, with the totals.
    wait_for(lambda: not _progress_threads(), what="the progress thread's end")
    assert report.got[-1].items_delivered == 10
    assert report.got[-1].items_put == 10


def test_a_slow_on_drained_is_named_as_itself_with_progress_on(
    make_channel: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from procdispatch import _outcomes

    monkeypatch.setattr(_outcomes, "SLOW_CALLBACK", -1.0)  # every callback counts as slow

    def my_on_drained() -> None:
        pass

    ch = make_channel(lambda b: None, workers=1, progress=Reports(), on_drained=my_on_drained)
    ch.put_many(list(range(3)))
    assert ch.close_and_drain(60)
    slow = [r.getMessage() for r in caplog.records if "on the coordinator thread" in r.getMessage()]
    assert any("on_drained" in m and "my_on_drained" in m for m in slow), slow
    assert not any("_finish_progress_first" in m for m in slow), slow
