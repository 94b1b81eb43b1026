"""Lhotse manifests in: a RecordingSet (and SupervisionSet) as a corpus.

This module only reads what the manifests say: which file each recording is, and its speaker.
The audio itself is read, checked, hashed and cached by the folder corpus's code
(:mod:`dereverb_data.corpus`), so a file gives the same utterance, content hash and quarantine
reason whichever way it was listed.

What is supported is deliberately narrow, because an utterance here is always a whole file
read the same way at scan and at render time:

- one ``AudioSource`` of ``type: file`` per recording, using all of that file's channels
  (several channels are downmixed by ``corpus.downmix``);
- no ``transforms`` (speed/volume perturbation, resampling recorded in the manifest);
- the whole file is the utterance: supervision start/duration are not used.

Everything else (``url``, ``command``, ``memory``, ``shar`` sources, one file per channel,
channel subsets, transforms) is quarantined with the reason, never silently reinterpreted.

``lhotse`` is an optional dependency and is imported only when a Lhotse corpus is scanned.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import AudioError, speaker_from_path
from .manifest import LHOTSE_MISSING, LhotseCorpus, lhotse_installed

# Lhotse's own default for how far a file's duration may differ from the manifest's
# (``LHOTSE_AUDIO_DURATION_MISMATCH_TOLERANCE``); more than that means the file is not the one
# the manifest describes.
DURATION_TOLERANCE_S = 0.025


@dataclass(frozen=True)
class LhotseRecording:
    """One recording of a RecordingSet, reduced to what a scan needs."""

    recording_id: str
    path: Path | None  # the audio file; None when the source is not a local file
    source: str  # what the report names: the file, or the recording and its source type
    problem: str | None  # why the recording cannot be used, before any audio is read
    speaker: str | None
    sampling_rate: int
    duration: float
    channels: int


def _import_lhotse() -> Any:
    if not lhotse_installed():
        raise AudioError(LHOTSE_MISSING)
    import lhotse

    return lhotse


def require_file(path: Path, field: str) -> None:
    """The Lhotse manifest named by ``corpus.<field>`` must be a file."""
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise AudioError(f"corpus.{field}: {path} {what}")


def _manifest_items(path: Path, field: str, expected: str) -> Iterator[Any]:
    """The items of a Lhotse manifest of type ``expected`` (``RecordingSet``, ...).

    Opened lazily where Lhotse can (JSONL), so a corpus of 300k recordings is not held twice
    in memory. Any decoding failure is one error naming the field and the file.
    """
    lhotse = _import_lhotse()
    from lhotse.serialization import load_manifest_lazy_or_eager

    require_file(path, field)
    try:
        manifest = load_manifest_lazy_or_eager(path)
        if manifest is None:
            raise AudioError(f"corpus.{field}: {path} is empty (no {expected} items)")
        if not isinstance(manifest, getattr(lhotse, expected)):
            raise AudioError(
                f"corpus.{field}: {path} is a Lhotse {type(manifest).__name__}, not a "
                f"{expected} (give the {expected} that `lhotse prepare` wrote)"
            )
        yield from manifest
    except AudioError:
        raise
    except Exception as exc:  # Lhotse raises ValueError, KeyError, JSON and gzip errors alike
        raise AudioError(
            f"corpus.{field}: {path} is not a readable Lhotse {expected} "
            f"({type(exc).__name__}: {exc})"
        ) from None


def supervision_speakers(path: Path) -> dict[str, set[str]]:
    """The speakers each recording's supervisions name (empty or missing speakers skipped)."""
    speakers: dict[str, set[str]] = {}
    for segment in _manifest_items(path, "supervisions", "SupervisionSet"):
        found = speakers.setdefault(str(segment.recording_id), set())
        if segment.speaker not in (None, ""):
            found.add(str(segment.speaker))
    return speakers


def _structure_problem(recording: Any) -> str | None:
    """Why a recording is not one whole local file read as is, or None."""
    sources = recording.sources
    if len(sources) != 1:
        return (
            f"{len(sources)} audio sources (one file per channel?): only recordings stored in "
            "one file are supported"
        )
    source = sources[0]
    if source.type != "file":
        hint = "; download it and list the local file" if source.type == "url" else ""
        return (
            f"audio source type {source.type!r} is not supported (only 'file': local audio "
            f"files){hint}"
        )
    if recording.transforms:
        names = ", ".join(
            str(t.get("name", "?") if isinstance(t, dict) else type(t).__name__)
            for t in recording.transforms
        )
        return (
            f"has audio transforms ({names}): not supported (the audio would not be the "
            "file's); list the unperturbed recording"
        )
    whole = list(range(len(source.channels)))
    if list(source.channels) != whole or list(recording.channel_ids) != whole:
        return (
            f"uses channels {list(recording.channel_ids)} of a source with channels "
            f"{list(source.channels)}: channel subsets are not supported (whole files only)"
        )
    return None


