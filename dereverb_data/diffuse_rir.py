"""Fast shoebox RIRs: exact early image sources plus a stochastic diffuse tail.

``simulation.method: diffuse``. A shoebox RIR is split at a **mixing time** ``t_mix``:

* **Early part** (``t < t_mix``): every image source of the shoebox that arrives before
  ``t_mix``, of any order, computed exactly (Allen and Berkley's lattice, vectorised in numpy).
  Each image carries, per octave band, the product of the amplitude reflection factors
  ``sqrt(1 - alpha)`` of the surfaces it bounced off, air absorption over its path and the
  spherical spreading ``1 / d``. It is placed at its exact fractional delay with a Hann-windowed
  sinc (81 taps), and the bands are joined by smooth zero-phase crossovers (raised cosines in
  log frequency between band centres, summing to one).
* **Late part** (``t >= t_mix``): one realisation of white Gaussian noise split into the six
  octave bands by sharper zero-phase crossovers (raised cosines 1/3 octave wide at the band
  edges, summing to one), each band multiplied by ``g_b exp(-3 ln(10) (t - t_mix) / T_b)``:
  60 dB of decay in the band's statistical RT60 ``T_b``.

**RT60 per band** (:func:`band_rt60`): Eyring (default) or Sabine from the area-weighted mean
absorption of the six surfaces at the calibrated scale, plus air absorption:
``T_b = 24 ln(10) V / (c (-S ln(1 - abar_b) + 4 m_b V))`` (Sabine: ``S abar_b`` in place of
``-S ln(1 - abar_b)``), ``m_b`` the energy attenuation of air per metre, ISO 9613-1 at 20 C, 50 %
relative humidity and 101.325 kPa (:func:`air_absorption`). Eyring is the decay of the image
lattice when every path meets the mean absorption; Sabine is its low-absorption limit and
predicts longer tails in absorbent rooms.

**Mixing time** (default, :func:`mixing_time_s`): the image lattice has one image per room
volume ``V``, so ``4 pi (c t)^3 / (3 V)`` images have arrived by ``t``. ``t_mix`` is when 128 are
expected, ``(3 V 128 / (4 pi c^3))^(1/3)``: 25 ms in 20 m^3, 36 ms in 60 m^3, 62 ms in 320 m^3;
a little later than perceptual mixing times (Lindau et al.: ``20 V / S + 12`` ms, 21-33 ms for
these rooms), so the early part is exact for longer, and late enough that the echo density is
high (6-16 per ms) and the energy near ``t_mix`` can be measured from the images themselves. A
fixed low ISM order would leave holes: in a 5 x 4 x 3 m room about 128 images of orders up to
5-6 arrive before 36 ms, of which 25 have order 2 or less. ``mixing_time_ms`` overrides it
(never earlier than 5 ms after the direct sound).

**Energy continuity**: each band's tail level ``g_b`` is matched to the images' band energy in
the window ``[t_w, t_mix)`` holding the last 64 expected images (``t_w = 0.79 t_mix`` by
default): ``g_b^2 sum_{n in W} exp(-2 delta_b (n - n_mix)) = sum_{images in W} a_{i,b}^2``,
i.e. the tail continues the images' own energy density at the band's decay rate. The sum is
incoherent (image energies, not the energy of their sum): that is its expectation above the
Schroeder frequency, where interference between images averages out, and it keeps the
low-frequency build-up of in-phase early images (a few dB at 125 Hz in small rooms, a modal
effect) out of the diffuse tail. The statistical level of a diffuse field,
``E[h^2] = 4 pi c / (V fs) exp(-2 delta_b t)`` per sample (the lattice density times ``1 / (c
t)^2`` spreading, in the images' normalisation), agrees with the matched level on average
(within 0.1 dB over random placements, 0.5-0.7 dB scatter); the match is used because it
follows this placement's early energy, so the level does not step at ``t_mix``. A window that
holds fewer than 8 images (a short user mixing time) falls back to the statistical level.

**Normalisation and delay**: amplitudes are ``1 / d`` (pyroomacoustics' convention, so levels
match the project's other methods), with the direct path at its geometric delay ``d fs / c``
(not ~40 samples later, as pyroomacoustics' causal fractional-delay filter puts it); the render
code aligns the target to the actual direct peak either way. The RIR lasts until the slowest
band's tail is 66 dB below its start (``1.1 T_max`` after ``t_mix``), in float32.

**Calibration** (:func:`diffuse_absorption_scale`): the tail decays at the formula's RT60 by
construction, so the absorption scale for a target is found without simulating. What the target
means is ``calibrate_to``: ``mid_band``, the mean of the 500 Hz and 1 kHz band RT60s (the
formula, inverted); or ``broadband_t30`` (default), the broadband T30 that
``acoustics.measure_rir`` labels every example with and that ``rooms.rt60_s`` bounds, computed
in closed form from this model's expected energy decay at the room's reference placement
(:func:`expected_t30`: the early part exactly, the tail's mean energy per band pair) and fitted
as the measure fits. With sloped absorption the two differ a lot: the late broadband decay is
the slowest band's (a room whose 125 Hz absorption is half its mid-band one measures a
broadband T30 about 1.8 times its mid-band RT60), and the other methods' calibration loop
already drives the broadband T30 to the target.

**Reproducibility**: the noise comes from a numpy ``Generator`` seeded by a SHA-256 of the room,
placement, sample rate, simulation settings, absorption scale and :data:`DIFFUSE_REVISION`; no
global random state, no threads. The same spec gives the same bits in any process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.fft
from scipy.optimize import brentq

from .manifest import OCTAVE_BANDS_HZ, SPEED_OF_SOUND, DiffuseSettings, Simulation
from .rooms import Placement, RoomSpec
from .seeds import derive_seed

if TYPE_CHECKING:  # rir_bank imports this module: no import cycle at run time
    from .rir_bank import RirSpec

__all__ = [
    "DIFFUSE_REVISION",
    "air_absorption",
    "band_rt60",
    "diffuse_absorption_scale",
    "diffuse_settings",
    "diffuse_version",
    "expected_t30",
    "matching_window_start_s",
    "mixing_time_s",
    "simulate_diffuse",
]

#: Bump when this module's output changes for the same spec (it is part of the seed and of
#: :func:`diffuse_version`, which the RIR bank should hash into diffuse RIR ids).
DIFFUSE_REVISION = 1

#: Images expected to have arrived by the default mixing time.
MIXING_IMAGE_COUNT = 128
#: Images expected in the energy-matching window just before the mixing time.
MATCH_IMAGE_COUNT = 64
#: Fewer images than this in the window: use the statistical level instead.
MIN_MATCH_IMAGES = 8
#: The tail never starts earlier than this after the direct sound.
MIN_MIX_AFTER_DIRECT_S = 0.005
#: Half-length of the windowed-sinc fractional delay (81 taps, as pyroomacoustics').
SINC_HALF_WIDTH = 40
#: The RIR runs this many times the slowest band's RT60 past the mixing time (-66 dB).
TAIL_LENGTH_FACTOR = 1.1
#: Half-width (octaves) of the tail's crossovers at the band edges: sharp enough that an
#: octave-band measurement sees its own band's decay, not a slower neighbour's.
TAIL_CROSSOVER_OCTAVES = 1.0 / 6.0
#: Samples of padding around the early part, for the crossovers' zero-phase ringing.
EARLY_PAD = 512

_BANDS = np.asarray(OCTAVE_BANDS_HZ, dtype=float)
_LN10 = math.log(10.0)


def diffuse_version() -> str:
    """The simulator identity for diffuse RIRs (no pyroomacoustics in it: it is not used)."""
    return f"dereverb-diffuse{DIFFUSE_REVISION}"


def diffuse_settings(simulation: Simulation) -> DiffuseSettings:
    """The diffuse settings of a simulation block (defaults when it has none)."""
    return simulation.diffuse or DiffuseSettings()


def air_absorption(
    temperature_c: float = 20.0,
    relative_humidity: float = 50.0,
    pressure_kpa: float = 101.325,
    freqs_hz: tuple[float, ...] | np.ndarray = OCTAVE_BANDS_HZ,
) -> np.ndarray:
    """Air's energy attenuation ``m`` (1/m) per frequency, ISO 9613-1 (pure tones).

    The standard's attenuation ``alpha`` (dB/m) from oxygen and nitrogen relaxation and
    classical absorption, converted to energy (``m = alpha / (10 log10 e)``), so intensity falls
    as ``exp(-m d)`` and amplitude as ``exp(-m d / 2)``. At 20 C and 50 % RH: 0.44, 1.3, 2.7,
    4.7, 9.9 and 30 dB/km at 125 Hz-4 kHz.
    """
    f = np.asarray(freqs_hz, dtype=float)
    t = temperature_c + 273.15
    t_ref, t_triple, p_ref = 293.15, 273.16, 101.325
    p_ratio = pressure_kpa / p_ref
    p_sat_ratio = 10.0 ** (-6.8346 * (t_triple / t) ** 1.261 + 4.6151)
    h = relative_humidity * p_sat_ratio / p_ratio  # molar concentration of water vapour, %
    fr_o = p_ratio * (24.0 + 4.04e4 * h * (0.02 + h) / (0.391 + h))
    fr_n = (
        p_ratio
        * (t / t_ref) ** -0.5
        * (9.0 + 280.0 * h * math.exp(-4.170 * ((t / t_ref) ** (-1.0 / 3.0) - 1.0)))
    )
    alpha_db = (
        8.686
        * f**2
        * (
            1.84e-11 / p_ratio * (t / t_ref) ** 0.5
            + (t / t_ref) ** -2.5
            * (
                0.01275 * math.exp(-2239.1 / t) / (fr_o + f**2 / fr_o)
                + 0.1068 * math.exp(-3352.0 / t) / (fr_n + f**2 / fr_n)
            )
        )
    )
    return alpha_db / (10.0 * math.log10(math.e))


def _surface_areas(dims: tuple[float, float, float]) -> np.ndarray:
    lx, ly, lz = dims
    # rooms.SURFACES order: west/east (x = 0, lx), south/north (y = 0, ly), floor/ceiling.
    return np.array([ly * lz, ly * lz, lx * lz, lx * lz, lx * ly, lx * ly])


def _absorption(room: RoomSpec, scale: float) -> np.ndarray:
    """Energy absorption per surface and band at ``scale``, clipped like rir_bank's materials."""
    return np.clip(scale * np.asarray(room.absorption, dtype=float), 0.01, 0.99)


