"""The build plan: every example's parameters, decided before any audio is touched.

A plan is a pure function of the validated manifest and the corpus scan. Every random choice is
drawn from a generator seeded by a hash of (manifest seed, what, which item), so the plan does
not depend on the order of files, the number of workers, or what a resumed build redoes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from .corpus import AudioError, Quarantined, Utterance
from .manifest import SPLIT_NAMES, Manifest
from .measured_rirs import ROOM_PREFIX, MeasuredRir, MeasuredRirSpec, MeasuredRoom
from .noise import NoiseDraw, NoiseFile
from .rir_bank import AnyRirSpec, AugmentedRirSpec, RirSpec
from .rooms import Placement, RoomSpec, sample_placement, sample_room
from .seeds import derive_seed, rng_for, stable_hash
from .stft import StftConfig

RENDER_REVISION = 1  # bump when rendering changes its output for the same inputs


@dataclass(frozen=True)
class Example:
    example_id: str
    split: str
    utterance_id: str
    speaker: str
    variant: int
    room_id: str
    rir_id: str
    rms_dbfs: float | None
    num_samples: int
    frame_count: int
    shard: int
    frame_offset: int
    fingerprint: str
    noise: NoiseDraw | None = None  # manifest ``noise``: this example's draw, if any


@dataclass(frozen=True)
class Shard:
    shard_id: int
    frame_start: int
    example_ids: tuple[str, ...]
    fingerprint: str


@dataclass
class Plan:
    manifest: Manifest
    utterances: dict[str, Utterance]
    quarantined: list[Quarantined]
    rooms: dict[str, RoomSpec]
    rirs: dict[str, AnyRirSpec]
    examples: list[Example]
    shards: list[Shard]
    speaker_splits: dict[str, str] = field(default_factory=dict)
    # The measured-RIR pool (every usable RIR, used or not) and each measured room's split.
    measured: list[MeasuredRir] = field(default_factory=list)
    measured_room_splits: dict[str, str] = field(default_factory=dict)
    # The usable files of ``noise.files`` (their scan), when the manifest names a folder.
    noise_files: list[NoiseFile] = field(default_factory=list)

    @property
    def stft(self) -> StftConfig:
        s = self.manifest.stft
        return StftConfig(s.n_fft, s.hop, s.window)

    @property
    def n_frames(self) -> int:
        return len(self.shards) * self.manifest.storage.frames_per_shard

    def example(self, example_id: str) -> Example:
        return self._by_id()[example_id]

    def _by_id(self) -> dict[str, Example]:
        if not hasattr(self, "_index"):
            self._index = {e.example_id: e for e in self.examples}
        return self._index

    def to_json(self) -> str:
        """What is needed to rebuild the plan: manifest and corpus scan (rest is derived)."""
        data = {
            "manifest": self.manifest.model_dump(mode="json"),
            "utterances": [u.to_dict() for u in self.utterances.values()],
            "quarantined": [asdict(q) for q in self.quarantined],
        }
        if self.manifest.rooms.measured is not None:  # absent otherwise: plans read as before
            data["measured"] = [m.to_dict() for m in self.measured]
        noise = self.manifest.noise
        if noise is not None and noise.files is not None:  # absent otherwise, as "measured"
            data["noise_files"] = [f.to_dict() for f in self.noise_files]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        manifest = Manifest.model_validate(data["manifest"])
        utterances = [Utterance(**{**u, "flags": tuple(u["flags"])}) for u in data["utterances"]]
        quarantined = [Quarantined(**q) for q in data["quarantined"]]
        measured = [MeasuredRir(**m) for m in data.get("measured", [])]
        noise_files = [NoiseFile(**f) for f in data.get("noise_files", [])]
        return make_plan(manifest, utterances, quarantined, measured, noise_files)

    def summary(self) -> dict:
        per_split = Counter(e.split for e in self.examples)
        seconds = sum(e.num_samples for e in self.examples) / self.manifest.sample_rate
        extra = {}
        if self.manifest.rooms.measured is not None:  # absent otherwise: reports as before
            measured = Counter(e.split for e in self.examples if e.room_id.startswith(ROOM_PREFIX))
            extra = {
                "measured_rooms_per_split": dict(
                    sorted(Counter(self.measured_room_splits.values()).items())
                ),
                "measured_examples_per_split": dict(sorted(measured.items())),
            }
        if self.manifest.augmentation is not None:  # absent otherwise: reports as before
            extra["augmented_examples"] = sum(
                isinstance(self.rirs[e.rir_id], AugmentedRirSpec) for e in self.examples
            )
        if self.manifest.noise is not None:
            extra["noisy_examples"] = sum(e.noise is not None for e in self.examples)
        return {
            "examples": len(self.examples),
            "examples_per_split": dict(sorted(per_split.items())),
            "utterances": len(self.utterances),
            "speakers_per_split": dict(sorted(Counter(self.speaker_splits.values()).items())),
            "rooms": len(self.rooms),
            "unique_rirs": len(self.rirs),
            "hours": round(seconds / 3600, 4),
            "shards": len(self.shards),
            "frames": self.n_frames,
            "quarantined": len(self.quarantined),
            **extra,
        }


def assign_speaker_splits(speakers: list[str], manifest: Manifest) -> dict[str, str]:
    """Speaker-disjoint splits: shuffle speakers by hash, cut by fractions (largest remainder).

    Every split with a positive fraction gets at least one speaker when there are enough.
    """
    return _hash_splits(speakers, manifest.splits.fractions(), manifest.seed, "speaker")


def assign_measured_room_splits(rooms: list[str], manifest: Manifest) -> dict[str, str]:
    """Room-disjoint measured pools: each measured room goes to one of the splits with a
    positive ``share``, by hash, in proportion to the splits' fractions (as speakers are)."""
    config = manifest.rooms.measured
    if config is None:
        return {}
    fractions = manifest.splits.fractions()
    wanted = {s: fractions[s] for s in fractions if config.share.get(s, 0.0) > 0}
    if not wanted:
        return {}
    total = sum(wanted.values())
    return _hash_splits(
        rooms, {s: f / total for s, f in wanted.items()}, manifest.seed, "measured_room"
    )


