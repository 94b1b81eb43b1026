"""Speech quality and dereverberation metrics with explicit missing-value handling.

Every metric is a pure function of 1-D float signals. Intrusive metrics take
``(estimate, reference, fs)``; SRMR is non-intrusive and takes ``(signal, fs)``.

Why the missing-value machinery: the metric libraries fail in quiet ways that poison averages
(see ``DESIGN.md``, "Dereverberation quality"): ``pesq`` raises on silent references and signals
under 0.25 s, and in its return-values mode yields error codes such as -1/-6/-7 that look like
scores; ``pystoi`` returns 1e-5 with only a warning when fewer than 30 non-silent frames remain.
Here every such case raises :class:`MetricUnavailable` with a reason, :func:`compute_metrics`
records it under ``MetricResult.missing`` and :func:`summarize` keeps it out of the means while
counting it.

Conventions shared by all metrics:

- Length mismatch: both signals are trimmed to the shorter length (from the end; no
  re-alignment). Align delays before scoring; a delay is *scored*, not corrected.
- Signals shorter than 0.25 s, non-finite samples and (for intrusive metrics) a silent reference
  make a metric unavailable.
- Non-16 kHz input to PESQ and SRMR is resampled to 16 kHz with ``scipy.signal.resample_poly``
  (8 kHz input is up-sampled and scored in wide-band mode too, to keep one scale).

REVERB challenge measures (``cepstral_distance``, ``llr``, ``fw_segsnr``) port the challenge's
Matlab evaluation tools (``cepsdist.m``, ``lpcllr.m``, ``fwsegsnr.m``, 25 ms symmetric Hann
frames, 10 ms shift). Deviations are listed in each docstring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import fftconvolve, hilbert, lfilter, resample_poly

MIN_DURATION_S = 0.25
"""Shortest signal any metric accepts (PESQ's own limit; frame measures get too few frames)."""

SILENCE_RMS = 1e-8
"""RMS below which a signal counts as silent (about -160 dBFS for full scale 1.0)."""

PESQ_FS = 16000
SRMR_FS = 16000

DEFAULT_METRICS: tuple[str, ...] = ("pesq_wb", "estoi", "si_sdr", "srmr", "cd", "llr", "fwsegsnr")


class MetricUnavailable(ValueError):
    """A metric cannot be computed for this input; the message is the reason recorded."""


# ---------------------------------------------------------------------------------------------
# input handling


def _as_signal(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    return arr


def _check_signal(x: np.ndarray, fs: int, what: str) -> None:
    if not np.all(np.isfinite(x)):
        raise MetricUnavailable(f"non-finite values (NaN/inf) in {what}")
    if x.size < MIN_DURATION_S * fs:
        raise MetricUnavailable(
            f"signal shorter than {MIN_DURATION_S} s ({x.size / fs:.3f} s at {fs} Hz)"
        )


def _is_silent(x: np.ndarray) -> bool:
    return x.size == 0 or float(np.sqrt(np.mean(x**2))) < SILENCE_RMS


def _prepare_pair(
    estimate: np.ndarray, reference: np.ndarray, fs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Trim to the shorter length and reject inputs no intrusive metric can score."""
    est = _as_signal(estimate, "estimate")
    ref = _as_signal(reference, "reference")
    n = min(est.size, ref.size)
    est, ref = est[:n], ref[:n]
    _check_signal(ref, fs, "reference")
    _check_signal(est, fs, "estimate")
    if _is_silent(ref):
        raise MetricUnavailable("silent reference")
    return est, ref


def _resample(x: np.ndarray, fs: int, target: int) -> np.ndarray:
    if fs == target:
        return x
    g = math.gcd(int(fs), int(target))
    return resample_poly(x, target // g, int(fs) // g)


# ---------------------------------------------------------------------------------------------
# PESQ / ESTOI / SI-SDR


def pesq_wb(estimate: np.ndarray, reference: np.ndarray, fs: int) -> float:
    """Wide-band PESQ (ITU-T P.862.2 MOS-LQO, about 1.0-4.64) via the ``pesq`` package.

    Input at rates other than 16 kHz is resampled to 16 kHz first (8 kHz too: we never switch to
    narrow-band mode, whose scale differs). Library exceptions and error return codes become
    :class:`MetricUnavailable`; a wide-band MOS-LQO below 0.5 cannot occur, so such a value is
    treated as an error code rather than averaged. A silent estimate is reported as unavailable
    (the library crashes on it) -- ``summarize`` counts it, so a model that outputs silence
    shows up in ``n_missing`` rather than vanishing.
    """
    from pesq import PesqError, pesq

    est, ref = _prepare_pair(estimate, reference, fs)
    if _is_silent(est):
        # pesq 0.0.4 fails inside its C error path (ValueError: NaN to integer) on this input.
        raise MetricUnavailable("silent estimate (pesq cannot score it)")
    est16, ref16 = _resample(est, fs, PESQ_FS), _resample(ref, fs, PESQ_FS)
    try:
        value = float(pesq(PESQ_FS, ref16, est16, "wb"))
    except (PesqError, ValueError) as exc:  # NoUtterancesError, BufferTooShortError, ...
        raise MetricUnavailable(f"pesq {type(exc).__name__}: {exc}") from exc
    if not math.isfinite(value) or value < 0.5:
        raise MetricUnavailable(f"pesq returned error code {value}")
    return value


def estoi(estimate: np.ndarray, reference: np.ndarray, fs: int) -> float:
    """Extended STOI (Jensen & Taal 2016) via ``pystoi`` (which resamples to 10 kHz itself).

    pystoi returns 1e-5 with a RuntimeWarning when fewer than 30 frames survive its 40 dB
    silence removal; that is reported as unavailable instead of a near-zero score.
    """
    from pystoi import stoi

    est, ref = _prepare_pair(estimate, reference, fs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(ref, est, int(fs), extended=True))
    too_few = any("Not enough STFT frames" in str(w.message) for w in caught)
    if too_few or value == 1e-5:
        raise MetricUnavailable("pystoi: fewer than 30 non-silent frames (returned 1e-5)")
    if not math.isfinite(value):
        raise MetricUnavailable(f"pystoi returned {value}")
    return value


SI_SDR_CAP_DB = 150.0
"""|SI-SDR| is capped here: identical signals would give +inf (float64 resolves about 150 dB)."""


def si_sdr(estimate: np.ndarray, reference: np.ndarray, fs: int | None = None) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019), both signals made zero-mean first.

    ``SI-SDR = 10 log10(|a s|^2 / |a s - s_hat|^2)`` with ``a = <s_hat, s> / |s|^2``. Invariant to
    the gain of the estimate, not to delays. Capped at +-150 dB so identical signals give a
    finite number. A silent estimate has SI-SDR -inf and is reported as unavailable (with that
    reason) rather than averaged. ``fs`` is only used for the minimum-duration check.
    """
    est, ref = _prepare_pair(estimate, reference, fs if fs is not None else 1)
    est = est - est.mean()
    ref = ref - ref.mean()
    if _is_silent(est):
        raise MetricUnavailable("silent estimate (SI-SDR is -inf)")
    ref_energy = float(ref @ ref)
    if ref_energy <= 0.0:
        raise MetricUnavailable("reference is constant (zero after mean removal)")
    alpha = float(est @ ref) / ref_energy
    target = alpha * ref
    noise = est - target
    t_energy = float(target @ target)
    n_energy = float(noise @ noise)
    floor = 10.0 ** (-SI_SDR_CAP_DB / 10.0)
    total = t_energy + n_energy
    value = 10.0 * math.log10(max(t_energy, floor * total) / max(n_energy, floor * total))
    return float(np.clip(value, -SI_SDR_CAP_DB, SI_SDR_CAP_DB))


# ---------------------------------------------------------------------------------------------
# SRMR (non-intrusive)

_EAR_Q = 9.26449  # Glasberg & Moore ERB parameters as used by Slaney's Auditory Toolbox
_MIN_BW = 24.7


def _erb_space(low_freq: float, high_freq: float, n: int) -> np.ndarray:
    """Slaney's ``ERBSpace``: ``n`` centre frequencies ERB-spaced from ``high_freq`` down to
    ``low_freq`` (``low_freq`` is included, ``high_freq`` is not), returned ascending."""
    k = np.arange(1, n + 1)
    c = _EAR_Q * _MIN_BW
    cf = -c + np.exp(k * (-np.log(high_freq + c) + np.log(low_freq + c)) / n) * (high_freq + c)
    return cf[::-1]


def _gammatone_fir(cf: float, fs: int) -> np.ndarray:
    """4th-order gammatone impulse response, unit gain at ``cf``, truncated where its envelope
    has fallen by about 100 dB (t = 20 / b)."""
    erb = cf / _EAR_Q + _MIN_BW
    b = 2.0 * np.pi * 1.019 * erb
    t = np.arange(int(np.ceil(20.0 / b * fs))) / fs
    h = t**3 * np.exp(-b * t) * np.cos(2.0 * np.pi * cf * t)
    gain = np.abs(np.sum(h * np.exp(-2j * np.pi * cf * t)))
    return h / gain


def _modulation_filter(fc: float, fs: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Second-order band-pass (bilinear transform, pre-warped) with centre ``fc`` and Q."""
    w0 = np.tan(np.pi * fc / fs)
    b0 = w0 / q
    b = np.array([b0, 0.0, -b0])
    a = np.array([1.0 + b0 + w0**2, 2.0 * w0**2 - 2.0, 1.0 - b0 + w0**2])
    return b / a[0], a / a[0]


def modulation_centre_frequencies(
    min_cf: float = 4.0, max_cf: float = 128.0, n: int = 8
) -> np.ndarray:
    """Log-spaced modulation filter centre frequencies (4 ... 128 Hz for SRMR)."""
    return min_cf * (max_cf / min_cf) ** (np.arange(n) / (n - 1))


def srmr(
    signal: np.ndarray,
    fs: int,
    n_bands: int = 23,
    low_freq: float = 125.0,
    n_mod: int = 8,
    q: float = 2.0,
    window_s: float = 0.256,
    hop_s: float = 0.064,
) -> float:
    """Speech-to-reverberation modulation energy ratio (Falk, Zheng & Chan 2010), non-intrusive.

    Reverberation fills the gaps between syllables, moving envelope energy from the low
    modulation frequencies of speech (4-20 Hz) to higher ones; SRMR is the ratio of the two.

    Pipeline: resample to 16 kHz -> 23 gammatone bands ERB-spaced from 125 Hz to just below
    fs/2 -> Hilbert envelope -> 8 second-order modulation band-pass filters (4-128 Hz, log
    spaced, Q = 2) -> energy in 256 ms Hamming frames (64 ms hop), averaged over frames ->
    energy of modulation bands 1-4 over bands 5-8, summed over all acoustic bands.

    This is a simplified re-implementation, not the reference toolbox: gammatone filters are
    FIR-sampled impulse responses instead of Slaney's IIR cascade; the upper modulation band is
    fixed at 8 (the toolbox adapts it, K*, to the signal's 90 % energy bandwidth); no "fast"
    variant, no normalisation option, no VAD. Absolute values are therefore not comparable with
    published SRMR numbers; SRMR also varies strongly with the speaker. Compare only relative
    changes of the same utterances (processed vs unprocessed).
    """
    x = _as_signal(signal, "signal")
    _check_signal(x, fs, "signal")
    if _is_silent(x):
        raise MetricUnavailable("silent signal")
    x = _resample(x, fs, SRMR_FS)
    fs = SRMR_FS
    x = x - x.mean()
    x = x / np.sqrt(np.mean(x**2))

    cfs = _erb_space(low_freq, fs / 2.0, n_bands)
    mod_filters = [_modulation_filter(fc, fs, q) for fc in modulation_centre_frequencies(n=n_mod)]
    win = int(np.ceil(window_s * fs))
    hop = int(np.ceil(hop_s * fs))
    n = max(x.size, win)
    n_frames = 1 + (n - win + hop - 1) // hop
    padded_len = win + (n_frames - 1) * hop
    window = np.hamming(win + 1)[:-1]

    energy = np.zeros((n_bands, n_mod))
    for i, cf in enumerate(cfs):
        band = fftconvolve(x, _gammatone_fir(cf, fs))[: x.size]
        envelope = np.abs(hilbert(band))
        for j, (b, a) in enumerate(mod_filters):
            mod = lfilter(b, a, envelope)
            mod = np.pad(mod, (0, padded_len - mod.size))
            frames = np.lib.stride_tricks.sliding_window_view(mod, win)[::hop][:n_frames]
            energy[i, j] = np.mean(np.sum((frames * window) ** 2, axis=1))
    low = energy[:, : n_mod // 2].sum()
    high = energy[:, n_mod // 2 :].sum()
    if high <= 0.0:
        raise MetricUnavailable("no high-modulation energy")
    return float(low / high)


# ---------------------------------------------------------------------------------------------
# REVERB challenge measures

_FRAME_S = 0.025
_SHIFT_S = 0.010


def _matlab_hanning(n: int) -> np.ndarray:
    """Matlab ``hanning(n)``: symmetric Hann without the zero end points."""
    k = np.arange(1, n + 1)
    return 0.5 * (1.0 - np.cos(2.0 * np.pi * k / (n + 1)))


def _reverb_frames(x: np.ndarray, fs: int) -> np.ndarray:
    """Windowed frames ``(n_frames, frame)`` exactly as the REVERB scripts cut them."""
    frame = int(_FRAME_S * fs)
    shift = int(_SHIFT_S * fs)
    n_frames = (x.size - frame + shift) // shift
    if n_frames < 1:
        raise MetricUnavailable("signal shorter than one 25 ms frame")
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[::shift][:n_frames]
    return frames * _matlab_hanning(frame)


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def _real_cepstrum(frames: np.ndarray, floor_db: float = -100.0) -> np.ndarray:
    """REVERB ``realceps``: |FFT| floored at (global max) * 10^(floor_db/20), log, real IFFT."""
    n_fft = _next_pow2(frames.shape[1])
    mag = np.abs(np.fft.fft(frames, n_fft, axis=1))
    mag = np.maximum(mag, mag.max() * 10.0 ** (floor_db / 20.0))
    return np.real(np.fft.ifft(np.log(mag), axis=1))


def cepstral_distance(
    estimate: np.ndarray, reference: np.ndarray, fs: int, order: int = 24
) -> float:
    """Cepstral distance in dB (REVERB ``cepsdist.m`` with cepstral mean normalisation).

    Per frame ``CD = 10/ln(10) * sqrt((c0 - c0')^2 + 2 sum_{k=1..24} (ck - ck')^2)`` after
    subtracting each signal's mean cepstrum over frames, clipped to [0, 10] dB, then the mean
    over frames. Lower is better; a gain change does not alter it (CMN removes c0's mean).

    Deviations: no time-difference search (the challenge's ``timdif`` parameter is 0 anyway);
    when the cepstrum floor is hit by both signals nothing changes; the frame mean (not the
    median, which the challenge also prints) is returned.
    """
    est, ref = _prepare_pair(estimate, reference, fs)
    if _is_silent(est):
        raise MetricUnavailable("silent estimate (cepstrum undefined)")
    c_ref = _real_cepstrum(_reverb_frames(ref, fs))[:, : order + 1]
    c_est = _real_cepstrum(_reverb_frames(est, fs))[:, : order + 1]
    c_ref = c_ref - c_ref.mean(axis=0)
    c_est = c_est - c_est.mean(axis=0)
    err = (c_ref - c_est) ** 2
    dist = 10.0 / np.log(10.0) * np.sqrt(2.0 * err[:, 1:].sum(axis=1) + err[:, 0])
    return float(np.mean(np.clip(dist, 0.0, 10.0)))


def _levinson(r: np.ndarray, order: int) -> np.ndarray:
    """Levinson-Durbin on rows of autocorrelations ``r`` (n, >= order+1): LPC polynomials
    ``[1, a1, ..., a_order]`` per row (Matlab ``levinson`` convention)."""
    n = r.shape[0]
    a = np.zeros((n, order + 1))
    a[:, 0] = 1.0
    err = r[:, 0].copy()
    for i in range(1, order + 1):
        acc = r[:, i] + np.sum(a[:, 1:i] * r[:, i - 1 : 0 : -1], axis=1)
        k = -acc / err
        prev = a[:, 1:i].copy()
        a[:, 1:i] = prev + k[:, None] * prev[:, ::-1]
        a[:, i] = k
        err = err * (1.0 - k**2)
    return a


def llr(estimate: np.ndarray, reference: np.ndarray, fs: int, order: int = 12) -> float:
    """LPC log-likelihood ratio (REVERB ``lpcllr.m``): ``log(a_e R_r a_e' / a_r R_r a_r')``.

    ``a_e``, ``a_r`` are order-12 LPC polynomials of the estimate and reference frames and
    ``R_r`` the reference autocorrelation (Toeplitz) matrix. As in the challenge script the 5 %
    largest frame values are discarded, the rest clipped to [0, 2] and averaged. Lower is better.

    Deviation: frames in which either signal is digitally silent (zero energy; the Matlab script
    produces NaN there) are skipped.
    """
    est, ref = _prepare_pair(estimate, reference, fs)
    frame = int(_FRAME_S * fs)
    n_fft = _next_pow2(2 * frame - 1)

    def autocorr(x: np.ndarray) -> np.ndarray:
        spec = np.fft.fft(_reverb_frames(x, fs), n_fft, axis=1)
        return np.real(np.fft.ifft(np.abs(spec) ** 2, axis=1))[:, : order + 1] / frame

    r_est, r_ref = autocorr(est), autocorr(ref)
    valid = (r_est[:, 0] > 0.0) & (r_ref[:, 0] > 0.0)
    if not np.any(valid):
        raise MetricUnavailable("no frame with energy in both signals")
    r_est, r_ref = r_est[valid], r_ref[valid]
    a_est, a_ref = _levinson(r_est, order), _levinson(r_ref, order)
    lags = np.abs(np.arange(order + 1)[:, None] - np.arange(order + 1)[None, :])
    toeplitz = r_ref[:, lags]  # (n, order+1, order+1)
    num = np.einsum("ni,nij,nj->n", a_est, toeplitz, a_est)
    den = np.einsum("ni,nij,nj->n", a_ref, toeplitz, a_ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.log(num / den)
    dist = dist[np.isfinite(dist)]
    if dist.size == 0:
        raise MetricUnavailable("LPC analysis failed on every frame")
    dist = np.sort(dist)[: int(np.ceil(dist.size * 0.95))]
    return float(np.mean(np.clip(dist, 0.0, 2.0)))


def _hz_to_mel_htk(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def _mel_to_hz_htk(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)


def _fft2melmx(n_fft: int, fs: int, n_bands: int) -> np.ndarray:
    """Ellis' ``fft2melmx(nfft, fs, n_bands, 1, 0, fs/2, htkmel=1, constamp=1)`` as called by
    REVERB's ``fwsegsnr.m``: HTK-mel triangles with unit peak, shape (n_bands, n_fft//2+1)."""
    fft_freqs = np.arange(n_fft // 2 + 1) / n_fft * fs
    mels = np.linspace(0.0, _hz_to_mel_htk(fs / 2.0), n_bands + 2)
    edges = _mel_to_hz_htk(mels)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_freqs[None, :] - lo) / (mid - lo)
    falling = (hi - fft_freqs[None, :]) / (hi - mid)
    return np.maximum(0.0, np.minimum(rising, falling))


def fw_segsnr(estimate: np.ndarray, reference: np.ndarray, fs: int, n_bands: int = 23) -> float:
    """Frequency-weighted segmental SNR in dB (REVERB ``fwsegsnr.m``, after Hu & Loizou 2008).

    Both signals are normalised to unit energy; per 25 ms frame the magnitude spectra are
    warped to 23 mel bands (the challenge's critical-band approximation), and
    ``10 sum_b W_b log10(R_b^2 / (R_b - E_b)^2) / sum_b W_b`` with ``W_b = R_b^0.2`` (reference
    band magnitude, Hu & Loizou's gamma = 0.2) is clipped to [-10, 35] dB and averaged over
    frames. Higher is better; identical signals give the upper clip, 35 dB.

    Deviations: Hu & Loizou's own ``comp_fwseg`` uses 25 Gaussian-shaped critical bands, 30 ms
    frames and a different normalisation; we follow the REVERB script. Frames whose reference is
    digitally silent (all band weights zero; Matlab yields NaN there, which ``min``/``max`` then
    turn into 35 dB) are skipped, and an exactly zero band error is treated as an infinite band
    SNR (the clip then applies), as in Matlab.
    """
    est, ref = _prepare_pair(estimate, reference, fs)
    if _is_silent(est):
        raise MetricUnavailable("silent estimate (unit-energy normalisation undefined)")
    est = est / np.sqrt(np.sum(est**2))
    ref = ref / np.sqrt(np.sum(ref**2))
    frame = int(_FRAME_S * fs)
    n_fft = _next_pow2(frame)
    mel = _fft2melmx(n_fft, fs, n_bands)
    e_mel = np.abs(np.fft.rfft(_reverb_frames(est, fs), n_fft, axis=1)) @ mel.T
    r_mel = np.abs(np.fft.rfft(_reverb_frames(ref, fs), n_fft, axis=1)) @ mel.T
    weight = r_mel**0.2
    err2 = (r_mel - e_mel) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        band_snr = np.where(weight > 0.0, 10.0 * np.log10(r_mel**2 / err2), 0.0)
    band_snr = np.minimum(band_snr, 1e3)  # +inf (zero error) -> large finite, clipped below
    w_sum = weight.sum(axis=1)
    valid = w_sum > 0.0
    if not np.any(valid):
        raise MetricUnavailable("reference silent in every frame")
    per_frame = np.sum(weight * band_snr, axis=1)[valid] / w_sum[valid]
    return float(np.mean(np.clip(per_frame, -10.0, 35.0)))


# ---------------------------------------------------------------------------------------------
# aggregation


@dataclass
class MetricResult:
    """Scores of one (estimate, reference) pair.

    ``values`` holds only finite, valid scores; ``missing`` maps each metric that could not be
    computed to the reason, so averages never silently include error codes or placeholders.
    ``n_samples`` is the scored length after trimming; ``trimmed`` is how many samples were cut
    from the longer signal.
    """

    values: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    n_samples: int = 0
    trimmed: int = 0


_INTRUSIVE: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "pesq_wb": pesq_wb,
    "estoi": estoi,
    "si_sdr": si_sdr,
    "cd": cepstral_distance,
    "llr": llr,
    "fwsegsnr": fw_segsnr,
}
_NON_INTRUSIVE: dict[str, Callable[[np.ndarray, int], float]] = {"srmr": srmr}
METRIC_NAMES: tuple[str, ...] = tuple(_INTRUSIVE) + tuple(_NON_INTRUSIVE)

HIGHER_IS_BETTER: dict[str, bool] = {
    "pesq_wb": True,
    "estoi": True,
    "si_sdr": True,
    "srmr": True,
    "cd": False,
    "llr": False,
    "fwsegsnr": True,
}


def compute_metrics(
    estimate: np.ndarray,
    reference: np.ndarray,
    fs: int,
    names: Sequence[str] = DEFAULT_METRICS,
) -> MetricResult:
    """Score ``estimate`` against ``reference`` with each named metric.

    Signals are trimmed to the shorter length first. SRMR is computed on the (trimmed) estimate
    only. Any metric that raises :class:`MetricUnavailable` or returns a non-finite value is
    recorded in ``missing`` with its reason; unknown names raise ``ValueError`` (a caller bug,
    not a data problem).
    """
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRIC_NAMES}")
    est = _as_signal(estimate, "estimate")
    ref = _as_signal(reference, "reference")
    n = min(est.size, ref.size)
    result = MetricResult(n_samples=n, trimmed=max(est.size, ref.size) - n)
    est, ref = est[:n], ref[:n]
    for name in names:
        try:
            if name in _INTRUSIVE:
                value = _INTRUSIVE[name](est, ref, fs)
            else:
                value = _NON_INTRUSIVE[name](est, fs)
        except MetricUnavailable as exc:
            result.missing[name] = str(exc)
            continue
        if not math.isfinite(value):
            result.missing[name] = f"non-finite result {value}"
            continue
        result.values[name] = float(value)
    return result


def summarize(results: Iterable[MetricResult]) -> dict[str, dict[str, float | int]]:
    """Per metric: mean over the results that have it, ``n`` (how many) and ``n_missing``.

    Missing entries never enter the mean; a metric missing everywhere gets ``mean`` NaN so the
    gap shows in a report instead of a fake number.
    """
    results = list(results)
    names: list[str] = []
    for res in results:
        for name in (*res.values, *res.missing):
            if name not in names:
                names.append(name)
    summary: dict[str, dict[str, float | int]] = {}
    for name in names:
        vals = [r.values[name] for r in results if name in r.values]
        summary[name] = {
            "mean": float(np.mean(vals)) if vals else float("nan"),
            "n": len(vals),
            "n_missing": sum(1 for r in results if name in r.missing),
        }
    return summary
