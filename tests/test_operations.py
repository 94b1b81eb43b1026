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
    build_serial,
    default_rir_cache,
    load_plan,
    prepare_build,
    shards_ready,
    simulate_room_step,
)
from dereverb_data.lock import StoreLocked, build_lock
from dereverb_data.manifest import Absorption, parse_manifest
from dereverb_data.verify import verify_store
from flows.scheduling import (
    MIN_TASK_SECONDS,
    TAPER_RATIO,
    TASKS_PER_SLOT,
    balanced_batches,
    batch_count,
    merged,
    shard_costs,
    shard_rooms,
    shards_by_room,
    taper_weights,
    tapered_batch_count,
    tapered_batches,
)

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
# Shards long enough that some hold the end of one room's examples and the next room's start.
SHARED_SHARDS = {**SMALL, "storage": {"frames_per_chunk": 128, "frames_per_shard": 1024}}
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
    rounds = -(-len(batches) // slots)
    weights = taper_weights(len(batches), slots)
    # Written out: round r of `slots` batches weighs TAPER_RATIO ** r.
    assert weights == [TAPER_RATIO ** (b // slots) for b in range(n)]
    shares = [sum(costs) * w / sum(weights) for w in weights]
    # Each batch within one item of its share: the last ones small, the first ones big.
    assert all(abs(t - s) <= max(costs) + 1e-9 for t, s in zip(totals, shares, strict=True))
    if rounds >= 3:
        assert sum(totals[:slots]) > sum(totals[-slots:])


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_tapered_batch_count_takes_the_most_rounds_whose_last_batches_are_worth_a_task(
    slots: int,
) -> None:
    def last_batch_seconds(total: float, n: int) -> float:
        weights = taper_weights(n, slots)
        return total * weights[-1] / sum(weights)

    assert tapered_batch_count(1e6 * MIN_TASK_SECONDS, slots) == TASKS_PER_SLOT * slots
    assert tapered_batch_count(0.1 * MIN_TASK_SECONDS, slots) == slots  # a round at least
    assert tapered_batch_count(0.0, slots) == slots
    for total in (3.0, 10.0, 40.0, 90.0, 300.0):
        n = tapered_batch_count(total * MIN_TASK_SECONDS, slots)
        assert n % slots == 0 and slots <= n <= TASKS_PER_SLOT * slots
        if n > slots:  # its last batches are worth a task run ...
            assert last_batch_seconds(total * MIN_TASK_SECONDS, n) >= MIN_TASK_SECONDS
        if n < TASKS_PER_SLOT * slots:  # ... and one more round's would not be
            assert last_batch_seconds(total * MIN_TASK_SECONDS, n + slots) < MIN_TASK_SECONDS
    # A 90 s build on 2 slots: 5 rounds, its last batches 1.5 s (1.6 % of the work each).
    assert tapered_batch_count(90.0 * MIN_TASK_SECONDS, 2) == 10


def test_shards_by_room_lists_each_shard_under_the_rooms_it_waits_for() -> None:
    pending = ["r1", "r2", "r3"]
    needed = [["r1"], ["r2"], ["r1", "r2"], ["r0"], ["r0", "r3"], ["r1"], []]
    needing, apart = shards_by_room(pending, needed)
    # r0 is banked already: a shard of r0 and r3 waits only for r3.
    assert needing == {"r1": [0, 2, 5], "r2": [1, 2], "r3": [4]}
    assert apart == [3, 6]  # they need no room simulated


def test_shards_ready_are_those_whose_rirs_are_all_banked(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    plan = prepare_build(parse_manifest(SHARED_SHARDS), url)
    ids = [shard.shard_id for shard in plan.shards]
    needed = shard_rooms(plan, ids)
    bank = default_rir_cache(url)
    assert shards_ready(url, ids, bank) == []
    first = needed[0][0]
    simulate_room_step(url, first, bank)
    assert shards_ready(url, ids, bank) == [i for i in ids if needed[i] == [first]]
    shared = [i for i in ids if first in needed[i] and len(needed[i]) > 1]
    assert shared  # the first room ends in a shard the next room begins
    for room in {room for i in shared for room in needed[i]} - {first}:
        simulate_room_step(url, room, bank)
    ready = shards_ready(url, ids, bank)
    assert set(shared) <= set(ready)
    assert ready == sorted(ready)


def test_batch_count_balances_big_builds_and_keeps_small_tasks_worth_their_cost() -> None:
    slots = 2
    assert batch_count(1000 * MIN_TASK_SECONDS, slots) == TASKS_PER_SLOT * slots
    assert batch_count(0.1 * MIN_TASK_SECONDS, slots) == slots  # never fewer than the slots
    assert batch_count(5.5 * MIN_TASK_SECONDS, slots) == 6  # about MIN_TASK_SECONDS each
    assert batch_count(0.0, 3) == 3


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


@pytest.mark.parametrize("batches_render", [True, False])
def test_flow_renders_every_shard_once_whoever_finds_its_rooms_done(
    batches_render: bool, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A room batch renders the shards whose RIRs it finds all banked; a shard shared with a
    room of another batch is left to whichever finishes last. Should no batch render a shard
    (forced here: no batch finds any ready), the flow renders it itself."""
    from dereverb_data import build as steps
    from flows.build import run_build

    if not batches_render:
        monkeypatch.setattr(steps, "shards_ready", lambda *args: [])
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(SHARED_SHARDS))
    plan = prepare_build(parse_manifest(SHARED_SHARDS), str(tmp_path / "plan.zarr"))
    ids = [shard.shard_id for shard in plan.shards]
    assert any(len(rooms) > 1 for rooms in shard_rooms(plan, ids))
    url = str(tmp_path / "flow.zarr")
    report = run_build(str(manifest), url, workers=1)
    n = len(ids)
    assert report["tasks"]["shards_with_their_rooms"] == (n if batches_render else 0)
    assert report["counts"]["shards_rendered"] == n and report["counts"]["shards_kept"] == 0
    reference = str(tmp_path / "serial.zarr")
    build_serial(parse_manifest(SHARED_SHARDS), reference)
    got, want = zarr.open_group(url, mode="r"), zarr.open_group(reference, mode="r")
    assert list(got["shard_checksums"][:]) == list(want["shard_checksums"][:])


def test_merged_shard_results_prefer_the_task_that_rendered() -> None:
    results = [
        {"shard_id": 3, "rendered": False, "examples_rendered": 0, "examples_reused": 2},
        {"shard_id": 3, "rendered": True, "examples_rendered": 2, "examples_reused": 0},
        {"shard_id": 4, "rendered": True, "examples_rendered": 1, "examples_reused": 0},
        {"shard_id": 4, "rendered": False, "examples_rendered": 0, "examples_reused": 1},
    ]
    kept = sorted(merged(results), key=lambda r: r["shard_id"])
    assert [(r["shard_id"], r["rendered"]) for r in kept] == [(3, True), (4, True)]
