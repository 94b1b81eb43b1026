"""Which rooms make models that work in real rooms? (issue 12)

Every arm builds a dataset from the same corpus with the recipe's manifest
(``manifests/recipe-speech.yaml``), changing only its rooms (simulation method, RT60 range,
measured-RIR pool, RIR augmentation, noise), trains the same small model for the same number
of steps, and scores it twice: on the arm's own simulated test split and on the real-room check
(``../shared/data/speech`` x ``../shared/data/rir``, measured RIRs that no arm trains on).

    python benchmarks/realism.py --corpus ../shared/data/speech-train --work /work/realism

Each arm is a chain of CLI commands (``dereverb build``, ``train``, ``evaluate``) in its own
folder under ``--work``; ``--jobs`` chains run side by side, one CPU thread each. Every step is
skipped when its output is already there, so an interrupted run resumes where it stopped.
The table (gain of the model over the unprocessed input; retention = real gain / simulated
gain) is printed and written to ``WORK/realism.md``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "manifests" / "recipe-speech.yaml"
MEASURED = ROOT / "manifests" / "recipe-measured.yaml"
TRAIN_CONFIG = ROOT / "manifests" / "training" / "unet.yaml"
SHARED = ROOT.parent / "shared" / "data"
METRICS = ("pesq_wb", "estoi", "si_sdr")

# Every arm starts from the recipe with the rooms it had before issue 12 (whatever the recipe
# says now), so the arms stay the same datasets when the recipe changes. None deletes a key.
TODAY = {
    "simulation": {"method": "auto"},
    "rooms": {"rt60_s": [0.25, 1.5], "measured": None},
    "augmentation": None,
    "noise": None,
}
WIDE = {"rooms": {"rt60_s": [0.25, 2.5]}}
DIFFUSE = {"simulation": {"method": "diffuse"}}
AUGMENT = {
    "augmentation": {"probability": 0.5, "drr_change_db": [-6, 6], "rt60_factor": [0.6, 1.6]}
}
NOISE = {"noise": {"probability": 0.5, "snr_db": [10, 40]}}
MEASURED_SHARE = 0.5
NEW_ROOMS = [DIFFUSE, WIDE, "measured", AUGMENT]  # the candidate with every new source

# name -> (what it changes, manifest overrides, seed offset). Ordered so that a run cut short
# still compares today's rooms with the candidates that matter most.
ARMS: dict[str, tuple[str, list, int]] = {
    "today": ("recipe before issue 12: auto (hybrid), RT60 0.25-1.5 s", [], 0),
    "measured-aug": ("diffuse 0.25-2.5 s + measured pool + augmentation", NEW_ROOMS, 0),
    "diffuse": ("diffuse, RT60 0.25-1.5 s", [DIFFUSE], 0),
    "diffuse-wide": ("diffuse, RT60 0.25-2.5 s (the recipe now)", [DIFFUSE, WIDE], 0),
    "measured": ("diffuse 0.25-2.5 s + measured pool", [DIFFUSE, WIDE, "measured"], 0),
    "diffuse-aug": ("diffuse 0.25-2.5 s + augmentation", [DIFFUSE, WIDE, AUGMENT], 0),
    "measured-aug-noise": ("measured-aug + noise (SNR 10-40 dB, half)", [*NEW_ROOMS, NOISE], 0),
    "measured-aug-seed2": ("measured-aug, other data and training seed", NEW_ROOMS, 1),
}


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in, recursively (mappings merge; other values replace;
    None deletes the key)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def measured_pool() -> dict:
    """The recipe-measured manifest's pool, pointed at its folder by absolute path."""
    pool = yaml.safe_load(MEASURED.read_text())["rooms"]["measured"]
    pool["path"] = str((MEASURED.parent / pool["path"]).resolve())
    pool["share"] = {"train": MEASURED_SHARE, "valid": 0.0, "test": 0.0}
    return {"rooms": {"measured": pool}}


def arm_manifest(name: str, corpus: Path) -> dict:
    _, overrides, seed_offset = ARMS[name]
    manifest = merge(yaml.safe_load(RECIPE.read_text()), TODAY)
    for override in overrides:
        manifest = merge(manifest, measured_pool() if override == "measured" else override)
    manifest["name"] = f"realism-{name}"
    manifest["seed"] = manifest["seed"] + seed_offset
    manifest["corpus"]["path"] = str(corpus.resolve())
    return manifest


def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PRA_NUM_THREADS": "1"}
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        started = time.perf_counter()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        handle.write(f"# exit {done.returncode} after {time.perf_counter() - started:.0f} s\n")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed (exit {done.returncode}); see {log}")


