"""Tests for the synthetic demo corpus (dereverb_data.demo_corpus)."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from dereverb_data.demo_corpus import (
    DEMO_SPEAKER_PROFILES,
    DEMO_SPEAKERS,
    DemoUtterance,
    demo_speaker,
    demo_utterances,
    synthesize_utterance,
    utterance_segments,
)

SR = 16000
FRAME_S = 0.02
REPO_ROOT = Path(__file__).resolve().parents[1]


@cache
def _utterance(speaker: str, index: int, sample_rate: int = SR) -> np.ndarray:
    x = synthesize_utterance(speaker, index, sample_rate)
    x.setflags(write=False)  # shared between tests
    return x


def _frames(x: np.ndarray, sample_rate: int, frame_s: float = FRAME_S) -> np.ndarray:
    n = round(frame_s * sample_rate)
    count = x.size // n
    return x[: count * n].astype(np.float64).reshape(count, n)


def _energy_db(frames: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.mean(frames**2, axis=1) + 1e-20)


def _zero_crossing_rate(frames: np.ndarray) -> np.ndarray:
    return np.mean(np.signbit(frames[:, 1:]) != np.signbit(frames[:, :-1]), axis=1)


def _high_frequency_fraction(frames: np.ndarray, sample_rate: int, cutoff_hz: float) -> np.ndarray:
    power = np.abs(np.fft.rfft(frames * np.hanning(frames.shape[1]), axis=1)) ** 2
    freqs = np.fft.rfftfreq(frames.shape[1], 1.0 / sample_rate)
    return power[:, freqs >= cutoff_hz].sum(axis=1) / (power.sum(axis=1) + 1e-30)


def _estimate_f0(frame: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """Autocorrelation F0 in 50-500 Hz; returns (f0_hz, normalised peak height)."""
    x = frame - frame.mean()
    spectrum = np.fft.rfft(x, 2 * x.size)
    ac = np.fft.irfft(np.abs(spectrum) ** 2)[: x.size]
    ac /= ac[0]
    lo, hi = int(sample_rate / 500), int(sample_rate / 50)
    lag = lo + int(np.argmax(ac[lo : hi + 1]))
    return sample_rate / lag, float(ac[lag])


def _voiced_f0s(speaker: str, index: int, sample_rate: int = SR, duration_s=None) -> np.ndarray:
    """(f0, peak) for the central 40 ms of every voiced segment of at least 80 ms."""
    if duration_s is None:
        x = _utterance(speaker, index, sample_rate)
    else:
        x = synthesize_utterance(speaker, index, sample_rate, duration_s)
    half = int(0.02 * sample_rate)
    out = []
    for seg in utterance_segments(speaker, index, duration_s):
        if seg.kind == "voiced" and seg.end_s - seg.start_s >= 0.08:
            centre = int(0.5 * (seg.start_s + seg.end_s) * sample_rate)
            out.append(_estimate_f0(x[centre - half : centre + half], sample_rate))
    return np.array(out)


def _kind_frames(speaker: str, index: int, kind: str, margin_s: float = 0.02) -> np.ndarray:
    """20 ms frames lying inside segments of ``kind`` (at least ``margin_s`` from the edges)."""
    x = _utterance(speaker, index)
    n = int(FRAME_S * SR)
    rows = []
    for seg in utterance_segments(speaker, index):
        if seg.kind != kind:
            continue
        start = math.ceil((seg.start_s + margin_s) * SR)
        stop = int((seg.end_s - margin_s) * SR)
        for i in range(start, stop - n + 1, n):
            rows.append(x[i : i + n])
    return np.array(rows, dtype=np.float64).reshape(-1, n)


# --------------------------------------------------------------------------------------------
# speakers and utterance lists


def test_speakers_and_profiles() -> None:
    assert len(DEMO_SPEAKERS) == 6 == len(set(DEMO_SPEAKERS))
    assert tuple(DEMO_SPEAKER_PROFILES) == DEMO_SPEAKERS
    sexes = [DEMO_SPEAKER_PROFILES[s].sex for s in DEMO_SPEAKERS]
    assert sexes.count("female") == 3 and sexes.count("male") == 3
    assert sexes[:2] == ["female", "male"]  # any prefix is roughly balanced
    for name in DEMO_SPEAKERS:
        profile = demo_speaker(name)
        lo, hi = profile.f0_range_hz
        assert profile.name == name and 50 < lo < profile.f0_mean_hz < hi < 500
    lowest_female = min(p.f0_mean_hz for p in DEMO_SPEAKER_PROFILES.values() if p.sex == "female")
    highest_male = max(p.f0_mean_hz for p in DEMO_SPEAKER_PROFILES.values() if p.sex == "male")
    assert lowest_female > 1.3 * highest_male
    with pytest.raises(TypeError):
        DEMO_SPEAKER_PROFILES["demo_x"] = DEMO_SPEAKER_PROFILES["demo_f1"]  # type: ignore[index]


def test_demo_utterances_order_and_ids() -> None:
    utts = demo_utterances()
    assert len(utts) == 24
    assert utts[0] == DemoUtterance("demo_f1_000", "demo_f1", 0)
    assert utts[5] == DemoUtterance("demo_m1_001", "demo_m1", 1)
    assert [u.speaker for u in utts[::4]] == list(DEMO_SPEAKERS)
    assert len({u.utterance_id for u in utts}) == 24
    assert demo_utterances(2, 3) == utts[:3] + utts[4:7]
    assert demo_utterances(1, 1) == [DemoUtterance("demo_f1_000", "demo_f1", 0)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_speakers": 7}, r"n_speakers.*1\.\.6.*got 7"),
        ({"n_speakers": 0}, r"n_speakers.*got 0"),
        ({"n_speakers": 2.0}, r"got 2\.0"),
        ({"utterances_per_speaker": 0}, r"utterances_per_speaker.*got 0"),
        ({"utterances_per_speaker": -3}, r"got -3"),
    ],
)
def test_demo_utterances_rejects_bad_counts(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        demo_utterances(**kwargs)


# --------------------------------------------------------------------------------------------
# determinism


def test_deterministic_and_bit_identical() -> None:
    a = synthesize_utterance("demo_m2", 3)
    synthesize_utterance("demo_f3", 1)  # no hidden global state between calls
    b = synthesize_utterance("demo_m2", 3)
    assert a.dtype == np.float32 and a.ndim == 1
    assert a.tobytes() == b.tobytes()
    assert utterance_segments("demo_m2", 3) == utterance_segments("demo_m2", 3)


def test_deterministic_across_processes_and_hash_seeds() -> None:
    """Seeds must not come from Python's salted hash(): a fresh interpreter gives the same bytes."""
    code = (
        "import hashlib; from dereverb_data.demo_corpus import synthesize_utterance as s; "
        "print(hashlib.sha256(s('demo_f2', 7, 8000).tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    local = hashlib.sha256(synthesize_utterance("demo_f2", 7, 8000).tobytes()).hexdigest()
    assert out.stdout.strip() == local


def test_plan_is_pinned() -> None:
    """The timing plan only involves seeded draws and Python float arithmetic, so it is exactly
    reproducible everywhere.  If you change the generator on purpose, bump CORPUS_VERSION and
    update these numbers."""
    segments = utterance_segments("demo_f1", 0)
    assert segments[-1].end_s == 3.699
    assert len(segments) == 39
    assert [seg.kind for seg in segments[:3]] == ["pause", "unvoiced", "voiced"]
    assert segments[1].start_s == pytest.approx(0.126542748, abs=1e-9)
    assert synthesize_utterance("demo_f1", 0).size == 59184


def test_different_utterances_differ() -> None:
    signals = {(s, i): _utterance(s, i) for s in DEMO_SPEAKERS[:3] for i in range(2)}
    digests = {hashlib.sha256(x.tobytes()).hexdigest() for x in signals.values()}
    assert len(digests) == len(signals)
    a, b = _utterance("demo_f1", 0), _utterance("demo_f1", 1)
    n = min(a.size, b.size)
    assert abs(np.corrcoef(a[:n], b[:n])[0, 1]) < 0.3
    durations = {x.size for x in signals.values()}
    assert len(durations) > 1  # default durations vary per utterance


# --------------------------------------------------------------------------------------------
# signal properties


@pytest.mark.parametrize("speaker", DEMO_SPEAKERS)
def test_level_pauses_and_default_duration(speaker: str) -> None:
    for index in range(2):
        x = _utterance(speaker, index)
        assert np.all(np.isfinite(x))
        assert np.max(np.abs(x)) <= 1.0
        assert np.max(np.abs(x)) == pytest.approx(0.5, abs=0.01)
        assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) > 0.02  # not silent
        assert 2.0 <= x.size / SR <= 4.0
        energy = _energy_db(_frames(x, SR))
        median = np.median(energy)
        # Pauses: a good share of frames sit far (>= 30 dB) below the median frame ...
        assert np.mean(energy < median - 30.0) > 0.1
        # ... but are not digital zeros (a noise floor keeps energies in dB finite).
        assert np.min(energy) > -120.0
        # Loud frames exist well above the median too.
        assert np.max(energy) > median + 6.0