def _hash_splits(
    items: list[str], fractions: dict[str, float], seed: int, what: str
) -> dict[str, str]:
    order = sorted(items, key=lambda s: derive_seed(seed, what, s))
    n = len(order)
    names = list(fractions)
    exact = np.array([fractions[name] * n for name in names])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= len(names):
        for i in range(len(names)):
            if counts[i] == 0:
                donor = int(np.argmax(counts))
                counts[donor] -= 1
                counts[i] += 1
    splits: dict[str, str] = {}
    start = 0
    for name, count in zip(names, counts, strict=True):
        for speaker in order[start : start + count]:
            splits[speaker] = name
        start += count
    return splits


def make_plan(
    manifest: Manifest,
    utterances: list[Utterance],
    quarantined: list[Quarantined] | None = None,
    measured: list[MeasuredRir] | None = None,
    noise_files: list[NoiseFile] | None = None,
) -> Plan:
    """Decide every example: split, room, placement, level, and where it lives in the store.

    With ``rooms.measured``, ``measured`` is the scan of its folder
    (:func:`dereverb_data.measured_rirs.scan_measured`): a fraction ``share`` of each split's
    examples, drawn per example, use an RIR of that split's measured pool instead. With
    ``augmentation`` and ``noise``, each example draws from streams of its own whether (and
    how) its RIR is augmented and noise is added; ``noise_files`` is the scan of
    ``noise.files`` (:func:`dereverb_data.noise.scan_noise_files`).
    """
    quarantined = list(quarantined or [])
    measured = sorted(measured or [], key=lambda m: (m.room, m.source, m.channel))
    stft = StftConfig(manifest.stft.n_fft, manifest.stft.hop, manifest.stft.window)
    tail = round(manifest.render.tail_ms * manifest.sample_rate / 1000)
    shard_frames = manifest.storage.frames_per_shard
    usable: list[Utterance] = []
    for utt in sorted(utterances, key=lambda u: u.utterance_id):
        frames = stft.n_frames(utt.num_samples + tail)
        if frames > shard_frames:
            quarantined.append(
                Quarantined(
                    utt.source,
                    f"{utt.source}: {frames} STFT frames do not fit in one shard "
                    f"(storage.frames_per_shard = {shard_frames}); raise it or shorten the file",
                )
            )
            continue
        usable.append(utt)

    speaker_splits = assign_speaker_splits(sorted({u.speaker for u in usable}), manifest)
    rooms_cfg = manifest.rooms
    rooms: dict[str, RoomSpec] = {}
    placements: dict[str, list[Placement]] = {}
    for split in manifest.splits.fractions():
        for i in range(rooms_cfg.rooms_per_split[split]):
            room = sample_room(rooms_cfg, manifest.seed, split, i)
            rooms[room.room_id] = room
            placements[room.room_id] = [
                sample_placement(rooms_cfg, room, manifest.seed, j)
                for j in range(rooms_cfg.positions_per_room)
            ]

    measured_splits = assign_measured_room_splits(sorted({m.room for m in measured}), manifest)
    pools = _measured_pools(manifest, measured, measured_splits)

    noise_files = sorted(noise_files or [], key=lambda f: (f.content_hash, f.source))
    noise_sources = _noise_sources(manifest, noise_files)
    render_config = _render_config(manifest)
    rirs: dict[str, AnyRirSpec] = {}
    drafts = []
    split_rank = {name: i for i, name in enumerate(SPLIT_NAMES)}
    for utt in sorted(
        usable, key=lambda u: (split_rank[speaker_splits[u.speaker]], u.utterance_id)
    ):
        split = speaker_splits[utt.speaker]
        split_rooms = [r for r in rooms.values() if r.split == split]
        for variant in range(manifest.variants_per_utterance):
            rng = rng_for(manifest.seed, "example", split, utt.utterance_id, variant)
            room = split_rooms[int(rng.integers(len(split_rooms)))]
            placement = placements[room.room_id][int(rng.integers(rooms_cfg.positions_per_room))]
            rms = None
            if manifest.level.mode == "rms":
                rms = round(float(rng.uniform(*manifest.level.rms_dbfs)), 3)
            spec: AnyRirSpec = RirSpec(room, placement, manifest.sample_rate, manifest.simulation)
            pool = pools.get(split)
            if pool:
                # Its own generator, so the draws above (and every plan without measured
                # RIRs) are exactly as before; a pure function of the example, like them.
                pick = rng_for(manifest.seed, "measured", split, utt.utterance_id, variant)
                if pick.random() < manifest.rooms.measured.share.get(split, 0.0):  # type: ignore[union-attr]
                    spec = pool[int(pick.integers(len(pool)))]
            # Augmentation and noise draw from streams of their own too, so no draw above
            # moves; an augmented RIR's id hashes its base and the draw, so the fingerprint
            # (which hashes the RIR id) changes with either.
            spec = _draw_augmentation(manifest, spec, split, utt.utterance_id, variant)
            rirs.setdefault(spec.rir_id, spec)
            num_samples = utt.num_samples + tail
            noise = _draw_noise(manifest, noise_sources, split, utt.utterance_id, variant)
            parts = [utt.content_hash, utt.num_samples, spec.rir_id, rms, render_config]
            if noise is not None:  # only then: noise-free examples keep their fingerprints
                parts.append(noise.fingerprint())
            fingerprint = stable_hash(parts, 24)
            drafts.append(
                (
                    utt,
                    split,
                    variant,
                    spec.room.room_id,
                    spec.rir_id,
                    rms,
                    num_samples,
                    fingerprint,
                    noise,
                )
            )

    # Shards hold one room's examples side by side (split, room, utterance order): editing some
    # rooms then touches only their shards, not a scattering of examples across every shard.
    drafts.sort(key=lambda d: (split_rank[d[1]], d[3], d[0].utterance_id, d[2]))
    examples, shards = _pack(drafts, stft, shard_frames)
    return Plan(
        manifest,
        {u.utterance_id: u for u in usable},
        quarantined,
        rooms,
        rirs,
        examples,
        shards,
        speaker_splits,
        measured,
        measured_splits,
        noise_files,
    )


