"""The Dask backend's own behaviour, beyond the contract suite: timeouts on a cluster it started,
abandoned sends on a given one, what ``workers`` means, the options it refuses, worker_init per
Dask worker, start_timeout over a plugin that never finishes, and the main guard."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed")

from daskfns import InitLog, Sink
from daskhelp import new_cluster
from distributed import Client, LocalCluster
from workerfns import Gate, Log, wait_for

import procdispatch as pd
from procdispatch.backends.dask import DaskBackend, close_cluster


@pytest.fixture
def fresh(tmp_path: Path) -> Any:
    """A cluster of two single-threaded worker processes for this test alone."""
    cluster, client = new_cluster()
    yield client
    client.close()
    close_cluster(cluster)


def _sent(log: Log) -> list[dict[str, Any]]:
    return [r for r in log.read() if r["ev"] == "sent"]


def test_a_hung_send_fails_only_its_batch_as_send_timeout_and_the_channel_goes_on(tmp_path):
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "never")
    errors: list[tuple[BaseException, list[int], float]] = []
    started: dict[str, float] = {}

    def on_error(b: pd.Batch[int], exc: BaseException) -> bool:
        errors.append((exc, list(b.data), time.monotonic()))
        return False

    try:
        with pd.ProcessChannel(
            Sink(log, hang_on=3, gate=gate),
            backend=DaskBackend(),
            workers=2,
            batch_items_max=1,
            send_timeout=1.0,
            on_error=on_error,
            on_drop=pd.drop_quiet,
        ) as ch:
            ch.put_many(range(3))
            wait_for(lambda: len(_sent(log)) == 3, what="the first three sends")
            ch.put(3)
            log.wait_count(1, ev="start", id=4)
            started["hang"] = time.monotonic()
            ch.put_many(range(4, 10))
    finally:
        gate.open()
    ((exc, data, when),) = errors
    assert isinstance(exc, pd.SendTimeout)
    assert data == [3]
    assert exc.where is not None
    assert exc.where.startswith("tcp://")
    assert "was killed (on tcp://" in str(exc)
    # The acceptance bound of the issue: the overrun is reported within 3 s of its start.
    assert when - started["hang"] < 3.0
    delivered = sorted(x for r in _sent(log) for x in r["data"])
    assert delivered == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    s = ch.stats()
    assert (s.items_delivered, s.items_dropped, s.worker_restarts) == (9, 1, 1)


def test_on_a_given_cluster_a_hung_send_is_abandoned_with_a_warning(tmp_path, fresh, caplog):
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    errors: list[BaseException] = []
    try:
        with (
            caplog.at_level(logging.WARNING, logger="procdispatch"),
            pd.ProcessChannel(
                Sink(log, hang_on=0, gate=gate),
                backend=DaskBackend(fresh),
                workers=2,
                batch_items_max=1,
                send_timeout=0.5,
                on_error=lambda b, e: errors.append(e) or False,
                on_drop=pd.drop_quiet,
            ) as ch,
        ):
            ch.put_many(range(4))
        ((exc,),) = [errors]
        assert isinstance(exc, pd.SendTimeout)
        assert "was abandoned: the send may run on" in str(exc)
        assert "that thread stays busy until send_fn returns" in caplog.text
        assert sorted(x for r in _sent(log) for x in r["data"]) == [1, 2, 3]
        assert ch.stats().items_dropped == 1
    finally:
        gate.open()


def test_workers_none_takes_the_cluster_threads_and_stats_count_dask_workers(tmp_path):
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=3, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        ch = pd.ProcessChannel(
            Sink(log, hang_on=0, gate=gate),
            backend=DaskBackend(client),
            batch_items_max=1,
            on_drop=pd.drop_quiet,
        )
        try:
            ch.put_many([0, 0, 0, 1])
            log.wait_count(3, ev="start")  # three threads, three leases at once
            assert ch.stats().batches_in_flight == 3
            assert ch.stats().workers_alive == 1  # one Dask worker, three threads
        finally:
            gate.open()
        assert ch.close_and_drain(60)
        assert ch.stats().items_delivered == 4
        with pytest.raises(pd.OptionsError, match=r"workers must be <= the 3 threads .* \(got 4\)"):
            pd.ProcessChannel(Sink(log), backend=DaskBackend(client), workers=4)
        with pytest.raises(pd.OptionsError, match=r"max_worker_memory must be None .*got 1000"):
            pd.ProcessChannel(Sink(log), backend=DaskBackend(client), max_worker_memory=1000)
        # Refused after connecting by address: the backend's own client is closed again.
        with pytest.raises(pd.OptionsError, match=r"workers must be <= the 3 threads"):
            pd.ProcessChannel(Sink(log), backend=DaskBackend(cluster.scheduler_address), workers=9)
        wait_for(lambda: client.run_on_scheduler(_clients) == 1, what="its client to leave")


def test_a_scheduler_that_lets_dask_retry_is_warned_about(caplog):
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
        caplog.at_level(logging.WARNING, logger="procdispatch"),
    ):
        ch = pd.ProcessChannel(lambda b: None, backend=DaskBackend(client))
        ch.put(1)
        assert ch.close_and_drain(60)
    assert "distributed.scheduler.allowed-failures=3" in caplog.text


def test_worker_init_runs_once_per_dask_worker_and_again_on_a_replacement(tmp_path, fresh):
    log = Log(tmp_path / "log")
    with pd.ProcessChannel(
        Sink(log),
        backend=DaskBackend(fresh, restart_hung_workers=True),
        workers=2,
        batch_items_max=1,
        worker_init=InitLog(log),
        retry=pd.retry.limited(3),
    ) as ch:
        ch.put_many(range(10))
        wait_for(lambda: len(_sent(log)) == 10, what="ten sends")
        inits = {r["pid"] for r in log.read() if r["ev"] == "init"}
        assert len(inits) == 2
        victim = next(iter(inits))
        fresh.run(_exit, workers=_address_of(fresh, victim), on_error="ignore")
        fresh.wait_for_workers(2, timeout=60)
        wait_for(
            lambda: len({r["pid"] for r in log.read() if r["ev"] == "init"}) == 3,
            what="worker_init on the replacement worker",
        )
        ch.put_many(range(10, 30))
    assert ch.stats().items_delivered == 30


def _address_of(client: Any, pid: int) -> list[str]:
    pids = client.run(os.getpid)
    return [a for a, p in pids.items() if p == pid]


def _exit() -> None:
    os._exit(1)


def test_start_timeout_covers_a_worker_plugin_that_never_finishes(tmp_path, fresh):
    log = Log(tmp_path / "log")
    gate = Gate(tmp_path / "gate")
    try:
        ch = pd.ProcessChannel(
            Sink(log),
            backend=DaskBackend(fresh),
            workers=2,
            start_timeout=0.5,
            worker_init=InitLog(log, gate),
            on_drop=pd.drop_quiet,
        )
        ch.put(1)
        with pytest.raises(pd.WorkerStartFailed, match="did not become ready within start_timeout"):
            ch.close_and_drain(60)
        assert ch.stats().items_dropped == 1
        assert not _sent(log)
    finally:
        gate.open()


def test_a_local_cluster_made_outside_the_main_guard_says_so(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            import procdispatch as pd
            from procdispatch.backends.dask import DaskBackend

            try:
                pd.ProcessChannel(print, backend=DaskBackend())
            except pd.OptionsError as exc:
                print("REFUSED", exc)
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED" in proc.stdout
    assert 'if __name__ == "__main__":' in proc.stdout
    assert f"{script}, line 6" in proc.stdout


def _clients(dask_scheduler: Any) -> int:
    return sum(1 for c in dask_scheduler.clients if c != "fire-and-forget")


def _plugins(dask_worker: Any) -> list[str]:
    return [n for n in dask_worker.plugins if n.startswith("procdispatch-")]


def test_channels_share_a_client_and_leave_the_cluster_as_they_found_it(tmp_path):
    a, b = Log(tmp_path / "a"), Log(tmp_path / "b")
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        one = pd.ProcessChannel(Sink(a), backend=DaskBackend(client), batch_items_max=5)
        # The second connects by address: its own client, closed at its end.
        two = pd.ProcessChannel(
            Sink(b), backend=DaskBackend(cluster.scheduler_address), batch_items_max=5
        )
        one.put_many(range(100))
        two.put_many(range(100, 200))
        assert one.close_and_drain(60)
        assert two.close_and_drain(60)
        assert sorted(x for r in _sent(a) for x in r["data"]) == list(range(100))
        assert sorted(x for r in _sent(b) for x in r["data"]) == list(range(100, 200))
        assert all(not names for names in client.run(_plugins).values())
        assert client.submit(sum, [1, 2]).result() == 3  # the given client still works
        # The second channel's client is gone.
        wait_for(lambda: client.run_on_scheduler(_clients) == 1, what="its client to leave")


def test_a_client_refreshing_its_scheduler_info_never_makes_workers_look_gone(tmp_path, caplog):
    """A Client refreshes its cached scheduler info in the background with no workers in it;
    the backend's look at the cluster's workers must not read that cache, or workers that never
    left look gone, their lanes are lost and their batches sent again."""
    import dask

    log = Log(tmp_path / "log")
    with (
        dask.config.set({"distributed.client.scheduler-info-interval": "2ms"}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            dashboard_address=":0",
            scheduler_kwargs={"allowed_failures": 0},
        ) as cluster,
        Client(cluster) as client,
        caplog.at_level(logging.WARNING, logger="procdispatch"),
    ):
        ch = pd.ProcessChannel(Sink(log), backend=DaskBackend(client), workers=2, batch_items_max=1)
        deadline = time.monotonic() + 3.0  # about fifteen looks at the workers
        item = 0
        while time.monotonic() < deadline:
            ch.put(item)
            item += 1
            if item % 50 == 0:
                wait_for(lambda n=item: ch.stats().items_delivered == n, what="the batches so far")
        assert ch.close_and_drain(60)
    assert not [r for r in caplog.records if "was lost" in r.getMessage()]
    sent = [x for r in _sent(log) for x in r["data"]]
    assert sorted(sent) == list(range(item))  # each once
