"""Measured RIRs as a room source: scan a folder, ingest each file, label it by measurement.

Ingest rule, the same at planning (to quarantine bad files) and in the RIR bank (to store the
RIR), so a banked measured RIR is a pure function of the file's bytes and these settings:

1. read with soundfile (any rate, any channel count); ``channels: first`` uses channel 0 (W in
   B-format files, the left ear in BRIRs), ``each`` makes every channel an RIR of its own;
2. resample to the manifest rate with soxr HQ, as :func:`dereverb_data.corpus.read_audio` does;
3. trim: start ``pre_direct_ms`` (2.5 ms) before the direct-path peak
   (:func:`dereverb_data.acoustics.direct_path_index`), so the pre-delay of the measurement
   (arbitrary: it depends on the measurement system's latency) does not shift the target;
4. normalise: scale so the direct path's amplitude (the energy of +-2.5 ms around its peak,
   as :func:`dereverb_data.render.direct_amplitude` measures it) is ``1 / (4 pi)``, what a
   simulated RIR's direct path has at 1 m. The render's level policy (RMS of the reverberant
   input, peak limit) then treats measured and simulated RIRs alike, and ``level.mode: none``
   keeps a level comparable to a simulated source at about 1 m.

Then the labels are measured (T20/T30, DRR, C50); the distance is not known and stays missing
(``None``, NaN in the index), never invented. A file or channel that is unreadable, silent,
non-finite, too short after trimming, or without a measurable decay (T30 and T20 both NaN) is
quarantined with its reason; the build goes on without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .acoustics import DIRECT_WINDOW_MS, RT60_METHOD, direct_path_index, measure_rir
from .corpus import AudioError, Quarantined, file_hash, find_files, speaker_from_path
from .manifest import MeasuredRirs
from .seeds import stable_hash

MEASURED_REVISION = 1  # bump when ingesting changes its output for the same file and settings
ROOM_PREFIX = "measured/"
# An RIR's level is arbitrary (normalisation removes it): only a numerically empty file is
# silent, not a quiet one.
SILENT_PEAK = 10 ** (-100 / 20)
DIRECT_AMPLITUDE = 1.0 / (4.0 * math.pi)  # a point source's direct path at 1 m


@dataclass(frozen=True)
class MeasuredRir:
    """One usable measured RIR (a file's channel), as the scan found it."""

    source: str  # absolute path of the file
    room: str  # room name from the manifest's ``room`` rule
    channel: int
    content_hash: str  # sha256 of the file's bytes (24 hex digits)
    source_rate: int
    channels: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MeasuredRoom:
    """Stands in for a :class:`~dereverb_data.rooms.RoomSpec` where the build reads a room:
    its id and split, and no RT60 target (the RT60 is whatever the room has)."""

    room_id: str
    split: str
    target_rt60: float | None = None
    rt60_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class MeasuredRirSpec:
    """A measured RIR in the bank's terms: the RIR bank ingests it instead of simulating."""

    room: MeasuredRoom
    rir: MeasuredRir
    sample_rate: int
    pre_direct_ms: float = 2.5

    @cached_property
    def rir_id(self) -> str:
        # Content-addressed: the same bytes, channel, rate and trim give the same RIR wherever
        # the file lives and whatever room name it gets.
        return stable_hash(
            [
                "measured",
                self.rir.content_hash,
                self.rir.channel,
                self.sample_rate,
                self.pre_direct_ms,
                MEASURED_REVISION,
            ],
            length=20,
        )


def find_rir_files(config: MeasuredRirs) -> list[Path]:
    return find_files(Path(config.path), config.pattern, "rooms.measured.path")


def read_channels(path: str | Path) -> tuple[np.ndarray, int]:
    """All channels as float64 (samples, channels) and the file's rate; AudioError if the
    file cannot be decoded or holds no samples."""
    try:
        data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"{path}: unreadable audio ({exc})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty (no samples)")
    return data, int(rate)


