"""Evaluate a checkpoint next to its baselines, on a store's split or on measured rooms.

Systems scored on every example, against the target the model was trained for:

- ``input``: the unprocessed reverberant signal;
- ``wpe``: single-channel WPE (nara_wpe; taps 10, delay 3, 5 iterations, STFT 512/128);
- ``model``: the checkpoint (its own complex output, or ``--phase fgla|gd`` reconstruction);
- ``oracle_mag``: the clean magnitude with the reverberant phase, the ceiling of any
  magnitude-only model that keeps the reverberant phase.

A metric that cannot be computed for an example is recorded as missing with its reason and
counted, never averaged. SRMR is reported as the change against the input.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from scipy.signal import fftconvolve

from dereverb_data.acoustics import DIRECT_WINDOW_MS, direct_path_index, measure_rir
from dereverb_data.corpus import AudioError, read_audio
from dereverb_data.stft import StftConfig, istft, stft
from dereverb_data.store_format import open_store

from .enhance import model_spec_fn, reconstruct_fn
from .inference import load_checkpoint
from .metrics import DEFAULT_METRICS, HIGHER_IS_BETTER, compute_metrics
from .wpe import wpe_dereverb

SYSTEMS = ("input", "wpe", "model", "oracle_mag")
RT60_BUCKETS = (0.0, 0.4, 0.7, 1.0, math.inf)


@dataclass
class Example:
    example_id: str
    rt60: float
    reverberant: np.ndarray
    target: np.ndarray


def store_examples(url: str, split: str, limit: int | None = None) -> Iterator[Example]:
    """Whole examples of a split, as waveforms (inverse STFT of the stored pair)."""
    store = open_store(url)
    index = store.columns
    config = store.stft_config
    for row in store.rows(split)[:limit]:
        pair = store.example(int(row))
        n = int(index["num_samples"][row])
        yield Example(
            str(index["example_id"][row]),
            float(index["rt60_t30"][row]),
            istft(pair["reverberant"], config, n),
            istft(pair["clean"], config, n),
        )


def direct_path_window(rir: np.ndarray, sample_rate: int) -> np.ndarray:
    """The RIR's direct path only: a window of +-2.5 ms around its main (direct) peak."""
    d = direct_path_index(rir)
    half = round(DIRECT_WINDOW_MS * sample_rate / 1000)
    window = np.zeros_like(rir)
    window[max(0, d - half) : d + half + 1] = rir[max(0, d - half) : d + half + 1]
    return window


def load_rir(path: Path, sample_rate: int) -> np.ndarray:
    """A measured RIR of any rate and channel count: channel 0 (W in B-format), resampled."""
    try:
        data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(f"{path}: unreadable RIR ({exc})") from None
    rir = data[:, 0]
    if rate != sample_rate:
        rir = soxr.resample(rir, rate, sample_rate, quality="HQ")
    if not np.any(rir) or not np.all(np.isfinite(rir)):
        raise AudioError(f"{path}: empty or non-finite RIR")
    return rir / np.max(np.abs(rir))


def real_room_examples(
    speech_dir: Path, rir_dir: Path, sample_rate: int, pairs_per_rir: int | None = None
) -> Iterator[Example]:
    """Clean speech convolved with measured RIRs; the target is the direct-path convolution.

    Speech files are assigned to RIRs round-robin, ``pairs_per_rir`` per RIR (all pairs when
    None), so every room is covered without scoring every combination.
    """
    speech = sorted(p for p in speech_dir.rglob("*") if p.suffix.lower() in (".wav", ".flac"))
    rirs = sorted(p for p in rir_dir.rglob("*") if p.suffix.lower() in (".wav", ".flac"))
    if not speech or not rirs:
        raise ValueError(f"no speech in {speech_dir} or no RIRs in {rir_dir}")
    for r, rir_path in enumerate(rirs):
        rir = load_rir(rir_path, sample_rate)
        direct = direct_path_window(rir, sample_rate)
        rt60 = measure_rir(rir, sample_rate).rt60_t30
        count = len(speech) if pairs_per_rir is None else pairs_per_rir
        for k in range(count):
            path = speech[(r * count + k) % len(speech)]
            dry, _, _ = read_audio(path, sample_rate)
            n = dry.size
            reverberant = fftconvolve(dry, rir)[:n]
            target = fftconvolve(dry, direct)[:n]
            scale = 0.9 / max(np.max(np.abs(reverberant)), 1e-9)
            yield Example(
                f"{rir_path.stem}/{path.stem}",
                float(rt60),
                (reverberant * scale).astype(np.float32),
                (target * scale).astype(np.float32),
            )


def systems_for(
    example: Example,
    model_fn,
    config: StftConfig,
    sample_rate: int,
    systems: tuple[str, ...] = SYSTEMS,
) -> dict[str, np.ndarray]:
    """Each of ``systems``' output signal for one example (only those asked for are run)."""
    rev_spec = stft(example.reverberant, config)
    n = example.reverberant.size

    def oracle_mag() -> np.ndarray:
        clean_spec = stft(example.target, config)
        return istft(np.abs(clean_spec) * np.exp(1j * np.angle(rev_spec)), config, n)

    run = {
        "input": lambda: example.reverberant,
        "wpe": lambda: wpe_dereverb(example.reverberant, sample_rate),
        "model": lambda: istft(model_fn(rev_spec), config, n),
        "oracle_mag": oracle_mag,
    }
    return {system: run[system]() for system in systems}


