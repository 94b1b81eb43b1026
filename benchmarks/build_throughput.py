"""Build throughput: our build against the naive script it replaces, on the same corpus.

Naive baseline (what researchers glue together today): for every variant, a fresh
pyroomacoustics room from ``inverse_sabine`` simulated with the pure image method at the order
it suggests, ``fftconvolve``, ``scipy.signal.stft`` of input and target, ``np.save`` per example.

Ours: the same corpus and RT60 range (0.3-1.2 s unless ``--rt60``) and variants per
utterance, built (a) serially in one process without Prefect, once per ``--method`` (the
library's steps in a plain loop), and (b) by the Prefect flow on a LocalCluster of 2 Dask worker
processes (server already running, cluster start included) with the first method.

    python benchmarks/build_throughput.py [--speakers 4 --utterances 3 --variants 6]
    python benchmarks/build_throughput.py --method auto --method diffuse --skip-flow
    python benchmarks/build_throughput.py --rt60 0.3 3.0 --method hybrid --method diffuse \
        --skip-naive --skip-flow   # pure ISM per variant at 3 s would need hours and GBs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

for _name in ("PRA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_name] = "1"

import numpy as np  # noqa: E402  (thread limits must be set before numpy loads BLAS)
import scipy.signal  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dereverb_data import build as steps  # noqa: E402
from dereverb_data.corpus import scan_corpus  # noqa: E402
from dereverb_data.demo_corpus import synthesize_utterance  # noqa: E402
from dereverb_data.manifest import parse_manifest  # noqa: E402
from dereverb_data.plan import make_plan  # noqa: E402


def manifest_dict(
    speakers: int,
    utterances: int,
    variants: int,
    method: str = "auto",
    rt60: tuple[float, float] = (0.3, 1.2),
) -> dict:
    return {
        "name": "bench",
        "seed": 7,
        "corpus": {"kind": "demo", "speakers": speakers, "utterances_per_speaker": utterances},
        "variants_per_utterance": variants,
        "rooms": {
            "rooms_per_split": {"train": 6, "valid": 2, "test": 2},
            "positions_per_room": 3,
            "length_m": [4.0, 8.0],
            "width_m": [3.0, 6.0],
            "height_m": [2.5, 3.5],
            "rt60_s": list(rt60),
            "distance_m": [0.7, 2.5],
        },
        "simulation": {"method": method},
        "storage": {"frames_per_chunk": 256, "frames_per_shard": 2048},
        "splits": {"train": 0.5, "valid": 0.25, "test": 0.25},
    }


def naive_build(manifest, out: Path) -> tuple[float, Counter]:
    """One ISM simulation per variant, then np.save per example (the status quo)."""
    import pyroomacoustics as pra

    utterances, _ = scan_corpus(manifest.corpus, manifest.sample_rate)
    plan = make_plan(manifest, utterances)
    fs = manifest.sample_rate
    timing: Counter[str] = Counter()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for example in plan.examples:
        spec = plan.rirs[example.rir_id]
        t0 = time.perf_counter()
        absorption, order = pra.inverse_sabine(spec.room.target_rt60, list(spec.room.dims))
        room = pra.ShoeBox(
            list(spec.room.dims), fs=fs, materials=pra.Material(absorption), max_order=order
        )
        room.add_source(list(spec.placement.source))
        room.add_microphone(list(spec.placement.mic))
        room.compute_rir()
        rir = np.asarray(room.rir[0][0])
        t1 = time.perf_counter()
        # Loaded per variant, as a per-example script does (not through our decode cache).
        _, speaker, index = plan.utterances[example.utterance_id].source.split(":")
        dry = synthesize_utterance(speaker, int(index), fs)
        wet = scipy.signal.fftconvolve(dry, rir)[: example.num_samples]
        delay = int(np.argmax(np.abs(rir)))
        clean = np.zeros(example.num_samples)
        clean[delay : delay + dry.size] = dry[: example.num_samples - delay]
        t2 = time.perf_counter()
        _, _, wet_spec = scipy.signal.stft(wet, nperseg=512, noverlap=384)
        _, _, clean_spec = scipy.signal.stft(clean, nperseg=512, noverlap=384)
        t3 = time.perf_counter()
        name = example.example_id.replace("/", "_").replace("#", "_")
        np.save(out / f"{name}_reverb.npy", wet_spec.astype(np.complex64))
        np.save(out / f"{name}_clean.npy", clean_spec.astype(np.complex64))
        t4 = time.perf_counter()
        timing.update({"rir": t1 - t0, "convolution": t2 - t1, "stft": t3 - t2, "write": t4 - t3})
    return time.perf_counter() - start, timing


def our_serial_build(manifest, url: str) -> tuple[float, Counter, dict]:
    """The library's steps in a plain loop, with a per-stage breakdown."""
    timing: Counter[str] = Counter()
    start = time.perf_counter()
    t = time.perf_counter()
    plan = steps.prepare_build(manifest, url)
    timing["plan"] += time.perf_counter() - t
    cache = steps.default_rir_cache(url)
    t = time.perf_counter()
    for room_id in steps.rirs_by_room(plan):
        steps.simulate_room_step(url, room_id, cache)
    timing["rir"] += time.perf_counter() - t
    for shard in plan.shards:
        result = steps.render_shard_step(url, shard.shard_id, cache)
        timing["rir load"] += result.seconds.get("rir", 0.0)
        timing["convolution"] += result.seconds.get("render", 0.0)
        timing["stft"] += result.seconds.get("stft", 0.0)
        timing["write"] += result.seconds.get("write", 0.0)
    t = time.perf_counter()
    report = steps.finalize_step(url)
    timing["finalize"] += time.perf_counter() - t
    return time.perf_counter() - start, timing, report


