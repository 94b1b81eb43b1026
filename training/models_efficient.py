"""CPU-efficient models: ``gtcrn``, after Rong et al., "GTCRN: a speech enhancement model
requiring ultralow computational resources" (ICASSP 2024). Our own code from the paper's
description, adapted to dereverberation and to CPU *training*.

The paper's model, block by block (all kept here, sizes as in the paper):

- **ERB band merging.** The lowest bins (0-2 kHz at 16 kHz / n_fft 512: 65 bins) are kept;
  the 192 bins above are merged into 64 bands by a fixed triangular filterbank on the ERB
  scale, so the network sees 129 "bins". A fixed inverse filterbank spreads the output back.
- **Subband feature extraction (SFE).** Each bin's channels are concatenated with those of its
  two neighbours (an unfold of 3 along frequency): local spectral context for free.
- **Encoder.** Two strided convolutions along frequency (1x5, stride 2; 129 -> 65 -> 33), then
  three **grouped temporal convolution (GT-Conv)** blocks: half the channels pass unchanged,
  the other half go through SFE, a point-wise convolution, a depth-wise 3x3 convolution
  dilated over time (dilations 1, 2, 5; causal padding), a point-wise convolution and
  **temporal recurrent attention (TRA)** (a recurrence over the frame energies of each channel
  gives a per-frame channel gain), and a channel shuffle mixes the halves.
- **Grouped dual-path RNN (DPGRNN)**, twice: a bidirectional recurrence across the 33 bands of
  each frame, then a unidirectional one over time for each band; channels split into 2 groups
  with their own weights; each path linear + LayerNorm over (bands, channels) + residual.
- **Decoder** mirrors the encoder (GT-Conv dilations 5, 2, 1, transposed convolutions), encoder
  outputs added as skips, 2 output channels: a **complex ratio mask**.

What we changed, and why:

- **Recurrences.** ``rnn="mingru"`` (default) runs every recurrence (TRA, both DPGRNN paths) as
  a minGRU (Feng et al., "Were RNNs all we needed?", 2024: ``h_t = (1 - z_t) h_{t-1} + z_t
  h~_t`` with ``z_t`` and ``h~_t`` from ``x_t`` alone), computed for all frames at once by a
  :func:`linear_scan`: since the gates do not depend on ``h``, the recurrence is linear, and
  one fused multiply-add per step in a custom autograd function does it (no autograd node per
  step). On CPU the cost of ``nn.GRU`` training is its per-step autograd work (about ten nodes
  per step, 256 steps per crop per recurrence), not its arithmetic: ``rnn="gru"`` (``nn.GRU``
  as in the paper, otherwise the same model) trains about 1.8x slower. It is still a
  recurrence: streaming carries ``h`` from frame to frame. All groups of a grouped layer
  share one scan (block-diagonal input weights).
- **Mask.** GTCRN's mask is ``tanh``-bounded per real/imaginary part and starts near 0. Here
  ``mask = 1 + D`` with the last layer zeroed, so the untrained model is the identity (output ==
  input), the magnitude bounded by ``mask_bound`` as in ``bsrnn_lite``'s mask mode.
- **Input**: the compressed complex STFT (real, imaginary) and its magnitude, as ``bsrnn_lite``
  (the paper: magnitude, real, imaginary of the uncompressed STFT).
- **Frame rate** (``frame_stride=2``, default): our hop is 128, the paper's 256. Rather than
  run the network at twice the paper's frame rate, each network frame holds two STFT frames
  (stacked on channels: frames ``2k-1, 2k``) and the decoder emits masks for frames ``2k,
  2k+1``, so it stays causal (frame ``2k+1``'s mask comes from frames up to ``2k``; it is
  still applied to frame ``2k+1`` itself) and costs about half: 1.7x faster training than
  ``frame_stride=1``, which keeps one network frame per STFT frame.
- **Activations**: LeakyReLU(0.1) instead of PReLU, whose backward pass measured 5x slower
  on CPU.

Causal: every layer works within one frame or on past frames only (in eval mode; in training,
batch norm normalises with batch statistics), so it can run frame by frame.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.data import COMPRESS_EXPONENT, FEATURE_CHANNELS
from training.models import SpectralModel


def erb_scale(hz: np.ndarray) -> np.ndarray:
    """ERB-rate (Glasberg & Moore 1990) of frequencies in Hz."""
    return 21.4 * np.log10(1 + 0.00437 * hz)


def erb_filterbanks(
    n_freq: int, low_bins: int, bands: int, sample_rate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed band-merging and band-spreading matrices for bins ``low_bins..n_freq-1``.

    Triangles equally spaced on the ERB scale, the first centred on the first merged bin and
    the last on the last bin. Returns ``(merge, spread)``: ``merge`` (n_high, bands) with each
    column summing to 1 (a band is the weighted mean of its bins, so levels stay comparable
    with the kept low bins), ``spread`` (bands, n_high) with each column summing to 1 (a bin is
    a weighted mean of its bands: a constant band output gives the same constant on its bins).
    """
    n_high = n_freq - low_bins
    if bands < 1 or n_high < bands:
        raise ValueError(f"{bands} ERB bands need at least as many bins above {low_bins}")
    hz = np.arange(low_bins, n_freq) * (sample_rate / 2) / (n_freq - 1)
    erb = erb_scale(hz)
    centres = np.linspace(erb[0], erb[-1], bands)
    step = centres[1] - centres[0] if bands > 1 else erb[-1] - erb[0] + 1.0
    # Triangles of half-width one band spacing; every bin falls under one or two of them.
    weights = np.clip(1 - np.abs(erb[:, None] - centres[None, :]) / step, 0, None)
    # A band narrower than one bin can miss every bin at the low end: give it its nearest bin.
    nearest = np.abs(erb[:, None] - centres[None, :]).argmin(axis=0)
    weights[nearest, np.arange(bands)] = np.maximum(weights[nearest, np.arange(bands)], 1e-3)
    merge = weights / weights.sum(axis=0, keepdims=True)
    spread = (weights / weights.sum(axis=1, keepdims=True)).T
    return torch.tensor(merge, dtype=torch.float32), torch.tensor(spread, dtype=torch.float32)


