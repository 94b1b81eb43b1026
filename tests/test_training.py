"""Tests of the training package: store reading, crops, features, models, losses, the loop.

The store used here is synthetic, written with the store format's own helpers
(``dereverb_data.store_format``; see :func:`write_synthetic_store`), so these tests do not
depend on the store builder and the layout cannot drift from what a build writes.
Speech-like harmonic signals are convolved with exponentially decaying noise RIRs; examples sit
at chunk-aligned offsets with zero frames between them.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy.signal import fftconvolve

from dereverb_data.stft import StftConfig, istft, stft
from dereverb_data.store_format import (
    create_signal_arrays,
    decode,
    encode,
    format_attrs,
    index_columns,
    layout_attrs,
    open_store,
    shard_checksum,
    write_index_group,
)
from training.data import (
    FEATURE_CHANNELS,
    CropDataset,
    ValidationDataset,
    compress_complex,
    crop_loader,
    decompress_complex,
    sample_crop,
    spec_features,
    torch_istft,
    torch_stft,
)
from training.losses import (
    DereverbLoss,
    compressed_complex_mse,
    compressed_magnitude_mse,
    multi_resolution_stft_loss,
    si_sdr,
)
from training.models import MODELS, build_model, count_parameters
from training.train import TrainConfig, load_model, lr_factor, train

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# Synthetic store in the project layout
# ---------------------------------------------------------------------------------------------

SAMPLE_RATE = 16_000
STFT = StftConfig(n_fft=512, hop=128, window="hann")
FRAMES_PER_CHUNK = 32
FRAMES_PER_SHARD = 128
# (split, seconds): frame counts 51, 113, 163, 32, 126, 88 | 101, 76 | 64
EXAMPLES = (
    ("train", 0.40),
    ("train", 0.90),
    ("train", 1.30),
    ("train", 0.25),
    ("train", 1.00),
    ("train", 0.70),
    ("valid", 0.80),
    ("valid", 0.60),
    ("test", 0.50),
)


def speech_like(rng: np.random.Generator, n_samples: int) -> np.ndarray:
    """Voiced-speech stand-in: harmonics of a gliding f0 under a syllable-rate envelope."""
    t = np.arange(n_samples) / SAMPLE_RATE
    f0 = rng.uniform(100, 200) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    formant = rng.uniform(400, 900)
    signal = sum(
        np.exp(-(((k * f0) - formant) ** 2) / (2 * 600.0**2)) * np.sin(k * phase) / k
        for k in range(1, 25)
    )
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, np.pi)), 0, 1)
    return (0.3 * signal * envelope + 1e-3 * rng.standard_normal(n_samples)).astype(np.float32)


def exponential_rir(rng: np.random.Generator, rt60: float) -> np.ndarray:
    """Direct path (gain 1 at sample 0) plus a noise tail decaying 60 dB in ``rt60`` seconds."""
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = 0.3 * rng.standard_normal(n) * 10 ** (-3 * t / rt60)
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0
    tail[0] = 1.0
    return tail


def write_synthetic_store(path: Path, storage_dtype: str = "complex64", seed: int = 0) -> Path:
    """Write the store to ``path`` and return it."""
    rng = np.random.default_rng(seed)
    n_freq = STFT.n_freq
    specs, rows, offset = [], [], 0
    for i, (split, seconds) in enumerate(EXAMPLES):
        n_samples = int(seconds * SAMPLE_RATE)
        clean = speech_like(rng, n_samples)
        rt60 = float(rng.uniform(0.3, 0.8))
        reverberant = fftconvolve(clean, exponential_rir(rng, rt60))[:n_samples]
        rev_spec, clean_spec = stft(reverberant, STFT), stft(clean, STFT)
        count = rev_spec.shape[0]
        specs.append((offset, rev_spec, clean_spec))
        rows.append(
            {
                "example_id": f"ex{i:03d}",
                "split": split,
                "utterance_id": f"utt{i:03d}",
                "speaker": f"spk{i % 3}",
                "rir_id": f"rir{i:03d}",
                "room_id": f"room{i % 2}",
                "variant": 0,
                "frame_offset": offset,
                "frame_count": count,
                "num_samples": n_samples,
                "shard": offset // FRAMES_PER_SHARD,
                "rms_dbfs": -25.0,
                "target_rt60": rt60,
                "gain": 1.0,
                "clean_gain": 1.0,
                "direct_index": 0,
                "gain_limited": False,
                "rt60_t20": rt60,
                "rt60_t30": rt60,
                "drr_db": 5.0,
                "c50_db": 10.0,
                "distance_m": 1.5,
            }
        )
        # Next example starts at the next chunk boundary, leaving at least one zero frame.
        offset = -(-(offset + count + 1) // FRAMES_PER_CHUNK) * FRAMES_PER_CHUNK
    n_frames = -(-offset // FRAMES_PER_SHARD) * FRAMES_PER_SHARD

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    stft_attrs = {"n_fft": STFT.n_fft, "hop": STFT.hop, "window": STFT.window}
    layout = layout_attrs(
        SAMPLE_RATE, stft_attrs, storage_dtype, FRAMES_PER_CHUNK, FRAMES_PER_SHARD
    )
    arrays = create_signal_arrays(
        group, n_frames, STFT.n_freq, storage_dtype, FRAMES_PER_CHUNK, FRAMES_PER_SHARD
    )
    stored = {}
    for name, which in (("reverberant", 1), ("clean", 2)):
        full = np.zeros((n_frames, n_freq), dtype=np.complex64)
        for item in specs:
            full[item[0] : item[0] + item[which].shape[0]] = item[which]
        stored[name] = encode(full, storage_dtype)
        arrays[name][...] = stored[name]
    checksums = [
        shard_checksum(
            stored["reverberant"][a : a + FRAMES_PER_SHARD],
            stored["clean"][a : a + FRAMES_PER_SHARD],
        )
        for a in range(0, n_frames, FRAMES_PER_SHARD)
    ]
    write_index_group(group, index_columns(rows), checksums)
    group.attrs.update(
        {
            **format_attrs(),
            **layout,
            "n_freq": n_freq,
            "n_examples": len(rows),
            "n_frames": n_frames,
            "n_shards": len(checksums),
            "manifest": {"name": "synthetic-test", "seed": seed},
            "complete": True,
        }
    )
    return path


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic.zarr"))


@pytest.fixture(scope="module")
def store_url_f16(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("store16") / "synthetic16.zarr"
    return str(write_synthetic_store(path, storage_dtype="float16"))


def tiny_config(**overrides) -> TrainConfig:
    """A run small enough for a test: tiny model, short crops, no workers, no progress bar."""
    values = dict(
        model="bsrnn_lite",
        model_kwargs={"channels": 8, "hidden": 8, "blocks": 1},
        crop_frames=32,
        batch_size=4,
        num_workers=0,
        lr=3e-3,
        min_lr=1e-4,
        warmup_steps=2,
        steps=8,
        eval_every=4,
        eval_examples=2,
        checkpoint_every=3,
        log_every=2,
        progress=False,
        seed=123,
    )
    values.update(overrides)
    return TrainConfig(**values)


# ---------------------------------------------------------------------------------------------
# Store and crops
# ---------------------------------------------------------------------------------------------


def test_open_store_reads_attrs_and_index(store_url: str) -> None:
    store = open_store(store_url)
    assert store.n_examples == len(EXAMPLES)
    assert store.n_freq == 257 and store.sample_rate == SAMPLE_RATE
    assert store.stft_config == STFT
    assert store.index["split"].tolist() == [split for split, _ in EXAMPLES]
    assert store.index["example_id"][0] == "ex000"
    assert store.index["frame_offset"].dtype == np.int64
    assert list(store.rows("valid")) == [6, 7]
    with pytest.raises(ValueError, match="no examples"):
        store.rows("nope")
    example = store.example(2)
    assert example["clean"].shape == (store.index["frame_count"][2], 257)
    assert example["clean"].dtype == np.complex64


def test_open_store_rejects_other_groups(tmp_path: Path) -> None:
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something"
    with pytest.raises(ValueError, match="dereverb-store"):
        open_store(tmp_path / "other.zarr")


def test_float16_storage_decodes_to_complex64(store_url: str, store_url_f16: str) -> None:
    pairs = np.array([[[1.5, -2.0], [0.0, 0.25]]], dtype=np.float16)
    np.testing.assert_array_equal(decode(pairs), np.array([[1.5 - 2j, 0.25j]]))
    exact, half = open_store(store_url), open_store(store_url_f16)
    assert half.arrays["clean"].dtype == np.float16 and half.arrays["clean"].shape[-1] == 2
    for row in range(exact.n_examples):
        a, b = exact.example(row), half.example(row)
        for name in ("reverberant", "clean"):
            assert b[name].dtype == np.complex64 and b[name].shape == a[name].shape
            error = np.sum(np.abs(a[name] - b[name]) ** 2) / np.sum(np.abs(a[name]) ** 2)
            assert 10 * np.log10(1 / error) > 60  # float16 keeps ~70 dB signal-to-error
    crops = CropDataset(store_url_f16, crop_frames=40, seed=1)
    assert crops[0]["reverberant"].dtype == torch.complex64


def test_sample_crop_is_pure_and_covers_examples() -> None:
    counts = np.array([10, 200, 50])
    draws = [sample_crop(counts, 64, seed=5, index=i) for i in range(400)]
    assert draws == [sample_crop(counts, 64, seed=5, index=i) for i in range(400)]
    assert draws != [sample_crop(counts, 64, seed=6, index=i) for i in range(400)]
    examples = np.array([d[0] for d in draws])
    assert set(examples) == {0, 1, 2}
    assert np.mean(examples == 1) > 0.6  # drawn in proportion to frame count (200/260)
    for example, first, length in draws:
        assert length == min(64, counts[example])
        assert first >= 0 and first + length <= counts[example]


def test_crops_stay_inside_one_example_and_equal_stored_frames(store_url: str) -> None:
    store = open_store(store_url)
    dataset = CropDataset(store_url, "train", crop_frames=64, seed=7)
    offsets, counts = store.index["frame_offset"], store.index["frame_count"]
    seen_short = seen_long = False
    for i in range(60):
        item = dataset[i]
        row, start, n_valid = item["row"], item["start"], int(item["mask"].sum())
        assert store.index["split"][row] == "train"
        assert offsets[row] <= start and start + n_valid <= offsets[row] + counts[row]
        assert n_valid == min(64, counts[row])
        assert item["mask"][:n_valid].all() and not item["mask"][n_valid:].any()
        for name in ("reverberant", "clean"):
            crop = item[name].numpy()
            assert crop.shape == (64, 257) and crop.dtype == np.complex64
            np.testing.assert_array_equal(crop[:n_valid], store.read(name, start, start + n_valid))
            assert not crop[n_valid:].any()  # padding is zero
            assert np.abs(crop[:n_valid]).sum(axis=1).min() > 0  # no inter-example zero frames
        seen_short |= n_valid < 64
        seen_long |= n_valid == 64
    assert seen_short and seen_long


def test_one_slice_read_per_signal_per_crop(store_url: str, monkeypatch) -> None:
    dataset = CropDataset(store_url, crop_frames=48, seed=0)
    store = dataset._lazy.store
    reads = []
    original = store.read
    monkeypatch.setattr(store, "read", lambda *args: reads.append(args) or original(*args))
    dataset[3]
    assert [name for name, *_ in reads] == ["reverberant", "clean"]


def test_dataset_pickles_without_open_arrays(store_url: str) -> None:
    import pickle

    dataset = CropDataset(store_url, crop_frames=16, seed=0)
    dataset[0]  # opens the store in this process
    state = pickle.loads(pickle.dumps(dataset))
    assert state._lazy._store is None
    torch.testing.assert_close(state[5]["clean"], dataset[5]["clean"])


def _collect(loader) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def test_loader_same_batches_with_0_and_2_workers_and_on_resume(store_url: str) -> None:
    dataset = CropDataset(store_url, crop_frames=40, seed=3)
    serial = _collect(crop_loader(dataset, batch_size=3, start_step=0, stop_step=5))
    parallel = _collect(
        crop_loader(dataset, batch_size=3, start_step=0, stop_step=5, num_workers=2)
    )
    resumed = _collect(crop_loader(dataset, batch_size=3, start_step=2, stop_step=5))
    assert len(serial) == len(parallel) == 5 and len(resumed) == 3
    for a, b in zip(serial, parallel, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for a, b in zip(serial[2:], resumed, strict=True):
        torch.testing.assert_close(a["clean"], b["clean"], rtol=0, atol=0)
    other_seed = _collect(crop_loader(CropDataset(store_url, crop_frames=40, seed=4), 3, 0, 1))
    assert not torch.equal(other_seed[0]["start"], serial[0]["start"])


def test_validation_dataset_yields_whole_examples(store_url: str) -> None:
    store = open_store(store_url)
    valid = ValidationDataset(store_url, "valid")
    assert len(valid) == 2 and len(ValidationDataset(store_url, "valid", max_examples=1)) == 1
    item = valid[1]
    assert item["example_id"] == "ex007"
    count = store.index["frame_count"][7]
    assert item["reverberant"].shape == (count, 257)
    np.testing.assert_array_equal(item["clean"].numpy(), store.example(7)["clean"])
    assert STFT.n_frames(item["num_samples"]) == count


# ---------------------------------------------------------------------------------------------
# Spectral transforms
# ---------------------------------------------------------------------------------------------


def test_torch_stft_and_istft_follow_the_project_convention() -> None:
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(4000).astype(np.float32)
    for config in (STFT, StftConfig(512, 128, "sqrt-hann")):
        reference = stft(signal, config)
        spec = torch_stft(torch.from_numpy(signal), config)
        np.testing.assert_allclose(spec.numpy(), reference, atol=2e-4)
        wave = torch_istft(torch.from_numpy(reference)[None], config, signal.size)[0]
        np.testing.assert_allclose(wave.numpy(), istft(reference, config, signal.size), atol=1e-4)
        np.testing.assert_allclose(wave.numpy(), signal, atol=1e-4)


def test_features_shapes_and_compression_inverse() -> None:
    spec = torch.randn(2, 5, 257, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    for kind, channels in FEATURE_CHANNELS.items():
        assert spec_features(spec, kind).shape == (2, channels, 5, 257)
    compressed = compress_complex(spec, 0.3)
    torch.testing.assert_close(compressed.abs(), spec.abs() ** 0.3, rtol=1e-4, atol=1e-4)
    # Same phase: compare unit phasors (angles wrap at +-pi).
    torch.testing.assert_close(compressed / compressed.abs(), spec / spec.abs(), atol=1e-4, rtol=0)
    torch.testing.assert_close(decompress_complex(compressed, 0.3), spec, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="unknown features"):
        spec_features(spec, "mel")


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def test_spectral_losses_are_zero_on_target_and_ignore_padding() -> None:
    torch.manual_seed(0)
    clean = torch.randn(2, 16, 257, dtype=torch.complex64)
    assert compressed_magnitude_mse(clean, clean) < 1e-10
    assert compressed_complex_mse(clean, clean) < 1e-10
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[:, 10:] = False
    corrupted = clean.clone()
    corrupted[:, 10:] = 5.0  # only on padded frames
    assert compressed_magnitude_mse(corrupted, clean, mask) < 1e-10
    assert compressed_complex_mse(corrupted, clean, mask) < 1e-10
    assert compressed_complex_mse(corrupted, clean) > 0.1
    # The complex term sees phase errors that the magnitude term cannot.
    rotated = clean * 1j
    assert compressed_magnitude_mse(rotated, clean) < 1e-8
    assert compressed_complex_mse(rotated, clean) > 0.5


def test_dereverb_loss_combines_weighted_terms_and_has_finite_gradients() -> None:
    torch.manual_seed(0)
    clean = torch.randn(2, 20, 257, dtype=torch.complex64)
    estimate = (clean + 0.3 * torch.randn_like(clean)).requires_grad_()
    estimate_with_zeros = estimate * torch.cat([torch.ones(10), torch.zeros(10)])[:, None]
    loss_fn = DereverbLoss(magnitude_weight=0.5, complex_weight=0.2, mrstft_weight=0.1)
    total, parts = loss_fn(estimate_with_zeros, clean)
    assert set(parts) == {"magnitude", "complex", "mrstft"}
    expected = 0.5 * parts["magnitude"] + 0.2 * parts["complex"] + 0.1 * parts["mrstft"]
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    assert torch.isfinite(estimate.grad.real).all() and torch.isfinite(estimate.grad.imag).all()
    _, only_mag = DereverbLoss(1.0, 0.0, 0.0)(estimate.detach(), clean)
    assert set(only_mag) == {"magnitude"}


def test_si_sdr_and_multi_resolution_stft_loss_on_known_signals() -> None:
    torch.manual_seed(0)
    reference = torch.randn(3, 8000)
    assert (si_sdr(2.5 * reference, reference) > 60).all()  # scale-invariant
    noisy = reference + 0.1 * torch.randn(3, 8000)
    torch.testing.assert_close(si_sdr(noisy, reference), torch.full((3,), 20.0), atol=0.3, rtol=0)
    assert multi_resolution_stft_loss(reference, reference) < 1e-6
    assert multi_resolution_stft_loss(noisy, reference) > 0.01


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_maps_a_batch_to_a_complex_estimate(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 257)
    spec = torch.randn(3, 37, 257, dtype=torch.complex64)
    estimate = model(spec)
    assert estimate.shape == (3, 37, 257) and estimate.dtype == torch.complex64
    single = model.enhance_spec(spec[0])
    assert single.shape == (37, 257) and single.dtype == torch.complex64
    assert model.training  # enhance_spec restores the mode
    as_numpy = model.enhance_spec(spec[0].numpy())
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.complex64
    torch.testing.assert_close(model.enhance_spec(spec)[0], single, rtol=1e-4, atol=1e-5)
    assert 0 < count_parameters(model) <= 2_000_000


def test_bsrnn_starts_as_identity_and_causal_option_ignores_the_future() -> None:
    torch.manual_seed(0)
    spec = torch.randn(1, 30, 257, dtype=torch.complex64)
    for output in ("mapping", "mask"):
        model = build_model("bsrnn_lite", 257, output=output)
        torch.testing.assert_close(model.enhance_spec(spec), spec, rtol=1e-3, atol=1e-4)
    changed = spec.clone()
    changed[:, 20:] = torch.randn(1, 10, 257, dtype=torch.complex64)
    for causal in (True, False):
        model = build_model("bsrnn_lite", 257, causal=causal)
        with torch.no_grad():  # perturb so that the output depends on the input
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        a, b = model.enhance_spec(spec), model.enhance_spec(changed)
        assert not torch.allclose(a[:, 20:], b[:, 20:])
        past_unchanged = torch.allclose(a[:, :20], b[:, :20], rtol=1e-5, atol=1e-6)
        assert past_unchanged == causal  # only the causal model ignores future frames


def test_bsrnn_feature_options() -> None:
    spec = torch.randn(2, 12, 257, dtype=torch.complex64)
    for features in ("compressed_magnitude", "log_magnitude"):
        model = build_model("bsrnn_lite", 257, features=features, output="mask")
        assert model(spec).shape == (2, 12, 257)
        with pytest.raises(ValueError, match="mapping"):
            build_model("bsrnn_lite", 257, features=features)
    plain = build_model("bsrnn_lite", 257, magnitude_input=False)
    assert count_parameters(plain) < count_parameters(build_model("bsrnn_lite", 257))
    assert plain(spec).shape == (2, 12, 257)


def test_unet_uses_the_reverberant_phase() -> None:
    torch.manual_seed(0)
    model = build_model("unet", 257)
    spec = torch.randn(2, 40, 257, dtype=torch.complex64)
    estimate = model.enhance_spec(spec)
    keep = estimate[..., :-1].abs() > 1e-3
    phase_error = torch.angle(estimate[..., :-1] * spec[..., :-1].conj())[keep]
    assert phase_error.abs().max() < 1e-3
    assert (estimate[..., -1] == 0).all()  # Nyquist bin dropped, as in Ernst et al.
    with pytest.raises(ValueError):
        build_model("unet", 257, features="compressed_complex")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("bsrnn_lite", {"channels": 16, "hidden": 16, "blocks": 1}),
        ("bsrnn_lite", {"channels": 16, "hidden": 16, "blocks": 1, "output": "mask"}),
        ("unet", {"widths": (8, 16, 16), "dropout": 0.0}),
        ("gtcrn", {}),  # batch norm: eval mode must use running statistics that followed
    ],
)
def test_model_loss_falls_in_a_few_dozen_steps(store_url: str, name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    batch = next(iter(crop_loader(CropDataset(store_url, crop_frames=48, seed=0), 6, 0, 1)))
    model = build_model(name, 257, **kwargs)
    loss_fn = DereverbLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_loss() -> float:
        estimate = model.enhance_spec(batch["reverberant"])
        return loss_fn(estimate, batch["clean"], batch["mask"])[0].item()

    before = eval_loss()
    for _ in range(40):
        loss, _ = loss_fn(model(batch["reverberant"]), batch["clean"], batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# Training loop, checkpoints, resume
# ---------------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_min_lr() -> None:
    config = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, steps=110)
    factors = [lr_factor(step, config) for step in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert lr_factor(110, config) == pytest.approx(0.01)


def test_train_writes_checkpoint_logs_and_metrics(store_url: str, tmp_path: Path) -> None:
    config = tiny_config()
    metrics = train(config, store_url, tmp_path / "run")
    assert metrics["step"] == 8
    for key in ("train_loss", "valid_loss", "valid_si_sdr", "valid_si_sdr_improvement"):
        assert np.isfinite(metrics[key])
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == config.to_dict()
    assert json.loads((run / "metrics.json").read_text())["step"] == 8
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run.glob("*.tmp"))

    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 8 and checkpoint["config"] == config.to_dict()
    assert {"model", "optimizer", "scheduler", "rng"} <= set(checkpoint)

    model, loaded_config = load_model(run / "checkpoint.pt")
    assert loaded_config == TrainConfig.from_dict(config.to_dict()) and not model.training
    example = ValidationDataset(store_url, "valid")[0]
    again, _ = load_model(run / "checkpoint.pt")
    torch.testing.assert_close(
        model.enhance_spec(example["reverberant"]), again.enhance_spec(example["reverberant"])
    )
    # Running again with the same config finds the finished run and does nothing more.
    assert train(config, store_url, run)["step"] == 8


def test_interrupted_then_resumed_run_equals_uninterrupted_run(
    store_url: str, tmp_path: Path
) -> None:
    config = tiny_config()
    train(config, store_url, tmp_path / "straight")

    interrupted = train(config, store_url, tmp_path / "resumed", stop_at_step=5)
    assert interrupted["step"] == 5
    on_disk = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert on_disk["step"] == 3  # the kill lost steps 4-5: they are redone
    # The resumed half may use another number of workers: the data do not depend on it.
    train(tiny_config(num_workers=2), store_url, tmp_path / "resumed")

    straight, _ = load_model(tmp_path / "straight" / "checkpoint.pt")
    resumed, _ = load_model(tmp_path / "resumed" / "checkpoint.pt")
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resume")


def test_resume_with_dropout_model_restores_rng(store_url: str, tmp_path: Path) -> None:
    config = tiny_config(
        model="unet",
        model_kwargs={"widths": (4, 8), "dropout": 0.5, "dropout_layers": 2},
        steps=5,
        eval_every=100,
        checkpoint_every=2,
    )
    train(config, store_url, tmp_path / "straight")
    train(config, store_url, tmp_path / "resumed", stop_at_step=3)
    train(config, store_url, tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_resume_refuses_a_different_config(store_url: str, tmp_path: Path) -> None:
    train(tiny_config(steps=3), store_url, tmp_path / "run")
    with pytest.raises(ValueError, match="different config"):
        train(tiny_config(steps=3, lr=1e-2), store_url, tmp_path / "run")


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[1] / "manifests" / "training").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_training_configs_load_and_build_their_model(path: Path) -> None:
    from training.config import load_train_config

    config = load_train_config(str(path))
    assert config.model in MODELS
    model = build_model(config.model, 257, **config.model_kwargs)
    assert count_parameters(model) > 0
    assert config.warmup_steps < config.steps
