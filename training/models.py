"""Dereverberation models on the STFT, with one interface.

Every model is a :class:`SpectralModel`: ``model(reverberant)`` takes the complex reverberant
STFT ``(B, T, F)``, computes its own input features (``model.features``, see
``training.data.spec_features``) and returns the estimated clean complex STFT ``(B, T, F)``.
``model.enhance_spec(reverberant)`` is the same for inference (complex64 in, complex64 out, no
gradients, eval mode), so evaluation code does not care which model it holds.

Registry (``MODELS``; ``build_model(name, n_freq, **kwargs)``). Parameters and cost below are
for ``n_freq=257`` (n_fft 512) and the default arguments; "cost" is the best of 20 runs of
``enhance_spec`` on one CPU thread (``torch.set_num_threads(1)``) for 1 s of 16 kHz audio
(126 frames), measured on the development machine (a shared 2-core VM: an order of magnitude,
not a benchmark). Both scale linearly with length (10 s: about 10x).

- ``bsrnn_lite`` (default, :class:`BandSplitRNN`): 0.20 M parameters, about 15 ms per second
  of audio (about 67x real time); 0.18 M and about 12 ms with ``causal=True``. Complex output.
- ``unet`` (:class:`UNet`): 1.64 M parameters, about 12 ms per second of audio (about 85x real
  time). Magnitude only (reverberant phase), non-causal (+-16 frames at the bottleneck).

Run ``python -m training.models`` to print the numbers on your machine.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.data import (
    COMPRESS_EXPONENT,
    FEATURE_CHANNELS,
    compress_complex,
    decompress_complex,
    spec_features,
)


class SpectralModel(nn.Module):
    """Base class: complex reverberant STFT ``(B, T, F)`` in, complex clean estimate out.

    Subclasses set ``self.features`` (a key of ``FEATURE_CHANNELS``) and ``self.exponent`` and
    implement :meth:`estimate` on the features and the reverberant STFT.
    """

    features: str
    exponent: float

    def forward(self, reverberant: torch.Tensor) -> torch.Tensor:
        features = spec_features(reverberant, self.features, self.exponent)
        return self.estimate(features, reverberant)

    def estimate(self, features: torch.Tensor, reverberant: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def enhance_spec(self, reverberant: torch.Tensor) -> torch.Tensor:
        """Clean estimate of a complex ``(B, T, F)`` or ``(T, F)`` STFT, complex64, same device.

        Runs in eval mode (restoring the previous mode) on the model's device, without
        gradients. A numpy array in gives a numpy array out.
        """
        if isinstance(reverberant, np.ndarray):
            return self.enhance_spec(torch.from_numpy(reverberant)).numpy()
        squeeze = reverberant.dim() == 2
        spec = reverberant.unsqueeze(0) if squeeze else reverberant
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            estimate = self(spec.to(device=device, dtype=torch.complex64))
        finally:
            self.train(was_training)
        estimate = estimate.to(device=reverberant.device, dtype=torch.complex64)
        return estimate.squeeze(0) if squeeze else estimate


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: SpectralModel, n_frames: int = 126) -> int:
    """Multiply-accumulates of one forward pass on ``(1, n_frames, F)`` (126 frames: 1 s).

    Counted by ``torch.utils.flop_counter`` (matrix products and convolutions, RNNs through
    the products they decompose into; FLOPs / 2); element-wise work is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    spec = torch.randn(1, n_frames, model.n_freq, dtype=torch.complex64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(spec)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


# ---------------------------------------------------------------------------------------------
# unet: Ernst et al., "Speech Dereverberation Using Fully Convolutional Networks", EUSIPCO 2018
# ---------------------------------------------------------------------------------------------


class UNet(SpectralModel):
    """2D U-Net on the compressed magnitude spectrogram, after Ernst et al. (EUSIPCO 2018).

    Ernst et al. treat the reverberant magnitude STFT as an image and map it to the clean one
    with a U-Net in the style of the pix2pix generator (which their GAN variant also uses):
    an encoder of stride-2 convolutions (batch norm, LeakyReLU 0.2, none on the first layer),
    a mirrored decoder of stride-2 transposed convolutions (batch norm, ReLU, dropout 0.5 in
    the innermost decoder layers) and skip connections that concatenate each encoder output
    onto the decoder layer of the same size. The estimated clean magnitude is combined with
    the reverberant phase.

    Scaled down for CPU training: 5 levels with widths ``(16, 32, 64, 128, 128)`` and 5x5
    kernels, 1.64 M parameters (pix2pix has 8 levels of 64-512 channels; the exact sizes here
    are ours, not the paper's), on any number of frames (zero-padded to a multiple of
    ``2**depth`` frames, cropped back). Like an image of ``2**k`` rows, it drops the Nyquist
    bin (predicting 0 there) so the ``F - 1`` remaining bins halve cleanly. Input and output
    are ``|X|^0.3`` (``features="compressed_magnitude"``, the output kept non-negative by a
    softplus) or ``log|X|`` (``features="log_magnitude"``).
    """

    def __init__(
        self,
        n_freq: int,
        widths: tuple[int, ...] = (16, 32, 64, 128, 128),
        kernel_size: int = 5,
        dropout: float = 0.5,
        dropout_layers: int = 2,
        features: str = "compressed_magnitude",
        exponent: float = COMPRESS_EXPONENT,
    ):
        super().__init__()
        if features not in ("compressed_magnitude", "log_magnitude"):
            raise ValueError(f"unet predicts a magnitude; features {features!r} is not one")
        self.n_freq, self.features, self.exponent = n_freq, features, exponent
        self.depth = len(widths)
        pad = kernel_size // 2
        self.encoder = nn.ModuleList()
        in_channels = 1
        for level, width in enumerate(widths):
            layers: list[nn.Module] = [nn.Conv2d(in_channels, width, kernel_size, 2, pad)]
            if level > 0:  # pix2pix: no batch norm on the first layer
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2))
            self.encoder.append(nn.Sequential(*layers))
            in_channels = width
        self.decoder = nn.ModuleList()
        for level in reversed(range(self.depth)):
            skip = widths[level - 1] if level > 0 else 0
            out_channels = skip if level > 0 else 16
            in_channels = widths[level] if level == self.depth - 1 else 2 * widths[level]
            layers = [
                nn.ConvTranspose2d(
                    in_channels, out_channels, kernel_size, 2, pad, output_padding=1
                ),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            if self.depth - 1 - level < dropout_layers and dropout > 0:
                layers.append(nn.Dropout(dropout))
            self.decoder.append(nn.Sequential(*layers))
        self.head = nn.Conv2d(16, 1, 1)

    def estimate(self, features: torch.Tensor, reverberant: torch.Tensor) -> torch.Tensor:
        n_frames, n_freq = features.shape[-2:]
        multiple = 2**self.depth
        x = features[..., : n_freq - 1]  # drop the Nyquist bin
        pad_t = -n_frames % multiple
        pad_f = -(n_freq - 1) % multiple
        x = F.pad(x, (0, pad_f, 0, pad_t))
        skips = []
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is not a skip
        for layer in self.decoder:
            x = layer(x)
            if skips:
                x = torch.cat([x, skips.pop()], dim=1)
        out = self.head(x)[:, 0, :n_frames, : n_freq - 1].float()
        if self.features == "compressed_magnitude":
            magnitude = F.softplus(out) ** (1 / self.exponent)
        else:
            magnitude = torch.exp(out)
        magnitude = F.pad(magnitude, (0, 1))  # Nyquist bin: 0
        phase = reverberant / (reverberant.abs() + 1e-8)
        return magnitude * phase


# ---------------------------------------------------------------------------------------------
# bsrnn_lite: frequency-aware band-split RNN (default)
# ---------------------------------------------------------------------------------------------


def band_widths(n_freq: int, widths: tuple[int, ...] = (4, 8, 16)) -> list[int]:
    """Split ``n_freq`` bins into contiguous bands: narrow at low, wide at high frequencies.

    The first quarter of the bins uses ``widths[0]``, the second quarter ``widths[1]``, the
    upper half ``widths[2]``; the last band takes the leftover bins. For 257 bins (16 kHz,
    n_fft 512): 16 bands of 125 Hz below 2 kHz, 8 of 250 Hz to 4 kHz, 8 of 500 Hz above.
    """
    edges = [0, n_freq // 4, n_freq // 2, n_freq]
    bands: list[int] = []
    for (lo, hi), width in zip(itertools.pairwise(edges), widths, strict=True):
        span = hi - lo
        bands += [width] * (span // width)
        if span % width:
            bands.append(span % width)
    # Merge a leftover band narrower than half its neighbour into it, to avoid slivers.
    merged: list[int] = []
    for width in bands:
        if merged and width < merged[-1] // 2:
            merged[-1] += width
        else:
            merged.append(width)
    return merged


class BandLinear(nn.Module):
    """A separate linear map per band, on a list of per-group tensors ``(..., count, d_in)``.

    ``sizes_in[i] -> sizes_out[i]`` for band ``i``. Runs of consecutive bands with the same
    width (``widths``) form a group, done in one batched matmul (``self.groups``: first band,
    count); sizes must be equal within a group.
    """

    def __init__(self, widths: list[int], sizes_in: list[int], sizes_out: list[int]):
        super().__init__()
        self.groups: list[tuple[int, int]] = []
        for band, width in enumerate(widths):
            if self.groups and width == widths[band - 1]:
                first, count = self.groups[-1]
                self.groups[-1] = (first, count + 1)
            else:
                self.groups.append((band, 1))
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()
        for first, count in self.groups:
            d_in, d_out = sizes_in[first], sizes_out[first]
            bound = d_in**-0.5  # nn.Linear's default initialisation
            self.weight.append(
                nn.Parameter(torch.empty(count, d_in, d_out).uniform_(-bound, bound))
            )
            self.bias.append(nn.Parameter(torch.empty(count, d_out).uniform_(-bound, bound)))

    def forward(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            torch.einsum("...nd,nde->...ne", chunk, weight) + bias
            for chunk, weight, bias in zip(chunks, self.weight, self.bias, strict=True)
        ]


class DualPathBlock(nn.Module):
    """Full-band BLSTM across the bands of each frame, then an LSTM over time for each band.

    Both are pre-norm residual branches on ``(B, T, K, C)``. The time LSTM is unidirectional
    (causal) unless ``causal=False``.
    """

    def __init__(self, channels: int, hidden: int, causal: bool = True):
        super().__init__()
        self.freq_norm = nn.LayerNorm(channels)
        self.freq_rnn = nn.LSTM(channels, hidden, batch_first=True, bidirectional=True)
        self.freq_proj = nn.Linear(2 * hidden, channels)
        self.time_norm = nn.LayerNorm(channels)
        self.time_rnn = nn.LSTM(channels, hidden, batch_first=True, bidirectional=not causal)
        self.time_proj = nn.Linear(hidden * (1 if causal else 2), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, k, c = x.shape
        y = self.freq_norm(x).reshape(b * t, k, c)
        y = self.freq_proj(self.freq_rnn(y)[0])
        x = x + y.reshape(b, t, k, c)
        y = self.time_norm(x).transpose(1, 2).reshape(b * k, t, c)
        y = self.time_proj(self.time_rnn(y)[0])
        return x + y.reshape(b, k, t, c).transpose(1, 2)


class BandSplitRNN(SpectralModel):
    """Frequency-aware band-split RNN ("bsrnn_lite"), after Luo & Yu's BSRNN (2023), scaled down.

    Input: the compressed complex STFT ``|X|^0.3 e^{j angle X}``: real part, imaginary part and
    (``magnitude_input=True``) its magnitude ``|X|^0.3``, which hands the network the level of
    each bin without making it learn a modulus from a linear map. (``features=`` may pick
    another of ``FEATURE_CHANNELS``; a magnitude-only input then needs ``output="mask"``.)
    Built around three facts about reverberant speech that a 2D CNN ignores:

    - *Frequency is not shift-invariant.* The spectrum is cut into bands (narrow at low
      frequencies, where harmonics are resolved; wide at high ones, see :func:`band_widths`),
      and every band has its own encoder and decoder weights (:class:`BandLinear`), which also
      act as a learned frequency embedding.
    - *Harmonics are non-local.* In every frame a bidirectional LSTM runs across all bands, so
      each band sees the whole spectrum (the harmonic comb, the formants).
    - *The reverberant tail is long and serial.* Per band, an LSTM runs over time; its state
      carries the decaying energy of past frames, which is what late reverberation is made of
      (as in WPE's linear prediction). By default it is a bidirectional LSTM (``causal=False``):
      offline enhancement of whole recordings, where seeing the next onsets helps. With
      ``causal=True`` it is a forward LSTM and the whole model is causal (every other layer
      works within one frame): it can run frame by frame with one STFT frame of latency.

    Output (``output=``): ``"mapping"`` (default), complex spectral mapping in the compressed
    domain, residual on the input (the decoder's last layer starts at zero, so the untrained
    model is the identity): ``Y_c = X_c + D``, then decompressed; or ``"mask"``, a complex ratio
    mask on the (uncompressed) reverberant STFT with its magnitude bounded by ``mask_bound``
    through a tanh (starting as the unit mask).

    Defaults (``channels=32, hidden=32, blocks=2``, 32 bands at 257 bins): 0.20 M parameters,
    about 15 ms per second of audio on one CPU thread (about 12 ms with ``causal=True``). The
    speed target (>= 50x real time on one thread), not the parameter budget, sets the size:
    the LSTMs take most of the time. For GPU training, ``channels=64, hidden=96, blocks=4``
    gives 1.5 M parameters.
    """

    def __init__(
        self,
        n_freq: int,
        channels: int = 32,
        hidden: int = 32,
        blocks: int = 2,
        band_plan: tuple[int, ...] = (4, 8, 16),
        causal: bool = False,
        output: str = "mapping",
        mask_bound: float = 2.0,
        magnitude_input: bool = True,
        features: str = "compressed_complex",
        exponent: float = COMPRESS_EXPONENT,
    ):
        super().__init__()
        if features not in FEATURE_CHANNELS:
            raise ValueError(f"unknown features {features!r}; choose one of {FEATURE_CHANNELS}")
        if mask_bound <= 1:
            raise ValueError(f"mask_bound must be > 1, got {mask_bound}")
        if output not in ("mapping", "mask"):
            raise ValueError(f"output must be 'mapping' or 'mask', got {output!r}")
        if output == "mapping" and features != "compressed_complex":
            # A complex residual needs the phase it corrects; magnitude inputs can only mask.
            raise ValueError(
                f"output='mapping' needs features='compressed_complex', not {features!r}"
            )
        self.n_freq, self.features, self.exponent = n_freq, features, exponent
        self.output, self.mask_bound, self.causal = output, mask_bound, causal
        self.bands = band_widths(n_freq, band_plan)
        n_bands = len(self.bands)
        # Each band: its own linear map from its 2*w numbers to ``channels``. No normalisation
        # here: a per-band, per-frame norm would erase the band's level, and the rise and decay
        # of level over time is what tells direct sound from the reverberant tail.
        self.magnitude_input = magnitude_input and features == "compressed_complex"
        in_channels = FEATURE_CHANNELS[features] + int(self.magnitude_input)
        self.encode = BandLinear(
            self.bands, [in_channels * w for w in self.bands], [channels] * n_bands
        )
        self.blocks = nn.ModuleList(DualPathBlock(channels, hidden, causal) for _ in range(blocks))
        self.out_norm = nn.LayerNorm(channels)
        self.decode_hidden = BandLinear(self.bands, [channels] * n_bands, [2 * channels] * n_bands)
        self.decode_out = BandLinear(
            self.bands, [2 * channels] * n_bands, [2 * w for w in self.bands]
        )
        with torch.no_grad():  # start as the identity: zero residual (or a unit mask)
            for weight, bias in zip(self.decode_out.weight, self.decode_out.bias, strict=True):
                weight.zero_()
                bias.zero_()

    def estimate(self, features: torch.Tensor, reverberant: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = features.shape
        if self.magnitude_input:  # |X|^c next to its real and imaginary parts
            magnitude = torch.linalg.vector_norm(features, dim=1, keepdim=True)
            features = torch.cat([features, magnitude], dim=1)
        x = features.permute(0, 2, 3, 1)  # (B, T, F, C)
        # Band split: per group of equal-width bands, (B, T, count, C * width).
        chunks, start = [], 0
        for first, count in self.encode.groups:
            width = self.bands[first]
            chunk = x[:, :, start : start + width * count].reshape(b, t, count, -1)
            chunks.append(chunk)
            start += width * count
        z = torch.cat(self.encode(chunks), dim=2)  # (B, T, n_bands, C)
        for block in self.blocks:
            z = block(z)
        z = self.out_norm(z)
        # Band merge: each band's own MLP back to its 2 * width numbers.
        chunks, start = [], 0
        for _, count in self.decode_hidden.groups:
            chunks.append(z[:, :, start : start + count])
            start += count
        hidden = [torch.tanh(h) for h in self.decode_hidden(chunks)]
        out = [o.reshape(b, t, -1, 2) for o in self.decode_out(hidden)]
        out = torch.cat(out, dim=2).float()  # (B, T, F, 2), float32 even under autocast
        delta = torch.complex(out[..., 0], out[..., 1])
        if self.output == "mapping":
            estimate_c = compress_complex(reverberant, self.exponent) + delta
            return decompress_complex(estimate_c, self.exponent)
        # Bounded complex ratio mask: |mask| = bound * tanh(k |1 + delta| / bound) < bound, with
        # k chosen so that a unit mask stays a unit mask (the untrained model passes X through).
        mask = 1 + delta
        magnitude = mask.abs()
        k = self.mask_bound * math.atanh(1 / self.mask_bound)
        bounded = self.mask_bound * torch.tanh(k * magnitude / self.mask_bound)
        return reverberant * mask * (bounded / (magnitude + 1e-8))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _gtcrn(n_freq: int, **kwargs) -> SpectralModel:
    # Imported on use: training.models_efficient subclasses SpectralModel from this module.
    from training.models_efficient import GTCRN

    return GTCRN(n_freq, **kwargs)


MODELS: dict[str, Callable[..., SpectralModel]] = {
    "bsrnn_lite": BandSplitRNN,
    "unet": UNet,
    "gtcrn": _gtcrn,  # training/models_efficient.py
}
DEFAULT_MODEL = "bsrnn_lite"


def build_model(name: str, n_freq: int, **kwargs) -> SpectralModel:
    """Instantiate registered model ``name`` for ``n_freq`` frequency bins."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](n_freq, **kwargs)


def measure_speed(
    model: SpectralModel, n_frames: int = 126, repeats: int = 10, threads: int = 1
) -> float:
    """Best-of-``repeats`` seconds of ``enhance_spec`` on one random ``(1, n_frames, F)`` input."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        spec = torch.randn(1, n_frames, model.n_freq, dtype=torch.complex64)
        for _ in range(3):
            model.enhance_spec(spec)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.enhance_spec(spec)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return best


if __name__ == "__main__":
    for model_name in MODELS:
        net = build_model(model_name, 257)
        seconds = measure_speed(net)
        print(
            f"{model_name:12s} {count_parameters(net) / 1e6:6.3f} M params  "
            f"{seconds * 1e3:6.1f} ms per second of audio (1 thread, {1 / seconds:5.0f}x real time)"
        )
