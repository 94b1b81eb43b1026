"""Render one example: reverberant input and its clean target, aligned and levelled.

Both signals have the example's length (utterance + tail). The target is aligned sample-exactly
to the direct-path peak of the actual RIR (not to the geometric delay: the simulator's
fractional-delay filter puts the peak about 40 samples later):

- ``direct``: the dry utterance delayed to the direct-path peak, scaled by the direct path's
  amplitude (so input and target share one scale);
- ``early``: the utterance convolved with the RIR truncated ``early_ms`` after the direct peak.

With background noise (manifest ``noise``), the noise is added to the reverberant signal only,
at the example's SNR, *before* the level gain: the gain scales signal and noise alike, so the
SNR label holds for the stored input; the target stays noise-free.

One gain, drawn from the level policy and lowered if needed so neither signal clips, scales
both; it is recorded, with the target's total gain relative to the dry utterance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from .acoustics import DIRECT_WINDOW_MS, direct_path_index
from .manifest import Manifest
from .noise import mix_at_snr


@dataclass(frozen=True)
class Rendered:
    reverberant: np.ndarray
    clean: np.ndarray
    gain: float  # applied to both signals by the level policy
    clean_gain: float  # clean == clean_gain * utterance delayed by direct_index (direct target)
    direct_index: int
    gain_limited: bool  # the level policy's gain was lowered to avoid clipping
    snr_db: float | None = None  # of the noise added to the reverberant input, if any
    noise_gain: float | None = None  # applied to the given noise (before the level gain)


def direct_amplitude(rir: np.ndarray, direct_index: int, sample_rate: int) -> float:
    """Signed amplitude of the direct path: the energy of its window, as an amplitude.

    The simulator spreads the direct impulse over a fractional-delay filter; its energy is the
    squared amplitude of the ideal impulse, so this is robust to where the peak falls between
    samples.
    """
    half = round(DIRECT_WINDOW_MS * sample_rate / 1000)
    window = rir[max(0, direct_index - half) : direct_index + half + 1].astype(np.float64)
    return float(np.sign(rir[direct_index]) * np.sqrt(np.sum(window**2)))


def _fit(signal: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.float64)
    n = min(length, signal.size)
    out[:n] = signal[:n]
    return out


def render_pair(
    utterance: np.ndarray,
    rir: np.ndarray,
    manifest: Manifest,
    num_samples: int,
    rms_dbfs: float | None,
    noise: np.ndarray | None = None,
    snr_db: float | None = None,
    noise_offset: int = 0,
) -> Rendered:
    """Reverberant and target waveforms of ``num_samples`` samples each.

    With ``noise`` (and ``snr_db``), the noise from ``noise_offset`` on (looped) is added to
    the reverberant signal at ``snr_db`` over its whole length, before the level gain.
    """
    fs = manifest.sample_rate
    dry = utterance.astype(np.float64)
    h = rir.astype(np.float64)
    d = direct_path_index(h)
    wet = _fit(fftconvolve(dry, h), num_samples)
    if manifest.target.kind == "direct":
        amplitude = direct_amplitude(h, d, fs)
        target = np.zeros(num_samples)
        n = min(dry.size, num_samples - d)
        target[d : d + n] = amplitude * dry[:n]
    else:
        early = h[: d + round(manifest.target.early_ms * fs / 1000) + 1]
        amplitude = 1.0
        target = _fit(fftconvolve(dry, early), num_samples)

    noise_gain = None
    if noise is not None:
        if snr_db is None:
            raise ValueError("render_pair: noise given without an snr_db")
        wet, noise_gain = mix_at_snr(wet, noise, snr_db, noise_offset)

    gain = 1.0
    if rms_dbfs is not None:
        rms = np.sqrt(np.mean(wet**2))
        gain = 10 ** (rms_dbfs / 20) / max(rms, 1e-12)
    peak = max(np.max(np.abs(wet)), np.max(np.abs(target))) * gain
    limited = bool(peak > manifest.level.peak_limit)
    if limited:
        gain *= manifest.level.peak_limit / peak
    return Rendered(
        reverberant=(wet * gain).astype(np.float32),
        clean=(target * gain).astype(np.float32),
        gain=gain,
        clean_gain=gain * amplitude,
        direct_index=int(d),
        gain_limited=limited,
        snr_db=None if noise is None else float(snr_db),  # type: ignore[arg-type]
        noise_gain=noise_gain,
    )