def subband_features(x: torch.Tensor) -> torch.Tensor:
    """SFE: ``(B, C, T, F)`` -> ``(B, 3C, T, F)``, each bin with its lower and upper neighbour."""
    padded = F.pad(x, (1, 1))
    return torch.cat([padded[..., :-2], x, padded[..., 2:]], dim=1)


class _LinearScan(torch.autograd.Function):
    """``h_t = a_t h_{t-1} + b_t`` (``h_{-1} = 0``) on time-major ``(T, ...)`` tensors.

    A custom autograd function so that a step costs one fused ``addcmul`` and no autograd node:
    the backward pass is the same recurrence run backwards, ``g_t = dL/dh_t + a_{t+1} g_{t+1}``,
    then ``dL/db_t = g_t`` and ``dL/da_t = g_t h_{t-1}``.
    """

    @staticmethod
    def forward(ctx, decay: torch.Tensor, inputs: torch.Tensor, reverse: bool) -> torch.Tensor:
        states = torch.empty_like(inputs)
        previous = torch.zeros_like(inputs[0])
        steps = range(inputs.shape[0])
        for t in reversed(steps) if reverse else steps:
            previous = torch.addcmul(inputs[t], decay[t], previous, out=states[t])
        ctx.save_for_backward(decay, states)
        ctx.reverse = reverse
        return states

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        decay, states = ctx.saved_tensors
        if ctx.reverse:  # the same computation on time-flipped views
            decay, states, grad_states = decay.flip(0), states.flip(0), grad_states.flip(0)
        grad_inputs = torch.empty_like(grad_states)
        following = torch.zeros_like(grad_states[0])
        for t in reversed(range(grad_states.shape[0])):
            carried = decay[t + 1] if t + 1 < decay.shape[0] else torch.zeros_like(following)
            following = torch.addcmul(grad_states[t], carried, following, out=grad_inputs[t])
        grad_decay = torch.zeros_like(decay)
        grad_decay[1:] = grad_inputs[1:] * states[:-1]
        if ctx.reverse:
            grad_decay, grad_inputs = grad_decay.flip(0), grad_inputs.flip(0)
        return grad_decay, grad_inputs, None