@pytest.mark.parametrize("speaker", DEMO_SPEAKERS[:3])
def test_segments_tile_the_utterance_and_match_the_signal(speaker: str) -> None:
    segments = utterance_segments(speaker, 0)
    x = _utterance(speaker, 0)
    assert segments[0].start_s == 0.0
    assert segments[-1].end_s == pytest.approx(x.size / SR, abs=0.5 / SR)
    for prev, seg in itertools.pairwise(segments):
        assert seg.start_s == prev.end_s
    assert all(seg.end_s > seg.start_s for seg in segments)
    assert {seg.kind for seg in segments} == {"voiced", "unvoiced", "pause"}
    assert segments[0].kind == "pause" and segments[-1].kind == "pause"
    # Pauses hold only the noise floor (no clicks or leakage from neighbouring envelopes).
    pause = _kind_frames(speaker, 0, "pause", margin_s=0.01)
    assert pause.size and np.max(np.abs(pause)) < 2e-3
    voiced = _kind_frames(speaker, 0, "voiced")
    assert np.median(_energy_db(voiced)) > np.max(_energy_db(pause)) + 30.0


@pytest.mark.parametrize("speaker", DEMO_SPEAKERS)
def test_voiced_frames_are_harmonic_with_f0_in_speaker_range(speaker: str) -> None:
    lo, hi = DEMO_SPEAKER_PROFILES[speaker].f0_range_hz
    est = np.concatenate([_voiced_f0s(speaker, i) for i in range(2)])
    assert len(est) >= 5
    f0, peak = est[:, 0], est[:, 1]
    assert np.median(peak) > 0.6  # strongly periodic (white noise gives ~0.1)
    inside = (f0 >= 0.95 * lo) & (f0 <= 1.05 * hi)
    assert np.mean(inside) >= 0.9, f0
    assert lo <= np.median(f0) <= hi


