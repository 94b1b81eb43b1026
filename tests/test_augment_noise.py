"""Tests for dereverb_data.augment (DRR / decay changes) and dereverb_data.noise."""

from __future__ import annotations

import math
import os

os.environ.setdefault("PRA_NUM_THREADS", "1")

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import butter, sosfiltfilt, welch, windows

from dereverb_data.acoustics import (
    DIRECT_WINDOW_MS,
    direct_path_index,
    measure_rir,
    reverberation_time,
)
from dereverb_data.augment import (
    change_decay,
    change_drr,
    draw_augmentation,
    octave_split,
)
from dereverb_data.corpus import AudioError
from dereverb_data.noise import coloured_noise, load_noise_file, mix_at_snr

FS = 16000
LN_1000 = 3.0 * math.log(10.0)


def frac_delay_peak(n: int, delay: float, length: int = 81) -> np.ndarray:
    """Hann-windowed sinc fractional-delay impulse at ``delay`` (as ISM simulators make)."""
    h = np.zeros(n)
    start = int(np.floor(delay)) - length // 2
    k = np.arange(start, start + length)
    h[k] = np.sinc(k - delay) * windows.hann(length + 2)[1:-1]
    return h


def synthetic_rir(
    t60: float, seconds: float = 2.0, amp: float = 0.02, delay: float = 300.4, seed: int = 0
) -> np.ndarray:
    """Fractional-delay direct impulse + exponentially decaying white noise after it."""
    rng = np.random.default_rng(seed)
    n = int(seconds * FS)
    h = frac_delay_peak(n, delay)
    start = int(delay) + 1
    t = np.arange(n - start) / FS
    h[start:] += amp * rng.standard_normal(t.size) * np.exp(-LN_1000 * t / t60)
    return h


def band_rir(band_t60: dict[float, float], seconds: float = 2.5, seed: int = 1) -> np.ndarray:
    """Direct impulse + a tail whose octave bands decay with different T60s."""
    rng = np.random.default_rng(seed)
    n = int(seconds * FS)
    h = frac_delay_peak(n, 300.4)
    t = np.arange(n - 301) / FS
    for centre, t60 in band_t60.items():
        sos = butter(
            4, [centre / math.sqrt(2), centre * math.sqrt(2)], "bandpass", fs=FS, output="sos"
        )
        noise = sosfiltfilt(sos, rng.standard_normal(n))[301:]
        h[301:] += 0.05 * noise * np.exp(-LN_1000 * t / t60)
    return h


def independent_band_t30(h: np.ndarray, centre: float, d: int) -> float:
    """Octave-band T30 with a Butterworth band-pass + Schroeder + line fit, written here so the
    check does not share code with the augmentation's own band split."""
    sos = butter(3, [centre / math.sqrt(2), centre * math.sqrt(2)], "bandpass", fs=FS, output="sos")
    band = sosfiltfilt(sos, h)[d:]
    energy = np.cumsum(band[::-1] ** 2)[::-1]
    with np.errstate(divide="ignore"):  # -inf past the last non-zero sample is fine
        edc = 10 * np.log10(energy / energy[0])
    idx = np.flatnonzero((edc <= -5) & (edc >= -35))
    slope = np.polyfit(idx / FS, edc[idx], 1)[0]
    return -60.0 / slope


def pra_rir(max_order: int | None = 12) -> np.ndarray:
    """A pyroomacoustics shoebox RIR (Sabine 0.4 s); ``max_order=None`` uses the full order
    inverse_sabine asks for (a 0.8 s RIR, ~0.1 s to simulate)."""
    pra = pytest.importorskip("pyroomacoustics")
    dims = [5.0, 4.0, 3.0]
    e_abs, order = pra.inverse_sabine(0.4, dims)
    order = order if max_order is None else min(order, max_order)
    room = pra.ShoeBox(dims, fs=FS, materials=pra.Material(e_abs), max_order=order)
    room.add_source([1.0, 1.2, 1.4])
    room.add_microphone([3.6, 2.9, 1.2])
    room.compute_rir()
    return np.asarray(room.rir[0][0], dtype=np.float64)


