"""Served deployments against the real Prefect server: schedule stored, runs triggered by name,
a build and then a regenerate after a manifest change, and a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import zarr
from distributed import Client

from flows.deployments import changed_fields

from .test_resume import REPO, SMALL_MANIFEST, cli_env, write_manifest

BUILD = "build-dataset/scheduled"
REGENERATE = "regenerate-dataset/regenerate"


async def _read_deployment(name: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_deployment_by_name(name)


def _wait_for_deployments(
    process: subprocess.Popen,
    log: Path,
    names: tuple[str, ...] = (BUILD, REGENERATE),
    timeout: float = 120,
) -> dict:
    """The named deployments once a serve process has registered them all (and unpaused)."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    found: dict = {}
    while len(found) < len(names):
        if process.poll() is not None:
            pytest.fail(f"serve exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"deployments not registered in {timeout} s:\n{log.read_text()[-3000:]}")
        for name in names:
            with contextlib.suppress(ObjectNotFound):
                deployment = asyncio.run(_read_deployment(name))
                if not deployment.paused:  # paused: left by an earlier serve that stopped
                    found[name] = deployment
        time.sleep(0.5)
    return found


async def _latest_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    return max(artifacts, key=lambda a: a.created).data


def test_changed_fields_lists_dotted_paths() -> None:
    before = {"rooms": {"rooms_per_split": {"test": 1, "train": 2}}, "seed": 1}
    after = {"rooms": {"rooms_per_split": {"test": 2, "train": 2}}, "seed": 1, "x": 0}
    assert changed_fields(before, after) == [
        "rooms.rooms_per_split.test: 1 -> 2",
        'x: "<unset>" -> 0',
    ]
    assert changed_fields(None, after) == []


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_served_deployments_build_then_regenerate(
    prefect_api: str, tmp_path: Path, workers: int
) -> None:
    """``dereverb serve`` as a user runs it. ``workers=1``: runs in-process; 2: on the local
    cluster ``serve`` keeps running."""
    from prefect.deployments import run_deployment

    manifest = write_manifest(tmp_path)
    store = str(tmp_path / "served.zarr")
    log = tmp_path / "serve.log"
    # Ctrl-C handling even when this test runs in a background job, whose children inherit an
    # ignored SIGINT (Python then installs no KeyboardInterrupt handler).
    script = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = ["serve", manifest, "--store", store, "--workers", str(workers)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", script, *command],
            cwd=REPO,
            env=cli_env(prefect_api),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        found = _wait_for_deployments(process, log)
        schedules = found[BUILD].schedules
        assert [s.schedule.cron for s in schedules] == ["0 2 * * *"]
        assert schedules[0].active
        assert found[REGENERATE].schedules == []
        assert found[BUILD].parameters == {"manifest_path": manifest, "store_url": store}
        address = found[REGENERATE].parameters["dask_address"]
        if workers == 1:
            assert address is None
        else:  # the served cluster's scheduler, alive while serve runs
            assert address.startswith("tcp://127.0.0.1:")
            with Client(address, timeout=30) as client:
                assert len(client.nthreads()) == workers

        run = run_deployment(BUILD, timeout=300, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), (run.state, log.read_text())
        group = zarr.open_group(store, mode="r")
        assert group.attrs["complete"] is True
        n_shards = group.attrs["n_shards"]
        assert len(list(Path(store, "_build", "shards").glob("*.json"))) == n_shards
        assert group["index"]["example_id"].shape == (group.attrs["n_examples"],)

        # Edit the manifest: one more test room. Only test examples (the store's last shards)
        # can change; the regenerate run keeps the others.
        edited = {**SMALL_MANIFEST, "rooms": {**SMALL_MANIFEST["rooms"]}}
        edited["rooms"]["rooms_per_split"] = {"train": 2, "valid": 1, "test": 2}
        Path(manifest).write_text(yaml.safe_dump(edited, sort_keys=False))
        run = run_deployment(REGENERATE, timeout=300, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), (run.state, log.read_text())
        group = zarr.open_group(store, mode="r")
        assert group.attrs["manifest"]["rooms"]["rooms_per_split"]["test"] == 2
        assert group.attrs["complete"] is True
        assert "test-room001" in set(group["index"]["room_id"][:])
        text = asyncio.run(_latest_artifact("dataset-regenerate"))
        assert "rooms.rooms_per_split.test: 1 -> 2" in text
        redone, kept = map(int, re.search(r"\| shards \| (\d+) \| (\d+) \|", text).groups())
        assert redone + kept == n_shards and 0 < redone < n_shards, text
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C: serve pauses its schedules
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    # A clean shutdown pauses the deployments, so no schedule fires while no one serves them.
    assert process.returncode == 0, log.read_text()[-3000:]
    # Ctrl-C reaches the workers too (the whole process group): they must leave it to serve,
    # which closes the cluster, rather than each print a KeyboardInterrupt traceback.
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert asyncio.run(_read_deployment(BUILD)).paused
