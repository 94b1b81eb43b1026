"""RIR data augmentation: change an RIR's DRR or its reverberation time (issue 12, items 3-4).

Follows the approach described by Bryan (ICASSP 2020, "Impulse response data augmentation and
deep neural networks for blind room acoustic parameter estimation"):

* **DRR**: scale the direct-path window (the same ``[d - w, d + w]`` window, ``w`` = 2.5 ms,
  that :mod:`dereverb_data.acoustics` measures) by a gain solved in closed form, so the
  measured DRR hits the target exactly; everything after the window is left untouched.
* **Decay**: multiply the late part by ``exp(-t * (6.91 / T_new - 6.91 / T_old))`` so the
  energy decay rate becomes that of ``T_new``; optionally per octave band, so a room's
  frequency-dependent decay is kept in ratio.

These are library functions only; integration into the build plan/render is done elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import numpy as np
from scipy.fft import irfft, next_fast_len, rfft

from .acoustics import DIRECT_WINDOW_MS, _as_rir, _check_fs, direct_path_index, drr_db
from .acoustics import reverberation_time as _rt
from .manifest import OCTAVE_BANDS_HZ

__all__ = [
    "DECAY_FLOOR_DB",
    "DEFAULT_AUGMENTATION",
    "EDGE_MS",
    "LATE_OFFSET_MS",
    "MAX_DIRECT_GAIN_DB",
    "MAX_LENGTHEN_FACTOR",
    "MIN_SHORTEN_FACTOR",
    "TARGET_TOLERANCE",
    "change_decay",
    "change_drr",
    "draw_augmentation",
    "octave_split",
]

#: Length (ms) of each raised-cosine edge inside the direct window: the gain ramps from 1 to
#: the direct gain over this span, so the scaled window joins the untouched samples without a
#: step (a click). The sinc side lobes at the window edges are small, so short edges suffice.
EDGE_MS = 0.5

#: The decay envelope starts this many ms after the end of the direct window, so the direct
#: sound (and a fractional-delay filter's ringing) is never reshaped.
LATE_OFFSET_MS = 5.0

#: Largest |gain| (dB) :func:`change_drr` applies to the direct window; beyond it the result is
#: no longer a plausible RIR (e.g. a direct path 40 dB above a room's reverberation).
MAX_DIRECT_GAIN_DB = 30.0

#: :func:`change_decay` refuses to lengthen the decay by more than this factor: lengthening
#: amplifies the end of the RIR exponentially (see its docstring on the noise floor).
MAX_LENGTHEN_FACTOR = 2.0

#: ... and to shorten it below this factor (the late part would be mostly gone).
MIN_SHORTEN_FACTOR = 0.25

#: :func:`change_decay` raises if the result's T30 is further than this (relative) from the target.
TARGET_TOLERANCE = 0.02

#: :func:`change_decay` fades each band out (over ``_FADE_MS``) once its *new* modelled decay
#: has fallen this many dB. Below it there is nothing a measure can see, only whatever floor
#: the RIR has (measurement noise, or the ~-200 dB leakage of the band filters and float64
#: rounding), which a lengthened decay would otherwise amplify without bound at the far end.
DECAY_FLOOR_DB = 100.0
_FADE_MS = 10.0

#: 60 dB of energy decay = an amplitude factor of 1000: amplitude ``exp(-LN_1000 t / T)``.
LN_1000 = 3.0 * math.log(10.0)

#: Half-width (octaves) of each crossover's raised-cosine transition. Crossovers are one octave
#: apart, so a half-width below 0.5 keeps neighbouring transitions from overlapping.
_CROSSOVER_HALF_WIDTH_OCT = 0.25

#: Default ranges for :func:`draw_augmentation`.
DEFAULT_AUGMENTATION: dict[str, tuple[float, float]] = {
    "drr_change_db": (-6.0, 6.0),
    "rt60_factor": (0.5, 2.0),
}


# --------------------------------------------------------------------------- DRR


def _direct_window_gain_shape(n: int, d: int, w: int, edge: int) -> tuple[int, np.ndarray]:
    """Start index and weights ``s`` in [0, 1] of the direct window ``[d - w, d + w]``.

    The window's gain is ``1 + (a - 1) s``: ``s`` is 1 in the middle and rises/falls over
    ``edge`` samples with a raised cosine at both ends, so the gain is continuous with the
    untouched samples outside.
    """
    start = max(0, d - w)
    stop = min(n, d + w + 1)
    s = np.ones(stop - start)
    if edge > 0:
        # Raised cosine from just above 0 to just below 1 over `edge` samples (never exactly 0
        # or 1 at the inner sample, so the edge really is `edge` samples long).
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(1, edge + 1) / (edge + 1)))
        k = min(edge, s.size // 2)
        s[:k] = ramp[:k]
        s[s.size - k :] = ramp[:k][::-1]
    return start, s


def change_drr(
    rir: np.ndarray,
    sample_rate: int,
    target_drr_db: float,
    *,
    max_gain_db: float = MAX_DIRECT_GAIN_DB,
) -> np.ndarray:
    """A copy of ``rir`` whose DRR (as :func:`dereverb_data.acoustics.drr_db` measures it)
    equals ``target_drr_db``.

    The direct window ``[d - w, d + w]`` (``d`` = :func:`direct_path_index`, ``w`` = 2.5 ms)
    is multiplied by ``1 + (a - 1) s(n)``, with ``s`` = 1 except for ``EDGE_MS`` raised-cosine
    edges at both ends (no click). The direct energy is then a quadratic in ``a``; it is
    solved exactly for the target, so the result is exact (up to rounding) despite the
    edges. Samples before and after the window are unchanged, hence the reverberant energy is.

    Returns a float64 array of the input's length.

    Raises:
        ValueError: for a bad RIR/rate/target; when there is no energy after the window (DRR
            is +inf); when the target needs a negative gain (below the lowest DRR reachable by
            scaling, since the edges keep part of the window) or a gain beyond
            ``max_gain_db``; or when the scaled direct path would no longer be found as the
            direct path (a later reflection becomes the earliest strong peak).
    """
    h = _as_rir(rir).copy()
    fs = _check_fs(sample_rate)
    target = float(target_drr_db)
    if not math.isfinite(target):
        raise ValueError(f"target_drr_db must be a finite number of dB, got {target_drr_db!r}")
    d = direct_path_index(h)
    w = round(DIRECT_WINDOW_MS * fs / 1000.0)
    edge = round(EDGE_MS * fs / 1000.0)
    start, s = _direct_window_gain_shape(h.size, d, w, edge)
    e = h[start : start + s.size] ** 2
    reverb = float(np.sum(h[d + w + 1 :] ** 2))
    if reverb <= 0.0:
        raise ValueError("RIR has no energy after the direct window: its DRR is +inf")
    wanted = reverb * 10.0 ** (target / 10.0)
    # E(a) = sum(((1 - s) + a s)^2 e) = A a^2 + 2 B a + C; take the positive root.
    big_a = float(np.sum(s * s * e))
    big_b = float(np.sum(s * (1.0 - s) * e))
    big_c = float(np.sum((1.0 - s) ** 2 * e))
    disc = big_b * big_b - big_a * (big_c - wanted)
    current = drr_db(h, fs, direct_index=d)
    if disc < 0.0 or (-big_b + math.sqrt(disc)) <= 0.0:
        raise ValueError(
            f"target DRR {target:.2f} dB needs a negative direct-path gain (current DRR "
            f"{current:.2f} dB): the window edges alone carry more direct energy than that"
        )
    gain = (-big_b + math.sqrt(disc)) / big_a
    gain_db = 20.0 * math.log10(gain)
    if abs(gain_db) > max_gain_db:
        raise ValueError(
            f"target DRR {target:.2f} dB needs a direct-path gain of {gain_db:+.1f} dB "
            f"(current DRR {current:.2f} dB); the limit is +-{max_gain_db:g} dB"
        )
    h[start : start + s.size] *= 1.0 + (gain - 1.0) * s
    # Lowering the direct path can make a later reflection the earliest strong peak; the
    # measured DRR would then refer to another window, so refuse rather than mislabel.
    if direct_path_index(h) != d:
        raise ValueError(
            f"target DRR {target:.2f} dB lowers the direct path ({gain_db:+.1f} dB) so far that "
            f"a later peak is taken as the direct path; choose a higher target"
        )
    return h


# --------------------------------------------------------------------------- bands


def _crossovers(fs: float) -> list[float]:
    """Crossover frequencies between the octave bands (geometric means of the centres),
    keeping only those whose transition fits below Nyquist."""
    centres = OCTAVE_BANDS_HZ
    top = fs / 2.0 / 2.0**_CROSSOVER_HALF_WIDTH_OCT
    mids = [math.sqrt(lo * hi) for lo, hi in pairwise(centres)]
    return [c for c in mids if c < top]


def _lowpass_weight(freqs: np.ndarray, cutoff: float) -> np.ndarray:
    """Zero-phase low-pass magnitude: 1 below ``cutoff / 2^hw``, 0 above ``cutoff * 2^hw``,
    raised cosine in log-frequency between (so each band's time response stays short)."""
    hw = _CROSSOVER_HALF_WIDTH_OCT
    with np.errstate(divide="ignore"):
        x = np.log2(np.maximum(freqs, 1e-12) / cutoff)
    x = np.clip(x, -hw, hw)
    return np.cos(np.pi / 4.0 * (x / hw + 1.0)) ** 2


def octave_split(signal: np.ndarray, sample_rate: int) -> np.ndarray:
    """Split ``signal`` into octave bands (rows) that sum back to it exactly.

    Bands are centred on ``OCTAVE_BANDS_HZ``; the lowest extends down to DC and the highest up
    to Nyquist (bands above Nyquist are dropped). Each band is a zero-phase FFT-domain filter;
    the magnitude responses are complementary (telescoping differences of low-passes), so the
    bands sum to the input up to rounding. The FFT is zero-padded to twice the length so the
    filters' two-sided responses do not wrap into the signal.
    """
    x = _as_rir(signal)
    fs = _check_fs(sample_rate)
    nfft = next_fast_len(2 * x.size)
    spectrum = rfft(x, nfft)
    freqs = np.arange(spectrum.size) * fs / nfft
    lows = [np.zeros_like(freqs)] + [_lowpass_weight(freqs, c) for c in _crossovers(fs)]
    lows.append(np.ones_like(freqs))
    bands = [irfft(spectrum * (hi - lo), nfft)[: x.size] for lo, hi in pairwise(lows)]
    out = np.array(bands)
    # Cropping each band is linear, so the cropped bands still sum to the input; push the
    # tiny rounding residual into the last band so the sum is exact to float64.
    out[-1] += x - out.sum(axis=0)
    return out


# --------------------------------------------------------------------------- decay


def _decay_time(h: np.ndarray, fs: float, d: int) -> float:
    """T30 from the direct path, else T20 (shorter RIRs), else nan."""
    if not np.any(h[d:]):
        return math.nan
    t = _rt(h, fs, decay_db=30.0, direct_index=d)
    return t if math.isfinite(t) else _rt(h, fs, decay_db=20.0, direct_index=d)


def change_decay(
    rir: np.ndarray,
    sample_rate: int,
    target_rt60_s: float,
    bands: bool = True,
    *,
    max_factor: float = MAX_LENGTHEN_FACTOR,
    min_factor: float = MIN_SHORTEN_FACTOR,
) -> np.ndarray:
    """A copy of ``rir`` whose measured T30 is ``target_rt60_s`` (within 2 %, usually 0.5 %).

    The late part -- from ``LATE_OFFSET_MS`` after the direct window on -- is multiplied by
    ``exp(-t * (6.91 / T_new - 6.91 / T_old))`` (``t`` from the start of the late part, so the
    envelope is continuous with the untouched direct and early samples). ``T_old`` is the
    measured T30 (T20 if the RIR is too short for T30).

    With ``bands=True`` the RIR is split by :func:`octave_split` (zero-phase, sums back to the
    input), each band's own ``T_old`` is measured and every band is given
    ``T_new = f * T_old`` with one common factor ``f``: a room's frequency-dependent decay is
    kept in ratio. With ``bands=False`` one broadband envelope is used (faster; bands then
    change by the same *rate* offset, not the same ratio).

    Because the direct and early parts are not reshaped, the broadband T30 does not scale
    exactly with ``f``; ``f`` is refined by a few fixed-point steps (``f *= target /
    measured``) until the measured T30 is within 0.5 % of the target.

    Noise floor: lengthening applies a *growing* exponential. On a simulated, noise-free RIR
    that is what we want; on a measured RIR the noise floor of the tail is amplified with it,
    by ``60 * t * (1 / T_old - 1 / T_new)`` dB at ``t`` s into the late part (e.g. +60 dB after
    1 s when going from 0.5 s to 1 s). This function does **not** estimate a noise floor
    (no Lundeby iteration); the simple, honest limits are: (1) it refuses a factor
    ``T_new / T_old`` above ``max_factor`` (default 2); (2) each band is faded to zero
    (``_FADE_MS`` raised cosine) where its *new* modelled decay has fallen
    ``DECAY_FLOOR_DB`` (100 dB), so the amplification of whatever lies below (noise, the
    band filters' ~-200 dB leakage, rounding) stops at ``DECAY_FLOOR_DB * (f - 1)`` dB. A
    measured RIR whose floor is higher than -100 dB should be truncated at its floor first
    (e.g. where a Lundeby-style estimate says the Schroeder curve flattens), or only shortened.

    The output keeps the input's length (nothing is synthesised past its end), so a lengthened
    decay must fit in it: ISO-style T30 needs 45 dB of the *new* decay inside the RIR. If the
    result's T30 is unmeasurable or off by more than ``TARGET_TOLERANCE`` (2 %), it raises.

    Returns a float64 array of the input's length.

    Raises:
        ValueError: for a bad RIR/rate/target; when the RIR's decay cannot be measured; when
            ``target / T_old`` is outside ``[min_factor, max_factor]``; when the result misses
            the target (RIR too short for the lengthened decay).
    """
    h = _as_rir(rir)
    fs = _check_fs(sample_rate)
    target = float(target_rt60_s)
    if not math.isfinite(target) or target <= 0.0:
        raise ValueError(f"target_rt60_s must be a positive number of s, got {target_rt60_s!r}")
    d = direct_path_index(h)
    t_old = _decay_time(h, fs, d)
    if not math.isfinite(t_old):
        raise ValueError(
            "cannot measure the RIR's decay (T30 and T20 are nan: too short or no decay), "
            "so it cannot be changed"
        )
    factor = target / t_old
    if not min_factor <= factor <= max_factor:
        raise ValueError(
            f"target RT60 {target:.3f} s is {factor:.2f} x the measured {t_old:.3f} s; allowed "
            f"factors are {min_factor:g}..{max_factor:g} (lengthening amplifies the tail's "
            f"noise floor, strong shortening leaves hardly any late reverberation)"
        )
    late_start = d + round(DIRECT_WINDOW_MS * fs / 1000.0) + round(LATE_OFFSET_MS * fs / 1000.0)
    t0 = min(h.size, late_start)
    t = np.arange(h.size - t0) / fs
    if bands:
        parts = octave_split(h, fs)
        # A band without a measurable decay (e.g. nearly empty) follows the broadband one.
        band_t = [_decay_time(p, fs, d) for p in parts]
        band_t = [bt if math.isfinite(bt) else t_old for bt in band_t]
    else:
        parts = h[np.newaxis, :]
        band_t = [t_old]

    fade_s = _FADE_MS / 1000.0

    def apply(f: float) -> np.ndarray:
        out = h.copy()
        late = np.zeros(t.size)
        for part, bt in zip(parts, band_t, strict=True):
            # Amplitude rate change LN_1000 * (1/T_new - 1/T_old) with T_new = f * T_old.
            envelope = np.exp(-t * LN_1000 / bt * (1.0 / f - 1.0))
            # Raised-cosine fade to zero ending where the new decay reaches -DECAY_FLOOR_DB.
            t_end = DECAY_FLOOR_DB / 60.0 * f * bt
            x = np.clip((t_end - t) / fade_s, 0.0, 1.0)
            late += part[t0:] * envelope * (0.5 - 0.5 * np.cos(np.pi * x))
        out[t0:] = late
        return out

    out = apply(factor)
    for _ in range(8):
        measured = _rt(out, fs, decay_db=30.0)
        if not math.isfinite(measured) or abs(measured / target - 1.0) < 0.005:
            break
        factor *= target / measured
        out = apply(factor)
    measured = _rt(out, fs, decay_db=30.0)
    # Refuse rather than return an RIR whose T30 label would not be the target: typically a
    # lengthened decay that no longer fits in the RIR (its T30 becomes unmeasurable/biased).
    if not math.isfinite(measured) or abs(measured / target - 1.0) > TARGET_TOLERANCE:
        got = "unmeasurable (nan)" if not math.isfinite(measured) else f"{measured:.3f} s"
        raise ValueError(
            f"cannot reach T30 {target:.3f} s from {t_old:.3f} s: the result's T30 is {got}; "
            f"the RIR ({h.size / fs:.2f} s) is probably too short to hold the new decay "
            f"(simulate a longer RIR or lengthen less)"
        )
    return out


# --------------------------------------------------------------------------- draws


def _range(config: Mapping[str, Any], key: str) -> tuple[float, float]:
    value = config.get(key, DEFAULT_AUGMENTATION[key])
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        msg = f"augmentation {key!r} must be a [low, high] pair, got {value!r}"
        raise ValueError(msg) from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"augmentation {key!r} must be finite with low <= high, got {value!r}")
    return lo, hi


