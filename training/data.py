"""Reading a dereverberation store for training: crops, whole examples and spectral features.

The store (written by ``dereverb_data``) is a zarr v3 group with two time-major STFT arrays,
``reverberant`` and ``clean``, of shape ``(n_frames_total, n_freq)`` complex64 (or
``(n_frames_total, n_freq, 2)`` float16 real/imag pairs), and an ``index/`` group with one row
per example. Example ``i`` occupies frames ``[frame_offset[i], frame_offset[i] + frame_count[i])``.

What lives here, top to bottom:

- :func:`open_store`: read-only view of a store; the index is read into numpy, the two big
  arrays stay on disk (or in an object store) and are read one slice at a time
  (:meth:`DereverbStore.read`), through :class:`ShardReader`: one ranged read per slice.
- :func:`sample_crop`: the pure function that decides which frames sample ``i`` of a run
  uses, from ``(seed, i)`` alone.
- :class:`CropDataset` + :class:`StepSampler` + :func:`crop_loader`: random fixed-length
  crops for training; :class:`ValidationDataset`: whole examples for validation.
- Spectral transforms on torch tensors: power-law compression, log magnitude, and the torch
  STFT/iSTFT with the project convention (``dereverb_data.stft``).

Why a map-style dataset and not an ``IterableDataset``: the crop of training sample ``i`` is a
pure function of ``(seed, i)`` (:func:`sample_crop`), and the batch of step ``s`` is samples
``s * batch_size ... (s + 1) * batch_size - 1`` (:class:`StepSampler`). The DataLoader returns
batches in sampler order whatever the number of workers, so 0 and 2 workers give identical
batches, and a resumed run only has to start the sampler at its step: no iterator state to
save. An ``IterableDataset`` would have to shard its stream across workers by hand and carry
its position in the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import google_crc32c
import numcodecs
import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, Sampler
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from dereverb_data.stft import StftConfig
from dereverb_data.store import StoreError

STORE_FORMAT = "dereverb-store"
STORE_FORMAT_VERSION = 1
SIGNALS = ("reverberant", "clean")
# Index columns the training code reads (crops, validation, evaluation).
INDEX_COLUMNS = ("example_id", "split", "frame_offset", "frame_count", "num_samples")


class TrainingStoreError(StoreError, ValueError):
    """A store that cannot be read for training; the message names it and says why.

    A ``StoreError`` (the CLI's user-error class for stores) and, as before, a ``ValueError``.
    """


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def decode_frames(raw: np.ndarray) -> np.ndarray:
    """Stored frames -> complex64 ``(..., n_freq)``: float16 ``(..., 2)`` pairs are joined."""
    if np.iscomplexobj(raw):
        return np.asarray(raw, dtype=np.complex64)
    if raw.shape[-1] != 2:
        raise ValueError(f"real-valued frames must end in a (real, imag) axis, got {raw.shape}")
    out = np.empty(raw.shape[:-1], dtype=np.complex64)
    out.real = raw[..., 0]
    out.imag = raw[..., 1]
    return out


_EMPTY_CHUNK = np.uint64(2**64 - 1)  # a shard index entry for a chunk that was never written
# Chunks of one read are fetched in one request when the bytes between them (other chunks of
# the shard, in an unusual chunk order) waste less than this; otherwise one request each.
_MAX_WASTED_BYTES = 1 << 20


class ShardReader:
    """Frame ranges of one zarr v3 sharded array, each in one ranged read, for a reader that
    keeps the store open (a training loader worker).

    zarr reads a slice of a shard as: the shard's index (a ranged GET of its last bytes), then
    one ranged GET per chunk, one after the other. On local disk that costs little; on an
    object store each is a round trip (2.5 requests per signal per crop for the demo store's
    192-frame crops and 256-frame chunks). Here each shard's index is read once and kept (a
    few hundred bytes per shard), and the chunks of a read, which lie side by side in the shard,
    come in one ranged GET: one request per signal per crop once the indexes are known.

    It understands the layout ``dereverb_data.store`` writes (index at the end, little-endian
    ``bytes`` + ``crc32c`` index codecs, ``bytes`` and optionally ``zstd`` inside, one chunk
    across the trailing dimensions); :meth:`for_array` returns None for anything else, and
    :meth:`read` returns None for what it does not handle (a range across shards, an index
    that fails its checksum), so the caller reads through zarr, which is also the authority
    on damaged data. The kept indexes assume the store does not change while it is read, as
    the index columns held in memory do.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        array_root: str,
        array: zarr.Array,
        sharding: ShardingCodec,
        zstd: ZstdCodec | None,
    ) -> None:
        self.fs = fs
        self.array_root = array_root
        self.metadata = array.metadata
        self.shape = tuple(array.shape)
        self.chunk_frames = int(sharding.chunk_shape[0])
        self.chunk_shape = tuple(int(n) for n in sharding.chunk_shape)
        self.shard_frames = int(array.shards[0])  # type: ignore[index]
        self.chunks_per_shard = self.shard_frames // self.chunk_frames
        self.index_bytes = 16 * self.chunks_per_shard + 4  # (offset, length) uint64s + crc32c
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill_value = array.fill_value
        self.zstd = (
            numcodecs.Zstd.from_config({"level": zstd.level, "checksum": zstd.checksum})
            if zstd is not None
            else None
        )
        self._indexes: dict[int, np.ndarray | None] = {}

    @classmethod
    def for_array(
        cls, fs: fsspec.AbstractFileSystem, store_root: str, array: zarr.Array
    ) -> ShardReader | None:
        """A reader for ``array`` (stored under ``store_root``), or None if its layout is not
        one this class reads."""
        metadata = array.metadata
        codecs = getattr(metadata, "codecs", ())
        if getattr(metadata, "zarr_format", None) != 3 or len(codecs) != 1:
            return None
        sharding = codecs[0]
        if not isinstance(sharding, ShardingCodec) or array.shards is None:
            return None
        little = ("little", None)  # endian None: one-byte types
        index_ok = (
            sharding.index_location == ShardingCodecIndexLocation.end
            and len(sharding.index_codecs) == 2
            and isinstance(sharding.index_codecs[0], BytesCodec)
            and getattr(sharding.index_codecs[0].endian, "value", None) == "little"
            and isinstance(sharding.index_codecs[1], Crc32cCodec)
        )
        inner = sharding.codecs
        inner_ok = (
            1 <= len(inner) <= 2
            and isinstance(inner[0], BytesCodec)
            and getattr(inner[0].endian, "value", inner[0].endian) in little
            and (len(inner) == 1 or isinstance(inner[1], ZstdCodec))
        )
        chunk, shard, shape = sharding.chunk_shape, array.shards, array.shape
        layout_ok = (
            len(chunk) == len(shard) == len(shape)
            and shard[0] % chunk[0] == 0
            and tuple(chunk[1:]) == tuple(shard[1:]) == tuple(shape[1:])
            and np.dtype(array.dtype).kind in "biufc"
        )
        if not (index_ok and inner_ok and layout_ok):
            return None
        zstd = inner[1] if len(inner) == 2 else None
        return cls(fs, f"{store_root}/{array.path}", array, sharding, zstd)  # type: ignore[arg-type]

    def _shard_path(self, shard_row: int) -> str:
        key = self.metadata.encode_chunk_key((shard_row, *([0] * (len(self.shape) - 1))))
        return f"{self.array_root}/{key}"

    def _index(self, shard_row: int) -> np.ndarray | None:
        """Shard ``shard_row``'s ``(offset, length)`` per chunk; None when the shard object does
        not exist (zarr reads it as fill value). Raises ValueError for a damaged index."""
        if shard_row not in self._indexes:
            try:
                raw = self.fs.cat_file(self._shard_path(shard_row), start=-self.index_bytes)
            except FileNotFoundError:
                self._indexes[shard_row] = None
                return None
            body, crc = raw[:-4], raw[-4:]
            if len(raw) != self.index_bytes or google_crc32c.value(body) != int.from_bytes(
                crc, "little"
            ):
                raise ValueError(f"shard {shard_row}: shard index fails its checksum")
            self._indexes[shard_row] = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
        return self._indexes[shard_row]

    def _decode(self, raw: bytes) -> np.ndarray:
        if self.zstd is not None:
            raw = self.zstd.decode(raw)
        chunk = np.frombuffer(raw, dtype=self.dtype)
        if chunk.size != int(np.prod(self.chunk_shape)):
            raise ValueError(f"a chunk decodes to {chunk.size} values, not {self.chunk_shape}")
        return chunk.reshape(self.chunk_shape)

    def read(self, start: int, stop: int) -> np.ndarray | None:
        """Frames ``[start, stop)`` as stored (the array's dtype), or None when the caller should
        read them through zarr instead."""
        shard_row = start // self.shard_frames
        if not 0 <= start < stop <= self.shape[0] or (stop - 1) // self.shard_frames != shard_row:
            return None
        try:
            index = self._index(shard_row)
        except ValueError:
            return None  # zarr reads it again and reports the damage its own way
        out = np.full((stop - start, *self.shape[1:]), self.fill_value, dtype=self.dtype)
        if index is None:
            return out
        base = shard_row * self.shard_frames
        first = (start - base) // self.chunk_frames
        last = (stop - 1 - base) // self.chunk_frames
        chunks = [k for k in range(first, last + 1) if index[k, 0] != _EMPTY_CHUNK]
        if not chunks:
            return out
        offsets = [int(index[k, 0]) for k in chunks]
        lengths = [int(index[k, 1]) for k in chunks]
        lo = min(offsets)
        hi = max(o + n for o, n in zip(offsets, lengths, strict=True))
        path = self._shard_path(shard_row)
        if hi - lo - sum(lengths) <= _MAX_WASTED_BYTES:
            blob = self.fs.cat_file(path, start=lo, end=hi)
            pieces = [blob[o - lo : o - lo + n] for o, n in zip(offsets, lengths, strict=True)]
        else:
            ends = [o + n for o, n in zip(offsets, lengths, strict=True)]
            pieces = self.fs.cat_ranges([path] * len(chunks), offsets, ends)
        try:
            for k, piece in zip(chunks, pieces, strict=True):
                chunk = self._decode(piece)
                chunk_start = base + k * self.chunk_frames
                a, b = max(start, chunk_start), min(stop, chunk_start + self.chunk_frames)
                out[a - start : b - start] = chunk[a - chunk_start : b - chunk_start]
        except (ValueError, RuntimeError):  # numcodecs raises RuntimeError on bad zstd data
            return None
        return out


