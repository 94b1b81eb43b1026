"""A trained model ready for ``enhance`` and ``evaluate``: loaded, and rewritten to run faster.

:func:`load_checkpoint` reads a training checkpoint, an exported model or the packaged default
model, and applies two exact rewrites meant for speed:

- **Denormal floats flushed to zero** (``torch.set_flush_denormal``, process-wide): some of a
  trained network's intermediate values fall into the denormal range (below 1.2e-38), where x86
  CPUs are many times slower per operation, and change no output sample.
- **Batch norm folded into the convolution before it** (:func:`for_inference`). In eval mode a
  batch norm is a fixed per-channel affine map, so ``torch.nn.utils.fusion.fuse_conv_bn_eval``
  moves it into the convolution's weights and bias: the same output up to float32 rounding
  (tests/test_inference.py checks it against the unmodified model), one pass over every
  activation less.

Measured (``benchmarks/inference_speed.py``, RESULTS.md "Inference speed", session 8): 1.6x
under load in a first run, within the VM's run-to-run noise on a quiet machine; kept because
they are exact, cheap and tested.

Tried and not kept: stride-2 transposed convolutions rewritten as sub-pixel convolutions (one
``conv2d`` with 4x the output channels + ``pixel_shuffle``, Shi et al. 2016): exact, but 1.2-1.5x
slower per layer than oneDNN's ``conv_transpose2d`` here; channels-last memory format: slower.

Training keeps the original layers (resuming rebuilds them from the checkpoint); only the models
loaded for ``enhance`` and ``evaluate`` are rewritten.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dereverb_data.stft import WINDOWS, StftConfig

from .checkpoint import model_from_checkpoint, not_a_checkpoint, one_line, read_checkpoint


def load_checkpoint(
    checkpoint: str | Path | None = None, device: str = "cpu"
) -> tuple[torch.nn.Module, StftConfig, int]:
    """The model (eval mode, ``training.inference.for_inference``), its STFT settings and sample
    rate, from a training checkpoint (``.pt``), an exported model (``.safetensors``,
    ``training.packaged``) or, for ``None``, the packaged default model.

    Raises ``FileNotFoundError`` for a missing file and ``training.checkpoint.CheckpointError``
    (a ``ValueError``, message ``<path>: not a dereverb checkpoint (...)``) for anything else
    that is not a usable checkpoint.
    """
    from .packaged import DEFAULT_MODEL_FILE, is_exported, read_exported

    checkpoint = DEFAULT_MODEL_FILE if checkpoint is None else checkpoint
    # A .pt checkpoint is read once, never with weights_only=False.
    saved = read_exported(checkpoint) if is_exported(checkpoint) else read_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(saved, checkpoint, device)
    s = saved["stft"]
    try:
        config = StftConfig(int(s["n_fft"]), int(s["hop"]), s["window"])
        sample_rate = int(saved["sample_rate"])
    except (TypeError, ValueError) as exc:
        raise not_a_checkpoint(checkpoint, f"bad stft or sample_rate: {one_line(exc)}") from None
    # The model's input width must be the STFT's; a mismatch would only fail mid-file later.
    if config.window not in WINDOWS or config.n_freq != int(saved["n_freq"]) or sample_rate <= 0:
        raise not_a_checkpoint(
            checkpoint, f"inconsistent stft {s!r}, n_freq {saved['n_freq']}, rate {sample_rate}"
        )
    torch.set_flush_denormal(True)  # see the module's docstring
    return for_inference(model), config, sample_rate


def for_inference(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every ``(Conv2d | ConvTranspose2d, BatchNorm2d)`` pair inside
    an ``nn.Sequential`` folded into one convolution, in place; returns it."""
    model.eval()
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            _fold_sequence(module)
    return model


def _fold_sequence(sequence: nn.Sequential) -> None:
    layers = list(sequence)
    for i in range(len(layers) - 1):
        conv, norm = layers[i], layers[i + 1]
        if not (isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats):
            continue
        if isinstance(conv, nn.ConvTranspose2d):
            if conv.groups != 1:  # torch's fusion scales the wrong weight axis for these
                continue
            sequence[i] = fuse_conv_bn_eval(conv, norm, transpose=True)
        elif isinstance(conv, nn.Conv2d):
            sequence[i] = fuse_conv_bn_eval(conv, norm)
        else:
            continue
        sequence[i + 1] = nn.Identity()
