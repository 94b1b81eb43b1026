"""RIR augmentation and background noise wired into the build (issue 12, items 3 and 4).

A small copy of the demo manifest with ``augmentation`` and ``noise`` is built for real; the
checks compare it with a noise-free rebuild (same RIR bank), with a second build from scratch
(bit-identical), and the demo manifest without the sections with its pinned plan.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
import zarr

from dereverb_data.build import build_serial, default_rir_cache, load_plan
from dereverb_data.corpus import scan_corpus
from dereverb_data.manifest import ManifestError, load_manifest, parse_manifest
from dereverb_data.measured_rirs import MeasuredRir, MeasuredRirSpec, MeasuredRoom, file_hash
from dereverb_data.noise import scan_noise_files
from dereverb_data.plan import make_plan
from dereverb_data.rir_bank import AugmentedRirSpec, RirBank, get_or_simulate
from dereverb_data.stft import istft
from dereverb_data.store_format import decode

from .conftest import DEMO_MANIFEST
from .test_measured_rirs import DEMO_ALL, DEMO_DIGEST, _digest, decaying_rir

FS = 16000


def small_demo(tmp: Path, noise_dir: Path | None, **sections: dict) -> Path:
    """The demo manifest, shrunk to 12 examples in 4 rooms, with ``sections`` added."""
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    data["corpus"]["utterances_per_speaker"] = 1
    data["rooms"]["rooms_per_split"] = {"train": 2, "valid": 1, "test": 1}
    data["rooms"]["rt60_s"] = [0.3, 0.6]
    data.update(sections)
    if noise_dir is not None and "noise" in data:
        data["noise"]["files"] = str(noise_dir)
    path = tmp / f"demo-{len(list(tmp.glob('demo-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


AUGMENT = {"probability": 0.6, "drr_change_db": [-6, 6], "rt60_factor": [0.6, 1.6]}
NOISE = {"probability": 0.75, "snr_db": [5, 30], "colours": ["white", "pink", "brown"]}


def write_noise_dir(root: Path) -> Path:
    """One usable noise file (8 kHz stereo: resampled and downmixed) and two bad ones."""
    root.mkdir()
    rng = np.random.default_rng(3)
    sf.write(root / "hum.wav", 0.1 * rng.standard_normal((8000, 2)), 8000, subtype="FLOAT")
    sf.write(root / "silent.wav", np.zeros(FS), FS, subtype="FLOAT")
    (root / "garbage.wav").write_bytes(b"RIFF not a wave file" * 20)
    return root


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("augment")
    noise_dir = write_noise_dir(tmp / "noise")
    noisy = small_demo(tmp, noise_dir, augmentation=AUGMENT, noise=dict(NOISE))
    quiet = small_demo(tmp, None, augmentation=AUGMENT)
    first, second, free = (str(tmp / f"{n}.zarr") for n in ("first", "second", "free"))
    report = build_serial(load_manifest(noisy), first)
    build_serial(load_manifest(noisy), second)  # from scratch: its own RIR bank
    # The same RIRs (the first build's bank), no noise.
    build_serial(load_manifest(quiet), free, rir_cache=default_rir_cache(first))
    return {"first": first, "second": second, "free": free, "report": report, "tmp": tmp}


def read(url: str) -> tuple[zarr.Group, dict[str, np.ndarray]]:
    group = zarr.open_group(url, mode="r")
    return group, {name: group["index"][name][:] for name in group["index"].array_keys()}


def waveform(group: zarr.Group, name: str, index: dict, i: int, url: str) -> np.ndarray:
    start, count = int(index["frame_offset"][i]), int(index["frame_count"][i])
    spec = decode(group[name][start : start + count])
    return istft(spec, load_plan(url).stft, int(index["num_samples"][i])).astype(np.float64)


def test_builds_are_bit_identical(builds: dict) -> None:
    g1, i1 = read(builds["first"])
    g2, i2 = read(builds["second"])
    assert set(i1) == set(i2)
    for name in i1:
        np.testing.assert_array_equal(i1[name], i2[name], err_msg=name)
    for name in ("reverberant", "clean"):
        assert np.array_equal(g1[name][:], g2[name][:]), name


def test_snr_labels_match_the_draws_and_the_stored_noise(builds: dict) -> None:
    plan = load_plan(builds["first"])
    g1, i1 = read(builds["first"])
    g0, i0 = read(builds["free"])
    by_id = {e: i for i, e in enumerate(i0["example_id"])}
    noisy = [e.noise is not None for e in plan.examples]
    assert 0 < sum(noisy) < len(noisy)  # both kinds are present in this draw
    kinds = {e.noise.kind for e in plan.examples if e.noise is not None}
    assert kinds == {"colour", "file"}
    assert np.all(np.isnan(i0["snr_db"]))  # without noise the column is NaN throughout
    for i, example in enumerate(plan.examples):
        assert i1["example_id"][i] == example.example_id
        j = by_id[example.example_id]
        clean1 = waveform(g1, "clean", i1, i, builds["first"]) / i1["gain"][i]
        clean0 = waveform(g0, "clean", i0, j, builds["free"]) / i0["gain"][j]
        # The target is untouched by noise: the same waveform up to the level gain.
        np.testing.assert_allclose(clean1, clean0, atol=1e-5 * np.max(np.abs(clean0)))
        if example.noise is None:
            assert math.isnan(i1["snr_db"][i])
            start, count = int(i1["frame_offset"][i]), int(i1["frame_count"][i])
            other = int(i0["frame_offset"][j])
            assert np.array_equal(
                g1["reverberant"][start : start + count],
                g0["reverberant"][other : other + count],
            )
            continue
        assert i1["snr_db"][i] == example.noise.snr_db
        signal = waveform(g0, "reverberant", i0, j, builds["free"]) / i0["gain"][j]
        noise = waveform(g1, "reverberant", i1, i, builds["first"]) / i1["gain"][i] - signal
        measured = 10 * np.log10(np.mean(signal**2) / np.mean(noise**2))
        assert abs(measured - example.noise.snr_db) < 0.1, example.example_id
    # Fingerprints move exactly for the noisy examples (so an incremental rebuild redoes them).
    free = {e.example_id: e.fingerprint for e in load_plan(builds["free"]).examples}
    for example in plan.examples:
        assert (example.fingerprint != free[example.example_id]) == (example.noise is not None)


def test_noise_files_are_quarantined_and_offsets_drawn(builds: dict) -> None:
    report = builds["report"]
    reasons = {Path(q["file"]).name: q["reason"] for q in report["quarantined"]}
    assert {"silent.wav", "garbage.wav"} <= set(reasons)
    assert "silent" in reasons["silent.wav"]
    plan = load_plan(builds["first"])
    assert [Path(f.source).name for f in plan.noise_files] == ["hum.wav"]
    assert plan.noise_files[0].num_samples == FS  # 1 s at 8 kHz, resampled
    offsets = [e.noise.offset for e in plan.examples if e.noise and e.noise.kind == "file"]
    assert offsets and all(0 <= o < FS for o in offsets) and len(set(offsets)) == len(offsets)
    assert report["summary"]["noisy_examples"] == sum(e.noise is not None for e in plan.examples)


def test_augmented_labels_moved_by_the_drawn_amounts(builds: dict) -> None:
    plan = load_plan(builds["first"])
    bank = RirBank(default_rir_cache(builds["first"]))
    _, index = read(builds["first"])
    augmented = 0
    for i, example in enumerate(plan.examples):
        spec = plan.rirs[example.rir_id]
        if not isinstance(spec, AugmentedRirSpec):
            continue
        _, labels = bank.load_rir(spec.rir_id)
        _, base = bank.load_rir(spec.base.rir_id)
        assert labels.details["drr_change_db"] == spec.drr_change_db
        assert labels.details["rt60_factor"] == spec.rt60_factor
        assert labels.details["base_rir_id"] == spec.base.rir_id
        assert index["drr_db"][i] == labels.acoustics.drr_db
        assert index["room_id"][i] == spec.base.room.room_id
        if not labels.augmented:
            assert labels.details["augment_refused"]
            continue
        augmented += 1
        assert abs(labels.acoustics.drr_db - (base.acoustics.drr_db + spec.drr_change_db)) < 0.5
        assert (
            abs(labels.acoustics.rt60_t30 / (base.acoustics.rt60_t30 * spec.rt60_factor) - 1) < 0.1
        )
    assert augmented >= 3
    assert builds["report"]["summary"]["augmented_examples"] >= augmented
    # Without augmentation, the other examples keep their RIRs and fingerprints.
    tmp = builds["tmp"]
    plain = load_manifest(small_demo(tmp, None))
    base_plan = make_plan(plain, *scan_corpus(plain.corpus, plain.sample_rate))
    quiet = {e.example_id: e for e in load_plan(builds["free"]).examples}
    for example in base_plan.examples:
        other = quiet[example.example_id]
        moved = isinstance(load_plan(builds["free"]).rirs[other.rir_id], AugmentedRirSpec)
        assert (example.rir_id != other.rir_id) == moved
        assert (example.fingerprint != other.fingerprint) == moved


def test_demo_plan_unchanged_without_the_sections_or_with_them_off() -> None:
    manifest = load_manifest(DEMO_MANIFEST)
    assert manifest.digest() == DEMO_DIGEST
    assert "augmentation" not in manifest.model_dump() and "noise" not in manifest.model_dump()
    scan = scan_corpus(manifest.corpus, manifest.sample_rate)
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    off = parse_manifest({**data, "augmentation": {"probability": 0}, "noise": {"probability": 0}})
    for m in (manifest, off):
        plan = make_plan(m, *scan)
        assert (
            _digest(sorted(plan.rirs)),
            _digest([e.fingerprint for e in plan.examples]),
            _digest([s.fingerprint for s in plan.shards]),
        ) == DEMO_ALL
        assert all(e.noise is None for e in plan.examples)


def test_refused_augmentation_falls_back_to_the_base_rir(tmp_path: Path) -> None:
    h, _ = decaying_rir(FS, 0.4, 0.7, seed=4)
    path = tmp_path / "rir.wav"
    sf.write(path, h, FS, subtype="FLOAT")
    base = MeasuredRirSpec(
        MeasuredRoom("measured:r", "train"),
        MeasuredRir(str(path), "r", 0, file_hash(path), FS, 1),
        FS,
    )
    bank = RirBank(str(tmp_path / "bank"))
    base_rir, base_labels, _ = get_or_simulate(bank, base)
    # Lengthening 3x is beyond what change_decay allows: the base RIR, labelled as refused.
    refused = AugmentedRirSpec(base, 1.0, 3.0)
    rir, labels, new = get_or_simulate(bank, refused)
    assert new and np.array_equal(rir, base_rir)
    assert labels.augmented is False and "factor" in labels.details["augment_refused"]
    assert (
        labels.acoustics.drr_db == base_labels.acoustics.drr_db
        and labels.details["rt60_factor"] == 3.0
    )
    again, labels_again, new_again = get_or_simulate(bank, refused)
    assert not new_again and np.array_equal(again, rir) and labels_again == labels
    # A DRR change that needs more than the allowed direct gain is refused too.
    rir, labels, _ = get_or_simulate(bank, AugmentedRirSpec(base, 45.0, 1.0))
    assert labels.augmented is False and np.array_equal(rir, base_rir)
    ok_rir, ok, _ = get_or_simulate(bank, AugmentedRirSpec(base, -3.0, 0.8))
    assert ok.augmented is True and not np.array_equal(ok_rir, base_rir)
    assert abs(ok.acoustics.drr_db - (base_labels.acoustics.drr_db - 3.0)) < 0.5
    assert abs(ok.acoustics.rt60_t30 / (0.8 * base_labels.acoustics.rt60_t30) - 1) < 0.1
    assert len({refused.rir_id, AugmentedRirSpec(base, 1.0, 2.9).rir_id, base.rir_id}) == 3


def test_refusals_in_a_build_never_fail_it(builds: dict) -> None:
    tmp = builds["tmp"]
    path = small_demo(tmp, None, augmentation={"probability": 1.0, "rt60_factor": [2.5, 3.0]})
    url = str(tmp / "refused.zarr")
    build_serial(load_manifest(path), url, rir_cache=default_rir_cache(builds["first"]))
    plan = load_plan(url)
    bank = RirBank(default_rir_cache(builds["first"]))
    for spec in plan.rirs.values():
        assert isinstance(spec, AugmentedRirSpec)
        assert bank.load_rir(spec.rir_id)[1].augmented is False


def test_manifest_sections_validate(tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    with pytest.raises(ManifestError, match="did you mean 'probability'"):
        parse_manifest({**data, "augmentation": {"probabilty": 0.5}})
    with pytest.raises(ManifestError, match="minimum above its maximum"):
        parse_manifest({**data, "noise": {"snr_db": [30, 5]}})
    with pytest.raises(ManifestError, match="no noise to add"):
        parse_manifest({**data, "noise": {"colours": []}})
    with pytest.raises(ManifestError, match="rt60_factor"):
        parse_manifest({**data, "augmentation": {"rt60_factor": [0, 2]}})
    # A relative noise folder starts at the manifest's folder.
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({**data, "noise": {"files": "noise"}}))
    assert load_manifest(path).noise.files == str(tmp_path / "noise")  # type: ignore[union-attr]
    usable, bad = scan_noise_files(write_noise_dir(tmp_path / "noise"), "**/*.wav", FS)
    assert len(usable) == 1 and len(bad) == 2


def test_adding_noise_rerenders_only_the_noisy_examples(builds: dict) -> None:
    import shutil

    tmp = builds["tmp"]
    url = str(tmp / "incremental.zarr")
    shutil.copytree(builds["free"], url)
    noisy = small_demo(tmp, tmp / "noise", augmentation=AUGMENT, noise=dict(NOISE))
    report = build_serial(load_manifest(noisy), url, rir_cache=default_rir_cache(builds["first"]))
    plan = load_plan(url)
    n_noisy = sum(e.noise is not None for e in plan.examples)
    assert report["counts"]["examples_rendered"] == n_noisy
    assert report["counts"]["examples_kept"] == len(plan.examples) - n_noisy
    _, fresh = read(builds["first"])
    _, index = read(url)
    for name in fresh:
        np.testing.assert_array_equal(index[name], fresh[name], err_msg=name)
