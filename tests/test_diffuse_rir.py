"""Tests for ``simulation.method: diffuse`` (dereverb_data/diffuse_rir.py).

RT60s are measured here independently of the module: octave bands by a zero-phase Butterworth
band-pass (order 3, ``sosfiltfilt``), Schroeder backward integration from the direct path, a
least-squares line between -5 and -35 dB. A stochastic tail's measured T30 scatters around its
decay like any diffuse field's (by about ``0.55 / sqrt(B T)``, ``B`` the band's width: 10 % at
125 Hz for 0.3 s, under 1 % at 4 kHz for 3 s), so per-band accuracy is tested on the mean of
several RIRs (placements) of each room, and every single RIR against that scatter.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from dereverb_data import diffuse_rir as dr
from dereverb_data.acoustics import direct_path_index, measure_rir
from dereverb_data.manifest import (
    OCTAVE_BANDS_HZ,
    SPEED_OF_SOUND,
    ManifestError,
    Simulation,
    eyring_rt60,
    load_manifest,
    parse_manifest,
)
from dereverb_data.rir_bank import RirSpec, reference_placement
from dereverb_data.rooms import SURFACES, Placement, RoomSpec
from dereverb_data.seeds import stable_hash

REPO = Path(__file__).resolve().parents[1]
FS = 16000
FLAT = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
SOFT_HIGHS = (0.5, 0.7, 1.0, 1.2, 1.4, 1.5)
BOOMY = (1.4, 1.2, 1.0, 0.9, 0.8, 0.8)
# (dims, mid-band RT60 target, profile): RT60 0.3-3 s, flat and sloped absorption.
ROOMS = [
    ((5.0, 4.0, 3.0), 0.3, FLAT),
    ((6.0, 5.0, 3.0), 0.6, SOFT_HIGHS),
    ((8.0, 6.0, 3.5), 1.2, BOOMY),
    ((10.0, 8.0, 4.0), 3.0, FLAT),
]
MID_BAND = Simulation(method="diffuse", diffuse={"calibrate_to": "mid_band"})
DIFFUSE = Simulation(method="diffuse")
# Octave bandwidths; the top band runs to Nyquist in the simulator, not in the measurement.
BANDWIDTH = np.array(OCTAVE_BANDS_HZ) * (math.sqrt(2) - 1 / math.sqrt(2))


def make_room(
    dims: tuple[float, float, float], target: float | None, profile: tuple[float, ...]
) -> RoomSpec:
    # Surfaces differ a little (+-5 %), as sampled rooms do.
    jitter = (0.95, 1.05, 1.0, 0.97, 1.03, 1.0)
    absorption = tuple(tuple(round(0.2 * p * j, 4) for p in profile) for j in jitter)
    return RoomSpec("test-room", "train", dims, absorption, target, None)


def placements(dims: tuple[float, float, float], n: int, seed: int = 1) -> list[Placement]:
    rng = np.random.default_rng(seed)
    lx, ly, _ = dims
    out = []
    while len(out) < n:
        source = (rng.uniform(0.5, lx - 0.5), rng.uniform(0.5, ly - 0.5), rng.uniform(1.2, 1.8))
        mic = (rng.uniform(0.5, lx - 0.5), rng.uniform(0.5, ly - 0.5), rng.uniform(0.8, 1.4))
        if math.dist(source, mic) >= 0.7:
            out.append(Placement(source, mic))
    return out


def schroeder_t30(x: np.ndarray, fs: int) -> float:
    energy = np.cumsum((x * x)[::-1])[::-1]
    edc = 10 * np.log10(energy / energy[0])
    fit = np.flatnonzero((edc <= -5) & (edc >= -35))
    return float(-60.0 / np.polyfit(fit / fs, edc[fit], 1)[0])


def octave(x: np.ndarray, fs: int, centre: float) -> np.ndarray:
    sos = scipy.signal.butter(
        3, [centre / math.sqrt(2), centre * math.sqrt(2)], "bandpass", fs=fs, output="sos"
    )
    return scipy.signal.sosfiltfilt(sos, x)


def band_t30(rir: np.ndarray, fs: int) -> np.ndarray:
    h = rir.astype(float)
    d = direct_path_index(h)
    return np.array([schroeder_t30(octave(h, fs, fc)[d:], fs) for fc in OCTAVE_BANDS_HZ])


def scatter(rt60: np.ndarray) -> np.ndarray:
    """Relative standard deviation of one RIR's measured band T30 (0.55 / sqrt(B T))."""
    return 0.55 / np.sqrt(BANDWIDTH * rt60)


