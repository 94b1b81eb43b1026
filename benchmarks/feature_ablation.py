"""Does a U-Net learn better from spectrogram *images* than from the STFT array? (issue 13, item 5)

A researcher training a U-Net on spectrograms saved as RGB pictures reported better results
than from the numpy STFT matrix. This benchmark trains the same U-Net, with the same seed,
steps, crops, batch and learning rate, on each input representation, and scores every
checkpoint on the store's simulated test split and on the real-room check (measured RIRs,
direct-path reference), with the scoring of ``benchmarks/realism.py``:

- ``rgb_image``: viridis 8-bit RGB image of the dB spectrogram, each crop (in training) or
  block (in enhancement) min-max normalised to its own range, ``top_db`` 80
  (``training.features_rgb``): what saving ``plt.imsave(librosa.amplitude_to_db(S, ref=max))``
  and loading it back gives.
- ``linear_magnitude``: ``|X|``, the raw numpy STFT magnitude.
- ``log_magnitude``: ``log(|X| + 1e-5)``.
- ``compressed_magnitude``: ``|X|^0.3`` (the U-Net's own input).
- ``compressed_complex``: ``|X|^0.3 e^{j angle X}`` as real and imaginary channels.

Only the input changes. ``training.models.UNet`` accepts only its two magnitude inputs and
ties its output to them (softplus for ``|X|^0.3``, exp for ``log|X|``), so the arms use
:class:`FeatureUNet`: the same network with a first convolution as wide as the input has
channels, and always the stock output, ``softplus(.)^(1/0.3)`` with the reverberant phase,
trained with the same loss. Its ``compressed_magnitude`` arm is the stock ``unet``.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        python benchmarks/feature_ablation.py --data /work/stores/recipe.zarr --work /work/ablation

Arms run one after another, one CPU thread, in one process (the model is registered in
``training.models.MODELS`` as ``unet_features`` for this process only, so its checkpoints load
here, not in ``dereverb enhance``). Every step is skipped when its output exists (a killed
training resumes from its checkpoint); ``--table-only`` prints the table of what has run. The
table is printed and written to ``WORK/feature_ablation.md``.
"""

from __future__ import annotations

import os

# One thread before torch is imported: the machine's other core belongs to another job.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from training.data import COMPRESS_EXPONENT, FEATURE_CHANNELS, spec_features
from training.models import MODELS, UNet

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "manifests" / "training" / "unet.yaml"
MODEL_NAME = "unet_features"
# Ordered so that a run cut short still compares the image with the arrays it competes with.
ARMS: dict[str, str] = {
    "rgb_image": "8-bit viridis RGB of the per-crop min-max normalised dB spectrogram",
    "linear_magnitude": "|X| (the numpy STFT magnitude)",
    "compressed_magnitude": "|X|^0.3 (power-law compressed)",
    "log_magnitude": "log(|X| + 1e-5)",
    "compressed_complex": "|X|^0.3 e^(j angle X), real + imaginary",
}
METRICS = ("pesq_wb", "estoi", "si_sdr")
# The real-room check again with the recording 26 dB quieter (peak 0.045 instead of 0.9, a
# speaker recorded at a normal distance with a conservative gain): the metrics do not depend
# on the level, so any change is the model's. Per-image normalisation makes the RGB input blind
# to it; the arrays are not.
QUIET_GAIN = 0.05


class FeatureUNet(UNet):
    """:class:`training.models.UNet` on any input of ``FEATURE_CHANNELS``, same output.

    ``input_features`` is what the network sees; ``features`` stays ``compressed_magnitude``
    because ``UNet.estimate`` reads it to choose the output (``softplus(.)^(1/c)``), and the
    ablation keeps the output and loss fixed so that only the input differs.
    """

    def __init__(
        self,
        n_freq: int,
        features: str = "compressed_magnitude",
        exponent: float = COMPRESS_EXPONENT,
        **kwargs,
    ):
        if features not in FEATURE_CHANNELS:
            raise ValueError(f"unknown features {features!r}; choose one of {FEATURE_CHANNELS}")
        super().__init__(n_freq, features="compressed_magnitude", exponent=exponent, **kwargs)
        self.input_features = features
        first = self.encoder[0][0]
        # Replaced for every input, 1-channel ones included, so all arms draw the same random
        # numbers at initialisation.
        self.encoder[0][0] = nn.Conv2d(
            FEATURE_CHANNELS[features],
            first.out_channels,
            first.kernel_size,
            first.stride,
            first.padding,
        )

    def forward(self, reverberant: torch.Tensor) -> torch.Tensor:
        features = spec_features(reverberant, self.input_features, self.exponent)
        return self.estimate(features, reverberant)


