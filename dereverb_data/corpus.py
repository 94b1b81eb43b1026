"""Corpus ingest: find the utterances, read them safely, and quarantine the bad ones.

Audio of any rate is resampled with soxr (high quality, deterministic); several channels are
downmixed by the manifest's policy (``mean`` of all channels, or the ``first``). A bad file is
quarantined with its reason and the build goes on: one bad file never stops a build of
thousands, and nothing is dropped without a line in the build report.

Corpora: the built-in demo, a folder (files found by pattern, speaker from the path), or a
Lhotse RecordingSet (:mod:`dereverb_data.lhotse_io` lists its files and speakers; the files are
then read, checked, hashed and cached here exactly as a folder's are).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .demo_corpus import demo_utterances, synthesize_utterance
from .manifest import DemoCorpus, FolderCorpus, LhotseCorpus, SpeakerRule

SILENCE_PEAK_DBFS = -60.0
CLIP_LEVEL = 0.999
CLIP_FRACTION = 1e-3
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}


class AudioError(ValueError):
    """A file that cannot be used as speech; the message names the file and the reason."""


@dataclass(frozen=True)
class Utterance:
    utterance_id: str
    speaker: str
    source: str  # a file path, or "demo:<speaker>:<index>"
    content_hash: str
    num_samples: int  # at the manifest's sample rate
    source_rate: int
    channels: int
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Quarantined:
    source: str
    reason: str


def speaker_of(relative: Path, corpus: FolderCorpus) -> str:
    return speaker_from_path(relative, corpus.speaker)


def speaker_from_path(relative: Path, rule: SpeakerRule) -> str:
    """The speaker id a rule reads from a file's path (relative to the corpus root)."""
    if rule.kind == "parent_dir":
        parents = relative.parents
        if rule.level > len(parents) - 1:
            raise AudioError(f"{relative}: no folder {rule.level} level(s) up for the speaker id")
        return parents[rule.level - 1].name
    if rule.kind == "filename_prefix":
        if rule.separator not in relative.stem:
            raise AudioError(f"{relative}: no {rule.separator!r} in the name for the speaker id")
        return relative.stem.split(rule.separator, 1)[0]
    match = re.search(rule.regex or "", relative.as_posix())
    if not match:
        raise AudioError(f"{relative}: speaker regex {rule.regex!r} does not match")
    if not match.group(1):
        raise AudioError(f"{relative}: speaker regex {rule.regex!r} captures no speaker id")
    return match.group(1)


def read_audio(
    path: str | Path, sample_rate: int, downmix: str = "mean"
) -> tuple[np.ndarray, int, int]:
    """Mono float32 at ``sample_rate``; returns (signal, source rate, channel count)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"{path}: unreadable audio ({exc})") from None
    channels = data.shape[1]
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty (no samples)")
    mono = data.mean(axis=1) if downmix == "mean" else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{path}: contains NaN or infinite samples")
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32), rate, channels


def audio_problems(signal: np.ndarray, sample_rate: int, min_s: float, max_s: float) -> str | None:
    """Why a decoded signal is unusable as a clean utterance, or None."""
    duration = signal.size / sample_rate
    if duration < min_s:
        return f"too short ({duration:.2f} s < min_duration_s {min_s} s)"
    if duration > max_s:
        return f"too long ({duration:.1f} s > max_duration_s {max_s} s)"
    peak = float(np.max(np.abs(signal)))
    if peak <= 10 ** (SILENCE_PEAK_DBFS / 20):
        level = 20 * np.log10(peak) if peak > 0 else -np.inf
        return f"silent (peak {level:.0f} dBFS <= {SILENCE_PEAK_DBFS:.0f} dBFS)"
    return None


def is_clipped(signal: np.ndarray) -> bool:
    return float(np.mean(np.abs(signal) >= CLIP_LEVEL)) > CLIP_FRACTION


def file_hash(path: Path) -> str:
    """The content hash every audio input (utterance, measured RIR, noise file) is keyed by."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


def find_files(root: Path, pattern: str, field: str) -> list[Path]:
    """The files under ``root`` matching ``pattern`` (``a|b`` for several), sorted; an
    ``AudioError`` naming the manifest ``field`` when ``root`` is not a folder."""
    if not root.is_dir():
        raise AudioError(f"{field}: {root} is not a folder")
    found: set[Path] = set()
    for part in pattern.split("|"):
        found.update(p for p in root.glob(part) if p.is_file())
    return sorted(found)


def _find_files(corpus: FolderCorpus) -> list[Path]:
    files = find_files(Path(corpus.path), corpus.pattern, "corpus.path")
    return files[: corpus.limit] if corpus.limit else files


