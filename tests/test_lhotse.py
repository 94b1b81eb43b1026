"""Tests for Lhotse corpora (corpus.kind: lhotse, dereverb_data.lhotse_io).

The Lhotse manifests are made with Lhotse's own API (``Recording.from_file``,
``SupervisionSegment``, ``.to_file``) from wav files each test module writes itself, with the
usual bad files beside good ones. The rules under test: speakers come from the supervisions;
every recording that cannot be used is quarantined with its reason; a file gives the same
utterance (content hash, length) as through a folder corpus; plan, splits and build work as
for any corpus.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import yaml

pytest.importorskip("lhotse")  # an optional extra: without it, these tests are skipped

from lhotse import (
    AudioSource,
    Recording,
    RecordingSet,
    SupervisionSegment,
    SupervisionSet,
)

from dereverb_data import corpus as corpus_module
from dereverb_data.build import build_serial
from dereverb_data.corpus import AudioError, scan_corpus
from dereverb_data.manifest import (
    LhotseCorpus,
    ManifestError,
    load_manifest,
    parse_manifest,
)
from dereverb_data.preflight import check_corpus
from dereverb_data.verify import verify_store
from tests.conftest import run_cli

SR = 16000
SPEAKERS = [f"S{i}" for i in range(1, 7)]

# Quarantined recordings of the fixture corpus, and a phrase their reason must contain.
BAD = {
    "silent": "silent",
    "truncated": "truncated",
    "missing": "missing (no such file",
    "no-speaker": "no speaker: no supervision is for this recording",
    "unnamed": "no speaker: none of its supervisions names one",
    "two-speakers": "2 speakers",
    "remote": "source type 'url' is not supported",
    "left-channel": "channel subsets are not supported",
    "per-channel": "2 audio sources",
    "perturbed": "has audio transforms",
    "stale": "stale manifest",
    "S6-0-copy": "same audio file as recording 'S6-0'",
}


def _speech(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """A speech-like test signal: a few harmonics with a slow envelope plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    out = []
    for _ in range(channels):
        f0 = rng.uniform(90, 250)
        x = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6)) / k for k in range(1, 6))
        x = x * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
        x = x + 0.05 * rng.standard_normal(t.size)
        out.append(0.3 * x / np.max(np.abs(x)))
    data = np.stack(out, axis=1).astype(np.float32)
    return data[:, 0] if channels == 1 else data


def _wav(path: Path, data: np.ndarray, rate: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, subtype="PCM_16")
    return path


def _sup(recording: Recording, speaker: str | None, suffix: str = "") -> SupervisionSegment:
    return SupervisionSegment(
        id=f"{recording.id}-sup{suffix}",
        recording_id=recording.id,
        start=0.0,
        duration=recording.duration,
        speaker=speaker,
    )