def _speaker(
    path: Path | None,
    speakers: set[str] | None,
    corpus: LhotseCorpus,
    audio_root: Path,
) -> tuple[str | None, str | None]:
    """(speaker, None) or (None, why there is none); ``speakers`` is what the recording's
    supervisions name, None when it has no supervision."""
    if speakers and len(speakers) == 1:
        return next(iter(speakers)), None
    if speakers and len(speakers) > 1:
        # One recording in two splits' speakers would leak a voice across the split.
        names = ", ".join(sorted(speakers)[:5])
        return None, (
            f"its supervisions name {len(speakers)} speakers ({names}): a recording must hold "
            "one speaker for speaker-disjoint splits"
        )
    if corpus.speaker_fallback is None or path is None:
        if not corpus.supervisions:
            why = "the corpus has no supervisions"
        elif speakers is None:
            why = "no supervision is for this recording"
        else:
            why = "none of its supervisions names one"
        return None, (
            f"no speaker: {why} (add them, or set corpus.speaker_fallback to read it from the "
            "file path)"
        )
    try:
        relative = path.relative_to(audio_root)
    except ValueError:
        relative = path
    try:
        return speaker_from_path(relative, corpus.speaker_fallback), None
    except AudioError as exc:
        return None, f"speaker_fallback: {exc}"


def read_recordings(corpus: LhotseCorpus) -> list[LhotseRecording]:
    """Every recording of the corpus, sorted by id, with its file, speaker, or problem.

    ``corpus.limit`` keeps the first N ids. Relative audio paths start at
    ``corpus.audio_root`` (``load_manifest`` sets it to the manifest's folder by default;
    without it, the working directory, as in Lhotse itself).
    """
    audio_root = Path(corpus.audio_root or ".")
    speakers = supervision_speakers(Path(corpus.supervisions)) if corpus.supervisions else {}
    # Reduced to small records while streaming: a RecordingSet of 300k Lhotse objects, held
    # whole to sort it, would cost far more memory than the scan needs.
    out = [
        _reduce(recording, speakers, corpus, audio_root)
        for recording in _manifest_items(Path(corpus.recordings), "recordings", "RecordingSet")
    ]
    if not out:
        raise AudioError(f"corpus.recordings: {corpus.recordings} holds no recordings")
    out.sort(key=lambda r: r.recording_id)  # stable: a repeated id keeps the file's order
    return out[: corpus.limit] if corpus.limit else out


def _reduce(
    recording: Any, speakers: dict[str, set[str]], corpus: LhotseCorpus, audio_root: Path
) -> LhotseRecording:
    recording_id = str(recording.id)
    problem = _structure_problem(recording)
    path = None
    source = f"lhotse recording {recording_id}"
    if problem is None:
        path = Path(recording.sources[0].source)
        path = path if path.is_absolute() else audio_root / path
        source = str(path)
    speaker, speaker_problem = _speaker(path, speakers.get(recording_id), corpus, audio_root)
    return LhotseRecording(
        recording_id=recording_id,
        path=path,
        source=source,
        problem=problem or speaker_problem,
        speaker=speaker,
        sampling_rate=int(recording.sampling_rate),
        duration=float(recording.duration),
        channels=len(recording.channel_ids),
    )


def metadata_mismatch(recording: LhotseRecording, facts: dict, sample_rate: int) -> str | None:
    """Why the scanned file is not the one the RecordingSet describes (a stale manifest), or
    None. The speaker comes from the manifest, so a replaced file must not inherit it."""
    if facts["source_rate"] != recording.sampling_rate:
        return (
            f"the RecordingSet says {recording.sampling_rate} Hz, the file is "
            f"{facts['source_rate']} Hz (a stale manifest?)"
        )
    if facts["channels"] != recording.channels:
        return (
            f"the RecordingSet says {recording.channels} channel(s), the file has "
            f"{facts['channels']} (a stale manifest?)"
        )
    duration = facts["num_samples"] / sample_rate
    if abs(duration - recording.duration) > DURATION_TOLERANCE_S:
        return (
            f"the RecordingSet says {recording.duration:.3f} s, the file holds "
            f"{duration:.3f} s (a stale manifest?)"
        )
    return None


def peek_manifest_type(path: Path) -> str | None:
    """What a JSONL(.gz) Lhotse manifest holds, from its first line, without importing lhotse:
    ``"RecordingSet"``, ``"SupervisionSet"``, ``"CutSet"``, ``"unknown"``, or None when the
    file is not JSONL (Lhotse reads it later and names any problem then)."""
    suffixes = Path(path).suffixes
    if ".jsonl" not in suffixes:
        return None
    opener = gzip.open if suffixes[-1] == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            line = handle.readline()
        item = json.loads(line) if line.strip() else None
    except (OSError, UnicodeDecodeError, ValueError, EOFError) as exc:
        raise AudioError(f"{path}: not a readable JSONL manifest ({exc})") from None
    if item is None:
        return "empty"
    if not isinstance(item, dict):
        return "unknown"
    if "sources" in item and "sampling_rate" in item:
        return "RecordingSet"
    if "recording_id" in item and "start" in item and "duration" in item:
        return "SupervisionSet"
    if "type" in item and "Cut" in str(item.get("type")):
        return "CutSet"
    return "unknown"
