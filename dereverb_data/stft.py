"""Short-time Fourier transform with one convention used everywhere in the project.

Convention (identical to ``torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft),
center=True, pad_mode="constant", return_complex=True)``, transposed to time-major):

- periodic Hann window of length ``n_fft`` (or ``sqrt-hann``, its square root);
- the signal is zero-padded by ``n_fft // 2`` on both sides, so frame ``t`` is centred on
  sample ``t * hop``;
- no normalisation: ``X[t, k] = sum_n w[n] x[t*hop + n - n_fft//2] exp(-2j pi k n / n_fft)``;
- output shape ``(n_frames, n_fft // 2 + 1)`` with ``n_frames = 1 + n_samples // hop``.

Frames are the first axis because the store concatenates examples along time and training
crops contiguous runs of frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WINDOWS = ("hann", "sqrt-hann")


@dataclass(frozen=True)
class StftConfig:
    n_fft: int = 512
    hop: int = 128
    window: str = "hann"

    @property
    def n_freq(self) -> int:
        return self.n_fft // 2 + 1

    def n_frames(self, n_samples: int) -> int:
        return 1 + n_samples // self.hop


def analysis_window(n_fft: int, kind: str = "hann") -> np.ndarray:
    """Periodic window (the DFT-even form that makes Hann at 75 % overlap sum to a constant)."""
    if kind not in WINDOWS:
        raise ValueError(f"unknown STFT window {kind!r}; choose one of {WINDOWS}")
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    return np.sqrt(hann) if kind == "sqrt-hann" else hann


def stft(signal: np.ndarray, config: StftConfig) -> np.ndarray:
    """Complex STFT of a 1-D signal, shape ``(n_frames, n_freq)``, complex64."""
    x = np.asarray(signal, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"stft expects a 1-D signal, got shape {x.shape}")
    n_fft, hop = config.n_fft, config.hop
    pad = n_fft // 2
    padded = np.pad(x, (pad, pad))
    n_frames = config.n_frames(x.size)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:n_frames]
    spec = np.fft.rfft(frames * analysis_window(n_fft, config.window), axis=-1)
    return spec.astype(np.complex64)


def istft(spec: np.ndarray, config: StftConfig, length: int) -> np.ndarray:
    """Inverse of :func:`stft` by weighted overlap-add (least-squares inverse), float32."""
    spec = np.asarray(spec)
    if spec.ndim != 2 or spec.shape[1] != config.n_freq:
        raise ValueError(f"istft expects shape (frames, {config.n_freq}), got {spec.shape}")
    n_fft, hop = config.n_fft, config.hop
    window = analysis_window(n_fft, config.window)
    frames = np.fft.irfft(spec.astype(np.complex128), n=n_fft, axis=-1) * window
    n_frames = spec.shape[0]
    total = n_fft + hop * (n_frames - 1)
    out = _overlap_add(frames, hop, total)
    norm = _overlap_add(np.broadcast_to(window**2, frames.shape), hop, total)
    pad = n_fft // 2
    out, norm = out[pad : pad + length], norm[pad : pad + length]
    if out.size < length:
        raise ValueError(f"{n_frames} frames cannot hold {length} samples")
    # Where the window-square sum vanishes the signal is not recoverable; leave zeros there.
    safe = norm > 1e-10
    out[safe] /= norm[safe]
    out[~safe] = 0.0
    return out.astype(np.float32)


def _overlap_add(frames: np.ndarray, hop: int, total: int) -> np.ndarray:
    """Sum of ``frames[n]`` placed at ``n * hop``, as ``total`` samples.

    When the hop divides the frame length each frame is ``n_fft // hop`` hop-long pieces, and
    piece ``k`` of every frame lands on a contiguous run of the output: a few whole-array adds
    instead of ``np.add.at`` over every sample (about 10x faster). Pieces are added from the last
    to the first, so every output sample sums its frames in increasing frame order, as
    ``np.add.at`` does: the result is bit-identical.
    """
    n_frames, n_fft = frames.shape
    out = np.zeros(total)
    if n_fft % hop:
        index = (np.arange(n_frames) * hop)[:, None] + np.arange(n_fft)[None, :]
        np.add.at(out, index, frames)
        return out
    for k in reversed(range(n_fft // hop)):
        piece = frames[:, k * hop : (k + 1) * hop].reshape(-1)
        out[k * hop : k * hop + piece.size] += piece
    return out