# --------------------------------------------------------------------------- change_drr


@pytest.mark.parametrize("target", [-4.0, 0.0, 5.0, 10.0, 15.0])
def test_change_drr_hits_target_synthetic(target):
    h = synthetic_rir(0.5)
    out = change_drr(h, FS, target)
    assert measure_rir(out, FS).drr_db == pytest.approx(target, abs=0.2)
    # Tail (after the direct window) and pre-delay untouched; same length.
    d = direct_path_index(h)
    w = round(DIRECT_WINDOW_MS * FS / 1000)
    assert out.shape == h.shape
    np.testing.assert_array_equal(out[d + w + 1 :], h[d + w + 1 :])
    np.testing.assert_array_equal(out[: d - w], h[: d - w])
    assert direct_path_index(out) == d


@pytest.mark.parametrize("delta", [-3.0, 0.0, 4.0, 8.0])
def test_change_drr_pyroomacoustics(delta):
    h = pra_rir()
    before = measure_rir(h, FS).drr_db
    out = change_drr(h, FS, before + delta)
    assert measure_rir(out, FS).drr_db == pytest.approx(before + delta, abs=0.2)
    d = direct_path_index(h)
    w = round(DIRECT_WINDOW_MS * FS / 1000)
    np.testing.assert_array_equal(out[d + w + 1 :], h[d + w + 1 :])


def test_change_drr_edges_are_smooth():
    # The gain ramps in: no sample-to-sample gain step at the window edges.
    h = synthetic_rir(0.5)
    out = change_drr(h, FS, 15.0)
    d = direct_path_index(h)
    w = round(DIRECT_WINDOW_MS * FS / 1000)
    region = slice(d - w, d + w + 1)
    ratio = out[region] / np.where(h[region] == 0, 1, h[region])
    assert ratio[0] < 1.2 and ratio[-1] < 1.2  # starts and ends near unity gain
    assert np.max(np.abs(np.diff(ratio))) < 0.5 * (ratio.max() - 1)


def test_change_drr_refuses_bad_targets():
    h = synthetic_rir(0.5)
    with pytest.raises(ValueError, match="negative direct-path gain"):
        change_drr(h, FS, -40.0)
    with pytest.raises(ValueError, match="limit is"):
        change_drr(h, FS, 60.0)
    with pytest.raises(ValueError, match="finite"):
        change_drr(h, FS, math.nan)
    # A strong early reflection would become "the direct path" if the direct is lowered a lot.
    reflected = h + 0.8 * frac_delay_peak(h.size, 300.4 + 0.02 * FS)
    before = measure_rir(reflected, FS).drr_db
    with pytest.raises(ValueError, match="later peak"):
        change_drr(reflected, FS, before - 14.0)
    no_tail = frac_delay_peak(2000, 500.0)
    no_tail[600:] = 0
    with pytest.raises(ValueError, match=r"\+inf"):
        change_drr(no_tail, FS, 5.0)


# --------------------------------------------------------------------------- change_decay


def test_octave_split_sums_back():
    h = synthetic_rir(0.4, seconds=1.0)
    bands = octave_split(h, FS)
    assert bands.shape[0] == 6
    np.testing.assert_allclose(bands.sum(axis=0), h, atol=1e-12)


@pytest.mark.parametrize("bands", [True, False])
@pytest.mark.parametrize("factor", [0.5, 0.8, 1.4, 2.0])
def test_change_decay_hits_target(factor, bands):
    h = synthetic_rir(0.5, seconds=3.0)
    t_old = measure_rir(h, FS).rt60_t30
    target = t_old * factor
    out = change_decay(h, FS, target, bands=bands)
    assert out.shape == h.shape
    assert reverberation_time(out, FS, decay_db=30.0) == pytest.approx(target, rel=0.05)
    # The direct path and early part are untouched.
    d = direct_path_index(h)
    np.testing.assert_allclose(out[: d + round(0.007 * FS)], h[: d + round(0.007 * FS)], atol=1e-12)