@torch.compiler.disable  # a graph break: tracing would unroll the loop over time
def linear_scan(
    decay: torch.Tensor, inputs: torch.Tensor, reverse: bool = False, time_major: bool = False
) -> torch.Tensor:
    """All states of ``h_t = decay_t h_{t-1} + inputs_t`` (``h_0 = 0``) over dim -2 of
    ``(N, T, H)`` tensors (dim 0 of ``(T, N, H)`` with ``time_major``), in float32;
    ``reverse`` runs from the last step to the first (``h_t`` then depends on steps ``>= t``).

    A loop over time of one fused multiply-add per step, in a custom autograd function: on CPU
    this measured 10x faster to train than ``torch.logcumsumexp``'s log-space parallel scan
    (transcendentals on every element) and than ``nn.GRU`` (about ten autograd nodes per step).
    Causal: ``h_t`` uses steps ``<= t`` only.
    """
    if decay.dtype in (torch.float16, torch.bfloat16):  # a long recurrence needs float32
        decay, inputs = decay.float(), inputs.float()
    if time_major:
        return _LinearScan.apply(decay.contiguous(), inputs.contiguous(), reverse)
    decay, inputs = decay.transpose(0, 1).contiguous(), inputs.transpose(0, 1).contiguous()
    return _LinearScan.apply(decay, inputs, reverse).transpose(0, 1)


class MinGRU(nn.Module):
    """Grouped minGRU on ``(N, T, d_in)`` -> ``(N, T, hidden)`` (Feng et al., 2024).

    ``h_t = (1 - z_t) h_{t-1} + z_t c_t`` with ``z_t = sigmoid(W_z x_t)``, ``c_t = W_c x_t``:
    the gates depend on the input only, so the recurrence is linear in ``h`` and all groups
    (and both directions) go through one :func:`linear_scan`. ``groups`` splits input and
    hidden channels into independent groups (block-diagonal weights), as GTCRN's grouped RNNs;
    ``bidirectional`` runs half of the hidden units backwards over time. Same call convention
    as ``nn.GRU(batch_first=True)``: returns ``(output, None)``.
    """

    def __init__(self, d_in: int, hidden: int, bidirectional: bool = False, groups: int = 1):
        super().__init__()
        directions = 2 if bidirectional else 1
        if d_in % groups or hidden % (groups * directions):
            raise ValueError(f"d_in {d_in}, hidden {hidden}: not divisible into groups")
        self.groups, self.bidirectional = groups, bidirectional
        self.hidden = hidden
        g_in, g_out = d_in // groups, 2 * hidden // groups
        bound = g_in**-0.5  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(groups, g_in, g_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, g_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, time_major: bool = False) -> tuple[torch.Tensor, None]:
        lead = x.shape[:2]  # (N, T), or (T, N) time-major
        x = x.reshape(*lead, self.groups, -1)
        if self.groups == 1:
            projected = x[:, :, 0] @ self.weight[0] + self.bias[0]
        else:
            projected = torch.einsum("ntgi,gio->ntgo", x, self.weight) + self.bias
        # (N, T, groups, [gate, candidate], [forward units, backward units])
        projected = projected.float().reshape(*lead, self.groups, 2, -1)
        z = torch.sigmoid(projected[..., 0, :])
        decay, inputs = 1 - z, z * projected[..., 1, :]
        if not self.bidirectional:
            out = linear_scan(decay.flatten(2), inputs.flatten(2), time_major=time_major)
            return out, None
        half = self.hidden // self.groups // 2
        out = [
            linear_scan(
                decay[..., sl].flatten(2), inputs[..., sl].flatten(2), rev, time_major
            ).reshape(*lead, self.groups, half)
            for sl, rev in ((slice(None, half), False), (slice(half, None), True))
        ]
        return torch.cat(out, dim=-1).reshape(*lead, self.hidden), None


