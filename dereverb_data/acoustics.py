"""Acoustic measures of a single-channel room impulse response (RIR), used as dataset labels.

All functions take a 1-D RIR (any real float dtype; computed internally in float64) and,
where time matters, the sampling rate ``fs`` in Hz.

Conventions
-----------
* **Direct path** (:func:`direct_path_index`): the first local maximum of ``|h|`` that reaches
  ``DIRECT_PEAK_FRACTION`` (0.3) of ``max|h|``. Preferring the *earliest strong* peak rather
  than the global maximum keeps the direct path even when a later early reflection is
  stronger (e.g. a source facing away, or a near wall). On a fractional-delay (sinc) peak only
  the sample right before the main lobe can reach the threshold (up to ~1/3 of the peak at a
  half-sample delay), and ``|h|`` rises from it into the main lobe, so the rule lands on the
  main-lobe sample nearest the true delay.
* **Direct window**: the direct sound is the energy in ``[d - w, d + w]`` (inclusive) with
  ``w = round(DIRECT_WINDOW_MS * fs / 1000)`` samples (2.5 ms, the common convention for DRR).
  Samples before ``d - w`` (propagation pre-delay, and the acausal ringing of zero-phase
  high-pass or fractional-delay filters) are ignored by DRR and C50.
* **RT60** (:func:`reverberation_time`): Schroeder backward integration starting at the
  direct-path index, least-squares line fit of the energy decay curve (EDC, dB) between
  ``start_db`` and ``start_db - decay_db``, extrapolated to a 60 dB decay (ISO 3382 style):
  T20 fits -5..-25 dB, T30 fits -5..-35 dB. ``nan`` when the RIR is too short: the EDC
  never falls that far, or the RIR ends less than ``TRUNCATION_MARGIN_DB`` (10 dB of decay
  at the fitted rate) after the fit range, where truncation would bias the fit.
* **DRR** (:func:`drr_db`): ``10 log10(E[d-w, d+w] / E(d+w, end])``.
* **C50**, **C80** (:func:`clarity_db`): ``10 log10(E[d-w, d+50ms) / E[d+50ms, end])``, and
  the same at 80 ms (ISO 3382's clarity for music).

No noise compensation (e.g. Lundeby truncation) is applied: the measures are meant for
simulated, noise-free RIRs.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "DIRECT_PEAK_FRACTION",
    "DIRECT_WINDOW_MS",
    "TRUNCATION_MARGIN_DB",
    "RirLabels",
    "clarity_db",
    "direct_path_index",
    "drr_db",
    "measure_rir",
    "reverberation_time",
    "schroeder_decay_db",
]

#: Half-width (ms) of the window ``[d - w, d + w]`` around the direct-path peak ``d`` whose
#: energy counts as direct sound in :func:`drr_db` (and whose start begins the early energy
#: in :func:`clarity_db`).
DIRECT_WINDOW_MS = 2.5

#: :func:`reverberation_time` returns nan unless the RIR goes on for at least this many dB of
#: decay (at the fitted rate) after the end of the fit range; a shorter RIR is truncated and
#: its Schroeder curve is biased.
TRUNCATION_MARGIN_DB = 10.0

#: A local maximum of ``|h|`` must reach this fraction of ``max|h|`` to be the direct path.
DIRECT_PEAK_FRACTION = 0.3


def _as_rir(rir: np.ndarray) -> np.ndarray:
    """Validate an RIR and return it as a float64 1-D array."""
    try:
        h = np.asarray(rir)
    except Exception as exc:  # pragma: no cover - exotic array-likes
        raise ValueError(f"RIR must be array-like, got {type(rir).__name__}") from exc
    if h.ndim != 1:
        raise ValueError(f"RIR must be 1-D (single channel), got shape {h.shape}")
    if h.size == 0:
        raise ValueError("RIR is empty")
    if np.iscomplexobj(h):
        raise ValueError("RIR must be real-valued, got a complex array")
    try:
        h = h.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"RIR must be numeric, got dtype {h.dtype}") from exc
    if not np.all(np.isfinite(h)):
        n_bad = int(np.count_nonzero(~np.isfinite(h)))
        raise ValueError(f"RIR contains {n_bad} non-finite value(s) (nan or inf)")
    if not np.any(h):
        raise ValueError("RIR is all zeros")
    return h


def _check_fs(fs: float) -> float:
    try:
        value = float(fs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"fs must be a positive number of Hz, got {fs!r}") from exc
    if isinstance(fs, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"fs must be a positive number of Hz, got {fs!r}")
    return value


def _check_direct_index(direct_index: int | None, h: np.ndarray) -> int:
    if direct_index is None:
        return direct_path_index(h)
    d = operator.index(direct_index)  # TypeError for a non-integer (e.g. a float index)
    if not 0 <= d < h.size:
        raise ValueError(f"direct_index {d} is outside the RIR (length {h.size})")
    return d


def _ms_to_samples(ms: float, fs: float, name: str) -> int:
    if not math.isfinite(ms) or ms < 0:
        raise ValueError(f"{name} must be a finite, non-negative number of ms, got {ms!r}")
    return round(ms * fs / 1000.0)


def _ratio_db(num: float, den: float) -> float:
    """``10 log10(num / den)`` with +inf for an empty denominator and -inf for an empty
    numerator."""
    if den <= 0.0:
        return math.inf
    if num <= 0.0:
        return -math.inf
    return 10.0 * math.log10(num / den)


def direct_path_index(rir: np.ndarray) -> int:
    """Index of the direct-path peak of an RIR.

    Rule: the first local maximum of ``|h|`` whose value is at least
    ``DIRECT_PEAK_FRACTION`` (0.3) times ``max|h|``. Concretely, find the first sample that
    reaches the threshold and climb while ``|h|`` strictly increases. On a plateau the first
    sample of the plateau is returned.

    Taking the earliest strong peak (not the global maximum) keeps the direct path when a
    later early reflection is stronger, as long as the direct path is at least 0.3 of the
    strongest peak (if it is weaker, the reflection is returned). For a simulated
    fractional-delay (sinc) peak the returned index is the sample nearest the true delay: the
    only side-lobe sample that can reach the threshold is the one right before the main lobe,
    and the climb continues from it into the main lobe. For pyroomacoustics RIRs the index is
    ``distance / c * fs + frac_delay_length // 2`` rounded (the simulator's global delay).

    Raises:
        ValueError: for an empty, non-1-D, non-finite or all-zero RIR.
    """
    a = np.abs(_as_rir(rir))
    threshold = DIRECT_PEAK_FRACTION * a.max()
    i = int(np.argmax(a >= threshold))
    n = a.size
    while i + 1 < n and a[i + 1] > a[i]:
        i += 1
    return i


def schroeder_decay_db(rir: np.ndarray) -> np.ndarray:
    """Schroeder backward-integrated energy decay curve (EDC) in dB.

    ``edc[n] = 10 log10(sum_{k >= n} h[k]^2 / sum_k h[k]^2)``, so ``edc[0] == 0`` dB and the
    curve is non-increasing. The whole input is integrated: pass ``rir[d:]`` to start at the
    direct path. Samples after the last non-zero sample are ``-inf``.

    Raises:
        ValueError: for an empty, non-1-D, non-finite or all-zero RIR.
    """
    h = _as_rir(rir)
    energy = np.cumsum((h * h)[::-1])[::-1]
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(energy / energy[0])


def reverberation_time(
    rir: np.ndarray,
    fs: int,
    decay_db: float = 30.0,
    start_db: float = -5.0,
    *,
    direct_index: int | None = None,
) -> float:
    """Reverberation time (s) extrapolated to a 60 dB decay, ISO 3382 style.

    The Schroeder EDC of ``rir[d:]`` (``d`` = ``direct_index`` or :func:`direct_path_index`)
    is fitted by least squares with a straight line over the samples where
    ``start_db >= EDC >= start_db - decay_db``; the result is ``-60 / slope``.
    ``decay_db=20`` gives T20, ``decay_db=30`` gives T30 (both with ``start_db=-5``).

    Returns ``nan`` (does not raise) when the RIR is too short for the measure: the EDC never
    reaches ``start_db - decay_db``, fewer than two samples lie in the fit range, the fitted
    slope is not negative, or the RIR stops less than ``TRUNCATION_MARGIN_DB`` (10 dB, at the
    fitted decay rate) after the fit range -- the EDC of a truncated RIR always falls to
    -inf at its end, so reaching ``start_db - decay_db`` alone does not make the fit valid.

    Raises:
        ValueError: for a bad RIR, ``fs``, ``direct_index``, ``decay_db <= 0`` or
            ``start_db > 0``.
    """
    h = _as_rir(rir)
    fs_f = _check_fs(fs)
    if not math.isfinite(decay_db) or decay_db <= 0:
        raise ValueError(f"decay_db must be a positive number of dB, got {decay_db!r}")
    if not math.isfinite(start_db) or start_db > 0:
        raise ValueError(f"start_db must be a finite number <= 0 dB, got {start_db!r}")
    d = _check_direct_index(direct_index, h)
    tail = h[d:]
    if not np.any(tail):
        return math.nan
    edc = schroeder_decay_db(tail)
    end_db = start_db - decay_db
    if not np.any(edc <= end_db):
        return math.nan
    # The EDC is non-increasing, so the fit range is one contiguous block of samples.
    idx = np.flatnonzero((edc <= start_db) & (edc >= end_db))
    if idx.size < 2:
        return math.nan
    t = idx / fs_f
    slope, _ = np.polyfit(t, edc[idx], 1)
    if not slope < 0:
        return math.nan
    # Truncation guard: the backward integral of a decay cut off at sample ``last`` bends
    # down towards -inf before ``last``, which biases the fit (RT too short). Require the RIR
    # to continue, at the fitted rate, for another ``TRUNCATION_MARGIN_DB`` after the fit.
    last = int(np.flatnonzero(tail)[-1])
    if (last - idx[-1]) / fs_f < TRUNCATION_MARGIN_DB / -slope:
        return math.nan
    return float(-60.0 / slope)


def drr_db(
    rir: np.ndarray,
    fs: int,
    direct_index: int | None = None,
    window_ms: float = DIRECT_WINDOW_MS,
) -> float:
    """Direct-to-reverberant ratio (dB).

    ``10 log10(E_direct / E_reverb)`` with ``E_direct`` the energy of samples
    ``[d - w, d + w]`` (inclusive, clipped at 0) and ``E_reverb`` the energy of samples after
    ``d + w``, where ``d`` is ``direct_index`` (default :func:`direct_path_index`) and
    ``w = round(window_ms * fs / 1000)``. Samples before ``d - w`` are ignored (pre-delay,
    acausal filter ringing). Returns ``+inf`` when there is no energy after the window.

    Raises:
        ValueError: for a bad RIR, ``fs``, ``window_ms`` or an out-of-range ``direct_index``
            (TypeError if it is not an integer).
    """
    h = _as_rir(rir)
    fs_f = _check_fs(fs)
    w = _ms_to_samples(window_ms, fs_f, "window_ms")
    d = _check_direct_index(direct_index, h)
    e = h * h
    direct = float(e[max(0, d - w) : d + w + 1].sum())
    reverb = float(e[d + w + 1 :].sum())
    return _ratio_db(direct, reverb)


def clarity_db(
    rir: np.ndarray,
    fs: int,
    early_ms: float = 50.0,
    direct_index: int | None = None,
) -> float:
    """Clarity index (dB): C50 with ``early_ms=50``, C80 with ``early_ms=80``.

    ``10 log10(E_early / E_late)`` with ``E_early`` the energy of samples
    ``[d - w, d + n)`` and ``E_late`` the energy of samples ``[d + n, end)``, where ``d`` is
    ``direct_index`` (default :func:`direct_path_index`), ``w`` the direct window
    (``DIRECT_WINDOW_MS``) and ``n = round(early_ms * fs / 1000)``. Samples before ``d - w``
    are ignored. Returns ``+inf`` when the RIR ends before ``d + n`` or has no late energy.

    Raises:
        ValueError: for a bad RIR, ``fs``, ``early_ms`` or an out-of-range ``direct_index``
            (TypeError if it is not an integer).
    """
    h = _as_rir(rir)
    fs_f = _check_fs(fs)
    n = _ms_to_samples(early_ms, fs_f, "early_ms")
    w = _ms_to_samples(DIRECT_WINDOW_MS, fs_f, "DIRECT_WINDOW_MS")
    d = _check_direct_index(direct_index, h)
    e = h * h
    early = float(e[max(0, d - w) : d + n].sum())
    late = float(e[d + n :].sum())
    return _ratio_db(early, late)


# How the RT60 labels are measured, recorded with every banked RIR.
RT60_METHOD = (
    "Schroeder backward integration, line fit -5..-25 dB (T20) / -5..-35 dB (T30), "
    "extrapolated to 60 dB"
)


@dataclass(frozen=True)
class RirLabels:
    """Acoustic labels of one RIR (times in s, ratios in dB, index in samples)."""

    rt60_t20: float
    rt60_t30: float
    drr_db: float
    c50_db: float
    c80_db: float
    direct_index: int

    def to_dict(self) -> dict:
        """Plain-Python dict (float/int values), e.g. for JSON or a manifest row."""
        out = asdict(self)
        return {k: int(v) if k == "direct_index" else float(v) for k, v in out.items()}


def measure_rir(rir: np.ndarray, fs: int) -> RirLabels:
    """All labels of an RIR: T20, T30, DRR, C50, C80 and the direct-path index.

    The direct-path index is found once and shared by all measures. T20/T30 may be ``nan``
    for a short RIR; DRR/C50/C80 may be ``+inf`` when there is no energy after the window.
    """
    h = _as_rir(rir)
    _check_fs(fs)
    d = direct_path_index(h)
    return RirLabels(
        rt60_t20=reverberation_time(h, fs, decay_db=20.0, direct_index=d),
        rt60_t30=reverberation_time(h, fs, decay_db=30.0, direct_index=d),
        drr_db=drr_db(h, fs, direct_index=d),
        c50_db=clarity_db(h, fs, early_ms=50.0, direct_index=d),
        c80_db=clarity_db(h, fs, early_ms=80.0, direct_index=d),
        direct_index=d,
    )