@cache
def measured_rooms() -> list[dict]:
    """Placements of each room at the closed-form mid-band scale, with requested and
    measured band RT60s (computed once for the tests that share them). Enough placements
    that the mean's standard error is at most 1 % in every band: 120 for 0.3 s (10 % scatter
    at 125 Hz), a dozen for 3 s."""
    out = []
    for dims, target, profile in ROOMS:
        room = make_room(dims, target, profile)
        probe = RirSpec(room, placements(dims, 1)[0], FS, MID_BAND)
        sigma = scatter(dr.band_rt60(room, dr.diffuse_absorption_scale(probe), FS)).max()
        count = int(np.clip(math.ceil((sigma / 0.01) ** 2), 8, 120))
        for placement in placements(dims, count):
            spec = RirSpec(room, placement, FS, MID_BAND)
            scale = dr.diffuse_absorption_scale(spec)
            rir = dr.simulate_diffuse(spec, scale)
            out.append(
                {
                    "room": (dims, target),
                    "spec": spec,
                    "scale": scale,
                    "rir": rir,
                    "requested": dr.band_rt60(room, scale, FS),
                    "measured": band_t30(rir, FS),
                }
            )
    return out


# --- the manifest ---------------------------------------------------------------------------


def test_default_simulation_dump_is_unchanged() -> None:
    # Pinned from before method diffuse existed: the dump is hashed into every RIR id and the
    # manifest digest, so a change here would re-simulate every existing bank and store.
    dump = Simulation().model_dump(mode="json")
    assert dump == {
        "method": "auto",
        "hybrid_above_rt60_s": 0.25,
        "ism_order_hybrid": 3,
        "n_rays": 2000,
        "max_ism_order": 60,
        "calibration_iterations": 3,
        "rt60_tolerance": 0.08,
    }
    assert stable_hash(dump) == "44d61b7b204bb435"
    hybrid = Simulation(method="hybrid", n_rays=5000).model_dump(mode="json")
    assert stable_hash(hybrid) == "169a0237ae9cec6c"
    assert Simulation().model_dump_json() == json.dumps(dump, separators=(",", ":"))
    for path in sorted((REPO / "manifests").glob("*.yaml")):
        if "lhotse" in path.name:
            continue  # needs the optional package to load
        dump = load_manifest(path).simulation.model_dump(mode="json")
        if path.name.startswith("recipe-"):  # moved to diffuse on purpose (realism benchmark)
            assert dump["method"] == "diffuse" and "diffuse" in dump
        else:  # the other shipped manifests keep building the stores they built
            assert "diffuse" not in dump


def test_diffuse_settings_validate_and_hash_one_way() -> None:
    implicit = Simulation.model_validate({"method": "diffuse"})
    explicit = Simulation.model_validate({"method": "diffuse", "diffuse": {}})
    assert implicit.model_dump(mode="json") == explicit.model_dump(mode="json")
    assert implicit.model_dump(mode="json")["diffuse"] == {
        "mixing_time_ms": None,
        "rt60_formula": "eyring",
        "air_absorption": True,
        "calibrate_to": "broadband_t30",
    }
    assert Simulation.model_validate(implicit.model_dump(mode="json")) == implicit
    base = {"name": "unit", "seed": 3, "corpus": {"kind": "demo"}}
    with pytest.raises(ManifestError, match=r"simulation\.diffuse: settings only meaningful"):
        parse_manifest({**base, "simulation": {"method": "hybrid", "diffuse": {}}})
    with pytest.raises(ManifestError, match="did you mean 'mixing_time_ms'"):
        parse_manifest(
            {**base, "simulation": {"method": "diffuse", "diffuse": {"mixing_time": 30}}}
        )
    with pytest.raises(ManifestError, match="mixing_time_ms"):
        parse_manifest(
            {**base, "simulation": {"method": "diffuse", "diffuse": {"mixing_time_ms": 1}}}
        )


# --- physics pieces -------------------------------------------------------------------------


