"""Operating a store: verify and repair, one writer per store, incremental regeneration."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from dereverb_data.build import (
    balanced_batches,
    build_serial,
    load_plan,
    prepare_build,
    render_batches,
    shard_costs,
    shard_rooms,
    shards_by_room,
    tapered_batches,
)
from dereverb_data.lock import StoreLocked, build_lock
from dereverb_data.manifest import Absorption, parse_manifest
from dereverb_data.verify import verify_store
from flows.build import MIN_TASK_SECONDS, TASKS_PER_SLOT, batch_count

from .conftest import REPO, run_cli

SMALL = {
    "name": "ops",
    "seed": 5,
    "corpus": {"kind": "demo", "speakers": 4, "utterances_per_speaker": 2},
    "variants_per_utterance": 2,
    "rooms": {
        "rooms_per_split": {"train": 5, "valid": 1, "test": 1},
        "positions_per_room": 2,
        "length_m": [4.0, 6.0],
        "width_m": [3.0, 5.0],
        "height_m": [2.5, 3.0],
        "rt60_s": [0.3, 0.6],
        "distance_m": [0.8, 2.0],
    },
    "storage": {"frames_per_chunk": 128, "frames_per_shard": 512},
    "splits": {"train": 0.5, "valid": 0.25, "test": 0.25},
}
EDITED_PROFILE = "boomy"


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("ops") / "small.zarr")
    build_serial(parse_manifest(SMALL), url)
    return url


def shard_files(url: str) -> dict[str, bytes]:
    root = Path(url)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for name in ("reverberant", "clean")
        for p in (root / name / "c").rglob("*")
        if p.is_file()
    }


def test_verify_names_a_flipped_byte_and_repair_restores_it(
    small_store: str, tmp_path: Path, prefect_api: str
) -> None:
    store = tmp_path / "damaged.zarr"
    shutil.copytree(small_store, store)
    assert verify_store(str(store)).ok
    original = shard_files(str(store))
    victim = sorted(k for k in original if k.startswith("clean"))[2]  # clean/c/<shard>/0
    shard_id = int(Path(victim).parts[2])
    data = bytearray(original[victim])
    data[len(data) // 3] ^= 0xFF
    (store / victim).write_bytes(bytes(data))

    report = verify_store(str(store))
    assert list(report.damaged) == [shard_id]
    result = run_cli("verify", str(store))
    assert result.returncode == 1 and f"shard {shard_id}:" in result.stdout

    manifest = tmp_path / "ops.yaml"
    manifest.write_text(yaml.safe_dump(SMALL))
    repaired = run_cli(
        "build",
        str(manifest),
        "--store",
        str(store),
        "--workers",
        "1",
        "--repair",
        api_url=prefect_api,
    )
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert f"repaired shards: [{shard_id}]" in repaired.stdout
    assert "shards_rendered 1" in repaired.stdout
    assert verify_store(str(store)).ok
    assert run_cli("verify", str(store)).returncode == 0
    assert shard_files(str(store)) == original  # bit-identical to the undamaged store


def test_a_second_build_is_refused_naming_the_holder(small_store: str, tmp_path: Path) -> None:
    store = tmp_path / "locked.zarr"
    shutil.copytree(small_store, store)
    before = shard_files(str(store))
    with build_lock(str(store)) as holder:
        with pytest.raises(StoreLocked) as error:
            build_serial(parse_manifest(SMALL), str(store))
        message = str(error.value)
        assert f"pid {holder['pid']}" in message and socket.gethostname() in message
        assert holder["started"] in message
    assert shard_files(str(store)) == before
    assert not (store / "_build" / "lock.json").exists()  # released


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    store = tmp_path / "stale.zarr"
    # A real process that held the lock and died without releasing it (SIGKILL).
    code = (
        "import os, signal, sys\n"
        "from dereverb_data.lock import build_lock\n"
        f"with build_lock({str(store)!r}):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    dead = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120)
    assert dead.returncode == -9
    stale = json.loads((store / "_build" / "lock.json").read_text())
    with build_lock(str(store)) as holder:
        now = json.loads((store / "_build" / "lock.json").read_text())
        assert now["token"] == holder["token"] != stale["token"]


def test_changing_some_rooms_regenerates_only_what_changed(
    small_store: str, tmp_path: Path
) -> None:
    store = tmp_path / "incremental.zarr"
    shutil.copytree(small_store, store)
    before = shard_files(str(store))
    old_index = zarr.open_group(str(store), mode="r")["index"]
    old = {k: old_index[k][:] for k in ("example_id", "rir_id", "shard", "room_id")}
    old_rooms = {r: room.spec_hash for r, room in load_plan(str(store)).rooms.items()}

    # More low-frequency absorption in one profile: only the rooms drawing it change.
    changed = json.loads(json.dumps(SMALL))
    profiles = dict(Absorption().profiles)
    profiles[EDITED_PROFILE] = (1.8, *profiles[EDITED_PROFILE][1:])
    changed["rooms"]["absorption"] = {"kind": "profile", "profiles": profiles}
    report = build_serial(parse_manifest(changed), str(store))
    counts = report["counts"]
    new_rooms = {r: room.spec_hash for r, room in load_plan(str(store)).rooms.items()}
    edited_rooms = {r for r in old_rooms if new_rooms[r] != old_rooms[r]}
    assert 0 < len(edited_rooms) < len(old_rooms)

    new_index = zarr.open_group(str(store), mode="r")["index"]
    new = {k: new_index[k][:] for k in ("example_id", "rir_id", "shard")}
    assert np.array_equal(new["example_id"], old["example_id"])  # nothing moved
    changed_rows = new["rir_id"] != old["rir_id"]
    in_edited_rooms = np.array([str(room) in edited_rooms for room in old["room_id"]])
    assert np.array_equal(changed_rows, in_edited_rooms)
    new_rirs = set(new["rir_id"][changed_rows]) - set(old["rir_id"])
    assert counts["rirs_simulated"] == len(new_rirs)
    assert counts["rirs_reused"] == len(set(new["rir_id"])) - len(new_rirs)
    assert counts["examples_rendered"] == int(changed_rows.sum())
    assert counts["examples_kept"] == len(new["example_id"]) - int(changed_rows.sum())
    touched = set(new["shard"][changed_rows])
    assert counts["shards_rendered"] == len(touched)
    after = shard_files(str(store))
    for key, data in before.items():
        shard = int(Path(key).parts[2])
        if shard not in touched:
            assert after[key] == data, key  # unchanged shards keep their bytes
    # The result equals a fresh build of the changed manifest.
    fresh = str(tmp_path / "fresh.zarr")
    build_serial(parse_manifest(changed), fresh)
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(fresh, mode="r")
    assert list(a["shard_checksums"][:]) == list(b["shard_checksums"][:])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50])
def test_balanced_batches_cover_every_item_once_and_balance_the_cost(n: int) -> None:
    rng = np.random.default_rng(n)
    items = [f"room{i}" for i in range(23)]
    costs = list(rng.uniform(0.2, 3.0, len(items)))
    batches = balanced_batches(items, costs, n)
    assert len(batches) == min(n, len(items))
    assert sorted(i for b in batches for i in b) == sorted(items)
    for batch in batches:  # original order inside a batch
        assert batch == sorted(batch, key=items.index)
    totals = [sum(costs[items.index(i)] for i in b) for b in batches]
    # Longest-processing-time first: no batch exceeds the mean by more than the largest item.
    assert max(totals) <= sum(costs) / len(batches) + max(costs) + 1e-9
    assert balanced_batches(items, costs, n) == batches  # deterministic
    assert balanced_batches([], [], n) == []


@pytest.mark.parametrize(("n", "slots"), [(1, 1), (4, 1), (8, 2), (7, 2), (12, 3), (50, 2)])
def test_tapered_batches_cover_every_item_once_and_shrink_towards_the_end(
    n: int, slots: int
) -> None:
    rng = np.random.default_rng(n + slots)
    items = [f"room{i}" for i in range(37)]
    costs = list(rng.uniform(0.5, 3.0, len(items)))
    batches = tapered_batches(items, costs, n, slots)
    assert sorted(i for b in batches for i in b) == sorted(items)
    for batch in batches:  # original order inside a batch
        assert batch == sorted(batch, key=items.index)
    assert tapered_batches(items, costs, n, slots) == batches  # deterministic
    assert tapered_batches([], [], n, slots) == []
    if n >= len(items):  # more batches wanted than items: some stay empty and are dropped
        assert len(batches) <= len(items)
        return
    assert len(batches) == n
    totals = [sum(costs[items.index(i)] for i in b) for b in batches]
    levels = -(-len(batches) // slots)
    weights = [levels - b // slots for b in range(len(batches))]
    shares = [sum(costs) * w / sum(weights) for w in weights]
    # Each batch within one item of its share: the last ones small, the first ones big.
    assert all(abs(t - s) <= max(costs) + 1e-9 for t, s in zip(totals, shares, strict=True))
    if levels >= 3:
        assert sum(totals[:slots]) > sum(totals[-slots:])


def test_shards_by_room_attaches_single_room_shards_to_their_room() -> None:
    pending = ["r1", "r2", "r3"]
    needed = [["r1"], ["r2"], ["r1", "r2"], ["r0"], ["r0", "r3"], ["r1"], []]
    own, apart = shards_by_room(pending, needed)
    # r0 is banked already: a shard of r0 and r3 waits only for r3.
    assert own == {"r1": [0, 5], "r2": [1], "r3": [4]}
    assert apart == [2, 3, 6]  # several pending rooms, or none


def test_batch_count_balances_big_builds_and_keeps_small_tasks_worth_their_cost() -> None:
    slots = 2
    assert batch_count(1000 * MIN_TASK_SECONDS, slots) == TASKS_PER_SLOT * slots
    assert batch_count(0.1 * MIN_TASK_SECONDS, slots) == slots  # never fewer than the slots
    assert batch_count(5.5 * MIN_TASK_SECONDS, slots) == 6  # about MIN_TASK_SECONDS each
    assert batch_count(0.0, 3) == 3


def test_render_batches_wait_only_for_their_own_rooms() -> None:
    rng = np.random.default_rng(3)
    rooms = [f"r{i}" for i in range(9)]
    room_batches = [rooms[0:3], rooms[3:5], rooms[5:8]]  # r8's RIRs are all banked already
    shards = list(range(100, 140))
    needed = [sorted({rooms[i % 9], rooms[(i + (i % 5 == 0)) % 9]}) for i in range(len(shards))]
    costs = list(rng.uniform(0.1, 0.6, len(shards)))
    batches = render_batches(shards, costs, needed, room_batches, n=8, min_cost=0.0)

    assert sorted(s for batch, _ in batches for s in batch) == shards  # each shard once
    batch_of_room = {r: i for i, b in enumerate(room_batches) for r in b}
    for batch, waits in batches:
        wanted = {batch_of_room[r] for s in batch for r in needed[shards.index(s)] if r != "r8"}
        assert waits == sorted(wanted)  # exactly the room batches its shards need
    # Shards that need only banked rooms wait for nothing and come first.
    assert batches[0][1] == [] and all(needed[shards.index(s)] == ["r8"] for s in batches[0][0])
    # Then in the order of the room batches they wait for.
    lasts = [max(waits, default=-1) for _, waits in batches]
    assert lasts == sorted(lasts)
    assert len(batches) <= 8 + len(room_batches) + 1
    assert render_batches(shards, costs, needed, room_batches, 8, 0.0) == batches  # deterministic


def test_render_batches_merge_light_groups() -> None:
    rooms = [f"r{i}" for i in range(6)]
    room_batches = [[r] for r in rooms]
    shards = list(range(6))
    needed = [[r] for r in rooms]  # one shard per room: six groups of 0.2 s each
    batches = render_batches(shards, [0.2] * 6, needed, room_batches, n=6, min_cost=0.5)
    assert [batch for batch, _ in batches] == [[0, 1, 2], [3, 4, 5]]
    assert [waits for _, waits in batches] == [[0, 1, 2], [3, 4, 5]]


def test_shard_rooms_and_costs_follow_the_plan(tmp_path: Path) -> None:
    manifest = parse_manifest(yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text()))
    plan = prepare_build(manifest, str(tmp_path / "s.zarr"))
    ids = [shard.shard_id for shard in plan.shards]
    rooms = shard_rooms(plan, ids)
    for shard, used in zip(plan.shards, rooms, strict=True):
        examples = [e for e in plan.examples if e.shard == shard.shard_id]
        assert used == sorted({e.room_id for e in examples})
    costs = shard_costs(plan, ids)
    audio = [sum(e.num_samples for e in plan.examples if e.shard == i) for i in ids]
    assert all(c > 0 for c in costs)
    # Proportional to each shard's audio.
    ratios = [c / a for c, a in zip(costs, audio, strict=True)]
    assert max(ratios) == pytest.approx(min(ratios))