def draw_augmentation(seed: int, config: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Draw one augmentation: ``{"drr_change_db": ..., "rt60_factor": ...}``.

    ``config`` may give ``drr_change_db`` (a ``[low, high]`` dB range, drawn uniformly: the
    change to add to the RIR's measured DRR) and ``rt60_factor`` (a ``[low, high]`` range of
    ``T_new / T_old``, drawn log-uniformly so 0.5 and 2 are equally likely); missing keys use
    ``DEFAULT_AUGMENTATION``; unknown keys are an error (a typo would silently do nothing).
    Both values are always drawn, in this order, from ``numpy.random.default_rng(seed)``, so
    the result depends only on ``seed`` and the ranges.

    Raises:
        ValueError: for a non-integer/negative seed, unknown keys or a bad range (the factor
            range must be positive).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    config = {} if config is None else config
    unknown = sorted(set(config) - set(DEFAULT_AUGMENTATION))
    if unknown:
        raise ValueError(
            f"unknown augmentation key(s) {unknown}; known: {sorted(DEFAULT_AUGMENTATION)}"
        )
    drr_lo, drr_hi = _range(config, "drr_change_db")
    f_lo, f_hi = _range(config, "rt60_factor")
    if f_lo <= 0.0:
        raise ValueError(f"augmentation 'rt60_factor' must be positive, got {[f_lo, f_hi]}")
    rng = np.random.default_rng(int(seed))
    u_drr, u_rt = rng.random(2)
    return {
        "drr_change_db": float(drr_lo + (drr_hi - drr_lo) * u_drr),
        "rt60_factor": float(math.exp(math.log(f_lo) + (math.log(f_hi) - math.log(f_lo)) * u_rt)),
    }