def test_female_speakers_have_higher_f0_than_male() -> None:
    medians = {s: np.median(_voiced_f0s(s, 0)[:, 0]) for s in DEMO_SPEAKERS}
    female = [medians[s] for s in DEMO_SPEAKERS if DEMO_SPEAKER_PROFILES[s].sex == "female"]
    male = [medians[s] for s in DEMO_SPEAKERS if DEMO_SPEAKER_PROFILES[s].sex == "male"]
    assert min(female) > max(male), medians


@pytest.mark.parametrize("speaker", DEMO_SPEAKERS)
def test_unvoiced_bursts_exist(speaker: str) -> None:
    x = _utterance(speaker, 0)
    frames = _frames(x, SR)
    energy = _energy_db(frames)
    zcr = _zero_crossing_rate(frames)
    hf = _high_frequency_fraction(frames, SR, 2500.0)
    audible = energy > np.median(energy) - 20.0
    # Blind: audible, noisy, high-frequency frames exist, and voiced-like frames too.
    assert np.any(audible & (zcr > 0.3) & (hf > 0.6))
    assert np.any(audible & (zcr < 0.15) & (hf < 0.2))
    # With the ground-truth labels: fricatives are noisy and bright, vowels are not.
    unvoiced = _kind_frames(speaker, 0, "unvoiced", margin_s=0.01)
    voiced = _kind_frames(speaker, 0, "voiced")
    assert len(unvoiced) and len(voiced)
    assert np.median(_zero_crossing_rate(unvoiced)) > 2 * np.median(_zero_crossing_rate(voiced))
    assert np.median(_high_frequency_fraction(unvoiced, SR, 2500.0)) > 0.5
    assert np.median(_high_frequency_fraction(voiced, SR, 2500.0)) < 0.1
    assert np.median([_estimate_f0(f, SR)[1] for f in unvoiced]) < 0.5  # aperiodic


