"""The local Dask cluster: workers fork from a preloaded server, one thread each, and a
long-lived process (``dereverb serve``) keeps one cluster for its build runs."""

from __future__ import annotations

import logging
import multiprocessing.forkserver
import os
import signal
import sys
from pathlib import Path

import dask
import pytest
import zarr
from distributed import Client
from prefect import flow, task

from flows.build import build_dataset, run_build
from flows.local_dask import (
    LOCAL_CLUSTER_CONFIG,
    WORKER_PRELOAD,
    LocalDaskTaskRunner,
    served_cluster,
)
from flows.runners import task_runner

from .conftest import DEMO_MANIFEST


def _worker_state() -> dict:
    return {
        "parent": os.getppid(),
        "preloaded": [name for name in WORKER_PRELOAD if name in sys.modules],
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "own_forkserver": multiprocessing.forkserver._forkserver._forkserver_pid,
        "config": {key: dask.config.get(key) for key in LOCAL_CLUSTER_CONFIG},
        "sigint": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
        "worker_log_filters": len(logging.getLogger("distributed.worker").filters),
    }


def test_served_cluster_workers_fork_from_the_preloaded_server() -> None:
    with served_cluster(2, None) as address:
        assert address is not None and address.startswith("tcp://127.0.0.1:")
        server = multiprocessing.forkserver._forkserver._forkserver_pid
        with Client(address) as client:
            states = list(client.run(_worker_state).values())
    assert len(states) == 2
    for state in states:
        assert state["parent"] == server  # forked from it, not spawned by the nanny
        # Imported before any task ran: inherited from the server, not imported per worker.
        assert state["preloaded"] == list(WORKER_PRELOAD)
        assert state["threads"] == "1"
        assert state["config"] == LOCAL_CLUSTER_CONFIG  # quieter housekeeping, via the nanny
        assert state["sigint"]  # Ctrl-C reaches only the process that owns the cluster
        assert state["worker_log_filters"] == 0  # a running worker logs heartbeat failures
    assert dask.config.get("distributed.worker.profile.enabled")  # this process: unchanged


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, message, None, None)


def test_a_closing_worker_drops_only_its_own_heartbeat_failure() -> None:
    from distributed import LocalCluster

    from flows import worker_preload
    from flows.local_dask import local_cluster_kwargs

    assert local_cluster_kwargs(2)["preload"] == ["flows.worker_preload"]
    logger = logging.getLogger("distributed.worker")
    before = list(logger.filters)
    heartbeat = _record(worker_preload.HEARTBEAT_FAILED)
    other = _record("Failed to communicate with scheduler during something else.")
    try:
        assert logger.filter(heartbeat)  # running: logged
        worker_preload.dask_teardown(None)  # what Dask calls as a worker starts closing
        assert not logger.filter(heartbeat)
        assert logger.filter(other)
    finally:
        logger.filters[:] = before
    # And Dask runs it: a worker of the build's cluster has the module as its preload.
    with (
        LocalCluster(**local_cluster_kwargs(1)) as cluster,
        Client(cluster) as client,
    ):
        preloads = client.run(lambda dask_worker: [p.name for p in dask_worker.preloads])
    assert list(preloads.values()) == [["flows.worker_preload"]]


def test_served_cluster_is_only_started_when_needed() -> None:
    with served_cluster(1, None) as address:
        assert address is None  # --workers 1: in-process
    given = "tcp://192.0.2.1:8786"
    with served_cluster(4, given) as address:
        assert address == given  # an existing cluster is used as it is


@task
def _state_in_worker(index: int) -> dict:
    return _worker_state()


def test_task_runs_on_workers_start_no_fork_server_of_their_own(prefect_api: str) -> None:
    """Prefect enters the flow's task runner around every task run on a worker too; starting a
    fork server there (importing everything again) halved the speed of the first tasks."""
    runner = task_runner(2)
    assert isinstance(runner, LocalDaskTaskRunner)

    @flow(task_runner=runner)
    def probe() -> list[dict]:
        return [future.result() for future in _state_in_worker.map(range(4))]

    states = probe()
    assert len(states) == 4
    assert all(state["own_forkserver"] is None for state in states)
    assert all(state["threads"] == "1" for state in states)
    assert all(state["config"] == LOCAL_CLUSTER_CONFIG for state in states)


def _cold_start() -> None:
    """Stop the fork server an earlier test left, so the next cluster starts cold, as it does
    in a ``dereverb build`` command (CPython's own tests stop it this way)."""
    multiprocessing.forkserver._forkserver._stop()


def _checksums(url: str) -> list[str]:
    return list(zarr.open_group(url, mode="r")["shard_checksums"][:])


def test_flow_process_simulates_rooms_while_a_cold_cluster_starts(
    demo_store: str, tmp_path: Path
) -> None:
    _cold_start()
    url = str(tmp_path / "demo.zarr")
    report = run_build(str(DEMO_MANIFEST), url, workers=2)
    # The fork server's imports take seconds; the first room never waits for them.
    assert report["tasks"]["rooms_in_flow_process"] >= 1
    assert report["counts"]["rirs_simulated"] == report["summary"]["unique_rirs"]
    assert report["tasks"]["local_cluster_started"]
    assert _checksums(url) == _checksums(demo_store)  # as built in-process
    # Run again with nothing left to do: no cluster is started (its start took seconds).
    rerun = run_build(str(DEMO_MANIFEST), url, workers=2)
    assert not rerun["tasks"]["local_cluster_started"]
    assert rerun["counts"]["shards_kept"] == rerun["summary"]["shards"]


def test_cluster_that_fails_to_start_fails_the_build_and_keeps_the_rooms_done(
    demo_store: str, tmp_path: Path
) -> None:
    _cold_start()
    runner = task_runner(2)
    broken = type(runner)(
        cluster_class=runner.cluster_class,
        cluster_kwargs={**runner.cluster_kwargs, "no_such_worker_option": 1},
    )
    url = str(tmp_path / "demo.zarr")
    with pytest.raises(Exception, match="failed to start"):
        build_dataset.with_options(task_runner=broken)(str(DEMO_MANIFEST), url)
    report = run_build(str(DEMO_MANIFEST), url, workers=1)
    # What the flow's process simulated while the cluster tried to start was banked.
    assert report["counts"]["rirs_reused"] >= 1
    assert _checksums(url) == _checksums(demo_store)
