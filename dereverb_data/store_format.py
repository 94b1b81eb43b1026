"""The dereverb store format, in one place: what a store holds and how it is read.

Everything that knows the layout lives here: the writer (``store.py``), the build's index
(``build.py``), training (``training/data.py``), ``inspect`` and ``verify`` and the tests use it.

- **Arrays** (:data:`SIGNALS`): ``reverberant`` and ``clean``, ``complex64 (frames, freq)`` or
  ``float16 (frames, freq, 2)`` (real, imag), all examples concatenated along time, chunks of
  ``frames_per_chunk`` frames, one zarr shard per ``frames_per_shard`` frames
  (:func:`create_signal_arrays`, :func:`encode`, :func:`decode`).
- **Index** (:data:`INDEX_COLUMNS`): ``index/<column>``, one 1-D array per column, one row per
  example. The columns are the planned ones (:data:`PLANNED_COLUMNS`) and the fields of the
  per-example label record :class:`ExampleLabels` marked for the index. A column added after
  stores were first built has ``since`` set: stores without it still read, as NaN.
- **Checksums** (:data:`CHECKSUMS`): sha256 of each shard's stored data (:func:`shard_checksum`).
- **Attributes**: ``format`` / ``format_version`` (:func:`format_attrs`), the layout
  (:func:`layout_attrs`), and what the build adds (manifest, versions, summary, ``complete``).
- **Reading**: :func:`open_store` returns a :class:`StoreReader` (attributes, index columns in
  memory, example frames read on demand through :class:`ShardReader`).

Everything stays readable with plain ``zarr`` and ``numpy`` (see the README).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from .fsio import url_to_fs
from .stft import StftConfig

FORMAT = "dereverb-store"
# Stores of another version are refused by name (see check_format). Adding an optional index
# column (one with ``since``) does not change the version: older stores read it as NaN.
FORMAT_VERSION = 1
SIGNALS = ("reverberant", "clean")
INDEX_GROUP = "index"
CHECKSUMS = "shard_checksums"
BUILD_DIR = "_build"  # build state (plan, markers, labels, report, RIR bank), not data
MARKER_DIR = f"{BUILD_DIR}/shards"  # a done-marker per shard: <shard id, 6 digits>.json
STORAGE_DTYPES = ("complex64", "float16")
DAMAGED_HINT = "the store's metadata is damaged: build into a new store path"
# Finalizing writes the index and the checksums again from the done-markers and labels, so a
# plain build (which finds every shard done) restores them; --repair needs them to start.
REWRITE_HINT = "`dereverb build MANIFEST --store STORE` (without --repair) writes it again"

# Zarr warns that variable-length strings are not yet in the v3 spec; the index uses them on
# purpose (plain zarr-python reads them) and says so in the README.
warnings.filterwarnings("ignore", message=".*not part in the Zarr format 3 specification.*")
warnings.filterwarnings("ignore", category=UserWarning, module="zarr.core.dtype")


class StoreError(RuntimeError):
    """The store cannot be used for this; the message names it, says why and what to do."""


class StoreReadError(StoreError, ValueError):
    """A store that cannot be read (missing, not a store, another format version, unfinished,
    damaged, no such split). Also a ``ValueError``, which readers raised before."""


def describe_exception(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, shortened: zarr and json errors can span lines, and the
    CLI prints a user error as a single ``error:`` line."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The per-example label record and the index columns
# ---------------------------------------------------------------------------------------------


def _label(*, index: bool = True, since: str | None = None, optional: bool = False) -> Any:
    """A label field: ``index`` (it is an index column), ``since`` (added after stores were
    first built: absent from older stores and labels, read as None/NaN), ``optional`` (None
    when it does not apply, e.g. no noise; not written to the labels file then)."""
    metadata = {"index": index, "since": since, "optional": optional}
    if since is not None or optional:
        return field(default=None, metadata=metadata)
    return field(metadata=metadata)


# kw_only: a new field may go anywhere, with or without a default.
@dataclass(frozen=True, kw_only=True)
class ExampleLabels:
    """What rendering an example measured and decided: one record from ``render_shard_step``
    through the shard's labels file (``_build/labels/``) to the index.

    Adding a label: add a field here (its type sets the index column's dtype: ``str``,
    ``int`` -> int64, ``float`` -> float64 with None as NaN, ``bool``; ``since=`` if stores
    already exist), and compute it in ``render_shard_step``.
    """

    example_id: str = _label(index=False)  # the key that joins it to the planned example
    fingerprint: str = _label(index=False)  # of the example's inputs: unchanged -> reusable
    frame_offset: int = _label(index=False)  # where it was written: moved -> render again
    gain: float = _label()  # level gain applied to the reverberant signal
    clean_gain: float = _label()  # level gain applied to the target
    direct_index: int = _label()  # sample of the RIR's direct-path peak
    gain_limited: bool = _label()  # the gain was lowered to respect peak_limit
    rt60_t20: float = _label()  # measured, s; NaN when the RIR is too short for the fit
    rt60_t30: float = _label()
    drr_db: float = _label()
    c50_db: float = _label()
    c80_db: float | None = _label(since="2026-12")  # measured; NaN in stores built before
    distance_m: float = _label()  # source-microphone distance; NaN for measured RIRs
    simulation: str = _label(index=False)  # how the RIR was made
    snr_db: float | None = _label(since="2026-12")  # of the added noise; None without noise
    augmented: bool | None = _label(index=False, optional=True)  # only with augmentation
    noise: str | None = _label(index=False, optional=True)  # colour or file, only with noise
    noise_gain: float | None = _label(index=False, optional=True)

    def to_json(self) -> dict[str, Any]:
        """The labels file's row: None-valued optional fields are left out (as stores built
        without augmentation or noise always had it)."""
        optional = {f.name for f in dataclasses.fields(self) if f.metadata["optional"]}
        return {
            k: v for k, v in dataclasses.asdict(self).items() if v is not None or k not in optional
        }

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> ExampleLabels:
        """A labels file's row; fields it lacks (written before they existed) are None."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def index_values(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["index"]
        }


