"""Room impulse responses: simulate each unique spec once, keep it addressed by its hash.

Simulation is 100-1000x the cost of rendering, so the bank is the build's cache. Keys hash the
room physics, the placement, the sample rate, the simulation settings and the simulator version;
a changed room distribution simulates only new specs. Entries are written atomically (a
temporary name renamed into place, or one PUT on object stores), so a crash never leaves a
half-written RIR that looks complete.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import numpy as np

from .acoustics import RT60_METHOD, RirLabels, measure_rir
from .fsio import read_bytes, url_to_fs, write_atomic
from .manifest import OCTAVE_BANDS_HZ, Simulation
from .measured_rirs import MeasuredRirSpec, MeasuredRoom, ingest
from .rooms import SURFACES, Placement, RoomSpec
from .seeds import derive_seed, stable_hash

SIMULATOR_REVISION = 1  # bump when our use of the simulator changes its output
AUGMENT_REVISION = 1  # bump when augmenting changes its output for the same base and draw


def simulator_version() -> str:
    import pyroomacoustics

    return f"pyroomacoustics-{pyroomacoustics.__version__}+dereverb{SIMULATOR_REVISION}"


def version_for(simulation: Simulation) -> str:
    """The simulator version an RIR depends on: a pyroomacoustics upgrade must not re-simulate
    diffuse RIRs (our own code), nor a change of ours re-simulate pyroomacoustics ones."""
    if simulation.method == "diffuse":
        from .diffuse_rir import diffuse_version

        return diffuse_version()
    return simulator_version()


class SimulationError(RuntimeError):
    """The simulator cannot produce an RIR for this spec."""


_ACOUSTIC_FIELDS = tuple(f.name for f in fields(RirLabels))
_PROVENANCE_FIELDS = ("distance_m", "target_rt60", "simulation", "simulator")


@dataclass(frozen=True)
class BankedRir:
    """What the bank knows about an RIR besides its samples: one record from the bank to the
    example's labels (``store_format.ExampleLabels``).

    Stored as the entry's JSON ``labels``, flat, as the bank always stored it: the acoustic
    labels by their names, the provenance fields, then the details. An acoustic label an entry
    lacks (banked before the label existed) is measured from the stored RIR when it is read
    (:meth:`from_json`), so adding a label to :class:`~dereverb_data.acoustics.RirLabels`
    never needs a resimulation, and an RIR's labels do not depend on when it was banked.
    """

    acoustics: RirLabels  # measured on the stored (float32) RIR
    distance_m: float | None  # source-microphone distance; None for a measured RIR
    target_rt60: float | None  # the room's RT60 target; None without one (measured rooms)
    simulation: str  # how it was made: "ism", "hybrid", "diffuse" or "measured"
    simulator: str  # version of what made it
    # Method-specific, as the maker recorded them: absorption scales and ISM order
    # (simulated), file, channel and normalisation (measured), the draw and the outcome
    # (augmented: ``augmented``, ``augment_refused``), ``rt60_method``.
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def augmented(self) -> bool:
        """Made by augmentation (False for a refused augmentation and for any other RIR)."""
        return bool(self.details.get("augmented", False))

    def to_json(self) -> dict[str, Any]:
        """The entry's ``labels``: plain JSON values, one flat object."""
        provenance = {name: getattr(self, name) for name in _PROVENANCE_FIELDS}
        return {**self.acoustics.to_dict(), **provenance, **self.details}

    @classmethod
    def from_json(
        cls,
        labels: Mapping[str, Any],
        rir: np.ndarray | None = None,
        sample_rate: int | None = None,
    ) -> BankedRir:
        """The record of an entry's ``labels``. Acoustic labels it lacks are measured from
        ``rir`` (the stored RIR) at ``sample_rate``; ValueError without them."""
        acoustic = {name: labels[name] for name in _ACOUSTIC_FIELDS if name in labels}
        missing = [name for name in _ACOUSTIC_FIELDS if name not in acoustic]
        if missing:
            if rir is None or sample_rate is None:
                raise ValueError(
                    f"banked labels lack {missing} (banked before they existed): measuring "
                    "them needs the stored RIR and its sample rate"
                )
            measured = measure_rir(rir, sample_rate).to_dict()
            acoustic.update({name: measured[name] for name in missing})
        known = {*_ACOUSTIC_FIELDS, *_PROVENANCE_FIELDS}
        return cls(
            acoustics=RirLabels(**acoustic),
            **{name: labels[name] for name in _PROVENANCE_FIELDS},
            details={k: v for k, v in labels.items() if k not in known},
        )


