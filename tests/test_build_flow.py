"""The demo manifest through the real Prefect flow: layout, index, alignment, reproducibility."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy.signal import fftconvolve

from dereverb_data.acoustics import measure_rir
from dereverb_data.build import build_serial, default_rir_cache, load_plan
from dereverb_data.corpus import load_utterance
from dereverb_data.inspect import describe_store
from dereverb_data.manifest import load_manifest, parse_manifest
from dereverb_data.rir_bank import RirBank
from dereverb_data.stft import StftConfig, istft
from dereverb_data.store import DatasetStore
from dereverb_data.store_format import SUMMARY_LABELS, StoreError, shard_checksum

from .conftest import DEMO_MANIFEST


def read_plain(url: str) -> tuple[zarr.Group, dict[str, np.ndarray]]:
    """Exactly the README's recipe: plain zarr and numpy, none of our code."""
    group = zarr.open_group(url, mode="r")
    index = {name: group["index"][name][:] for name in group["index"].array_keys()}
    return group, index


def ser_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    error = reference - estimate.astype(np.float64)
    return float(10 * np.log10(np.sum(reference**2) / np.sum(error**2)))


def test_store_opens_with_plain_zarr(demo_store: str) -> None:
    group, index = read_plain(demo_store)
    attrs = dict(group.attrs)
    assert attrs["format"] == "dereverb-store" and attrs["complete"] is True
    assert attrs["manifest"]["name"] == "demo"
    assert group["reverberant"].dtype == np.complex64
    assert group["reverberant"].shape == group["clean"].shape == (attrs["n_frames"], 257)
    assert group["reverberant"].shards == (attrs["frames_per_shard"], 257)
    n = attrs["n_examples"]
    assert n == index["example_id"].size == 48
    assert set(index) >= {
        "split",
        "speaker",
        "rir_id",
        "frame_offset",
        "frame_count",
        "rt60_t30",
        "rt60_t20",
        "drr_db",
        "c50_db",
        "distance_m",
        "gain",
        "clean_gain",
    }
    assert group["shard_checksums"].shape == (attrs["n_shards"],)