def test_image_sources_match_pyroomacoustics() -> None:
    """Every image up to order 3, its distance and per-band reflection factor, against
    pyroomacoustics' own image model (which also names the walls in SURFACES order)."""
    import pyroomacoustics as pra

    alpha = np.array(
        [
            [0.05, 0.1, 0.2, 0.3, 0.4, 0.5],
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
            [0.1] * 6,
            [0.3] * 6,
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
            [0.02, 0.04, 0.08, 0.16, 0.32, 0.64],
        ]
    )
    materials = {
        surface: pra.Material(
            energy_absorption={"coeffs": list(a), "center_freqs": list(OCTAVE_BANDS_HZ)}
        )
        for surface, a in zip(SURFACES, alpha, strict=True)
    }
    dims, source, mic = (5.0, 4.0, 3.0), (1.0, 1.5, 1.6), (3.2, 2.5, 1.1)
    room = pra.ShoeBox(list(dims), fs=FS, materials=materials, max_order=3, air_absorption=False)
    room.add_source(list(source))
    room.add_microphone(list(mic))
    room.image_source_model()
    theirs = room.sources[0]
    their_d = np.linalg.norm(theirs.images - np.array(mic)[:, None], axis=0)
    their_rows = sorted(zip(np.round(their_d, 4), theirs.damping[:6].T.tolist(), strict=True))

    distances, counts = dr._images(dims, source, mic, radius=40.0)
    factors = np.exp(counts @ (0.5 * np.log1p(-alpha)))
    low = counts.sum(axis=1) <= 3
    our_rows = sorted(zip(np.round(distances[low], 4), factors[low].tolist(), strict=True))
    assert len(our_rows) == len(their_rows) == 63
    for (d1, f1), (d2, f2) in zip(our_rows, their_rows, strict=True):
        assert d1 == pytest.approx(d2, abs=2e-4)
        np.testing.assert_allclose(f1, f2, rtol=1e-5)
    # and nothing is missed inside the radius: the lattice holds one image per room volume
    expected = 4 / 3 * math.pi * 40.0**3 / math.prod(dims)
    assert distances.size == pytest.approx(expected, rel=0.02)


def test_band_rt60_formulas_and_air_absorption() -> None:
    room = RoomSpec("r", "train", (6.0, 5.0, 3.0), ((0.25,) * 6,) * 6, None, None)
    eyring = dr.band_rt60(room, 1.0, FS, air_absorption_on=False)
    # Eyring with uniform absorption and no air is the manifest's formula (0.161 = 24 ln10/c)
    np.testing.assert_allclose(eyring, eyring_rt60(room.dims, 0.25), rtol=2e-3)
    sabine = dr.band_rt60(room, 1.0, FS, formula="sabine", air_absorption_on=False)
    assert np.all(sabine > eyring)
    np.testing.assert_allclose(sabine / eyring, -math.log(0.75) / 0.25, rtol=1e-9)
    with_air = dr.band_rt60(room, 1.0, FS)
    assert np.all(with_air <= eyring) and with_air[-1] < 0.95 * eyring[-1]
    # bands whose lower edge is above Nyquist do not exist
    at_4k = dr.band_rt60(room, 1.0, 4000)
    assert np.isnan(at_4k[-1]) and np.all(np.isfinite(at_4k[:-1]))
    # ISO 9613-1 at 20 C / 50 % RH, against pyroomacoustics' table for 20 C, 30-50 % RH
    import pyroomacoustics as pra

    m = dr.air_absorption()
    assert np.all(np.diff(m) > 0)
    np.testing.assert_allclose(m, pra.parameters.air_absorption_table["20C_30-50%"][:6], rtol=0.25)


# --- the RT60s ------------------------------------------------------------------------------


def test_measured_band_t30_matches_requested_band_rt60() -> None:
    rows = measured_rooms()
    for dims, target, _ in ROOMS:
        group = [r for r in rows if r["room"] == (dims, target)]
        requested = np.array([r["requested"] for r in group])
        error = np.array([r["measured"] for r in group]) / requested - 1
        mean = error.mean(axis=0)
        assert np.all(np.abs(mean) <= 0.05), f"{dims} {target} s: mean error {mean}"
        # each RIR within its statistical scatter (5 sigma: the T30 of a few degrees of
        # freedom has a long upper tail) plus the octave filters' leakage
        assert np.all(np.abs(error) <= 0.04 + 5 * scatter(requested)), f"{dims} {target} s"


def test_closed_form_mid_band_calibration_hits_the_target() -> None:
    rows = measured_rooms()
    for dims, target, _ in ROOMS:
        group = [r for r in rows if r["room"] == (dims, target)]
        # by construction: the formula's mid-band RT60 is the target
        assert np.mean(group[0]["requested"][2:4]) == pytest.approx(target, rel=1e-4)
        measured_mid = np.array([np.mean(r["measured"][2:4]) for r in group])
        assert measured_mid.mean() == pytest.approx(target, rel=0.05)
        sigma = scatter(np.array(group[0]["requested"]))[2:4].mean() / math.sqrt(2)
        assert np.all(np.abs(measured_mid / target - 1) <= 0.04 + 5 * sigma)


