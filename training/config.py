"""The training configuration: one validated object, loaded from YAML by ``training`` itself.

    from training.config import TrainConfig, load_train_config
    config = load_train_config("manifests/training/bsrnn.yaml", {"steps": 100})

Strict like the dataset manifest (``dereverb_data.manifest``): unknown keys are refused with a
"did you mean", and every field has its type and range, because a typo or a wrong value must
never silently train something else. Checkpoints store :meth:`TrainConfig.to_dict` and rebuild
the config with :meth:`TrainConfig.from_dict`, so the field names, defaults and meanings are a
file format: change them only with a way to read old checkpoints.

Importing this module is cheap (pydantic and PyYAML only): the model and feature names are
checked against ``training.models`` and ``training.data`` when a config is validated, so the
command line can load a config without importing torch first.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
)

from dereverb_data.yaml_file import read_yaml

if TYPE_CHECKING:
    import torch

# Mirrors training.models.DEFAULT_MODEL (checked by the tests): importing training.models here
# would import torch into every process that only reads a config.
DEFAULT_MODEL = "bsrnn_lite"


class TrainConfigError(ValueError):
    """A training config that cannot be used; the message names the file (when there is one)
    and each bad field, on one line."""


def _whole_number(value: Any) -> Any:
    # bool is an int subclass: `steps: true` would otherwise mean one step. Integral floats
    # (`steps: 2.0e4`) are whole numbers; strings ("10") are not numbers in a YAML config.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, got {value!r}")
    return value


def _finite_number(value: Any) -> Any:
    if isinstance(value, str):
        # PyYAML reads `lr: 1e-3` (no dot) as a string (YAML 1.1): accept number strings.
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return value


Whole = Annotated[int, BeforeValidator(_whole_number)]
Number = Annotated[float, BeforeValidator(_finite_number)]
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]


class TrainConfig(BaseModel):
    """Everything that defines a training run (plain types only: it is saved in checkpoints).

    Mutable like the dataclass it replaces; assignments are validated too.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    model: Text = DEFAULT_MODEL  # a key of training.models.MODELS
    model_kwargs: Annotated[dict[str, Any], Strict()] = Field(default_factory=dict)
    features: Text | None = None  # None: the model's own (see training.data.FEATURE_CHANNELS)
    compress_exponent: Number = Field(0.3, gt=0)  # power-law compression of features, losses
    # data
    train_split: Text = "train"
    valid_split: Text = "valid"
    crop_frames: Whole = Field(256, ge=1)  # 2.05 s at hop 128 / 16 kHz: longer than most tails
    batch_size: Whole = Field(16, ge=1)
    num_workers: Whole = Field(2, ge=0)
    # optimisation
    lr: Number = Field(1e-3, gt=0)
    min_lr: Number = Field(1e-5, ge=0)  # end of the cosine decay
    warmup_steps: Whole = Field(500, ge=0)
    steps: Whole = Field(20_000, ge=1)
    weight_decay: Number = Field(0.0, ge=0)
    grad_clip: Number = 5.0  # max gradient norm; <= 0 disables clipping
    # loss weights (training.losses.DereverbLoss)
    magnitude_weight: Number = Field(0.7, ge=0)
    complex_weight: Number = Field(0.3, ge=0)
    mrstft_weight: Number = Field(0.0, ge=0)
    # validation, logging, checkpoints
    eval_every: Whole = Field(1000, ge=1)
    eval_examples: Whole = Field(8, ge=0)  # whole validation examples scored (spread over split)
    checkpoint_every: Whole = Field(1000, ge=1)
    log_every: Whole = Field(50, ge=1)
    progress: Flag = True  # tqdm bar
    # run
    seed: Whole = Field(0, ge=0)
    device: Text = "auto"  # "auto" | "cpu" | "cuda" (or "cuda:1", ...)
    amp: Flag = True  # mixed precision, used only on CUDA (bfloat16 where supported)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from training.models import MODELS

        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; choose one of {sorted(MODELS)}")
        return value

    @field_validator("features")
    @classmethod
    def _known_features(cls, value: str | None) -> str | None:
        from training.data import FEATURE_CHANNELS

        if value is not None and value not in FEATURE_CHANNELS:
            raise ValueError(
                f"unknown features {value!r}; choose one of {sorted(FEATURE_CHANNELS)} or null"
            )
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if value == "auto":
            return value
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}") from None
        return value

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A validated config; anything wrong raises ``TrainConfigError`` (a ``ValueError``)
        naming every bad field on one line."""
        if not isinstance(values, dict):
            raise TrainConfigError(
                f"a TrainConfig is a mapping of fields, not a {type(values).__name__}"
            )
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise TrainConfigError(describe_errors(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (tuples become lists), as checkpoints store it."""
        return self.model_dump(mode="json")


def describe_errors(error: ValidationError) -> str:
    """Every problem of a validation error, on one line: ``field: what is wrong; ...``."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        kind, context = item["type"], item.get("ctx", {})
        if kind == "extra_forbidden":
            key = str(item["loc"][-1])
            close = difflib.get_close_matches(key, list(TrainConfig.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
            continue
        bounds = {
            "greater_than": ">",
            "greater_than_equal": ">=",
            "less_than": "<",
            "less_than_equal": "<=",
        }
        if kind in bounds:
            limit = next(iter(context.values()))
            message = f"must be {bounds[kind]} {limit:g}, got {item['input']!r}"
        elif kind.endswith("_type"):  # a strict type refused: say what it got
            message = f"{item['msg'].replace('Input should be', 'must be')}, got {item['input']!r}"
        else:
            message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}")
    return "; ".join(problems)


def load_train_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A TrainConfig from a YAML file of its fields, plus overrides (``None`` values are
    ignored, so unset command-line options keep the file's values).

    Raises ``TrainConfigError`` naming the file for a missing or unreadable file, a file that
    is not UTF-8, a YAML syntax error (with its line), a file that is not a mapping, unknown
    keys (with a suggestion) and any field of the wrong type or out of range.
    """
    source = str(path) if path else "training config"
    values: dict[str, Any] = {}
    if path:
        loaded = read_yaml(path, TrainConfigError, "training config")
        if loaded is not None:  # an empty file: all defaults
            if not isinstance(loaded, dict):
                raise TrainConfigError(
                    f"{source}: a training config is a mapping of TrainConfig fields, "
                    f"not a {type(loaded).__name__}"
                )
            values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.from_dict(values)
    except TrainConfigError as exc:
        raise TrainConfigError(f"{source}: {exc}") from None


def resolve_device(name: str) -> torch.device:
    """The torch device a config's ``device`` names: ``auto`` is CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
