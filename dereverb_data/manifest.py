"""The dataset manifest: one YAML file that says everything a build does.

Validated with pydantic before any work starts. Every error names the field (as a dotted path),
and unknown keys get a "did you mean" suggestion, because a typo in a key must never silently
fall back to a default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .yaml_file import read_yaml

OCTAVE_BANDS_HZ = (125, 250, 500, 1000, 2000, 4000)
SPEED_OF_SOUND = 343.0
# Eyring's formula with these absorption bounds gives the RT60 range a room can reach.
MIN_ABSORPTION, MAX_ABSORPTION = 0.01, 0.95
SPLIT_NAMES = ("train", "valid", "test")


class ManifestError(ValueError):
    """A manifest that cannot be built; the message names the file and each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]


def _check_range(value: tuple[float, float], what: str) -> tuple[float, float]:
    low, high = value
    if low > high:
        raise ValueError(f"{what} range [{low}, {high}] has its minimum above its maximum")
    return value


class SpeakerRule(_Strict):
    """How a file's speaker id is found from its path relative to the corpus root."""

    kind: Literal["parent_dir", "regex", "filename_prefix"] = "parent_dir"
    level: int = Field(1, ge=1, description="parent_dir: 1 = the file's folder, 2 = its parent")
    regex: str | None = Field(None, description="regex: the first group is the speaker id")
    separator: str = Field("_", min_length=1, description="filename_prefix: text before it")

    @model_validator(mode="after")
    def _regex_given(self) -> SpeakerRule:
        if self.kind == "regex":
            if not self.regex:
                raise ValueError("kind 'regex' needs a 'regex' with one capture group")
            import re

            try:
                compiled = re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from exc
            if compiled.groups < 1:
                raise ValueError(f"regex {self.regex!r} needs a capture group for the speaker")
        return self


class DemoCorpus(_Strict):
    kind: Literal["demo"]
    speakers: int = Field(6, ge=1, le=6)
    utterances_per_speaker: int = Field(4, ge=1, le=1000)


class FolderCorpus(_Strict):
    kind: Literal["folder"]
    path: str = Field(description="root folder of the corpus (or an absolute path)")
    pattern: str = Field("**/*.wav", description="glob relative to path; several: 'a|b'")
    speaker: SpeakerRule = SpeakerRule()
    downmix: Literal["mean", "first"] = "mean"
    min_duration_s: float = Field(0.5, gt=0)
    max_duration_s: float = Field(30.0, gt=0)
    limit: int | None = Field(None, ge=1, description="use only the first N files (sorted)")

    @model_validator(mode="after")
    def _durations(self) -> FolderCorpus:
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError("min_duration_s must be below max_duration_s")
        return self


class LhotseCorpus(_Strict):
    """Recordings listed in a Lhotse RecordingSet, speakers from its SupervisionSet.

    Each recording is one utterance, the whole file (supervision times are not used). Its
    speaker is the one speaker its supervisions name; a recording with none (or without a
    SupervisionSet) takes ``speaker_fallback`` applied to its file path, and without a fallback
    it is quarantined: guessing would break speaker-disjoint splits silently.
    """

    kind: Literal["lhotse"]
    recordings: str = Field(min_length=1, description="RecordingSet manifest (.jsonl[.gz])")
    supervisions: str | None = Field(
        None, min_length=1, description="SupervisionSet manifest with the speakers"
    )
    audio_root: str | None = Field(
        None, description="folder that relative audio paths in the RecordingSet start from"
    )
    speaker_fallback: SpeakerRule | None = Field(
        None, description="speaker rule on the audio path for recordings without a speaker"
    )
    downmix: Literal["mean", "first"] = "mean"
    min_duration_s: float = Field(0.5, gt=0)
    max_duration_s: float = Field(30.0, gt=0)
    limit: int | None = Field(None, ge=1, description="use only the first N recordings (by id)")

    @model_validator(mode="after")
    def _consistent(self) -> LhotseCorpus:
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError("min_duration_s must be below max_duration_s")
        if self.supervisions is None and self.speaker_fallback is None:
            raise ValueError(
                "supervisions: without a SupervisionSet (or a speaker_fallback rule) no "
                "recording has a speaker and every one would be quarantined"
            )
        return self


CORPUS_KINDS = ("demo", "folder", "lhotse")


