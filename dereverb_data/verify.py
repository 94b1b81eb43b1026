"""Verify a finished store: recompute every shard's checksum and check the index invariants."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from .store import DatasetStore, shard_checksum


@dataclass
class VerifyReport:
    url: str
    shards_checked: int = 0
    damaged: dict[int, str] = field(default_factory=dict)  # shard -> reason
    problems: list[str] = field(default_factory=list)  # index and metadata problems

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.problems

    def lines(self) -> list[str]:
        out = [f"shard {s}: {reason}" for s, reason in sorted(self.damaged.items())]
        return out + self.problems


def verify_store(url: str) -> VerifyReport:
    report = VerifyReport(url)
    group = zarr.open_group(url, mode="r")
    attrs = dict(group.attrs)
    if not attrs.get("complete"):
        report.problems.append("store is not marked complete: the build has not finished")
        return report
    frames = int(attrs["frames_per_shard"])
    sums = group["shard_checksums"][:]
    store = DatasetStore(url)
    for shard_id, expected in enumerate(sums):
        report.shards_checked += 1
        start = shard_id * frames
        try:
            reverberant = group["reverberant"][start : start + frames]
            clean = group["clean"][start : start + frames]
        except Exception as exc:  # any decode failure is damage, whatever the codec raised
            report.damaged[shard_id] = f"unreadable ({type(exc).__name__}: {exc})"
            continue
        actual = shard_checksum(reverberant, clean)
        if actual != expected:
            report.damaged[shard_id] = (
                f"checksum mismatch (stored {expected[:12]}, data {actual[:12]})"
            )
            continue
        marker = store.marker(shard_id)
        if marker is None or marker.checksum != expected:
            report.damaged[shard_id] = "done-marker missing or disagrees with the index checksum"
    report.problems.extend(index_problems(group, attrs))
    return report


def forget_damaged_shards(url: str) -> list[int]:
    """Remove the done-markers of damaged shards so the next build renders them again."""
    group = zarr.open_group(url, mode="r")
    if not group.attrs.get("complete"):
        return []  # an unfinished build resumes anyway
    damaged = sorted(verify_store(url).damaged)
    store = DatasetStore(url)
    for shard_id in damaged:
        store.remove_marker(shard_id)
    return damaged


def index_problems(group: zarr.Group, attrs: dict) -> list[str]:
    index = {name: group["index"][name][:] for name in group["index"].array_keys()}
    problems = []
    sizes = {name: values.shape[0] for name, values in index.items()}
    if len(set(sizes.values())) != 1:
        problems.append(f"index columns differ in length: {sizes}")
        return problems
    n = int(attrs["n_examples"])
    if index["example_id"].size != n:
        problems.append(f"index has {index['example_id'].size} rows, attributes say {n}")
    if np.unique(index["example_id"]).size != index["example_id"].size:
        problems.append("duplicate example ids")
    frames = int(attrs["frames_per_shard"])
    start, count = index["frame_offset"], index["frame_count"]
    hop = int(attrs["stft"]["hop"])
    if np.any(count != 1 + index["num_samples"] // hop):
        problems.append("frame_count does not match num_samples")
    if np.any(start // frames != (start + count - 1) // frames) or np.any(
        start // frames != index["shard"]
    ):
        problems.append("an example crosses a shard boundary or names the wrong shard")
    order = np.argsort(start)
    if np.any(start[order][1:] < (start + count)[order][:-1]):
        problems.append("examples overlap")
    if np.any(start + count > group["clean"].shape[0]):
        problems.append("an example lies beyond the end of the arrays")
    return problems
