from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import procdispatch as pd


def _is_infrastructure(p: psutil.Process) -> bool:
    """multiprocessing's own helpers (forkserver, resource tracker) outlive channels by design."""
    try:
        cmd = " ".join(p.cmdline())
        return (p.ppid() == os.getpid() and "forkserver" in cmd) or "resource_tracker" in cmd
    except psutil.Error:
        return True


def worker_processes() -> list[psutil.Process]:
    """Live descendants of this process that are not multiprocessing infrastructure."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if not _is_infrastructure(p):
            out.append(p)
    return out


@pytest.fixture
def make_channel() -> Iterator[Callable[..., pd.ProcessChannel[Any]]]:
    """Build channels that are always cancelled and drained at teardown."""
    made: list[pd.ProcessChannel[Any]] = []

    def make(send_fn: Any, **kw: Any) -> pd.ProcessChannel[Any]:
        kw.setdefault("on_drop", pd.drop_quiet)
        ch: pd.ProcessChannel[Any] = pd.ProcessChannel(send_fn, **kw)
        made.append(ch)
        return ch

    yield make
    for ch in made:
        if not ch.drained:
            ch.cancel()
        assert ch.wait_drained(60), "channel did not drain at teardown"