@dataclass(frozen=True)
class Column:
    """One index column: its name, stored dtype and, for a column added later, since when."""

    name: str
    dtype: str  # "str", "int64", "float64" or "bool"
    since: str | None = None

    @property
    def optional(self) -> bool:
        return self.since is not None


# Columns from the plan (``plan.Example`` fields, and the room's target RT60).
PLANNED_COLUMNS = (
    Column("example_id", "str"),
    Column("split", "str"),
    Column("utterance_id", "str"),
    Column("speaker", "str"),
    Column("rir_id", "str"),
    Column("room_id", "str"),
    Column("variant", "int64"),
    Column("frame_offset", "int64"),
    Column("frame_count", "int64"),
    Column("num_samples", "int64"),
    Column("shard", "int64"),
    Column("rms_dbfs", "float64"),
    Column("target_rt60", "float64"),  # NaN for measured rooms
)
PLANNED_FROM_EXAMPLE = tuple(c.name for c in PLANNED_COLUMNS if c.name != "target_rt60")

_DTYPES = {str: "str", int: "int64", float: "float64", bool: "bool"}


def _label_columns() -> tuple[Column, ...]:
    hints = typing.get_type_hints(ExampleLabels)
    columns = []
    for f in dataclasses.fields(ExampleLabels):
        if not f.metadata["index"]:
            continue
        kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
        kind = kinds[0] if kinds else hints[f.name]
        columns.append(Column(f.name, _DTYPES[kind], f.metadata["since"]))
    return tuple(columns)