@pytest.fixture(scope="module")
def pra_full() -> np.ndarray:
    return pra_rir(max_order=None)


@pytest.mark.parametrize("factor", [0.5, 0.75, 1.5])
def test_change_decay_pyroomacoustics(pra_full, factor):
    t_old = measure_rir(pra_full, FS).rt60_t30
    out = change_decay(pra_full, FS, t_old * factor)
    assert reverberation_time(out, FS, decay_db=30.0) == pytest.approx(t_old * factor, rel=0.05)


def test_change_decay_refuses_what_does_not_fit(pra_full):
    # The ISM RIR ends where its image sources do: a 2x longer decay does not fit in it.
    t_old = measure_rir(pra_full, FS).rt60_t30
    with pytest.raises(ValueError, match="too short to hold the new decay"):
        change_decay(pra_full, FS, 2.0 * t_old)


@pytest.mark.parametrize("factor", [0.6, 1.6])
def test_change_decay_keeps_band_ratios(factor):
    band_t60 = {250.0: 0.9, 500.0: 0.7, 1000.0: 0.6, 2000.0: 0.45, 4000.0: 0.3}
    h = band_rir(band_t60)
    d = direct_path_index(h)
    t_old = reverberation_time(h, FS, decay_db=30.0)
    out = change_decay(h, FS, t_old * factor, bands=True)
    assert reverberation_time(out, FS, decay_db=30.0) == pytest.approx(t_old * factor, rel=0.05)
    ratios = []
    for centre in band_t60:
        before = independent_band_t30(h, centre, d)
        after = independent_band_t30(out, centre, d)
        ratios.append(after / before)
    ratios = np.array(ratios)
    # Every band scaled by (nearly) one common factor: the frequency dependence is kept.
    # (The synthetic bands overlap, so a band's decay is a blend: up to ~8 % spread remains.)
    assert np.all(np.abs(ratios / ratios.mean() - 1) < 0.1), ratios
    # A single broadband envelope would not keep them: the low bands change much more.
    flat = change_decay(h, FS, t_old * factor, bands=False)
    flat_ratios = np.array(
        [independent_band_t30(flat, c, d) / independent_band_t30(h, c, d) for c in band_t60]
    )
    assert np.ptp(flat_ratios) > 2 * np.ptp(ratios)


def test_change_decay_refusals():
    h = synthetic_rir(0.5)
    with pytest.raises(ValueError, match="noise floor"):
        change_decay(h, FS, 2.0)  # 4x longer
    with pytest.raises(ValueError, match="allowed factors"):
        change_decay(h, FS, 0.05)
    with pytest.raises(ValueError, match="positive"):
        change_decay(h, FS, -1.0)
    short = synthetic_rir(0.5, seconds=0.05)
    with pytest.raises(ValueError, match="cannot measure"):
        change_decay(short, FS, 0.4)


# --------------------------------------------------------------------------- draws


def test_draw_augmentation_deterministic_and_in_range():
    config = {"drr_change_db": [-3.0, 9.0], "rt60_factor": [0.5, 2.0]}
    draws = [draw_augmentation(s, config) for s in range(200)]
    assert draws[:5] == [draw_augmentation(s, config) for s in range(5)]
    assert draw_augmentation(7, config) != draw_augmentation(8, config)
    drr = np.array([x["drr_change_db"] for x in draws])
    fac = np.array([x["rt60_factor"] for x in draws])
    assert drr.min() >= -3 and drr.max() <= 9
    assert fac.min() >= 0.5 and fac.max() <= 2.0
    # Log-uniform factor: about half the draws shorten.
    assert 0.35 < np.mean(fac < 1.0) < 0.65
    assert set(draw_augmentation(0)) == {"drr_change_db", "rt60_factor"}


