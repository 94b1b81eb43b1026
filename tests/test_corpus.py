"""Tests for corpus ingest (dereverb_data.corpus) and the plan built from it (dereverb_data.plan).

Real audio files are written with soundfile into tmp_path. The rule under test: a bad file is
quarantined with a reason naming the file and the problem, never silently dropped, and every
good file beside it survives.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from dereverb_data import corpus as corpus_module
from dereverb_data.corpus import (
    AudioError,
    Quarantined,
    Utterance,
    load_utterance,
    read_audio,
    scan_corpus,
)
from dereverb_data.manifest import Manifest, parse_manifest
from dereverb_data.plan import assign_speaker_splits, make_plan

SR = 16000
ALL_AUDIO = "**/*.wav|**/*.flac|**/*.ogg"


def _signal(seconds: float, rate: int, seed: int, channels: int = 1, amp: float = 0.3):
    """A speech-like test signal: a few harmonics with a slow envelope plus a little noise."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    out = np.empty((n, channels), dtype=np.float32)
    for c in range(channels):
        f0 = rng.uniform(90, 250)
        x = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6)) / k for k in range(1, 6))
        x = x * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
        x = x + 0.05 * rng.standard_normal(n)
        out[:, c] = amp * x / np.max(np.abs(x))
    return out[:, 0] if channels == 1 else out


def _write(path: Path, data: np.ndarray, rate: int, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, **kwargs)
    return path


def _manifest(root: Path, corpus: dict[str, Any] | None = None, **top: Any) -> Manifest:
    data: dict[str, Any] = {
        "name": "unit",
        "seed": 5,
        "sample_rate": SR,
        "corpus": {"kind": "folder", "path": str(root), "pattern": ALL_AUDIO, **(corpus or {})},
        "rooms": {
            "rooms_per_split": {"train": 2, "valid": 1, "test": 1},
            "positions_per_room": 2,
        },
        **top,
    }
    return parse_manifest(data, "unit.yaml")


def _scan(manifest: Manifest) -> tuple[list[Utterance], list[Quarantined]]:
    return scan_corpus(manifest.corpus, manifest.sample_rate)