def register() -> None:
    """Make ``unet_features`` a model of this process (configs validate against MODELS)."""
    MODELS.setdefault(MODEL_NAME, FeatureUNet)


def _realism():
    # benchmarks/ is not a package; its scoring (input + model, the real-room check) is reused.
    spec = importlib.util.spec_from_file_location("realism", ROOT / "benchmarks" / "realism.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arm_config(features: str, steps: int) -> dict:
    config = yaml.safe_load(BASE_CONFIG.read_text())
    config.update(model=MODEL_NAME, features=features, steps=steps)
    config.update(num_workers=0, progress=False, device="cpu")  # one core: no loader process
    return config


def run_arm(features: str, data: str, work: Path, steps: int) -> None:
    """Train and score one arm; each step skipped when its output exists."""
    from training.config import TrainConfig
    from training.train import train

    folder = work / features
    run = folder / "run"
    if not (run / "metrics.json").exists():
        started = time.perf_counter()
        train(TrainConfig(**arm_config(features, steps)), data, run)
        minutes = (time.perf_counter() - started) / 60
        (folder / "train_minutes.txt").write_text(f"{minutes:.2f}\n")
        print(f"[{features}] trained in {minutes:.1f} min", flush=True)
    checkpoint = str(run / "checkpoint.pt")
    realism = _realism()
    for name, source in (("eval-sim", data), ("eval-real", None)):
        if (folder / name / "per_example.csv").exists():
            continue
        started = time.perf_counter()
        realism.score_checkpoint(checkpoint, folder / name, source)
        print(f"[{features}] {name} in {time.perf_counter() - started:.0f} s", flush=True)
    if not (folder / "eval-real-quiet" / "per_example.csv").exists():
        started = time.perf_counter()
        score_quiet(checkpoint, folder / "eval-real-quiet", realism)
        print(f"[{features}] eval-real-quiet in {time.perf_counter() - started:.0f} s", flush=True)


def score_quiet(checkpoint: str, out: Path, realism) -> None:
    """``realism.score_checkpoint``'s real-room check with every recording ``QUIET_GAIN`` as
    loud (reverberant and reference alike)."""
    import dataclasses

    from training.enhance import model_spec_fn, reconstruct_fn
    from training.evaluate import real_room_examples, score
    from training.inference import load_checkpoint

    model, config, sample_rate = load_checkpoint(checkpoint)
    model_fn = reconstruct_fn(model_spec_fn(model, torch.device("cpu")), "model", config)
    shared = realism.SHARED
    examples = (
        dataclasses.replace(
            ex, reverberant=ex.reverberant * QUIET_GAIN, target=ex.target * QUIET_GAIN
        )
        for ex in real_room_examples(shared / "speech", shared / "rir", sample_rate, 4)
    )
    rows, _ = score(examples, model_fn, config, sample_rate, METRICS, systems=("input", "model"))
    realism.write_per_example(rows, out)


def input_statistics(data: str, split: str = "test") -> dict[str, float]:
    """Per input, the share of its sum of squares in its largest 1 % of values, on the
    reverberant STFTs of ``split`` (median over examples).

    High means a few loud bins dominate every convolution and every gradient of the first
    layer, and the rest of the spectrogram (the reverberant tail, quiet speech) is numerically
    almost invisible: what dynamic-range compression (power law, log, the image's dB scale)
    undoes.
    """
    from training.data import ValidationDataset

    examples = [ex["reverberant"][None] for ex in ValidationDataset(data, split)]
    stats = {}
    for features in ARMS:
        top = []
        for spec in examples:
            squares = spec_features(spec, features).flatten().double().square()
            squares = squares.sort(descending=True).values
            top.append((squares[: max(1, squares.numel() // 100)].sum() / squares.sum()).item())
        stats[features] = float(torch.tensor(top).median())
    return stats


def model_scores(per_example: Path, metric: str = "pesq_wb") -> dict[str, float]:
    """The model's ``metric`` per example id, from one evaluation's ``per_example.csv``."""
    import csv

    with per_example.open() as handle:
        return {
            row["example_id"]: float(row[metric])
            for row in csv.DictReader(handle)
            if row["system"] != "input" and row.get(metric) not in (None, "")
        }


def paired_difference(a: Path, b: Path) -> tuple[float, float]:
    """Mean and standard error of (a - b) over the examples both scored: how far apart two
    arms are compared with the spread of examples (not of training seeds, which one run per
    arm cannot show)."""
    sa, sb = model_scores(a), model_scores(b)
    diffs = torch.tensor([sa[k] - sb[k] for k in sa if k in sb], dtype=torch.float64)
    return float(diffs.mean()), float(diffs.std() / diffs.numel() ** 0.5)


def table(work: Path, data: str) -> str:
    realism = _realism()
    lines = [
        "| input | channels | sim PESQ-WB gain | sim ESTOI gain | sim SI-SDR gain dB "
        "| real PESQ-WB gain | real ESTOI gain | real SI-SDR gain dB "
        "| real -26 dB PESQ-WB gain | final valid loss | train min | top 1 % share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    stats_path = work / "input_statistics.json"
    if not stats_path.exists():
        stats_path.write_text(json.dumps(input_statistics(data), indent=2) + "\n")
    stats = json.loads(stats_path.read_text())
    inputs: dict[str, dict[str, float]] = {}
    for features in ARMS:
        folder = work / features
        cells = [f"`{features}`", str(FEATURE_CHANNELS[features])]
        for name in ("eval-sim", "eval-real"):
            path = folder / name / "per_example.csv"
            if not path.exists():
                cells += ["(not run)", "", ""]
                continue
            scores = realism.means(path)
            inputs.setdefault(name, scores["input"])
            model = realism.model_system(scores)
            cells += [
                f"{scores[model]['pesq_wb'] - scores['input']['pesq_wb']:+.3f}",
                f"{scores[model]['estoi'] - scores['input']['estoi']:+.3f}",
                f"{scores[model]['si_sdr'] - scores['input']['si_sdr']:+.2f}",
            ]
        quiet = folder / "eval-real-quiet" / "per_example.csv"
        if quiet.exists():
            scores = realism.means(quiet)
            model = realism.model_system(scores)
            quiet_gain = scores[model]["pesq_wb"] - scores["input"]["pesq_wb"]
            cells.append(f"{quiet_gain:+.3f}")
        else:
            cells.append("(not run)")
        metrics_path = folder / "run" / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        loss = metrics.get("valid_loss")
        cells.append(f"{loss:.4f}" if loss is not None else "")
        minutes = folder / "train_minutes.txt"
        cells.append(minutes.read_text().strip() if minutes.exists() else "")
        cells.append(f"{stats[features]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    reference = "rgb_image"
    lines += [
        "",
        f"Model PESQ-WB minus the `{reference}` model's, example by example (mean +- standard "
        "error over examples):",
        "",
        "| input | sim | real | real -26 dB |",
        "|---|---:|---:|---:|",
    ]
    for features in ARMS:
        if features == reference:
            continue
        cells = [f"`{features}`"]
        for name in ("eval-sim", "eval-real", "eval-real-quiet"):
            a = work / features / name / "per_example.csv"
            b = work / reference / name / "per_example.csv"
            if a.exists() and b.exists():
                mean, error = paired_difference(a, b)
                cells.append(f"{mean:+.3f} +- {error:.3f}")
            else:
                cells.append("(not run)")
        lines.append("| " + " | ".join(cells) + " |")
    for name, label in (("eval-sim", "Simulated test split"), ("eval-real", "Real-room check")):
        if name in inputs:
            s = inputs[name]
            lines.append("")
            lines.append(
                f"{label} input: PESQ-WB {s['pesq_wb']:.3f}, ESTOI {s['estoi']:.3f}, "
                f"SI-SDR {s['si_sdr']:.2f} dB."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/work/stores/recipe.zarr", help="training store")
    parser.add_argument("--work", type=Path, default=Path("/work/ablation"))
    parser.add_argument("--arm", action="append", choices=list(ARMS), help="default: all")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per arm")
    parser.add_argument("--table-only", action="store_true", help="print the table of what ran")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for features in args.arm or list(ARMS):
            run_arm(features, args.data, args.work, args.steps)
    text = table(args.work, args.data)
    (args.work / "feature_ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
