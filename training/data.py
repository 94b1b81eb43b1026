"""Reading a dereverberation store for training: crops, whole examples and spectral features.

The store (written by ``dereverb_data``) is a zarr v3 group with two time-major STFT arrays,
``reverberant`` and ``clean``, of shape ``(n_frames_total, n_freq)`` complex64 (or
``(n_frames_total, n_freq, 2)`` float16 real/imag pairs), and an ``index/`` group with one row
per example. Example ``i`` occupies frames ``[frame_offset[i], frame_offset[i] + frame_count[i])``.

What lives here, top to bottom:

- The store itself is opened with ``dereverb_data.store_format.open_store`` (the format's one
  reader, :class:`~dereverb_data.store_format.StoreReader`): the index is read into numpy, the
  two big arrays stay on disk (or in an object store) and are read one slice at a time.
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
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dereverb_data.stft import StftConfig
from dereverb_data.store_format import SIGNALS, StoreReader, open_store, reopen_store

_INHERITED: list[StoreReader] = []  # see _LazyStore.store


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
        self._store: StoreReader | None = None
        self._pid: int | None = None
        self._known: tuple[dict[str, Any], dict[str, np.ndarray] | None] | None = None

    @property
    def store(self) -> StoreReader:
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
                self._store = reopen_store(self.url, self.storage_options, *self._known)
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
        self.frame_offsets = store.columns["frame_offset"][self.rows].astype(np.int64)
        self.frame_counts = store.columns["frame_count"][self.rows].astype(np.int64)
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
            "num_samples": int(store.columns["num_samples"][row]),
            "example_id": str(store.columns["example_id"][row]),
            "row": row,
        }


# ---------------------------------------------------------------------------------------------
# Spectral transforms (pure torch functions; complex (..., T, F) in)
# ---------------------------------------------------------------------------------------------

FEATURE_CHANNELS = {
    "compressed_magnitude": 1,
    "compressed_complex": 2,
    "log_magnitude": 1,
    # The plain |X| and an 8-bit colour image of the log spectrogram: the two ends of the
    # feature ablation (issue 13, item 5; benchmarks/feature_ablation.py).
    "linear_magnitude": 1,
    "rgb_image": 3,
}
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
    (C=1), ``linear_magnitude`` (C=1: ``|X|``), ``rgb_image`` (C=3: the viridis 8-bit image of
    the per-example normalised dB spectrogram, ``training.features_rgb``). See
    ``FEATURE_CHANNELS``.
    """
    if kind == "compressed_magnitude":
        return compressed_magnitude(spec, exponent).unsqueeze(1)
    if kind == "compressed_complex":
        return torch.view_as_real(compress_complex(spec, exponent)).permute(0, 3, 1, 2)
    if kind == "log_magnitude":
        return log_magnitude(spec).unsqueeze(1)
    if kind == "linear_magnitude":
        return spec.abs().unsqueeze(1)
    if kind == "rgb_image":
        # Imported on use: it loads matplotlib's colour map, which no other feature needs.
        from training.features_rgb import rgb_image_features

        return rgb_image_features(spec)
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