INDEX_COLUMNS: tuple[Column, ...] = (*PLANNED_COLUMNS, *_label_columns())
# Summarised by their distribution over the examples (``inspect``, the build's report and its
# Prefect artifact), after the RT60 (which they give with its own rules): a label listed here
# appears in all three.
SUMMARY_LABELS = ("drr_db", "c50_db", "c80_db", "distance_m")
COLUMNS_BY_NAME = {c.name: c for c in INDEX_COLUMNS}
if len(COLUMNS_BY_NAME) != len(INDEX_COLUMNS):  # a label field named like a planned column
    raise TypeError("an index column is defined twice in store_format")


def index_columns(rows: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Rows (column name -> value, every column of :data:`INDEX_COLUMNS`) -> typed columns.

    None in a float column is NaN (a label that does not apply, such as ``snr_db`` without
    noise, or ``target_rt60`` of a measured room). A missing column is an error, except one
    added later (``since``), which is None as in the stores that predate it.
    """
    values: dict[str, list] = {c.name: [] for c in INDEX_COLUMNS}
    for row in rows:
        for column in INDEX_COLUMNS:
            value = row.get(column.name) if column.optional else row[column.name]
            if value is None and column.dtype == "float64":
                value = np.nan
            values[column.name].append(value)
    return {c.name: np.asarray(values[c.name], dtype=c.dtype) for c in INDEX_COLUMNS}


# ---------------------------------------------------------------------------------------------
# The stored plan (build state): one npz file of columns, written once per build
# ---------------------------------------------------------------------------------------------

PLAN_FILE = f"{BUILD_DIR}/plan.npz"
PLAN_FORMAT = "dereverb-plan"
# A plan file of another version is refused by name; stores whose build is unfinished just
# plan again (a resume writes the file anew), finished stores never need it.
PLAN_FORMAT_VERSION = 1
# Stores built before plans were stored kept only the plan's inputs here.
LEGACY_PLAN_INPUTS = f"{BUILD_DIR}/plan.json"
PLAN_HEADER = "header"  # JSON: format, format_version, plan_id, checksum, manifest
PLAN_META = "meta"  # JSON: the plan's small tables (rooms, RIR specs, utterance strings, ...)
# The columns, by table. ``example_*``: one row per example in store order (``utterance``,
# ``room``, ``rir`` index the utterance, room-id and RIR tables; ``split`` indexes
# manifest.SPLIT_NAMES; NaN ``rms_dbfs`` is none). ``shard_*``: one row per shard (``start``:
# its first example's row). ``rir_*``: one row per RIR id (``base``: the row of the simulated
# or measured spec in the meta's ``base_rirs``; augmented ones add their draw).
# ``utterance_*``: one row per utterance, sorted by id.
PLAN_COLUMNS: dict[str, str] = {
    "example_utterance": "int32",
    "example_variant": "int32",
    "example_split": "int8",
    "example_room": "int32",
    "example_rir": "int32",
    "example_rms_dbfs": "float64",
    "example_num_samples": "int64",
    "example_frame_count": "int64",
    "example_shard": "int64",
    "example_frame_offset": "int64",
    "example_fingerprint": "|S24",
    "shard_start": "int64",
    "shard_fingerprint": "|S24",
    "rir_id": "|S20",
    "rir_base": "int32",
    "rir_augmented": "bool",
    "rir_drr_change_db": "float64",
    "rir_rt60_factor": "float64",
    "rir_bands": "bool",
    "utterance_num_samples": "int64",
    "utterance_source_rate": "int64",
    "utterance_channels": "int64",
}
# Only in plans of manifests with ``noise`` (``source`` -1: no noise for that example).
PLAN_NOISE_COLUMNS: dict[str, str] = {
    "example_noise_source": "int32",
    "example_noise_snr_db": "float64",
    "example_noise_seed": "int64",
    "example_noise_offset": "int64",
}


def plan_checksum(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of a plan's meta (canonical JSON) and every column's name, dtype and bytes."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    dtypes = {**PLAN_COLUMNS, **PLAN_NOISE_COLUMNS}
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name], dtype=dtypes.get(name))
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def write_plan_file(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of :data:`PLAN_FILE`: an uncompressed npz (plain ``numpy.load`` reads it)."""
    expected = dict(PLAN_COLUMNS)
    if any(name in arrays for name in PLAN_NOISE_COLUMNS):
        expected.update(PLAN_NOISE_COLUMNS)
    if set(arrays) != set(expected):
        raise ValueError(f"plan columns {sorted(set(arrays) ^ set(expected))} are not the format's")
    checksum = plan_checksum(meta, arrays)
    header = {
        "format": PLAN_FORMAT,
        "format_version": PLAN_FORMAT_VERSION,
        "plan_id": checksum[:24],
        "checksum": checksum,
        "manifest": meta["manifest"],
    }
    out = io.BytesIO()
    np.savez(
        out,
        **{PLAN_HEADER: _json_bytes(header), PLAN_META: _json_bytes(meta)},
        **{name: np.asarray(arrays[name], dtype=expected[name]) for name in arrays},
    )
    return out.getvalue()


def _json_bytes(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)


def _plan_error(where: str, why: str) -> StoreReadError:
    return StoreReadError(
        f"{where}: the stored plan is unusable ({why}); run the build again, which plans anew"
    )


def read_plan_header(data: bytes | Any, where: str) -> dict[str, Any]:
    """The stored plan's header (format, version, plan id, manifest), checked; ``data`` is
    the file's bytes or a seekable file (only the header is read from it)."""
    try:
        with np.load(io.BytesIO(data) if isinstance(data, bytes) else data) as npz:
            header = json.loads(npz[PLAN_HEADER].tobytes())
    except Exception as exc:  # zipfile, numpy and json each raise their own
        raise _plan_error(where, describe_exception(exc)) from None
    if not isinstance(header, dict) or header.get("format") != PLAN_FORMAT:
        raise _plan_error(where, f"not a {PLAN_FORMAT!r} file")
    if header.get("format_version") != PLAN_FORMAT_VERSION:
        raise StoreReadError(
            f"{where}: a stored plan of format version {header.get('format_version')!r}; this "
            f"code reads version {PLAN_FORMAT_VERSION}: run the build again with this version "
            "(it plans anew and keeps every shard whose examples are unchanged)"
        )
    return header


def read_plan_file(
    data: bytes, where: str, plan_id: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, columns) of a stored plan, checked against its checksum (and ``plan_id``, the
    plan the caller expects); a damaged, foreign or other plan raises one line."""
    header = read_plan_header(data, where)
    if plan_id is not None and header.get("plan_id") != plan_id:
        raise StoreReadError(
            f"{where}: the stored plan is {header.get('plan_id')!r}, not {plan_id!r} that this "
            "build made: another build planned this store since; run the build again"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(npz[PLAN_META].tobytes())
            arrays = {n: npz[n] for n in npz.files if n not in (PLAN_HEADER, PLAN_META)}
    except Exception as exc:
        raise _plan_error(where, describe_exception(exc)) from None
    expected = dict(PLAN_COLUMNS)
    if any(name in arrays for name in PLAN_NOISE_COLUMNS):
        expected.update(PLAN_NOISE_COLUMNS)
    wrong = sorted(
        n
        for n in set(expected) | set(arrays)
        if n not in arrays or n not in expected or arrays[n].dtype != np.dtype(expected[n])
    )
    if wrong:
        raise _plan_error(where, f"columns {', '.join(wrong[:5])} missing or of another type")
    if plan_checksum(meta, arrays) != header.get("checksum"):
        raise _plan_error(where, "its checksum does not match its content")
    return meta, arrays


# ---------------------------------------------------------------------------------------------
# Stored data: encode, decode, checksum, array layout, attributes
# ---------------------------------------------------------------------------------------------


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
    """Stored frames -> complex64 ``(..., n_freq)``: float16 ``(..., 2)`` pairs are joined.

    Assigned part by part rather than computed as ``re + 1j * im``, which would turn an
    infinite imaginary part into a NaN real part.
    """
    if np.iscomplexobj(stored):
        return np.asarray(stored, dtype=np.complex64)
    if stored.shape[-1] != 2:
        raise ValueError(f"real-valued frames must end in a (real, imag) axis, got {stored.shape}")
    out = np.empty(stored.shape[:-1], dtype=np.complex64)
    out.real = stored[..., 0]
    out.imag = stored[..., 1]
    return out


def shard_checksum(reverberant: np.ndarray, clean: np.ndarray) -> str:
    """sha256 of a shard's stored (encoded) data, reverberant bytes then clean."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(reverberant).tobytes())
    digest.update(np.ascontiguousarray(clean).tobytes())
    return digest.hexdigest()


def signal_layout(
    n_frames: int, n_freq: int, storage_dtype: str, frames_per_chunk: int, frames_per_shard: int
) -> dict[str, Any]:
    """Shape, chunks, shards, dtype and dimension names of each signal array."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {storage_dtype!r} is not one of {STORAGE_DTYPES}")
    shape: tuple[int, ...] = (n_frames, n_freq)
    chunks: tuple[int, ...] = (frames_per_chunk, n_freq)
    shards: tuple[int, ...] = (frames_per_shard, n_freq)
    if storage_dtype == "float16":
        shape, chunks, shards = (*shape, 2), (*chunks, 2), (*shards, 2)
    return {
        "shape": shape,
        "chunks": chunks,
        "shards": shards,
        "dtype": storage_dtype,
        "dimension_names": ("frame", "freq", "re_im")[: len(shape)],
    }


def create_signal_arrays(
    group: zarr.Group,
    n_frames: int,
    n_freq: int,
    storage_dtype: str,
    frames_per_chunk: int,
    frames_per_shard: int,
    compressor: str = "zstd",
) -> dict[str, zarr.Array]:
    """Create the empty ``reverberant`` and ``clean`` arrays (fill value 0)."""
    layout = signal_layout(n_frames, n_freq, storage_dtype, frames_per_chunk, frames_per_shard)
    compressors = ZstdCodec(level=1) if compressor == "zstd" else None
    return {
        name: group.create_array(name, fill_value=0, compressors=compressors, **layout)
        for name in SIGNALS
    }


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


def layout_attrs(
    sample_rate: int,
    stft: Mapping[str, Any],
    storage_dtype: str,
    frames_per_chunk: int,
    frames_per_shard: int,
) -> dict[str, Any]:
    """The attributes a build must agree on with an existing store (else it is refused)."""
    return {
        "sample_rate": sample_rate,
        "stft": dict(stft),
        "storage_dtype": storage_dtype,
        "frames_per_chunk": frames_per_chunk,
        "frames_per_shard": frames_per_shard,
    }


def format_attrs() -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION}


def write_index_group(
    group: zarr.Group, columns: Mapping[str, np.ndarray], checksums: Iterable[str]
) -> None:
    """Create ``index/`` and ``shard_checksums`` (which must not exist yet) from typed columns
    (:func:`index_columns`); every column of :data:`INDEX_COLUMNS` with its dtype."""
    lengths = {len(v) for v in columns.values()}
    wrong = [
        c.name
        for c in INDEX_COLUMNS
        if c.name not in columns or np.asarray(columns[c.name]).dtype.kind != np.dtype(c.dtype).kind
    ]
    if wrong or len(lengths) > 1:
        raise ValueError(f"index columns missing, mistyped or of unequal length: {wrong}")
    index = group.create_group(INDEX_GROUP)
    for name, values in columns.items():
        values = np.asarray(values)
        dtype = "str" if values.dtype.kind in "UO" else values.dtype
        array = index.create_array(
            name, shape=values.shape, dtype=dtype, chunks=values.shape or (1,)
        )
        array[:] = values
    checksums = list(checksums)
    sums = group.create_array(CHECKSUMS, shape=(len(checksums),), dtype="str")
    sums[:] = np.asarray(checksums)


# ---------------------------------------------------------------------------------------------
# Opening: one-line errors for missing or damaged metadata
# ---------------------------------------------------------------------------------------------


def open_store_group(url: str, mode: str = "r", **kwargs: Any) -> zarr.Group:
    """The store's root group, or a :class:`StoreReadError` naming what is wrong with it.

    zarr reports a missing or damaged ``zarr.json`` as whatever its parser hit (JSONDecodeError,
    GroupNotFoundError, KeyError, ContainsArrayError, ...), so any failure to open is turned
    into one message; whether the file exists tells "missing" from "damaged".
    ``kwargs`` go to ``zarr.open_group`` (``storage_options``).
    """
    url = url.rstrip("/")
    try:
        # zarr_format=3: the store is zarr v3; without it zarr first looks for v2 metadata
        # (.zgroup, .zattrs, .zmetadata: six requests on an object store, on every open).
        return zarr.open_group(url, mode=mode, zarr_format=3, **kwargs)
    except Exception as exc:
        if "://" not in url and not os.path.exists(url):
            raise StoreReadError(f"{url}: no such store") from exc
        fs, root = url_to_fs(url, **kwargs.get("storage_options", {}))
        if not fs.exists(f"{root}/zarr.json"):
            raise StoreReadError(
                f"{url}: no zarr.json at the store root: not a zarr store, or its root "
                "metadata was deleted"
            ) from exc
        raise StoreReadError(
            f"{url}: the store's root zarr.json is unreadable ({describe_exception(exc)}); "
            "its metadata is damaged: build into a new store path"
        ) from exc


def open_store_node(
    url: str, group: zarr.Group, name: str, hint: str = "", **fs_options: Any
) -> zarr.Array | zarr.Group:
    """``group[name]`` (a path such as ``index/shard``), or a :class:`StoreReadError` saying
    whether its ``zarr.json`` is missing or unreadable; ``hint`` says what to do about it."""
    url = url.rstrip("/")
    try:
        return group[name]
    except Exception as exc:
        fs, root = url_to_fs(url, **fs_options)
        meta = f"{group.path}/{name}".strip("/") + "/zarr.json"
        if not fs.exists(f"{root}/{meta}"):
            problem = f"{name} is missing (no {meta})"
        else:
            problem = f"{meta} is unreadable ({describe_exception(exc)})"
        raise StoreReadError(f"{url}: {problem}{'; ' + hint if hint else ''}") from exc


def open_store_array(
    url: str, group: zarr.Group, name: str, hint: str = "", **fs_options: Any
) -> zarr.Array:
    node = open_store_node(url, group, name, hint, **fs_options)
    if not isinstance(node, zarr.Array):
        raise StoreReadError(f"{url.rstrip('/')}: {name} is a group where an array belongs")
    return node


def read_array(url: str, array: zarr.Array, name: str, hint: str) -> np.ndarray:
    """All of a (small) array, or a :class:`StoreReadError` naming it."""
    try:
        values = np.asarray(array[...])
    except Exception as exc:  # any codec failure: the data cannot be used, whatever raised
        raise StoreReadError(
            f"{url}: {name} is unreadable ({describe_exception(exc)}); {hint}"
        ) from exc
    if values.dtype.kind in "OUST":  # strings come back as object, fixed or variable width
        return np.asarray(values.tolist(), dtype=str)  # plain '<U' whatever zarr returned
    return values


def check_format(url: str, attrs: Mapping[str, Any]) -> None:
    """Refuse what is not a dereverb store of this format version, in one line."""
    if attrs.get("format") != FORMAT:
        raise StoreReadError(
            f"{url}: not a {FORMAT!r} store (format attribute {attrs.get('format')!r})"
        )
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreReadError(
            f"{url}: a {FORMAT!r} store of format version {attrs.get('format_version')!r}; "
            f"this code reads version {FORMAT_VERSION}: build it again with this version"
        )


def read_index(
    url: str, group: zarr.Group, hint: str = REWRITE_HINT, **fs_options: Any
) -> dict[str, np.ndarray]:
    """Every index column (strings as ``<U``), or a :class:`StoreReadError` naming the first
    missing or unreadable one. Columns added later (``since``) that the store predates are NaN;
    columns the schema does not know are read as they are."""
    index = open_store_node(url, group, INDEX_GROUP, hint, **fs_options)
    present = set(index.array_keys())
    columns: dict[str, np.ndarray] = {}
    for column in INDEX_COLUMNS:
        path = f"{INDEX_GROUP}/{column.name}"
        if column.optional and column.name not in present:
            continue  # filled below, once the length is known
        array = open_store_array(url, group, path, hint, **fs_options)
        columns[column.name] = read_array(url, array, path, hint)
    for name in sorted(present - COLUMNS_BY_NAME.keys()):
        path = f"{INDEX_GROUP}/{name}"
        array = open_store_array(url, group, path, hint, **fs_options)
        columns[name] = read_array(url, array, path, hint)
    n = len(columns["example_id"])
    for column in INDEX_COLUMNS:
        if column.name not in columns:
            columns[column.name] = np.full(n, np.nan)
    return columns


# ---------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------


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

    It understands the layout :func:`create_signal_arrays` writes (index at the end,
    little-endian ``bytes`` + ``crc32c`` index codecs, ``bytes`` and optionally ``zstd``
    inside, one chunk across the trailing dimensions); :meth:`for_array` returns None for
    anything else, and :meth:`read` returns None for what it does not handle (a range across
    shards, an index that fails its checksum), so the caller reads through zarr, which is also
    the authority on damaged data. The kept indexes assume the store does not change while it
    is read, as the index columns held in memory do.
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


@dataclass
class StoreReader:
    """Read-only view of a store: attributes, the index columns in memory, the signal arrays
    on disk (or in an object store), read one slice at a time (:meth:`read`).

    ``index`` is None for a store opened with ``require_complete=False`` before its first
    build finished (no index yet).
    """

    url: str
    attrs: dict[str, Any]
    index: dict[str, np.ndarray] | None
    arrays: dict[str, zarr.Array] = field(repr=False)
    # Per signal, its ShardReader (None: read through zarr). See ShardReader for why.
    readers: dict[str, ShardReader | None] = field(default_factory=dict, repr=False)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", True))

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """The index columns; a :class:`StoreReadError` when the store has no index yet."""
        if self.index is None:
            raise StoreReadError(
                f"{self.url}: no index; the build has not finished (run dereverb build again)"
            )
        return self.index

    @property
    def n_examples(self) -> int:
        return int(self.columns["frame_offset"].shape[0])

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
        rows = np.flatnonzero(self.columns["split"] == split)
        if rows.size == 0:
            splits = sorted(set(self.columns["split"].tolist()))
            raise StoreReadError(
                f"{self.url}: no examples in split {split!r}; the store has {splits}"
            )
        return rows

    def read_stored(self, name: str, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` of ``name`` as stored (not decoded), in one read."""
        reader = self.readers.get(name)
        frames = reader.read(start, stop) if reader is not None else None
        return self.arrays[name][start:stop] if frames is None else frames

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` of ``name`` as complex64 ``(frames, n_freq)``, in one read."""
        return decode(self.read_stored(name, start, stop))

    def example(self, row: int) -> dict[str, np.ndarray]:
        """Example ``row`` whole: ``reverberant``, ``clean`` complex64 ``(frame_count, n_freq)``."""
        start = int(self.columns["frame_offset"][row])
        stop = start + int(self.columns["frame_count"][row])
        return {name: self.read(name, start, stop) for name in SIGNALS}

    def reopened(self) -> StoreReader:
        """The same store opened again (in another process) with what was read here."""
        return reopen_store(self.url, self.storage_options, self.attrs, self.index)


def reopen_store(
    url: str,
    storage_options: Mapping[str, Any] | None,
    attrs: dict[str, Any],
    index: dict[str, np.ndarray] | None,
) -> StoreReader:
    """A store another process opened and checked (``attrs``, ``index`` from its reader), opened
    here by its arrays only. For a loader worker: open handles (zarr's and fsspec's event loops,
    connections) do not survive a fork or a pickle, and on an object store reading the index
    again costs three requests per column (about 110 for the demo store) per worker."""
    options = dict(storage_options) if storage_options else None
    kwargs = {"storage_options": options} if options else {}
    group = zarr.open_group(url, mode="r", zarr_format=3, **kwargs)
    arrays = {name: group[name] for name in SIGNALS}
    return StoreReader(url, attrs, index, arrays, _shard_readers(url, options, arrays), options)


def open_store(
    url: str | os.PathLike,
    storage_options: Mapping[str, Any] | None = None,
    *,
    require_complete: bool = True,
) -> StoreReader:
    """Open a store read-only and read its index columns into numpy.

    ``url`` is a local path or any URL fsspec understands (``s3://...`` with
    ``storage_options``). Anything that is not a finished store of this format version raises
    a one-line :class:`StoreReadError`; with ``require_complete=False`` an unfinished one opens
    too (``index`` None when it has none yet).
    """
    url = os.fspath(url).rstrip("/")
    options = dict(storage_options) if storage_options else None
    kwargs = {"storage_options": options} if options else {}
    fs_options = options or {}
    group = open_store_group(url, mode="r", **kwargs)
    attrs = dict(group.attrs)
    check_format(url, attrs)
    if require_complete and attrs.get("complete") is False:
        raise StoreReadError(
            f"{url}: the store is not finished (complete: false); build it to the end first"
        )
    lacking = [key for key in ("sample_rate", "stft", "storage_dtype") if key not in attrs]
    if lacking:
        raise StoreReadError(
            f"{url}: the root zarr.json lacks the attributes {', '.join(lacking)}; {DAMAGED_HINT}"
        )
    arrays = {
        name: open_store_array(url, group, name, DAMAGED_HINT, **fs_options) for name in SIGNALS
    }
    if arrays["reverberant"].shape != arrays["clean"].shape:
        raise StoreReadError(
            f"{url}: reverberant {arrays['reverberant'].shape} and clean "
            f"{arrays['clean'].shape} differ; {DAMAGED_HINT}"
        )
    index = None
    # A store that says it is complete must have an index; an unfinished one may have none yet.
    if require_complete or attrs.get("complete") is not False or _has_index(url, fs_options):
        index = read_index(url, group, **fs_options)
    return StoreReader(url, attrs, index, arrays, _shard_readers(url, options, arrays), options)


def _has_index(url: str, fs_options: Mapping[str, Any]) -> bool:
    # The file, not zarr: asking the group parses the index's metadata, which may be damaged.
    fs, root = url_to_fs(url, **fs_options)
    return fs.exists(f"{root}/{INDEX_GROUP}/zarr.json")


def _shard_readers(
    url: str, storage_options: Mapping[str, Any] | None, arrays: Mapping[str, zarr.Array]
) -> dict[str, ShardReader | None]:
    # The readers use their own fsspec filesystem (zarr's is asynchronous, and zarr opens local
    # paths without fsspec); credentials and endpoints come from the same options.
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return {name: ShardReader.for_array(fs, root, arrays[name]) for name in SIGNALS}