def run_arm(name: str, corpus: Path, work: Path, steps: int) -> dict[str, float]:
    """Build, train and evaluate one arm (each step skipped when its output exists)."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    dereverb = str(Path(sys.executable).parent / "dereverb")
    manifest = folder / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(arm_manifest(name, corpus), sort_keys=False))
    train_config = yaml.safe_load(TRAIN_CONFIG.read_text())
    train_config.update(steps=steps, seed=train_config.get("seed", 0) + ARMS[name][2])
    train_config.update(progress=False, num_workers=0)  # one core per arm: no loader process
    config = folder / "train.yaml"
    config.write_text(yaml.safe_dump(train_config, sort_keys=False))
    store, runs = folder / "store.zarr", folder / "run"
    timings: dict[str, float] = {}

    def step(what: str, done: Path, command: list[str]) -> None:
        if done.exists():
            return
        started = time.perf_counter()
        run(command, log)
        timings[what] = time.perf_counter() - started
        print(f"[{name}] {what} done in {timings[what]:.0f} s", flush=True)

    build = [dereverb, "build", str(manifest), "--store", str(store), "--workers", "1"]
    step("build", folder / "built", [*build, "--no-progress"])
    (folder / "built").touch()
    step("train", runs / "metrics.json", [dereverb, "train", "--data", str(store),
                                          "--config", str(config), "--out", str(runs)])  # fmt: skip
    checkpoint = str(runs / "checkpoint.pt")
    me = [sys.executable, str(Path(__file__).resolve()), "--score", checkpoint]
    step("eval-sim", folder / "eval-sim" / "per_example.csv",
         [*me, "--data", str(store), "--out", str(folder / "eval-sim")])  # fmt: skip
    step("eval-real", folder / "eval-real" / "per_example.csv",
         [*me, "--real", "--out", str(folder / "eval-real")])  # fmt: skip
    return timings


def score_checkpoint(checkpoint: str, out: Path, data: str | None) -> None:
    """Input and model scores (METRICS only) on a store's test split, or the real-room check
    (``data`` None): ``dereverb evaluate``'s scoring for these two systems, without its WPE,
    oracle, SRMR and plots, which would take most of each arm's time."""
    import torch

    from training.enhance import model_spec_fn, reconstruct_fn
    from training.evaluate import real_room_examples, score, store_examples
    from training.inference import load_checkpoint

    torch.set_num_threads(1)
    model, config, sample_rate = load_checkpoint(checkpoint)
    model_fn = reconstruct_fn(model_spec_fn(model, torch.device("cpu")), "model", config)
    examples = (
        store_examples(data, "test")
        if data is not None
        else real_room_examples(SHARED / "speech", SHARED / "rir", sample_rate, 4)
    )
    rows, _ = score(examples, model_fn, config, sample_rate, METRICS, systems=("input", "model"))
    write_per_example(rows, out)


def write_per_example(rows: list[dict], out: Path) -> None:
    """``out/per_example.csv``, written under another name and renamed: the step's done-marker
    exists only when the scores are complete."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "per_example.csv.partial"
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["example_id", "rt60", "system", *METRICS, "missing"])
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(out / "per_example.csv")


def means(per_example: Path) -> dict[str, dict[str, float]]:
    """Mean of each metric per system over the examples of one evaluation."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with per_example.open() as handle:
        for row in csv.DictReader(handle):
            for metric in METRICS:
                if row.get(metric) not in (None, ""):
                    sums[row["system"]][metric].append(float(row[metric]))
    return {
        system: {metric: sum(v) / len(v) for metric, v in values.items()}
        for system, values in sums.items()
    }


def model_system(scores: dict[str, dict[str, float]]) -> str:
    others = [s for s in scores if s not in ("input", "wpe") and not s.startswith("oracle")]
    if len(others) != 1:
        raise ValueError(f"cannot tell the model among systems {sorted(scores)}")
    return others[0]


def table(work: Path, names: list[str]) -> str:
    lines = [
        "| arm | rooms | real PESQ-WB gain | real ESTOI gain | real SI-SDR gain dB "
        "| sim PESQ-WB gain | retention (PESQ) | real model PESQ-WB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        real_csv = work / name / "eval-real" / "per_example.csv"
        sim_csv = work / name / "eval-sim" / "per_example.csv"
        if not (real_csv.exists() and sim_csv.exists()):
            lines.append(f"| {name} | {ARMS[name][0]} | (not run) | | | | | |")
            continue
        real, sim = means(real_csv), means(sim_csv)
        model = model_system(real)
        gain = {m: real[model][m] - real["input"][m] for m in METRICS}
        sim_gain = sim[model]["pesq_wb"] - sim["input"]["pesq_wb"]
        retention = gain["pesq_wb"] / sim_gain if sim_gain > 0 else float("nan")
        lines.append(
            f"| {name} | {ARMS[name][0]} | {gain['pesq_wb']:+.3f} | {gain['estoi']:+.3f} "
            f"| {gain['si_sdr']:+.2f} | {sim_gain:+.3f} | {retention:.2f} "
            f"| {real[model]['pesq_wb']:.3f} |"
        )
    if names:
        real = means(work / names[0] / "eval-real" / "per_example.csv")
        if "input" in real:
            lines.append("")
            lines.append(
                f"Real-room input: PESQ-WB {real['input']['pesq_wb']:.3f}, ESTOI "
                f"{real['input']['estoi']:.3f}, SI-SDR {real['input']['si_sdr']:.2f} dB; WPE "
                f"PESQ-WB {real.get('wpe', {}).get('pesq_wb', float('nan')):.3f}."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=SHARED / "speech-train")
    parser.add_argument("--work", type=Path, help="folder for stores and runs (required)")
    parser.add_argument("--arm", action="append", choices=list(ARMS), help="default: all")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per arm")
    parser.add_argument("--jobs", type=int, default=2, help="arms run side by side")
    parser.add_argument("--table-only", action="store_true", help="print the table of what ran")
    parser.add_argument("--score", metavar="CHECKPOINT", help=argparse.SUPPRESS)  # one arm's
    parser.add_argument("--data", help=argparse.SUPPRESS)  # evaluation, in its own process
    parser.add_argument("--real", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        score_checkpoint(args.score, args.out, None if args.real else args.data)
        return
    if args.work is None:
        parser.error("--work is required")
    names = args.arm or list(ARMS)
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        started = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {
                n: pool.submit(run_arm, n, args.corpus, args.work, args.steps) for n in names
            }
            for name, future in futures.items():
                try:
                    future.result()
                except RuntimeError as exc:
                    print(f"[{name}] {exc}", flush=True)
        print(f"all arms: {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    text = table(args.work, names)
    (args.work / "realism.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
