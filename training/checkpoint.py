"""Reading a training checkpoint without trusting it: anything that is not one is one clear error.

A dereverb checkpoint is a dict of tensors and plain Python values written by
``training.train.save_checkpoint``; it is read with ``torch.load(weights_only=True)``, which
never runs code from the file. A file that needs more than that (a pickle of arbitrary objects)
is refused, and the refusal does not suggest loading it unsafely.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import TrainConfig
    from .models import SpectralModel

# What every checkpoint holds (see ``training.train.train``'s ``make_checkpoint``); the training
# state (optimizer, scheduler, ...) is only needed to resume and is checked there.
REQUIRED_KEYS = ("model", "config", "model_name", "model_kwargs", "n_freq", "stft", "sample_rate")
STFT_KEYS = ("n_fft", "hop", "window")


class CheckpointError(ValueError):
    """A file that is not a usable dereverb checkpoint; the message names it and says why."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (PyTorch's are often several), cut to ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_a_checkpoint(path: str | os.PathLike, reason: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: not a dereverb checkpoint ({reason})")


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save) or a pickle (its protocol byte); anything else is foreign."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith((b"PK\x03\x04", b"\x80"))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict with at least ``REQUIRED_KEYS``.

    Raises ``FileNotFoundError`` when there is no file, ``CheckpointError`` for anything else
    that is not a checkpoint: unreadable, not a PyTorch file, a pickle of arbitrary Python
    objects (refused unread), a bare tensor, a dict without the checkpoint's keys.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of foreign files; the error below says enough.
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
    except pickle.UnpicklingError as exc:
        # PyTorch's message here advises retrying with weights_only=False, which would run
        # whatever code the file carries: never pass that advice on.
        if not _looks_like_torch_file(path):
            reason = "not a PyTorch file"
        elif "weights only" in str(exc).lower():
            reason = "it holds Python objects other than tensors and plain values; not loaded"
        else:
            reason = "unreadable as a PyTorch file"
        raise not_a_checkpoint(path, reason) from None
    except EOFError:
        raise not_a_checkpoint(path, "empty or truncated file") from None
    except Exception as exc:  # torch raises KeyError, RuntimeError, ... for foreign bytes
        detail = one_line(exc, 120)
        if "PytorchStreamReader" in detail:  # the zip archive is cut short or corrupted
            detail = "truncated or damaged PyTorch file"
        elif isinstance(exc, KeyError) or "weights_only" in detail:
            detail = "unreadable as a PyTorch file"
        raise not_a_checkpoint(path, detail) from None
    if not isinstance(saved, dict):
        raise not_a_checkpoint(path, f"it holds a {type(saved).__name__}, not a checkpoint dict")
    missing = [key for key in REQUIRED_KEYS if key not in saved]
    if missing:
        raise not_a_checkpoint(path, f"missing {', '.join(missing)}")
    for key in ("model", "config", "model_kwargs", "stft"):
        if not isinstance(saved[key], dict):
            raise not_a_checkpoint(path, f"{key} is a {type(saved[key]).__name__}, not a dict")
    missing = [key for key in STFT_KEYS if key not in saved["stft"]]
    if missing:
        raise not_a_checkpoint(path, f"stft settings lack {', '.join(missing)}")
    return saved


def model_from_checkpoint(
    checkpoint: dict[str, Any],
    checkpoint_path: str | os.PathLike,
    device: str | torch.device = "cpu",
) -> tuple[SpectralModel, TrainConfig]:
    """The model of a checkpoint dict (``read_checkpoint``, or ``training.packaged``'s exported
    form) in eval mode on ``device``, with its training config.

    Raises ``CheckpointError`` naming ``checkpoint_path`` when its config, model name or
    weights do not make a model.
    """
    from .config import TrainConfig, resolve_device
    from .models import build_model

    try:
        config = TrainConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as exc:
        raise not_a_checkpoint(checkpoint_path, f"bad config: {one_line(exc)}") from None
    try:
        model = build_model(
            checkpoint["model_name"], int(checkpoint["n_freq"]), **checkpoint["model_kwargs"]
        )
    except (TypeError, ValueError) as exc:
        raise not_a_checkpoint(checkpoint_path, one_line(exc)) from None
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, ValueError) as exc:
        name = checkpoint["model_name"]
        reason = f"weights do not fit model {name!r}: {one_line(exc, 120)}"
        raise not_a_checkpoint(checkpoint_path, reason) from None
    model.to(resolve_device(device) if isinstance(device, str) else device)
    model.eval()
    return model, config