def _column(array: Any) -> np.ndarray:
    values = np.asarray(array[...])
    if values.dtype.kind in "OUST":  # strings come back as object, fixed or variable width
        return np.asarray(values.tolist(), dtype=str)  # plain '<U' whatever zarr returned
    return values


@dataclass
class DereverbStore:
    """Read-only view of a store: attributes, the index in memory, the STFT arrays on disk."""

    url: str
    attrs: dict[str, Any]
    index: dict[str, np.ndarray]
    arrays: dict[str, Any] = field(repr=False)
    # Per signal, its ShardReader (None: read through zarr). See ShardReader for why.
    readers: dict[str, ShardReader | None] = field(default_factory=dict, repr=False)

    @property
    def n_examples(self) -> int:
        return int(self.index["frame_offset"].shape[0])

    @property
    def n_freq(self) -> int:
        return int(self.arrays["clean"].shape[1])

    @property
    def sample_rate(self) -> int:
        return int(self.attrs["sample_rate"])

    @property
    def stft_config(self) -> StftConfig:
        stft = self.attrs["stft"]
        return StftConfig(n_fft=int(stft["n_fft"]), hop=int(stft["hop"]), window=stft["window"])

    def rows(self, split: str) -> np.ndarray:
        """Index rows (int64, ascending) of the examples in ``split``."""
        rows = np.flatnonzero(self.index["split"] == split)
        if rows.size == 0:
            splits = sorted(set(self.index["split"].tolist()))
            raise TrainingStoreError(
                f"{self.url}: no examples in split {split!r}; the store has {splits}"
            )
        return rows

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` of ``name`` as complex64 ``(frames, n_freq)``, in one read."""
        reader = self.readers.get(name)
        frames = reader.read(start, stop) if reader is not None else None
        if frames is None:
            frames = self.arrays[name][start:stop]
        return decode_frames(frames)

    def example(self, row: int) -> dict[str, np.ndarray]:
        """Example ``row`` whole: ``reverberant``, ``clean`` complex64 ``(frame_count, n_freq)``."""
        start = int(self.index["frame_offset"][row])
        stop = start + int(self.index["frame_count"][row])
        return {name: self.read(name, start, stop) for name in SIGNALS}


def open_store(
    url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
) -> DereverbStore:
    """Open a store read-only with plain zarr and read its index columns into numpy.

    ``url`` is a local path or any URL zarr understands (``s3://...`` with ``storage_options``).
    """
    url = os.fspath(url)
    kwargs = {"storage_options": dict(storage_options)} if storage_options else {}
    try:
        group = zarr.open_group(url, mode="r", **kwargs)
    except (OSError, ValueError) as exc:  # zarr's not-found and bad-metadata errors are both
        if "://" not in url and not os.path.exists(url):
            raise TrainingStoreError(f"{url}: no such store") from None
        raise TrainingStoreError(f"{url}: not a zarr store ({_one_line(exc)})") from None
    attrs = dict(group.attrs)
    if attrs.get("format") != STORE_FORMAT or attrs.get("format_version") != STORE_FORMAT_VERSION:
        raise TrainingStoreError(
            f"{url} is not a {STORE_FORMAT!r} store of version {STORE_FORMAT_VERSION} "
            f"(format={attrs.get('format')!r}, version={attrs.get('format_version')!r})"
        )
    if attrs.get("complete") is False or "index" not in group:
        raise TrainingStoreError(
            f"{url}: the store is not finished (complete: false or no index yet); "
            "build it to the end first"
        )
    missing = [key for key in ("sample_rate", "stft") if key not in attrs]
    missing += [name for name in SIGNALS if name not in group]
    if missing:
        raise TrainingStoreError(f"{url}: damaged store (missing {', '.join(missing)})")
    index_group = group["index"]
    index = {name: _column(array) for name, array in index_group.arrays()}
    missing = [name for name in INDEX_COLUMNS if name not in index]
    if missing:
        raise TrainingStoreError(f"{url}: damaged store (index lacks {', '.join(missing)})")
    arrays = {name: group[name] for name in SIGNALS}
    if arrays["reverberant"].shape != arrays["clean"].shape:
        raise TrainingStoreError(
            f"{url}: reverberant {arrays['reverberant'].shape} and clean "
            f"{arrays['clean'].shape} differ"
        )
    return DereverbStore(
        url=url,
        attrs=attrs,
        index=index,
        arrays=arrays,
        readers=_shard_readers(url, storage_options, arrays),
    )


def _shard_readers(
    url: str, storage_options: Mapping[str, Any] | None, arrays: dict[str, Any]
) -> dict[str, ShardReader | None]:
    # The readers use their own fsspec filesystem (zarr's is asynchronous, and zarr opens local
    # paths without fsspec); credentials and endpoints come from the same options.
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return {name: ShardReader.for_array(fs, root, arrays[name]) for name in SIGNALS}


def _reopen(
    url: str,
    storage_options: Mapping[str, Any] | None,
    attrs: dict[str, Any],
    index: dict[str, np.ndarray],
) -> DereverbStore:
    """The store in another process (a loader worker) from the attributes and index another
    process read and checked: only the two arrays are opened. On an object store reading the
    index again costs three requests per column (about 110 for the demo store) per worker."""
    kwargs = {"storage_options": dict(storage_options)} if storage_options else {}
    # zarr_format=3: dereverb stores are zarr v3; asking saves looking for v2 metadata first.
    group = zarr.open_group(url, mode="r", zarr_format=3, **kwargs)
    arrays = {name: group[name] for name in SIGNALS}
    readers = _shard_readers(url, storage_options, arrays)
    return DereverbStore(url=url, attrs=attrs, index=index, arrays=arrays, readers=readers)


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_INHERITED: list[DereverbStore] = []  # see _LazyStore.store


class _LazyStore:
    """Holds a store URL and opens the store on first use in each process (never pickled open).

    The attributes and index read by the first process travel to the others (forked loader
    workers inherit them; pickled copies carry them), which then open only the arrays: the
    arrays' open handles (zarr's and fsspec's event loops, connections) do not survive a fork
    or a pickle, the index in memory does.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options) if storage_options else None
        self._store: DereverbStore | None = None
        self._pid: int | None = None
        self._known: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None

    @property
    def store(self) -> DereverbStore:
        if self._store is None or self._pid != os.getpid():
            if self._store is not None:  # opened by the process this one forked from
                self._known = (self._store.attrs, self._store.index)
                # Its handles belong to that process: collected here, an object store's HTTP
                # sessions would complain on stderr that they were never closed (and closing
                # them here could shut connections the parent still uses). Kept until exit.
                _INHERITED.append(self._store)
            if self._known is None:
                self._store = open_store(self.url, self.storage_options)
            else:
                self._store = _reopen(self.url, self.storage_options, *self._known)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._store is not None:
            state["_known"] = (self._store.attrs, self._store.index)
        state["_store"] = None
        state["_pid"] = None
        return state


# ---------------------------------------------------------------------------------------------
# Training crops
# ---------------------------------------------------------------------------------------------


def sample_crop(
    frame_counts: np.ndarray, crop_frames: int, seed: int, index: int
) -> tuple[int, int, int]:
    """Which frames sample ``index`` of a run with ``seed`` uses: ``(example, first, length)``.

    The example is drawn with probability proportional to its frame count (every frame of the
    split equally likely to be seen), then a start uniformly among the positions where the crop
    fits inside the example. ``first`` is relative to the example's first frame; ``length`` is
    ``min(crop_frames, frame_count)`` (shorter examples are taken whole and padded by the caller).
    A pure function of its arguments: no global random state.
    """
    rng = np.random.default_rng([seed, index])
    cumulative = np.cumsum(frame_counts)
    example = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    count = int(frame_counts[example])
    length = min(crop_frames, count)
    first = int(rng.integers(0, count - length + 1))
    return example, first, length


class CropDataset(Dataset):
    """Random fixed-length crops of paired (reverberant, clean) STFTs from one split.

    Item ``i`` is a dict of ``reverberant`` and ``clean`` (complex64 ``(crop_frames, n_freq)``),
    ``mask`` (bool ``(crop_frames,)``, False on zero padding after a short example) and ``row``,
    ``start`` (where the crop came from). Crops never straddle two examples, each signal is one
    slice read, and the store is opened lazily in each process (workers included).
    """

    def __init__(
        self,
        url: str | os.PathLike,
        split: str = "train",
        crop_frames: int = 256,
        seed: int = 0,
        storage_options: Mapping[str, Any] | None = None,
    ):
        if crop_frames < 1:
            raise ValueError(f"crop_frames must be positive, got {crop_frames}")
        self._lazy = _LazyStore(os.fspath(url), storage_options)
        store = self._lazy.store
        self.split = split
        self.crop_frames = int(crop_frames)
        self.seed = int(seed)
        self.n_freq = store.n_freq
        self.rows = store.rows(split)
        self.frame_offsets = store.index["frame_offset"][self.rows].astype(np.int64)
        self.frame_counts = store.index["frame_count"][self.rows].astype(np.int64)
        if np.any(self.frame_counts < 1):
            raise ValueError(f"split {split!r} has examples with no frames")

    def crop(self, index: int) -> tuple[int, int, int]:
        """``(row, start, length)`` of sample ``index``: store row and absolute frame range."""
        example, first, length = sample_crop(self.frame_counts, self.crop_frames, self.seed, index)
        return int(self.rows[example]), int(self.frame_offsets[example]) + first, length

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, start, length = self.crop(index)
        store = self._lazy.store
        item: dict[str, Any] = {"row": row, "start": start}
        for name in SIGNALS:
            frames = np.zeros((self.crop_frames, self.n_freq), dtype=np.complex64)
            frames[:length] = store.read(name, start, start + length)
            item[name] = torch.from_numpy(frames)
        mask = torch.zeros(self.crop_frames, dtype=torch.bool)
        mask[:length] = True
        item["mask"] = mask
        return item


class StepSampler(Sampler[int]):
    """Sample numbers of steps ``[start_step, stop_step)``; step ``s`` is ``s*B .. s*B + B - 1``."""

    def __init__(self, batch_size: int, start_step: int, stop_step: int):
        self.batch_size = int(batch_size)
        self.start_step = int(start_step)
        self.stop_step = max(int(stop_step), self.start_step)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start_step * self.batch_size, self.stop_step * self.batch_size))

    def __len__(self) -> int:
        return (self.stop_step - self.start_step) * self.batch_size


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers share the cores with the training process


def crop_loader(
    dataset: CropDataset,
    batch_size: int,
    start_step: int,
    stop_step: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader whose ``k``-th batch is the batch of step ``start_step + k``, any worker count."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=StepSampler(batch_size, start_step, stop_step),
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        # Workers draw their base seed from this generator, not from torch's global RNG, so
        # creating a loader does not change the model's random stream (dropout) across resumes.
        generator=torch.Generator().manual_seed(dataset.seed),
    )


class ValidationDataset(Dataset):
    """Whole examples of a split (``max_examples`` evenly spaced ones, in store order):
    ``reverberant``, ``clean`` (complex64 ``(frame_count, n_freq)``), ``num_samples``,
    ``example_id``, ``row``."""

    def __init__(
        self,
        url: str | os.PathLike,
        split: str = "valid",
        max_examples: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ):
        self._lazy = _LazyStore(os.fspath(url), storage_options)
        rows = self._lazy.store.rows(split)
        self.split = split
        if max_examples is not None and max_examples < rows.size:
            # Spread over the split: the store keeps a room's examples together, so the first
            # few would all come from one room.
            rows = rows[np.unique(np.linspace(0, rows.size - 1, max_examples).round().astype(int))]
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        store = self._lazy.store
        row = int(self.rows[index])
        example = store.example(row)
        return {
            "reverberant": torch.from_numpy(example["reverberant"]),
            "clean": torch.from_numpy(example["clean"]),
            "num_samples": int(store.index["num_samples"][row]),
            "example_id": str(store.index["example_id"][row]),
            "row": row,
        }


# ---------------------------------------------------------------------------------------------
# Spectral transforms (pure torch functions; complex (..., T, F) in)
# ---------------------------------------------------------------------------------------------

FEATURE_CHANNELS = {"compressed_magnitude": 1, "compressed_complex": 2, "log_magnitude": 1}
COMPRESS_EXPONENT = 0.3
_EPS = 1e-8  # keeps |X|^c differentiable at X = 0


def compressed_magnitude(
    spec: torch.Tensor, exponent: float = COMPRESS_EXPONENT, eps: float = _EPS
) -> torch.Tensor:
    """``|X|^c`` (real), with ``|X|`` smoothed by ``eps`` so the gradient stays finite at 0."""
    power = spec.real.square() + spec.imag.square()
    return (power + eps) ** (exponent / 2)


def compress_complex(
    spec: torch.Tensor, exponent: float = COMPRESS_EXPONENT, eps: float = _EPS
) -> torch.Tensor:
    """``|X|^c * exp(j angle X)`` (complex)."""
    power = spec.real.square() + spec.imag.square()
    return spec * (power + eps) ** ((exponent - 1) / 2)


def decompress_complex(
    spec: torch.Tensor, exponent: float = COMPRESS_EXPONENT, eps: float = _EPS
) -> torch.Tensor:
    """Inverse of :func:`compress_complex`: ``|Y|^(1/c) * exp(j angle Y)``."""
    power = spec.real.square() + spec.imag.square()
    return spec * (power + eps) ** ((1 / exponent - 1) / 2)


def log_magnitude(spec: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(|X| + eps)`` (natural log)."""
    return torch.log(spec.abs() + eps)


def spec_features(
    spec: torch.Tensor, kind: str, exponent: float = COMPRESS_EXPONENT
) -> torch.Tensor:
    """Network input from a complex ``(B, T, F)`` STFT: float ``(B, C, T, F)``.

    ``compressed_magnitude`` (C=1), ``compressed_complex`` (C=2: real, imag), ``log_magnitude``
    (C=1). See ``FEATURE_CHANNELS``.
    """
    if kind == "compressed_magnitude":
        return compressed_magnitude(spec, exponent).unsqueeze(1)
    if kind == "compressed_complex":
        return torch.view_as_real(compress_complex(spec, exponent)).permute(0, 3, 1, 2)
    if kind == "log_magnitude":
        return log_magnitude(spec).unsqueeze(1)
    raise ValueError(f"unknown features {kind!r}; choose one of {sorted(FEATURE_CHANNELS)}")


def stft_window(config: StftConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The analysis window of ``config`` as a float32 tensor (periodic Hann or its square root)."""
    window = torch.hann_window(config.n_fft, periodic=True, device=device)
    if config.window == "sqrt-hann":
        return window.sqrt()
    if config.window != "hann":
        raise ValueError(f"unknown STFT window {config.window!r}")
    return window


def torch_stft(signal: torch.Tensor, config: StftConfig) -> torch.Tensor:
    """STFT of ``(..., n_samples)`` float signals: complex ``(..., n_frames, n_freq)``.

    Same numbers as ``dereverb_data.stft.stft`` (center=True, zero padding, no normalisation).
    """
    shape = signal.shape
    spec = torch.stft(
        signal.reshape(-1, shape[-1]),
        config.n_fft,
        config.hop,
        window=stft_window(config, signal.device),
        center=True,
        pad_mode="constant",
        return_complex=True,
    )
    return spec.transpose(-1, -2).reshape(*shape[:-1], spec.shape[-1], spec.shape[-2])


def torch_istft(spec: torch.Tensor, config: StftConfig, length: int) -> torch.Tensor:
    """Inverse of :func:`torch_stft` for complex ``(..., T, F)``: float ``(..., length)``."""
    shape = spec.shape
    flat = spec.reshape(-1, shape[-2], shape[-1]).transpose(-1, -2)
    wave = torch.istft(
        flat,
        config.n_fft,
        config.hop,
        window=stft_window(config, spec.device),
        center=True,
        length=length,
    )
    return wave.reshape(*shape[:-2], length)
