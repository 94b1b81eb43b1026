"""``training.inference.for_inference``: folding batch norm into convolutions changes nothing
but speed. The reference is the unmodified model (its batch norms applied as separate layers)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from training.inference import for_inference
from training.models import build_model

torch.set_num_threads(1)


def with_running_stats(model: nn.Module, n_freq: int) -> nn.Module:
    """A few training-mode passes so every batch norm has non-trivial running statistics (the
    identity statistics of a fresh model would hide a wrong fold)."""
    generator = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            spec = torch.randn(2, 64, n_freq, dtype=torch.complex64, generator=generator)
            model(spec * 3)
    return model.eval()


@pytest.mark.parametrize("name", ["unet", "bsrnn_lite", "gtcrn"])
def test_folded_model_gives_the_same_output(name: str) -> None:
    torch.manual_seed(0)
    model = with_running_stats(build_model(name, 257), 257)
    folded = for_inference(copy.deepcopy(model))
    spec = torch.randn(
        1, 100, 257, dtype=torch.complex64, generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        reference, estimate = model(spec), folded(spec)
    torch.testing.assert_close(estimate, reference, rtol=1e-4, atol=1e-5)
    assert not folded.training


def test_unet_batch_norms_are_folded_away() -> None:
    model = with_running_stats(build_model("unet", 257), 257)
    before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = for_inference(model)
    assert before == 9  # encoder levels 2-5 and the 5 decoder levels
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_a_grouped_transposed_convolution_is_left_alone() -> None:
    layers = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, 2, 1, groups=2), nn.BatchNorm2d(4))
    layers[1].running_mean.fill_(0.5)
    layers[1].running_var.fill_(2.0)
    x = torch.randn(1, 4, 5, 5)
    reference = layers.eval()(x)
    folded = for_inference(copy.deepcopy(layers))
    assert isinstance(folded[1], nn.BatchNorm2d)  # not folded (torch's fusion would be wrong)
    torch.testing.assert_close(folded(x), reference)