class Absorption(_Strict):
    """Frequency-dependent absorption, per octave band 125 Hz .. 4 kHz.

    ``profile``: relative band shapes (one picked per room); the overall level is calibrated so
    the measured RT60 lands in ``rooms.rt60_s``.  ``materials``: pyroomacoustics material names
    per surface group, scaled to the RT60 target when one is given.
    """

    kind: Literal["profile", "materials"] = "profile"
    profiles: dict[str, tuple[float, float, float, float, float, float]] = {
        "flat": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
        "soft_highs": (0.5, 0.7, 1.0, 1.2, 1.4, 1.5),
        "boomy": (1.4, 1.2, 1.0, 0.9, 0.8, 0.8),
    }
    materials: list[dict[Literal["walls", "floor", "ceiling"], str]] = []
    jitter: float = Field(0.1, ge=0, lt=1, description="per-surface random scale, +/- fraction")

    @model_validator(mode="after")
    def _consistent(self) -> Absorption:
        if self.kind == "profile":
            if not self.profiles:
                raise ValueError("kind 'profile' needs at least one entry in 'profiles'")
            for name, shape in self.profiles.items():
                if any(v <= 0 for v in shape):
                    raise ValueError(f"profile {name!r} must be positive in every band")
        else:
            if not self.materials:
                raise ValueError("kind 'materials' needs at least one entry in 'materials'")
            from pyroomacoustics.parameters import materials_data

            known = {
                name
                for group in materials_data.values()
                if isinstance(group, dict)
                for sub in group.values()
                if isinstance(sub, dict)
                for name in sub
            }
            for entry in self.materials:
                for surface, name in entry.items():
                    if name not in known:
                        hint = difflib.get_close_matches(name, sorted(known), n=1)
                        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                        raise ValueError(f"unknown material {name!r} for {surface}{extra}")
        return self


class MeasuredRirs(_Strict):
    """A folder of measured RIRs used as rooms (``dereverb_data/measured_rirs.py``).

    Each file is one measurement (any rate and channel count); ``room`` reads the room name
    from its path as the corpus ``speaker`` rule reads a speaker, and each measured room is
    assigned to one split by hash, so splits are room-disjoint. ``share`` is the fraction of a
    split's examples that use a measured RIR (the rest use simulated rooms).
    """

    path: str = Field(min_length=1, description="folder of RIR files (relative: to the manifest)")
    pattern: str = Field("**/*.wav|**/*.flac", description="glob relative to path; several: 'a|b'")
    channels: Literal["first", "each"] = Field(
        "first", description="first: channel 0 only (W of B-format); each: every channel an RIR"
    )
    room: SpeakerRule = SpeakerRule()
    share: dict[Literal["train", "valid", "test"], Annotated[float, Field(ge=0, le=1)]] = {}
    min_length_s: float = Field(
        0.1, gt=0, description="shortest RIR kept, after trimming to the direct path"
    )
    pre_direct_ms: float = Field(
        2.5, ge=0, le=20, description="kept before the direct-path peak; earlier samples cut"
    )


