"""Built-in synthetic demo corpus: deterministic, speech-like signals with no downloads.

The demo corpus exists so that the whole pipeline (simulation, training, evaluation) can run
end to end on a fresh checkout, in CI, and offline.  Every utterance is generated on the fly from
``(speaker, index)`` with a source-filter model:

* a band-limited, glottal-pulse-like harmonic source (all harmonics in cosine phase, no
  harmonic above 0.47 x the sample rate, about -6 dB/octave above 200 Hz) following a smooth F0
  contour with phrase declination, pitch accents and per-syllable movement, plus a little
  aspiration noise;
* a cascade of five time-varying formant resonators whose centre frequencies glide between vowel
  targets and consonant loci (coarticulation), scaled per speaker like a vocal tract length,
  plus a weak high-frequency branch standing in for the resonances above F5;
* fricative-like noise bursts (band-/high-pass shaped white noise of three kinds, roughly
  "s", "sh" and "f");
* pauses between phrases (and before/after the utterance) holding only a -80 dBFS noise floor,
  so that energies in dB stay finite;
* smooth syllable-like amplitude envelopes (raised-cosine ramps) so nothing clicks.

The signal is *not* speech: there are no words, no real phonetics, no real voices, and models
trained on it will not transfer to real recordings.  It has the properties a dereverberation
pipeline cares about (harmonics that reverberation smears, onsets and offsets whose tails it
fills, silent gaps, broadband bursts, several distinguishable "speakers").

The prosodic/phonetic plan of an utterance (timings, F0 and formant trajectories) depends only on
``(speaker, index, duration_s)``, not on the sample rate, so the same utterance rendered at
8 kHz and 44.1 kHz lines up in time; only the bandwidth and the noise samples differ.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np
from scipy import signal
from scipy.interpolate import PchipInterpolator

__all__ = [
    "DEMO_SPEAKERS",
    "DEMO_SPEAKER_PROFILES",
    "DemoSegment",
    "DemoSpeaker",
    "DemoUtterance",
    "demo_speaker",
    "demo_utterances",
    "synthesize_utterance",
    "utterance_segments",
]

# Part of every seed.  Bump it with any change that alters signals: every utterance then changes,
# which makes the break obvious instead of leaving a corpus that is only partly different.
CORPUS_VERSION = "demo-corpus-v1"

#: Peak absolute amplitude of the speech part of every utterance (leaves headroom for reverb).
PEAK_LEVEL = 0.5
#: RMS of the white noise floor added everywhere (-80 dBFS): pauses are near-silent, not zero.
NOISE_FLOOR_RMS = 1e-4

MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 192000
MIN_DURATION_S = 0.25
MAX_DURATION_S = 60.0
DEFAULT_DURATION_RANGE_S = (2.0, 4.0)

SegmentKind = Literal["voiced", "unvoiced", "pause"]


@dataclass(frozen=True)
class DemoSpeaker:
    """Characteristic parameters of one synthetic speaker."""

    name: str
    sex: Literal["female", "male"]  # "female-like" / "male-like" by F0 and formant scale only
    f0_range_hz: tuple[float, float]  # the F0 contour never leaves this interval
    formant_scale: float  # >1: shorter vocal tract, all formants (and fricatives) shifted up
    syllable_rate_hz: float  # speaking rate
    unvoiced_prob: float  # chance of a fricative onset per syllable (codas: half of it)
    source_tilt_hz: float  # harmonic amplitude ~ exp(-f / tilt): smaller = darker, softer voice
    breathiness: float  # aspiration noise relative to the harmonic source

    @property
    def f0_mean_hz(self) -> float:
        """Geometric centre of the F0 range, the level the contour moves around."""
        lo, hi = self.f0_range_hz
        return math.sqrt(lo * hi)


_PROFILES = (
    DemoSpeaker("demo_f1", "female", (170.0, 310.0), 1.18, 4.6, 0.45, 3500.0, 0.06),
    DemoSpeaker("demo_m1", "male", (85.0, 160.0), 1.00, 4.0, 0.40, 5000.0, 0.03),
    DemoSpeaker("demo_f2", "female", (190.0, 340.0), 1.22, 5.2, 0.35, 3000.0, 0.08),
    DemoSpeaker("demo_m2", "male", (100.0, 185.0), 0.93, 3.6, 0.55, 4500.0, 0.04),
    DemoSpeaker("demo_f3", "female", (150.0, 270.0), 1.12, 3.8, 0.55, 4000.0, 0.05),
    DemoSpeaker("demo_m3", "male", (75.0, 140.0), 1.05, 4.8, 0.30, 6000.0, 0.02),
)

#: Speaker names, alternating female-/male-like so that any prefix is roughly balanced.
DEMO_SPEAKERS: tuple[str, ...] = tuple(p.name for p in _PROFILES)
#: Read-only name -> profile mapping.
DEMO_SPEAKER_PROFILES: Mapping[str, DemoSpeaker] = MappingProxyType({p.name: p for p in _PROFILES})


@dataclass(frozen=True)
class DemoUtterance:
    """One entry of the demo corpus; render it with ``synthesize_utterance(speaker, index)``."""

    utterance_id: str
    speaker: str
    index: int


@dataclass(frozen=True)
class DemoSegment:
    """Ground-truth activity label of a stretch of an utterance (times in seconds)."""

    kind: SegmentKind
    start_s: float
    end_s: float


# Adult-male vowel formant targets F1..F5 in Hz (F1-F3 after Peterson & Barney; F4 and F5
# approximate, F5 only shapes the spectrum above F4).
_VOWELS = np.array(
    [
        [270, 2290, 3010, 3600, 4500],  # i
        [390, 1990, 2550, 3500, 4500],  # I
        [530, 1840, 2480, 3500, 4500],  # E
        [660, 1720, 2410, 3400, 4500],  # ae
        [730, 1090, 2440, 3400, 4500],  # a
        [570, 840, 2410, 3300, 4500],  # o
        [440, 1020, 2240, 3300, 4500],  # U
        [300, 870, 2240, 3300, 4500],  # u
        [640, 1190, 2390, 3400, 4500],  # V
        [490, 1350, 1690, 3300, 4500],  # er
    ],
    dtype=np.float64,
)
# Consonant loci (labial, alveolar, velar): formant values the transitions start from.
_LOCI = np.array(
    [[300, 900, 2200, 3300, 4500], [300, 1700, 2700, 3500, 4500], [300, 2000, 2300, 3400, 4500]],
    dtype=np.float64,
)
_GLOTTAL_CORNER_HZ = 200.0
_HIGH_BRANCH_HZ = 3500.0
_HIGH_BRANCH_GAIN = 0.5
_FORMANT_BANDWIDTHS_HZ = (70.0, 100.0, 140.0, 220.0, 300.0)
# Fricative kinds: (low edge Hz, high edge Hz, level dB relative to the vowels), male scale.
_FRICATIVES = ((3800.0, 8000.0, -12.0), (2200.0, 5000.0, -10.0), (1200.0, 7500.0, -18.0))


@dataclass(frozen=True)
class _Plan:
    """Sample-rate independent description of one utterance."""

    duration_s: float
    segments: tuple[DemoSegment, ...]
    voiced: tuple[tuple[float, float, float], ...]  # (start, end, amplitude)
    unvoiced: tuple[tuple[float, float, float, int], ...]  # (start, end, amplitude, kind)
    f0_knots: tuple[np.ndarray, np.ndarray]  # times, log(F0 / mean) before range squashing
    formant_knots: tuple[np.ndarray, np.ndarray]  # times, (n, 5) formant frequencies in Hz


def demo_speaker(speaker: str) -> DemoSpeaker:
    """Profile of ``speaker``; ValueError naming it if it is not a demo speaker."""
    profile = DEMO_SPEAKER_PROFILES.get(speaker) if isinstance(speaker, str) else None
    if profile is None:
        raise ValueError(
            f"unknown demo speaker {speaker!r}; expected one of {', '.join(DEMO_SPEAKERS)}"
        )
    return profile


def demo_utterances(n_speakers: int = 6, utterances_per_speaker: int = 4) -> list[DemoUtterance]:
    """Deterministic list, speakers in DEMO_SPEAKERS order, indices 0.. within each speaker."""
    if not _is_int(n_speakers) or not 1 <= n_speakers <= len(DEMO_SPEAKERS):
        raise ValueError(
            f"n_speakers must be an integer in 1..{len(DEMO_SPEAKERS)} "
            f"(the demo corpus has {len(DEMO_SPEAKERS)} speakers), got {n_speakers!r}"
        )
    if not _is_int(utterances_per_speaker) or utterances_per_speaker < 1:
        raise ValueError(
            f"utterances_per_speaker must be an integer >= 1, got {utterances_per_speaker!r}"
        )
    return [
        DemoUtterance(f"{speaker}_{index:03d}", speaker, index)
        for speaker in DEMO_SPEAKERS[:n_speakers]
        for index in range(utterances_per_speaker)
    ]


def utterance_segments(
    speaker: str, index: int, duration_s: float | None = None
) -> tuple[DemoSegment, ...]:
    """Voiced / unvoiced / pause labels tiling [0, duration] of the utterance.

    They match ``synthesize_utterance`` with the same arguments at any sample rate (envelopes rise
    from and fall to zero inside each segment), so they can serve as voice-activity ground truth.
    """
    profile, index, _, duration_s = _validate(speaker, index, 16000, duration_s)
    return _make_plan(profile, index, duration_s).segments


def synthesize_utterance(
    speaker: str, index: int, sample_rate: int = 16000, duration_s: float | None = None
) -> np.ndarray:
    """Render one demo utterance as float32 mono in [-1, 1] with speech peak at PEAK_LEVEL.

    Deterministic: the random generator is seeded from a SHA-256 of (corpus version, speaker,
    index), never from Python's salted ``hash()``, so repeated calls give bit-identical arrays.
    Across machines the result is identical as long as numpy/scipy produce the same floating
    point results (same versions and SIMD code paths); otherwise differences are rounding-level.
    Without ``duration_s`` the length varies per utterance within about 2-4 s; with it the
    output has exactly ``round(duration_s * sample_rate)`` samples.
    """
    profile, index, sample_rate, duration_s = _validate(speaker, index, sample_rate, duration_s)
    plan = _make_plan(profile, index, duration_s)
    return _render(plan, profile, sample_rate, _seed_sequence(profile.name, index).spawn(2)[1])


# --------------------------------------------------------------------------------------------
# validation and seeding


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _validate(
    speaker: str, index: int, sample_rate: int, duration_s: float | None
) -> tuple[DemoSpeaker, int, int, float | None]:
    profile = demo_speaker(speaker)
    if not _is_int(index) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if not _is_int(sample_rate) or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(
            f"sample_rate must be an integer in {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, "
            f"got {sample_rate!r}"
        )
    if duration_s is not None:
        ok = isinstance(duration_s, (int, float, np.integer, np.floating)) and not isinstance(
            duration_s, (bool, np.bool_)
        )
        if not ok or not (MIN_DURATION_S <= float(duration_s) <= MAX_DURATION_S):
            raise ValueError(
                f"duration_s must be None or a number of seconds in "
                f"{MIN_DURATION_S}..{MAX_DURATION_S}, got {duration_s!r}"
            )
        duration_s = float(duration_s)
    return profile, int(index), int(sample_rate), duration_s


def _seed_sequence(speaker: str, index: int) -> np.random.SeedSequence:
    digest = hashlib.sha256(f"{CORPUS_VERSION}/{speaker}/{index}".encode()).digest()
    return np.random.SeedSequence(int.from_bytes(digest[:16], "little"))


# --------------------------------------------------------------------------------------------
# planning (seconds, sample-rate independent)


def _make_plan(profile: DemoSpeaker, index: int, duration_s: float | None) -> _Plan:
    """Lay out phrases of syllables (optional fricative onset, voiced nucleus, optional coda).

    Every random draw happens in a fixed order whatever the outcome, so an explicit duration
    changes where the utterance stops but not how it starts.
    """
    rng = np.random.default_rng(_seed_sequence(profile.name, index).spawn(2)[0])
    natural = float(rng.uniform(*DEFAULT_DURATION_RANGE_S))
    total = round(natural, 3) if duration_s is None else duration_s
    syl_period = 1.0 / (profile.syllable_rate_hz * rng.uniform(0.9, 1.1))
    lead = min(float(rng.uniform(0.08, 0.2)), 0.2 * total)
    trail = min(float(rng.uniform(0.08, 0.2)), 0.2 * total)
    end_limit = total - trail
    scale = profile.formant_scale

    speech: list[DemoSegment] = []
    voiced: list[tuple[float, float, float]] = []
    unvoiced: list[tuple[float, float, float, int]] = []
    f0_t: list[float] = []
    f0_v: list[float] = []
    fm_t: list[float] = []
    fm_v: list[np.ndarray] = []

    t = lead
    placed_any = False
    done = False
    while not done:
        n_syl = int(rng.integers(3, 9))
        declination = float(rng.uniform(0.08, 0.2))
        accent_at = int(rng.integers(0, n_syl))
        accent = float(rng.uniform(0.1, 0.25))
        phrase_offset = float(rng.normal(0.0, 0.05))
        for k in range(n_syl):
            u_onset = rng.random()
            onset_dur = syl_period * rng.uniform(0.2, 0.4)
            onset_kind = int(rng.integers(0, len(_FRICATIVES)))
            nucleus_dur = syl_period * rng.uniform(0.5, 0.8)
            u_coda = rng.random()
            coda_dur = syl_period * rng.uniform(0.15, 0.3)
            coda_kind = int(rng.integers(0, len(_FRICATIVES)))
            gap = syl_period * rng.uniform(0.03, 0.1)
            vowel = _VOWELS[int(rng.integers(0, len(_VOWELS)))]
            locus = _LOCI[int(rng.integers(0, len(_LOCI)))]
            drift = rng.uniform(0.96, 1.04, size=_VOWELS.shape[1])
            amp = float(rng.uniform(0.6, 1.0))
            f0_jitter = float(rng.normal(0.0, 0.03))
            f0_slope = float(rng.normal(0.0, 0.04))

            # The first syllable always gets a fricative onset so every utterance has one.
            has_onset = not placed_any or u_onset < profile.unvoiced_prob
            has_coda = u_coda < 0.5 * profile.unvoiced_prob
            durs = [onset_dur if has_onset else 0.0, nucleus_dur, coda_dur if has_coda else 0.0]
            length = sum(durs)
            if t + length > end_limit:
                room = end_limit - t
                if room < 0.05 or (placed_any and room < 0.6 * length):
                    done = True
                    break
                durs = [d * room / length for d in durs]  # squeeze the last syllable in
                done = True
            placed_any = True
            onset_end = t + durs[0]
            nucleus_end = onset_end + durs[1]
            coda_end = nucleus_end + durs[2]
            if has_onset:
                speech.append(DemoSegment("unvoiced", t, onset_end))
                unvoiced.append((t, onset_end, amp, onset_kind))
            speech.append(DemoSegment("voiced", onset_end, nucleus_end))
            voiced.append((onset_end, nucleus_end, amp * (1.25 if k == accent_at else 1.0)))
            if has_coda:
                speech.append(DemoSegment("unvoiced", nucleus_end, coda_end))
                unvoiced.append((nucleus_end, coda_end, 0.8 * amp, coda_kind))

            # F0 in log units around the speaker mean: declination over the phrase, one accent,
            # jitter per syllable and a rise or fall within the nucleus; phrase-final fall.
            position = k / max(n_syl - 1, 1)
            centre = phrase_offset + declination * (0.5 - position) + f0_jitter
            centre += accent if k == accent_at else 0.0
            final_fall = 0.08 if k == n_syl - 1 else 0.0
            nd = nucleus_end - onset_end
            f0_t += [onset_end + 0.1 * nd, onset_end + 0.5 * nd, nucleus_end - 0.1 * nd]
            f0_v += [centre - f0_slope, centre, centre + f0_slope - final_fall]

            # Formants glide from halfway between locus and vowel to the vowel target.
            fm_t += [onset_end, onset_end + 0.45 * nd, nucleus_end]
            fm_v += [0.5 * (locus + vowel) * scale, vowel * scale, vowel * drift * scale]

            t = coda_end + gap
            if done:
                break
        else:
            t += float(rng.uniform(0.15, 0.35))  # pause between phrases
            done = t + 0.1 > end_limit

    segments: list[DemoSegment] = []
    cursor = 0.0
    for seg in speech:
        if seg.start_s > cursor:
            segments.append(DemoSegment("pause", cursor, seg.start_s))
        segments.append(seg)
        cursor = seg.end_s
    segments.append(DemoSegment("pause", cursor, total))
    return _Plan(
        duration_s=total,
        segments=tuple(segments),
        voiced=tuple(voiced),
        unvoiced=tuple(unvoiced),
        f0_knots=(np.asarray(f0_t), np.asarray(f0_v)),
        formant_knots=(np.asarray(fm_t), np.asarray(fm_v)),
    )


# --------------------------------------------------------------------------------------------
# rendering


def _render(
    plan: _Plan, profile: DemoSpeaker, sample_rate: int, seed: np.random.SeedSequence
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sr = sample_rate
    n = round(plan.duration_s * sr)
    times = np.arange(n) / sr

    env_v = np.zeros(n)
    for start, end, amp in plan.voiced:
        _add_envelope(env_v, sr, start, end, amp, attack_s=0.03, release_s=0.05, sustain=0.75)
    env_uv = np.zeros((len(_FRICATIVES), n))
    for start, end, amp, kind in plan.unvoiced:
        _add_envelope(env_uv[kind], sr, start, end, amp, attack_s=0.015, release_s=0.02)

    f0 = _f0_contour(plan, profile, times)
    source = _harmonic_source(f0, profile.source_tilt_hz, sr)
    source += profile.breathiness * rng.standard_normal(n)
    # Glottal roll-off (-12 dB/oct) plus lip radiation (+6 dB/oct): net -6 dB/oct above ~200 Hz.
    pole = math.exp(-2.0 * math.pi * _GLOTTAL_CORNER_HZ / sr)
    source = signal.lfilter([1.0 - pole], [1.0, -pole], source)
    source_env = source * env_v
    voiced = source_env
    block = _block_length(sr)
    block_times = (np.arange(-(-n // block)) + 0.5) * block / sr
    formants = _interp_knots(*plan.formant_knots, block_times)
    for j, bw in enumerate(_FORMANT_BANDWIDTHS_HZ):
        if formants[:, j].max() < 0.4 * sr:  # a resonator near Nyquist would be meaningless
            voiced = _resonator(voiced, formants[:, j], bw * profile.formant_scale, sr)
    # An all-pole cascade of five formants decays far too fast above F5 (real vocal tracts have
    # more resonances up there); a weak high-passed copy of the source stands in for them.
    hf_corner = _HIGH_BRANCH_HZ * profile.formant_scale
    if hf_corner < 0.4 * sr:
        sos = signal.butter(2, hf_corner, btype="highpass", fs=sr, output="sos")
        voiced += _HIGH_BRANCH_GAIN * signal.sosfilt(sos, source_env)
    active = env_v > 0.3
    if active.any():
        voiced /= np.sqrt(np.mean(voiced[active] ** 2))

    noise = rng.standard_normal(n)
    fricatives = np.zeros(n)
    for kind, (lo, hi, level_db) in enumerate(_FRICATIVES):
        if not env_uv[kind].any():
            continue
        band = signal.sosfilt(
            _fricative_sos(lo * profile.formant_scale, hi * profile.formant_scale, sr), noise
        )
        band *= 10.0 ** (level_db / 20.0) / max(np.sqrt(np.mean(band**2)), 1e-12)
        fricatives += band * env_uv[kind]

    speech = voiced + fricatives
    speech *= PEAK_LEVEL / max(np.max(np.abs(speech)), 1e-12)
    speech += NOISE_FLOOR_RMS * rng.standard_normal(n)
    return np.clip(speech, -1.0, 1.0).astype(np.float32)


def _add_envelope(
    env: np.ndarray,
    sr: int,
    start: float,
    end: float,
    amp: float,
    attack_s: float,
    release_s: float,
    sustain: float = 1.0,
) -> None:
    """Add a raised-cosine attack / linear sag / raised-cosine release, zero at both ends."""
    i0, i1 = round(start * sr), min(round(end * sr), env.size)
    count = i1 - i0
    if count < 2:
        return
    t = (np.arange(count) + 0.5) / sr
    dur = count / sr
    up = np.clip(t / min(attack_s, 0.3 * dur), 0.0, 1.0)
    down = np.clip((dur - t) / min(release_s, 0.4 * dur), 0.0, 1.0)
    shape = (0.5 - 0.5 * np.cos(np.pi * up)) * (0.5 - 0.5 * np.cos(np.pi * down))
    env[i0:i1] += amp * shape * (1.0 - (1.0 - sustain) * t / dur)


def _interp_knots(knot_t: np.ndarray, knot_v: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Smooth monotone-preserving interpolation, held constant outside the knots."""
    return PchipInterpolator(knot_t, knot_v, axis=0)(np.clip(times, knot_t[0], knot_t[-1]))


