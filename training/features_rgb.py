"""Spectrograms as 8-bit colour images: the ``rgb_image`` network input (issue 13, item 5).

A common recipe outside speech research trains an image U-Net on spectrograms saved as
pictures: the magnitude STFT in decibels, clipped ``top_db`` below its loudest bin (librosa's
``amplitude_to_db(ref=np.max, top_db=80)``), stretched to its own minimum and maximum (what
``plt.imsave`` / ``Normalize()`` does to each image), looked up in a colour map (viridis,
matplotlib's default) and written as 8-bit RGB. This module reproduces that pipeline on torch
tensors so the same U-Net can be trained on it and on the plain STFT arrays, and measured:

- :func:`log_spectrogram_db`: ``20 log10 |X|`` floored ``top_db`` below each image's maximum.
- :func:`encode_rgb`: per-image min-max normalisation -> 256-level quantisation -> colour map ->
  ``uint8`` ``(B, 3, T, F)``, plus the per-image range needed to undo it.
- :func:`decode_rgb`: the inverse, pixel -> nearest colour-map entry -> level -> decibels, exact
  up to the 8-bit quantisation: half a level, ``(hi - lo) / 255 / 2`` dB, except one level for
  the two pairs of levels that 8-bit viridis gives one colour each (:func:`ambiguous_levels`).
  Image -> array -> image is exact.
- :func:`rgb_image_features`: the network input, the image as float channels in ``[0, 1]``.

What the image throws away, and why it matters to a dereverberation model: the absolute level
(every image spans ``[0, 1]`` whatever its loudness), everything more than ``top_db`` below the
peak (the tail of the reverberation), and resolution below ``(hi - lo) / 255`` dB (0.31 dB for
80 dB). What it keeps is a compressed, level-normalised magnitude, which is what a network
finds easy to learn from; a linear magnitude array has neither property.

Input features only: nothing here is differentiable (quantisation), and nothing needs to be.
Shapes follow the project convention (complex ``(B, T, F)`` in), but every function treats the
last two axes as the image, so ``(B, F, T)`` works the same way.
"""

from __future__ import annotations

import functools

import torch

LEVELS = 256  # 8-bit images
TOP_DB = 80.0  # librosa.amplitude_to_db's default floor below the image maximum
COLORMAP = "viridis"  # matplotlib's default colour map
_AMPLITUDE_FLOOR = 1e-10  # -200 dB: keeps log10 finite at exact zeros (then floored by top_db)


@functools.cache
def _lut_cpu(name: str) -> torch.Tensor:
    # matplotlib is a declared dependency (pyproject.toml: plots); imported here, not at module
    # level, so training runs that never ask for RGB features do not pay for importing it.
    from matplotlib import colormaps

    rgba = colormaps[name].resampled(LEVELS)(torch.arange(LEVELS).numpy())
    return torch.from_numpy(rgba[:, :3]).mul(255).round().to(torch.uint8)


