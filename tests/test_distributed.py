"""The build on an existing Dask cluster: a real ``dask scheduler`` and two ``dask worker``
processes, against in-process and LocalCluster builds of the same manifest."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_resume import REPO, assert_same_store, write_manifest

QUIET = ("--no-dashboard",)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dask_command(*args: str) -> list[str]:
    dask = Path(sys.executable).parent / "dask"
    return [str(dask), *args] if dask.exists() else [sys.executable, "-m", "dask", *args]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group (a worker's nanny and its worker), then SIGKILL."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):  # nothing of the group may outlive the test
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def dask_cluster(prefect_api: str, tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` on a free port and two one-thread ``dask worker`` processes."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    for name in ("PRA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with (tmp_path / f"{name}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    _dask_command(*args),
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), *QUIET)
        for i in range(2):
            start(f"worker{i}", "worker", address, "--nthreads", "1", *QUIET)
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
        yield address
    finally:
        for process in reversed(processes):
            _stop(process)


def _executed_per_worker(address: str) -> list[int]:
    from distributed import Client

    with Client(address, timeout=30) as client:
        counts = client.run(lambda dask_worker: dask_worker.state.executed_count)
    return sorted(counts.values())


@pytest.mark.slow
def test_external_cluster_build_equals_local_builds(
    dask_cluster: str, prefect_api: str, tmp_path: Path
) -> None:
    from dereverb_data.build import load_plan
    from flows.build import run_build

    manifest = write_manifest(tmp_path)
    assert _executed_per_worker(dask_cluster) == [0, 0]
    remote = str(tmp_path / "remote.zarr")
    report = run_build(manifest, remote, dask_address=dask_cluster)
    plan = load_plan(remote)
    assert report["counts"]["shards_rendered"] == len(plan.shards)
    # The mapped tasks (batches of rooms and shards, at least one per worker thread) really ran
    # on the external workers, and on both of them.
    executed = _executed_per_worker(dask_cluster)
    assert min(executed) >= 1, executed

    one = str(tmp_path / "one.zarr")
    run_build(manifest, one, workers=1)
    assert_same_store(remote, one)
    two = str(tmp_path / "two.zarr")
    run_build(manifest, two, workers=2)
    assert_same_store(remote, two)