@dataclass(frozen=True)
class RirSpec:
    room: RoomSpec
    placement: Placement
    sample_rate: int
    simulation: Simulation

    @cached_property  # a plan asks for it several times per example
    def rir_id(self) -> str:
        return stable_hash(
            [
                self.room.spec_hash,
                asdict(self.placement),
                self.sample_rate,
                self.simulation.model_dump(mode="json"),
                version_for(self.simulation),
            ],
            length=20,
        )

    def method(self, absorption_scale: float) -> tuple[str, int]:
        """Which simulator and ISM order: pure ISM at the order the tail needs, or hybrid."""
        sim = self.simulation
        if sim.method == "diffuse":
            return "diffuse", 0  # image sources up to the mixing time, whatever their order
        if sim.method == "hybrid":
            return "hybrid", sim.ism_order_hybrid
        order = _ism_order(self.room, absorption_scale)
        if sim.method == "ism":
            if order > sim.max_ism_order:
                raise SimulationError(
                    f"room {self.room.room_id}: pure ISM needs order {order} > max_ism_order "
                    f"{sim.max_ism_order} (capping it would truncate the tail); use hybrid"
                )
            return "ism", order
        target = self.room.target_rt60 or 0.0
        if target > sim.hybrid_above_rt60_s or order > sim.max_ism_order:
            return "hybrid", sim.ism_order_hybrid
        return "ism", order


@dataclass(frozen=True)
class AugmentedRirSpec:
    """A banked RIR (simulated or measured) with its decay and DRR changed
    (:mod:`dereverb_data.augment`): a bank entry of its own, made from the base's entry."""

    base: RirSpec | MeasuredRirSpec
    drr_change_db: float
    rt60_factor: float
    bands: bool = True

    @property
    def room(self) -> RoomSpec | MeasuredRoom:
        return self.base.room

    @property
    def sample_rate(self) -> int:
        return self.base.sample_rate

    @cached_property
    def rir_id(self) -> str:
        # The base's id already hashes everything the base depends on.
        return stable_hash(
            [
                "augmented",
                self.base.rir_id,
                self.drr_change_db,
                self.rt60_factor,
                self.bands,
                AUGMENT_REVISION,
            ],
            length=20,
        )


AnyRirSpec = RirSpec | MeasuredRirSpec | AugmentedRirSpec


def base_spec(spec: AnyRirSpec) -> RirSpec | MeasuredRirSpec:
    """The simulated or measured spec an RIR comes from (itself unless augmented)."""
    return spec.base if isinstance(spec, AugmentedRirSpec) else spec


def augment_rir(
    base_rir: np.ndarray, base: BankedRir, spec: AugmentedRirSpec
) -> tuple[np.ndarray, BankedRir]:
    """The augmented RIR and its labels, or, when :mod:`dereverb_data.augment` refuses the
    change (a ValueError), the base RIR unchanged with the refusal in its labels: a build
    never fails for an augmentation, and the fallback is the same in every run."""
    from .augment import change_decay, change_drr

    fs = spec.sample_rate
    drawn = {
        "drr_change_db": spec.drr_change_db,
        "rt60_factor": spec.rt60_factor,
        "base_rir_id": spec.base.rir_id,
        "augment_revision": AUGMENT_REVISION,
    }
    try:
        h = base_rir.astype(np.float64)
        if spec.rt60_factor != 1.0:
            t_base = base.acoustics.rt60_t30
            if not np.isfinite(t_base):
                t_base = base.acoustics.rt60_t20
            if not np.isfinite(t_base):
                raise ValueError("the base RIR's decay (T30 and T20) is not measurable")
            h = change_decay(h, fs, t_base * spec.rt60_factor, bands=spec.bands)
        # The DRR target is relative to the base as labelled, so the drawn change is what moved.
        h = change_drr(h, fs, base.acoustics.drr_db + spec.drr_change_db)
        rir = h.astype(np.float32)
        # Measured on what is stored (float32), as every other label.
        measured = measure_rir(rir, fs)
    except ValueError as exc:
        refused = {**base.details, **drawn, "augmented": False, "augment_refused": str(exc)}
        return base_rir, replace(base, details=refused)
    return rir, replace(
        base, acoustics=measured, details={**base.details, **drawn, "augmented": True}
    )


