"""Stores and RIR banks on an object store, against a real S3 API: moto's server on 127.0.0.1.

The server runs in its own process, so the CLI, its Dask worker processes and DataLoader
workers all reach it. Nothing is passed to them but the environment, as a user would set it:
``AWS_ENDPOINT_URL`` (read by botocore, under s3fs 2026.9 and aiobotocore) points every client
at the server, and dummy ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` satisfy signing.
(``FSSPEC_S3_ENDPOINT_URL`` works as well, but only for fsspec, and is read when fsspec is
imported.)

Every store built here on S3 must equal the same manifest built on local disk: checksums and
every index column, and the data itself (``verify`` recomputes each shard's checksum).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import yaml
import zarr

from dereverb_data.build import build_serial, load_plan
from dereverb_data.fsio import url_to_fs, write_atomic
from dereverb_data.lock import StoreLocked, build_lock
from dereverb_data.manifest import parse_manifest
from dereverb_data.rir_bank import RirBank
from dereverb_data.store import DatasetStore
from dereverb_data.store_format import ShardReader, open_store
from dereverb_data.verify import verify_store
from training.data import CropDataset, crop_loader

from .conftest import DEMO_MANIFEST, REPO, run_cli

BUCKET = "dereverb-test"
N_DEMO_SHARDS = 11


@dataclass
class S3Server:
    endpoint: str
    log: Path  # one line per request the server answered

    def requests(self) -> list[str]:
        """The request lines (``GET /bucket/key HTTP/1.1``) answered so far."""
        time.sleep(0.2)  # the server logs a request after answering it
        lines = self.log.read_text(errors="replace").splitlines()
        return [m.group(1) for line in lines if (m := re.search(r'"([A-Z]+ [^"]+)"', line))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server in its own process, and the environment that points every process at
    it; one bucket."""
    log = tmp_path_factory.mktemp("moto") / "requests.log"
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {name: os.environ.get(name) for name in (*env, "AWS_PROFILE")}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while not _answers(endpoint):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
        yield S3Server(endpoint, log)
    finally:
        server.terminate()
        server.wait(timeout=30)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def s3fs_fresh() -> fsspec.AbstractFileSystem:
    """An S3 filesystem of its own, as another process would have (no shared caches)."""
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def copy_store(source: str, name: str) -> str:
    """A server-side copy of an S3 store (data, build state and RIR bank)."""
    fs = s3fs_fresh()
    target = f"{BUCKET}/{name}"
    fs.copy(source.removeprefix("s3://"), target, recursive=True)
    return f"s3://{target}"


def assert_same_store(url: str, reference: str, verify: bool = True) -> None:
    """Complete, same checksums and index as ``reference``, and (``verify``) data matching the
    checksums."""
    got, want = zarr.open_group(url, mode="r"), zarr.open_group(reference, mode="r")
    assert got.attrs["complete"] is True
    assert list(got["shard_checksums"][:]) == list(want["shard_checksums"][:])
    assert sorted(got["index"].array_keys()) == sorted(want["index"].array_keys())
    for name in want["index"].array_keys():
        a, b = got["index"][name][:], want["index"][name][:]
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
    if verify:
        report = verify_store(url)  # every shard's data against its checksum
        assert report.ok, report.lines()


def parse_counts(output: str) -> dict[str, int]:
    line = next(x for x in output.splitlines() if x.startswith("counts: "))
    return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", line.removeprefix("counts: "))}


def objects(url: str) -> list[str]:
    fs, root = url_to_fs(url)
    return [path.removeprefix(root + "/") for path in fs.find(root)]


