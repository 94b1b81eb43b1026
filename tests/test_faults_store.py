"""Damaged stores and locks: every failure is one readable line, and nothing built is lost.

A small store is built once with the library (no Prefect) and copied for each case. Damage to a
shard (truncated file, flipped byte in the shard index, deleted file) must be named by verify
and mended by the repair path (forget the damaged shards, build again) bit for bit; damage to
what verify stands on (metadata, checksums, index) must raise StoreError naming the store and
the file; an unreadable lock must be refused with a pointer to --break-lock, and taken with it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
import zarr

from dereverb_data import lock as lock_module
from dereverb_data.build import build_serial
from dereverb_data.lock import StoreLocked, build_lock
from dereverb_data.manifest import Manifest
from dereverb_data.store_format import StoreError, shard_keys
from dereverb_data.verify import forget_damaged_shards, verify_store

from .conftest import run_cli

# 16 examples in 8 shards of 1024 frames, 7 RIRs in 4 rooms: about 4 s to build on 2 cores.
SMALL = {
    "name": "faults",
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
VICTIM = 2  # the shard damaged in the shard cases


def manifest(dtype: str) -> Manifest:
    data = json.loads(json.dumps(SMALL))
    data["storage"]["dtype"] = dtype
    return Manifest.model_validate(data)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The original store for a storage dtype, built on first use."""
    stores: dict[str, Path] = {}

    def get(dtype: str) -> Path:
        if dtype not in stores:
            url = tmp_path_factory.mktemp(f"faults-{dtype}") / "store.zarr"
            build_serial(manifest(dtype), str(url))
            stores[dtype] = url
        return stores[dtype]

    return get


def copy_store(built: Callable[[str], Path], tmp_path: Path, dtype: str = "complex64") -> Path:
    store = tmp_path / "store.zarr"
    shutil.copytree(built(dtype), store)
    return store


def snapshot(store: Path) -> dict[str, bytes]:
    """Every file that holds built data or vouches for it: shards of both signals, index,
    checksums, labels and done-markers (not the lock, the plan or the report)."""
    names = ("reverberant", "clean", "index", "shard_checksums", "_build/labels", "_build/shards")
    return {
        str(p.relative_to(store)): p.read_bytes()
        for name in names
        for p in sorted((store / name).rglob("*"))
        if p.is_file()
    }


def shard_file(store: Path, signal: str, shard: int) -> Path:
    """The one stored object of a shard: ``c/<k>/0`` for complex64, ``c/<k>/0/0`` for float16."""
    (path,) = [p for p in (store / signal / "c" / str(shard)).rglob("*") if p.is_file()]
    return path


def without_shard(files: dict[str, bytes], shard: int) -> dict[str, bytes]:
    parts = (f"/c/{shard}/", f"/{shard:06d}.json")
    return {k: v for k, v in files.items() if not any(p in k for p in parts)}


def repair(store: Path, dtype: str = "complex64") -> dict:
    """The repair path of ``dereverb build --repair``, without Prefect."""
    forgotten = forget_damaged_shards(str(store))
    report = build_serial(manifest(dtype), str(store))
    report["forgotten"] = forgotten
    return report


# -- damaged shards ---------------------------------------------------------------------------


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_index_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # the shard index (chunk offsets, then a crc32c) is the file's end
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "signal", "dtype"),
    [
        (truncate, "reverberant", "complex64"),
        (truncate, "clean", "float16"),
        (flip_index_byte, "clean", "complex64"),
        (flip_index_byte, "reverberant", "float16"),
    ],
    ids=["truncated", "truncated-float16", "flipped-index", "flipped-index-float16"],
)
def test_an_unreadable_shard_is_named_and_repair_restores_it_bit_for_bit(
    built: Callable[[str], Path],
    tmp_path: Path,
    damage: Callable[[Path], None],
    signal: str,
    dtype: str,
) -> None:
    store = copy_store(built, tmp_path, dtype)
    original = snapshot(store)
    damage(shard_file(store, signal, VICTIM))

    report = verify_store(str(store))
    assert list(report.damaged) == [VICTIM]
    assert report.damaged[VICTIM].startswith("unreadable (")
    assert not report.problems
    # verify and the damage touched nothing else
    assert without_shard(snapshot(store), VICTIM) == without_shard(original, VICTIM)

    result = repair(store, dtype)
    assert result["forgotten"] == [VICTIM]
    assert result["counts"]["shards_rendered"] == 1
    assert verify_store(str(store)).ok
    assert snapshot(store) == original