def _write_corpus(root: Path) -> dict[str, Any]:
    """Audio under root/audio (folders named unlike the speakers, so a speaker can only come
    from the supervisions), Lhotse manifests under root/lhotse, the YAML at root/lhotse.yaml."""
    audio = root / "audio"
    recordings: list[Recording] = []
    supervisions: list[SupervisionSegment] = []

    def add(path: Path, speaker: str | None, recording_id: str | None = None) -> Recording:
        recording = Recording.from_file(path, recording_id=recording_id)
        recordings.append(recording)
        if speaker is not None:
            supervisions.append(_sup(recording, speaker))
        return recording

    seed = 0
    for n, speaker in enumerate(SPEAKERS):
        for i in range(2):
            seed += 1
            path = _wav(audio / f"batch{n % 2}" / f"{speaker}-{i}.wav", _speech(1.0, SR, seed))
            add(path, speaker)
    # A stereo file (downmixed) and a 48 kHz one (resampled), both usable.
    add(_wav(audio / "batch0" / "stereo.wav", _speech(1.2, SR, 101, channels=2)), "S1")
    add(_wav(audio / "batch1" / "hires.wav", _speech(1.1, 48000, 102), 48000), "S2")
    # A relative audio path: it starts at audio_root (by default the YAML manifest's folder).
    relative = add(_wav(audio / "rel" / "relative.wav", _speech(1.0, SR, 103)), "S3")
    relative.sources[0].source = "audio/rel/relative.wav"

    # Bad files.
    add(_wav(audio / "bad" / "silent.wav", np.zeros(SR, np.float32)), "S3")
    truncated = _wav(audio / "bad" / "truncated.wav", _speech(1.0, SR, 104))
    add(truncated, "S4")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    missing = _wav(audio / "bad" / "missing.wav", _speech(1.0, SR, 105))
    add(missing, "S4")
    missing.unlink()
    stale = _wav(audio / "bad" / "stale.wav", _speech(1.0, SR, 106))
    add(stale, "S5")
    _wav(stale, _speech(2.0, SR, 106))  # replaced by another file after `lhotse prepare`

    # Recordings that are not one whole local file with one speaker.
    add(_wav(audio / "bad" / "no-speaker.wav", _speech(1.0, SR, 107)), None)
    unnamed = add(_wav(audio / "bad" / "unnamed.wav", _speech(1.0, SR, 109)), None)
    supervisions.append(_sup(unnamed, None))
    two = add(_wav(audio / "bad" / "two-speakers.wav", _speech(1.0, SR, 108)), "S4")
    supervisions.append(_sup(two, "S5", suffix="b"))
    recordings.append(
        Recording(
            id="remote",
            sources=[AudioSource(type="url", channels=[0], source="https://example.org/a.wav")],
            sampling_rate=SR,
            num_samples=SR,
            duration=1.0,
        )
    )
    supervisions.append(_sup(recordings[-1], "S5"))
    stereo = Recording.from_file(audio / "batch0" / "stereo.wav", recording_id="left-channel")
    stereo.channel_ids = [0]
    recordings.append(stereo)
    supervisions.append(_sup(stereo, "S1"))
    left, right = (audio / "batch0" / f"S1-{i}.wav" for i in range(2))
    per_channel = Recording(
        id="per-channel",
        sources=[
            AudioSource(type="file", channels=[0], source=str(left)),
            AudioSource(type="file", channels=[1], source=str(right)),
        ],
        sampling_rate=SR,
        num_samples=SR,
        duration=1.0,
    )
    recordings.append(per_channel)
    supervisions.append(_sup(per_channel, "S1"))
    perturbed = Recording.from_file(audio / "batch1" / "S2-0.wav", recording_id="perturbed")
    recordings.append(perturbed.perturb_volume(factor=2.0, affix_id=False))
    supervisions.append(_sup(recordings[-1], "S2"))
    # A second id for a file already listed.
    add(audio / "batch1" / "S6-0.wav", "S6", recording_id="S6-0-copy")

    manifests = root / "lhotse"
    manifests.mkdir()
    RecordingSet.from_recordings(recordings).to_file(manifests / "recordings.jsonl.gz")
    SupervisionSet.from_segments(supervisions).to_file(manifests / "supervisions.jsonl.gz")
    data = {
        "name": "lhotse-unit",
        "seed": 7,
        "sample_rate": SR,
        "corpus": {
            "kind": "lhotse",
            "recordings": "lhotse/recordings.jsonl.gz",  # relative to the YAML file
            "supervisions": "lhotse/supervisions.jsonl.gz",
        },
        "variants_per_utterance": 1,
        "rooms": {
            "rooms_per_split": {"train": 1, "valid": 1, "test": 1},
            "positions_per_room": 1,
            "length_m": [3.5, 4.5],
            "width_m": [3.0, 4.0],
            "height_m": [2.5, 3.0],
            "rt60_s": [0.2, 0.4],
            "distance_m": [0.7, 1.5],
        },
        "storage": {"frames_per_chunk": 128, "frames_per_shard": 1024},
        "splits": {"train": 0.67, "valid": 0.17, "test": 0.16},
    }
    yaml_path = root / "lhotse.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    good = {f"{s}-{i}" for s in SPEAKERS for i in range(2)} | {"stereo", "hires", "relative"}
    speakers = {s.recording_id: s.speaker for s in supervisions if s.recording_id in good}
    return {"yaml": yaml_path, "data": data, "good": good, "speakers": speakers}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _write_corpus(tmp_path_factory.mktemp("lhotse-corpus"))


