from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import procdispatch as pd


def _is_infrastructure(p: psutil.Process) -> bool:
    """multiprocessing's own helpers (forkserver, resource tracker) outlive channels by design,
    and so do the workers of the Dask cluster the contract suite shares between channels."""
    try:
        cmd = " ".join(p.cmdline())
        if (p.ppid() == os.getpid() and "forkserver" in cmd) or "resource_tracker" in cmd:
            return True
        daskhelp = sys.modules.get("daskhelp")
        return daskhelp is not None and p.pid in daskhelp.shared_pids()
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
    # pipelining: max_leases above workers (a worker holds leases waiting behind the running one);
    # worker-logs: records logged in send_fn and worker_init reach the parent's logging;
    # init-per-start: each worker start runs worker_init (a Dask worker runs it once, for all
    # the channel's lanes on it).
    "process": frozenset(
        {"kill", "processes", "pickling", "pipelining", "worker-logs", "init-per-start"}
    ),
    "thread": frozenset({"pipelining", "worker-logs", "init-per-start"}),
}
try:
    import distributed  # noqa: F401  (the dask extra)
except ImportError:
    pass
else:
    # kill: the contract suite's Dask backend restarts a hung send's worker (its nanny). A lane
    # is not a process of its own (its worker may run other lanes), and a lease is a task on a
    # thread: leases never exceed the cluster's threads.
    CAPABILITIES["dask"] = frozenset({"kill", "pickling"})


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
    for marker in request.node.iter_markers("needs"):
        missing = set(marker.args) - CAPABILITIES[name]
        if missing:
            why = marker.kwargs.get("why", "")
            pytest.skip(f"the {name} backend cannot: {why} (needs {', '.join(sorted(missing))})")
    return name


@pytest.fixture
def make_channel(
    backend: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., pd.ProcessChannel[Any]]]:
    """Build channels (on the test's backend) that are always cancelled and drained at
    teardown. On Dask: the module's cluster of two single-threaded workers, or, for a test
    that asks for more workers, a cluster of the channel's own."""
    made: list[pd.ProcessChannel[Any]] = []
    cluster = request.getfixturevalue("dask_cluster") if backend == "dask" else None

    def make(send_fn: Any, **kw: Any) -> pd.ProcessChannel[Any]:
        if cluster is not None and "backend" not in kw:
            kw["backend"] = cluster.backend(kw.get("workers"))
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


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """One Dask cluster per test module (two worker processes of one thread each), healthy
    again before each test that uses it (see daskhelp.SharedCluster)."""
    from daskhelp import SharedCluster

    shared = SharedCluster()
    try:
        yield shared
    finally:
        shared.close()