def _ism_order(room: RoomSpec, scale: float) -> int:
    """The order pyroomacoustics' Sabine inversion asks for at this absorption."""
    lx, ly, lz = room.dims
    volume = lx * ly * lz
    areas = (ly * lz, ly * lz, lx * lz, lx * lz, lx * ly, lx * ly)
    sabine_units = sum(
        a * min(0.99, scale * np.mean(c[2:4])) for a, c in zip(areas, room.absorption, strict=True)
    )
    rt60 = 0.161 * volume / sabine_units
    # 1.5x the order whose images arrive within the Sabine RT60: at exactly that order the
    # tail is cut off before it has decayed 45 dB, which breaks T30 (measured here).
    return int(np.ceil(1.5 * 343.0 * rt60 / min(room.dims) / 2.0)) + 1


def _materials(room: RoomSpec, scale: float) -> dict:
    import pyroomacoustics as pra

    return {
        surface: pra.Material(
            energy_absorption={
                "coeffs": [float(min(0.99, max(0.01, scale * c))) for c in coeffs],
                "center_freqs": list(OCTAVE_BANDS_HZ),
            }
        )
        for surface, coeffs in zip(SURFACES, room.absorption, strict=True)
    }


def simulate(
    spec: RirSpec, absorption_scale: float, placement: Placement | None = None
) -> np.ndarray:
    """One RIR from pyroomacoustics, deterministic for a given spec (seeded, one thread).

    With ``placement`` (calibration) the seed depends on the room only, not on which of its
    placements asked first, so a room calibrates the same in any build order.
    """
    if spec.simulation.method == "diffuse":
        from .diffuse_rir import simulate_diffuse

        return simulate_diffuse(spec, absorption_scale, placement)
    import pyroomacoustics as pra

    os.environ.setdefault("PRA_NUM_THREADS", "1")
    placement = placement or spec.placement
    method, order = spec.method(absorption_scale)
    # Ray tracing draws random rays from a package-global generator: seed it from the spec so
    # the same spec gives the same RIR in any process and any order.
    seed_key = spec.rir_id if placement is spec.placement else calibration_key(spec)
    pra.random.seed(derive_seed(seed_key, asdict(placement), absorption_scale) % 2**32)
    room = pra.ShoeBox(
        list(spec.room.dims),
        fs=spec.sample_rate,
        materials=_materials(spec.room, absorption_scale),
        max_order=order,
        air_absorption=True,
        ray_tracing=method == "hybrid",
    )
    if method == "hybrid":
        room.set_ray_tracing(n_rays=spec.simulation.n_rays, receiver_radius=0.5)
    room.add_source(list(placement.source))
    room.add_microphone(list(placement.mic))
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float32)
    if not np.all(np.isfinite(rir)) or not np.any(rir):
        raise SimulationError(f"room {spec.room.room_id}: the simulator returned an empty RIR")
    return rir


def reference_placement(room: RoomSpec) -> Placement:
    """A fixed placement used to calibrate a room's absorption (independent of the draws)."""
    lx, ly, lz = room.dims
    return Placement(
        (round(0.3 * lx, 3), round(0.35 * ly, 3), round(min(1.5, 0.6 * lz), 3)),
        (round(0.65 * lx, 3), round(0.6 * ly, 3), round(min(1.2, 0.45 * lz), 3)),
    )