def _air(settings: DiffuseSettings) -> np.ndarray:
    return air_absorption() if settings.air_absorption else np.zeros(len(_BANDS))


def _rt60_of(
    room: RoomSpec,
    scale: float,
    formula: Literal["eyring", "sabine"],
    air: np.ndarray,
) -> np.ndarray:
    lx, ly, lz = room.dims
    volume = lx * ly * lz
    areas = _surface_areas(room.dims)
    total = areas.sum()
    mean_alpha = areas @ _absorption(room, scale) / total
    if formula == "eyring":
        absorption_area = -total * np.log1p(-mean_alpha)
    elif formula == "sabine":
        absorption_area = total * mean_alpha
    else:
        raise ValueError(f"rt60 formula must be 'eyring' or 'sabine', got {formula!r}")
    return 24.0 * _LN10 * volume / (SPEED_OF_SOUND * (absorption_area + 4.0 * air * volume))


def band_rt60(
    room: RoomSpec,
    scale: float,
    sample_rate: int,
    formula: Literal["eyring", "sabine"] = "eyring",
    air_absorption_on: bool = True,
) -> np.ndarray:
    """RT60 (s) per octave band (``OCTAVE_BANDS_HZ``) of ``room`` at absorption ``scale``.

    The decay the diffuse tail is given in each band. A band whose lower edge (``f / sqrt 2``)
    is at or above the Nyquist frequency does not exist at ``sample_rate`` and is ``nan``.
    """
    if not scale > 0:
        raise ValueError(f"absorption scale must be positive, got {scale!r}")
    air = air_absorption() if air_absorption_on else np.zeros(len(_BANDS))
    rt60 = _rt60_of(room, scale, formula, air)
    rt60[_BANDS / math.sqrt(2.0) >= sample_rate / 2.0] = np.nan
    return rt60


