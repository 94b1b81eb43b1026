"""Exported models (one ``.safetensors`` file) and the default model shipped with the package.

The exported form must rebuild exactly the model of its checkpoint (float32) or one whose output
differs only by float16 rounding of the weights; it is read without unpickling anything; and
``enhance`` / ``evaluate`` use the packaged file when no ``--checkpoint`` is given.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dereverb_data.demo_corpus import synthesize_utterance
from dereverb_data.stft import stft
from training.checkpoint import CheckpointError
from training.inference import load_checkpoint
from training.models import MODELS
from training.packaged import DEFAULT_MODEL_DIR, DEFAULT_MODEL_FILE, METADATA_KEY, export_model

from .conftest import run_cli
from .test_cli_commands import config_file, run_main, store, trained  # noqa: F401 (fixtures)

CARD = DEFAULT_MODEL_DIR / "MODEL_CARD.md"


def enhanced(model: torch.nn.Module, spec: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.enhance_spec(torch.from_numpy(spec[None].astype(np.complex64)))[0].numpy()


@pytest.fixture(scope="module")
def spec() -> np.ndarray:
    from dereverb_data.stft import StftConfig

    return stft(synthesize_utterance("demo_m1", 3, 16000, 2.0), StftConfig(512, 128))


def test_float32_export_rebuilds_the_checkpoint_exactly(
    trained: Path,  # noqa: F811
    tmp_path: Path,
    spec: np.ndarray,
) -> None:
    checkpoint = trained / "checkpoint.pt"
    exported = export_model(checkpoint, tmp_path / "m.safetensors", dtype="float32")
    original, config, rate = load_checkpoint(checkpoint)
    model, config2, rate2 = load_checkpoint(exported)
    assert (config2, rate2) == (config, rate)
    for (name, a), (name2, b) in zip(
        original.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert name == name2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    np.testing.assert_array_equal(enhanced(model, spec), enhanced(original, spec))


def test_float16_export_is_half_the_size_and_close(
    trained: Path,  # noqa: F811
    tmp_path: Path,
    spec: np.ndarray,
) -> None:
    checkpoint = trained / "checkpoint.pt"
    half = export_model(checkpoint, tmp_path / "half.safetensors")
    full = export_model(checkpoint, tmp_path / "full.safetensors", dtype="float32")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    with safe_open(str(half), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
        dtypes = {handle.get_tensor(name).dtype for name in handle.keys()}  # noqa: SIM118
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert meta["weights_dtype"] == "float16" and meta["model_name"] == "bsrnn_lite"
    reference = enhanced(load_checkpoint(checkpoint)[0], spec)
    estimate = enhanced(load_checkpoint(half)[0], spec)
    error = np.linalg.norm(estimate - reference) / np.linalg.norm(reference)
    assert 0 < error < 1e-2  # float16 weights: close, and not secretly the float32 file


def test_export_refuses_a_non_checkpoint_and_leaves_nothing(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bogus\.pt"):
        export_model(bogus, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.pt"]


@pytest.mark.parametrize("kind", ["garbage", "foreign", "future"])
def test_a_bad_model_file_is_one_clear_error(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.safetensors"
    if kind == "garbage":
        path.write_bytes(b"\x00" * 64)
        words = "unreadable safetensors"
    elif kind == "foreign":  # a valid safetensors file that some other tool wrote
        save_file({"w": torch.zeros(2)}, str(path))
        words = "not exported by dereverb"
    else:
        save_file({"w": torch.zeros(2)}, str(path), {METADATA_KEY: '{"format_version": 99}'})
        words = "format version 99"
    with pytest.raises(CheckpointError, match=re.escape(words)) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_cli_exports_and_enhances_with_the_exported_model(
    trained: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    model_file = tmp_path / "mine.safetensors"
    assert run_main("export", str(trained / "checkpoint.pt"), "--out", str(model_file)) == 0
    source = tmp_path / "talk.wav"
    sf.write(source, synthesize_utterance("demo_f1", 1, 16000, 1.0), 16000)
    result = run_cli(
        "enhance", "--checkpoint", str(model_file), str(source), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 0, result.stderr
    assert sf.info(tmp_path / "o" / "talk.wav").frames == 16000


# --- the packaged default model ------------------------------------------------------------


def test_the_packaged_model_is_small_safetensors_and_loads() -> None:
    assert DEFAULT_MODEL_FILE.stat().st_size < 5_000_000  # "a few MB at most"
    with safe_open(str(DEFAULT_MODEL_FILE), framework="pt") as handle:  # parsed, never unpickled
        meta = json.loads(handle.metadata()[METADATA_KEY])
    model, config, rate = load_checkpoint(None)
    assert (config.n_fft, config.hop, rate) == (512, 128, 16000)
    assert isinstance(model, MODELS[meta["model_name"]])
    # The card describes this file: its model, the steps it was trained for and the file's hash.
    card = CARD.read_text()
    assert f"`{meta['model_name']}`" in card
    assert f"{meta['step']} steps" in card
    assert hashlib.sha256(DEFAULT_MODEL_FILE.read_bytes()).hexdigest() in card


def test_enhance_without_checkpoint_uses_the_packaged_model(tmp_path: Path) -> None:
    clean = synthesize_utterance("demo_m2", 0, 16000, 2.0)
    decay = np.exp(-np.arange(4000) / 800.0) * np.random.default_rng(0).standard_normal(4000)
    decay[0] = 4.0
    reverberant = np.convolve(clean, decay)[: clean.size]
    reverberant = (0.3 * reverberant / np.max(np.abs(reverberant))).astype(np.float32)
    source = tmp_path / "room.wav"
    sf.write(source, reverberant, 16000)
    result = run_cli("enhance", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    output, rate = sf.read(tmp_path / "out" / "room.wav")
    assert rate == 16000 and output.size == reverberant.size
    assert np.all(np.isfinite(output)) and np.std(output) > 1e-4
    assert not np.allclose(output, reverberant, atol=1e-3)  # the model did something
    assert sf.read(source)[0].size == reverberant.size  # the input is untouched


def test_evaluate_without_checkpoint_uses_the_packaged_model(
    store: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--data", store, "--limit", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| all | model |" in result.stdout
    assert (out / "per_example.csv").stat().st_size > 0