class Rooms(_Strict):
    rooms_per_split: dict[Literal["train", "valid", "test"], int] = {
        "train": 8,
        "valid": 2,
        "test": 2,
    }
    positions_per_room: int = Field(3, ge=1, le=10_000)
    length_m: tuple[PositiveFloat, PositiveFloat] = (4.0, 10.0)
    width_m: tuple[PositiveFloat, PositiveFloat] = (3.0, 8.0)
    height_m: tuple[PositiveFloat, PositiveFloat] = (2.5, 4.0)
    rt60_s: tuple[PositiveFloat, PositiveFloat] | None = (0.3, 1.0)
    absorption: Absorption = Absorption()
    source_height_m: tuple[PositiveFloat, PositiveFloat] = (1.2, 1.9)
    mic_height_m: tuple[PositiveFloat, PositiveFloat] = (0.8, 1.5)
    distance_m: tuple[PositiveFloat, PositiveFloat] = (0.5, 3.0)
    wall_margin_m: float = Field(0.5, ge=0.05)
    # None unless given, and then left out of dumps: the dump is hashed into the manifest
    # digest, so existing manifests must dump exactly as before.
    measured: MeasuredRirs | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.measured is None:
            data.pop("measured", None)
        return data

    @field_validator(
        "length_m",
        "width_m",
        "height_m",
        "rt60_s",
        "source_height_m",
        "mic_height_m",
        "distance_m",
    )
    @classmethod
    def _ordered(cls, value: Any, info: Any) -> Any:
        return value if value is None else _check_range(value, info.field_name)

    @field_validator("rooms_per_split")
    @classmethod
    def _counts(cls, value: dict[str, int]) -> dict[str, int]:
        for split, count in value.items():
            if count < 1:
                raise ValueError(f"{split}: at least one room per split is needed, got {count}")
        return value

    @model_validator(mode="after")
    def _geometry_fits(self) -> Rooms:
        margin = self.wall_margin_m
        for name, (low, _) in (("width_m", self.width_m), ("length_m", self.length_m)):
            if low <= 2 * margin:
                raise ValueError(
                    f"{name}: the smallest room ({low} m) leaves no space inside "
                    f"wall_margin_m={margin} m on both sides"
                )
        for name, (_, high) in (
            ("source_height_m", self.source_height_m),
            ("mic_height_m", self.mic_height_m),
        ):
            if high > self.height_m[0] - margin:
                raise ValueError(
                    f"{name}: {high} m does not fit under the lowest ceiling "
                    f"({self.height_m[0]} m) with wall_margin_m={margin} m"
                )
        # The farthest two points can be apart in the smallest room, away from the walls.
        dx = self.length_m[0] - 2 * margin
        dy = self.width_m[0] - 2 * margin
        dz = max(
            abs(self.source_height_m[1] - self.mic_height_m[0]),
            abs(self.mic_height_m[1] - self.source_height_m[0]),
        )
        reach = math.sqrt(dx * dx + dy * dy + dz * dz)
        if self.distance_m[0] > reach:
            raise ValueError(
                f"distance_m: the minimum source-microphone distance {self.distance_m[0]} m does "
                f"not fit in the smallest room ({self.length_m[0]} x {self.width_m[0]} m, "
                f"at most {reach:.2f} m between points {margin} m from the walls)"
            )
        if self.absorption.kind == "profile" and self.rt60_s is None:
            raise ValueError("rt60_s: absorption kind 'profile' needs an RT60 range to calibrate")
        if self.rt60_s is not None:
            self._check_rt60_reachable()
        return self

    def _check_rt60_reachable(self) -> None:
        low, high = self.rt60_s  # type: ignore[misc]
        # The largest room has the longest minimum RT60; the smallest the shortest maximum.
        largest = (self.length_m[1], self.width_m[1], self.height_m[1])
        smallest = (self.length_m[0], self.width_m[0], self.height_m[0])
        shortest_in_largest = eyring_rt60(largest, MAX_ABSORPTION)
        longest_in_smallest = eyring_rt60(smallest, MIN_ABSORPTION)
        if low < shortest_in_largest:
            raise ValueError(
                f"rt60_s: {low} s cannot be produced by the largest room {largest} m (at least "
                f"{shortest_in_largest:.2f} s even with absorption {MAX_ABSORPTION}); raise the "
                "RT60 minimum or shrink the rooms"
            )
        if high > longest_in_smallest:
            raise ValueError(
                f"rt60_s: {high} s cannot be produced by the smallest room {smallest} m (at most "
                f"{longest_in_smallest:.2f} s with absorption {MIN_ABSORPTION}); lower the RT60 "
                "maximum or enlarge the rooms"
            )


def eyring_rt60(dims: tuple[float, float, float], absorption: float) -> float:
    """Eyring reverberation time of a shoebox with uniform absorption."""
    lx, ly, lz = dims
    volume = lx * ly * lz
    surface = 2 * (lx * ly + lx * lz + ly * lz)
    return 0.161 * volume / (-surface * math.log(1.0 - absorption))


class DiffuseSettings(_Strict):
    """``method: diffuse`` (``dereverb_data/diffuse_rir.py``): exact image sources up to a mixing
    time, then Gaussian noise decaying per octave band at the room's statistical RT60."""

    mixing_time_ms: float | None = Field(
        None,
        ge=5,
        le=100,
        description="where the noise tail takes over; default: when 128 image sources are "
        "expected to have arrived, (3 V 128 / (4 pi c^3))^(1/3), about 25-60 ms",
    )
    rt60_formula: Literal["eyring", "sabine"] = "eyring"
    air_absorption: bool = Field(True, description="ISO 9613-1 at 20 C, 50 % RH, per band")
    calibrate_to: Literal["broadband_t30", "mid_band"] = Field(
        "broadband_t30",
        description="what the room's RT60 target means: the broadband T30 the labels measure "
        "(expected value at the reference placement, as the other methods' calibration), or the "
        "mean of the 500 Hz and 1 kHz band RT60s",
    )