def make_rnn(kind: str, d_in: int, hidden: int, bidirectional: bool = False) -> nn.Module:
    """``nn.GRU`` (``kind="gru"``) or :class:`MinGRU` (``"mingru"``), batch first; ``hidden``
    counts both directions' units (``nn.GRU`` gets ``hidden // 2`` per direction)."""
    if kind == "gru":
        per_direction = hidden // 2 if bidirectional else hidden
        return nn.GRU(d_in, per_direction, batch_first=True, bidirectional=bidirectional)
    if kind == "mingru":
        return MinGRU(d_in, hidden, bidirectional)
    raise ValueError(f"rnn must be 'gru' or 'mingru', got {kind!r}")


class GroupedRNN(nn.Module):
    """Channels split into ``groups``, each with its own recurrence, outputs concatenated."""

    def __init__(
        self, kind: str, channels: int, hidden: int, groups: int, bidirectional: bool = False
    ):
        super().__init__()
        if channels % groups or hidden % groups:
            raise ValueError(f"channels {channels} and hidden {hidden} must divide by {groups}")
        self.groups = groups
        if kind == "mingru":  # groups inside one module: one scan for all of them
            self.rnns = nn.ModuleList([MinGRU(channels, hidden, bidirectional, groups)])
        else:
            self.rnns = nn.ModuleList(
                make_rnn(kind, channels // groups, hidden // groups, bidirectional)
                for _ in range(groups)
            )

    def forward(self, x: torch.Tensor, time_major: bool = False) -> torch.Tensor:
        """``(N, T, C)`` (or ``(T, N, C)`` with ``time_major``) -> same layout, ``hidden``."""
        if len(self.rnns) == 1:
            return self.rnns[0](x, time_major=time_major)[0]
        if time_major:  # nn.GRU: batch first
            return self.forward(x.transpose(0, 1)).transpose(0, 1)
        parts = x.chunk(self.groups, dim=-1)
        return torch.cat([rnn(p)[0] for rnn, p in zip(self.rnns, parts, strict=True)], dim=-1)


class TemporalRecurrentAttention(nn.Module):
    """TRA: per-frame channel gains from a recurrence over each channel's frame energy."""

    def __init__(self, channels: int, kind: str):
        super().__init__()
        self.rnn = make_rnn(kind, channels, 2 * channels)
        self.proj = nn.Linear(2 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = x.square().mean(dim=-1).transpose(1, 2)  # (B, T, C)
        gain = torch.sigmoid(self.proj(self.rnn(energy)[0]))
        return x * gain.transpose(1, 2).unsqueeze(-1).to(x.dtype)


class GTConvBlock(nn.Module):
    """Grouped temporal convolution: half the channels through SFE, point-wise, causal dilated
    depth-wise (3 frames x 3 bins), point-wise and TRA; the other half unchanged; shuffled."""

    def __init__(self, channels: int, hidden: int, dilation: int, kind: str):
        super().__init__()
        half = channels // 2
        self.time_pad = 2 * dilation  # kernel 3 over time: look back 2 * dilation frames only
        self.point_in = nn.Sequential(
            nn.Conv2d(3 * half, hidden, 1), nn.BatchNorm2d(hidden), nn.LeakyReLU(0.1)
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, (3, 3), dilation=(dilation, 1), groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.1),
        )
        self.point_out = nn.Sequential(nn.Conv2d(hidden, half, 1), nn.BatchNorm2d(half))
        self.attention = TemporalRecurrentAttention(half, kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active, passed = x.chunk(2, dim=1)
        h = self.point_in(subband_features(active))
        h = self.depthwise(F.pad(h, (1, 1, self.time_pad, 0)))
        h = self.attention(self.point_out(h))
        b, c, t, f = h.shape
        # Channel shuffle of the two halves: interleave them so the next block mixes both.
        return torch.stack([h, passed], dim=2).reshape(b, 2 * c, t, f)


class DualPathGroupedRNN(nn.Module):
    """DPGRNN on ``(B, C, T, K)``: grouped bidirectional recurrence across the K bands of each
    frame, then a grouped unidirectional one over time per band; each path linear, LayerNorm
    over (bands, channels) and residual."""

    def __init__(self, channels: int, bands: int, kind: str, groups: int = 2):
        super().__init__()
        if channels % (2 * groups):
            raise ValueError(f"channels {channels} must divide by {2 * groups}")
        self.intra_rnn = GroupedRNN(kind, channels, channels, groups, bidirectional=True)
        self.intra_proj = nn.Linear(channels, channels)
        self.intra_norm = nn.LayerNorm((bands, channels))
        self.inter_rnn = GroupedRNN(kind, channels, channels, groups)
        self.inter_proj = nn.Linear(channels, channels)
        self.inter_norm = nn.LayerNorm((bands, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, k = x.shape
        x = x.permute(0, 2, 3, 1)  # (B, T, K, C)
        y = self.intra_proj(self.intra_rnn(x.reshape(b * t, k, c)))
        x = x + self.intra_norm(y.reshape(b, t, k, c))
        z = x.transpose(0, 1).reshape(t, b * k, c)  # time-major: the scan's layout
        y = self.inter_proj(self.inter_rnn(z, time_major=True)).reshape(t, b, k, c)
        x = x + self.inter_norm(y.transpose(0, 1))
        return x.permute(0, 3, 1, 2)


def _conv_block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.LeakyReLU(0.1))


class GTCRN(SpectralModel):
    """GTCRN-style causal complex-mask model (``gtcrn``); see the module docstring.

    Defaults (``channels=16``, 257 bins): 16.9 k parameters (the paper reports 48 k; this
    reading of its description, 16 channels throughout, has fewer), 31 M MACs per
    second of audio (``count_macs``; the paper: 33 M), about 17-21 ms per second of audio on one
    thread (50-60x real time, on the shared 2-core development VM). Training on CPU: about
    2-2.6x ``bsrnn_lite``'s audio seconds per CPU second (``frame_stride=4``: 4.4x at batch 16),
    see ``benchmarks/RESULTS.md``, "Training throughput". ``rnn="gru"`` for ``nn.GRU``
    recurrences as in the paper (same structure, slower to train on CPU).
    """

    def __init__(
        self,
        n_freq: int,
        channels: int = 16,
        hidden: int = 16,
        dilations: tuple[int, ...] = (1, 2, 5),
        rnn_blocks: int = 2,
        rnn: str = "mingru",
        low_bins: int = 65,
        erb_bands: int = 64,
        sample_rate: int = 16000,
        mask_bound: float = 2.0,
        frame_stride: int = 2,
        channels_last: bool = False,
        features: str = "compressed_complex",
        exponent: float = COMPRESS_EXPONENT,
    ):
        super().__init__()
        self.channels_last = channels_last
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        self.frame_stride = frame_stride
        if features != "compressed_complex":
            raise ValueError(f"gtcrn takes features='compressed_complex', not {features!r}")
        if mask_bound <= 1:
            raise ValueError(f"mask_bound must be > 1, got {mask_bound}")
        if channels % 4:
            raise ValueError(f"channels must divide by 4, got {channels}")
        self.n_freq, self.features, self.exponent = n_freq, features, exponent
        self.mask_bound, self.low_bins = mask_bound, low_bins
        merge, spread = erb_filterbanks(n_freq, low_bins, erb_bands, sample_rate)
        self.register_buffer("erb_merge", merge, persistent=False)
        self.register_buffer("erb_spread", spread, persistent=False)
        width = low_bins + erb_bands  # 129
        # SFE of (real, imag, magnitude), for each of the frame_stride frames of a network frame
        in_channels = 3 * (FEATURE_CHANNELS[features] + 1) * frame_stride
        half = (width + 1) // 2
        quarter = (half + 1) // 2
        self.encoder_convs = nn.ModuleList(
            [
                _conv_block(nn.Conv2d(in_channels, channels, (1, 5), (1, 2), (0, 2)), channels),
                _conv_block(
                    nn.Conv2d(channels, channels, (1, 5), (1, 2), (0, 2), groups=2), channels
                ),
            ]
        )
        self.encoder_gt = nn.ModuleList(GTConvBlock(channels, hidden, d, rnn) for d in dilations)
        self.dual_path = nn.Sequential(
            *(DualPathGroupedRNN(channels, quarter, rnn) for _ in range(rnn_blocks))
        )
        self.decoder_gt = nn.ModuleList(
            GTConvBlock(channels, hidden, d, rnn) for d in reversed(dilations)
        )
        # Output sizes: stride-2 transposed convolutions give 2 K - 1 bands (33 -> 65 -> 129).
        if 2 * quarter - 1 != half or 2 * half - 1 != width:
            raise ValueError(f"{width} bands do not halve twice exactly; change low_bins")
        self.decoder_up = _conv_block(
            nn.ConvTranspose2d(channels, channels, (1, 5), (1, 2), (0, 2), groups=2), channels
        )
        self.decoder_out = nn.ConvTranspose2d(channels, 2 * frame_stride, (1, 5), (1, 2), (0, 2))
        with torch.no_grad():  # start as the identity: D = 0, unit mask
            self.decoder_out.weight.zero_()
            self.decoder_out.bias.zero_()

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        high = x[..., self.low_bins :] @ self.erb_merge.to(x.dtype)
        return torch.cat([x[..., : self.low_bins], high], dim=-1)

    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        high = x[..., self.low_bins :] @ self.erb_spread.to(x.dtype)
        return torch.cat([x[..., : self.low_bins], high], dim=-1)

    def _fold_frames(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, K)`` -> ``(B, C * s, ceil(T / s), K)``: network frame ``k`` holds input
        frames ``s k - s + 1 .. s k`` (``s - 1`` zero frames before the first), so that the
        output frames ``s k .. s k + s - 1`` decoded from it depend on no later input frame."""
        s = self.frame_stride
        if s == 1:
            return x
        b, c, t, k = x.shape
        x = F.pad(x, (0, 0, s - 1, -(t + s - 1) % s))
        x = x.reshape(b, c, -1, s, k).transpose(2, 3)
        return x.reshape(b, c * s, -1, k)

    def _unfold_frames(self, x: torch.Tensor, n_frames: int) -> torch.Tensor:
        """``(B, C * s, K', F)`` -> ``(B, C, n_frames, F)``: network frame ``k`` gives output
        frames ``s k .. s k + s - 1``."""
        s = self.frame_stride
        if s == 1:
            return x
        b, cs, k, f = x.shape
        x = x.reshape(b, cs // s, s, k, f).transpose(2, 3)
        return x.reshape(b, cs // s, k * s, f)[:, :, :n_frames]

    def estimate(self, features: torch.Tensor, reverberant: torch.Tensor) -> torch.Tensor:
        magnitude = torch.linalg.vector_norm(features, dim=1, keepdim=True)
        x = subband_features(self._merge(torch.cat([features, magnitude], dim=1)))
        x = self._fold_frames(x)
        if self.channels_last:  # NHWC activations: oneDNN's faster layout for small convs
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for layer in self.encoder_convs:
            x = layer(x)
            skips.append(x)
        for layer in self.encoder_gt:
            x = layer(x)
            skips.append(x)
        x = self.dual_path(x)
        for layer in self.decoder_gt:
            x = layer(x + skips.pop())
        x = self.decoder_up(x + skips.pop())
        delta = self.decoder_out(x + skips.pop()).float()
        delta = self._spread(self._unfold_frames(delta, reverberant.shape[-2]))  # (B, 2, T, F)
        # Bounded complex ratio mask, as bsrnn_lite's: |mask| = bound tanh(k |1 + D| / bound),
        # with k such that a unit mask stays a unit mask (the untrained model passes X through).
        mask = torch.complex(1 + delta[:, 0], delta[:, 1])
        size = mask.abs()
        k = self.mask_bound * math.atanh(1 / self.mask_bound)
        bounded = self.mask_bound * torch.tanh(k * size / self.mask_bound)
        return reverberant * mask * (bounded / (size + 1e-8))