def test_broadband_t30_agrees_with_measure_rir_and_the_model() -> None:
    for row in measured_rooms()[::7]:
        rir = row["rir"].astype(float)
        labels = measure_rir(rir, FS)
        ours = schroeder_t30(rir[labels.direct_index :], FS)
        assert labels.rt60_t30 == pytest.approx(ours, rel=1e-6)
        expected = dr.expected_t30(row["spec"], row["scale"])
        assert labels.rt60_t30 == pytest.approx(expected, rel=0.08)
    # A flat room's broadband decay is its bands' (the top band, shortened by air, weighs most).
    flat = measured_rooms()[0]
    t30 = measure_rir(flat["rir"], FS).rt60_t30
    assert flat["requested"].min() * 0.95 <= t30 <= flat["requested"].max() * 1.05


def test_broadband_calibration_hits_the_target_t30() -> None:
    """The default calibration targets the label: the expected broadband T30 at the reference
    placement is the target, and measured T30s (which scatter by placement and by noise, most
    where a slow low band dominates the late decay) centre on it."""
    for dims, target, profile in ROOMS:
        room = make_room(dims, target, profile)
        spec = RirSpec(room, placements(dims, 1)[0], FS, DIFFUSE)
        scale = dr.diffuse_absorption_scale(spec)
        ref = reference_placement(room)
        assert dr.expected_t30(spec, scale, ref) == pytest.approx(target, rel=1e-3)
        measured = [
            measure_rir(dr.simulate_diffuse(spec, scale, placement), FS).rt60_t30
            for placement in [ref, *placements(dims, 7, seed=13)]
        ]
        assert np.mean(measured) == pytest.approx(target, rel=0.08), (dims, target, measured)
        assert np.all(np.abs(np.array(measured) / target - 1) <= 0.2), (dims, target, measured)
        # a sloped profile puts the mid bands well off the broadband target
        if profile != FLAT:
            mid = dr.band_rt60(room, scale, FS)[2:4].mean()
            assert abs(mid / target - 1) > 0.02


# --- reproducibility and identity -----------------------------------------------------------

_REFERENCE = {
    "dims": [6.0, 5.0, 3.0],
    "source": [1.7, 2.2, 1.5],
    "mic": [4.1, 3.0, 1.2],
    "target": 0.8,
}


def reference_rir_digest() -> str:
    room = make_room(tuple(_REFERENCE["dims"]), _REFERENCE["target"], SOFT_HIGHS)
    spec = RirSpec(
        room, Placement(tuple(_REFERENCE["source"]), tuple(_REFERENCE["mic"])), FS, DIFFUSE
    )
    rir = dr.simulate_diffuse(spec, 0.9)
    return hashlib.sha256(rir.tobytes()).hexdigest()


def test_bit_identical_across_calls_and_processes() -> None:
    here = reference_rir_digest()
    assert reference_rir_digest() == here
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); "
        "from tests.test_diffuse_rir import reference_rir_digest; print(reference_rir_digest())"
    )
    digests = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.strip()
        for _ in range(2)
    ]
    assert digests == [here, here]


def test_a_different_spec_gives_a_different_tail() -> None:
    dims, target, profile = ROOMS[1]
    room = make_room(dims, target, profile)
    a, b = placements(dims, 2, seed=5)
    spec_a = RirSpec(room, a, FS, DIFFUSE)
    moved = RirSpec(room, Placement(a.source, (a.mic[0] + 0.01, a.mic[1], a.mic[2])), FS, DIFFUSE)
    later = RirSpec(room, a, FS, Simulation(method="diffuse", diffuse={"mixing_time_ms": 40}))
    rir_a = dr.simulate_diffuse(spec_a, 1.0)
    n0 = math.ceil(0.05 * FS)  # past both mixing times: tail only
    for other in (moved, later):
        rir = dr.simulate_diffuse(other, 1.0)
        n = min(rir.size, rir_a.size)
        corr = np.corrcoef(rir_a[n0:n], rir[n0:n])[0, 1]
        assert abs(corr) < 0.1
    # another absorption scale is another spec too
    assert not np.array_equal(dr.simulate_diffuse(spec_a, 1.01)[n0:], rir_a[n0:])
    # a placement passed explicitly (calibration) seeds by itself, whatever the spec's own is
    spec_b = RirSpec(room, b, FS, DIFFUSE)
    ref = reference_placement(room)
    np.testing.assert_array_equal(
        dr.simulate_diffuse(spec_a, 1.0, ref), dr.simulate_diffuse(spec_b, 1.0, ref)
    )
    np.testing.assert_array_equal(
        dr.simulate_diffuse(spec_a, 1.0, a), dr.simulate_diffuse(spec_a, 1.0)
    )