def test_a_deleted_shard_is_reported_missing_and_repair_restores_it(
    built: Callable[[str], Path], tmp_path: Path
) -> None:
    store = copy_store(built, tmp_path)
    original = snapshot(store)
    victim = shard_file(store, "clean", VICTIM)
    victim.unlink()

    report = verify_store(str(store))
    assert report.damaged == {VICTIM: f"missing (no {victim.relative_to(store).as_posix()})"}
    assert without_shard(snapshot(store), VICTIM) == without_shard(original, VICTIM)

    result = repair(store)
    assert result["forgotten"] == [VICTIM]
    assert result["counts"]["shards_rendered"] == 1
    assert verify_store(str(store)).ok
    assert snapshot(store) == original


def test_a_damaged_shard_without_repair_is_rewritten_when_its_marker_is_gone(
    built: Callable[[str], Path], tmp_path: Path
) -> None:
    """A crashed rewrite leaves no marker and a damaged file: the next build mends it, because
    a shard is written without reading what was there."""
    store = copy_store(built, tmp_path)
    original = snapshot(store)
    flip_index_byte(shard_file(store, "reverberant", VICTIM))
    (store / "_build" / "shards" / f"{VICTIM:06d}.json").unlink()

    report = build_serial(manifest("complex64"), str(store))
    assert report["counts"]["shards_rendered"] == 1
    assert verify_store(str(store)).ok
    assert snapshot(store) == original


# -- damaged metadata, checksums, index ------------------------------------------------------


def write(relative: str, text: str) -> Callable[[Path], None]:
    return lambda store: (store / relative).write_text(text)


def remove(relative: str) -> Callable[[Path], None]:
    return lambda store: shutil.rmtree(store / relative)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (write("zarr.json", "{not json"), "the store's root zarr.json is unreadable (JSONDecode"),
        (write("zarr.json", ""), "the store's root zarr.json is unreadable"),
        (lambda store: (store / "zarr.json").unlink(), "no zarr.json at the store root"),
        (remove("shard_checksums"), "shard_checksums is missing (no shard_checksums/zarr.json)"),
        (remove("index/frame_offset"), "index/frame_offset is missing (no index/frame_offset/"),
        (remove("index"), "index is missing (no index/zarr.json)"),
        (write("reverberant/zarr.json", "{not json"), "reverberant/zarr.json is unreadable ("),
        (write("clean/zarr.json", '{"zarr_format": 3}'), "clean/zarr.json is unreadable ("),
    ],
    ids=[
        "root-corrupt",
        "root-empty",
        "root-missing",
        "no-checksums",
        "no-index-column",
        "no-index",
        "array-metadata-corrupt",
        "array-metadata-incomplete",
    ],
)
def test_damaged_metadata_is_one_line_naming_the_store_and_the_file(
    built: Callable[[str], Path], tmp_path: Path, damage: Callable[[Path], None], expected: str
) -> None:
    store = copy_store(built, tmp_path)
    damage(store)
    damaged = snapshot(store)
    for check in (verify_store, forget_damaged_shards):
        with pytest.raises(StoreError) as error:
            check(str(store))
        message = str(error.value)
        assert message.startswith(f"{store}: ") and expected in message
        assert "\n" not in message
    assert snapshot(store) == damaged  # neither removed a marker nor touched data


def test_lost_checksums_and_index_are_written_again_by_a_plain_build(
    built: Callable[[str], Path], tmp_path: Path
) -> None:
    """What the message for a lost index or checksums array promises."""
    store = copy_store(built, tmp_path)
    original = snapshot(store)
    shutil.rmtree(store / "shard_checksums")
    (store / "index" / "zarr.json").write_text("garbage")
    report = build_serial(manifest("complex64"), str(store))
    assert report["counts"]["shards_rendered"] == 0
    assert verify_store(str(store)).ok
    assert snapshot(store) == original


def test_verify_cli_prints_one_error_line_for_a_damaged_store(
    built: Callable[[str], Path], tmp_path: Path
) -> None:
    store = copy_store(built, tmp_path)
    (store / "zarr.json").write_text("{not json")
    result = run_cli("verify", str(store))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {store}: "), result.stderr


# -- the lock ---------------------------------------------------------------------------------


def lock_path(store: Path) -> Path:
    return store / "_build" / "lock.json"


def refused(store: Path, break_lock: bool = False) -> str:
    """The message of the StoreLocked that taking the lock must raise."""
    with pytest.raises(StoreLocked) as error, build_lock(str(store), break_lock=break_lock):
        pytest.fail("took a lock that should have been refused")
    return str(error.value)


def leave_lock(store: Path, content: bytes, age_s: float = 60.0) -> None:
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    then = time.time() - age_s
    os.utime(path, (then, then))