def prepare_channel(
    signal: np.ndarray,
    source_rate: int,
    sample_rate: int,
    pre_direct_ms: float = 2.5,
    min_length_s: float = 0.0,
) -> np.ndarray:
    """Resample, trim and normalise one channel (the module's rule); AudioError says why it
    cannot be an RIR."""
    if not np.all(np.isfinite(signal)):
        raise AudioError("contains NaN or infinite samples")
    peak = float(np.max(np.abs(signal)))
    if peak <= SILENT_PEAK:
        raise AudioError("silent (no sample above -100 dBFS)")
    h = np.asarray(signal, dtype=np.float64)
    if source_rate != sample_rate:
        h = soxr.resample(h, source_rate, sample_rate, quality="HQ").astype(np.float64)
    d = direct_path_index(h)
    h = h[max(0, d - round(pre_direct_ms * sample_rate / 1000)) :]
    duration = h.size / sample_rate
    if duration < min_length_s:
        raise AudioError(
            f"too short ({duration:.3f} s from the direct path < min_length_s {min_length_s} s)"
        )
    d = direct_path_index(h)
    half = round(DIRECT_WINDOW_MS * sample_rate / 1000)
    direct = math.sqrt(float(np.sum(h[max(0, d - half) : d + half + 1] ** 2)))
    return (h * (DIRECT_AMPLITUDE / direct)).astype(np.float32)


def ingest(spec: MeasuredRirSpec) -> tuple[np.ndarray, dict]:
    """The RIR of a measured spec and its labels (raises AudioError for a bad one)."""
    data, rate = read_channels(spec.rir.source)
    if file_hash(Path(spec.rir.source)) != spec.rir.content_hash:
        raise AudioError(
            f"{spec.rir.source}: changed since the plan was made (content hash differs); "
            "plan the build again"
        )
    # The length was checked when the plan was made; the same bytes give the same length.
    rir = prepare_channel(data[:, spec.rir.channel], rate, spec.sample_rate, spec.pre_direct_ms)
    labels = measure_rir(rir, spec.sample_rate)
    if not (np.isfinite(labels.rt60_t30) or np.isfinite(labels.rt60_t20)):
        raise AudioError("no measurable decay (T30 and T20 are NaN)")
    return rir, {
        **labels.to_dict(),
        "distance_m": None,  # not known for a measurement: missing, not invented
        "rt60_method": RT60_METHOD,
        "target_rt60": None,
        "simulation": "measured",
        "source": spec.rir.source,
        "channel": spec.rir.channel,
        "source_rate": spec.rir.source_rate,
        "room": spec.room.room_id,
        "normalisation": "direct path (+-2.5 ms energy) = 1/(4 pi), a simulated source at 1 m",
        "simulator": f"measured+dereverb{MEASURED_REVISION}",
    }


def scan_measured(
    config: MeasuredRirs, sample_rate: int
) -> tuple[list[MeasuredRir], list[Quarantined]]:
    """Every usable RIR of the folder (a file's channel) and the quarantined ones with why.

    Each candidate is fully ingested here (resampled, trimmed, measured), so a file whose decay
    cannot be measured is refused at planning, not halfway through a build.
    """
    root = Path(config.path)
    usable: list[MeasuredRir] = []
    quarantined: list[Quarantined] = []
    for path in find_rir_files(config):
        relative = path.relative_to(root)
        try:
            room = speaker_from_path(relative, config.room)
            data, rate = read_channels(path)
        except AudioError as exc:
            quarantined.append(Quarantined(str(path), f"measured RIR {exc}"))
            continue
        content = file_hash(path)
        channels = range(data.shape[1]) if config.channels == "each" else range(1)
        for channel in channels:
            source = f"{path}#{channel}" if config.channels == "each" else str(path)
            entry = MeasuredRir(str(path), room, channel, content, rate, data.shape[1])
            try:
                rir = prepare_channel(
                    data[:, channel], rate, sample_rate, config.pre_direct_ms, config.min_length_s
                )
                labels = measure_rir(rir, sample_rate)
                if not (np.isfinite(labels.rt60_t30) or np.isfinite(labels.rt60_t20)):
                    raise AudioError("no measurable decay (T30 and T20 are NaN)")
            except AudioError as exc:
                quarantined.append(Quarantined(source, f"measured RIR {source}: {exc}"))
                continue
            usable.append(entry)
    return usable, quarantined