def _scan_key(path: Path, corpus: FolderCorpus | LhotseCorpus, sample_rate: int) -> str:
    """What a file's scan result depends on: its identity and version, and the scan settings."""
    stat = path.stat()
    return json.dumps(
        [
            str(path.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            sample_rate,
            corpus.downmix,
            corpus.min_duration_s,
            corpus.max_duration_s,
        ]
    )


def wav_truncation(path: Path) -> str | None:
    """Why a RIFF/WAVE file is truncated (its header declares more data than the file holds),
    or None. libsndfile silently reads what is there, so a half-copied file would pass as a
    short utterance. Sizes 0 and 0xFFFFFFFF are what streaming writers leave: not truncation.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        position = 12
        while position + 8 <= size:
            handle.seek(position)
            chunk = handle.read(8)
            name, length = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if name == b"data":
                available = size - position - 8
                if 0 < length < 0xFFFFFFFF and length > available:
                    return (
                        f"truncated: the header declares {length} bytes of audio, the file "
                        f"holds {available} (an incomplete copy?)"
                    )
                return None
            position += 8 + length + (length & 1)  # chunks are padded to even sizes
    return None


def _scan_file(path: Path, corpus: FolderCorpus | LhotseCorpus, sample_rate: int) -> dict:
    """Read, check and hash one file: ``{"problem": reason}`` or its utterance facts."""
    try:
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            raise AudioError(f"{path}: not a wav/flac/ogg file")
        if path.suffix.lower() == ".wav" and (truncated := wav_truncation(path)):
            raise AudioError(f"{path}: {truncated}")
        signal, rate, channels = read_audio(path, sample_rate, corpus.downmix)
        problem = audio_problems(signal, sample_rate, corpus.min_duration_s, corpus.max_duration_s)
        if problem:
            raise AudioError(f"{path}: {problem}")
    except AudioError as exc:
        return {"problem": str(exc)}
    return {
        "content_hash": file_hash(path),
        "num_samples": int(signal.size),
        "source_rate": rate,
        "channels": channels,
        "flags": ["clipped"] if is_clipped(signal) else [],
    }


def _cached_scan(
    path: Path,
    corpus: FolderCorpus | LhotseCorpus,
    sample_rate: int,
    previous: dict[str, dict],
    cache: dict[str, dict] | None,
) -> dict:
    """A file's scan facts, from ``previous`` when its path, size and mtime are unchanged."""
    key = _scan_key(path, corpus, sample_rate)
    facts = previous.get(key) or _scan_file(path, corpus, sample_rate)
    if cache is not None:
        cache[key] = facts
    return facts


def _utterance(utterance_id: str, speaker: str, path: Path, facts: dict) -> Utterance:
    return Utterance(
        utterance_id=utterance_id,
        speaker=speaker,
        source=str(path),
        content_hash=facts["content_hash"],
        num_samples=facts["num_samples"],
        source_rate=facts["source_rate"],
        channels=facts["channels"],
        flags=tuple(facts["flags"]),
    )


def scan_corpus(
    corpus: DemoCorpus | FolderCorpus | LhotseCorpus,
    sample_rate: int,
    cache: dict[str, dict] | None = None,
) -> tuple[list[Utterance], list[Quarantined]]:
    """Every usable utterance with its hash, speaker and length, and every rejected file.

    ``cache`` (file scans by path, size, modification time and scan settings) skips reading
    files scanned before; it is updated in place to hold exactly this scan's files. A stale
    entry cannot slip through: rendering checks each file's content hash again.
    """
    if isinstance(corpus, DemoCorpus):
        return _scan_demo(corpus, sample_rate), []
    previous = dict(cache or {})
    if cache is not None:
        cache.clear()
    if isinstance(corpus, LhotseCorpus):
        return _scan_lhotse(corpus, sample_rate, previous, cache)
    utterances: list[Utterance] = []
    quarantined: list[Quarantined] = []
    root = Path(corpus.path)
    files = _find_files(corpus)
    if not files:
        raise AudioError(f"corpus.path: no files match {corpus.pattern!r} under {root}")
    seen: dict[str, Path] = {}
    for path in files:
        relative = path.relative_to(root)
        utterance_id = relative.with_suffix("").as_posix()
        try:
            if utterance_id in seen:
                raise AudioError(
                    f"{path}: same utterance id {utterance_id!r} as {seen[utterance_id]} "
                    "(two files differ only in their suffix)"
                )
            speaker = speaker_of(relative, corpus)
            facts = _cached_scan(path, corpus, sample_rate, previous, cache)
            if "problem" in facts:
                raise AudioError(facts["problem"])
        except AudioError as exc:
            quarantined.append(Quarantined(str(path), str(exc)))
            continue
        seen[utterance_id] = path
        utterances.append(_utterance(utterance_id, speaker, path, facts))
    return utterances, quarantined


def _scan_lhotse(
    corpus: LhotseCorpus,
    sample_rate: int,
    previous: dict[str, dict],
    cache: dict[str, dict] | None,
) -> tuple[list[Utterance], list[Quarantined]]:
    """A Lhotse RecordingSet's recordings as utterances: the recording id is the utterance id,
    the speaker comes from the supervisions, and each file is read, checked, hashed and cached
    exactly as a folder corpus's file is."""
    from .lhotse_io import metadata_mismatch, read_recordings

    utterances: list[Utterance] = []
    quarantined: list[Quarantined] = []
    ids: set[str] = set()
    files: dict[Path, str] = {}
    for recording in read_recordings(corpus):
        rid = recording.recording_id
        try:
            if rid in ids:
                raise AudioError("the same recording id is listed twice in the RecordingSet")
            ids.add(rid)
            if recording.problem:
                raise AudioError(recording.problem)
            path = recording.path
            assert path is not None and recording.speaker is not None  # no problem: both known
            if not path.is_file():
                raise AudioError(
                    f"{path}: missing (no such file; relative audio paths start at "
                    f"corpus.audio_root = {corpus.audio_root or '.'})"
                )
            # Two ids for one file would put the same audio into the dataset twice, perhaps
            # under two speakers and so in two splits.
            resolved = path.resolve()
            if resolved in files:
                raise AudioError(f"{path}: same audio file as recording {files[resolved]!r}")
            files[resolved] = rid
            try:
                facts = _cached_scan(path, corpus, sample_rate, previous, cache)
            except OSError as exc:  # deleted or made unreadable since it was found
                raise AudioError(f"{path}: unreadable ({exc.strerror or exc})") from None
            if "problem" in facts:
                raise AudioError(facts["problem"])
            if mismatch := metadata_mismatch(recording, facts, sample_rate):
                raise AudioError(f"{path}: {mismatch}")
        except AudioError as exc:
            quarantined.append(Quarantined(recording.source, f"recording {rid!r}: {exc}"))
            continue
        utterances.append(_utterance(rid, recording.speaker, path, facts))
    return utterances, quarantined


def _scan_demo(corpus: DemoCorpus, sample_rate: int) -> list[Utterance]:
    utterances = []
    for item in demo_utterances(corpus.speakers, corpus.utterances_per_speaker):
        source = f"demo:{item.speaker}:{item.index}"
        signal = _cached(  # the build renders it next: synthesise it once
            (source, sample_rate),
            lambda: synthesize_utterance(item.speaker, item.index, sample_rate),  # noqa: B023
        )
        utterances.append(
            Utterance(
                utterance_id=item.utterance_id,
                speaker=item.speaker,
                source=source,
                content_hash=hashlib.sha256(signal.tobytes()).hexdigest()[:24],
                num_samples=int(signal.size),
                source_rate=sample_rate,
                channels=1,
            )
        )
    return utterances


# Decoded utterances kept per process: every utterance is rendered once per variant, in rooms
# that lie in different shards, so a worker meets it again shard after shard. Decoding and
# resampling (or synthesising a demo utterance, 30 ms) then happens once, not once per variant.
UTTERANCE_CACHE_BYTES = 256 * 2**20
_decoded: OrderedDict[tuple, np.ndarray] = OrderedDict()


def _cached(key: tuple, load) -> np.ndarray:
    """``load()``'s array, read-only, from a least-recently-used cache of decoded audio."""
    signal = _decoded.get(key)
    if signal is not None:
        _decoded.move_to_end(key)
        return signal
    signal = load()
    signal.flags.writeable = False  # shared by every caller: nobody may change it in place
    if signal.nbytes <= UTTERANCE_CACHE_BYTES:
        _decoded[key] = signal
        total = sum(s.nbytes for s in _decoded.values())
        while total > UTTERANCE_CACHE_BYTES:
            total -= _decoded.popitem(last=False)[1].nbytes
    return signal


def load_utterance(utterance: Utterance, sample_rate: int, downmix: str = "mean") -> np.ndarray:
    """The utterance's samples exactly as scanned (same rate, same downmix, same length).

    The array is read-only (it may be shared through the decode cache). A file is hashed on
    every call, cached or not, so one that changed since the plan is refused even after an
    earlier load.
    """
    if utterance.source.startswith("demo:"):
        _, speaker, index = utterance.source.split(":")
        signal = _cached(
            (utterance.source, sample_rate),
            lambda: synthesize_utterance(speaker, int(index), sample_rate),
        )
    else:
        if file_hash(Path(utterance.source)) != utterance.content_hash:
            raise AudioError(f"{utterance.source}: file content changed since the plan was made")
        signal = _cached(
            (utterance.source, utterance.content_hash, sample_rate, downmix),
            lambda: read_audio(utterance.source, sample_rate, downmix)[0],
        )
    if signal.size != utterance.num_samples:
        raise AudioError(
            f"{utterance.source}: changed since the plan was made "
            f"({signal.size} samples, expected {utterance.num_samples})"
        )
    return signal