def _mid_band_rt60(room: RoomSpec, scale: float, settings: DiffuseSettings) -> float:
    # The project's RT60 target is the mid bands' (500 Hz and 1 kHz), as in rir_bank.
    return float(np.mean(_rt60_of(room, scale, settings.rt60_formula, _air(settings))[2:4]))


def diffuse_absorption_scale(spec: RirSpec) -> float:
    """The absorption scale at which the room meets its RT60 target, without simulating.

    ``calibrate_to: broadband_t30`` (default): the :func:`expected_t30` at the room's reference
    placement (``rir_bank.reference_placement``) equals the target, the quantity the labels
    measure and the other methods' calibration loop drives to the target. ``mid_band``: the mean
    of the formula's 500 Hz and 1 kHz band RT60s equals the target. Both fall monotonically with
    the scale; the equation is solved in log scale by secant steps from the mid-band solution
    (the RT60 is nearly inversely proportional to the scale: 2-4 steps), with Brent's method
    between the scales where every coefficient is clipped at 0.01 and at 0.99 as a fallback. A
    target beyond what those give returns the bound. ``1.0`` when the room has no target.
    """
    room = spec.room
    target = room.target_rt60
    if target is None:
        return 1.0
    settings = diffuse_settings(spec.simulation)
    coeffs = np.asarray(room.absorption, dtype=float)
    low, high = math.log(0.01 / coeffs.max()), math.log(0.99 / coeffs.min())

    def mid_error(log_scale: float) -> float:
        return math.log(_mid_band_rt60(room, math.exp(log_scale), settings) / target)

    log_scale = _solve_decreasing(mid_error, low, high, 0.0, 1e-10)
    if settings.calibrate_to == "broadband_t30":
        from .rir_bank import reference_placement  # rir_bank imports this module

        placement = reference_placement(room)

        def broadband_error(log_scale: float) -> float:
            return math.log(expected_t30(spec, math.exp(log_scale), placement) / target)

        # 1e-4 in log RT60: 0.01 % of the target, far below a realisation's scatter
        log_scale = _solve_decreasing(broadband_error, low, high, log_scale, 1e-4)
    return round(math.exp(log_scale), 6)