def _f0_contour(plan: _Plan, profile: DemoSpeaker, times: np.ndarray) -> np.ndarray:
    """F0 in Hz; a tanh squash in the log domain keeps it strictly inside the speaker range."""
    lo, hi = (math.log(f) for f in profile.f0_range_hz)
    half = 0.5 * (hi - lo)
    offset = _interp_knots(*plan.f0_knots, times)
    return np.exp(0.5 * (lo + hi) + half * np.tanh(offset / half))


def _harmonic_source(f0: np.ndarray, tilt_hz: float, sr: int) -> np.ndarray:
    """Band-limited pulse train: sum_k a^k cos(k phi), a = exp(-f0 / tilt), unit power.

    Closed form of the finite geometric series (a "discrete summation formula"), so the cost is
    O(n) whatever the number of harmonics.  The highest harmonic fades in/out fractionally as F0
    moves, so the harmonic count changes without discontinuities, and no harmonic exceeds
    0.47 * sr, so there is no aliasing.
    """
    phase = np.mod(2.0 * np.pi * np.cumsum(f0) / sr, 2.0 * np.pi)
    decay = f0 / tilt_hz  # a = exp(-decay); powers of a via exp, much cheaper than a ** k
    a = np.exp(-decay)
    x = np.maximum((0.47 * sr - f0) / f0, 1.0)
    k = np.floor(x)
    frac = x - k
    # Re[(z - z^(k+1)) / (1 - z)] with z = a exp(i phase), in real arithmetic.
    c, s = np.cos(phase), np.sin(phase)
    top = np.exp(-(k + 1.0) * decay)
    c_top, s_top = np.cos((k + 1.0) * phase), np.sin((k + 1.0) * phase)
    ac, as_ = a * c, a * s
    numerator = (ac - top * c_top) * (1.0 - ac) - (as_ - top * s_top) * as_
    harmonics = numerator / (1.0 - 2.0 * ac + a * a) + frac * top * c_top
    a2 = a * a
    power = 0.5 * (a2 - top * top) / (1.0 - a2) + 0.5 * (frac * top) ** 2
    return harmonics / np.sqrt(power)