def _variant(corpus: dict[str, Any], folder: Path, **changes: Any) -> Path:
    """The fixture's YAML with corpus fields changed, written in ``folder`` (absolute paths)."""
    root = corpus["yaml"].parent
    data = {**corpus["data"], "corpus": {**corpus["data"]["corpus"]}}
    data["corpus"].update(
        {
            "recordings": str(root / "lhotse" / "recordings.jsonl.gz"),
            "supervisions": str(root / "lhotse" / "supervisions.jsonl.gz"),
            "audio_root": str(root),
        }
    )
    for key, value in changes.items():
        if value is None:
            data["corpus"].pop(key, None)
        else:
            data["corpus"][key] = value
    path = folder / "variant.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- scan


def test_speakers_come_from_supervisions_and_bad_recordings_are_quarantined(
    corpus: dict[str, Any],
) -> None:
    manifest = load_manifest(corpus["yaml"])
    assert isinstance(manifest.corpus, LhotseCorpus)
    assert Path(manifest.corpus.recordings).is_absolute()
    assert Path(manifest.corpus.audio_root or "") == corpus["yaml"].parent.resolve()
    utterances, quarantined = scan_corpus(manifest.corpus, manifest.sample_rate)

    by_id = {u.utterance_id: u for u in utterances}
    assert set(by_id) == corpus["good"]  # utterance ids are the Lhotse recording ids
    assert {i: u.speaker for i, u in by_id.items()} == corpus["speakers"]
    assert by_id["stereo"].channels == 2 and by_id["hires"].source_rate == 48000
    assert by_id["hires"].num_samples == round(1.1 * SR)
    assert Path(by_id["relative"].source) == corpus["yaml"].parent / "audio/rel/relative.wav"

    reasons = {}
    for q in quarantined:
        recording_id = q.reason.split("'")[1]  # "recording 'ID': ..."
        assert recording_id not in reasons, f"{recording_id} quarantined twice"
        reasons[recording_id] = q.reason
    assert set(reasons) == set(BAD)
    for recording_id, phrase in BAD.items():
        assert phrase in reasons[recording_id], reasons[recording_id]
    # File problems name the file, as for folder corpora.
    assert str(corpus["yaml"].parent / "audio/bad/silent.wav") in reasons["silent"]


def test_content_hashes_equal_a_folder_corpus_over_the_same_files(
    corpus: dict[str, Any],
) -> None:
    manifest = load_manifest(corpus["yaml"])
    lhotse_utts, _ = scan_corpus(manifest.corpus, SR)
    folder = parse_manifest(
        {
            **corpus["data"],
            "corpus": {"kind": "folder", "path": str(corpus["yaml"].parent / "audio")},
        }
    )
    folder_utts, _ = scan_corpus(folder.corpus, SR)
    by_source = {Path(u.source): u for u in folder_utts}
    for utterance in lhotse_utts:
        twin = by_source[Path(utterance.source)]
        assert (utterance.content_hash, utterance.num_samples, utterance.flags) == (
            twin.content_hash,
            twin.num_samples,
            twin.flags,
        )


