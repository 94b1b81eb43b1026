"""Describe a finished store: counts, hours, label distributions, size, and a picture."""

from __future__ import annotations

import json

import numpy as np

from .store import DatasetStore
from .store_format import (
    BUILD_DIR,
    SIGNALS,
    SUMMARY_LABELS,
    StoreError,
    StoreReader,
    open_store,
)


def distribution(values: np.ndarray) -> dict:
    """Min, deciles and median of the finite values (empty when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {}
    q = np.percentile(values, [0, 10, 50, 90, 100])
    return {
        k: round(float(v), 3)
        for k, v in zip(("min", "p10", "median", "p90", "max"), q, strict=True)
    }


def describe_store(url: str) -> dict:
    # An unfinished store with an index (a rebuild in progress) is described, marked so.
    store = open_store(url, require_complete=False)
    attrs, index = store.attrs, store.columns
    fs = attrs["sample_rate"]
    seconds = float(index["num_samples"].sum()) / fs
    size = DatasetStore(url).size_bytes()
    splits, counts = np.unique(index["split"], return_counts=True)

    return {
        "url": url,
        "complete": bool(attrs.get("complete")),
        "examples": int(index["example_id"].size),
        "examples_per_split": {str(s): int(c) for s, c in zip(splits, counts, strict=True)},
        "speakers": int(np.unique(index["speaker"]).size),
        "rooms": int(np.unique(index["room_id"]).size),
        "rirs": int(np.unique(index["rir_id"]).size),
        "hours": round(seconds / 3600, 4),
        "frames": int(attrs["n_frames"]),
        "storage_dtype": attrs["storage_dtype"],
        "stft": attrs["stft"],
        "size_on_disk_bytes": size,
        "bytes_per_second_of_audio": round(size / max(seconds, 1e-9), 1),
        "labels": {
            name: distribution(index[name]) for name in ("rt60_t30", "rt60_t20", *SUMMARY_LABELS)
        },
        **_build_report_facts(url),
    }


def _build_report_facts(url: str) -> dict:
    """Clipped and quarantined sources and warnings, from the last build's report (if any)."""
    try:
        report = json.loads(DatasetStore(url).read_text(f"{BUILD_DIR}/report.json"))
    except (OSError, ValueError):
        return {"clipped_sources": [], "quarantined": [], "warnings": []}
    return {
        "clipped_sources": list(report.get("clipped", [])),
        "quarantined": [q.get("reason", "") for q in report.get("quarantined", [])],
        "warnings": list(report.get("warnings", [])),
    }


def format_description(d: dict) -> str:
    lines = [
        f"store          {d['url']}  ({'complete' if d['complete'] else 'INCOMPLETE'})",
        f"examples       {d['examples']}  {d['examples_per_split']}",
        f"speakers       {d['speakers']}   rooms {d['rooms']}   unique RIRs {d['rirs']}",
        f"audio          {d['hours']:.3f} h in {d['frames']} STFT frames ({d['stft']})",
        f"size on disk   {d['size_on_disk_bytes'] / 1e6:.1f} MB ({d['storage_dtype']}), "
        f"{d['bytes_per_second_of_audio'] / 1e3:.1f} kB per second of audio",
        "labels         min / p10 / median / p90 / max",
    ]
    for name, stats in d["labels"].items():
        values = " / ".join(
            f"{stats.get(k, float('nan')):.3f}" for k in ("min", "p10", "median", "p90", "max")
        )
        lines.append(f"  {name:<12} {values}")
    lines.append(f"clipped        {len(d['clipped_sources'])} source file(s), kept and flagged")
    lines += [f"  {source}" for source in d["clipped_sources"]]
    lines.append(f"quarantined    {len(d['quarantined'])} file(s)")
    lines += [f"  {reason}" for reason in d["quarantined"]]
    lines += [f"warning        {warning}" for warning in d["warnings"]]
    return "\n".join(lines)


def plot_store(url: str, path: str, example: int = 0) -> None:
    """RT60 and DRR histograms, and one example's reverberant and clean spectrograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store: StoreReader = open_store(url, require_complete=False)
    index = store.columns
    n = int(index["example_id"].size)
    if not 0 <= example < n:
        raise StoreError(f"--example {example}: {url} has {n} examples (rows 0 to {n - 1})")
    count = int(index["frame_count"][example])
    fs, hop = store.sample_rate, store.stft_config.hop
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0, 0].hist(index["rt60_t30"][np.isfinite(index["rt60_t30"])], bins=20, color="tab:blue")
    axes[0, 0].set(title="measured RT60 (T30)", xlabel="s", ylabel="examples")
    axes[0, 1].hist(index["drr_db"][np.isfinite(index["drr_db"])], bins=20, color="tab:orange")
    axes[0, 1].set(title="direct-to-reverberant ratio", xlabel="dB")
    extent = (0, count * hop / fs, 0, fs / 2000)
    for ax, name in zip(axes[1], SIGNALS, strict=True):
        spec = store.example(example)[name]
        db = 20 * np.log10(np.abs(spec).T + 1e-8)
        ax.imshow(
            db, origin="lower", aspect="auto", extent=extent, vmin=db.max() - 80, vmax=db.max()
        )
        ax.set(title=f"{name}: {index['example_id'][example]}", xlabel="s", ylabel="kHz")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