def _block_length(sr: int) -> int:
    """Formant update interval in samples (4 ms, like the 5 ms frames of Klatt synthesizers)."""
    return max(8, round(0.004 * sr))


def _resonator(x: np.ndarray, freq_hz: np.ndarray, bw_hz: float, sr: int) -> np.ndarray:
    """Two-pole resonator, unit gain at DC (Klatt style), centre frequency updated every block.

    ``freq_hz`` holds one frequency per block of ``_block_length(sr)`` samples.  The filter is
    the imaginary part of the complex one-pole recursion y[n] = p y[n-1] + g x[n] with
    p = r exp(i theta): a coupled-form resonator whose state carries over smoothly when p
    changes, so parameter updates do not click.  ``lfilter`` would need one call per block, so
    instead all blocks are solved at once with cumulative products (|p^j| = r^j stays >~ 0.02
    within a block, so dividing by it is numerically safe), plus a short scalar loop carrying the
    state from block to block.
    """
    n = x.size
    block = _block_length(sr)
    n_blocks = freq_hz.size
    r = math.exp(-math.pi * bw_hz / sr)
    theta = 2.0 * np.pi * freq_hz / sr
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    gain = (1.0 - 2.0 * r * cos_t + r * r) / (r * sin_t)
    p = (r * cos_t + 1j * (r * sin_t))[:, None]
    q = np.cumprod(np.broadcast_to(p, (n_blocks, block)), axis=1)  # q[:, j] = p ** (j + 1)
    drive = np.pad(x, (0, n_blocks * block - n)).reshape(n_blocks, block) * gain[:, None]
    # 1 / q = conj(q) / r ** (2 j + 2): no complex division.
    inv_abs2 = r ** (-2.0 * np.arange(1, block + 1))
    acc = np.cumsum(drive * inv_abs2 * q.conj(), axis=1)  # zero-state response is q * acc
    carry = np.empty(n_blocks, dtype=np.complex128)
    prev = 0j
    for b, (last, q_last) in enumerate(zip(acc[:, -1].tolist(), q[:, -1].tolist(), strict=True)):
        carry[b] = prev
        prev = q_last * (last + prev)
    acc += carry[:, None]
    return (q.real * acc.imag + q.imag * acc.real).reshape(-1)[:n]


def _fricative_sos(lo_hz: float, hi_hz: float, sr: int) -> np.ndarray:
    """4th-order Butterworth band-pass, or high-pass when the band reaches Nyquist."""
    nyquist = 0.5 * sr
    lo_hz = min(lo_hz, 0.7 * nyquist)
    if hi_hz >= 0.9 * nyquist:
        return signal.butter(4, lo_hz, btype="highpass", fs=sr, output="sos")
    return signal.butter(2, (lo_hz, hi_hz), btype="bandpass", fs=sr, output="sos")
