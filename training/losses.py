"""Training losses and the SI-SDR metric: pure functions first, one module combining them.

Spectra are complex ``(B, T, F)`` tensors in the project's STFT convention; ``mask`` is an
optional bool/float ``(B, T)`` marking real frames (False on the zero padding after a short
example), and every spectral loss averages over the real frames only.

- :func:`compressed_magnitude_mse`: ``mean (|Y|^c - |S|^c)^2``;
- :func:`compressed_complex_mse`: ``mean |Y_c - S_c|^2`` with ``X_c = |X|^c e^{j angle X}``,
  the term that trains the phase;
- :func:`multi_resolution_stft_loss`: spectral convergence + log-magnitude L1 at several STFT
  resolutions (Yamamoto et al., Parallel WaveGAN, 2020) on waveforms from :func:`torch_istft`;
- :func:`si_sdr`: scale-invariant SDR in dB (a metric; ``-si_sdr`` is a loss);
- :class:`DereverbLoss`: weighted sum, weights from the training config.

The default weights (0.7 magnitude, 0.3 complex) are CMGAN's time-frequency loss.
"""

from __future__ import annotations

import torch
from torch import nn

from dereverb_data.stft import StftConfig
from training.data import (
    COMPRESS_EXPONENT,
    compress_complex,
    compressed_magnitude,
    torch_istft,
    torch_stft,
)

MRSTFT_RESOLUTIONS = ((512, 128), (1024, 256), (256, 64))  # (n_fft, hop), Hann windows


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(B, T, F)`` values over the frames where ``mask`` ``(B, T)`` is set."""
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype).unsqueeze(-1)
    return (values * weight).sum() / (weight.sum() * values.shape[-1]).clamp_min(1.0)


def compressed_magnitude_mse(
    estimate: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None = None,
    exponent: float = COMPRESS_EXPONENT,
) -> torch.Tensor:
    """MSE between power-law compressed magnitudes ``|Y|^c`` and ``|S|^c``."""
    diff = compressed_magnitude(estimate, exponent) - compressed_magnitude(reference, exponent)
    return _masked_mean(diff.square(), mask)


def compressed_complex_mse(
    estimate: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None = None,
    exponent: float = COMPRESS_EXPONENT,
) -> torch.Tensor:
    """Mean squared distance between compressed complex spectra ``|X|^c e^{j angle X}``."""
    diff = compress_complex(estimate, exponent) - compress_complex(reference, exponent)
    return _masked_mean(diff.real.square() + diff.imag.square(), mask)


def stft_magnitude_losses(
    estimate: torch.Tensor, reference: torch.Tensor, n_fft: int, hop: int, eps: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral convergence and log-magnitude L1 between two ``(B, N)`` waveforms at one STFT."""
    config = StftConfig(n_fft=n_fft, hop=hop, window="hann")
    est = torch_stft(estimate, config).abs()
    ref = torch_stft(reference, config).abs()
    convergence = torch.linalg.vector_norm(ref - est, dim=(-2, -1)) / (
        torch.linalg.vector_norm(ref, dim=(-2, -1)) + eps
    )
    log_l1 = (torch.log(est + eps) - torch.log(ref + eps)).abs().mean(dim=(-2, -1))
    return convergence.mean(), log_l1.mean()


def multi_resolution_stft_loss(
    estimate: torch.Tensor,
    reference: torch.Tensor,
    resolutions: tuple[tuple[int, int], ...] = MRSTFT_RESOLUTIONS,
) -> torch.Tensor:
    """Mean over resolutions of spectral convergence + log-magnitude L1, on ``(B, N)`` waveforms."""
    total = estimate.new_zeros(())
    for n_fft, hop in resolutions:
        convergence, log_l1 = stft_magnitude_losses(estimate, reference, n_fft, hop)
        total = total + convergence + log_l1
    return total / len(resolutions)


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB of ``(..., N)`` waveforms (Le Roux et al., 2019), per item.

    Both signals are made zero-mean; the reference is scaled to its best fit to the estimate.
    """
    estimate = estimate - estimate.mean(dim=-1, keepdim=True)
    reference = reference - reference.mean(dim=-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / (
        reference.square().sum(-1, keepdim=True) + eps
    )
    target = scale * reference
    noise = estimate - target
    return 10 * torch.log10((target.square().sum(-1) + eps) / (noise.square().sum(-1) + eps))


class DereverbLoss(nn.Module):
    """``w_mag * compressed_magnitude_mse + w_complex * compressed_complex_mse
    + w_mrstft * multi_resolution_stft_loss(istft(Y), istft(S))``.

    ``forward(estimate, reference, mask)`` returns ``(total, parts)``: the scalar loss and a dict
    of the unweighted terms (detached), for logging. Terms with weight 0 are not computed.
    The waveform term zeroes the padded frames of both spectra before the inverse STFT.
    """

    def __init__(
        self,
        magnitude_weight: float = 0.7,
        complex_weight: float = 0.3,
        mrstft_weight: float = 0.0,
        exponent: float = COMPRESS_EXPONENT,
        stft: StftConfig | None = None,
    ):
        super().__init__()
        self.magnitude_weight = magnitude_weight
        self.complex_weight = complex_weight
        self.mrstft_weight = mrstft_weight
        self.exponent = exponent
        self.stft = stft or StftConfig()

    def forward(
        self, estimate: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        total = estimate.real.new_zeros(())
        if self.magnitude_weight:
            parts["magnitude"] = compressed_magnitude_mse(estimate, reference, mask, self.exponent)
            total = total + self.magnitude_weight * parts["magnitude"]
        if self.complex_weight:
            parts["complex"] = compressed_complex_mse(estimate, reference, mask, self.exponent)
            total = total + self.complex_weight * parts["complex"]
        if self.mrstft_weight:
            if mask is not None:
                keep = mask.to(estimate.real.dtype).unsqueeze(-1)
                estimate, reference = estimate * keep, reference * keep
            length = (estimate.shape[-2] - 1) * self.stft.hop
            parts["mrstft"] = multi_resolution_stft_loss(
                torch_istft(estimate, self.stft, length), torch_istft(reference, self.stft, length)
            )
            total = total + self.mrstft_weight * parts["mrstft"]
        return total, {name: value.detach() for name, value in parts.items()}
