"""Writing a store: creating its arrays, whole-shard writes, done-markers and the index.

What a store holds (array names and layout, index columns, attributes, encoding) is defined in
:mod:`dereverb_data.store_format`, which also reads stores; this module is the build's side.

A build shard is written whole by exactly one task (a partial write into a zarr shard is a
read-modify-write, which loses data under concurrency), and only then is a done-marker with
its checksum written under ``_build/shards/``. A crashed build redoes shards without a marker.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import zarr

from .fsio import read_bytes, remove_file, url_to_fs, write_atomic
from .plan import Plan
from .store_format import (
    BUILD_DIR,
    CHECKSUMS,
    DAMAGED_HINT,
    INDEX_GROUP,
    LEGACY_PLAN_INPUTS,
    MARKER_DIR,
    PLAN_FILE,
    SIGNALS,
    ExampleLabels,
    StoreError,
    create_signal_arrays,
    format_attrs,
    layout_attrs,
    open_store_array,
    open_store_group,
    shard_checksum,
    shard_keys,
    signal_layout,
    write_index_group,
)


def package_versions() -> dict[str, str]:
    names = ("dereverb", "numpy", "scipy", "pyroomacoustics", "zarr", "soundfile", "soxr")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class ShardMarker:
    shard_id: int
    fingerprint: str
    checksum: str


class ShardProgress:
    """How many shards of a plan are done, read from one place: each call lists the markers'
    folder once, and reads only the markers that are new or changed since the last call (the
    progress watcher asks twice a second; reading every marker each time cost one request per
    shard per poll)."""

    def __init__(self, store: DatasetStore, fingerprints: list[str]) -> None:
        self._store = store
        self._fingerprints = fingerprints
        self._seen: dict[str, tuple] = {}  # marker path -> its listing entry
        self._done: dict[str, bool] = {}

    def done(self) -> int:
        store = self._store
        try:
            listing = store.fs.ls(f"{store.root}/{MARKER_DIR}", detail=True)
        except FileNotFoundError:
            listing = []
        current = {}
        for entry in listing:
            name = entry["name"].rsplit("/", 1)[-1]
            stem = name.removesuffix(".json")
            if stem == name or not stem.isdigit() or int(stem) >= len(self._fingerprints):
                continue  # a temporary file, or a marker of another plan's extra shard
            stamp = tuple(sorted((k, str(v)) for k, v in entry.items()))
            current[entry["name"]] = stamp
            if self._seen.get(entry["name"]) != stamp:
                marker = store.marker(int(stem))
                fingerprint = self._fingerprints[int(stem)]
                self._done[entry["name"]] = marker is not None and marker.fingerprint == fingerprint
        for gone in self._seen.keys() - current.keys():
            self._done.pop(gone, None)
        self._seen = current
        return sum(self._done.values())


class DatasetStore:
    """A store at a local path or fsspec URL, opened for building it (reading a finished
    store: :func:`dereverb_data.store_format.open_store`)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)

    # -- creation ---------------------------------------------------------------------------
    def prepare(self, plan: Plan) -> None:
        """Create the arrays for this plan, or check an existing store fits it.

        An existing store with another layout (STFT, dtype, chunking) is refused rather than
        overwritten: data already built stays intact.
        """
        manifest = plan.manifest
        n_freq = plan.stft.n_freq
        storage = manifest.storage
        shape = signal_layout(
            plan.n_frames,
            n_freq,
            storage.dtype,
            storage.frames_per_chunk,
            storage.frames_per_shard,
        )["shape"]
        layout = layout_attrs(
            manifest.sample_rate,
            manifest.stft.model_dump(mode="json"),
            storage.dtype,
            storage.frames_per_chunk,
            storage.frames_per_shard,
        )
        if self.exists():
            group = open_store_group(self.url, mode="r+")
            found = {key: group.attrs.get(key) for key in layout}
            if found != layout:
                changed = sorted(k for k in layout if found[k] != layout[k])
                raise StoreError(
                    f"{self.url}: existing store has another layout ({', '.join(changed)}); "
                    "build into a new store path, or delete this one yourself"
                )
            for name in SIGNALS:
                array = open_store_array(self.url, group, name, DAMAGED_HINT)
                if array.shape != shape:
                    array.resize(shape)
        else:
            # Arrays without a root zarr.json: the root metadata was lost, and creating the
            # arrays anew would fail on (or overwrite) the data already there.
            for name in SIGNALS:
                if self.fs.exists(f"{self.root}/{name}/zarr.json"):
                    raise StoreError(
                        f"{self.url}: no zarr.json at the store root, but {name}/ holds an "
                        f"array: the root metadata was deleted; {DAMAGED_HINT}"
                    )
            # Not "w-": the folder already holds the build lock (and maybe a RIR bank).
            group = zarr.open_group(self.url, mode="a")
            create_signal_arrays(
                group,
                plan.n_frames,
                n_freq,
                storage.dtype,
                storage.frames_per_chunk,
                storage.frames_per_shard,
                storage.compressor,
            )
        group.attrs.update(
            {
                **format_attrs(),
                **layout,
                "n_freq": n_freq,
                "n_frames": plan.n_frames,
                "n_shards": plan.n_shards,
                "complete": False,
            }
        )
        self.write_plan(plan)

    def write_plan(self, plan: Plan) -> None:
        """Store the plan (:data:`~dereverb_data.store_format.PLAN_FILE`), which every task and
        the progress watcher load instead of planning again; the inputs-only ``plan.json`` of
        stores built before is removed (the stored plan holds the manifest and the scan)."""
        write_atomic(self.fs, f"{self.root}/{PLAN_FILE}", plan.to_stored())
        remove_file(self.fs, f"{self.root}/{LEGACY_PLAN_INPUTS}")

    def exists(self) -> bool:
        return self.fs.exists(f"{self.root}/zarr.json")

    # -- build state ------------------------------------------------------------------------
    def _write_text(self, relative: str, text: str) -> None:
        write_atomic(self.fs, f"{self.root}/{relative}", text.encode())

    def read_text(self, relative: str) -> str:
        """The file's text; ``FileNotFoundError`` when it is absent."""
        return self.read_bytes(relative).decode()

    def read_bytes(self, relative: str) -> bytes:
        """The file's bytes; ``FileNotFoundError`` when it is absent."""
        return read_bytes(self.fs, f"{self.root}/{relative}")

    def _marker_path(self, shard_id: int) -> str:
        return f"{MARKER_DIR}/{shard_id:06d}.json"

    def marker(self, shard_id: int) -> ShardMarker | None:
        # One read, no exists() first: a request less per shard on object stores, and no
        # window in which the marker is removed between the two.
        try:
            return ShardMarker(**json.loads(self.read_text(self._marker_path(shard_id))))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return None  # an unreadable marker vouches for nothing: the shard is redone

    def remove_marker(self, shard_id: int) -> None:
        remove_file(self.fs, f"{self.root}/{self._marker_path(shard_id)}")

    def shard_is_done(self, shard_id: int, fingerprint: str) -> bool:
        marker = self.marker(shard_id)
        return marker is not None and marker.fingerprint == fingerprint

    def write_labels(self, shard_id: int, labels: Iterable[ExampleLabels]) -> None:
        rows = [label.to_json() for label in labels]
        self._write_text(f"{BUILD_DIR}/labels/{shard_id:06d}.json", json.dumps(rows))

    def read_labels(self, shard_id: int) -> list[ExampleLabels]:
        """The shard's labels; ``FileNotFoundError`` when absent, ``ValueError`` (or a
        ``TypeError``) when unreadable."""
        rows = json.loads(self.read_text(f"{BUILD_DIR}/labels/{shard_id:06d}.json"))
        return [ExampleLabels.from_json(row) for row in rows]

    # -- data -------------------------------------------------------------------------------
    def write_shard(
        self,
        shard_id: int,
        frame_start: int,
        reverberant: np.ndarray,
        clean: np.ndarray,
        fingerprint: str,
        labels: Iterable[ExampleLabels],
    ) -> ShardMarker:
        """Write one whole shard of both signals, then its labels, then (only then) its
        done-marker: a crash at any point leaves no marker that vouches for other data.

        The shard's old objects are deleted before the write. zarr writes into a shard by
        reading the old one first (even when every chunk is replaced), so a damaged old shard
        (truncated, flipped index byte) would make the write itself fail and leave the shard
        unrepairable. Its marker goes first, so no moment exists where a marker vouches for
        a deleted or half-written shard.
        """
        group = open_store_group(self.url, mode="r+")
        arrays = [open_store_array(self.url, group, name, DAMAGED_HINT) for name in SIGNALS]
        shard_frames = (arrays[0].shards or arrays[0].chunks)[0]
        stop = frame_start + reverberant.shape[0]
        # Deleting the old shard is only safe when the new data replaces all of it.
        expected_stop = min(frame_start + shard_frames, arrays[0].shape[0])
        if frame_start % shard_frames or stop != expected_stop or clean.shape != reverberant.shape:
            raise ValueError(
                f"write_shard writes whole shards: frames {frame_start}:{stop} with clean "
                f"{clean.shape} is not shard {frame_start // shard_frames} "
                f"(frames {frame_start}:{expected_stop})"
            )
        self.remove_marker(shard_id)
        for array in arrays:
            for key in shard_keys(array, frame_start // shard_frames):
                remove_file(self.fs, f"{self.root}/{array.path}/{key}")
        arrays[0][frame_start:stop] = reverberant
        arrays[1][frame_start:stop] = clean
        self.write_labels(shard_id, labels)
        marker = ShardMarker(shard_id, fingerprint, shard_checksum(reverberant, clean))
        self._write_text(self._marker_path(shard_id), json.dumps(marker.__dict__))
        return marker

    def read_shard(self, frame_start: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """A shard's frames as stored (not decoded): what its checksum covers, for the build's
        check that an old shard can be reused, also in an unfinished store."""
        group = zarr.open_group(self.url, mode="r", zarr_format=3)
        stop = frame_start + frames
        return tuple(group[name][frame_start:stop] for name in SIGNALS)  # type: ignore[return-value]

    def write_index(
        self, columns: Mapping[str, np.ndarray], checksums: list[str], attrs: dict
    ) -> None:
        group = open_store_group(self.url, mode="r+")
        # Both are written anew, so they are removed as files: asking zarr ("index" in group,
        # del group[...]) parses their metadata first and fails on the damaged metadata that a
        # rebuild is meant to replace.
        for name in (INDEX_GROUP, CHECKSUMS):
            if self.fs.exists(f"{self.root}/{name}"):
                self.fs.rm(f"{self.root}/{name}", recursive=True)
        write_index_group(group, columns, checksums)
        group.attrs.update({**attrs, "complete": True})

    def size_bytes(self) -> int:
        return int(sum(self.fs.du(f"{self.root}/{name}") for name in SIGNALS))
