"""The plan is data (issue 14, item 2): planned once per build, stored in the store
(``_build/plan.npz``), loaded by every task and the progress watcher without planning again.

Checked here: the stored plan is exactly the plan ``make_plan`` gives (records, ids, the
fingerprints and the order, with measured RIRs, augmentation and noise too); the fast paths in
``make_plan`` write the same bytes as the helpers they stand in for; a build plans once and
its tasks and the watcher never; a store built before plans were stored is refused by
``load_plan`` in one line naming the plan format and resumes (keeping its shards); a damaged,
foreign or other plan is one clear error.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dereverb_data import build as steps
from dereverb_data import plan as plan_module
from dereverb_data.build import build_serial, load_plan
from dereverb_data.corpus import scan_corpus
from dereverb_data.manifest import load_manifest, parse_manifest
from dereverb_data.noise import NoiseFile
from dereverb_data.plan import Plan, _json, _seed_of, make_plan
from dereverb_data.preflight import stored_manifest
from dereverb_data.seeds import derive_seed, stable_hash
from dereverb_data.store import DatasetStore, ShardProgress
from dereverb_data.store_format import (
    LEGACY_PLAN_INPUTS,
    PLAN_FILE,
    PLAN_FORMAT_VERSION,
    PLAN_HEADER,
    StoreReadError,
)

from .conftest import DEMO_MANIFEST
from .test_augment_build import AUGMENT, NOISE, small_demo
from .test_measured_rirs import _pool


def _records(plan: Plan) -> tuple:
    return (
        plan.examples,
        plan.shards,
        dict(plan.rirs),
        list(plan.rirs),
        dict(plan.utterances),
        plan.rooms,
        plan.quarantined,
        plan.speaker_splits,
        plan.measured,
        plan.measured_room_splits,
        plan.noise_files,
        plan.summary(),
        plan.n_frames,
    )


def _rich_manifest():
    """The demo with every optional section: measured RIRs, augmentation, noise files."""
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    data["variants_per_utterance"] = 6
    data["rooms"]["measured"] = {"path": "/rirs", "share": {"train": 0.4, "valid": 0.5}}
    data["augmentation"] = AUGMENT
    data["noise"] = {**NOISE, "files": "/noise"}
    return parse_manifest(data)


@pytest.fixture(scope="module")
def demo_scan():
    manifest = load_manifest(DEMO_MANIFEST)
    return scan_corpus(manifest.corpus, manifest.sample_rate)


@pytest.mark.parametrize("rich", [False, True], ids=["demo", "measured+augmented+noise"])
def test_stored_plan_round_trips_to_exactly_the_plan(demo_scan, rich: bool) -> None:
    manifest, extra = load_manifest(DEMO_MANIFEST), {}
    if rich:
        noise = [NoiseFile("/noise/a.wav", "a" * 24, 16000), NoiseFile("/noise/b.wav", "b" * 24, 9)]
        manifest, extra = _rich_manifest(), {"measured": _pool(4), "noise_files": noise}
    plan = make_plan(manifest, *demo_scan, **extra)
    if rich:
        assert any(e.noise is not None and e.noise.kind == "file" for e in plan.examples)
        assert any(e.noise is not None and e.noise.kind == "colour" for e in plan.examples)
        assert plan.summary()["augmented_examples"] > 0
        assert any(e.room_id.startswith("measured/") for e in plan.examples)
    stored = Plan.from_stored(plan.to_stored())
    assert _records(stored) == _records(plan)
    assert stored.plan_id == plan.plan_id
    for name, column in plan.columns.items():
        assert stored.columns[name].dtype == column.dtype, name
        assert stored.columns[name].tobytes() == column.tobytes(), name
    # Records built for one shard are those of the whole plan, and ids map back to them.
    for shard in plan.shards:
        assert stored.shard(shard.shard_id) == shard
        examples = stored.shard_examples(shard.shard_id)
        assert tuple(e.example_id for e in examples) == shard.example_ids
        assert [stored.example(e.example_id) for e in examples] == examples
    assert stored.rir_ids_by_room() == plan.rir_ids_by_room()
    # The same inputs give the same bytes: the plan id is a pure function of the plan.
    assert make_plan(manifest, *demo_scan, **extra).to_stored() == plan.to_stored()


def test_fast_paths_write_the_bytes_of_the_helpers() -> None:
    """make_plan writes derive_seed's and stable_hash's JSON by hand, and draws the level as
    low + span * random(); each must give exactly what the helper it replaces gives."""
    render = {"b": [1, 2.5], "a": {"z": None, "y": "é"}}
    for i, uid in enumerate(["a", "spk-1/ü'x\"", "x" * 80, "0"]):
        for variant in (0, 7, 123):
            payload = json.dumps([20261125, "example", "train", uid], default=str)[:-1]
            assert _seed_of(f"{payload}, {variant}]") == derive_seed(
                20261125, "example", "train", uid, variant
            )
        for rms in (None, -23.456, -30.0, -0.0):
            content, samples, rir = f"{i:024x}", 64000 + i, f"{i:020x}"
            level = "null" if rms is None else repr(rms)
            text = f'[{json.dumps(content)},{json.dumps(samples)},"{rir}",{level},{_json(render)}]'
            fast = hashlib.sha256(text.encode()).hexdigest()[:24]
            assert stable_hash([content, samples, rir, rms, render], 24) == fast
    for seed in range(2000):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        for low, high in ((-30, -20), (-35.5, -12.25)):
            assert a.uniform(low, high) == float(low) + (float(high) - float(low)) * b.random()


def _count_plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = plan_module.make_plan

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "make_plan", counted)
    monkeypatch.setattr(steps, "make_plan", counted)
    return calls


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("plan-store")
    url = str(tmp / "store.zarr")
    build_serial(load_manifest(small_demo(tmp, None)), url)
    return url


def test_a_build_plans_once_and_its_tasks_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_plans(monkeypatch)
    url = str(tmp_path / "store.zarr")
    report = build_serial(load_manifest(small_demo(tmp_path, None)), url)
    assert calls[0] == 1  # prepare_build, once
    steps._LOADED.clear()  # as a fresh worker process
    plan = load_plan(url)
    assert plan.n_examples == report["summary"]["examples"]
    for room in steps.rirs_by_room(plan):
        steps.simulate_room_step(url, room, steps.default_rir_cache(url), plan.plan_id)
    for shard_id in range(plan.n_shards):
        steps.render_shard_step(url, shard_id, steps.default_rir_cache(url), plan.plan_id)
    steps.finalize_step(url, plan.plan_id)
    assert calls[0] == 1
    assert not (Path(url) / LEGACY_PLAN_INPUTS).exists()
    assert stored_manifest(url) == plan.manifest.model_dump(mode="json")


def test_the_flow_plans_once(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.build import run_build

    calls = _count_plans(monkeypatch)
    url = str(tmp_path / "store.zarr")
    report = run_build(str(small_demo(tmp_path, None)), url, workers=1)
    assert report["counts"]["shards_rendered"] == report["summary"]["shards"]
    assert calls[0] == 1


def test_the_watcher_loads_the_plan_and_reads_each_marker_once(
    small_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import _watch

    calls = _count_plans(monkeypatch)
    reads = []
    real_marker = DatasetStore.marker
    monkeypatch.setattr(DatasetStore, "marker", lambda s, i: reads.append(i) or real_marker(s, i))
    steps._LOADED.clear()
    job = threading.Thread(target=time.sleep, args=(2.0,))  # four polls or so
    job.start()
    _watch(small_store, steps.default_rir_cache(small_store), job)
    job.join()
    n_shards = load_plan(small_store).n_shards
    assert calls[0] == 0
    assert sorted(reads) == list(range(n_shards))  # once each, however many polls
    progress = ShardProgress(
        DatasetStore(small_store), [s.fingerprint for s in load_plan(small_store).shards]
    )
    assert progress.done() == n_shards
    assert progress.done() == n_shards


def test_a_store_built_before_plans_were_stored(small_store: str, tmp_path: Path) -> None:
    """Its _build holds plan.json (the inputs), no plan.npz: load_plan refuses it in one line
    naming the plan format; a build resumes it, keeping every shard, and stores the plan."""
    import shutil

    url = str(tmp_path / "old.zarr")
    shutil.copytree(small_store, url)
    plan = load_plan(small_store)
    (Path(url) / PLAN_FILE).unlink()
    (Path(url) / LEGACY_PLAN_INPUTS).write_text(plan.to_json())
    steps._LOADED.clear()
    with pytest.raises(StoreReadError) as error:
        load_plan(url)
    message = str(error.value)
    assert "\n" not in message and f"plan format {PLAN_FORMAT_VERSION}" in message
    assert LEGACY_PLAN_INPUTS in message and "run the build again" in message
    assert stored_manifest(url) == plan.manifest.model_dump(mode="json")  # preflight reads it
    assert np.array_equal(
        load_plan(small_store).columns["shard_start"], plan.columns["shard_start"]
    )
    report = build_serial(plan.manifest, url)
    assert report["counts"]["shards_rendered"] == 0
    assert report["counts"]["shards_kept"] == plan.n_shards
    assert load_plan(url).plan_id == plan.plan_id
    assert not (Path(url) / LEGACY_PLAN_INPUTS).exists()


def _one_line_error(url: str, match: str, plan_id: str | None = None) -> str:
    steps._LOADED.clear()
    with pytest.raises(StoreReadError, match=match) as error:
        load_plan(url, plan_id)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_damaged_or_other_plan_is_one_clear_error(small_store: str, tmp_path: Path) -> None:
    import shutil

    url = str(tmp_path / "store.zarr")
    shutil.copytree(small_store, url)
    path = Path(url) / PLAN_FILE
    good = path.read_bytes()
    plan = Plan.from_stored(good)
    # Another plan than the one the build made (another build planned the store since).
    _one_line_error(url, "not 'f00' that this build made", plan_id="f00")
    # One flipped byte in a column (the zip's CRC catches it), or a column changed and the
    # file written again whole (the plan's own checksum does).
    column = good.index(plan.columns["example_fingerprint"].tobytes())
    path.write_bytes(good[:column] + bytes([good[column] ^ 1]) + good[column + 1 :])
    _one_line_error(url, "the stored plan is unusable")
    with np.load(io.BytesIO(good)) as npz:
        members = {name: npz[name] for name in npz.files}
    members["example_variant"] = members["example_variant"] + 1
    path.write_bytes(_npz(members))
    _one_line_error(url, "checksum does not match its content")
    # Truncated; not an npz at all; a column missing.
    path.write_bytes(good[: len(good) // 2])
    _one_line_error(url, "the stored plan is unusable")
    path.write_bytes(b"{}")
    _one_line_error(url, "the stored plan is unusable")
    path.write_bytes(_npz({k: v for k, v in members.items() if k != "shard_start"}))
    _one_line_error(url, "columns shard_start missing")
    # Another format version: refused by name.
    header = json.loads(members[PLAN_HEADER].tobytes())
    members[PLAN_HEADER] = np.frombuffer(
        json.dumps({**header, "format_version": 9}).encode(), np.uint8
    )
    path.write_bytes(_npz(members))
    message = _one_line_error(url, "format version 9")
    assert f"reads version {PLAN_FORMAT_VERSION}" in message
    # Preflight, which reads the plan's manifest, says so in one line too.
    with pytest.raises(Exception, match="cannot be checked against this manifest") as error:
        stored_manifest(url)
    assert "\n" not in str(error.value)
    path.write_bytes(good)
    steps._LOADED.clear()
    assert load_plan(url, plan.plan_id).plan_id == plan.plan_id


def _npz(members: dict) -> bytes:
    out = io.BytesIO()
    np.savez(out, **members)
    return out.getvalue()