def _expected_length(path: Path, target_rate: int) -> int:
    """What soxr gives for this file's decoded length (the ingest must match it exactly)."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if rate == target_rate:
        return data.shape[0]
    return soxr.resample(np.zeros(data.shape[0], np.float32), rate, target_rate, "HQ").size


# --------------------------------------------------------------------------- good files

# relative path, source rate, channels, seconds, soundfile keyword arguments
MIXED = [
    ("alice/a1.wav", 16000, 1, 1.00, {"subtype": "PCM_16"}),
    ("alice/a2.flac", 44100, 2, 1.30, {}),
    ("bob/b1.ogg", 8000, 1, 0.90, {"format": "OGG", "subtype": "VORBIS"}),
    ("bob/b2.wav", 44100, 1, 0.70, {"subtype": "FLOAT"}),
    ("carol/c1.flac", 8000, 2, 1.10, {}),
    ("carol/c2.ogg", 44100, 2, 0.80, {"format": "OGG", "subtype": "VORBIS"}),
    ("carol/c3.wav", 8000, 1, 0.60, {"subtype": "PCM_24"}),
]


@pytest.fixture
def mixed_corpus(tmp_path: Path) -> Path:
    root = tmp_path / "mixed"
    for i, (rel, rate, channels, seconds, kwargs) in enumerate(MIXED):
        _write(root / rel, _signal(seconds, rate, seed=i, channels=channels), rate, **kwargs)
    return root


def test_mixed_rates_channels_and_formats_are_all_ingested(mixed_corpus: Path) -> None:
    manifest = _manifest(mixed_corpus)
    utterances, quarantined = _scan(manifest)
    assert quarantined == []
    assert len(utterances) == len(MIXED)
    by_id = {u.utterance_id: u for u in utterances}
    assert len(by_id) == len(MIXED)
    for rel, rate, channels, seconds, _ in MIXED:
        utt = by_id[str(Path(rel).with_suffix(""))]
        assert utt.source == str(mixed_corpus / rel)
        assert utt.source_rate == rate
        assert utt.channels == channels
        assert utt.speaker == rel.split("/")[0]
        assert utt.flags == ()
        # Resampled to the manifest rate: about duration * rate, exactly what soxr produces.
        assert abs(utt.num_samples - seconds * SR) <= 2, (rel, utt.num_samples)
        assert utt.num_samples == _expected_length(mixed_corpus / rel, SR), rel


def test_ingest_resamples_to_other_manifest_rates(mixed_corpus: Path) -> None:
    manifest = _manifest(mixed_corpus, sample_rate=8000)
    utterances, quarantined = _scan(manifest)
    assert quarantined == []
    for utt in utterances:
        path = Path(utt.source)
        assert utt.num_samples == _expected_length(path, 8000), path.name


def test_content_hashes_differ_per_file_and_are_stable(mixed_corpus: Path) -> None:
    manifest = _manifest(mixed_corpus)
    first, _ = _scan(manifest)
    again, _ = _scan(manifest)
    hashes = {u.utterance_id: u.content_hash for u in first}
    assert len(set(hashes.values())) == len(MIXED)
    assert {u.utterance_id: u.content_hash for u in again} == hashes
    assert first == again


def test_content_hash_follows_the_bytes(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _write(root / "s1/x.wav", _signal(0.6, SR, seed=1), SR)
    _write(root / "s2/y.wav", _signal(0.6, SR, seed=1), SR)  # same audio, other file
    _write(root / "s2/z.wav", _signal(0.6, SR, seed=2), SR)
    utterances, _ = _scan(_manifest(root))
    h = {u.utterance_id: u.content_hash for u in utterances}
    assert h["s1/x"] == h["s2/y"]
    assert h["s1/x"] != h["s2/z"]


def test_limit_takes_the_first_files_in_sorted_order(mixed_corpus: Path) -> None:
    utterances, quarantined = _scan(_manifest(mixed_corpus, {"limit": 3}))
    assert quarantined == []
    expected = sorted(str(Path(rel).with_suffix("")) for rel, *_ in MIXED)[:3]
    assert sorted(u.utterance_id for u in utterances) == expected


# --------------------------------------------------------------------------- speaker rules


def _speaker_layout(root: Path) -> dict[str, dict[str, str]]:
    """Files at <speaker>/<session>/<code>_<n>.wav; returns the expected id per rule."""
    expected: dict[str, dict[str, str]] = {}
    i = 0
    for speaker, code in (("alice", "AL"), ("bob", "BO")):
        for session in ("s1", "s2"):
            for n in (1, 2):
                rel = f"{speaker}/{session}/{code}_{n:02d}.wav"
                _write(root / rel, _signal(0.6, SR, seed=100 + i), SR)
                i += 1
                expected[rel] = {
                    "level1": session,
                    "level2": speaker,
                    "prefix": code,
                    "regex": f"{code}-{n}",
                }
    return expected


@pytest.mark.parametrize(
    ("rule_name", "rule"),
    [
        ("level1", {"kind": "parent_dir", "level": 1}),
        ("level2", {"kind": "parent_dir", "level": 2}),
        ("prefix", {"kind": "filename_prefix", "separator": "_"}),
        ("regex", {"kind": "regex", "regex": r"/(AL|BO)_0(\d)\.wav$"}),
    ],
)
def test_speaker_id_rules(tmp_path: Path, rule_name: str, rule: dict[str, Any]) -> None:
    root = tmp_path / "spk"
    expected = _speaker_layout(root)
    utterances, quarantined = _scan(_manifest(root, {"speaker": rule}))
    assert quarantined == []
    assert len(utterances) == len(expected)
    got = {str(Path(u.source).relative_to(root)): u.speaker for u in utterances}
    if rule_name == "regex":
        # The first group is the speaker id: "AL" / "BO".
        want = {rel: ids["regex"].split("-")[0] for rel, ids in expected.items()}
    else:
        want = {rel: ids[rule_name] for rel, ids in expected.items()}
    assert got == want


def test_speaker_rule_that_cannot_apply_quarantines_only_that_file(tmp_path: Path) -> None:
    root = tmp_path / "spk"
    _write(root / "alice/a.wav", _signal(0.6, SR, seed=1), SR)
    _write(root / "bob/b.wav", _signal(0.6, SR, seed=2), SR)
    _write(root / "loose.wav", _signal(0.6, SR, seed=3), SR)  # no folder above it
    utterances, quarantined = _scan(_manifest(root, {"speaker": {"kind": "parent_dir"}}))
    assert sorted(u.speaker for u in utterances) == ["alice", "bob"]
    assert len(quarantined) == 1
    assert quarantined[0].source == str(root / "loose.wav")
    assert "loose.wav" in quarantined[0].reason
    assert "speaker" in quarantined[0].reason


def test_speaker_regex_without_match_quarantines_only_that_file(tmp_path: Path) -> None:
    root = tmp_path / "spk"
    _write(root / "spk01_a.wav", _signal(0.6, SR, seed=1), SR)
    _write(root / "spk02_b.wav", _signal(0.6, SR, seed=2), SR)
    _write(root / "other.wav", _signal(0.6, SR, seed=3), SR)
    rule = {"kind": "regex", "regex": r"(spk\d+)_"}
    utterances, quarantined = _scan(_manifest(root, {"speaker": rule}))
    assert sorted(u.speaker for u in utterances) == ["spk01", "spk02"]
    assert [q.source for q in quarantined] == [str(root / "other.wav")]
    assert "other.wav" in quarantined[0].reason
    assert "does not match" in quarantined[0].reason


def test_filename_prefix_without_separator_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "spk"
    _write(root / "spk1_001.wav", _signal(0.6, SR, seed=1), SR)
    _write(root / "spk1-002.wav", _signal(0.6, SR, seed=2), SR)
    rule = {"kind": "filename_prefix", "separator": "_"}
    utterances, quarantined = _scan(_manifest(root, {"speaker": rule}))
    assert [u.speaker for u in utterances] == ["spk1"]
    assert [q.source for q in quarantined] == [str(root / "spk1-002.wav")]
    assert "spk1-002.wav" in quarantined[0].reason


def test_speaker_regex_with_empty_group_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "spk"
    _write(root / "spk1_001.wav", _signal(0.6, SR, seed=1), SR)
    _write(root / "x_002.wav", _signal(0.6, SR, seed=2), SR)
    manifest = _manifest(root, {"speaker": {"kind": "regex", "regex": r"(spk\d+)?"}})
    utterances, quarantined = _scan(manifest)
    assert [u.speaker for u in utterances] == ["spk1"]
    assert [Path(q.source).name for q in quarantined] == ["x_002.wav"]
    assert len(make_plan(manifest, utterances, quarantined).utterances) == 1


# --------------------------------------------------------------------------- downmix


@pytest.mark.parametrize("rate", [SR, 44100])
def test_downmix_mean_versus_first(tmp_path: Path, rate: int) -> None:
    root = tmp_path / "stereo"
    left = _signal(0.8, rate, seed=1, amp=0.5)
    right = _signal(0.8, rate, seed=2, amp=0.2)
    path = _write(root / "spk/st.wav", np.stack([left, right], axis=1), rate, subtype="FLOAT")

    def expected(mono: np.ndarray) -> np.ndarray:
        mono = mono.astype(np.float32)
        return mono if rate == SR else soxr.resample(mono, rate, SR, "HQ")

    loaded = {}
    for policy in ("mean", "first"):
        manifest = _manifest(root, {"downmix": policy})
        utterances, quarantined = _scan(manifest)
        assert quarantined == []
        (utt,) = utterances
        assert utt.channels == 2
        loaded[policy] = load_utterance(utt, manifest.sample_rate, policy)
        assert loaded[policy].size == utt.num_samples
    np.testing.assert_allclose(loaded["mean"], expected((left + right) / 2), atol=1e-6)
    np.testing.assert_allclose(loaded["first"], expected(left), atol=1e-6)
    assert np.max(np.abs(loaded["mean"] - loaded["first"])) > 0.05
    signal, source_rate, channels = read_audio(path, SR, "first")
    assert (source_rate, channels) == (rate, 2)
    np.testing.assert_array_equal(signal, loaded["first"])


# --------------------------------------------------------------------------- bad files


@pytest.fixture
def corpus_with_bad_files(tmp_path: Path) -> tuple[Path, list[str], dict[str, str]]:
    """Three good files and one bad file per problem; returns (root, good ids, bad problems)."""
    root = tmp_path / "bad"
    good = ["spk1/good1", "spk1/good2", "spk2/good3"]
    for i, rel in enumerate(good):
        _write(root / f"{rel}.wav", _signal(0.8 + 0.1 * i, SR, seed=i), SR)
    bad: dict[str, str] = {}

    unreadable = root / "spk1/unreadable.wav"
    unreadable.write_bytes(np.random.default_rng(1234).bytes(4096))
    bad["spk1/unreadable.wav"] = "unreadable"

    _write(root / "spk1/empty.wav", np.zeros(0, np.float32), SR)
    bad["spk1/empty.wav"] = "empty"

    _write(root / "spk2/short.wav", _signal(0.2, SR, seed=10), SR)
    bad["spk2/short.wav"] = "too short"

    _write(root / "spk2/long.flac", _signal(2.5, SR, seed=11), SR)
    bad["spk2/long.flac"] = "too long"

    _write(root / "spk2/zeros.wav", np.zeros(SR, np.float32), SR)
    bad["spk2/zeros.wav"] = "silent"

    quiet = np.sin(2 * np.pi * 440 * np.arange(SR) / SR).astype(np.float32) * 10 ** (-70 / 20)
    _write(root / "spk3/quiet.wav", quiet, SR, subtype="FLOAT")
    bad["spk3/quiet.wav"] = "silent"

    nan = _signal(0.8, SR, seed=12)
    nan[100:110] = np.nan
    _write(root / "spk3/nan.wav", nan, SR, subtype="FLOAT")
    bad["spk3/nan.wav"] = "NaN"

    (root / "spk3/notes.txt").write_text("transcript, not audio\n")
    bad["spk3/notes.txt"] = "not a wav/flac/ogg"
    return root, good, bad


def test_bad_files_are_quarantined_with_reasons_and_good_files_survive(
    corpus_with_bad_files: tuple[Path, list[str], dict[str, str]],
) -> None:
    root, good, bad = corpus_with_bad_files
    pattern = ALL_AUDIO + "|**/*.txt"
    manifest = _manifest(root, {"pattern": pattern, "max_duration_s": 2.0})
    utterances, quarantined = _scan(manifest)

    assert sorted(u.utterance_id for u in utterances) == good
    # Nothing is lost: every matched file is either an utterance or quarantined, once.
    assert len(utterances) + len(quarantined) == len(good) + len(bad)
    reasons = {q.source: q.reason for q in quarantined}
    assert len(reasons) == len(quarantined)
    assert set(reasons) == {str(root / rel) for rel in bad}
    for rel, problem in bad.items():
        reason = reasons[str(root / rel)]
        assert str(root / rel) in reason, reason
        assert problem in reason, reason
        assert "\n" not in reason


def test_silence_reason_reports_the_level(
    corpus_with_bad_files: tuple[Path, list[str], dict[str, str]],
) -> None:
    root, _, _ = corpus_with_bad_files
    _, quarantined = _scan(_manifest(root, {"max_duration_s": 2.0}))
    reasons = {Path(q.source).name: q.reason for q in quarantined}
    assert "-70 dBFS" in reasons["quiet.wav"]
    assert "-inf dBFS" in reasons["zeros.wav"]


def test_duration_limits_are_the_manifests(tmp_path: Path) -> None:
    root = tmp_path / "dur"
    for i, seconds in enumerate((0.3, 0.6, 1.2, 2.4)):
        _write(root / f"spk/u{i}.wav", _signal(seconds, SR, seed=i), SR)
    loose, quarantined = _scan(_manifest(root, {"min_duration_s": 0.25, "max_duration_s": 3}))
    assert (len(loose), len(quarantined)) == (4, 0)
    strict, quarantined = _scan(_manifest(root, {"min_duration_s": 0.5, "max_duration_s": 2}))
    assert sorted(u.utterance_id for u in strict) == ["spk/u1", "spk/u2"]
    assert sorted(Path(q.source).name for q in quarantined) == ["u0.wav", "u3.wav"]


def test_clipped_file_is_flagged_but_kept(tmp_path: Path) -> None:
    root = tmp_path / "clip"
    loud = np.clip(_signal(0.8, SR, seed=3, amp=3.0), -1.0, 1.0)
    _write(root / "spk/clipped.wav", loud, SR)
    _write(root / "spk/clean.wav", _signal(0.8, SR, seed=4), SR)
    utterances, quarantined = _scan(_manifest(root))
    assert quarantined == []
    flags = {u.utterance_id: u.flags for u in utterances}
    assert "clipped" in flags["spk/clipped"]
    assert flags["spk/clean"] == ()


def test_folder_without_matching_files_names_path_and_pattern(tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    root.mkdir()
    (root / "readme.txt").write_text("no audio here")
    with pytest.raises(AudioError) as info:
        _scan(_manifest(root))
    assert str(root) in str(info.value)
    assert "no files match" in str(info.value)
    assert "**/*.wav" in str(info.value)


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    root = tmp_path / "does" / "not" / "exist"
    with pytest.raises(AudioError) as info:
        _scan(_manifest(root))
    assert str(root) in str(info.value)
    assert "not a folder" in str(info.value)


def test_same_stem_with_two_suffixes_is_not_silently_merged(tmp_path: Path) -> None:
    root = tmp_path / "dup"
    _write(root / "spk/a.wav", _signal(0.6, SR, seed=1), SR)
    _write(root / "spk/a.flac", _signal(0.7, SR, seed=2), SR)
    _write(root / "spk2/b.wav", _signal(0.6, SR, seed=3), SR)
    manifest = _manifest(root)
    utterances, quarantined = _scan(manifest)
    assert len(utterances) + len(quarantined) == 3
    ids = [u.utterance_id for u in utterances]
    assert len(set(ids)) == len(ids), ids
    plan = make_plan(manifest, utterances, quarantined)
    example_ids = [e.example_id for e in plan.examples]
    assert len(set(example_ids)) == len(example_ids)
    assert len(plan.utterances) + len(plan.quarantined) == 3


# --------------------------------------------------------------------------- load_utterance


def test_load_utterance_returns_exactly_the_scanned_samples(mixed_corpus: Path) -> None:
    manifest = _manifest(mixed_corpus)
    utterances, _ = _scan(manifest)
    for utt in utterances:
        signal = load_utterance(utt, manifest.sample_rate, manifest.corpus.downmix)
        assert signal.dtype == np.float32
        assert signal.ndim == 1
        assert signal.size == utt.num_samples
        assert np.all(np.isfinite(signal))
        again = load_utterance(utt, manifest.sample_rate, manifest.corpus.downmix)
        np.testing.assert_array_equal(signal, again)


def test_load_utterance_refuses_a_file_changed_after_scanning(tmp_path: Path) -> None:
    root = tmp_path / "changed"
    path = _write(root / "spk/u.wav", _signal(0.8, SR, seed=1), SR)
    _write(root / "spk/v.wav", _signal(0.8, SR, seed=2), SR)
    manifest = _manifest(root)
    utterances, _ = _scan(manifest)
    by_id = {u.utterance_id: u for u in utterances}
    assert load_utterance(by_id["spk/u"], SR).size == by_id["spk/u"].num_samples

    # Same length, different content: only the content hash can tell.
    _write(path, _signal(0.8, SR, seed=99), SR)
    with pytest.raises(AudioError) as info:
        load_utterance(by_id["spk/u"], SR)
    assert str(path) in str(info.value)
    assert "changed" in str(info.value)
    # The untouched file beside it still loads.
    assert load_utterance(by_id["spk/v"], SR).size == by_id["spk/v"].num_samples


def test_load_utterance_refuses_a_stale_length(tmp_path: Path) -> None:
    root = tmp_path / "stale"
    _write(root / "spk/u.wav", _signal(0.8, SR, seed=1), SR)
    (utt,), _ = _scan(_manifest(root))
    wrong = Utterance(**{**utt.to_dict(), "num_samples": utt.num_samples + 1})
    with pytest.raises(AudioError) as info:
        load_utterance(wrong, SR)
    assert utt.source in str(info.value)
    assert str(utt.num_samples + 1) in str(info.value)


# --------------------------------------------------------------------------- plan level

SPEAKERS = ["ann", "ben", "cid", "dee", "eve", "fay", "gus"]


@pytest.fixture
def plan_corpus(tmp_path: Path) -> Path:
    """Seven speakers x two short utterances, one overlong file and one unreadable file."""
    root = tmp_path / "plan"
    i = 0
    for speaker in SPEAKERS:
        for n in range(2):
            _write(root / f"{speaker}/{speaker}{n}.wav", _signal(0.6 + 0.1 * n, SR, seed=i), SR)
            i += 1
    _write(root / "ann/huge.wav", _signal(2.5, SR, seed=50), SR)
    (root / "ben/junk.wav").write_bytes(b"RIFF not really a wave file" * 20)
    return root


def _plan_manifest(root: Path, **top: Any) -> Manifest:
    # A shard of 256 frames x hop 128 holds 32,640 samples (2.04 s) including the 0.25 s tail.
    storage = {"frames_per_chunk": 64, "frames_per_shard": 256}
    splits = {"train": 0.6, "valid": 0.2, "test": 0.2}
    return _manifest(root, storage=storage, splits=splits, **top)


def test_plan_quarantines_utterance_longer_than_a_shard(plan_corpus: Path) -> None:
    manifest = _plan_manifest(plan_corpus)
    utterances, scan_quarantined = _scan(manifest)
    assert len(utterances) == 2 * len(SPEAKERS) + 1
    assert [Path(q.source).name for q in scan_quarantined] == ["junk.wav"]

    plan = make_plan(manifest, utterances, scan_quarantined)
    huge = str(plan_corpus / "ann/huge.wav")
    assert "ann/huge" not in plan.utterances
    assert len(plan.utterances) == 2 * len(SPEAKERS)
    # The scan's quarantine is kept, the plan's is added.
    assert [q.source for q in plan.quarantined] == [scan_quarantined[0].source, huge]
    reason = plan.quarantined[1].reason
    assert huge in reason
    assert "frames_per_shard" in reason
    assert len(plan.examples) == 2 * len(SPEAKERS) * manifest.variants_per_utterance
    assert {e.utterance_id for e in plan.examples} == set(plan.utterances)
    assert len({e.example_id for e in plan.examples}) == len(plan.examples)
    # Every example lies inside its shard.
    fps = manifest.storage.frames_per_shard
    for e in plan.examples:
        assert e.shard * fps <= e.frame_offset
        assert e.frame_offset + e.frame_count <= (e.shard + 1) * fps
    assert len(plan.shards) > 1
    assert sum(len(s.example_ids) for s in plan.shards) == len(plan.examples)


def test_plan_speaker_splits_are_disjoint_and_cover_every_split(plan_corpus: Path) -> None:
    manifest = _plan_manifest(plan_corpus)
    plan = make_plan(manifest, *_scan(manifest))
    assert set(plan.speaker_splits) == set(SPEAKERS)
    assert set(plan.speaker_splits.values()) == {"train", "valid", "test"}
    splits_of_speaker: dict[str, set[str]] = defaultdict(set)
    for e in plan.examples:
        splits_of_speaker[e.speaker].add(e.split)
        assert e.split == plan.speaker_splits[e.speaker]
    assert all(len(s) == 1 for s in splits_of_speaker.values())
    per_split = defaultdict(set)
    for speaker, split in plan.speaker_splits.items():
        per_split[split].add(speaker)
    assert per_split["train"].isdisjoint(per_split["valid"] | per_split["test"])
    assert per_split["valid"].isdisjoint(per_split["test"])


@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.8, "valid": 0.1, "test": 0.1},
        {"train": 0.98, "valid": 0.01, "test": 0.01},
        {"train": 0.34, "valid": 0.33, "test": 0.33},
        {"train": 0.9, "valid": 0.1, "test": 0.0},
    ],
)
def test_every_positive_split_gets_a_speaker_when_there_are_enough(
    tmp_path: Path, fractions: dict[str, float]
) -> None:
    manifest = _manifest(tmp_path, splits=fractions)
    positive = {name for name, f in fractions.items() if f > 0}
    for n in range(1, 25):
        speakers = [f"spk{i:02d}" for i in range(n)]
        splits = assign_speaker_splits(speakers, manifest)
        assert set(splits) == set(speakers)
        assert set(splits.values()) <= positive
        if n >= len(positive):
            assert set(splits.values()) == positive, (n, splits)
        # Order of the speaker list does not matter.
        assert assign_speaker_splits(list(reversed(speakers)), manifest) == splits


def test_rooms_of_different_splits_are_distinct(plan_corpus: Path) -> None:
    manifest = _plan_manifest(plan_corpus)
    plan = make_plan(manifest, *_scan(manifest))
    ids: dict[str, set[str]] = defaultdict(set)
    specs: dict[str, set[str]] = defaultdict(set)
    for room_id, room in plan.rooms.items():
        assert room.room_id == room_id
        ids[room.split].add(room_id)
        specs[room.split].add(room.spec_hash)
    assert {split: len(v) for split, v in ids.items()} == {"train": 2, "valid": 1, "test": 1}
    for a in ("train", "valid", "test"):
        for b in ("train", "valid", "test"):
            if a < b:
                assert ids[a].isdisjoint(ids[b])
                assert specs[a].isdisjoint(specs[b])
    for e in plan.examples:
        assert plan.rooms[e.room_id].split == e.split
        assert plan.rirs[e.rir_id].room.room_id == e.room_id


def _plan_signature(plan: Any) -> dict[str, Any]:
    return {
        "examples": plan.examples,
        "shards": plan.shards,
        "speaker_splits": plan.speaker_splits,
        "rooms": plan.rooms,
        "rirs": sorted(plan.rirs),
        "utterances": sorted(plan.utterances),
        "quarantined": plan.quarantined,
    }


def test_plan_does_not_depend_on_input_order(plan_corpus: Path) -> None:
    manifest = _plan_manifest(plan_corpus)
    utterances, quarantined = _scan(manifest)
    reference = make_plan(manifest, utterances, quarantined)
    signature = _plan_signature(reference)
    for seed in (1, 2):
        shuffled = list(utterances)
        random.Random(seed).shuffle(shuffled)
        assert shuffled != utterances
        other = make_plan(manifest, shuffled, quarantined)
        assert _plan_signature(other) == signature
    reversed_plan = make_plan(manifest, list(reversed(utterances)), quarantined)
    assert _plan_signature(reversed_plan) == signature
    # Each example keeps its id, RIR, shard, offset and fingerprint one by one.
    for a, b in zip(reference.examples, reversed_plan.examples, strict=True):
        assert (a.example_id, a.rir_id, a.shard, a.frame_offset, a.fingerprint) == (
            b.example_id,
            b.rir_id,
            b.shard,
            b.frame_offset,
            b.fingerprint,
        )


def test_plan_changes_with_the_seed(plan_corpus: Path) -> None:
    # Control for the order test: the signature is sensitive to what the plan depends on.
    a = _plan_manifest(plan_corpus)
    b = _plan_manifest(plan_corpus, seed=6)
    utterances, quarantined = _scan(a)
    plan_a = make_plan(a, utterances, quarantined)
    plan_b = make_plan(b, utterances, quarantined)
    assert {e.rir_id for e in plan_a.examples} != {e.rir_id for e in plan_b.examples}
    assert [e.fingerprint for e in plan_a.examples] != [e.fingerprint for e in plan_b.examples]


# --------------------------------------------------------------------------- scan cache


def test_scan_cache_gives_the_same_result_without_reading_unchanged_files(
    corpus_with_bad_files: tuple[Path, list[str], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, good, bad = corpus_with_bad_files
    manifest = _manifest(root, {"pattern": ALL_AUDIO + "|**/*.txt", "max_duration_s": 2.0})
    cache: dict[str, dict] = {}
    first = scan_corpus(manifest.corpus, manifest.sample_rate, cache)
    assert len(cache) == len(good) + len(bad)  # quarantine reasons are kept too

    reads: list[str] = []
    real_read = corpus_module.read_audio
    monkeypatch.setattr(
        corpus_module, "read_audio", lambda path, *a: reads.append(str(path)) or real_read(path, *a)
    )
    again = scan_corpus(manifest.corpus, manifest.sample_rate, cache)
    assert again == first
    assert reads == []

    # A rewritten file is read again and gets its new hash; a deleted one leaves the cache.
    changed = next(root.glob(good[0] + ".*"))
    _write(changed, _signal(1.0, SR, seed=99), SR)
    removed = next(root.glob(good[1] + ".*"))
    removed.unlink()
    third, _ = scan_corpus(manifest.corpus, manifest.sample_rate, cache)
    assert reads == [str(changed)]
    by_id = {u.utterance_id: u for u in third}
    assert good[1] not in by_id and len(cache) == len(good) + len(bad) - 1
    old_hash = {u.utterance_id: u.content_hash for u in first[0]}[good[0]]
    assert by_id[good[0]].content_hash != old_hash


def test_scan_cache_is_not_shared_across_scan_settings(mixed_corpus: Path) -> None:
    cache: dict[str, dict] = {}
    at_16k, _ = scan_corpus(_manifest(mixed_corpus).corpus, 16000, cache)
    at_8k, _ = scan_corpus(_manifest(mixed_corpus).corpus, 8000, cache)
    lengths = {u.utterance_id: u.num_samples for u in at_16k}
    for u in at_8k:
        assert abs(u.num_samples * 2 - lengths[u.utterance_id]) <= 2


def test_load_utterance_decodes_once_and_shares_a_read_only_array(mixed_corpus: Path) -> None:
    from dereverb_data import corpus as corpus_module

    # The build renders each utterance once per variant: the decode cache hands the same
    # samples back, read-only, so no caller can change what the next variant gets.
    manifest = _manifest(mixed_corpus)
    utt = _scan(manifest)[0][0]
    first = load_utterance(utt, manifest.sample_rate, manifest.corpus.downmix)
    again = load_utterance(utt, manifest.sample_rate, manifest.corpus.downmix)
    assert again is first and not first.flags.writeable
    with pytest.raises(ValueError):
        first[0] = 1.0
    corpus_module._decoded.clear()  # decoded afresh: the same samples
    fresh = load_utterance(utt, manifest.sample_rate, manifest.corpus.downmix)
    assert fresh is not first
    np.testing.assert_array_equal(fresh, first)