class Simulation(_Strict):
    """``auto`` uses the image method for short tails and ISM + ray tracing above a threshold;
    ``diffuse`` uses early image sources plus a stochastic tail (settings in ``diffuse``)."""

    method: Literal["auto", "ism", "hybrid", "diffuse"] = "auto"
    hybrid_above_rt60_s: float = Field(0.25, gt=0)
    ism_order_hybrid: int = Field(3, ge=0, le=20)
    n_rays: int = Field(2000, ge=100)
    max_ism_order: int = Field(
        60, ge=1, description="pure ISM above this order is refused: use hybrid"
    )
    calibration_iterations: int = Field(3, ge=0, le=10)
    rt60_tolerance: float = Field(0.08, gt=0, lt=0.5)
    # None unless method is diffuse, and then left out of dumps: the dump is hashed into every
    # RIR id and the manifest digest, so existing manifests must dump exactly as before.
    diffuse: DiffuseSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _diffuse_defaults(cls, data: Any) -> Any:
        # ``method: diffuse`` with and without an empty ``diffuse:`` is the same simulation:
        # fill the defaults so both dump, and hash, the same.
        if (
            isinstance(data, dict)
            and data.get("method") == "diffuse"
            and data.get("diffuse") is None
        ):
            data = {**data, "diffuse": {}}
        return data

    @model_validator(mode="after")
    def _diffuse_only_for_diffuse(self) -> Simulation:
        if self.diffuse is not None and self.method != "diffuse":
            raise ValueError(
                f"diffuse: settings only meaningful with method 'diffuse' (method is "
                f"{self.method!r})"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.diffuse is None:
            data.pop("diffuse", None)
        return data


class Target(_Strict):
    kind: Literal["direct", "early"] = "direct"
    early_ms: float | None = Field(None, description="window after the direct peak, kind early")

    @model_validator(mode="after")
    def _window(self) -> Target:
        if self.kind == "early":
            if self.early_ms is None:
                raise ValueError("early_ms: kind 'early' needs a window in milliseconds")
            if not 0 < self.early_ms <= 500:
                raise ValueError(f"early_ms: must be in (0, 500] ms, got {self.early_ms}")
        elif self.early_ms is not None:
            raise ValueError("early_ms: only meaningful with kind 'early'")
        return self


class Level(_Strict):
    """Scale each pair so the reverberant input has a random RMS level, never clipping."""

    mode: Literal["rms", "none"] = "rms"
    rms_dbfs: tuple[float, float] = (-30.0, -20.0)
    peak_limit: float = Field(0.99, gt=0, le=1.0)

    @field_validator("rms_dbfs")
    @classmethod
    def _levels(cls, value: tuple[float, float]) -> tuple[float, float]:
        _check_range(value, "rms_dbfs")
        if value[1] > 0:
            raise ValueError(f"rms_dbfs: levels must be at most 0 dBFS, got {value[1]}")
        return value


class Render(_Strict):
    tail_ms: float = Field(250.0, ge=0, description="samples kept after the utterance ends")


class Stft(_Strict):
    n_fft: int = Field(512, ge=16, le=8192)
    hop: int = Field(128, ge=1)
    window: Literal["hann", "sqrt-hann"] = "hann"

    @model_validator(mode="after")
    def _hop(self) -> Stft:
        if self.hop > self.n_fft:
            raise ValueError(f"hop: {self.hop} is longer than n_fft {self.n_fft}")
        if self.n_fft % self.hop:
            raise ValueError(f"hop: n_fft {self.n_fft} must be a multiple of hop {self.hop}")
        return self


class Storage(_Strict):
    dtype: Literal["complex64", "float16"] = "complex64"
    frames_per_chunk: int = Field(512, ge=1)
    frames_per_shard: int = Field(8192, ge=1)
    compressor: Literal["zstd", "none"] = "zstd"

    @model_validator(mode="after")
    def _aligned(self) -> Storage:
        if self.frames_per_shard % self.frames_per_chunk:
            raise ValueError(
                f"frames_per_shard: {self.frames_per_shard} must be a multiple of "
                f"frames_per_chunk {self.frames_per_chunk}"
            )
        return self


class Splits(_Strict):
    train: float = Field(0.8, ge=0, le=1)
    valid: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> Splits:
        total = self.train + self.valid + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must add up to 1, got {total:g}")
        return self

    def fractions(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SPLIT_NAMES if getattr(self, name) > 0}


NOISE_COLOURS = ("white", "pink", "brown")


class Augmentation(_Strict):
    """RIR augmentation (``dereverb_data/augment.py``): with ``probability`` per example, its
    RIR's decay is scaled by a factor drawn log-uniformly from ``rt60_factor`` and its DRR moved
    by a change drawn uniformly from ``drr_change_db``. The augmented RIR is a bank entry of its
    own; one the augmentation functions refuse falls back to the unchanged RIR (labelled so)."""

    probability: float = Field(0.5, ge=0, le=1)
    drr_change_db: tuple[float, float] = (-6.0, 6.0)
    rt60_factor: tuple[PositiveFloat, PositiveFloat] = (0.6, 1.6)
    bands: bool = Field(True, description="change each octave band's decay by the same factor")

    @field_validator("drr_change_db", "rt60_factor")
    @classmethod
    def _ordered(cls, value: Any, info: Any) -> Any:
        return _check_range(value, info.field_name)


class Noise(_Strict):
    """Background noise added to the reverberant input only (the target stays clean), with
    ``probability`` per example, at an SNR drawn uniformly from ``snr_db``; the noise is one of
    ``colours`` (generated) or of the files in ``files`` (a folder), drawn uniformly."""

    probability: float = Field(1.0, ge=0, le=1)
    snr_db: tuple[float, float] = (5.0, 30.0)
    colours: list[Literal["white", "pink", "brown"]] = list(NOISE_COLOURS)
    files: str | None = Field(None, min_length=1, description="folder of noise recordings")
    pattern: str = Field("**/*.wav|**/*.flac", description="glob relative to files; 'a|b'")

    @field_validator("snr_db")
    @classmethod
    def _ordered(cls, value: Any, info: Any) -> Any:
        return _check_range(value, info.field_name)

    @model_validator(mode="after")
    def _has_a_source(self) -> Noise:
        if not self.colours and self.files is None:
            raise ValueError("colours: no colour and no files: there is no noise to add")
        return self


class Manifest(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    # Strict: YAML's `true` would otherwise pass as the integer 1 (and "3" as 3).
    seed: int = Field(ge=0, strict=True)
    sample_rate: int = Field(16000, ge=8000, le=96000, strict=True)
    corpus: Annotated[DemoCorpus | FolderCorpus | LhotseCorpus, Field(discriminator="kind")]
    variants_per_utterance: int = Field(2, ge=1, le=1000, strict=True)
    rooms: Rooms = Rooms()
    simulation: Simulation = Simulation()
    target: Target = Target()
    level: Level = Level()
    render: Render = Render()
    stft: Stft = Stft()
    storage: Storage = Storage()
    splits: Splits = Splits()
    # None unless given, and then left out of dumps (as rooms.measured): the dump is hashed
    # into the manifest digest, so existing manifests must dump exactly as before.
    augmentation: Augmentation | None = None
    noise: Noise | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in ("augmentation", "noise"):
            if getattr(self, name) is None:
                data.pop(name, None)
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        for split in self.splits.fractions():
            if split not in self.rooms.rooms_per_split:
                raise ValueError(
                    f"rooms.rooms_per_split: split {split!r} has a fraction but no rooms"
                )
        measured = self.rooms.measured
        if measured is not None:
            for split, share in measured.share.items():
                if share > 0 and split not in self.splits.fractions():
                    raise ValueError(
                        f"rooms.measured.share: split {split!r} has a share but no examples "
                        f"(splits.{split} is 0)"
                    )
        longest_delay_ms = 1000 * self.rooms.distance_m[1] / SPEED_OF_SOUND + 10.0
        if self.render.tail_ms < longest_delay_ms:
            raise ValueError(
                f"render.tail_ms: {self.render.tail_ms} ms cannot hold the direct-path delay of "
                f"the farthest source ({longest_delay_ms:.0f} ms incl. the simulator's filter)"
            )
        return self

    def digest(self) -> str:
        """Stable hash of the validated content (not of the YAML text or its comments)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: the manifest is not valid ({error.error_count()} problem(s)):"]
    for item in error.errors():
        loc = [str(p) for p in item["loc"] if not str(p).startswith(("function-after", "tagged"))]
        # Drop the discriminator tag pydantic inserts in the path ("corpus.demo.speakers").
        if len(loc) >= 2 and loc[0] == "corpus" and loc[1] in CORPUS_KINDS:
            loc.pop(1)
        where = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}{_suggestion(item)}"
            where = ".".join(loc[:-1]) or "(top level)"
        else:
            message = item["msg"].removeprefix("Value error, ")
            # Model-level checks start their message with the field they are about.
            field, sep, rest = message.partition(": ")
            names_field = all(p.isidentifier() and p.islower() for p in field.split("."))
            if sep and names_field and (not loc or loc[-1] != field):
                where, message = f"{where}.{field}" if loc else field, rest
        lines.append(f"  - {where}: {message}")
    return "\n".join(lines)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models named by a field annotation, through Optional/Union/Annotated/dict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _suggestion(item: dict[str, Any]) -> str:
    models: list[type[BaseModel]] = [Manifest]
    for part in item["loc"][:-1]:
        if part in CORPUS_KINDS:
            continue
        fields = [m.model_fields[str(part)] for m in models if str(part) in m.model_fields]
        models = [model for field in fields for model in _models_in(field.annotation)]
    candidates = sorted({name for model in models for name in model.model_fields})
    close = difflib.get_close_matches(str(item["loc"][-1]), candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_manifest(data: Any, source: str = "<manifest>") -> Manifest:
    """Validate a parsed YAML mapping; raise :class:`ManifestError` naming every bad field."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a mapping at the top level, got {type(data)}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_format_errors(source, exc)) from None


def load_manifest(path: str | Path, corpus_path: str | None = None) -> Manifest:
    """Read and validate a YAML manifest file; ``corpus_path`` replaces ``corpus.path``.

    Relative corpus paths (a folder's ``path``; a Lhotse corpus's ``recordings``,
    ``supervisions`` and ``audio_root``) are made absolute against the manifest's folder.
    """
    path = Path(path)
    data = read_yaml(path, ManifestError, "manifest")
    if corpus_path is not None and isinstance(data, dict) and isinstance(data.get("corpus"), dict):
        kind = data["corpus"].get("kind")
        if kind == "lhotse":
            raise ManifestError(
                f"{path}: --corpus replaces corpus.path, but a lhotse corpus names its "
                "manifests in corpus.recordings and corpus.supervisions: edit those instead"
            )
        if kind != "folder":
            raise ManifestError(
                f"{path}: --corpus replaces corpus.path, but this manifest's corpus is "
                f"kind {kind!r}, which has no path (use a folder manifest, "
                "e.g. manifests/folder.yaml)"
            )
        data["corpus"]["path"] = str(Path(corpus_path).expanduser().resolve())
    manifest = parse_manifest(data, str(path))
    corpus = manifest.corpus
    if isinstance(corpus, FolderCorpus):
        corpus = corpus.model_copy(update={"path": _beside(path, corpus.path)})
    elif isinstance(corpus, LhotseCorpus):
        _require_lhotse(path)
        update = {
            "recordings": _beside(path, corpus.recordings),
            # Relative audio paths in a RecordingSet are relative to where `lhotse prepare`
            # ran, which nothing records; the manifest's folder is the default so a build
            # never depends on the working directory (set audio_root when it is elsewhere).
            "audio_root": _beside(path, corpus.audio_root or "."),
        }
        if corpus.supervisions is not None:
            update["supervisions"] = _beside(path, corpus.supervisions)
        corpus = corpus.model_copy(update=update)
    update = {"corpus": corpus}
    if manifest.rooms.measured is not None:
        # Like corpus.path: a relative RIR folder starts at the manifest, not the working dir.
        measured = manifest.rooms.measured
        measured = measured.model_copy(update={"path": _beside(path, measured.path)})
        update["rooms"] = manifest.rooms.model_copy(update={"measured": measured})
    if manifest.noise is not None and manifest.noise.files is not None:
        # Like corpus.path: a relative noise folder starts at the manifest.
        noise = manifest.noise.model_copy(update={"files": _beside(path, manifest.noise.files)})
        update["noise"] = noise
    return manifest.model_copy(update=update)


def _beside(manifest_path: Path, value: str) -> str:
    """``value`` as an absolute path; relative ones start at the manifest's folder, not at the
    working directory."""
    target = Path(value).expanduser()
    if not target.is_absolute():
        target = (manifest_path.parent / target).resolve()
    return str(target)


def lhotse_installed() -> bool:
    """Whether the optional ``lhotse`` package can be imported (without importing it: that
    takes seconds, and only the corpus scan needs it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("lhotse") is not None
    except (ImportError, ValueError):
        return False


LHOTSE_MISSING = (
    "corpus.kind 'lhotse' needs the optional lhotse package: pip install 'dereverb[lhotse]'"
)


def _require_lhotse(path: Path) -> None:
    if not lhotse_installed():
        raise ManifestError(f"{path}: {LHOTSE_MISSING}")