def test_draw_augmentation_errors():
    with pytest.raises(ValueError, match="unknown augmentation"):
        draw_augmentation(0, {"drr_change": [0, 1]})
    with pytest.raises(ValueError, match="low <= high"):
        draw_augmentation(0, {"drr_change_db": [3, 1]})
    with pytest.raises(ValueError, match="positive"):
        draw_augmentation(0, {"rt60_factor": [0, 1]})
    with pytest.raises(ValueError, match="seed"):
        draw_augmentation(1.5, {})


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize(("colour", "slope"), [("white", 0.0), ("pink", -3.01), ("brown", -6.02)])
def test_coloured_noise_slope(colour, slope):
    x = coloured_noise(FS * 4, FS, colour, seed=3)
    assert x.shape == (FS * 4,)
    assert math.sqrt(np.mean(x**2)) == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_array_equal(x, coloured_noise(FS * 4, FS, colour, seed=3))
    assert not np.array_equal(x, coloured_noise(FS * 4, FS, colour, seed=4))
    f, p = welch(x, fs=FS, nperseg=4096)
    keep = (f >= 100) & (f <= 6000)
    measured = np.polyfit(np.log2(f[keep]), 10 * np.log10(p[keep]), 1)[0]
    assert measured == pytest.approx(slope, abs=1.0)


def test_coloured_noise_errors():
    with pytest.raises(ValueError, match="colour"):
        coloured_noise(100, FS, "blue", 0)
    with pytest.raises(ValueError, match="positive int"):
        coloured_noise(0, FS, "white", 0)
    with pytest.raises(ValueError, match="sample_rate"):
        coloured_noise(10, -1, "white", 0)


@pytest.mark.parametrize("snr", [-5.0, 0.0, 12.5, 30.0])
def test_mix_at_snr_exact(snr):
    rng = np.random.default_rng(5)
    signal = rng.standard_normal(12000) * np.linspace(0, 1, 12000)
    noise = coloured_noise(5000, FS, "pink", seed=1)  # shorter: gets looped
    noisy, gain = mix_at_snr(signal, noise, snr)
    added = noisy - signal
    measured = 10 * np.log10(np.mean(signal**2) / np.mean(added**2))
    assert measured == pytest.approx(snr, abs=0.01)
    looped = np.resize(noise, signal.size)
    np.testing.assert_allclose(added, gain * looped, rtol=1e-9, atol=1e-12)
    # Cropping a long noise works the same way, from an offset.
    long_noise = coloured_noise(30000, FS, "white", seed=2)
    noisy2, gain2 = mix_at_snr(signal, long_noise, snr, offset=1000)
    np.testing.assert_allclose(noisy2 - signal, gain2 * long_noise[1000:13000], atol=1e-12)


def test_mix_at_snr_errors():
    with pytest.raises(ValueError, match="all zeros"):
        mix_at_snr(np.zeros(10), np.ones(10), 0.0)
    with pytest.raises(ValueError, match="noise segment is all zeros"):
        mix_at_snr(np.ones(10), np.zeros(10), 0.0)
    with pytest.raises(ValueError, match="finite"):
        mix_at_snr(np.ones(10), np.ones(10), math.inf)
    with pytest.raises(ValueError, match="1-D"):
        mix_at_snr(np.ones((2, 10)), np.ones(10), 0.0)


def test_load_noise_file_any_rate_and_channels(tmp_path):
    stereo = np.stack(
        [coloured_noise(8000, 8000, "pink", 0), coloured_noise(8000, 8000, "pink", 1)], axis=1
    )
    path = tmp_path / "noise.wav"
    sf.write(path, 0.1 * stereo, 8000, subtype="FLOAT")
    x = load_noise_file(path, FS)
    assert x.ndim == 1 and x.dtype == np.float32
    assert abs(x.size - 2 * 8000) <= 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_noise_file(tmp_path / "missing.wav", FS)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    with pytest.raises(AudioError, match="unreadable"):
        load_noise_file(bad, FS)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(800), 8000)
    with pytest.raises(AudioError, match="silent"):
        load_noise_file(silent, FS)
