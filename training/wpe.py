"""Single-channel weighted prediction error (WPE) dereverberation: the classical baseline.

WPE (Nakatani et al. 2010; Yoshioka & Nakatani 2012) predicts the late reverberation in each
STFT bin from ``taps`` past frames, skipping ``delay`` frames so the direct sound and early
reflections are kept, and subtracts the prediction, re-weighting by the estimated speech power
each iteration. This wraps ``nara_wpe.wpe.wpe`` (numpy) on the project STFT
(``dereverb_data.stft``) so the baseline sees exactly the representation the models see.

With one microphone WPE gains little (``DESIGN.md``: about +0.05 PESQ-WB in a small test here);
it is the reference point, not a competitor.
"""

from __future__ import annotations

import numpy as np
from nara_wpe.wpe import wpe

from dereverb_data.stft import StftConfig, istft, stft


def wpe_dereverb(
    signal: np.ndarray,
    fs: int,
    taps: int = 10,
    delay: int = 3,
    iterations: int = 5,
    n_fft: int = 512,
    hop: int = 128,
) -> np.ndarray:
    """Dereverberate a 1-D signal with single-channel WPE; returns float32 of the same length.

    ``taps`` and ``delay`` count STFT frames, so the defaults (10 taps, delay 3, 512/128 STFT)
    assume 16 kHz, where the prediction starts 24 ms after the current frame and reaches back
    about 104 ms. At another rate scale ``n_fft`` and ``hop`` with ``fs`` to keep those
    durations; ``fs`` is used only to check that the signal spans at least a few frames.
    """
    x = np.asarray(signal, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"wpe_dereverb expects a 1-D signal, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("signal contains NaN or inf")
    config = StftConfig(n_fft=n_fft, hop=hop, window="hann")
    if config.n_frames(x.size) <= taps + delay:
        raise ValueError(
            f"{x.size / fs:.3f} s gives {config.n_frames(x.size)} frames; WPE needs more than "
            f"taps + delay = {taps + delay}"
        )
    spec = stft(x, config).astype(np.complex128)  # (frames, freq)
    observed = spec.T[:, None, :]  # nara_wpe layout: (freq, channels, frames)
    # nara_wpe's power estimate divides by |X|^2 (floored at 1e-10 internally), so an all-zero
    # input stays zero instead of producing NaN.
    enhanced = wpe(observed, taps=taps, delay=delay, iterations=iterations)
    out = istft(enhanced[:, 0, :].T, config, x.size)
    return out.astype(np.float32)