def test_rescan_reads_only_changed_files(
    corpus: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = load_manifest(corpus["yaml"])
    cache: dict[str, dict] = {}
    first = scan_corpus(manifest.corpus, SR, cache)
    assert cache  # keyed by path, size and mtime, like a folder corpus's

    def no_reading(*args: Any) -> dict:
        raise AssertionError("a cached file was read again")

    monkeypatch.setattr(corpus_module, "_scan_file", no_reading)
    assert scan_corpus(manifest.corpus, SR, cache) == first


def test_speaker_fallback_reads_the_path(corpus: dict[str, Any], tmp_path: Path) -> None:
    path = _variant(corpus, tmp_path, speaker_fallback={"kind": "parent_dir", "level": 1})
    manifest = load_manifest(path)
    utterances, quarantined = scan_corpus(manifest.corpus, SR)
    speakers = {u.utterance_id: u.speaker for u in utterances}
    assert speakers["no-speaker"] == "bad"  # its folder: no supervision names a speaker
    assert speakers["S1-0"] == "S1"  # supervisions still win
    # Several speakers in one recording is never resolved by the fallback.
    assert any("'two-speakers'" in q.reason and "2 speakers" in q.reason for q in quarantined)


# --------------------------------------------------------------------------- build and plan


def test_build_from_a_lhotse_corpus(corpus: dict[str, Any], tmp_path: Path) -> None:
    url = str(tmp_path / "lhotse.zarr")
    report = build_serial(load_manifest(corpus["yaml"]), url)
    assert verify_store(url).problems == []
    import zarr

    group = zarr.open_group(url, mode="r")
    assert group.attrs["complete"]
    index = {k: group["index"][k][:] for k in ("utterance_id", "speaker", "split")}
    assert set(index["utterance_id"].tolist()) == corpus["good"]
    for utterance_id, speaker in zip(index["utterance_id"], index["speaker"], strict=True):
        assert speaker == corpus["speakers"][str(utterance_id)]
    splits_of: dict[str, set[str]] = {}
    for speaker, split in zip(index["speaker"], index["split"], strict=True):
        splits_of.setdefault(str(speaker), set()).add(str(split))
    assert all(len(s) == 1 for s in splits_of.values())  # speaker-disjoint
    assert {s for v in splits_of.values() for s in v} == {"train", "valid", "test"}
    reasons = " | ".join(q["reason"] for q in report["quarantined"])
    for recording_id, phrase in BAD.items():
        assert f"recording {recording_id!r}" in reasons and phrase in reasons


def test_cli_plan(corpus: dict[str, Any]) -> None:
    result = run_cli("plan", str(corpus["yaml"]))
    assert result.returncode == 0, result.stderr
    assert f'"utterances": {len(corpus["good"])}' in result.stdout
    assert "quarantined: recording 'silent'" in result.stdout
    assert "quarantined: recording 'remote'" in result.stdout


# --------------------------------------------------------------------------- errors


def test_no_supervisions_and_no_fallback_is_refused() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(
            {"name": "x", "seed": 1, "corpus": {"kind": "lhotse", "recordings": "r.jsonl"}},
            "cfg.yaml",
        )
    assert "corpus.supervisions" in str(info.value)


def test_unknown_lhotse_key_gets_a_suggestion() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(
            {
                "name": "x",
                "seed": 1,
                "corpus": {"kind": "lhotse", "recordings": "r.jsonl", "supervision": "s.jsonl"},
            },
            "cfg.yaml",
        )
    assert "corpus: unknown key 'supervision' (did you mean 'supervisions'?)" in str(info.value)


def test_corpus_option_is_refused_for_lhotse(corpus: dict[str, Any]) -> None:
    with pytest.raises(ManifestError, match=r"corpus\.recordings"):
        load_manifest(corpus["yaml"], corpus_path="/elsewhere")


def test_without_lhotse_installed_one_clear_error(
    corpus: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = load_manifest(corpus["yaml"])
    monkeypatch.setitem(sys.modules, "lhotse", None)  # import lhotse now raises ImportError
    with pytest.raises(ManifestError, match=r"pip install 'dereverb\[lhotse\]'"):
        load_manifest(corpus["yaml"])
    with pytest.raises(AudioError, match="needs the optional lhotse package"):
        scan_corpus(manifest.corpus, SR)
    with pytest.raises(AudioError, match="needs the optional lhotse package"):
        check_corpus(manifest)


def test_preflight_names_missing_or_wrong_manifest_files(
    corpus: dict[str, Any], tmp_path: Path
) -> None:
    check_corpus(load_manifest(corpus["yaml"]))  # the fixture passes
    missing = load_manifest(_variant(corpus, tmp_path, recordings=str(tmp_path / "no.jsonl.gz")))
    with pytest.raises(AudioError, match=r"corpus.recordings: .*no.jsonl.gz does not exist"):
        check_corpus(missing)
    with pytest.raises(AudioError, match=r"corpus\.recordings: .* does not exist"):
        scan_corpus(missing.corpus, SR)
    supervisions = str(corpus["yaml"].parent / "lhotse" / "supervisions.jsonl.gz")
    swapped = load_manifest(_variant(corpus, tmp_path, recordings=supervisions))
    with pytest.raises(AudioError, match="is a Lhotse SupervisionSet, not a RecordingSet"):
        check_corpus(swapped)
    with pytest.raises(AudioError, match="is a Lhotse SupervisionSet, not a RecordingSet"):
        scan_corpus(swapped.corpus, SR)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    broken = load_manifest(_variant(corpus, tmp_path, recordings=str(garbage)))
    with pytest.raises(AudioError, match=r"corpus\.recordings: .* not a readable JSONL"):
        check_corpus(broken)
    with pytest.raises(AudioError, match="not a readable Lhotse RecordingSet"):
        scan_corpus(broken.corpus, SR)