@pytest.mark.parametrize(
    "content", [b"", b"{not json", b"[1, 2]"], ids=["empty", "garbage", "list"]
)
def test_an_unreadable_lock_is_refused_and_broken_on_request(
    built: Callable[[str], Path], tmp_path: Path, content: bytes
) -> None:
    store = copy_store(built, tmp_path)
    before = snapshot(store)
    leave_lock(store, content)

    message = refused(store)
    assert message.startswith(f"{store}: ") and "\n" not in message
    assert f"{lock_path(store)} is unreadable" in message and "--break-lock" in message
    assert lock_path(store).read_bytes() == content  # refused: left as it was

    with build_lock(str(store), break_lock=True) as holder:
        assert json.loads(lock_path(store).read_text())["token"] == holder["token"]
    assert not lock_path(store).exists()  # released
    assert snapshot(store) == before


def test_a_fresh_unreadable_lock_is_waited_for_as_a_write_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A young unparseable lock may be a holder still writing it (object stores): the holder
    it turns into is respected, even with --break-lock."""
    monkeypatch.setattr(lock_module, "UNREADABLE_GRACE_S", 30.0)
    store = tmp_path / "store.zarr"
    leave_lock(store, b"", age_s=0)
    live = {**lock_module._me(), "token": "live-holder"}
    writer = threading.Timer(0.5, lambda: lock_path(store).write_text(json.dumps(live)))
    writer.start()
    try:
        message = refused(store, break_lock=True)
    finally:
        writer.join()
    assert f"another build holds this store (host {socket.gethostname()}" in message
    assert json.loads(lock_path(store).read_text())["token"] == "live-holder"


def test_a_live_holder_is_refused_even_with_break_lock(tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    with build_lock(str(store)) as holder:
        for break_lock in (False, True):
            assert f"pid {holder['pid']}" in refused(store, break_lock)
        assert json.loads(lock_path(store).read_text())["token"] == holder["token"]
    assert not lock_path(store).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {
        "host": socket.gethostname(),
        "pid": dead.pid,
        "process_started": time.time() - 5,
        "started": "2026-01-01T00:00:00+00:00",
        "token": "dead-holder",
    }
    leave_lock(store, json.dumps(stale).encode(), age_s=5)
    with build_lock(str(store)) as holder:
        assert json.loads(lock_path(store).read_text())["token"] == holder["token"]
        assert holder["token"] != "dead-holder"
    assert not lock_path(store).exists()


def test_taking_the_lock_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    with build_lock(str(store)):
        refused(store)
        assert sorted(p.name for p in (store / "_build").iterdir()) == ["lock.json"]
    assert list((store / "_build").iterdir()) == []


@pytest.mark.parametrize(
    ("dtype", "suffix"), [("complex64", ""), ("float16", "/0")], ids=["complex64", "float16"]
)
def test_shard_keys_name_the_one_stored_object_of_each_shard(
    built: Callable[[str], Path], dtype: str, suffix: str
) -> None:
    """What write_shard deletes and verify looks for: with shards set, one object per shard,
    at the array's chunk key of the shard's grid position."""
    store = built(dtype)
    group = zarr.open_group(str(store), mode="r")
    for signal in ("reverberant", "clean"):
        array = group[signal]
        n_shards = array.shape[0] // array.shards[0]
        keys = [key for k in range(n_shards) for key in shard_keys(array, k)]
        assert keys == [f"c/{k}/0{suffix}" for k in range(n_shards)]
        on_disk = {
            p.relative_to(store / signal).as_posix()
            for p in (store / signal / "c").rglob("*")
            if p.is_file()
        }
        assert on_disk == set(keys)


def test_repair_works_on_an_fsspec_store(tmp_path: Path) -> None:
    """The store URL may be any fsspec URL: shards are found and deleted through fsspec."""
    url = f"memory://faults-{tmp_path.name}/store.zarr"
    fs, root = fsspec.core.url_to_fs(url)
    try:
        build_serial(manifest("float16"), url)
        victim = f"{root}/clean/c/{VICTIM}/0/0"
        original = fs.cat(victim)
        fs.pipe(victim, original[: len(original) // 2])
        assert verify_store(url).damaged[VICTIM].startswith("unreadable (")
        assert forget_damaged_shards(url) == [VICTIM]
        assert build_serial(manifest("float16"), url)["counts"]["shards_rendered"] == 1
        assert verify_store(url).ok and fs.cat(victim) == original
        fs.rm(victim)
        assert verify_store(url).damaged == {VICTIM: f"missing (no clean/c/{VICTIM}/0/0)"}
    finally:
        fs.rm(root, recursive=True)