def _measured_pools(
    manifest: Manifest, measured: list[MeasuredRir], room_splits: dict[str, str]
) -> dict[str, list[MeasuredRirSpec]]:
    """Each split's measured RIRs (one spec per distinct RIR), in a stable order; a split
    that should draw from a pool but has no measured room is an error, not a silent 0 %."""
    config = manifest.rooms.measured
    if config is None:
        return {}
    pools: dict[str, list[MeasuredRirSpec]] = {}
    seen: set[str] = set()
    for entry in measured:
        split = room_splits[entry.room]
        room = MeasuredRoom(f"{ROOM_PREFIX}{entry.room}", split)
        spec = MeasuredRirSpec(room, entry, manifest.sample_rate, config.pre_direct_ms)
        if spec.rir_id not in seen:  # identical files in two places are one RIR
            seen.add(spec.rir_id)
            pools.setdefault(split, []).append(spec)
    for split in manifest.splits.fractions():
        if config.share.get(split, 0.0) > 0 and not pools.get(split):
            raise AudioError(
                f"rooms.measured: split {split!r} has share {config.share[split]} but no "
                f"measured room ({len({m.room for m in measured})} usable room(s) in "
                f"{config.path} for {sum(1 for s in config.share.values() if s > 0)} split(s) "
                "with a share); add rooms, or set its share to 0"
            )
    return pools


