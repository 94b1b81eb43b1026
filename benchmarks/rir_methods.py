"""RIR simulation methods side by side: time per RIR and how well the measured RT60 hits the
request, for rooms drawn exactly as a build draws them (``rooms.sample_room`` /
``sample_placement``, default rooms 4-10 x 3-8 x 2.5-4 m and absorption profiles flat,
soft_highs and boomy), 16 kHz, one thread.

Methods (rows):

* ``diffuse``: ``diffuse_rir.simulate_diffuse`` at the closed-form absorption scale
  (``diffuse_absorption_scale``, default ``calibrate_to: broadband_t30``: the model's expected
  broadband T30 at the reference placement = target); nothing simulated to calibrate.
* ``diffuse+nudge``: the same, then ``rir_bank.place_in_range`` (resimulate a placement whose
  measured broadband T30 is outside the range, at most twice), as builds do.
* ``diffuse mid-band``: ``calibrate_to: mid_band``, the Eyring RT60 of the 500 Hz and 1 kHz
  bands = target, no nudge.
* ``diffuse+loop``: ``rir_bank.calibrate_room``'s simulate-measure loop and ``place_in_range``,
  with diffuse simulations.
* ``hybrid``: what builds do today above 0.25 s: ``calibrate_room`` + ``place_in_range`` with
  pyroomacoustics ISM order 3 + ray tracing.
* ``ism``: the same with pure ISM, only for rooms whose target is at most ``--ism-max-rt60``
  (higher orders take seconds to minutes and GBs per RIR; see DESIGN.md).
* ``naive``: the naive script's RIR (``pra.inverse_sabine`` + ISM at the order it suggests, no
  calibration), for the first ``--naive`` RIRs of the 0.3-1.2 s range.

Columns: ``sim ms`` is one simulation at the final absorption scale (the fastest of
``--repeats``); ``pipeline ms`` is what a build spends per RIR (the room's calibration shared by
its placements, plus ``place_in_range``, label measurement included); ratios are hybrid's time
over the row's, on the same RIRs. ``in range`` and ``within 8%`` use the broadband T30 that
labels the examples (``acoustics.measure_rir``);
``mid T30 / target`` is the median ratio of the measured 500 Hz-1 kHz octave T30 to the target.

The diffuse rows reach rir_bank's calibration and placement functions by pointing their
``simulate`` at a dispatcher for the run (the wiring proposed for rir_bank.py), nothing is
edited.

    PRA_NUM_THREADS=1 python benchmarks/rir_methods.py [--rooms 12 --positions 3]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

for _name in ("PRA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_name] = "1"

import numpy as np  # noqa: E402  (thread limits must be set before numpy loads BLAS)
import scipy.signal  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dereverb_data import rir_bank  # noqa: E402
from dereverb_data.acoustics import direct_path_index, measure_rir  # noqa: E402
from dereverb_data.diffuse_rir import diffuse_absorption_scale, simulate_diffuse  # noqa: E402
from dereverb_data.manifest import parse_manifest  # noqa: E402
from dereverb_data.rir_bank import RirSpec, SimulationError  # noqa: E402
from dereverb_data.rooms import sample_placement, sample_room  # noqa: E402

_PRA_SIMULATE = rir_bank.simulate
REPEATS = 3


def _dispatch(spec: RirSpec, absorption_scale: float, placement=None) -> np.ndarray:
    if spec.simulation.method == "diffuse":
        return simulate_diffuse(spec, absorption_scale, placement)
    return _PRA_SIMULATE(spec, absorption_scale, placement)


rir_bank.simulate = _dispatch  # calibrate_room and place_in_range look the name up at call time


def room_specs(
    rt60: tuple[float, float], simulation: dict, rooms: int, positions: int, fs: int
) -> list[list[RirSpec]]:
    """Rooms and placements as the plan draws them (the same rooms for every method)."""
    manifest = parse_manifest(
        {
            "name": "rir-methods",
            "seed": 11,
            "sample_rate": fs,
            "corpus": {"kind": "demo"},
            "rooms": {
                "rooms_per_split": {"train": rooms},
                "positions_per_room": positions,
                "rt60_s": list(rt60),
            },
            "simulation": simulation,
            "splits": {"train": 1.0, "valid": 0.0, "test": 0.0},
        }
    )
    config = manifest.rooms
    out = []
    for i in range(rooms):
        room = sample_room(config, manifest.seed, "train", i)
        out.append(
            [
                RirSpec(
                    room, sample_placement(config, room, manifest.seed, j), fs, manifest.simulation
                )
                for j in range(positions)
            ]
        )
    return out


def mid_band_t30(rir: np.ndarray, fs: int) -> float:
    """Mean T30 of the 500 Hz and 1 kHz octave bands (zero-phase Butterworth, Schroeder)."""
    d = direct_path_index(rir)
    values = []
    for fc in (500.0, 1000.0):
        sos = scipy.signal.butter(
            3, [fc / math.sqrt(2), fc * math.sqrt(2)], "bandpass", fs=fs, output="sos"
        )
        band = scipy.signal.sosfiltfilt(sos, rir.astype(float))[d:]
        energy = np.cumsum((band * band)[::-1])[::-1]
        edc = 10 * np.log10(energy / energy[0])
        idx = np.flatnonzero((edc <= -5) & (edc >= -35))
        values.append(-60.0 / np.polyfit(idx / fs, edc[idx], 1)[0])
    return float(np.mean(values))


class Row:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sim: list[float] = []
        self.pipe: list[float] = []
        self.t30: list[float] = []
        self.targets: list[float] = []
        self.mid: list[float] = []
        self.skipped = 0

    def add(self, rir: np.ndarray, fs: int, target: float, sim_s: float, pipe_s: float) -> None:
        self.sim.append(sim_s)
        self.pipe.append(pipe_s)
        self.t30.append(measure_rir(rir, fs).rt60_t30)
        self.targets.append(target)
        self.mid.append(mid_band_t30(rir, fs) / target)


def run_pipeline(
    name: str,
    groups: list[list[RirSpec]],
    calibrate: Callable[[RirSpec], float],
    place: bool,
) -> Row:
    """Calibrate each room once, then every placement (optionally nudged into range)."""
    row = Row(name)
    fs = groups[0][0].sample_rate
    for specs in groups:
        start = time.perf_counter()
        try:
            scale = calibrate(specs[0])
        except SimulationError:
            row.skipped += len(specs)
            continue
        calibration = (time.perf_counter() - start) / len(specs)  # shared by the placements
        for spec in specs:
            start = time.perf_counter()
            if place:
                final, rir, _ = rir_bank.place_in_range(spec, scale)
            else:
                final, rir = scale, rir_bank.simulate(spec, scale)
                measure_rir(rir, fs)  # a build measures every RIR's labels
            pipe = calibration + time.perf_counter() - start
            sim = math.inf
            for _ in range(REPEATS):  # the fastest of a few: the machine is shared
                start = time.perf_counter()
                rir = rir_bank.simulate(spec, final)
                sim = min(sim, time.perf_counter() - start)
            row.add(rir, fs, spec.room.target_rt60, sim, pipe)
    return row


def naive_row(groups: list[list[RirSpec]], limit: int) -> Row:
    import pyroomacoustics as pra

    row = Row("naive")
    for spec in [s for specs in groups for s in specs][:limit]:
        start = time.perf_counter()
        absorption, order = pra.inverse_sabine(spec.room.target_rt60, list(spec.room.dims))
        room = pra.ShoeBox(
            list(spec.room.dims),
            fs=spec.sample_rate,
            materials=pra.Material(absorption),
            max_order=order,
        )
        room.add_source(list(spec.placement.source))
        room.add_microphone(list(spec.placement.mic))
        room.compute_rir()
        rir = np.asarray(room.rir[0][0], dtype=np.float32)
        elapsed = time.perf_counter() - start
        row.add(rir, spec.sample_rate, spec.room.target_rt60, elapsed, elapsed)
    return row


def print_table(rt60: tuple[float, float], rows: list[Row]) -> None:
    low, high = rt60
    hybrid = next(r for r in rows if r.name == "hybrid")
    print(f"\nRT60 {low}-{high} s")
    print(
        "| method | RIRs | sim ms | pipeline ms | hybrid/sim | hybrid/pipeline | in range "
        "| within 8% | mid T30 / target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = len(r.sim)
        skipped = f" ({r.skipped} skipped)" if r.skipped else ""
        if not n:
            print(f"| {r.name} | 0{skipped} | | | | | | | |")
            continue
        t30, targets = np.asarray(r.t30), np.asarray(r.targets)
        inside = np.mean((t30 >= low) & (t30 <= high))
        close = np.mean(np.abs(t30 / targets - 1) <= 0.08)
        # Ratios against hybrid on the same RIRs (rooms and placements are drawn identically
        # for every method; a row may cover only some of them).
        same = [i for i, t in enumerate(hybrid.targets) if t in set(r.targets)]
        hybrid_sim = sum(hybrid.sim[i] for i in same) / len(same)
        hybrid_pipe = sum(hybrid.pipe[i] for i in same) / len(same)
        sim, pipe = statistics.mean(r.sim), statistics.mean(r.pipe)
        print(
            f"| {r.name} | {n}{skipped} | {1000 * sim:.1f} | {1000 * pipe:.1f} | "
            f"{hybrid_sim / sim:.1f}x | {hybrid_pipe / pipe:.1f}x | {100 * inside:.0f}% | "
            f"{100 * close:.0f}% | {statistics.median(r.mid):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=12)
    parser.add_argument("--positions", type=int, default=3)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--ism-max-rt60", type=float, default=0.6)
    parser.add_argument("--naive", type=int, default=12, help="naive RIRs (0.3-1.2 s range)")
    parser.add_argument("--repeats", type=int, default=3, help="sim ms: fastest of N runs")
    args = parser.parse_args()
    global REPEATS
    REPEATS = args.repeats
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}; "
        f"{args.rooms} rooms x {args.positions} placements per range, {args.sample_rate} Hz, "
        "one thread"
    )

    def closed_form(spec: RirSpec) -> float:
        return diffuse_absorption_scale(spec)

    def loop(spec: RirSpec) -> float:
        return rir_bank.calibrate_room(spec).scale

    for rt60 in ((0.3, 1.2), (0.3, 3.0)):

        def make(method: str, rt60: tuple[float, float] = rt60, **diffuse) -> list[list[RirSpec]]:
            simulation = {"method": method, **({"diffuse": diffuse} if diffuse else {})}
            return room_specs(rt60, simulation, args.rooms, args.positions, args.sample_rate)

        diffuse = make("diffuse")
        warm = diffuse[0][0]  # first calls import and fill caches: keep them out of the table
        rir_bank.place_in_range(warm, closed_form(warm))
        rows = [
            run_pipeline("diffuse", diffuse, closed_form, place=False),
            run_pipeline("diffuse+nudge", diffuse, closed_form, place=True),
            run_pipeline(
                "diffuse mid-band", make("diffuse", calibrate_to="mid_band"), closed_form, False
            ),
            run_pipeline("diffuse+loop", diffuse, loop, place=True),
            run_pipeline("hybrid", make("hybrid"), loop, place=True),
        ]
        ism = [g for g in make("ism") if g[0].room.target_rt60 <= args.ism_max_rt60]
        if ism:
            rows.append(run_pipeline(f"ism (<= {args.ism_max_rt60} s)", ism, loop, place=True))
        if args.naive and rt60[1] <= 1.2:
            rows.append(naive_row(make("ism"), args.naive))
        print_table(rt60, rows)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
