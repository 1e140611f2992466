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


#: What each backend can do that some tests depend on. A test marked
#: ``@pytest.mark.needs("capability", why="...")`` is skipped, with ``why``, on a backend that
#: lacks it; every other test that builds its channels with ``make_channel`` runs on every
#: registered backend: that is the contract a backend is judged by.
CAPABILITIES: dict[str, frozenset[str]] = {
    # kill: a worker can be killed, not only abandoned; processes: a worker is a process of
    # its own (it can crash, exit, be signalled, have its memory read); pickling: leases and
    # results are pickled (what will not pickle fails).
    "process": frozenset({"kill", "processes", "pickling"}),
    "thread": frozenset(),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs(*capabilities, why): skip on a backend without these capabilities, saying why",
    )
    config.addinivalue_line(
        "markers", "only(backend, why): a test of one backend's own behaviour; skip on others"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        from procdispatch.backends import registered_backends

        names = [n for n in registered_backends() if n in CAPABILITIES]
        metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The backend a contract test runs on (each registered one in turn)."""
    name: str = request.param
    only = request.node.get_closest_marker("only")
    if only is not None and only.args[0] != name:
        pytest.skip(f"about the {only.args[0]} backend: {only.kwargs.get('why', '')}")
    marker = request.node.get_closest_marker("needs")
    if marker is not None:
        missing = set(marker.args) - CAPABILITIES[name]
        if missing:
            why = marker.kwargs.get("why", "")
            pytest.skip(f"the {name} backend cannot: {why} (needs {', '.join(sorted(missing))})")
    return name


@pytest.fixture
def make_channel(backend: str) -> Iterator[Callable[..., pd.ProcessChannel[Any]]]:
    """Build channels (on the test's backend) that are always cancelled and drained at
    teardown."""
    made: list[pd.ProcessChannel[Any]] = []

    def make(send_fn: Any, **kw: Any) -> pd.ProcessChannel[Any]:
        kw.setdefault("backend", backend)
        kw.setdefault("on_drop", pd.drop_quiet)
        ch: pd.ProcessChannel[Any] = pd.ProcessChannel(send_fn, **kw)
        made.append(ch)
        return ch

    yield make
    for ch in made:
        if not ch.drained:
            ch.cancel()
        assert ch.wait_drained(60), "channel did not drain at teardown"
