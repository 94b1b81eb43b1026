"""Tests for training.metrics: known cases, REVERB measures, SRMR and missing-value handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve

from dereverb_data.demo_corpus import DEMO_SPEAKERS, synthesize_utterance
from training import metrics as M

torch.set_num_threads(1)

FS = 16000


def speech(index: int = 0, duration: float = 2.0, fs: int = FS) -> np.ndarray:
    """A deterministic speech-like utterance from the project's demo corpus."""
    speaker = DEMO_SPEAKERS[index % len(DEMO_SPEAKERS)]
    x = synthesize_utterance(speaker, index // len(DEMO_SPEAKERS), fs, duration_s=duration)
    return np.asarray(x, dtype=np.float64)


def exp_rir(t60: float, fs: int = FS, duration: float = 1.0, gain: float = 0.05, seed: int = 0):
    """Direct impulse plus exponentially decaying Gaussian noise (60 dB decay in ``t60``)."""
    n = int(duration * fs)
    t = np.arange(n) / fs
    h = np.random.default_rng(seed).standard_normal(n) * np.exp(-6.9 * t / t60) * gain
    h[0] = 1.0
    return h


def add_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(x.size)
    xc = x - x.mean()
    noise *= np.sqrt(np.sum(xc**2) / np.sum(noise**2)) * 10 ** (-snr_db / 20)
    return x + noise


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return speech(0, 2.0)


# ---------------------------------------------------------------------------------------------
# known cases


def test_identical_signals_score_perfectly(clean):
    res = M.compute_metrics(clean, clean, FS)
    assert not res.missing
    v = res.values
    assert v["si_sdr"] > 100
    assert v["pesq_wb"] > 4.5
    assert v["estoi"] > 0.99
    assert v["cd"] == pytest.approx(0.0, abs=1e-6)
    assert v["llr"] == pytest.approx(0.0, abs=1e-6)
    assert v["fwsegsnr"] == pytest.approx(35.0)
    assert v["srmr"] > 0


def test_gain_invariance(clean):
    noisy = add_noise(clean, 15.0)
    base = M.compute_metrics(noisy, clean, FS, names=["si_sdr", "cd", "llr"]).values
    scaled = M.compute_metrics(0.2 * noisy, clean, FS, names=["si_sdr", "cd", "llr"]).values
    for name in base:
        assert scaled[name] == pytest.approx(base[name], abs=1e-6), name


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_si_sdr_of_white_noise_matches_snr(clean, snr_db):
    assert M.si_sdr(add_noise(clean, snr_db, seed=3), clean, FS) == pytest.approx(snr_db, abs=0.5)


def test_pure_noise_scores_low(clean):
    noise = np.random.default_rng(5).standard_normal(clean.size) * 0.1
    v = M.compute_metrics(noise, clean, FS).values
    assert v["pesq_wb"] < 1.5
    assert v["estoi"] < 0.2
    assert v["si_sdr"] < -20
    assert v["fwsegsnr"] < 0
    assert v["cd"] > 3
    assert v["llr"] > 0.5


def test_delay_lowers_si_sdr(clean):
    delayed = np.concatenate([np.zeros(80), clean[:-80]])  # 5 ms
    assert M.si_sdr(delayed, clean, FS) < 0.0
    assert M.si_sdr(delayed, clean, FS) < M.si_sdr(add_noise(clean, 10.0), clean, FS)


def test_intrusive_measures_order_distortion(clean):
    snrs = [40.0, 25.0, 10.0]
    scores = [M.compute_metrics(add_noise(clean, s), clean, FS).values for s in snrs]
    cds = [s["cd"] for s in scores]
    llrs = [s["llr"] for s in scores]
    fws = [s["fwsegsnr"] for s in scores]
    assert cds[0] < cds[1] < cds[2]
    assert llrs[0] < llrs[1] <= llrs[2]
    assert llrs[0] < llrs[2]
    assert fws[0] > fws[1] > fws[2]
    pesqs = [s["pesq_wb"] for s in scores]
    assert pesqs[0] > pesqs[1] > pesqs[2]


def test_srmr_drops_with_reverberation():
    for index in (0, 1):
        dry = speech(index, 2.0)
        wet = fftconvolve(dry, exp_rir(0.8, gain=0.05))[: dry.size]
        assert M.srmr(wet, FS) < 0.8 * M.srmr(dry, FS)
        # reverberation also lowers the intrusive scores
        assert M.compute_metrics(wet, dry, FS, names=["pesq_wb"]).values["pesq_wb"] < 2.5


def test_srmr_is_scale_invariant(clean):
    assert M.srmr(3.0 * clean, FS) == pytest.approx(M.srmr(clean, FS), rel=1e-9)


@pytest.mark.parametrize("fs", [8000, 48000])
def test_other_sample_rates_are_resampled(fs):
    x = speech(1, 2.0, fs=fs)
    res = M.compute_metrics(add_noise(x, 20.0), x, fs)
    assert not res.missing
    assert 1.0 < res.values["pesq_wb"] < 4.7
    assert res.values["si_sdr"] == pytest.approx(20.0, abs=0.5)


def test_length_mismatch_is_trimmed(clean):
    res = M.compute_metrics(clean[:-100], clean, FS, names=["si_sdr", "cd"])
    assert res.trimmed == 100 and res.n_samples == clean.size - 100
    assert res.values["si_sdr"] > 100
    assert res.values["cd"] == pytest.approx(0.0, abs=1e-6)


def test_unknown_metric_name_is_a_caller_error(clean):
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute_metrics(clean, clean, FS, names=["mos"])


# ---------------------------------------------------------------------------------------------
# missing values


def test_silent_reference_is_missing_but_srmr_of_estimate_is_kept(clean):
    res = M.compute_metrics(clean, np.zeros_like(clean), FS)
    intrusive = {"pesq_wb", "estoi", "si_sdr", "cd", "llr", "fwsegsnr"}
    assert set(res.missing) == intrusive
    assert all("silent reference" in reason for reason in res.missing.values())
    assert set(res.values) == {"srmr"}


def test_short_signals_are_missing(clean):
    short = clean[: int(0.1 * FS)]
    res = M.compute_metrics(short, short, FS)
    assert not res.values
    assert set(res.missing) == set(M.DEFAULT_METRICS)
    assert all("shorter than 0.25 s" in reason for reason in res.missing.values())


def test_non_finite_input_is_missing(clean):
    bad = clean.copy()
    bad[100] = np.nan
    res = M.compute_metrics(bad, clean, FS)
    assert not res.values
    assert all("non-finite" in reason for reason in res.missing.values())
    # NaN only in the reference: the non-intrusive SRMR of the estimate survives
    res = M.compute_metrics(clean, bad, FS)
    assert set(res.values) == {"srmr"}


def test_pystoi_placeholder_is_missing(clean):
    # 0.3 s passes the length check but leaves fewer than 30 STOI frames: pystoi returns 1e-5
    x = clean[int(0.5 * FS) : int(0.8 * FS)]
    res = M.compute_metrics(x, x, FS, names=["estoi", "si_sdr"])
    assert "estoi" in res.missing and "1e-5" in res.missing["estoi"]
    assert "si_sdr" in res.values


def test_silent_estimate_si_sdr_is_missing(clean):
    res = M.compute_metrics(np.zeros_like(clean), clean, FS, names=["si_sdr", "pesq_wb"])
    assert "silent estimate" in res.missing["si_sdr"]
    assert "silent estimate" in res.missing["pesq_wb"]


def test_pesq_error_codes_are_missing(clean, monkeypatch):
    import pesq

    monkeypatch.setattr(pesq, "pesq", lambda *args, **kwargs: -6.0)
    res = M.compute_metrics(clean, clean, FS, names=["pesq_wb"])
    assert "pesq_wb" not in res.values
    assert "error code" in res.missing["pesq_wb"]


def test_pesq_exceptions_are_missing(clean, monkeypatch):
    import pesq

    def raise_no_utterances(*args, **kwargs):
        raise pesq.NoUtterancesError("no utterances detected")

    monkeypatch.setattr(pesq, "pesq", raise_no_utterances)
    res = M.compute_metrics(clean, clean, FS, names=["pesq_wb"])
    assert "NoUtterancesError" in res.missing["pesq_wb"]


def test_summarize_excludes_and_counts_missing(clean):
    noisy = add_noise(clean, 10.0)
    names = ["si_sdr", "cd"]
    good_a = M.compute_metrics(noisy, clean, FS, names=names)
    good_b = M.compute_metrics(clean, clean, FS, names=names)
    silent_ref = M.compute_metrics(noisy, np.zeros_like(clean), FS, names=names)
    short = M.compute_metrics(clean[:800], clean[:800], FS, names=names)
    summary = M.summarize([good_a, silent_ref, good_b, short])
    for name in names:
        assert summary[name]["n"] == 2
        assert summary[name]["n_missing"] == 2
        expected = np.mean([good_a.values[name], good_b.values[name]])
        assert summary[name]["mean"] == pytest.approx(expected)
    only_missing = M.summarize([silent_ref])
    assert np.isnan(only_missing["si_sdr"]["mean"]) and only_missing["si_sdr"]["n_missing"] == 1