def task_runs(output: str) -> dict:
    """How the build the CLI printed was split into task runs (its ``task runs:`` log line on
    the Prefect server; the run is the one the CLI links to)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    run_id = re.search(r"flow-run/([0-9a-f-]{36})", output)
    assert run_id, output
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:  # logs reach the server in batches
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id.group(1)]))
            )
            lines = [log.message for log in logs if "task runs: " in log.message]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert lines, [log.message for log in logs]
    return ast.literal_eval(lines[0].split("task runs: ", 1)[1])


@pytest.fixture(scope="module")
def s3_demo(s3: S3Server, prefect_api: str) -> str:
    """manifests/demo.yaml built to S3 by the CLI with two Dask worker processes."""
    url = f"s3://{BUCKET}/demo.zarr"
    result = run_cli(
        "build", str(DEMO_MANIFEST), "--store", url, "--workers", "2", "--no-progress",
        api_url=prefect_api,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = parse_counts(result.stdout)
    assert counts["shards_rendered"] == N_DEMO_SHARDS and counts["shards_kept"] == 0
    # The workers did part of it (the flow's own process works only while they start).
    tasks = task_runs(result.stdout)
    assert tasks["local_cluster_started"], tasks
    assert tasks["room_batches"] > tasks["rooms_in_flow_process"], tasks
    return url


# ---------------------------------------------------------------------------------------------
# Builds


@pytest.mark.slow
def test_a_two_worker_build_on_s3_equals_the_local_build(s3_demo: str, demo_store: str) -> None:
    assert_same_store(s3_demo, demo_store)
    local, remote = zarr.open_group(demo_store, mode="r"), zarr.open_group(s3_demo, mode="r")
    summary = dict(remote.attrs)["summary"]
    assert summary == dict(local.attrs)["summary"]  # size on disk too: du works on S3
    assert summary["size_on_disk_bytes"] > 0
    names = objects(s3_demo)
    assert not [n for n in names if ".tmp-" in n]  # object stores are written in place
    assert "_build/lock.json" not in names  # released
    assert len([n for n in names if n.startswith("_build/rir_bank/rir/")]) == 12
    result = run_cli("verify", s3_demo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"ok: {N_DEMO_SHARDS} shards match")


@pytest.mark.slow
def test_a_killed_build_on_s3_resumes_to_the_same_store(
    s3: S3Server, demo_store: str, prefect_api: str, tmp_path: Path
) -> None:
    url = f"s3://{BUCKET}/killed.zarr"
    fs, root = url_to_fs(url)

    def markers() -> int:
        return len(fs.glob(f"{root}/_build/shards/*.json"))

    log = tmp_path / "killed.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "flows.cli", "build", str(DEMO_MANIFEST), "--store", url]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--workers", "1", "--no-progress"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while markers() < 3:
            assert process.poll() is None, f"the build exited first:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    done = markers()
    banked = len(fs.glob(f"{root}/_build/rir_bank/rir/*/*.npz"))
    assert 3 <= done < N_DEMO_SHARDS, "the build finished before it was killed"
    assert fs.exists(f"{root}/_build/lock.json")  # left by the dead build, taken over below
    assert not zarr.open_group(url, mode="r").attrs["complete"]

    result = run_cli(
        "build", str(DEMO_MANIFEST), "--store", url, "--workers", "1", "--no-progress",
        api_url=prefect_api,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = parse_counts(result.stdout)
    assert counts["shards_kept"] == done
    assert counts["shards_rendered"] == N_DEMO_SHARDS - done
    assert counts["rirs_reused"] == banked and counts["rirs_simulated"] == 12 - banked
    assert markers() == N_DEMO_SHARDS
    assert_same_store(url, demo_store)


@pytest.mark.slow
def test_verify_names_a_damaged_shard_object_and_repair_mends_it(
    s3_demo: str, demo_store: str, prefect_api: str
) -> None:
    url = copy_store(s3_demo, "damaged.zarr")
    fs, root = url_to_fs(url)
    victim, shard = f"{root}/clean/c/3/0", 3
    original = fs.cat_file(victim)
    fs.pipe_file(victim, original[: len(original) // 2])  # truncated: its index is gone
    result = run_cli("verify", url)
    assert result.returncode == 1 and f"shard {shard}: unreadable" in result.stdout, (
        result.stdout + result.stderr
    )
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:-1]] == [f"shard {shard}"]

    repaired = run_cli(
        "build", str(DEMO_MANIFEST), "--store", url, "--workers", "1", "--repair",
        "--no-progress", api_url=prefect_api,
    )  # fmt: skip
    assert repaired.returncode == 0, repaired.stdout[-3000:] + repaired.stderr[-3000:]
    assert f"repaired shards: [{shard}]" in repaired.stdout
    assert parse_counts(repaired.stdout)["shards_rendered"] == 1
    assert fs.cat_file(victim) == original  # bit-identical again
    assert run_cli("verify", url).returncode == 0
    assert_same_store(url, demo_store, verify=False)  # the command just verified it

    fs.rm_file(victim)
    assert verify_store(url).damaged == {shard: f"missing (no clean/c/{shard}/0)"}


@pytest.mark.slow
def test_editing_rooms_rerenders_only_their_shards_on_s3(
    s3_demo: str, prefect_api: str, tmp_path: Path
) -> None:
    from flows.build import run_build

    url = copy_store(s3_demo, "edited.zarr")
    fs, root = url_to_fs(url)
    shard_etags = {
        path: fs.info(path)["ETag"]
        for name in ("reverberant", "clean")
        for path in fs.glob(f"{root}/{name}/c/*/0")
    }
    old_rooms = {r: room.spec_hash for r, room in load_plan(url).rooms.items()}
    old_rirs = zarr.open_group(url, mode="r")["index"]["rir_id"][:]

    # More low-frequency absorption in one profile: only the rooms drawing it change.
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    profiles = data["rooms"]["absorption"]["profiles"]
    profiles["soft_highs"] = [1.8, *profiles["soft_highs"][1:]]
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data, sort_keys=False))

    counts = run_build(str(edited), url, workers=1)["counts"]
    new_rooms = {r: room.spec_hash for r, room in load_plan(url).rooms.items()}
    assert 0 < sum(new_rooms[r] != old_rooms[r] for r in old_rooms) < len(old_rooms)
    index = zarr.open_group(url, mode="r")["index"]
    changed = index["rir_id"][:] != old_rirs
    touched = set(index["shard"][:][changed].tolist())
    assert 0 < len(touched) < N_DEMO_SHARDS
    assert counts["shards_rendered"] == len(touched)
    assert counts["shards_kept"] == N_DEMO_SHARDS - len(touched)
    assert counts["examples_rendered"] == int(changed.sum())
    for path, etag in shard_etags.items():
        shard = int(path.split("/c/")[1].split("/")[0])
        assert (fs.info(path)["ETag"] == etag) == (shard not in touched), path

    fresh = str(tmp_path / "fresh.zarr")
    build_serial(parse_manifest(data), fresh)
    assert_same_store(url, fresh)


# ---------------------------------------------------------------------------------------------
# What S3 needed: fresh listings, one writer, atomic small files


def listed_markers(store: DatasetStore) -> int:
    """Shard markers in a listing through the store's own filesystem (its cache settings)."""
    return len(store.fs.glob(f"{store.root}/_build/shards/*.json"))


