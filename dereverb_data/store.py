"""The zarr v3 store of paired STFTs: layout, whole-shard writes, done-markers and the index.

Layout (readable with plain ``zarr`` and ``numpy``; see the README):

- ``reverberant``, ``clean``: ``complex64 (frames, freq)`` or ``float16 (frames, freq, 2)``,
  chunked along time, one zarr shard per build shard;
- ``index/<column>``: one 1-D array per example column (ids, split, frame offset/count, labels);
- ``shard_checksums``: sha256 of each shard's decoded data (reverberant then clean);
- root attributes: format, sample rate, STFT settings, manifest, package versions, summary.

A build shard is written whole by exactly one task (a partial write into a zarr shard is a
read-modify-write, which loses data under concurrency), and only then is a done-marker with
its checksum written under ``_build/shards/``. A crashed build redoes shards without a marker.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .fsio import read_bytes, remove_file, url_to_fs, write_atomic
from .plan import Plan

FORMAT = "dereverb-store"
FORMAT_VERSION = 1
SIGNALS = ("reverberant", "clean")
BUILD_DIR = "_build"
DAMAGED_HINT = "the store's metadata is damaged: build into a new store path"

# Zarr warns that variable-length strings are not yet in the v3 spec; the index uses them on
# purpose (plain zarr-python reads them) and says so in the README.
warnings.filterwarnings("ignore", message=".*not part in the Zarr format 3 specification.*")
warnings.filterwarnings("ignore", category=UserWarning, module="zarr.core.dtype")


class StoreError(RuntimeError):
    """The store cannot be used for this build; the message says why and what to do."""


def describe_exception(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, shortened: zarr and json errors can span lines, and the
    CLI prints a user error as a single ``error:`` line."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def open_store_group(url: str, mode: str = "r") -> zarr.Group:
    """The store's root group, or a :class:`StoreError` naming what is wrong with its metadata.

    zarr reports a missing or damaged ``zarr.json`` as whatever its parser hit (JSONDecodeError,
    GroupNotFoundError, KeyError, ContainsArrayError, ...), so any failure to open is turned
    into one message; whether the file exists tells "missing" from "damaged".
    """
    url = url.rstrip("/")
    try:
        # zarr_format=3: the store is zarr v3; without it zarr first looks for v2 metadata
        # (.zgroup, .zattrs, .zmetadata: six requests on an object store, on every open).
        return zarr.open_group(url, mode=mode, zarr_format=3)
    except Exception as exc:
        fs, root = url_to_fs(url)
        if not fs.exists(f"{root}/zarr.json"):
            raise StoreError(
                f"{url}: no zarr.json at the store root: not a dereverb store, or its root "
                "metadata was deleted"
            ) from exc
        raise StoreError(
            f"{url}: the store's root zarr.json is unreadable ({describe_exception(exc)}); "
            "its metadata is damaged: build into a new store path"
        ) from exc


def open_store_node(
    url: str, group: zarr.Group, name: str, hint: str = ""
) -> zarr.Array | zarr.Group:
    """``group[name]`` (a path such as ``index/shard``), or a :class:`StoreError` saying
    whether its ``zarr.json`` is missing or unreadable; ``hint`` says what to do about it."""
    url = url.rstrip("/")
    try:
        return group[name]
    except Exception as exc:
        fs, root = url_to_fs(url)
        meta = f"{group.path}/{name}".strip("/") + "/zarr.json"
        if not fs.exists(f"{root}/{meta}"):
            problem = f"{name} is missing (no {meta})"
        else:
            problem = f"{meta} is unreadable ({describe_exception(exc)})"
        raise StoreError(f"{url}: {problem}{'; ' + hint if hint else ''}") from exc


def open_store_array(url: str, group: zarr.Group, name: str, hint: str = "") -> zarr.Array:
    node = open_store_node(url, group, name, hint)
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{url.rstrip('/')}: {name} is a group where an array belongs")
    return node


def shard_keys(array: zarr.Array, shard_row: int) -> list[str]:
    """The storage keys (relative to the array) of the objects holding shard row ``shard_row``.

    With ``shards=`` set, zarr stores one object per shard, named by the array's chunk key
    encoding applied to the shard's grid coordinates: ``c/<k>/0`` for ``(frames, freq)``,
    ``c/<k>/0/0`` for float16's ``(frames, freq, 2)``. Trailing dimensions are spanned by
    one shard in this layout, but every grid cell of the row is listed in case they are not.
    """
    outer = array.shards or array.chunks
    rest = [range(math.ceil(n / c)) for n, c in zip(array.shape[1:], outer[1:], strict=True)]
    return [
        array.metadata.encode_chunk_key((shard_row, *cell)) for cell in itertools.product(*rest)
    ]


def package_versions() -> dict[str, str]:
    names = ("dereverb", "numpy", "scipy", "pyroomacoustics", "zarr", "soundfile", "soxr")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def encode(spec: np.ndarray, dtype: str) -> np.ndarray:
    """complex64 as is; float16 as a trailing (real, imag) axis.

    Adding zero turns -0.0 into +0.0: zarr drops chunks equal to the fill value (0), so a chunk
    of -0.0 would read back as +0.0 and no longer match the checksum of what was written.
    """
    spec = spec + np.zeros((), dtype=spec.dtype)
    if dtype == "complex64":
        return spec.astype(np.complex64)
    return np.stack([spec.real, spec.imag], axis=-1).astype(np.float16) + np.float16(0)


def decode(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.float16:
        return (stored[..., 0].astype(np.float32) + 1j * stored[..., 1].astype(np.float32)).astype(
            np.complex64
        )
    return stored


def shard_checksum(reverberant: np.ndarray, clean: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(reverberant).tobytes())
    digest.update(np.ascontiguousarray(clean).tobytes())
    return digest.hexdigest()


@dataclass
class ShardMarker:
    shard_id: int
    fingerprint: str
    checksum: str


class DatasetStore:
    """A store at a local path or fsspec URL, opened for building or reading."""

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
        shape: tuple[int, ...] = (plan.n_frames, n_freq)
        chunks: tuple[int, ...] = (storage.frames_per_chunk, n_freq)
        shards: tuple[int, ...] = (storage.frames_per_shard, n_freq)
        dtype = "complex64"
        if storage.dtype == "float16":
            shape, chunks, shards, dtype = (*shape, 2), (*chunks, 2), (*shards, 2), "float16"
        layout = {
            "sample_rate": manifest.sample_rate,
            "stft": manifest.stft.model_dump(mode="json"),
            "storage_dtype": storage.dtype,
            "frames_per_chunk": storage.frames_per_chunk,
            "frames_per_shard": storage.frames_per_shard,
        }
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
            compressors = ZstdCodec(level=1) if storage.compressor == "zstd" else None
            for name in SIGNALS:
                group.create_array(
                    name,
                    shape=shape,
                    chunks=chunks,
                    shards=shards,
                    dtype=dtype,
                    fill_value=0,
                    compressors=compressors,
                    dimension_names=("frame", "freq", "re_im")[: len(shape)],
                )
        group.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                **layout,
                "n_freq": n_freq,
                "n_frames": plan.n_frames,
                "n_shards": len(plan.shards),
                "complete": False,
            }
        )
        self._write_text(f"{BUILD_DIR}/plan.json", plan.to_json())

    def exists(self) -> bool:
        return self.fs.exists(f"{self.root}/zarr.json")

    # -- build state ------------------------------------------------------------------------
    def _write_text(self, relative: str, text: str) -> None:
        write_atomic(self.fs, f"{self.root}/{relative}", text.encode())

    def read_text(self, relative: str) -> str:
        """The file's text; ``FileNotFoundError`` when it is absent."""
        return read_bytes(self.fs, f"{self.root}/{relative}").decode()

    def _marker_path(self, shard_id: int) -> str:
        return f"{BUILD_DIR}/shards/{shard_id:06d}.json"

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

    def write_labels(self, shard_id: int, rows: list[dict]) -> None:
        self._write_text(f"{BUILD_DIR}/labels/{shard_id:06d}.json", json.dumps(rows))

    def read_labels(self, shard_id: int) -> list[dict]:
        return json.loads(self.read_text(f"{BUILD_DIR}/labels/{shard_id:06d}.json"))

    # -- data -------------------------------------------------------------------------------
    def write_shard(
        self,
        shard_id: int,
        frame_start: int,
        reverberant: np.ndarray,
        clean: np.ndarray,
        fingerprint: str,
        labels: list[dict],
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
        group = zarr.open_group(self.url, mode="r", zarr_format=3)
        stop = frame_start + frames
        return group["reverberant"][frame_start:stop], group["clean"][frame_start:stop]

    def write_index(
        self, columns: dict[str, np.ndarray], checksums: list[str], attrs: dict
    ) -> None:
        group = open_store_group(self.url, mode="r+")
        # Both are written anew, so they are removed as files: asking zarr ("index" in group,
        # del group[...]) parses their metadata first and fails on the damaged metadata that a
        # rebuild is meant to replace.
        for name in ("index", "shard_checksums"):
            if self.fs.exists(f"{self.root}/{name}"):
                self.fs.rm(f"{self.root}/{name}", recursive=True)
        index = group.create_group("index")
        for name, values in columns.items():
            values = np.asarray(values)
            dtype = "str" if values.dtype.kind in "UO" else values.dtype
            array = index.create_array(
                name, shape=values.shape, dtype=dtype, chunks=values.shape or (1,)
            )
            array[:] = values
        sums = group.create_array("shard_checksums", shape=(len(checksums),), dtype="str")
        sums[:] = np.asarray(checksums)
        group.attrs.update({**attrs, "complete": True})

    def size_bytes(self) -> int:
        return int(sum(self.fs.du(f"{self.root}/{name}") for name in SIGNALS))