def our_flow_build(manifest_path: str, url: str, workers: int) -> float:
    from flows.build import run_build

    start = time.perf_counter()
    run_build(manifest_path, url, workers=workers)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speakers", type=int, default=4)
    parser.add_argument("--utterances", type=int, default=3)
    parser.add_argument("--variants", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-flow", action="store_true")
    parser.add_argument("--skip-naive", action="store_true", help="no naive baseline")
    parser.add_argument(
        "--method",
        action="append",
        choices=["auto", "ism", "hybrid", "diffuse"],
        help="simulation method(s) of the serial builds (default: auto)",
    )
    parser.add_argument("--rt60", type=float, nargs=2, default=(0.3, 1.2), metavar=("LOW", "HIGH"))
    args = parser.parse_args()
    methods = args.method or ["auto"]
    rt60 = tuple(args.rt60)
    data = manifest_dict(args.speakers, args.utterances, args.variants, methods[0], rt60)
    manifest = parse_manifest(data)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        tmp_path = Path(tmp)
        n_examples = len(make_plan(manifest, scan_corpus(manifest.corpus, 16000)[0]).examples)
        print(
            f"corpus: {args.speakers} speakers x {args.utterances} utterances x "
            f"{args.variants} variants = {n_examples} examples, RT60 {rt60[0]}-{rt60[1]} s"
        )
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"python {platform.python_version()}"
        )

        rows = []
        naive_t: Counter[str] = Counter()
        if not args.skip_naive:
            naive_s, naive_t = naive_build(manifest, tmp_path / "naive")
            rows.append(("naive (ISM per variant, np.save)", naive_s))
        reports = {}
        ours_t: Counter[str] = Counter()
        for method in methods:
            built = parse_manifest(manifest_dict(*vars_of(args), method, rt60))
            seconds, timing, reports[method] = our_serial_build(
                built, str(tmp_path / f"serial-{method}.zarr")
            )
            rows.append((f"ours, serial, {method} (1 process)", seconds))
            if method == methods[0]:
                ours_t = timing
            print(f"  {method}: RIRs {timing['rir']:.2f} s of {seconds:.2f} s")
        if not args.skip_flow:
            path = tmp_path / "bench.yaml"
            path.write_text(yaml.safe_dump(data))
            from flows.server import prefect_server

            with prefect_server():
                flow_s = our_flow_build(str(path), str(tmp_path / "flow.zarr"), args.workers)
            rows.append((f"ours, Prefect flow + {args.workers} Dask workers", flow_s))

        base_name, base_s = rows[0]
        print(f"\n{'build':<44} {'seconds':>8} {'examples/s':>11} {'vs first':>9}")
        for name, seconds in rows:
            print(
                f"{name:<44} {seconds:8.2f} {n_examples / seconds:11.2f} {base_s / seconds:8.1f}x"
            )
        print(f"(vs first: against '{base_name}', in this run)")
        print(f"\nper-stage seconds (naive | ours serial, {methods[0]})")
        for stage in ("rir", "rir load", "convolution", "stft", "write", "plan", "finalize"):
            print(f"  {stage:<20} {naive_t.get(stage, 0.0):8.2f} | {ours_t.get(stage, 0.0):8.2f}")
        for method, report in reports.items():
            summary = report["summary"]
            print(
                f"\nours, {method}: {summary['unique_rirs']} unique RIRs for {n_examples} "
                f"examples; measured RT60 in range: {summary['rt60_in_requested_range']:.0%}; "
                f"rt60_t30 {json.dumps(summary['rt60_t30_s'])}"
            )


def vars_of(args: argparse.Namespace) -> tuple[int, int, int]:
    return args.speakers, args.utterances, args.variants


if __name__ == "__main__":
    main()