@functools.cache
def _decode_table_cpu(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Distinct colours and the level each stands for. In 8 bits viridis gives levels 112/113
    # and 129/130 the same colour (254 distinct colours for 256 levels), as any viridis PNG
    # does; such a colour decodes to the middle of its levels, so the error stays within one
    # level there and half a level everywhere else.
    lut = _lut_cpu(name)
    colours, which = torch.unique(lut, dim=0, return_inverse=True)
    level_sum = torch.zeros(len(colours), dtype=torch.float64)
    level_sum.index_add_(0, which, torch.arange(LEVELS, dtype=torch.float64))
    count = torch.bincount(which, minlength=len(colours)).double()
    return colours, level_sum / count


def colormap_lut(name: str = COLORMAP, device: torch.device | str | None = None) -> torch.Tensor:
    """The colour map as a ``(256, 3)`` ``uint8`` table: level ``k`` -> its RGB colour."""
    return _lut_cpu(name).to(device)


def ambiguous_levels(name: str = COLORMAP) -> list[int]:
    """Levels whose 8-bit colour another level shares (viridis: 112, 113, 129, 130)."""
    lut = _lut_cpu(name)
    _, which, counts = torch.unique(lut, dim=0, return_inverse=True, return_counts=True)
    return [k for k in range(LEVELS) if counts[which[k]] > 1]


def log_spectrogram_db(spec: torch.Tensor, top_db: float | None = TOP_DB) -> torch.Tensor:
    """``20 log10 |X|`` of a complex ``(..., T, F)`` STFT, each image floored ``top_db`` below its
    own maximum (no floor when ``top_db`` is None)."""
    db = 20 * torch.log10(spec.abs().clamp_min(_AMPLITUDE_FLOOR))
    if top_db is None:
        return db
    peak = db.amax(dim=(-2, -1), keepdim=True)
    return torch.maximum(db, peak - top_db)


def encode_rgb(
    log_spec: torch.Tensor,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    colormap: str = COLORMAP,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A real ``(B, T, F)`` (log) spectrogram as an 8-bit RGB image ``(B, 3, T, F)`` ``uint8``.

    Each image is normalised to its own range ``[lo, hi]`` (default: its minimum and maximum,
    ``(B, 1, 1)``), quantised to 256 levels and coloured through ``colormap``. Returns the image
    and the ``lo``, ``hi`` that :func:`decode_rgb` needs to invert it.
    """
    if lo is None:
        lo = log_spec.amin(dim=(-2, -1), keepdim=True)
    if hi is None:
        hi = log_spec.amax(dim=(-2, -1), keepdim=True)
    # A flat image (hi == lo) maps to level 0 instead of dividing by zero.
    scale = (hi - lo).clamp_min(torch.finfo(log_spec.dtype).tiny)
    unit = ((log_spec - lo) / scale).clamp(0, 1)
    levels = (unit * (LEVELS - 1)).round().long()
    image = colormap_lut(colormap, log_spec.device)[levels]  # (B, T, F, 3)
    return image.movedim(-1, -3), lo, hi


def decode_rgb(
    image: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, colormap: str = COLORMAP
) -> torch.Tensor:
    """Inverse of :func:`encode_rgb`: ``(B, 3, T, F)`` image (``uint8``, or float in ``[0, 1]``)
    -> the ``(B, T, F)`` spectrogram it encodes, to within half a quantisation level.

    Each pixel takes the level of the nearest colour-map entry (exact for an unaltered image;
    nearest for one that was resampled or compressed; the middle level for a colour that two
    levels share), and the level is mapped back to ``[lo, hi]``.
    """
    if image.dtype != torch.uint8:
        image = (image * 255).round()
    pixels = image.movedim(-3, -1).float()  # (B, T, F, 3)
    colours, colour_level = _decode_table_cpu(colormap)
    colours = colours.to(image.device).float()
    flat = pixels.reshape(-1, 3)
    nearest = torch.empty(flat.shape[0], dtype=torch.long, device=image.device)
    chunk = 1 << 16  # bounds the (pixels x 256) distance matrix at 64 MiB
    for start in range(0, flat.shape[0], chunk):
        distance = torch.cdist(flat[start : start + chunk], colours)
        nearest[start : start + chunk] = distance.argmin(1)
    level = colour_level.to(device=image.device, dtype=lo.dtype)[nearest]
    unit = level.reshape(pixels.shape[:-1]) / (LEVELS - 1)
    return lo + unit * (hi - lo)


def rgb_image_features(
    spec: torch.Tensor, top_db: float | None = TOP_DB, colormap: str = COLORMAP
) -> torch.Tensor:
    """Network input from a complex ``(B, T, F)`` STFT: the colour-mapped 8-bit image of its log
    spectrogram, per-image normalised, as float ``(B, 3, T, F)`` in ``[0, 1]`` (the image a
    reader would load back with ``/ 255``)."""
    with torch.no_grad():
        image, _, _ = encode_rgb(log_spectrogram_db(spec.detach(), top_db), colormap=colormap)
    return image.float() / 255