@dataclass(frozen=True)
class Calibration:
    scale: float
    measured_rt60: float
    iterations: int


def calibrate_room(spec: RirSpec) -> Calibration:
    """Find the absorption scale whose *measured* T30 matches the room's RT60 target.

    Starts from Eyring/Sabine (which overshoots in simulation) and corrects by the measured
    ratio, since RT60 is close to inversely proportional to absorption.
    """
    room = spec.room
    if room.target_rt60 is None:
        rir = simulate(spec, 1.0, reference_placement(room))
        return Calibration(1.0, measure_rir(rir, spec.sample_rate).rt60_t30, 0)
    if spec.simulation.method == "diffuse":  # the decay is set by construction: closed form
        from .diffuse_rir import diffuse_absorption_scale

        scale = diffuse_absorption_scale(spec)
        rir = simulate(spec, scale, reference_placement(room))
        return Calibration(scale, measure_rir(rir, spec.sample_rate).rt60_t30, 0)
    lx, ly, lz = room.dims
    volume, surface = lx * ly * lz, 2 * (lx * ly + lx * lz + ly * lz)
    mean_mid = float(np.mean([np.mean(c[2:4]) for c in room.absorption]))
    # Sabine's absorption for the target, raised by the simulator's typical overshoot (~1.25x).
    scale = 1.25 * (0.161 * volume / (surface * room.target_rt60)) / mean_mid
    measured = float("nan")
    iterations = 0
    for _ in range(spec.simulation.calibration_iterations + 1):
        iterations += 1
        rir = simulate(spec, scale, reference_placement(room))
        measured = _rt60(measure_rir(rir, spec.sample_rate))
        if not np.isfinite(measured):
            break
        error = measured / room.target_rt60
        if abs(error - 1.0) <= spec.simulation.rt60_tolerance:
            break
        scale = float(np.clip(scale * error, 0.05 / mean_mid, 0.99 / mean_mid))
    return Calibration(round(scale, 6), measured, iterations)


class RirBank:
    """Content-addressed RIR cache at a local path or any fsspec URL."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)

    def _path(self, kind: str, key: str, suffix: str) -> str:
        return f"{self.root}/{kind}/{key[:2]}/{key}{suffix}"

    def has_rir(self, rir_id: str) -> bool:
        return self.fs.exists(self._path("rir", rir_id, ".npz"))

    def load_rir(self, rir_id: str, sample_rate: int | None = None) -> tuple[np.ndarray, BankedRir]:
        """The banked RIR (float32) and its record; ``FileNotFoundError`` when it is not
        banked. Acoustic labels the entry lacks are measured from the RIR at ``sample_rate``
        (:meth:`BankedRir.from_json`; a ValueError names them without it)."""
        payload = read_bytes(self.fs, self._path("rir", rir_id, ".npz"))
        archive = np.load(io.BytesIO(payload), allow_pickle=False)
        rir = archive["rir"]
        return rir, BankedRir.from_json(json.loads(str(archive["labels"])), rir, sample_rate)

    def save_rir(self, rir_id: str, rir: np.ndarray, record: BankedRir) -> None:
        """Bank an RIR as it was measured: float32, which every maker returns, so an RIR and
        its labels are the same whether they were just made or read from the bank."""
        if rir.dtype != np.float32:
            raise TypeError(
                f"RIR {rir_id}: bank float32 RIRs (measured as stored), not {rir.dtype}"
            )
        buffer = io.BytesIO()
        np.savez(buffer, rir=rir, labels=np.array(json.dumps(record.to_json())))
        write_atomic(self.fs, self._path("rir", rir_id, ".npz"), buffer.getvalue())

    def load_calibration(self, room_key: str) -> Calibration | None:
        try:
            payload = read_bytes(self.fs, self._path("room", room_key, ".json"))
        except FileNotFoundError:
            return None
        return Calibration(**json.loads(payload))

    def save_calibration(self, room_key: str, calibration: Calibration) -> None:
        payload = json.dumps(asdict(calibration), sort_keys=True).encode()
        write_atomic(self.fs, self._path("room", room_key, ".json"), payload)

    def rir_ids(self) -> set[str]:
        pattern = f"{self.root}/rir/*/*.npz"
        return {p.rsplit("/", 1)[1].removesuffix(".npz") for p in self.fs.glob(pattern)}


def calibration_key(spec: RirSpec) -> str:
    return stable_hash(
        [
            spec.room.spec_hash,
            spec.sample_rate,
            spec.simulation.model_dump(mode="json"),
            version_for(spec.simulation),
        ],
        length=20,
    )


def get_or_calibrate(bank: RirBank, spec: RirSpec) -> tuple[Calibration, bool]:
    """The room's calibration from the bank, computing it once if missing. True if computed."""
    key = calibration_key(spec)
    cached = bank.load_calibration(key)
    if cached is not None:
        return cached, False
    calibration = calibrate_room(spec)
    bank.save_calibration(key, calibration)
    return calibration, True