def test_what_another_process_wrote_is_seen_after_a_listing(s3: S3Server) -> None:
    """s3fs would answer exists() from a directory listing it took earlier; a build's flow
    process lists the bank, then must see the RIRs its workers bank."""
    bank = RirBank(f"s3://{BUCKET}/listing/bank")
    store = DatasetStore(f"s3://{BUCKET}/listing/store.zarr")
    other = s3fs_fresh()  # another process
    other.pipe_file(f"{bank.root}/rir/aa/aa-first.npz", b"x")
    other.pipe_file(f"{store.root}/_build/shards/000000.json", b"{}")
    assert bank.rir_ids() == {"aa-first"}  # lists rir/ and rir/aa/
    assert listed_markers(store) == 1
    other.pipe_file(f"{bank.root}/rir/aa/aa-second.npz", b"x")
    other.pipe_file(
        f"{store.root}/_build/shards/000001.json",
        json.dumps({"shard_id": 1, "fingerprint": "f", "checksum": "c"}).encode(),
    )
    assert bank.has_rir("aa-second")
    assert bank.rir_ids() == {"aa-first", "aa-second"}
    assert listed_markers(store) == 2 and store.shard_is_done(1, "f")
    other.rm_file(f"{store.root}/_build/shards/000001.json")
    assert store.marker(1) is None


