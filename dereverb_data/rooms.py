"""Room and placement specs, and how they are drawn from a manifest's room distribution.

Specs are frozen dataclasses that serialise to plain dicts; their hashes address the RIR bank,
so an unchanged spec is never simulated twice, and a changed one is simulated once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from .manifest import OCTAVE_BANDS_HZ, Rooms
from .seeds import rng_for, stable_hash

SURFACES = ("west", "east", "south", "north", "floor", "ceiling")
_SURFACE_GROUP = {
    "west": "walls",
    "east": "walls",
    "south": "walls",
    "north": "walls",
    "floor": "floor",
    "ceiling": "ceiling",
}


RT60_EDGE_MARGIN = 1.05


class PlacementError(ValueError):
    """No source/microphone placement satisfies the manifest in this room."""


@dataclass(frozen=True)
class RoomSpec:
    """A shoebox room: geometry, absorption shape per surface and band, and its RT60 target.

    ``absorption`` holds uncalibrated coefficients per surface (in :data:`SURFACES` order) and
    octave band; when ``target_rt60`` is set the simulator scales them all by one factor so the
    *measured* RT60 hits the target (pyroomacoustics' Sabine inversion overshoots by ~1.3x).
    """

    room_id: str
    split: str
    dims: tuple[float, float, float]
    absorption: tuple[tuple[float, ...], ...]
    target_rt60: float | None
    rt60_range: tuple[float, float] | None = None  # every placement's measured RT60 goes here

    def to_dict(self) -> dict:
        return asdict(self)

    @cached_property  # frozen: computed once per room, not once per example
    def spec_hash(self) -> str:
        # The id and split name are labels, not physics: equal rooms share a hash.
        return stable_hash([self.dims, self.absorption, self.target_rt60, self.rt60_range])


@dataclass(frozen=True)
class Placement:
    source: tuple[float, float, float]
    mic: tuple[float, float, float]

    @property
    def distance(self) -> float:
        return math.dist(self.source, self.mic)


def _round(values: np.ndarray | list[float], digits: int = 4) -> tuple[float, ...]:
    # Rounded so specs print and hash the same after a JSON round trip.
    return tuple(round(float(v), digits) for v in values)


def sample_room(config: Rooms, seed: int, split: str, index: int) -> RoomSpec:
    """Draw room ``index`` of ``split``; rooms of different splits never coincide."""
    rng = rng_for(seed, "room", split, index)
    dims = _round(
        [
            rng.uniform(*config.length_m),
            rng.uniform(*config.width_m),
            rng.uniform(*config.height_m),
        ],
        3,
    )
    target = None
    if config.rt60_s is not None:
        # Log-uniform: perceptually even, and short RT60s are not starved. Targets keep a
        # small margin from the edges so placement-to-placement spread stays inside the range.
        low, high = config.rt60_s[0] * RT60_EDGE_MARGIN, config.rt60_s[1] / RT60_EDGE_MARGIN
        low, high = min(low, high), max(low, high)
        target = round(float(math.exp(rng.uniform(math.log(low), math.log(high)))), 4)
    absorption = _sample_absorption(config, rng)
    return RoomSpec(
        f"{split}-room{index:03d}",
        split,
        dims,
        absorption,
        target,
        config.rt60_s,  # type: ignore[arg-type]
    )


def _sample_absorption(config: Rooms, rng: np.random.Generator) -> tuple[tuple[float, ...], ...]:
    spec = config.absorption
    jitter = spec.jitter
    if spec.kind == "profile":
        names = sorted(spec.profiles)
        shape = np.asarray(spec.profiles[names[rng.integers(len(names))]], dtype=float)
        # Mean 0.2 at 500-1000 Hz before calibration: only the shape and jitter matter.
        base = 0.2 * shape / shape[2:4].mean()
        per_surface = [base * rng.uniform(1 - jitter, 1 + jitter) for _ in SURFACES]
    else:
        from pyroomacoustics import make_materials

        entry = spec.materials[rng.integers(len(spec.materials))]
        per_surface = []
        for surface in SURFACES:
            name = entry.get(_SURFACE_GROUP[surface], entry.get("walls", "hard_surface"))
            material = make_materials(**{surface: name})[surface]
            coeffs = np.interp(
                OCTAVE_BANDS_HZ,
                material["energy_absorption"]["center_freqs"],
                material["energy_absorption"]["coeffs"],
            )
            per_surface.append(coeffs * rng.uniform(1 - jitter, 1 + jitter))
    return tuple(_round(np.clip(c, 0.01, 0.99)) for c in per_surface)


def sample_placement(config: Rooms, room: RoomSpec, seed: int, index: int) -> Placement:
    """Draw a microphone, then a source at a distance in ``distance_m`` inside the margins."""
    rng = rng_for(seed, "placement", room.spec_hash, index)
    margin = config.wall_margin_m
    lx, ly, _ = room.dims
    for _ in range(1000):
        mic = np.array(
            [
                rng.uniform(margin, lx - margin),
                rng.uniform(margin, ly - margin),
                rng.uniform(*config.mic_height_m),
            ]
        )
        source_z = rng.uniform(*config.source_height_m)
        distance = rng.uniform(*config.distance_m)
        horizontal_sq = distance**2 - (source_z - mic[2]) ** 2
        if horizontal_sq <= 0:
            continue
        azimuth = rng.uniform(0, 2 * math.pi)
        horizontal = math.sqrt(horizontal_sq)
        source = np.array(
            [mic[0] + horizontal * math.cos(azimuth), mic[1] + horizontal * math.sin(azimuth)]
        )
        if margin <= source[0] <= lx - margin and margin <= source[1] <= ly - margin:
            return Placement(_round([*source, source_z], 3), _round(mic, 3))  # type: ignore[arg-type]
    raise PlacementError(
        f"room {room.room_id} {room.dims} m: no source/microphone placement with distance "
        f"{config.distance_m} m and wall margin {margin} m found in 1000 draws"
    )