def _solve_decreasing(
    error: Callable[[float], float], low: float, high: float, start: float, tolerance: float
) -> float:
    """The root in ``[low, high]`` of a decreasing ``error`` (a log RT60 ratio of a log
    scale), or the bound it lies beyond."""
    x0 = min(max(start, low), high)
    f0 = error(x0)
    if abs(f0) <= tolerance:
        return x0
    x1 = min(max(x0 + f0, low), high)  # as if the RT60 were inversely proportional
    for _ in range(8):
        f1 = error(x1)
        if abs(f1) <= tolerance:
            return x1
        if f1 == f0:
            break
        x0, f0, x1 = x1, f1, x1 - f1 * (x1 - x0) / (f1 - f0)
        if not low <= x1 <= high:
            break
    if error(low) <= 0.0:
        return low
    if error(high) >= 0.0:
        return high
    return float(brentq(error, low, high, xtol=tolerance * 1e-2, rtol=1e-12))


def _expected_images_radius(volume: float, count: float) -> float:
    """Distance within which ``count`` images are expected (one image per room volume)."""
    return (3.0 * volume * count / (4.0 * math.pi)) ** (1.0 / 3.0)


def mixing_time_s(
    room: RoomSpec, placement: Placement, settings: DiffuseSettings | None = None
) -> float:
    """Where the tail takes over (s after emission): ``settings.mixing_time_ms`` or the time by
    which 128 image sources are expected, and never before 5 ms after the direct sound."""
    settings = settings or DiffuseSettings()
    lx, ly, lz = room.dims
    if settings.mixing_time_ms is not None:
        t_mix = settings.mixing_time_ms / 1000.0
    else:
        t_mix = _expected_images_radius(lx * ly * lz, MIXING_IMAGE_COUNT) / SPEED_OF_SOUND
    return max(t_mix, placement.distance / SPEED_OF_SOUND + MIN_MIX_AFTER_DIRECT_S)


def matching_window_start_s(room: RoomSpec, placement: Placement, t_mix: float) -> float:
    """Start of the energy-matching window ``[t_w, t_mix)``: where the last 64 of the images
    expected by ``t_mix`` begin, but at least 2.5 ms after the direct sound."""
    lx, ly, lz = room.dims
    volume = lx * ly * lz
    expected = 4.0 * math.pi * (SPEED_OF_SOUND * t_mix) ** 3 / (3.0 * volume)
    radius = _expected_images_radius(volume, max(0.0, expected - MATCH_IMAGE_COUNT))
    t_direct = placement.distance / SPEED_OF_SOUND
    return max(radius / SPEED_OF_SOUND, t_direct + 0.5 * MIN_MIX_AFTER_DIRECT_S)


def _check_inside(room: RoomSpec, placement: Placement) -> None:
    for name, point in (("source", placement.source), ("microphone", placement.mic)):
        for value, size in zip(point, room.dims, strict=True):
            if not 0.0 < value < size:
                raise ValueError(
                    f"room {room.room_id}: {name} {tuple(point)} is not inside {room.dims} m"
                )
    if placement.distance <= 0.0:
        raise ValueError(f"room {room.room_id}: source and microphone coincide")


