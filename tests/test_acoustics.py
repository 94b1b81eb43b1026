"""Tests for dereverb_data.acoustics: RT60 (T20/T30), DRR, C50, C80 and the direct-path
index."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("PRA_NUM_THREADS", "1")

import numpy as np
import pytest
from scipy.signal import windows

from dereverb_data.acoustics import (
    DIRECT_WINDOW_MS,
    RirLabels,
    clarity_db,
    direct_path_index,
    drr_db,
    measure_rir,
    reverberation_time,
    schroeder_decay_db,
)

LN_1000 = 6.9078  # 3 ln(10): amplitude envelope exp(-LN_1000 t / T) decays 60 dB (energy) in T


def exp_decay_rir(
    t60: float, fs: int, d: int = 200, seconds: float | None = None, seed: int = 0
) -> np.ndarray:
    """Unit impulse at ``d`` followed by white noise with a 60 dB-in-``t60`` energy decay."""
    rng = np.random.default_rng(seed)
    n = int((1.5 * t60 if seconds is None else seconds) * fs)
    t = np.arange(n) / fs
    h = np.zeros(d + 1 + n)
    h[d] = 1.0
    h[d + 1 :] = 0.05 * rng.standard_normal(n) * np.exp(-LN_1000 * t / t60)
    return h


def frac_delay_peak(n: int, delay: float, length: int = 81) -> np.ndarray:
    """Hann-windowed sinc fractional-delay filter centred at ``delay`` (as in ISM simulators)."""
    h = np.zeros(n)
    start = int(np.floor(delay)) - length // 2
    k = np.arange(start, start + length)
    h[k] = np.sinc(k - delay) * windows.hann(length + 2)[1:-1]
    return h


# --------------------------------------------------------------------------- RT60


@pytest.mark.parametrize("t60", [0.3, 0.6, 1.2])
def test_reverberation_time_synthetic_exponential(t60):
    fs = 48000  # many samples per fit range -> the noise-driven spread is ~1 %
    h = exp_decay_rir(t60, fs, seed=int(t60 * 10))
    t20 = reverberation_time(h, fs, decay_db=20.0)
    t30 = reverberation_time(h, fs, decay_db=30.0)
    assert t20 == pytest.approx(t60, rel=0.05)
    assert t30 == pytest.approx(t60, rel=0.05)
    # float32 input gives the same answer (computed in float64 internally).
    assert reverberation_time(h.astype(np.float32), fs) == pytest.approx(t30, rel=1e-4)


def test_reverberation_time_ignores_pre_delay():
    fs = 16000
    h = exp_decay_rir(0.5, fs, d=10, seed=3)
    delayed = np.concatenate([np.zeros(3000), h])
    assert reverberation_time(delayed, fs) == pytest.approx(reverberation_time(h, fs), rel=1e-9)


def test_schroeder_decay_curve():
    h = np.array([2.0, 1.0, 1.0, 0.0])
    edc = schroeder_decay_db(h)
    expected = 10 * np.log10(np.array([6.0, 2.0, 1.0]) / 6.0)
    np.testing.assert_allclose(edc[:3], expected)
    assert edc[0] == 0.0
    assert edc[3] == -np.inf
    edc = schroeder_decay_db(exp_decay_rir(0.4, 8000))
    assert np.all(np.diff(edc) <= 0)


def test_too_short_rir_gives_nan():
    fs = 16000
    h = exp_decay_rir(1.0, fs, seconds=0.05)  # ~3 dB of true decay
    assert math.isnan(reverberation_time(h, fs, decay_db=30.0))
    assert math.isnan(reverberation_time(h, fs, decay_db=20.0))
    assert math.isnan(reverberation_time(np.array([1.0]), fs))
    assert math.isnan(reverberation_time(np.array([1.0, 0.5, 0.25]), fs))
    labels = measure_rir(h, fs)
    assert math.isnan(labels.rt60_t30)


def test_truncated_rir_gives_nan_not_a_biased_value():
    fs, t60 = 16000, 0.6
    # 0.3 s of a 0.6 s decay = 30 dB of true decay: the EDC still reaches -35 dB near the cut,
    # but the fit there would be biased; T30 must refuse. With 0.5 s (50 dB) both are valid.
    short = exp_decay_rir(t60, fs, seconds=0.3, seed=1)
    assert math.isnan(reverberation_time(short, fs, decay_db=30.0))
    long = exp_decay_rir(t60, fs, seconds=0.5, seed=1)
    assert reverberation_time(long, fs, decay_db=30.0) == pytest.approx(t60, rel=0.05)
    assert reverberation_time(long, fs, decay_db=20.0) == pytest.approx(t60, rel=0.05)


# --------------------------------------------------------------------------- DRR / C50


def test_drr_known_value():
    fs, d, a = 16000, 300, 0.8
    w = round(DIRECT_WINDOW_MS * fs / 1000)
    rng = np.random.default_rng(7)
    tail = 0.02 * rng.standard_normal(4000) * np.exp(-np.arange(4000) / 1500)
    h = np.zeros(d + w + 1 + tail.size)
    h[d] = a
    h[d + w + 1 :] = tail
    h[: d - w] = 0.05 * rng.standard_normal(d - w)  # pre-delay junk: must be ignored
    expected = 10 * np.log10(a**2 / np.sum(tail**2))
    assert drr_db(h, fs) == pytest.approx(expected, abs=0.1)
    assert drr_db(h, fs, direct_index=d) == pytest.approx(expected, abs=1e-9)
    assert drr_db(h.astype(np.float32), fs) == pytest.approx(expected, abs=0.1)


def test_drr_window_counts_energy_inside_as_direct():
    fs, d = 16000, 100
    w = round(DIRECT_WINDOW_MS * fs / 1000)
    h = np.zeros(1000)
    h[d] = 1.0
    h[d + w] = 0.5  # last sample of the direct window
    h[d + w + 1] = 0.5  # first reverberant sample
    assert drr_db(h, fs) == pytest.approx(10 * np.log10(1.25 / 0.25))
    # Without a reverberant part the DRR is +inf.
    assert drr_db(h[: d + w + 1], fs) == math.inf


def test_c50_known_value():
    fs, d, a = 16000, 250, 1.0
    rng = np.random.default_rng(11)
    n_tail = 8000  # 0.5 s
    tail = 0.05 * rng.standard_normal(n_tail) * np.exp(-np.arange(n_tail) / 2000)
    h = np.zeros(d + 1 + n_tail)
    h[d] = a
    h[d + 1 :] = tail
    n50 = int(0.050 * fs)  # 800 samples: early = [d, d + 800), late = [d + 800, end)
    early = a**2 + np.sum(tail[: n50 - 1] ** 2)
    late = np.sum(tail[n50 - 1 :] ** 2)
    expected = 10 * np.log10(early / late)
    assert clarity_db(h, fs) == pytest.approx(expected, abs=0.1)
    assert clarity_db(h, fs, early_ms=50.0, direct_index=d) == pytest.approx(expected, abs=1e-9)
    # C80 is larger (more energy counted as early).
    assert clarity_db(h, fs, early_ms=80.0) > clarity_db(h, fs)


def test_c80_label_is_the_energy_ratio_at_80_ms_and_at_least_c50():
    fs, d = 16000, 300
    h = exp_decay_rir(0.7, fs, d=d, seed=8)
    # Pre-delay ringing, half inside the direct window (counted as early), half before it
    # (ignored), so the window convention is checked, not just the 80 ms split.
    w = round(DIRECT_WINDOW_MS * fs / 1000)
    h[d - 2 * w : d] = 0.01
    labels = measure_rir(h, fs)
    assert labels.direct_index == d
    # Independent reference, the same convention as C50: early [d - w, d + 80 ms), late after.
    n80 = round(0.080 * fs)
    energy = h.astype(np.float64) ** 2
    expected = 10 * np.log10(energy[d - w : d + n80].sum() / energy[d + n80 :].sum())
    assert labels.c80_db == pytest.approx(expected, abs=1e-9)
    n50 = round(0.050 * fs)
    c50 = 10 * np.log10(energy[d - w : d + n50].sum() / energy[d + n50 :].sum())
    assert labels.c50_db == pytest.approx(c50, abs=1e-9)
    assert labels.c80_db > labels.c50_db  # a decaying RIR: more of it is early at 80 ms


def test_measure_rir_and_to_dict():
    fs = 16000
    h = exp_decay_rir(0.5, fs, d=123, seed=5)
    labels = measure_rir(h, fs)
    assert isinstance(labels, RirLabels)
    assert labels.direct_index == 123
    assert labels.rt60_t20 == pytest.approx(0.5, rel=0.06)
    assert labels.rt60_t30 == pytest.approx(0.5, rel=0.06)
    assert labels.drr_db == pytest.approx(drr_db(h, fs))
    assert labels.c50_db == pytest.approx(clarity_db(h, fs))
    assert labels.c80_db == pytest.approx(clarity_db(h, fs, early_ms=80.0))
    d = labels.to_dict()
    assert set(d) == {"rt60_t20", "rt60_t30", "drr_db", "c50_db", "c80_db", "direct_index"}
    assert type(d["direct_index"]) is int and type(d["rt60_t30"]) is float
    assert json.loads(json.dumps(d)) == d
    with pytest.raises(AttributeError):
        labels.drr_db = 0.0  # frozen


# --------------------------------------------------------------------------- direct path


def test_direct_path_index_delayed_impulse():
    h = np.zeros(500, dtype=np.float32)
    h[137] = -0.7  # polarity does not matter
    h[300:] = 0.01
    assert direct_path_index(h) == 137


@pytest.mark.parametrize("frac", [0.0, 0.2, 0.45, 0.7, 0.9])
def test_direct_path_index_fractional_delay_peak(frac):
    delay = 200 + frac
    h = frac_delay_peak(1000, delay)
    assert direct_path_index(h) == round(delay)


def test_direct_path_index_prefers_earlier_weaker_direct_path():
    h = frac_delay_peak(2000, 150.3)
    h += 2.5 * frac_delay_peak(2000, 190.6)  # stronger early reflection, 40 samples later
    assert int(np.argmax(np.abs(h))) == 191
    assert direct_path_index(h) == 150


def test_direct_path_index_ignores_weak_leading_ringing():
    h = frac_delay_peak(1000, 400.0)
    h[50:60] = 0.2  # below 0.3 * max: not a direct-path candidate
    assert direct_path_index(h) == 400


# --------------------------------------------------------------------------- pyroomacoustics


def _shoebox_rir(rt60: float | None, max_order: int | None = None):
    pra = pytest.importorskip("pyroomacoustics")
    fs = 16000
    dims = [4.0, 3.5, 2.6]
    src, mic = [1.0, 1.2, 1.4], [2.9, 2.3, 1.1]
    if rt60 is None:
        materials, order = pra.Material(0.4), max_order
    else:
        e_abs, order = pra.inverse_sabine(rt60, dims)
        materials = pra.Material(e_abs)
    room = pra.ShoeBox(dims, fs=fs, materials=materials, max_order=order)
    room.add_source(src)
    room.add_microphone(mic)
    room.compute_rir()
    dist = float(np.linalg.norm(np.subtract(src, mic)))
    return np.asarray(room.rir[0][0]), fs, dist, pra


def test_direct_path_index_pyroomacoustics_time_of_flight():
    h, fs, dist, pra = _shoebox_rir(None, max_order=2)
    expected = dist / pra.constants.get("c") * fs + pra.constants.get("frac_delay_length") // 2
    assert abs(direct_path_index(h) - expected) <= 2


def test_pyroomacoustics_rt60_ordering():
    h_short, fs, _, _ = _shoebox_rir(0.2)
    h_long, _, _, _ = _shoebox_rir(0.4)
    short, long = measure_rir(h_short, fs), measure_rir(h_long, fs)
    for labels, target in ((short, 0.2), (long, 0.4)):
        assert np.isfinite([labels.rt60_t20, labels.rt60_t30, labels.drr_db, labels.c50_db]).all()
        assert labels.rt60_t30 == pytest.approx(target, rel=0.25)  # Sabine vs ISM: loose
    assert long.rt60_t20 > short.rt60_t20 * 1.5
    assert long.rt60_t30 > short.rt60_t30 * 1.5
    # Same geometry, more reverberation: less direct and less early energy.
    assert long.drr_db < short.drr_db
    assert long.c50_db < short.c50_db
    assert long.direct_index == short.direct_index


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("rir", "match"),
    [
        (np.array([]), "empty"),
        (np.zeros(100), "all zeros"),
        (np.array([0.0, 1.0, np.nan]), "non-finite"),
        (np.array([0.0, np.inf, 1.0]), "non-finite"),
        (np.ones((2, 100)), "1-D"),
        (np.float64(1.0), "1-D"),
        (np.array([1j, 0.5]), "real"),
        (np.array(["a", "b"]), "numeric"),
    ],
)
@pytest.mark.parametrize(
    "func",
    [
        direct_path_index,
        schroeder_decay_db,
        lambda h: reverberation_time(h, 16000),
        lambda h: drr_db(h, 16000),
        lambda h: clarity_db(h, 16000),
        lambda h: measure_rir(h, 16000),
    ],
)
def test_bad_rir_raises(func, rir, match):
    with pytest.raises(ValueError, match=match):
        func(rir)


def test_bad_parameters_raise():
    h = exp_decay_rir(0.3, 8000)
    with pytest.raises(ValueError, match="fs"):
        measure_rir(h, 0)
    with pytest.raises(ValueError, match="fs"):
        drr_db(h, float("nan"))
    with pytest.raises(ValueError, match="direct_index"):
        drr_db(h, 8000, direct_index=h.size)
    with pytest.raises(ValueError, match="direct_index"):
        clarity_db(h, 8000, direct_index=-1)
    with pytest.raises(ValueError, match="decay_db"):
        reverberation_time(h, 8000, decay_db=0.0)
    with pytest.raises(ValueError, match="start_db"):
        reverberation_time(h, 8000, start_db=3.0)
    with pytest.raises(ValueError, match="window_ms"):
        drr_db(h, 8000, window_ms=-1.0)
    with pytest.raises(ValueError, match="early_ms"):
        clarity_db(h, 8000, early_ms=float("inf"))
    with pytest.raises(TypeError):
        drr_db(h, 8000, direct_index=12.5)