def test_index_invariants(demo_store: str) -> None:
    group, index = read_plain(demo_store)
    shard_frames = group.attrs["frames_per_shard"]
    start, count = index["frame_offset"], index["frame_count"]
    order = np.argsort(start)
    # Examples never overlap, and each lies inside one shard.
    assert np.all(start[order][1:] >= (start + count)[order][:-1])
    assert np.all(start // shard_frames == (start + count - 1) // shard_frames)
    assert np.all(start // shard_frames == index["shard"])
    hop = group.attrs["stft"]["hop"]
    assert np.all(count == 1 + index["num_samples"] // hop)
    for name in ("rt60_t30", "rt60_t20", "drr_db", "c50_db", "distance_m", "gain"):
        assert np.all(np.isfinite(index[name])), name
    # Padding between examples is exactly zero in both signals.
    used = np.zeros(group["clean"].shape[0], bool)
    for s, c in zip(start, count, strict=True):
        used[s : s + c] = True
    clean = group["clean"][:]
    assert not np.any(clean[~used])


def test_c80_is_measured_on_each_examples_banked_rir(demo_store: str) -> None:
    _, index = read_plain(demo_store)
    assert index["c80_db"].dtype == np.float64 and np.all(np.isfinite(index["c80_db"]))
    bank = RirBank(default_rir_cache(demo_store))
    for row in range(index["example_id"].size):
        rir, _ = bank.load_rir(str(index["rir_id"][row]))
        assert index["c80_db"][row] == measure_rir(rir, 16000).c80_db
    assert np.all(index["c80_db"] > index["c50_db"])


def test_summaries_describe_every_summary_label(demo_store: str) -> None:
    """The build's report, its stored summary and ``inspect`` each give the distribution of
    every label ``store_format.SUMMARY_LABELS`` names (c80_db among them since it was added
    there), computed from the index itself."""
    group, index = read_plain(demo_store)
    described = describe_store(demo_store)
    assert "c80_db" in SUMMARY_LABELS
    for name in SUMMARY_LABELS:
        values = index[name][np.isfinite(index[name])]
        expected = {
            "min": round(float(values.min()), 3),
            "median": round(float(np.median(values)), 3),
            "max": round(float(values.max()), 3),
        }
        for where, summary in (
            ("store summary", group.attrs["summary"][name]),
            ("inspect", described["labels"][name]),
        ):
            assert {k: summary[k] for k in expected} == expected, (where, name)


SMALL = {
    "name": "small",
    "seed": 5,
    "corpus": {"kind": "demo", "speakers": 3, "utterances_per_speaker": 1},
    "variants_per_utterance": 1,
    "rooms": {
        "rooms_per_split": {"train": 1, "valid": 1, "test": 1},
        "positions_per_room": 2,
        "length_m": [4, 5],
        "width_m": [3, 4],
        "height_m": [2.5, 3],
        "rt60_s": [0.3, 0.5],
        "distance_m": [1.0, 2.0],
    },
    "splits": {"train": 0.34, "valid": 0.33, "test": 0.33},
    "storage": {"frames_per_chunk": 128, "frames_per_shard": 1024},
}


def test_a_bank_from_before_a_label_existed_gets_it_measured(tmp_path: Path) -> None:
    """RIRs banked before c80_db existed (its key stripped from each entry's labels) give a
    store the same c80_db values as a fresh bank, and the same everything else."""
    manifest = parse_manifest(SMALL)
    fresh = str(tmp_path / "fresh.zarr")
    build_serial(manifest, fresh)
    old_bank = tmp_path / "old_bank"
    shutil.copytree(default_rir_cache(fresh), old_bank)
    entries = sorted(old_bank.rglob("*.npz"))
    assert entries
    for path in entries:
        with np.load(path) as archive:
            rir, labels = archive["rir"], json.loads(str(archive["labels"]))
        del labels["c80_db"]
        with path.open("wb") as f:
            np.savez(f, rir=rir, labels=np.array(json.dumps(labels)))
    old = str(tmp_path / "old.zarr")
    report = build_serial(manifest, old, rir_cache=str(old_bank))
    assert report["counts"]["rirs_simulated"] == 0  # nothing resimulated for the new label
    _, a = read_plain(fresh)
    _, b = read_plain(old)
    assert np.all(np.isfinite(b["c80_db"])) and np.array_equal(a["c80_db"], b["c80_db"])
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name
    with np.load(entries[0]) as archive:  # read, not rewritten: the bank is left as it was
        assert "c80_db" not in json.loads(str(archive["labels"]))


def test_measured_rt60_in_requested_range(demo_store: str) -> None:
    group, index = read_plain(demo_store)
    low, high = group.attrs["manifest"]["rooms"]["rt60_s"]
    inside = (index["rt60_t30"] >= low) & (index["rt60_t30"] <= high)
    assert inside.mean() >= 0.9, index["rt60_t30"]


def test_splits_are_speaker_and_room_disjoint(demo_store: str) -> None:
    _, index = read_plain(demo_store)
    splits = sorted(set(index["split"]))
    assert splits == ["test", "train", "valid"]
    for column in ("speaker", "room_id", "rir_id", "utterance_id"):
        sets = {s: set(index[column][index["split"] == s]) for s in splits}
        for a in splits:
            for b in splits:
                if a < b:
                    assert not sets[a] & sets[b], (column, a, b)
    # Distinct room ids also mean distinct geometry: no room of one split reappears in another.
    plan = load_plan(demo_store)
    dims = {split: {r.dims for r in plan.rooms.values() if r.split == split} for split in splits}
    assert not (dims["train"] & dims["test"]) and not (dims["train"] & dims["valid"])


def test_direct_target_is_the_delayed_scaled_utterance(demo_store: str) -> None:
    group, index = read_plain(demo_store)
    plan = load_plan(demo_store)
    config = StftConfig(512, 128)
    for row in (0, 17, 40):
        offset, count = int(index["frame_offset"][row]), int(index["frame_count"][row])
        n = int(index["num_samples"][row])
        clean = istft(group["clean"][offset : offset + count], config, n)
        utterance = load_utterance(plan.utterances[str(index["utterance_id"][row])], 16000)
        d = int(index["direct_index"][row])
        expected = np.zeros(n)
        expected[d : d + utterance.size] = index["clean_gain"][row] * utterance[: n - d]
        assert ser_db(expected, clean) > 60
        reverberant = istft(group["reverberant"][offset : offset + count], config, n)
        assert np.max(np.abs(reverberant)) <= 0.99 and np.max(np.abs(clean)) <= 0.99
        level = 20 * np.log10(np.sqrt(np.mean(reverberant.astype(np.float64) ** 2)))
        assert -30.5 <= level <= -19.5


def test_direct_index_is_the_rir_peak_not_the_geometric_delay(demo_store: str) -> None:
    _, index = read_plain(demo_store)
    fs = 16000
    geometric = index["distance_m"] / 343.0 * fs
    offset = index["direct_index"] - geometric
    # The simulator's fractional-delay filter adds about 40 samples (frac_delay_length // 2).
    assert np.all(np.abs(offset - 40) <= 3), offset


def test_same_manifest_gives_bit_identical_store(demo_store: str, tmp_path: Path) -> None:
    """A second build, serial and without Prefect, reuses nothing and matches byte for byte."""
    again = str(tmp_path / "again.zarr")
    build_serial(load_manifest(DEMO_MANIFEST), again)
    first, second = zarr.open_group(demo_store, mode="r"), zarr.open_group(again, mode="r")
    assert list(first["shard_checksums"][:]) == list(second["shard_checksums"][:])
    for name in ("reverberant", "clean"):
        assert np.array_equal(first[name][:], second[name][:])
    for name in first["index"].array_keys():
        a, b = first["index"][name][:], second["index"][name][:]
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
    # The stored shard files themselves are byte-identical (no timestamps inside the data).
    for path in Path(demo_store, "clean").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (Path(again) / path.relative_to(demo_store)).read_bytes()


def test_checksums_match_the_data(demo_store: str) -> None:
    group, _ = read_plain(demo_store)
    frames = group.attrs["frames_per_shard"]
    sums = group["shard_checksums"][:]
    for shard in (0, len(sums) - 1):
        rev = group["reverberant"][shard * frames : (shard + 1) * frames]
        clean = group["clean"][shard * frames : (shard + 1) * frames]
        assert shard_checksum(rev, clean) == sums[shard]


def test_build_report_and_prefect_artifact(demo_store: str, prefect_api: str) -> None:
    report = json.loads((Path(demo_store) / "_build" / "report.json").read_text())
    assert report["summary"]["examples"] == 48 and report["quarantined"] == []

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def latest() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dataset-build"]))
            )

    artifacts = asyncio.run(latest())
    assert artifacts, "the flow published no build artifact"
    # Other tests build too: take the artifact of this store's build, whichever ran last.
    text = next(a.data for a in reversed(artifacts) if demo_store in a.data)
    assert "examples" in text and "rt60_t30_s" in text and demo_store in text


def test_rerun_keeps_every_shard(demo_store: str, tmp_path: Path) -> None:
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(demo_store, copy)
    from flows.build import run_build

    report = run_build(str(DEMO_MANIFEST), copy, rir_cache=default_rir_cache(demo_store), workers=1)
    assert report["counts"]["shards_rendered"] == 0
    assert report["counts"]["rirs_simulated"] == 0
    assert report["counts"]["shards_kept"] == report["summary"]["shards"]


def test_store_with_another_layout_is_refused_and_kept(demo_store: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(demo_store, copy)
    before = zarr.open_group(str(copy), mode="r")["clean"][:]
    text = DEMO_MANIFEST.read_text().replace("n_fft: 512, hop: 128", "n_fft: 256, hop: 64")
    other = tmp_path / "other.yaml"
    other.write_text(text)
    with pytest.raises(StoreError, match=r"another layout.*stft"):
        build_serial(load_manifest(other), str(copy))
    assert np.array_equal(zarr.open_group(str(copy), mode="r")["clean"][:], before)


def test_early_target_is_the_rir_up_to_the_window(tmp_path: Path) -> None:
    data = {
        **SMALL,
        "name": "early",
        "seed": 3,
        "rooms": {**SMALL["rooms"], "positions_per_room": 1},
        "target": {"kind": "early", "early_ms": 50},
        "level": {"mode": "none"},
    }
    manifest = parse_manifest(data)
    url = str(tmp_path / "early.zarr")
    build_serial(manifest, url)
    group, index = read_plain(url)
    plan = load_plan(url)
    bank = RirBank(default_rir_cache(url))
    for row in range(index["example_id"].size):
        rir, _ = bank.load_rir(str(index["rir_id"][row]))
        d = int(index["direct_index"][row])
        window = d + round(0.050 * 16000) + 1
        utterance = load_utterance(plan.utterances[str(index["utterance_id"][row])], 16000)
        n = int(index["num_samples"][row])
        # Independent reference: direct time-domain convolution with the truncated RIR.
        expected = np.convolve(utterance.astype(np.float64), rir[:window].astype(np.float64))[:n]
        expected = np.pad(expected, (0, max(0, n - expected.size))) * index["gain"][row]
        offset, count = int(index["frame_offset"][row]), int(index["frame_count"][row])
        clean = istft(group["clean"][offset : offset + count], StftConfig(512, 128), n)
        assert ser_db(expected, clean) > 60
        # ... and not the full RIR: the late tail is really excluded.
        full = fftconvolve(utterance, rir)[:n] * index["gain"][row]
        assert ser_db(full, clean) < 30


def test_float16_storage_round_trips(tmp_path: Path) -> None:
    text = DEMO_MANIFEST.read_text().replace("dtype: complex64", "dtype: float16")
    text = text.replace("utterances_per_speaker: 4", "utterances_per_speaker: 1")
    path = tmp_path / "f16.yaml"
    path.write_text(text)
    url = str(tmp_path / "f16.zarr")
    build_serial(load_manifest(path), url)
    group, index = read_plain(url)
    assert group["clean"].dtype == np.float16 and group["clean"].shape[-1] == 2
    offset, count, n = (int(index[k][0]) for k in ("frame_offset", "frame_count", "num_samples"))
    stored = group["clean"][offset : offset + count]
    spec = stored[..., 0].astype(np.float32) + 1j * stored[..., 1].astype(np.float32)
    clean = istft(spec, StftConfig(512, 128), n)
    plan = load_plan(url)
    utterance = load_utterance(plan.utterances[str(index["utterance_id"][0])], 16000)
    d = int(index["direct_index"][0])
    expected = np.zeros(n)
    expected[d : d + utterance.size] = index["clean_gain"][0] * utterance[: n - d]
    assert 50 < ser_db(expected, clean) < 100  # float16: about 74 dB, far below complex64
    assert DatasetStore(url).size_bytes() > 0
