"""RIR simulation: determinism, the content-addressed bank, RT60 calibration, method choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dereverb_data.acoustics import measure_rir
from dereverb_data.manifest import parse_manifest
from dereverb_data.rir_bank import (
    RirBank,
    RirSpec,
    SimulationError,
    get_or_calibrate,
    get_or_simulate,
    simulate,
)
from dereverb_data.rooms import PlacementError, sample_placement, sample_room

BASE = {
    "name": "bank",
    "seed": 11,
    "corpus": {"kind": "demo"},
    "rooms": {
        "length_m": [4, 6],
        "width_m": [3, 5],
        "height_m": [2.5, 3],
        "rt60_s": [0.25, 0.6],
        "distance_m": [0.8, 2.0],
    },
}


def spec_for(manifest_data: dict, room_index: int = 0, placement: int = 0) -> RirSpec:
    manifest = parse_manifest(manifest_data)
    room = sample_room(manifest.rooms, manifest.seed, "train", room_index)
    place = sample_placement(manifest.rooms, room, manifest.seed, placement)
    return RirSpec(room, place, manifest.sample_rate, manifest.simulation)


def test_simulation_is_deterministic_for_both_methods() -> None:
    for method in ("ism", "hybrid"):
        data = {**BASE, "simulation": {"method": method}}
        spec = spec_for(data)
        first, second = simulate(spec, 1.0), simulate(spec, 1.0)
        assert np.array_equal(first, second), method


def test_bank_simulates_once_and_reuses(tmp_path: Path) -> None:
    bank = RirBank(str(tmp_path / "bank"))
    spec = spec_for(BASE)
    rir, labels, simulated = get_or_simulate(bank, spec)
    assert simulated and bank.has_rir(spec.rir_id)
    again, labels_again, simulated_again = get_or_simulate(bank, spec)
    assert not simulated_again
    assert np.array_equal(rir, again) and labels == labels_again
    assert labels["distance_m"] == pytest.approx(spec.placement.distance, abs=1e-3)
    assert bank.rir_ids() == {spec.rir_id}
    # No temporary files are left behind by the atomic writes.
    assert not [p for p in (tmp_path / "bank").rglob("*") if ".tmp-" in p.name]


def test_spec_hash_tracks_physics_not_names() -> None:
    spec = spec_for(BASE)
    other_split = RirSpec(
        spec.room.__class__(**{**spec.room.to_dict(), "room_id": "x", "split": "test"}),
        spec.placement,
        spec.sample_rate,
        spec.simulation,
    )
    assert other_split.rir_id == spec.rir_id
    moved = spec_for(BASE, placement=1)
    assert moved.rir_id != spec.rir_id
    other_rate = RirSpec(spec.room, spec.placement, 8000, spec.simulation)
    assert other_rate.rir_id != spec.rir_id


def test_calibration_hits_the_requested_rt60(tmp_path: Path) -> None:
    bank = RirBank(str(tmp_path / "bank"))
    measured, targets = [], []
    for room_index in range(5):
        spec = spec_for(BASE, room_index)
        _, computed = get_or_calibrate(bank, spec)
        assert computed
        rir, labels, _ = get_or_simulate(bank, spec)
        measured.append(labels["rt60_t30"])
        targets.append(spec.room.target_rt60)
        assert labels["rt60_t30"] == pytest.approx(measure_rir(rir, 16000).rt60_t30)
    measured, targets = np.array(measured), np.array(targets)
    # Without calibration pyroomacoustics overshoots by ~1.3x; calibrated, we land close.
    # The room is calibrated at a reference placement; other placements spread by ~10 %.
    assert np.all(np.abs(measured / targets - 1) < 0.2), (measured, targets)
    low, high = BASE["rooms"]["rt60_s"]
    assert np.mean((measured >= low) & (measured <= high)) >= 0.8


def test_auto_method_uses_hybrid_for_long_tails() -> None:
    short = spec_for({**BASE, "rooms": {**BASE["rooms"], "rt60_s": [0.15, 0.2]}})
    long = spec_for({**BASE, "rooms": {**BASE["rooms"], "rt60_s": [0.8, 1.0]}})
    assert short.method(1.0)[0] == "ism"
    assert long.method(1.0) == ("hybrid", 3)


def test_pure_ism_refuses_to_truncate_a_long_tail() -> None:
    data = {
        **BASE,
        "rooms": {**BASE["rooms"], "rt60_s": [1.5, 2.0]},
        "simulation": {"method": "ism", "max_ism_order": 10},
    }
    spec = spec_for(data)
    with pytest.raises(SimulationError, match="max_ism_order"):
        spec.method(0.3)


def test_impossible_placement_is_reported() -> None:
    # Valid on paper for the manifest (checked against the smallest room's diagonal), but a
    # hand-made spec where heights leave no horizontal room fails with a clear message.
    manifest = parse_manifest(
        {
            **BASE,
            "rooms": {
                **BASE["rooms"],
                "distance_m": [3.5, 3.6],
                "length_m": [4, 4.1],
                "width_m": [3, 3.1],
            },
        }
    )
    room = sample_room(manifest.rooms, manifest.seed, "train", 0)
    with pytest.raises(PlacementError, match=room.room_id):
        for index in range(50):
            sample_placement(manifest.rooms, room, manifest.seed, index)