def _draw_augmentation(
    manifest: Manifest,
    spec: RirSpec | MeasuredRirSpec,
    split: str,
    utterance_id: str,
    variant: int,
) -> AnyRirSpec:
    """The example's RIR, augmented with ``augmentation.probability`` (a pure function of
    the example, from its own generator)."""
    config = manifest.augmentation
    if config is None or config.probability <= 0:
        return spec
    rng = rng_for(manifest.seed, "augment", split, utterance_id, variant)
    if rng.random() >= config.probability:
        return spec
    from .augment import draw_augmentation

    drawn = draw_augmentation(
        int(rng.integers(2**63)),
        {"drr_change_db": config.drr_change_db, "rt60_factor": config.rt60_factor},
    )
    # Rounded: the values are hashed into the RIR id and written as labels.
    return AugmentedRirSpec(
        spec,
        round(drawn["drr_change_db"], 3),
        round(drawn["rt60_factor"], 4),
        config.bands,
    )


def _noise_sources(manifest: Manifest, noise_files: list[NoiseFile]) -> list:
    """What an example's noise is drawn from: the colours, then the usable files."""
    config = manifest.noise
    if config is None:
        return []
    sources: list = [("colour", c) for c in config.colours]
    sources += [("file", f) for f in noise_files]
    if not sources:
        raise AudioError(
            f"noise.files: no usable noise file in {config.files} and no colours: there is "
            "no noise to add (see the quarantine list)"
        )
    return sources


def _draw_noise(
    manifest: Manifest, sources: list, split: str, utterance_id: str, variant: int
) -> NoiseDraw | None:
    config = manifest.noise
    if config is None or config.probability <= 0:
        return None
    rng = rng_for(manifest.seed, "noise", split, utterance_id, variant)
    if rng.random() >= config.probability:
        return None
    snr = round(float(rng.uniform(*config.snr_db)), 3)
    kind, source = sources[int(rng.integers(len(sources)))]
    seed = int(rng.integers(2**63))
    if kind == "colour":
        return NoiseDraw(snr, "colour", colour=source, seed=seed)
    # Where in the file the example's noise starts (looped past its end).
    offset = int(rng.integers(source.num_samples))
    return NoiseDraw(
        snr, "file", source=source.source, content_hash=source.content_hash, offset=offset
    )


def _render_config(manifest: Manifest) -> dict:
    return {
        "sample_rate": manifest.sample_rate,
        "target": manifest.target.model_dump(mode="json"),
        "level": manifest.level.model_dump(mode="json"),
        "render": manifest.render.model_dump(mode="json"),
        "stft": manifest.stft.model_dump(mode="json"),
        "dtype": manifest.storage.dtype,
        "revision": RENDER_REVISION,
    }


def _pack(drafts: list, stft: StftConfig, shard_frames: int) -> tuple[list[Example], list[Shard]]:
    """Fill shards in draft order with whole examples; the rest of a shard is zero padding.

    Neither lengths nor the room an example draws depend on the rooms' parameters, so editing
    rooms never moves an example: an incremental rebuild rewrites only the shards whose examples
    changed.
    """
    examples: list[Example] = []
    groups: list[list[Example]] = [[]]
    used = 0
    for utt, split, variant, room_id, rir_id, rms, num_samples, fingerprint, noise in drafts:
        frames = stft.n_frames(num_samples)
        if used + frames > shard_frames:
            groups.append([])
            used = 0
        shard = len(groups) - 1
        example = Example(
            example_id=f"{utt.utterance_id}#{variant}",
            split=split,
            utterance_id=utt.utterance_id,
            speaker=utt.speaker,
            variant=variant,
            room_id=room_id,
            rir_id=rir_id,
            rms_dbfs=rms,
            num_samples=num_samples,
            frame_count=frames,
            shard=shard,
            frame_offset=shard * shard_frames + used,
            fingerprint=fingerprint,
            noise=noise,
        )
        groups[-1].append(example)
        examples.append(example)
        used += frames
    if not examples:
        return [], []
    shards = [
        Shard(
            shard_id=i,
            frame_start=i * shard_frames,
            example_ids=tuple(e.example_id for e in group),
            fingerprint=stable_hash([(e.fingerprint, e.frame_offset) for e in group], 24),
        )
        for i, group in enumerate(groups)
    ]
    return examples, shards