# --- the direct path, the mixing time, the length -------------------------------------------


def test_direct_path_at_the_geometric_delay_with_amplitude_one_over_r() -> None:
    room = make_room((6.0, 5.0, 3.0), None, FLAT)
    # 100 samples of flight exactly: the windowed sinc is 1 there and 0 at the other samples
    distance = 100 * SPEED_OF_SOUND / FS
    on_grid = Placement((1.5, 2.5, 1.5), (1.5 + distance, 2.5, 1.5))
    rir = dr.simulate_diffuse(RirSpec(room, on_grid, FS, DIFFUSE), 1.0)
    assert direct_path_index(rir) == 100
    air = np.exp(-0.5 * distance * dr.air_absorption()).mean()
    assert rir[100] == pytest.approx(air / distance, rel=0.01)
    assert np.max(np.abs(rir[:90])) < 0.01 * rir[100]  # nothing arrives before it
    # off the grid: the peak is the sample nearest the flight time
    for placement in placements(room.dims, 8, seed=3):
        rir = dr.simulate_diffuse(RirSpec(room, placement, FS, DIFFUSE), 1.0)
        delay = placement.distance * FS / SPEED_OF_SOUND
        d = direct_path_index(rir)
        assert abs(d - delay) <= 0.5 + 1e-9
        # a band-limited impulse's peak sample: between sinc(0.5) and 1 of 1/r
        assert 0.6 / placement.distance <= rir[d] <= 1.01 / placement.distance


def test_direct_path_is_40_samples_earlier_than_pyroomacoustics() -> None:
    """State it: pyroomacoustics' peak lags the flight time by its filter (81 taps)."""
    import pyroomacoustics as pra

    room = make_room((6.0, 5.0, 3.0), None, FLAT)
    placement = placements(room.dims, 1, seed=4)[0]
    ours = dr.simulate_diffuse(RirSpec(room, placement, FS, DIFFUSE), 1.0)
    shoebox = pra.ShoeBox(list(room.dims), fs=FS, materials=pra.Material(0.2), max_order=0)
    shoebox.add_source(list(placement.source))
    shoebox.add_microphone(list(placement.mic))
    shoebox.compute_rir()
    theirs = np.asarray(shoebox.rir[0][0])
    assert direct_path_index(theirs) - direct_path_index(ours) == 40
    # and the same 1/r normalisation
    assert np.max(ours) == pytest.approx(np.max(theirs), rel=0.1)


def _decay_normalised(energy: np.ndarray, lo: int, hi: int, delta: float, n_mix: int) -> float:
    """Energy in [lo, hi) per unit of the expected decay exp(-2 delta t) (t from n_mix)."""
    n = np.arange(lo, hi)
    return float(energy[lo:hi].sum() / np.exp(-2 * delta * (n - n_mix) / FS).sum())


