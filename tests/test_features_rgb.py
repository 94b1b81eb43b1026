"""The spectrogram-as-RGB-image input and the linear magnitude (issue 13, item 5).

The image path must encode exactly what it claims (a colour-mapped 8-bit picture of the
per-image normalised dB spectrogram): decoding an image gives back the array it encodes,
within the 8-bit quantisation, and re-encoding that array gives the same image.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import FEATURE_CHANNELS, spec_features
from training.features_rgb import (
    LEVELS,
    TOP_DB,
    ambiguous_levels,
    colormap_lut,
    decode_rgb,
    encode_rgb,
    log_spectrogram_db,
    rgb_image_features,
)
from training.train import TrainConfig, load_model, train

from .test_training import write_synthetic_store

REPO = Path(__file__).resolve().parents[1]


def _ablation():
    path = REPO / "benchmarks" / "feature_ablation.py"
    spec = importlib.util.spec_from_file_location("feature_ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spec(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Speech-like spread of levels: a log-normal magnitude over ~100 dB, random phase.
    magnitude = torch.exp(3 * torch.randn(shape, generator=generator))
    phase = 2 * torch.pi * torch.rand(shape, generator=generator)
    return torch.polar(magnitude, phase)


def test_colormap_is_matplotlib_viridis_in_8_bits() -> None:
    from matplotlib import colormaps

    lut = colormap_lut()
    assert lut.shape == (LEVELS, 3) and lut.dtype == torch.uint8
    reference = np.round(colormaps["viridis"](np.linspace(0, 1, LEVELS))[:, :3] * 255)
    np.testing.assert_array_equal(lut.numpy(), reference)
    # 8-bit viridis gives two pairs of neighbouring levels one colour each; decode knows them.
    assert ambiguous_levels() == [112, 113, 129, 130]


def test_image_round_trips_to_the_array_it_encodes() -> None:
    log_spec = log_spectrogram_db(_spec((3, 40, 65)))
    image, lo, hi = encode_rgb(log_spec)
    assert image.shape == (3, 3, 40, 65) and image.dtype == torch.uint8
    assert lo.shape == hi.shape == (3, 1, 1)
    # Per-image normalisation: every image uses the whole colour map, whatever its level.
    assert torch.equal(lo, log_spec.amin(dim=(1, 2), keepdim=True))
    assert torch.all(hi - lo <= TOP_DB + 1e-3)
    decoded = decode_rgb(image, lo, hi)
    step = (hi - lo) / (LEVELS - 1)  # dB per 8-bit level, per image
    error = (decoded - log_spec).abs() / step
    levels = ((log_spec - lo) / step).round().long()
    shared = torch.isin(levels, torch.tensor(ambiguous_levels()))
    assert shared.any() and (~shared).any()
    assert error[~shared].max() <= 0.5 + 1e-3  # half a quantisation level
    assert error[shared].max() <= 1.0 + 1e-3  # a shared colour decodes to its levels' middle
    # Image -> array -> image is exact, and the float image the network sees decodes the same.
    assert torch.equal(encode_rgb(decoded, lo, hi)[0], image)
    features = rgb_image_features(torch.polar(10 ** (log_spec / 20), torch.zeros_like(log_spec)))
    assert torch.equal(decode_rgb(features, lo, hi), decoded)


def test_image_normalisation_hides_the_level() -> None:
    spec = _spec((1, 30, 33), seed=1)
    # 40 dB quieter, same picture: the image carries no absolute level.
    torch.testing.assert_close(rgb_image_features(spec), rgb_image_features(spec * 0.01))
    flat = torch.ones(1, 4, 5, dtype=torch.complex64)  # hi == lo: level 0, no NaN
    features = rgb_image_features(flat)
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features[0, :, 0, 0], colormap_lut()[0].float() / 255)


def test_new_features_shapes_and_linear_magnitude_against_numpy() -> None:
    assert FEATURE_CHANNELS["linear_magnitude"] == 1 and FEATURE_CHANNELS["rgb_image"] == 3
    spec = _spec((2, 7, 257), seed=2).to(torch.complex64)
    linear = spec_features(spec, "linear_magnitude")
    assert linear.shape == (2, 1, 7, 257) and linear.dtype == torch.float32
    np.testing.assert_allclose(linear[:, 0].numpy(), np.abs(spec.numpy()), rtol=1e-6)
    rgb = spec_features(spec, "rgb_image")
    assert rgb.shape == (2, 3, 7, 257) and rgb.dtype == torch.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    # Every pixel is one of the colour map's 256 colours.
    colours = {tuple(c) for c in colormap_lut().tolist()}
    pixels = (rgb * 255).round().long().movedim(1, -1).reshape(-1, 3).tolist()
    assert {tuple(p) for p in pixels} <= colours


def test_feature_unet_takes_every_input_and_keeps_the_output() -> None:
    ablation = _ablation()
    spec = _spec((1, 20, 257), seed=3).to(torch.complex64)
    for features, channels in FEATURE_CHANNELS.items():
        torch.manual_seed(0)
        model = ablation.FeatureUNet(257, features=features, widths=(4, 8))
        assert model.encoder[0][0].in_channels == channels
        out = model(spec)
        assert out.shape == spec.shape and out.dtype == torch.complex64
    with pytest.raises(ValueError, match="unknown features"):
        ablation.FeatureUNet(257, features="mel")


def test_rgb_feature_trains_through_the_unet(tmp_path: Path) -> None:
    ablation = _ablation()
    ablation.register()
    store = str(write_synthetic_store(tmp_path / "store.zarr"))
    config = TrainConfig(
        model=ablation.MODEL_NAME,
        model_kwargs={"widths": [4, 8, 8]},
        features="rgb_image",
        crop_frames=32,
        batch_size=2,
        num_workers=0,
        lr=3e-3,
        warmup_steps=1,
        steps=4,
        eval_every=4,
        eval_examples=1,
        checkpoint_every=4,
        progress=False,
        device="cpu",
    )
    metrics = train(config, store, tmp_path / "run")
    assert metrics["step"] == 4 and np.isfinite(metrics["train_loss"])
    assert np.isfinite(metrics["valid_loss"])
    model, saved = load_model(tmp_path / "run" / "checkpoint.pt")
    assert saved.features == "rgb_image" and model.input_features == "rgb_image"
    assert model.encoder[0][0].in_channels == 3
    spec = _spec((40, 257), seed=4).to(torch.complex64)
    enhanced = model.enhance_spec(spec)
    assert enhanced.shape == spec.shape and torch.isfinite(torch.view_as_real(enhanced)).all()