def score(
    examples: Iterable[Example],
    model_fn,
    config: StftConfig,
    sample_rate: int,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    keep_audio: int = 0,
    systems: tuple[str, ...] = SYSTEMS,
) -> tuple[list[dict], list[tuple[Example, dict[str, np.ndarray]]]]:
    """Per-(example, system) rows of metric values and missing reasons; a few kept signals."""
    rows: list[dict] = []
    kept = []
    for example in examples:
        outputs = systems_for(example, model_fn, config, sample_rate, systems)
        if len(kept) < keep_audio:
            kept.append((example, outputs))
        input_srmr = None
        for system in systems:
            result = compute_metrics(outputs[system], example.target, sample_rate, metrics)
            row = {"example_id": example.example_id, "rt60": example.rt60, "system": system}
            row.update(result.values)
            if "srmr" in result.values:
                if system == "input":
                    input_srmr = result.values["srmr"]
                if input_srmr is not None:
                    row["srmr_delta"] = result.values["srmr"] - input_srmr
            row["missing"] = "; ".join(f"{k}: {v}" for k, v in sorted(result.missing.items()))
            rows.append(row)
    return rows, kept


def bucket_of(rt60: float) -> str:
    if not math.isfinite(rt60):
        return "unknown"
    for low, high in itertools.pairwise(RT60_BUCKETS):
        if low <= rt60 < high:
            return f"{low:.1f}-{high:.1f} s" if math.isfinite(high) else f">= {low:.1f} s"
    return "unknown"


def summary_table(rows: list[dict], metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    """Markdown: mean of each metric per RT60 bucket and system, with n and missing counts."""
    columns = [m if m != "srmr" else "srmr_delta" for m in metrics]
    header = "| RT60 (T30) | system | n | " + " | ".join(columns) + " | missing |"
    lines = [header, "|" + "---|" * (len(columns) + 4)]
    buckets = [*sorted({bucket_of(r["rt60"]) for r in rows}), "all"]
    for bucket in buckets:
        for system in SYSTEMS:
            group = [
                r
                for r in rows
                if r["system"] == system and (bucket == "all" or bucket_of(r["rt60"]) == bucket)
            ]
            if not group:
                continue
            cells = []
            missing = sum(bool(r["missing"]) for r in group)
            for column in columns:
                values = [r[column] for r in group if column in r]
                cells.append(f"{np.mean(values):.3f}" if values else "-")
            lines.append(
                f"| {bucket} | {system} | {len(group)} | " + " | ".join(cells) + f" | {missing} |"
            )
    arrows = ", ".join(
        f"{m} {'higher' if HIGHER_IS_BETTER.get(m, True) else 'lower'} is better" for m in metrics
    )
    return "\n".join(lines) + f"\n\n({arrows}; srmr_delta: SRMR change against the input.)\n"


def write_outputs(
    rows: list[dict],
    kept: list[tuple[Example, dict[str, np.ndarray]]],
    out: Path,
    config: StftConfig,
    sample_rate: int,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    names = ["example_id", "rt60", "system", *metrics, "srmr_delta", "missing"]
    with (out / "per_example.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = summary_table(rows, metrics)
    (out / "summary.md").write_text(table)
    for i, (example, outputs) in enumerate(kept):
        for system, signal in outputs.items():
            sf.write(out / f"example{i}_{system}.wav", np.clip(signal, -1, 1), sample_rate)
        sf.write(out / f"example{i}_target.wav", np.clip(example.target, -1, 1), sample_rate)
    plot_results(rows, kept, out, config, sample_rate, metrics)
    return table


def plot_results(rows, kept, out: Path, config: StftConfig, sample_rate: int, metrics) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if m != "srmr"]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], shown, strict=True):
        for system in ("input", "wpe", "model"):
            points = [(r["rt60"], r[metric]) for r in rows if r["system"] == system and metric in r]
            if points:
                x, y = zip(*points, strict=True)
                ax.scatter(x, y, s=10, label=system)
        ax.set(title=metric, xlabel="RT60 (s)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "metrics_vs_rt60.png", dpi=90)
    plt.close(fig)
    if kept:
        example, outputs = kept[0]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for ax, (title, signal) in zip(
            axes,
            (
                ("reverberant", outputs["input"]),
                ("enhanced", outputs["model"]),
                ("clean target", example.target),
            ),
            strict=True,
        ):
            db = 20 * np.log10(np.abs(stft(signal, config)).T + 1e-6)
            ax.imshow(
                db,
                origin="lower",
                aspect="auto",
                vmin=db.max() - 80,
                vmax=db.max(),
                extent=(0, signal.size / sample_rate, 0, sample_rate / 2000),
            )
            ax.set(title=f"{title}: {example.example_id}", xlabel="s", ylabel="kHz")
        fig.tight_layout()
        fig.savefig(out / "spectrograms.png", dpi=90)
        plt.close(fig)


def evaluate(
    checkpoint: str | Path | None,
    out: str | Path,
    data: str | None = None,
    split: str = "test",
    speech: str | Path | None = None,
    rirs: str | Path | None = None,
    phase: str = "model",
    limit: int | None = None,
    pairs_per_rir: int | None = 4,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
) -> str:
    """Score a checkpoint (``None``: the packaged default model) on a store split (``data``) or
    on speech x measured RIRs."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, config, sample_rate = load_checkpoint(checkpoint)
    model_fn = reconstruct_fn(model_spec_fn(model, torch.device("cpu")), phase, config)
    if data is not None:
        examples = store_examples(data, split, limit)
    elif speech is not None and rirs is not None:
        examples = real_room_examples(Path(speech), Path(rirs), sample_rate, pairs_per_rir)
    else:
        raise ValueError("give --data STORE, or --speech DIR and --rirs DIR")
    rows, kept = score(examples, model_fn, config, sample_rate, metrics, keep_audio=3)
    return write_outputs(rows, kept, Path(out), config, sample_rate, metrics)