# --------------------------------------------------------------------------------------------
# sample rates and durations


@pytest.mark.parametrize("sample_rate", [8000, 16000, 44100])
def test_sample_rates_and_explicit_duration(sample_rate: int) -> None:
    for duration_s in (1.5, 2.3456):
        x = synthesize_utterance("demo_f2", 1, sample_rate, duration_s)
        assert x.dtype == np.float32
        assert x.size == round(duration_s * sample_rate)
        assert np.all(np.isfinite(x)) and np.max(np.abs(x)) <= 1.0
        assert np.max(np.abs(x)) == pytest.approx(0.5, abs=0.01)
    lo, hi = DEMO_SPEAKER_PROFILES["demo_m1"].f0_range_hz
    est = _voiced_f0s("demo_m1", 0, sample_rate, duration_s=2.0)
    assert len(est) >= 3
    assert lo <= np.median(est[:, 0]) <= hi and np.median(est[:, 1]) > 0.6


def test_plan_is_independent_of_sample_rate() -> None:
    """The same utterance at different rates lines up in time (same frame energy contour)."""
    contours = [
        _energy_db(_frames(synthesize_utterance("demo_m3", 2, sr, 2.5), sr))
        for sr in (8000, 16000, 44100)
    ]
    assert len({c.size for c in contours}) == 1
    assert np.corrcoef(contours[0], contours[2])[0, 1] > 0.9
    assert np.corrcoef(contours[1], contours[2])[0, 1] > 0.9


def test_explicit_duration_keeps_the_start() -> None:
    """Asking for a different length changes where the utterance stops, not how it starts."""
    short = utterance_segments("demo_f3", 4, 1.5)
    long = utterance_segments("demo_f3", 4, 3.5)
    assert short[-1].end_s == 1.5 and long[-1].end_s == 3.5
    assert short[1:4] == long[1:4]


def test_short_duration_still_contains_speech() -> None:
    segments = utterance_segments("demo_m2", 0, 0.25)
    assert {"voiced", "unvoiced"} <= {seg.kind for seg in segments}
    x = synthesize_utterance("demo_m2", 0, SR, 0.25)
    assert x.size == 4000 and np.max(np.abs(x)) == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------------------------
# argument validation


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("nobody", 0), r"unknown demo speaker 'nobody'.*demo_f1"),
        (("DEMO_F1", 0), r"'DEMO_F1'"),
        (("demo_f1", -1), r"index.*got -1"),
        (("demo_f1", 1.5), r"index.*got 1\.5"),
        (("demo_f1", True), r"index.*got True"),
        (("demo_f1", 0, 0), r"sample_rate.*got 0"),
        (("demo_f1", 0, 1000), r"sample_rate.*got 1000"),
        (("demo_f1", 0, 16000.0), r"sample_rate.*got 16000\.0"),
        (("demo_f1", 0, 16000, 0.0), r"duration_s.*got 0\.0"),
        (("demo_f1", 0, 16000, -2.0), r"duration_s.*got -2\.0"),
        (("demo_f1", 0, 16000, float("nan")), r"duration_s.*got nan"),
        (("demo_f1", 0, 16000, float("inf")), r"duration_s.*got inf"),
        (("demo_f1", 0, 16000, 1e4), r"duration_s.*got 10000\.0"),
        (("demo_f1", 0, 16000, "2"), r"duration_s.*got '2'"),
    ],
)
def test_bad_arguments_raise_value_error(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthesize_utterance(*args)


def test_bad_speaker_in_segments_and_profile() -> None:
    with pytest.raises(ValueError, match="'demo_x9'"):
        utterance_segments("demo_x9", 0)
    with pytest.raises(ValueError, match="'demo_x9'"):
        demo_speaker("demo_x9")


def test_numpy_integer_arguments_are_accepted() -> None:
    a = synthesize_utterance("demo_f1", np.int64(2), np.int32(8000), np.float32(1.0))
    b = synthesize_utterance("demo_f1", 2, 8000, 1.0)
    assert a.tobytes() == b.tobytes()
