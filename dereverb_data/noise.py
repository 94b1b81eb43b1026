"""Additive noise for the reverberant input: coloured noise, noise files, mixing at an SNR.

Noise is added to the *reverberant input only*; the clean target stays noise-free.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.fft import irfft, rfft

from .corpus import AudioError, Quarantined, file_hash, find_files, read_audio

__all__ = [
    "COLOUR_EXPONENTS",
    "MIN_SHAPING_HZ",
    "NoiseDraw",
    "NoiseFile",
    "coloured_noise",
    "load_noise_file",
    "mix_at_snr",
    "noise_signal",
    "scan_noise_files",
]

#: Power spectrum ~ 1 / f^exponent: white 0, pink 1 (-3 dB/octave), brown 2 (-6 dB/octave).
COLOUR_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}

#: Below this frequency the 1/f shaping is held flat: otherwise the few lowest bins (sub-audio
#: drift) would carry most of a brown noise's power once it is normalised to unit RMS.
MIN_SHAPING_HZ = 20.0


def coloured_noise(n: int, sample_rate: int, colour: str = "white", seed: int = 0) -> np.ndarray:
    """``n`` samples of Gaussian noise with a 1/f^k power spectrum, unit RMS, float64.

    White Gaussian noise from ``numpy.random.default_rng(seed)`` is shaped in the FFT domain by
    ``f^(-k/2)`` (amplitude), ``k`` from ``COLOUR_EXPONENTS``, held flat below
    ``MIN_SHAPING_HZ``; the DC bin is zeroed. Deterministic for a given (n, rate, colour, seed).

    Raises:
        ValueError: for a non-positive ``n``/``sample_rate``, an unknown colour or a bad seed.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ValueError(f"n must be a positive int number of samples, got {n!r}")
    if isinstance(sample_rate, bool) or not (
        isinstance(sample_rate, int | float | np.number) and sample_rate > 0
    ):
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate!r}")
    if colour not in COLOUR_EXPONENTS:
        raise ValueError(f"unknown noise colour {colour!r}; choose one of {list(COLOUR_EXPONENTS)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    white = np.random.default_rng(int(seed)).standard_normal(int(n))
    if n == 1:
        return np.ones(1)  # one sample: only its sign would be random, unit RMS is 1
    exponent = COLOUR_EXPONENTS[colour]
    spectrum = rfft(white)
    freqs = np.arange(spectrum.size) * float(sample_rate) / n
    shape = np.maximum(freqs, MIN_SHAPING_HZ) ** (-exponent / 2.0)
    shape[0] = 0.0  # a DC offset is not noise
    noise = irfft(spectrum * shape, n)
    rms = math.sqrt(float(np.mean(noise**2)))
    if rms == 0.0:  # only for tiny n where every bin but DC is ~0
        raise ValueError(f"n={n} is too short to shape {colour} noise")
    return noise / rms


def mix_at_snr(
    reverberant: np.ndarray, noise: np.ndarray, snr_db: float, offset: int = 0
) -> tuple[np.ndarray, float]:
    """Add ``noise`` to ``reverberant`` at ``snr_db``; returns ``(noisy, noise_gain)``.

    The noise is taken from sample ``offset`` on and looped (or cropped) to the signal's
    length; that exact segment is scaled by ``noise_gain`` so that
    ``10 log10(P_signal / P_noise) == snr_db`` with both powers the mean square over the
    **whole** signal length (the utterance and its reverberant tail, pauses included; not only
    the active speech, so the SNR in active speech is somewhat higher). ``noise_gain`` is the
    factor applied to the given noise, to record as a label. Looping has no crossfade: give a
    noise at least as long as the signal to avoid a seam.

    Returns ``noisy`` as float64.

    Raises:
        ValueError: for empty/non-1-D/non-finite inputs, an all-zero signal or noise segment
            (SNR undefined), a non-finite ``snr_db`` or a bad ``offset``.
    """
    x = _as_signal(reverberant, "reverberant")
    v = _as_signal(noise, "noise")
    snr = float(snr_db)
    if not math.isfinite(snr):
        raise ValueError(f"snr_db must be a finite number of dB, got {snr_db!r}")
    if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    segment = v[(offset + np.arange(x.size)) % v.size]
    p_signal = float(np.mean(x * x))
    p_noise = float(np.mean(segment * segment))
    if p_signal == 0.0:
        raise ValueError("reverberant signal is all zeros: the SNR is undefined")
    if p_noise == 0.0:
        raise ValueError("noise segment is all zeros: it cannot be scaled to an SNR")
    gain = math.sqrt(p_signal / (p_noise * 10.0 ** (snr / 10.0)))
    return x + gain * segment, gain


def _as_signal(signal: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(signal)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be real numeric, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return a


def load_noise_file(path: str | Path, sample_rate: int) -> np.ndarray:
    """A noise recording as mono float32 at ``sample_rate``.

    Any rate and channel count: :func:`dereverb_data.corpus.read_audio` resamples (soxr) and
    averages the channels.

    Raises:
        FileNotFoundError: the file does not exist.
        AudioError: unreadable, empty, non-finite or all-zero audio (a ValueError; the message
            names the file).
        ValueError: a non-positive ``sample_rate``.
    """
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, int | np.integer)
        or (sample_rate <= 0)
    ):
        raise ValueError(f"sample_rate must be a positive int number of Hz, got {sample_rate!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"noise file {p} does not exist (or is not a file)")
    signal, _rate, _channels = read_audio(p, int(sample_rate), downmix="mean")
    if not np.any(signal):
        raise AudioError(f"{p}: noise file is all zeros (silent)")
    return signal


@dataclass(frozen=True)
class NoiseFile:
    """One usable noise recording, as the scan found it (length at the build's rate)."""

    source: str  # absolute path
    content_hash: str  # sha256 of the file's bytes (24 hex digits)
    num_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NoiseDraw:
    """One example's noise: a generated colour (``seed``) or a file from ``offset`` on."""

    snr_db: float
    kind: str  # "colour" or "file"
    colour: str | None = None
    seed: int = 0
    source: str | None = None
    content_hash: str | None = None
    offset: int = 0

    def fingerprint(self) -> dict:
        """What the rendered audio depends on: the file's content, not where it lives."""
        data = asdict(self)
        data.pop("source")
        return data


def find_noise_files(root: Path, pattern: str) -> list[Path]:
    return find_files(root, pattern, "noise.files")


def scan_noise_files(
    root: str | Path, pattern: str, sample_rate: int
) -> tuple[list[NoiseFile], list[Quarantined]]:
    """Every usable noise file of the folder and the quarantined ones with why.

    As the corpus scan: a file that cannot be read, is empty, non-finite or silent is
    quarantined with its reason and the build goes on without it.
    """
    usable: list[NoiseFile] = []
    quarantined: list[Quarantined] = []
    for path in find_noise_files(Path(root), pattern):
        try:
            signal = load_noise_file(path, sample_rate)
        except (AudioError, OSError, ValueError) as exc:
            quarantined.append(Quarantined(str(path), f"noise file {path}: {exc}"))
            continue
        usable.append(NoiseFile(str(path), file_hash(path), int(signal.size)))
    return usable, quarantined


def noise_signal(
    draw: NoiseDraw, n: int, sample_rate: int, cache: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """The noise an example's draw names (before scaling to its SNR); a file's samples are
    read once per ``cache`` (a shard renders many examples with the same few files)."""
    if draw.kind == "colour":
        return coloured_noise(n, sample_rate, str(draw.colour), draw.seed)
    cache = {} if cache is None else cache
    source = str(draw.source)
    if source not in cache:
        cache[source] = load_noise_file(source, sample_rate)
    return cache[source]