def test_energy_continuity_at_the_mixing_time() -> None:
    """Band energy just before the mixing time (image sources, the matching window) and just
    after (noise tail), each per unit of the band's decay: within 2 dB in every band from
    250 Hz to 4 kHz over each room's placements, and within 4 dB for each RIR over those bands
    together. A single RIR scatters by about 0.9 dB (standard deviation; 3.8 dB at worst in 300
    placements): its images interfere (the energy of their sum is not the sum of their
    energies, which the tail matches: they agree on average), and a short window of noise has
    few degrees of freedom. 125 Hz is left out: below the Schroeder frequency of
    these rooms the early images add coherently (a few dB of low-frequency build-up) and a
    window of a few ms cannot resolve the band."""
    bands = range(1, len(OCTAVE_BANDS_HZ))
    count = 24
    for dims, target, profile in ROOMS:
        room = make_room(dims, target, profile)
        before = np.zeros((count, len(OCTAVE_BANDS_HZ)))
        after = np.zeros_like(before)
        for k, placement in enumerate(placements(dims, count, seed=7)):
            spec = RirSpec(room, placement, FS, MID_BAND)
            scale = dr.diffuse_absorption_scale(spec)
            rt60 = dr.band_rt60(room, scale, FS)
            t_mix = dr.mixing_time_s(room, placement)
            n_mix = math.ceil(t_mix * FS)
            n_w = math.floor(dr.matching_window_start_s(room, placement, t_mix) * FS)
            n_after = n_mix + 4 * (n_mix - n_w)
            # filtering a segment is enough: 50 ms past the windows, the edge does not reach
            segment = dr.simulate_diffuse(spec, scale)[: n_after + FS // 20].astype(float)
            for b in bands:
                energy = octave(segment, FS, OCTAVE_BANDS_HZ[b]) ** 2
                delta = 3 * math.log(10) / rt60[b]
                before[k, b] = _decay_normalised(energy, n_w, n_mix, delta, n_mix)
                after[k, b] = _decay_normalised(energy, n_mix, n_after, delta, n_mix)
            step = 10 * math.log10(before[k, 1:].sum() / after[k, 1:].sum())
            assert abs(step) <= 4.0, (dims, k, step)
        per_band = 10 * np.log10(before[:, 1:].sum(axis=0) / after[:, 1:].sum(axis=0))
        assert np.all(np.abs(per_band) <= 2.0), (dims, per_band)


def test_tail_level_agrees_with_diffuse_field_theory() -> None:
    """The images' energy at the mixing time (which sets the tail's level) agrees with the
    statistical energy of a diffuse field, 4 pi c / (V fs) exp(-2 delta t) per sample: an
    independent check of the image amplitudes and of the level matching."""
    for dims, target, profile in ROOMS:
        room = make_room(dims, target, profile)
        volume = math.prod(dims)
        for placement in placements(dims, 4, seed=9):
            spec = RirSpec(room, placement, FS, MID_BAND)
            scale = dr.diffuse_absorption_scale(spec)
            model = dr._model(spec, scale, placement)
            assert model.matched
            theory = 4 * math.pi * SPEED_OF_SOUND / (volume * FS)
            theory *= np.exp(-2 * model.delta * model.n_mix / FS)
            db = 10 * np.log10(model.level**2 / theory)
            assert np.all(np.abs(db) <= 1.5), (dims, db)


def test_mixing_time_and_length() -> None:
    room = make_room((6.0, 5.0, 3.0), 0.6, SOFT_HIGHS)
    placement = placements(room.dims, 1)[0]
    t_mix = dr.mixing_time_s(room, placement)
    expected = (3 * 90.0 * 128 / (4 * math.pi)) ** (1 / 3) / SPEED_OF_SOUND
    assert t_mix == pytest.approx(expected)
    assert 0.035 < t_mix < 0.045
    spec = RirSpec(room, placement, FS, DIFFUSE)
    rir = dr.simulate_diffuse(spec, 1.0)
    assert rir.dtype == np.float32
    slowest = np.nanmax(dr.band_rt60(room, 1.0, FS))
    assert rir.size == math.ceil(t_mix * FS) + math.ceil(1.1 * slowest * FS)
    # the end is more than 60 dB below the start of the tail
    n_mix, n = math.ceil(t_mix * FS), round(0.05 * FS)
    start = np.mean(rir[n_mix : n_mix + n].astype(float) ** 2)
    end = np.mean(rir[-n:].astype(float) ** 2)
    assert 10 * math.log10(end / start) < -60
    # a user mixing time is honoured, but never before 5 ms after the direct sound
    late = Simulation(method="diffuse", diffuse={"mixing_time_ms": 50}).diffuse
    assert dr.mixing_time_s(room, placement, late) == pytest.approx(0.05)
    early = Simulation(method="diffuse", diffuse={"mixing_time_ms": 5}).diffuse
    assert dr.mixing_time_s(room, placement, early) == pytest.approx(
        placement.distance / SPEED_OF_SOUND + 0.005
    )
    # ... and a window with too few images falls back to the statistical level
    short = RirSpec(
        room, placement, FS, Simulation(method="diffuse", diffuse={"mixing_time_ms": 5})
    )
    assert not dr._model(short, 1.0, placement).matched
    assert np.all(np.isfinite(dr.simulate_diffuse(short, 1.0)))


def test_refuses_points_outside_the_room() -> None:
    room = make_room((6.0, 5.0, 3.0), None, FLAT)
    outside = Placement((6.5, 1.0, 1.0), (2.0, 2.0, 1.2))
    with pytest.raises(ValueError, match="not inside"):
        dr.simulate_diffuse(RirSpec(room, outside, FS, DIFFUSE), 1.0)