def _images(
    dims: tuple[float, float, float],
    source: tuple[float, float, float],
    mic: tuple[float, float, float],
    radius: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Every image source within ``radius`` of the microphone: distances ``(n,)`` and the
    number of reflections off each surface ``(n, 6)`` in ``rooms.SURFACES`` order.

    Per axis of length ``L`` the images sit at ``(1 - 2q) s + 2 k L`` (``q`` in {0, 1}, ``k``
    any integer), having met the wall at 0 ``|k - q|`` times and the wall at ``L`` ``|k|``
    times; a 3-D image combines one image per axis.
    """
    offsets, lower, upper = [], [], []
    for length, s, m in zip(dims, source, mic, strict=True):
        k_max = math.ceil((radius + length) / (2.0 * length))
        k = np.arange(-k_max, k_max + 1)
        k = np.concatenate([k, k])
        q = np.repeat([0, 1], k.size // 2)
        offset = (1 - 2 * q) * s + 2.0 * k * length - m
        keep = np.abs(offset) < radius
        offsets.append(offset[keep])
        lower.append(np.abs(k - q)[keep])
        upper.append(np.abs(k)[keep])
    dx, dy, dz = offsets
    d2 = dx[:, None, None] ** 2 + dy[None, :, None] ** 2 + dz[None, None, :] ** 2
    ix, iy, iz = np.nonzero(d2 < radius * radius)
    counts = np.stack(
        [lower[0][ix], upper[0][ix], lower[1][iy], upper[1][iy], lower[2][iz], upper[2][iz]],
        axis=1,
    )
    distances = np.sqrt(d2[ix, iy, iz])
    order = np.argsort(distances, kind="stable")
    return distances[order], counts[order]


def _crossover_masks(freqs: np.ndarray, half_width_octaves: float) -> np.ndarray:
    """Zero-phase band masks ``(6, n)`` that sum to one at every frequency.

    Band ``b`` hands over to band ``b + 1`` around their geometric mean with a raised cosine in
    log frequency, ``half_width_octaves`` either side (0.5: from centre to centre). The first
    band reaches down to DC, the last up to Nyquist.
    """
    log_f = np.log2(np.maximum(freqs, 1e-3))
    edges = np.log2(np.sqrt(_BANDS[:-1] * _BANDS[1:]))
    x = np.clip((log_f[None, :] - edges[:, None]) / half_width_octaves, -1.0, 1.0)
    above = 0.5 * (1.0 + np.sin(0.5 * np.pi * x))  # (5, n): share above each edge
    masks = np.empty((len(_BANDS), freqs.size))
    masks[0] = 1.0 - above[0]
    masks[1:-1] = above[:-1] - above[1:]
    masks[-1] = above[-1]
    return masks


def _windowed_sinc(delays: np.ndarray, half_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices and values ``(n, 2 half_width)`` of Hann-windowed sincs centred on the
    fractional ``delays`` (samples): a band-limited impulse at the exact delay."""
    base = np.floor(delays).astype(np.int64)
    taps = np.arange(-half_width + 1, half_width + 1)
    index = base[:, None] + taps[None, :]
    x = index - delays[:, None]
    window = 0.5 * (1.0 + np.cos(np.pi * np.clip(x / half_width, -1.0, 1.0)))
    return index, np.sinc(x) * window


def _seed(spec: RirSpec, placement: Placement, absorption_scale: float) -> int:
    # The spec's content, not RirSpec.rir_id: that hashes pyroomacoustics' version, which
    # this method does not use. Only the placement simulated enters (a calibration placement
    # then seeds the same in any build order).
    return derive_seed(
        "diffuse",
        DIFFUSE_REVISION,
        spec.room.spec_hash,
        asdict(placement),
        spec.sample_rate,
        spec.simulation.model_dump(mode="json"),
        absorption_scale,
    )


@dataclass(frozen=True)
class _Model:
    """Everything about one diffuse RIR except its noise: the deterministic early part and the
    tail's per-band level and decay."""

    n_mix: int
    n_total: int
    early: np.ndarray  # from sample 0, may run past n_mix (sinc and crossover ringing)
    level: np.ndarray  # (band,) tail amplitude at n_mix (power spectral density ** 0.5)
    delta: np.ndarray  # (band,) amplitude decay rate, 1/s
    matched: bool  # level from the images (True) or from the statistical formula


def _model(spec: RirSpec, absorption_scale: float, placement: Placement) -> _Model:
    room = spec.room
    _check_inside(room, placement)
    settings = diffuse_settings(spec.simulation)
    fs = spec.sample_rate
    lx, ly, lz = room.dims
    volume = lx * ly * lz
    air = _air(settings)
    rt60 = band_rt60(room, absorption_scale, fs, settings.rt60_formula, settings.air_absorption)
    present = np.isfinite(rt60)
    # amplitude decay rate per band (1/s): 60 dB over the band's RT60
    delta = np.where(present, 3.0 * _LN10 / np.where(present, rt60, 1.0), 0.0)

    t_mix = mixing_time_s(room, placement, settings)
    n_mix = math.ceil(t_mix * fs)
    n_total = n_mix + math.ceil(TAIL_LENGTH_FACTOR * float(np.nanmax(rt60)) * fs)

    # --- early part: all images arriving before the mixing time -----------------------------
    distances, counts = _images(
        room.dims, placement.source, placement.mic, n_mix * SPEED_OF_SOUND / fs
    )
    log_reflection = 0.5 * np.log1p(-_absorption(room, absorption_scale))  # (surface, band)
    log_amp = (
        np.einsum("is,sb->ib", counts.astype(float), log_reflection)
        - 0.5 * distances[:, None] * air[None, :]
        - np.log(distances)[:, None]
    )
    amplitudes = np.exp(log_amp)  # (image, band), 1/d normalisation
    delays = distances * fs / SPEED_OF_SOUND

    n_early = scipy.fft.next_fast_len(n_mix + SINC_HALF_WIDTH + 2 * EARLY_PAD, real=True)
    index, taps = _windowed_sinc(delays, SINC_HALF_WIDTH)
    flat_index = (index + EARLY_PAD).ravel()
    smooth = _crossover_masks(scipy.fft.rfftfreq(n_early, 1.0 / fs), 0.5)
    spectrum = np.zeros(smooth.shape[1], dtype=complex)
    for b in np.flatnonzero(present):
        train = np.bincount(
            flat_index, weights=(taps * amplitudes[:, b, None]).ravel(), minlength=n_early
        )
        spectrum += smooth[b] * scipy.fft.rfft(train)
    early = scipy.fft.irfft(spectrum, n_early)[EARLY_PAD:]

    # --- energy matching at the mixing time --------------------------------------------------
    n_window = math.floor(matching_window_start_s(room, placement, t_mix) * fs)
    in_window = (delays >= n_window) & (delays < n_mix)
    in_window[0] = False  # the nearest image is the source itself: direct sound, not diffuse
    matched = bool(np.count_nonzero(in_window) >= MIN_MATCH_IMAGES)
    if matched:
        relative = (np.arange(n_window, n_mix) - n_mix) / fs  # <= 0: before the tail starts
        decay_sum = np.exp(-2.0 * delta[:, None] * relative[None, :]).sum(axis=1)
        level_sq = (amplitudes[in_window] ** 2).sum(axis=0) / decay_sum
    else:
        level_sq = 4.0 * math.pi * SPEED_OF_SOUND / (volume * fs) * np.exp(-2.0 * delta * t_mix)
    return _Model(n_mix, n_total, early, np.sqrt(level_sq) * present, delta, matched)


def simulate_diffuse(
    spec: RirSpec, absorption_scale: float, placement: Placement | None = None
) -> np.ndarray:
    """One RIR (float32) by early image sources plus a diffuse tail; same contract as
    ``rir_bank.simulate``: deterministic for a given spec, ``placement`` overrides the spec's.

    The direct path peaks at the geometric delay ``distance * fs / c`` with amplitude about
    ``1 / distance`` (exactly, at an integer delay, less air absorption).
    """
    placement = placement or spec.placement
    model = _model(spec, absorption_scale, placement)
    fs = spec.sample_rate
    # One white noise for all bands, split by crossovers that sum to one: where the bands'
    # levels agree the tail is that noise unchanged, so band edges leave no seams. In float32:
    # half the FFT time, and its rounding (-140 dB) is far below anything measured.
    n_tail = model.n_total - model.n_mix
    n_fft = _tail_fft_length(n_tail)
    rng = np.random.default_rng(_seed(spec, placement, absorption_scale))
    white = scipy.fft.rfft(rng.standard_normal(n_fft, dtype=np.float32))
    bands = scipy.fft.irfft(_tail_masks(fs, n_fft) * white, n_fft, axis=-1)[:, :n_tail]
    t = np.arange(n_tail, dtype=np.float32) / np.float32(fs)
    rates = model.delta.astype(np.float32)[:, None]
    envelope = model.level.astype(np.float32)[:, None] * np.exp(-rates * t[None, :])
    tail = np.einsum("bn,bn->n", envelope, bands)

    rir = np.zeros(model.n_total)
    keep = min(model.early.size, model.n_total)
    rir[:keep] += model.early[:keep]
    rir[model.n_mix :] += tail
    return rir.astype(np.float32)


def _tail_fft_length(n_tail: int) -> int:
    # Whole multiples of 4096 samples: RIRs of similar length share their cached masks.
    return scipy.fft.next_fast_len(-(-n_tail // 4096) * 4096, real=True)


@lru_cache(maxsize=32)
def _tail_masks(sample_rate: int, n_fft: int) -> np.ndarray:
    masks = _crossover_masks(scipy.fft.rfftfreq(n_fft, 1.0 / sample_rate), TAIL_CROSSOVER_OCTAVES)
    masks = masks.astype(np.float32)
    masks.flags.writeable = False  # shared between calls
    return masks


@lru_cache(maxsize=8)
def _band_covariance(sample_rate: int) -> np.ndarray:
    """``E[n_b n_b']`` of the tail's band noises (unit white noise split by the crossovers):
    the mean of ``M_b M_b'`` over the two-sided spectrum, here on a fine rfft grid."""
    n_fft = 1 << 15
    masks = _crossover_masks(scipy.fft.rfftfreq(n_fft, 1.0 / sample_rate), TAIL_CROSSOVER_OCTAVES)
    weights = np.full(masks.shape[1], 2.0)
    weights[0] = weights[-1] = 1.0  # DC and Nyquist appear once in the two-sided spectrum
    return np.einsum("an,bn,n->ab", masks, masks, weights) / n_fft


def expected_t30(
    spec: RirSpec, absorption_scale: float, placement: Placement | None = None
) -> float:
    """The broadband T30 (``acoustics.reverberation_time``'s fit, -5..-35 dB from the direct
    path) of the *expected* energy decay of this spec's diffuse RIR: the early part exactly,
    the tail's mean energy in closed form. No noise is drawn; a realisation's measured T30
    scatters around it by the tail's statistical fluctuation (mostly that of its slowest,
    narrowest band)."""
    placement = placement or spec.placement
    model = _model(spec, absorption_scale, placement)
    fs = spec.sample_rate
    direct = round(placement.distance * fs / SPEED_OF_SOUND)
    # Least squares on a uniform grid of a smooth curve: every 0.5 ms fits the same line as
    # every sample does, at a fraction of the cost.
    grid = np.arange(direct, model.n_total, max(1, min(fs // 2000, model.n_total // 4000)))
    early_energy = model.early[: model.n_total] ** 2
    early_after = np.cumsum(early_energy[::-1])[::-1]
    edc = np.where(grid < early_after.size, early_after[np.minimum(grid, early_after.size - 1)], 0)
    # The tail's expected energy after sample n, summed in closed form per pair of bands
    # (sum_k exp(-r k) from k0 to K = (exp(-r k0) - exp(-r (K + 1))) / (1 - exp(-r))).
    cov = _band_covariance(fs) * np.outer(model.level, model.level)
    n_tail = model.n_total - model.n_mix
    k0 = np.maximum(grid - model.n_mix, 0)
    for a, b in zip(*np.nonzero(np.triu(cov)), strict=True):
        rate = (model.delta[a] + model.delta[b]) / fs
        weight = cov[a, b] * (1.0 if a == b else 2.0)
        edc = edc + weight * (np.exp(-rate * k0) - np.exp(-rate * n_tail)) / -np.expm1(-rate)
    edc_db = 10.0 * np.log10(np.maximum(edc, 1e-300) / edc[0])
    fit = np.flatnonzero((edc_db <= -5.0) & (edc_db >= -35.0))
    slope = np.polyfit((grid[fit] - direct) / fs, edc_db[fit], 1)[0]
    return float(-60.0 / slope)
