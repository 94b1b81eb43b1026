"""Models as one ``.safetensors`` file, and the default model shipped with the package.

A training checkpoint (``checkpoint.pt``) carries the optimizer and the rest of the training state
and is read with ``torch.load(weights_only=True)``. What a user runs needs only the weights and
enough to rebuild the model around them, so :func:`export_model` writes those to a safetensors
file: tensors in a flat table that is parsed, never unpickled, and a JSON string in the file's
metadata with the model name, its keyword arguments, the STFT settings, the sample rate and the
training config. ``dereverb enhance`` and ``dereverb evaluate`` use the packaged file
(``training/default_model/model.safetensors``, described in its ``MODEL_CARD.md``) when no
``--checkpoint`` is given; ``--checkpoint`` takes either form.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch

from .checkpoint import REQUIRED_KEYS, CheckpointError, not_a_checkpoint, one_line, read_checkpoint

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
DEFAULT_MODEL_FILE = DEFAULT_MODEL_DIR / "model.safetensors"
METADATA_KEY = "dereverb"  # the safetensors metadata entry that holds our JSON
FORMAT_VERSION = 1
# Weights are stored in float16 (half the size; the model still computes in float32). Measured
# on the shipped U-Net: the enhanced spectrogram changes by about 1e-3 relative (test_packaged).
STORED_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (by its suffix) rather than a checkpoint."""
    return Path(path).suffix.lower() == ".safetensors"


def export_model(
    checkpoint: str | os.PathLike, destination: str | os.PathLike, dtype: str = "float16"
) -> Path:
    """Write ``checkpoint``'s model to ``destination`` (a ``.safetensors`` file).

    The checkpoint is validated by rebuilding its model first; the file is written under a
    temporary name and renamed into place, so a failure never leaves a partial model behind.
    """
    from safetensors.torch import save_file

    from .train import model_from_checkpoint

    if dtype not in STORED_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORED_DTYPES)}, got {dtype!r}")
    destination = Path(destination)
    if not is_exported(destination):
        raise CheckpointError(f"{destination}: an exported model's name ends in .safetensors")
    saved = read_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(saved, checkpoint)  # proves the weights make the model
    tensors = {
        name: (value.to(STORED_DTYPES[dtype]) if value.is_floating_point() else value)
        .detach()
        .contiguous()
        for name, value in model.state_dict().items()
    }
    meta = {key: saved[key] for key in REQUIRED_KEYS if key != "model"}
    meta.update(
        format_version=FORMAT_VERSION,
        weights_dtype=dtype,
        step=saved.get("step"),
        source_sha256=_sha256(Path(checkpoint)),
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.partial")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        tmp.chmod(0o644)  # safetensors creates it private; a model file is for everyone to read
        tmp.replace(destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return destination


def read_exported(path: str | os.PathLike) -> dict[str, Any]:
    """An exported model as a checkpoint-like dict (``REQUIRED_KEYS``, float32 weights).

    Raises ``FileNotFoundError`` when there is no file and ``CheckpointError`` naming the file
    for anything that is not an exported dereverb model.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        if path == DEFAULT_MODEL_FILE:
            raise FileNotFoundError(
                f"{path}: the packaged default model is missing from this installation; "
                "pass --checkpoint with a model of your own"
            )
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            weights = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise not_a_checkpoint(path, f"unreadable safetensors file: {one_line(exc, 120)}") from None
    if METADATA_KEY not in metadata:
        raise not_a_checkpoint(path, f"no {METADATA_KEY!r} metadata (not exported by dereverb)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise not_a_checkpoint(path, f"bad metadata: {one_line(exc)}") from None
    if not isinstance(meta, dict):
        raise not_a_checkpoint(path, "bad metadata: not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise not_a_checkpoint(
            path, f"format version {version!r}; this version of dereverb reads {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key != "model" and key not in meta]
    if missing:
        raise not_a_checkpoint(path, f"metadata lacks {', '.join(missing)}")
    meta["model"] = {
        name: value.float() if value.is_floating_point() else value
        for name, value in weights.items()
    }
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