def test_one_writer_per_store_on_s3(s3: S3Server) -> None:
    url = f"s3://{BUCKET}/locked.zarr"
    fs, root = url_to_fs(url)
    with build_lock(url) as holder:
        with pytest.raises(StoreLocked, match=f"pid {holder['pid']}"), build_lock(url):
            pytest.fail("a second build took the lock")
        assert json.loads(fs.cat_file(f"{root}/_build/lock.json"))["token"] == holder["token"]
    assert not fs.exists(f"{root}/_build/lock.json")
    # The create is a conditional PUT: it fails on an existing object, whoever checked first.
    fs.pipe_file(f"{root}/_build/lock.json", b"{}")
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{root}/_build/lock.json", b"{}", mode="create")


def test_small_files_are_written_in_place_on_s3(s3: S3Server) -> None:
    fs, root = url_to_fs(f"s3://{BUCKET}/atomic")
    write_atomic(fs, f"{root}/a/b.json", b"1")
    write_atomic(fs, f"{root}/a/b.json", b"2")
    assert fs.find(root) == [f"{root}/a/b.json"] and fs.cat_file(f"{root}/a/b.json") == b"2"


# ---------------------------------------------------------------------------------------------
# Training reads


def test_training_crops_from_s3_equal_local_crops(
    s3: S3Server, s3_demo: str, demo_store: str
) -> None:
    remote = CropDataset(s3_demo, "train", crop_frames=192, seed=5)
    local = CropDataset(demo_store, "train", crop_frames=192, seed=5)
    assert all(reader is not None for reader in remote._lazy.store.readers.values())
    before = len(s3.requests())
    n = 40
    for i in range(n):
        a, b = remote[i], local[i]
        assert a["row"] == b["row"] and a["start"] == b["start"]
        for key in ("reverberant", "clean", "mask"):
            assert torch.equal(a[key], b[key]), (i, key)
    reads = s3.requests()[before:]
    assert all(line.startswith("GET ") for line in reads)
    shard_objects = {line.split()[1] for line in reads}
    # One ranged GET per signal per crop, plus each touched shard's index once.
    assert len(reads) == 2 * n + len(shard_objects)

    before = len(s3.requests())
    batches = crop_loader(remote, batch_size=4, start_step=0, stop_step=3, num_workers=2)
    expected = crop_loader(local, batch_size=4, start_step=0, stop_step=3)
    for got, want in zip(batches, expected, strict=True):
        for key in want:
            assert torch.equal(got[key], want[key]), key
    reads = s3.requests()[before:]
    # The workers reopen only the two arrays (the index travels from this process): a few
    # metadata requests each, where reading the index again would cost about 110 per worker.
    metadata = [line for line in reads if "/c/" not in line]
    assert all("zarr.json" in line for line in metadata) and len(metadata) <= 2 * 6, metadata
    data = [line for line in reads if "/c/" in line]  # each worker reads the indexes it needs
    assert len(data) <= 2 * 12 + 2 * len({line.split()[1] for line in data})
    row = int(remote.rows[0])
    for name, frames in open_store(s3_demo).example(row).items():
        np.testing.assert_array_equal(frames, open_store(demo_store).example(row)[name])


@pytest.mark.parametrize("dtype", ["complex64", "float16"])
def test_the_shard_reader_reads_what_zarr_reads(tmp_path: Path, dtype: str) -> None:
    from .test_training import write_synthetic_store

    url = str(write_synthetic_store(tmp_path / f"{dtype}.zarr", dtype))
    store = open_store(url)
    fs, root = fsspec.core.url_to_fs(url)
    rng = np.random.default_rng(0)
    for name in ("reverberant", "clean"):
        array = store.arrays[name]
        reader = ShardReader.for_array(fs, root, array)
        assert reader is not None
        n, shard = array.shape[0], array.shards[0]
        for _ in range(40):
            start = int(rng.integers(0, n))
            stop = min(int(rng.integers(start + 1, start + 400)), (start // shard + 1) * shard)
            got = reader.read(start, stop)
            assert got is not None and got.dtype == array.dtype
            np.testing.assert_array_equal(got, array[start:stop])
        assert reader.read(shard - 2, shard + 2) is None  # across shards: zarr reads it
    # A layout it does not know (no shards) is left to zarr.
    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain = group.create_array("x", shape=(10, 3), chunks=(5, 3), dtype="float32")
    assert ShardReader.for_array(fs, str(tmp_path / "plain.zarr"), plain) is None
