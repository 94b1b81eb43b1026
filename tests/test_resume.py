"""Crash and resume with real processes: SIGKILL the CLI build, or one of its Dask workers.

A killed build must leave a store that the same command finishes, redoing only what has no
done-marker (shards) or is missing from the bank (RIRs), and the result must equal an
uninterrupted build bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
import zarr

from dereverb_data.build import build_serial, load_plan
from dereverb_data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]

# Small but with many shards: 16 examples of 2-4 s, at most two per 1024-frame shard (9 shards),
# 7 RIRs in 4 rooms. A whole build through the CLI takes about 13 s on 2 cores.
SMALL_MANIFEST = {
    "name": "resume",
    "seed": 11,
    "corpus": {"kind": "demo", "speakers": 4, "utterances_per_speaker": 2},
    "variants_per_utterance": 2,
    "rooms": {
        "rooms_per_split": {"train": 2, "valid": 1, "test": 1},
        "positions_per_room": 2,
        "length_m": [3.5, 5.0],
        "width_m": [3.0, 4.0],
        "height_m": [2.5, 3.0],
        "rt60_s": [0.3, 0.6],
        "distance_m": [0.7, 1.8],
    },
    "storage": {"frames_per_chunk": 128, "frames_per_shard": 1024},
    "splits": {"train": 0.5, "valid": 0.25, "test": 0.25},
}


# The same with 12 rooms: while a cold cluster starts (seconds), the flow's own process builds
# rooms, and it could finish all 4 of the small manifest's before any worker got one.
MANY_ROOMS_MANIFEST = {
    **SMALL_MANIFEST,
    "rooms": {**SMALL_MANIFEST["rooms"], "rooms_per_split": {"train": 8, "valid": 2, "test": 2}},
}


def write_manifest(folder: Path, name: str = "small.yaml", data: dict = SMALL_MANIFEST) -> str:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def markers(store: str) -> int:
    return len(list(Path(store, "_build", "shards").glob("*.json")))


def rirs_in_bank(store: str) -> int:
    return len(list(Path(store, "_build", "rir_bank", "rir").glob("*/*.npz")))


def assert_same_store(url: str, reference: str) -> None:
    """Checksums, every index column and both signals equal, exactly."""
    got, want = zarr.open_group(url, mode="r"), zarr.open_group(reference, mode="r")
    assert got.attrs["complete"] is True
    assert list(got["shard_checksums"][:]) == list(want["shard_checksums"][:])
    assert sorted(got["index"].array_keys()) == sorted(want["index"].array_keys())
    for name in want["index"].array_keys():
        a, b = got["index"][name][:], want["index"][name][:]
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
    for name in ("reverberant", "clean"):
        assert np.array_equal(got[name][:], want[name][:]), name


def cli_env(prefect_api: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONUNBUFFERED": "1"}
    for name in ("PRA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    return env


def build_command(manifest: str, store: str, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "build",
        manifest,
        "--store",
        store,
        "--workers",
        str(workers),
        "--no-progress",
    ]


def start_build(
    manifest: str, store: str, workers: int, prefect_api: str, log: Path
) -> subprocess.Popen:
    """The CLI in its own process group (so its Dask workers can be killed with it)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            build_command(manifest, store, workers),
            cwd=REPO,
            env=cli_env(prefect_api),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(
    condition: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 180
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            tail = log.read_text()[-3000:]
            pytest.fail(f"the build exited ({process.returncode}) first:\n{tail}")
        if time.monotonic() > deadline:
            kill_group(process)
            pytest.fail(f"condition not reached in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def finish_build(manifest: str, store: str, prefect_api: str, workers: int = 1) -> dict[str, int]:
    """Run the same command to completion; return its printed counts."""
    done = subprocess.run(
        build_command(manifest, store, workers),
        cwd=REPO,
        env=cli_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return parse_counts(done.stdout)


def parse_counts(output: str) -> dict[str, int]:
    """The CLI's ``counts: rirs_simulated 3, ...`` line as a dict."""
    line = next(x for x in output.splitlines() if x.startswith("counts: "))
    return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", line.removeprefix("counts: "))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The small manifest built uninterrupted, in a plain loop (no Prefect)."""
    folder = tmp_path_factory.mktemp("resume-reference")
    manifest = write_manifest(folder)
    store = str(folder / "reference.zarr")
    build_serial(load_manifest(manifest), store)
    return manifest, store


@pytest.fixture(scope="module")
def reference_many_rooms(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("resume-reference-many-rooms")
    manifest = write_manifest(folder, "many-rooms.yaml", MANY_ROOMS_MANIFEST)
    store = str(folder / "reference.zarr")
    build_serial(load_manifest(manifest), store)
    return manifest, store


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["simulating-rirs", "first-shard", "half-the-shards"])
def test_killed_build_resumes_to_the_same_store(
    kill_at: str, reference: tuple[str, str], prefect_api: str, tmp_path: Path
) -> None:
    manifest, reference_store = reference
    plan = load_plan(reference_store)
    n_shards, n_rirs = len(plan.shards), len(plan.rirs)
    assert n_shards >= 6 and n_rirs >= 4  # enough to stop in the middle
    store = str(tmp_path / "killed.zarr")
    log = tmp_path / "killed.log"
    condition = {
        "simulating-rirs": lambda: rirs_in_bank(store) >= 1,
        "first-shard": lambda: markers(store) >= 1,
        "half-the-shards": lambda: markers(store) >= n_shards // 2,
    }[kill_at]

    process = start_build(manifest, store, 1, prefect_api, log)
    try:
        wait_for(condition, process, log)
    finally:
        kill_group(process)
    assert process.returncode == -signal.SIGKILL
    done_shards, done_rirs = markers(store), rirs_in_bank(store)
    assert done_shards < n_shards, "the build finished before it was killed"
    # A room's shards render right after its RIRs, in the same task: shards can be done
    # while other rooms still wait for their RIRs.
    if kill_at == "simulating-rirs":
        assert 1 <= done_rirs < n_rirs
    else:
        assert done_shards >= 1 and done_rirs >= 1
    assert not zarr.open_group(store, mode="r").attrs["complete"]

    counts = finish_build(manifest, store, prefect_api)
    # Only what was not done is redone: kept shards are exactly those with a marker at the kill.
    assert counts["shards_kept"] == done_shards
    assert counts["shards_rendered"] == n_shards - done_shards
    assert counts["rirs_reused"] == done_rirs
    assert counts["rirs_simulated"] == n_rirs - done_rirs
    if kill_at != "simulating-rirs":
        assert counts["shards_kept"] > 0
    assert markers(store) == n_shards
    assert_same_store(store, reference_store)


def _worker_processes(parent: int) -> list[psutil.Process]:
    """Dask worker processes of the LocalCluster started by parent: the children of its
    ``multiprocessing`` fork server (``flows/local_dask.py``)."""
    found = []
    for child in psutil.Process(parent).children(recursive=True):
        try:
            forked = "multiprocessing.forkserver" in " ".join(child.cmdline())
            by_server = "multiprocessing.forkserver" in " ".join(child.parent().cmdline())
        except (psutil.NoSuchProcess, AttributeError):
            continue
        if forked and by_server:
            found.append(child)
    return found


@pytest.mark.slow
def test_killed_dask_worker_does_not_fail_the_build(
    reference_many_rooms: tuple[str, str], prefect_api: str, tmp_path: Path
) -> None:
    manifest, reference_store = reference_many_rooms
    n_shards = len(load_plan(reference_store).shards)
    store = str(tmp_path / "worker-killed.zarr")
    log = tmp_path / "worker-killed.log"
    process = start_build(manifest, store, 2, prefect_api, log)
    try:
        # Kill a worker while it runs a task: once it has used CPU well beyond starting up.
        started: dict[int, float] = {}

        def busy_worker() -> psutil.Process | None:
            for worker in _worker_processes(process.pid):
                with contextlib.suppress(psutil.Error):
                    used = sum(worker.cpu_times()[:2])
                    if used - started.setdefault(worker.pid, used) >= 0.3:
                        return worker
            return None

        wait_for(lambda: busy_worker() is not None, process, log)
        assert len(_worker_processes(process.pid)) == 2
        victim = busy_worker()
        assert victim is not None
        victim.kill()
        victim.wait(timeout=30)
        killed_with = markers(store)
        assert killed_with < n_shards, "the build finished before the worker was killed"
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_group(process)
    assert not victim.is_running()
    # A task whose result was lost with the worker is recomputed; if its shard was already
    # written, the recomputation finds the marker and counts it as kept, not rendered twice.
    counts = parse_counts(log.read_text())
    assert counts["shards_rendered"] + counts["shards_kept"] == n_shards, counts
    assert counts["shards_kept"] <= killed_with, counts
    assert_same_store(store, reference_store)
