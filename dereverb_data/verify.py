"""Verify a finished store: recompute every shard's checksum and check the index invariants.

Damage to a shard (its data) is reported per shard, so ``build --repair`` can render exactly
those shards again. Damage to what the check itself stands on (the root metadata, the arrays'
metadata, ``shard_checksums``, the index) leaves nothing to compare against: that raises a
:class:`StoreError` with one line naming the store and the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from .store import DatasetStore
from .store_format import (
    CHECKSUMS,
    DAMAGED_HINT,
    REWRITE_HINT,
    StoreError,
    describe_exception,
    open_store,
    open_store_array,
    open_store_group,
    read_array,
    shard_checksum,
    shard_keys,
)

# Attributes verify needs besides those every store reader needs.
REQUIRED_ATTRS = ("frames_per_shard", "n_examples", "stft")


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
    """Check every shard against its checksum and the index against its invariants.

    Raises :class:`StoreError` when the store's metadata, checksums or index are missing or
    unreadable.
    """
    url = url.rstrip("/")
    report = VerifyReport(url)
    store = open_store(url, require_complete=False)
    attrs = store.attrs
    if not attrs.get("complete"):
        report.problems.append("store is not marked complete: the build has not finished")
        return report
    lacking = [key for key in REQUIRED_ATTRS if key not in attrs]
    if lacking:
        raise StoreError(
            f"{url}: the root zarr.json lacks the attributes {', '.join(lacking)}; {DAMAGED_HINT}"
        )
    arrays = store.arrays
    group = open_store_group(url, mode="r")
    sums_array = open_store_array(url, group, CHECKSUMS, REWRITE_HINT)
    sums = read_array(url, sums_array, CHECKSUMS, REWRITE_HINT)
    index = store.columns
    frames = int(attrs["frames_per_shard"])
    build = DatasetStore(url)
    for shard_id, expected in enumerate(sums):
        report.shards_checked += 1
        start = shard_id * frames
        try:
            reverberant = arrays["reverberant"][start : start + frames]
            clean = arrays["clean"][start : start + frames]
        except Exception as exc:  # any decode failure is damage, whatever the codec raised
            report.damaged[shard_id] = f"unreadable ({describe_exception(exc)})"
            continue
        actual = shard_checksum(reverberant, clean)
        if actual != expected:
            report.damaged[shard_id] = _mismatch_reason(build, arrays, start, expected, actual)
            continue
        marker = build.marker(shard_id)
        if marker is None or marker.checksum != expected:
            report.damaged[shard_id] = "done-marker missing or disagrees with the index checksum"
    if "n_shards" in attrs and len(sums) != int(attrs["n_shards"]):
        report.problems.append(
            f"shard_checksums has {len(sums)} entries, attributes say {attrs['n_shards']} shards"
        )
    report.problems.extend(index_problems(index, attrs, arrays["clean"].shape[0]))
    return report


def _mismatch_reason(
    store: DatasetStore, arrays: dict[str, zarr.Array], start: int, expected: str, actual: str
) -> str:
    """Why a shard's data disagrees with its checksum.

    zarr reads an absent shard object, and an empty one, as all fill value (zeros), so both
    look like a checksum mismatch; the files themselves tell them apart. Looked at only for
    mismatching shards, so a healthy store costs no extra listing.
    """
    absent, empty = [], []
    for array in arrays.values():
        for key in shard_keys(array, start // (array.shards or array.chunks)[0]):
            relative = f"{array.path}/{key}"
            path = f"{store.root}/{relative}"
            if not store.fs.exists(path):
                absent.append(relative)
            elif store.fs.size(path) == 0:
                empty.append(relative)
    if absent:
        return f"missing (no {', '.join(absent)})"
    if empty:
        return f"unreadable (empty file {', '.join(empty)})"
    return f"checksum mismatch (stored {expected[:12]}, data {actual[:12]})"


def forget_damaged_shards(url: str) -> list[int]:
    """Remove the done-markers of damaged shards so the next build renders them again.

    Raises :class:`StoreError` when the store's metadata, checksums or index are missing or
    unreadable (as :func:`verify_store`).
    """
    group = open_store_group(url, mode="r")
    if not group.attrs.get("complete"):
        return []  # an unfinished build resumes anyway
    damaged = sorted(verify_store(url).damaged)
    store = DatasetStore(url)
    for shard_id in damaged:
        store.remove_marker(shard_id)
    return damaged


def index_problems(index: dict[str, np.ndarray], attrs: dict, n_frames: int) -> list[str]:
    """Broken invariants of the index columns (``n_frames``: the arrays' length)."""
    problems = []
    sizes = {name: values.shape[0] if values.ndim else 0 for name, values in index.items()}
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
    if np.any(start + count > n_frames):
        problems.append("an example lies beyond the end of the arrays")
    return problems