def _rt60(labels: RirLabels) -> float:
    return labels.rt60_t30 if np.isfinite(labels.rt60_t30) else labels.rt60_t20


def place_in_range(
    spec: RirSpec, scale: float, attempts: int = 2
) -> tuple[float, np.ndarray, RirLabels]:
    """Simulate at the room's calibrated absorption; if this placement's measured RT60 falls
    outside the requested range (T30 depends on the placement: near the source the direct
    sound steepens the early decay), nudge the absorption for this placement and resimulate."""
    rir = simulate(spec, scale)
    labels = measure_rir(rir, spec.sample_rate)
    if spec.room.rt60_range is None:
        return scale, rir, labels
    low, high = spec.room.rt60_range
    mean_mid = float(np.mean([np.mean(c[2:4]) for c in spec.room.absorption]))
    for _ in range(attempts):
        measured = _rt60(labels)
        if not np.isfinite(measured) or low <= measured <= high:
            break
        wanted = float(np.clip(measured, low * 1.03, high / 1.03))
        scale = float(
            np.clip(round(scale * measured / wanted, 6), 0.05 / mean_mid, 0.99 / mean_mid)
        )
        rir = simulate(spec, scale)
        labels = measure_rir(rir, spec.sample_rate)
    return scale, rir, labels


def get_or_simulate(bank: RirBank, spec: AnyRirSpec) -> tuple[np.ndarray, BankedRir, bool]:
    """The RIR and its record, simulating (and calibrating the room) only when missing.

    A measured spec is ingested from its file instead (read, resampled, trimmed, normalised
    and measured: :mod:`dereverb_data.measured_rirs`) and banked like a simulated one. An
    augmented spec is made from its base's bank entry (simulated or ingested first if
    missing) by :func:`augment_rir`, and banked under its own id.
    """
    rir_id = spec.rir_id
    try:  # one read rather than exists() and a read: a request less on object stores
        rir, record = bank.load_rir(rir_id, spec.sample_rate)
        return rir, record, False
    except FileNotFoundError:
        pass
    if isinstance(spec, AugmentedRirSpec):
        base_rir, base, _ = get_or_simulate(bank, spec.base)
        rir, record = augment_rir(base_rir, base, spec)
    elif isinstance(spec, MeasuredRirSpec):
        rir, labels = ingest(spec)
        record = BankedRir.from_json(labels)
    else:
        calibration, _ = get_or_calibrate(bank, spec)
        scale, rir, measured = place_in_range(spec, calibration.scale)
        method, order = spec.method(scale)
        record = BankedRir(
            acoustics=measured,
            distance_m=round(spec.placement.distance, 4),
            target_rt60=spec.room.target_rt60,
            simulation=method,
            simulator=version_for(spec.simulation),
            details={
                "rt60_method": RT60_METHOD,
                "absorption_scale": scale,
                "room_absorption_scale": calibration.scale,
                "ism_order": order,
            },
        )
    bank.save_rir(rir_id, rir, record)
    return rir, record, True
