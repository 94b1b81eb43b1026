"""The build plan: every example's parameters, decided before any audio is touched.

A plan is a pure function of the validated manifest and the corpus scan. Every random choice is
drawn from a generator seeded by a hash of (manifest seed, what, which item), so the plan does
not depend on the order of files, the number of workers, or what a resumed build redoes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .corpus import AudioError, Quarantined, Utterance
from .manifest import SPLIT_NAMES, Manifest
from .measured_rirs import ROOM_PREFIX, MeasuredRir, MeasuredRirSpec, MeasuredRoom
from .noise import NoiseDraw, NoiseFile
from .rir_bank import AnyRirSpec, AugmentedRirSpec, RirSpec, base_spec
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


class Plan:
    """Every example's parameters, held as columns (one row per example, one per shard).

    A plan is data: :func:`make_plan` computes it once per build, the build stores it in the
    store (:meth:`to_stored` / :meth:`from_stored`, the layout in
    :mod:`dereverb_data.store_format`), and every task and the progress watcher load it from
    there instead of planning again. ``examples``, ``shards``, ``utterances`` and ``rirs``
    give the records (built on first use); a task reads one shard's with :meth:`shard` and
    :meth:`shard_examples`, which builds only those.
    """

    def __init__(
        self,
        manifest: Manifest,
        quarantined: list[Quarantined],
        rooms: dict[str, RoomSpec],
        speaker_splits: dict[str, str],
        measured: list[MeasuredRir],
        measured_room_splits: dict[str, str],
        noise_files: list[NoiseFile],
        utterance_table: dict[str, Any],
        room_ids: list[str],
        base_rirs: list[RirSpec | MeasuredRirSpec],
        columns: dict[str, np.ndarray],
    ) -> None:
        self.manifest = manifest
        self.quarantined = quarantined
        self.rooms = rooms
        self.speaker_splits = speaker_splits
        # The measured-RIR pool (every usable RIR, used or not) and each measured room's split.
        self.measured = measured
        self.measured_room_splits = measured_room_splits
        # The usable files of ``noise.files`` (their scan), when the manifest names a folder.
        self.noise_files = noise_files
        # Utterances sorted by id: ``utterance_id``, ``speaker``, ``source``, ``content_hash``
        # (lists of str), ``num_samples``, ``source_rate``, ``channels`` (arrays), ``flags``
        # (a list of tuples).
        self.utterance_table = utterance_table
        self.room_ids = room_ids  # what ``example_room`` indexes
        self.base_rirs = base_rirs  # what ``rir_base`` indexes
        self.columns = columns  # store_format.PLAN_COLUMNS

    # -- sizes and settings ----------------------------------------------------------------
    @property
    def stft(self) -> StftConfig:
        s = self.manifest.stft
        return StftConfig(s.n_fft, s.hop, s.window)

    @property
    def n_examples(self) -> int:
        return len(self.columns["example_utterance"])

    @property
    def n_shards(self) -> int:
        return len(self.columns["shard_start"])

    @property
    def n_frames(self) -> int:
        return self.n_shards * self.manifest.storage.frames_per_shard

    @cached_property
    def plan_id(self) -> str:
        """A hash of the plan's content: equal plans have equal ids."""
        from .store_format import plan_checksum

        return plan_checksum(*self._stored_parts())[:24]

    # -- records, built on demand ----------------------------------------------------------
    @cached_property
    def utterances(self) -> Mapping[str, Utterance]:
        return _Utterances(self.utterance_table)

    @cached_property
    def rirs(self) -> Mapping[str, AnyRirSpec]:
        return _Rirs(self)

    @cached_property
    def examples(self) -> list[Example]:
        return self.examples_between(0, self.n_examples)

    @cached_property
    def shards(self) -> list[Shard]:
        return [self.shard(i) for i in range(self.n_shards)]

    def shard_rows(self, shard_id: int) -> range:
        """The rows (positions in ``examples``) of a shard's examples: one run, in order."""
        start = self.columns["shard_start"]
        stop = int(start[shard_id + 1]) if shard_id + 1 < len(start) else self.n_examples
        return range(int(start[shard_id]), stop)

    def shard(self, shard_id: int) -> Shard:
        if "shards" in self.__dict__:
            return self.__dict__["shards"][shard_id]
        rows = self.shard_rows(shard_id)
        ids = self._example_ids(rows.start, rows.stop)
        return Shard(
            shard_id=shard_id,
            frame_start=shard_id * self.manifest.storage.frames_per_shard,
            example_ids=tuple(ids),
            fingerprint=self.columns["shard_fingerprint"][shard_id].decode(),
        )

    def shard_examples(self, shard_id: int) -> list[Example]:
        rows = self.shard_rows(shard_id)
        if "examples" in self.__dict__:
            return self.__dict__["examples"][rows.start : rows.stop]
        return self.examples_between(rows.start, rows.stop)

    def example(self, example_id: str) -> Example:
        row = self._rows_by_id()[example_id]
        if "examples" in self.__dict__:
            return self.__dict__["examples"][row]
        return self.examples_between(row, row + 1)[0]

    def _rows_by_id(self) -> dict[str, int]:
        if "_rows" not in self.__dict__:
            self.__dict__["_rows"] = {e: i for i, e in enumerate(self._example_ids())}
        return self.__dict__["_rows"]

    def _example_ids(self, start: int = 0, stop: int | None = None) -> list[str]:
        ids = self.utterance_table["utterance_id"]
        utt = self.columns["example_utterance"][start:stop].tolist()
        variant = self.columns["example_variant"][start:stop].tolist()
        return [f"{ids[u]}#{v}" for u, v in zip(utt, variant, strict=True)]

    def rir_ids(self) -> list[str]:
        """Every RIR id of the plan, in the order the examples first use them."""
        return self.rirs.keys_list()  # type: ignore[attr-defined]

    @cached_property
    def _rir_rooms(self) -> dict[str, list[str]]:
        ids = self.rir_ids()
        rooms: dict[str, list[str]] = {}
        base_room = [spec.room.room_id for spec in self.base_rirs]
        base = self.columns["rir_base"].tolist()
        for row in sorted(range(len(ids)), key=ids.__getitem__):
            rooms.setdefault(base_room[base[row]], []).append(ids[row])
        return dict(sorted(rooms.items()))

    def rir_ids_by_room(self) -> dict[str, list[str]]:
        """The RIR ids of each room in use (rooms and ids sorted)."""
        return self._rir_rooms

    def example_rir_ids(self, rows: range) -> list[str]:
        ids = self.rir_ids()
        return [ids[r] for r in self.columns["example_rir"][rows.start : rows.stop].tolist()]

    def examples_between(self, start: int, stop: int) -> list[Example]:
        """The examples of rows ``start:stop`` (only those are built)."""
        c = self.columns
        table = self.utterance_table
        ids, speakers = table["utterance_id"], table["speaker"]
        rir_ids = self.rir_ids()
        rms = c["example_rms_dbfs"][start:stop]
        rms_values = [None if v != v else v for v in rms.tolist()]
        noise = self._noise(start, stop)
        fields = zip(
            c["example_utterance"][start:stop].tolist(),
            c["example_variant"][start:stop].tolist(),
            c["example_split"][start:stop].tolist(),
            c["example_room"][start:stop].tolist(),
            c["example_rir"][start:stop].tolist(),
            rms_values,
            c["example_num_samples"][start:stop].tolist(),
            c["example_frame_count"][start:stop].tolist(),
            c["example_shard"][start:stop].tolist(),
            c["example_frame_offset"][start:stop].tolist(),
            c["example_fingerprint"][start:stop].astype("U").tolist(),
            noise,
            strict=True,
        )
        return [
            Example(
                f"{ids[u]}#{v}",
                SPLIT_NAMES[s],
                ids[u],
                speakers[u],
                v,
                self.room_ids[room],
                rir_ids[rir],
                level,
                n,
                frames,
                shard,
                offset,
                fingerprint,
                draw,
            )
            for u, v, s, room, rir, level, n, frames, shard, offset, fingerprint, draw in fields
        ]

    def _noise(self, start: int, stop: int) -> list[NoiseDraw | None]:
        c = self.columns
        if "example_noise_source" not in c:
            return [None] * (stop - start)
        sources = _noise_sources(self.manifest, self.noise_files)
        draws: list[NoiseDraw | None] = []
        for source, snr, seed, offset in zip(
            c["example_noise_source"][start:stop].tolist(),
            c["example_noise_snr_db"][start:stop].tolist(),
            c["example_noise_seed"][start:stop].tolist(),
            c["example_noise_offset"][start:stop].tolist(),
            strict=True,
        ):
            draws.append(None if source < 0 else _noise_draw(sources[source], snr, seed, offset))
        return draws

    # -- what the build's scheduling reads, vectorised ---------------------------------------
    def shard_samples(self) -> np.ndarray:
        """Each shard's audio, in samples (int64)."""
        c = self.columns
        return np.bincount(
            c["example_shard"], weights=c["example_num_samples"], minlength=self.n_shards
        ).astype(np.int64)

    def shard_room_ids(self) -> list[list[str]]:
        """The rooms whose RIRs each shard's examples use, sorted."""
        c = self.columns
        pairs = np.unique(np.stack([c["example_shard"], c["example_room"]]), axis=1)
        rooms: list[list[str]] = [[] for _ in range(self.n_shards)]
        for shard, room in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
            rooms[shard].append(self.room_ids[room])
        return [sorted(r) for r in rooms]

    def augmented_rows(self) -> np.ndarray:
        """Per example: its RIR is augmented (bool)."""
        return self.columns["rir_augmented"][self.columns["example_rir"]]

    # -- storing -------------------------------------------------------------------------------
    def _stored_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        table = self.utterance_table
        meta = {
            "manifest": self.manifest.model_dump(mode="json"),
            "quarantined": [asdict(q) for q in self.quarantined],
            "rooms": [room.to_dict() for room in self.rooms.values()],
            "speaker_splits": self.speaker_splits,
            "measured": [m.to_dict() for m in self.measured],
            "measured_room_splits": self.measured_room_splits,
            "noise_files": [f.to_dict() for f in self.noise_files],
            "utterances": {
                k: table[k] for k in ("utterance_id", "speaker", "source", "content_hash")
            },
            "utterance_flags": {str(i): list(f) for i, f in enumerate(table["flags"]) if f},
            "room_ids": self.room_ids,
            "base_rirs": [_spec_to_json(spec) for spec in self.base_rirs],
        }
        arrays = dict(self.columns)
        for k in ("num_samples", "source_rate", "channels"):
            arrays[f"utterance_{k}"] = table[k]
        return meta, arrays

    def to_stored(self) -> bytes:
        """The plan as the store keeps it (:data:`dereverb_data.store_format.PLAN_FILE`)."""
        from .store_format import write_plan_file

        meta, arrays = self._stored_parts()
        return write_plan_file(meta, arrays)

    @classmethod
    def from_stored(cls, data: bytes, where: str = "plan") -> Plan:
        """The plan :meth:`to_stored` wrote; a damaged or foreign file raises
        :class:`~dereverb_data.store_format.StoreReadError` in one line."""
        from .store_format import read_plan_file

        meta, arrays = read_plan_file(data, where)
        manifest = Manifest.model_validate(meta["manifest"])
        rooms = [_room_from_json(r) for r in meta["rooms"]]
        table: dict[str, Any] = dict(meta["utterances"])
        for k in ("num_samples", "source_rate", "channels"):
            table[k] = arrays.pop(f"utterance_{k}")
        flags: list[tuple[str, ...]] = [()] * len(table["utterance_id"])
        for i, f in meta["utterance_flags"].items():
            flags[int(i)] = tuple(f)
        table["flags"] = flags
        rooms_by_id = {r.room_id: r for r in rooms}
        return cls(
            manifest,
            [Quarantined(**q) for q in meta["quarantined"]],
            rooms_by_id,
            meta["speaker_splits"],
            [MeasuredRir(**m) for m in meta["measured"]],
            meta["measured_room_splits"],
            [NoiseFile(**f) for f in meta["noise_files"]],
            table,
            meta["room_ids"],
            [_spec_from_json(s, manifest, rooms_by_id) for s in meta["base_rirs"]],
            arrays,
        )

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
        """Plan again from what :meth:`to_json` wrote (the inputs, not the plan)."""
        data = json.loads(text)
        manifest = Manifest.model_validate(data["manifest"])
        utterances = [Utterance(**{**u, "flags": tuple(u["flags"])}) for u in data["utterances"]]
        quarantined = [Quarantined(**q) for q in data["quarantined"]]
        measured = [MeasuredRir(**m) for m in data.get("measured", [])]
        noise_files = [NoiseFile(**f) for f in data.get("noise_files", [])]
        return make_plan(manifest, utterances, quarantined, measured, noise_files)

    def summary(self) -> dict:
        c = self.columns
        counts = np.bincount(c["example_split"], minlength=len(SPLIT_NAMES))
        per_split = {SPLIT_NAMES[i]: int(n) for i, n in enumerate(counts) if n}
        seconds = int(c["example_num_samples"].sum()) / self.manifest.sample_rate
        extra = {}
        if self.manifest.rooms.measured is not None:  # absent otherwise: reports as before
            is_measured = np.array([r.startswith(ROOM_PREFIX) for r in self.room_ids], bool)
            rows = is_measured[c["example_room"]] if len(self.room_ids) else np.zeros(0, bool)
            measured = np.bincount(c["example_split"][rows], minlength=len(SPLIT_NAMES))
            extra = {
                "measured_rooms_per_split": dict(
                    sorted(Counter(self.measured_room_splits.values()).items())
                ),
                "measured_examples_per_split": dict(
                    sorted((SPLIT_NAMES[i], int(n)) for i, n in enumerate(measured) if n)
                ),
            }
        if self.manifest.augmentation is not None:  # absent otherwise: reports as before
            extra["augmented_examples"] = int(self.augmented_rows().sum())
        if self.manifest.noise is not None:
            extra["noisy_examples"] = int((c["example_noise_source"] >= 0).sum())
        return {
            "examples": self.n_examples,
            "examples_per_split": dict(sorted(per_split.items())),
            "utterances": len(self.utterance_table["utterance_id"]),
            "speakers_per_split": dict(sorted(Counter(self.speaker_splits.values()).items())),
            "rooms": len(self.rooms),
            "unique_rirs": len(self.columns["rir_id"]),
            "hours": round(seconds / 3600, 4),
            "shards": self.n_shards,
            "frames": self.n_frames,
            "quarantined": len(self.quarantined),
            **extra,
        }


class _Utterances(Mapping):
    """The plan's utterances by id, each record built when first asked for."""

    def __init__(self, table: dict[str, Any]) -> None:
        self._table = table
        self._rows: dict[str, int] | None = None
        self._made: dict[int, Utterance] = {}

    def _row(self, utterance_id: str) -> int:
        if self._rows is None:
            self._rows = {u: i for i, u in enumerate(self._table["utterance_id"])}
        return self._rows[utterance_id]

    def __getitem__(self, utterance_id: str) -> Utterance:
        row = self._row(utterance_id)
        if row not in self._made:
            t = self._table
            self._made[row] = Utterance(
                t["utterance_id"][row],
                t["speaker"][row],
                t["source"][row],
                t["content_hash"][row],
                int(t["num_samples"][row]),
                int(t["source_rate"][row]),
                int(t["channels"][row]),
                t["flags"][row],
            )
        return self._made[row]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table["utterance_id"])

    def __len__(self) -> int:
        return len(self._table["utterance_id"])


class _Rirs(Mapping):
    """The plan's RIR specs by id (augmented ones built when first asked for)."""

    def __init__(self, plan: Plan) -> None:
        c = plan.columns
        self._ids = c["rir_id"].astype("U").tolist()
        self._rows = {r: i for i, r in enumerate(self._ids)}
        self._base = plan.base_rirs
        self._base_of = c["rir_base"]
        self._augmented = c["rir_augmented"]
        self._drr = c["rir_drr_change_db"]
        self._rt60 = c["rir_rt60_factor"]
        self._bands = c["rir_bands"]
        self._made: dict[int, AnyRirSpec] = {}

    def keys_list(self) -> list[str]:
        return self._ids

    def __getitem__(self, rir_id: str) -> AnyRirSpec:
        row = self._rows[rir_id]
        if row not in self._made:
            base = self._base[int(self._base_of[row])]
            spec: AnyRirSpec = base
            if self._augmented[row]:
                spec = AugmentedRirSpec(
                    base, float(self._drr[row]), float(self._rt60[row]), bool(self._bands[row])
                )
                spec.__dict__["rir_id"] = rir_id  # as planned (the file is checksummed)
            self._made[row] = spec
        return self._made[row]

    def __contains__(self, rir_id: object) -> bool:
        return rir_id in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def _spec_to_json(spec: RirSpec | MeasuredRirSpec) -> dict:
    if isinstance(spec, MeasuredRirSpec):
        return {
            "kind": "measured",
            "rir_id": spec.rir_id,
            "room_id": spec.room.room_id,
            "split": spec.room.split,
            "rir": spec.rir.to_dict(),
            "pre_direct_ms": spec.pre_direct_ms,
        }
    return {
        "kind": "simulated",
        "rir_id": spec.rir_id,
        "room_id": spec.room.room_id,
        "placement": asdict(spec.placement),
    }


def _spec_from_json(
    data: dict, manifest: Manifest, rooms: dict[str, RoomSpec]
) -> RirSpec | MeasuredRirSpec:
    spec: RirSpec | MeasuredRirSpec
    if data["kind"] == "measured":
        spec = MeasuredRirSpec(
            MeasuredRoom(data["room_id"], data["split"]),
            MeasuredRir(**data["rir"]),
            manifest.sample_rate,
            data["pre_direct_ms"],
        )
    else:
        placement = Placement(tuple(data["placement"]["source"]), tuple(data["placement"]["mic"]))
        spec = RirSpec(rooms[data["room_id"]], placement, manifest.sample_rate, manifest.simulation)
    spec.__dict__["rir_id"] = data["rir_id"]  # as planned (the file is checksummed)
    return spec


def _room_from_json(data: dict) -> RoomSpec:
    return RoomSpec(
        data["room_id"],
        data["split"],
        tuple(data["dims"]),
        tuple(tuple(band) for band in data["absorption"]),
        data["target_rt60"],
        None if data["rt60_range"] is None else tuple(data["rt60_range"]),
    )


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

    Built straight into columns: no record per example (at a million examples those cost
    more than the draws), and each RIR spec is made and hashed once, not once per example.
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
    render_json = _json(_render_config(manifest))
    split_rank = {name: i for i, name in enumerate(SPLIT_NAMES)}
    split_rooms = {
        split: [r for r in rooms.values() if r.split == split]
        for split in set(speaker_splits.values())
    }
    seed = manifest.seed
    rms_low = rms_span = None
    if manifest.level.mode == "rms":
        # Generator.uniform(low, high) is low + (high - low) * random(), without its checks
        # (a third of the per-example cost); tests/test_plan_store.py pins the equality.
        rms_low = float(manifest.level.rms_dbfs[0])
        rms_span = float(manifest.level.rms_dbfs[1]) - rms_low
    positions = rooms_cfg.positions_per_room

    # Each distinct spec once: simulated (room, placement) and measured specs are shared by
    # many examples, so their ids are hashed once.
    simulated: dict[tuple[str, int], RirSpec] = {}
    base_rows: dict[str, int] = {}  # base spec id -> row of base_rirs
    base_rirs: list[RirSpec | MeasuredRirSpec] = []
    rir_rows: dict[str, int] = {}  # rir id -> row of the RIR table, in order of first use
    rir_table: list[tuple[str, int, AugmentedRirSpec | None]] = []
    room_codes: dict[str, int] = {}
    room_ids: list[str] = []

    ex_utt: list[int] = []
    ex_variant: list[int] = []
    ex_split: list[int] = []
    ex_room: list[int] = []
    ex_rir: list[int] = []
    ex_rms: list[float] = []
    ex_samples: list[int] = []
    ex_fingerprint: list[str] = []
    noise_cols: tuple[list, list, list, list] = ([], [], [], [])

    order = sorted(
        range(len(usable)),
        key=lambda i: (split_rank[speaker_splits[usable[i].speaker]], usable[i].utterance_id),
    )
    for row in order:
        utt = usable[row]
        split = speaker_splits[utt.speaker]
        code = split_rank[split]
        candidates = split_rooms[split]
        pool = pools.get(split)
        num_samples = utt.num_samples + tail
        # derive_seed's and stable_hash's JSON, written once per utterance (same bytes).
        seed_prefix = json.dumps([seed, "example", split, utt.utterance_id], default=str)[:-1]
        hash_prefix = (
            f"[{json.dumps(utt.content_hash, default=str)},"
            f"{json.dumps(utt.num_samples, default=str)},"
        )
        for variant in range(manifest.variants_per_utterance):
            rng = np.random.default_rng(_seed_of(f"{seed_prefix}, {variant}]"))
            room = candidates[int(rng.integers(len(candidates)))]
            j = int(rng.integers(positions))
            rms = None
            if rms_span is not None:
                rms = round(rms_low + rms_span * rng.random(), 3)
            spec: AnyRirSpec | None = simulated.get((room.room_id, j))
            if spec is None:
                spec = RirSpec(
                    room, placements[room.room_id][j], manifest.sample_rate, manifest.simulation
                )
                simulated[(room.room_id, j)] = spec
            if pool:
                # Its own generator, so the draws above (and every plan without measured
                # RIRs) are exactly as before; a pure function of the example, like them.
                pick = rng_for(seed, "measured", split, utt.utterance_id, variant)
                if pick.random() < manifest.rooms.measured.share.get(split, 0.0):  # type: ignore[union-attr]
                    spec = pool[int(pick.integers(len(pool)))]
            # Augmentation and noise draw from streams of their own too, so no draw above
            # moves; an augmented RIR's id hashes its base and the draw, so the fingerprint
            # (which hashes the RIR id) changes with either.
            spec = _draw_augmentation(manifest, spec, split, utt.utterance_id, variant)
            rir_id = spec.rir_id
            rir_row = rir_rows.get(rir_id)
            if rir_row is None:
                base = base_spec(spec)
                base_row = base_rows.get(base.rir_id)
                if base_row is None:
                    base_row = base_rows[base.rir_id] = len(base_rirs)
                    base_rirs.append(base)
                augmented = spec if isinstance(spec, AugmentedRirSpec) else None
                rir_row = rir_rows[rir_id] = len(rir_table)
                rir_table.append((rir_id, base_row, augmented))
            room_id = spec.room.room_id
            room_code = room_codes.get(room_id)
            if room_code is None:
                room_code = room_codes[room_id] = len(room_ids)
                room_ids.append(room_id)
            noise = None
            if noise_sources:
                drawn = _draw_noise(manifest, noise_sources, split, utt.utterance_id, variant)
                noise = None if drawn is None else drawn[0]
                for column, value in zip(
                    noise_cols,
                    (-1, np.nan, 0, 0)
                    if drawn is None
                    else (drawn[1], noise.snr_db, noise.seed, noise.offset),  # type: ignore[union-attr]
                    strict=True,
                ):
                    column.append(value)
            if noise is None:  # noise-free examples keep their fingerprints
                # RIR ids are hex digits; a float's JSON is its repr
                level = "null" if rms is None else repr(rms)
                text = f'{hash_prefix}"{rir_id}",{level},{render_json}]'
                fingerprint = hashlib.sha256(text.encode()).hexdigest()[:24]
            else:
                parts = [utt.content_hash, utt.num_samples, rir_id, rms, _render_config(manifest)]
                fingerprint = stable_hash([*parts, noise.fingerprint()], 24)
            ex_utt.append(row)
            ex_variant.append(variant)
            ex_split.append(code)
            ex_room.append(room_code)
            ex_rir.append(rir_row)
            ex_rms.append(np.nan if rms is None else rms)
            ex_samples.append(num_samples)
            ex_fingerprint.append(fingerprint)

    # Shards hold one room's examples side by side (split, room, utterance order): editing some
    # rooms then touches only their shards, not a scattering of examples across every shard.
    room_rank = np.empty(len(room_ids), np.int64)
    room_rank[np.argsort(np.array(room_ids, dtype=object), kind="stable")] = np.arange(
        len(room_ids)
    )
    utt_col = np.array(ex_utt, np.int32)
    variant_col = np.array(ex_variant, np.int32)
    split_col = np.array(ex_split, np.int8)
    room_col = np.array(ex_room, np.int32)
    keys = (variant_col, utt_col, room_rank[room_col] if len(room_ids) else room_col, split_col)
    order_rows = np.lexsort(keys) if len(ex_utt) else np.zeros(0, np.int64)
    columns: dict[str, np.ndarray] = {
        "example_utterance": utt_col[order_rows],
        "example_variant": variant_col[order_rows],
        "example_split": split_col[order_rows],
        "example_room": room_col[order_rows],
        "example_rir": np.array(ex_rir, np.int32)[order_rows],
        "example_rms_dbfs": np.array(ex_rms, np.float64)[order_rows],
        "example_num_samples": np.array(ex_samples, np.int64)[order_rows],
        "example_fingerprint": np.array(ex_fingerprint, "S24")[order_rows],
    }
    if noise_sources:
        for name, values, dtype in zip(
            ("source", "snr_db", "seed", "offset"),
            noise_cols,
            (np.int32, np.float64, np.int64, np.int64),
            strict=True,
        ):
            columns[f"example_noise_{name}"] = np.array(values, dtype)[order_rows]
    columns.update(_pack(columns, stft, shard_frames))
    columns.update(_rir_columns(rir_table))
    return Plan(
        manifest,
        quarantined,
        rooms,
        speaker_splits,
        measured,
        measured_splits,
        noise_files,
        _utterance_table(usable),
        room_ids,
        base_rirs,
        columns,
    )


def _json(obj: Any) -> str:
    """stable_hash's JSON of ``obj``."""
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def _seed_of(payload: str) -> int:
    """derive_seed of the parts whose JSON ``payload`` is."""
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "little")


def _utterance_table(usable: list[Utterance]) -> dict[str, Any]:
    return {
        "utterance_id": [u.utterance_id for u in usable],
        "speaker": [u.speaker for u in usable],
        "source": [u.source for u in usable],
        "content_hash": [u.content_hash for u in usable],
        "num_samples": np.array([u.num_samples for u in usable], np.int64),
        "source_rate": np.array([u.source_rate for u in usable], np.int64),
        "channels": np.array([u.channels for u in usable], np.int64),
        "flags": [tuple(u.flags) for u in usable],
    }


def _rir_columns(table: list[tuple[str, int, AugmentedRirSpec | None]]) -> dict[str, np.ndarray]:
    augmented = [a for _, _, a in table]
    return {
        "rir_id": np.array([r for r, _, _ in table], "S20"),
        "rir_base": np.array([b for _, b, _ in table], np.int32),
        "rir_augmented": np.array([a is not None for a in augmented], bool),
        "rir_drr_change_db": np.array(
            [np.nan if a is None else a.drr_change_db for a in augmented]
        ),
        "rir_rt60_factor": np.array([np.nan if a is None else a.rt60_factor for a in augmented]),
        "rir_bands": np.array([a is not None and a.bands for a in augmented], bool),
    }


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
) -> tuple[NoiseDraw, int] | None:
    """The example's noise and which of ``sources`` it is, or None."""
    config = manifest.noise
    if config is None or config.probability <= 0:
        return None
    rng = rng_for(manifest.seed, "noise", split, utterance_id, variant)
    if rng.random() >= config.probability:
        return None
    snr = round(float(rng.uniform(*config.snr_db)), 3)
    index = int(rng.integers(len(sources)))
    kind, source = sources[index]
    seed = int(rng.integers(2**63))
    # Where in a file the example's noise starts (looped past its end).
    offset = 0 if kind == "colour" else int(rng.integers(source.num_samples))
    return _noise_draw(sources[index], snr, seed, offset), index


def _noise_draw(source: tuple, snr: float, seed: int, offset: int) -> NoiseDraw:
    kind, what = source
    if kind == "colour":
        return NoiseDraw(snr, "colour", colour=what, seed=seed)
    return NoiseDraw(snr, "file", source=what.source, content_hash=what.content_hash, offset=offset)


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


def _pack(columns: dict[str, np.ndarray], stft: StftConfig, shard_frames: int) -> dict:
    """Fill shards in row order with whole examples; the rest of a shard is zero padding.

    Neither lengths nor the room an example draws depend on the rooms' parameters, so editing
    rooms never moves an example: an incremental rebuild rewrites only the shards whose examples
    changed.
    """
    frame_count = 1 + columns["example_num_samples"] // stft.hop
    shard_of: list[int] = []
    offsets: list[int] = []
    starts: list[int] = []
    shard = -1
    used = shard_frames + 1
    for row, frames in enumerate(frame_count.tolist()):
        if used + frames > shard_frames:
            shard += 1
            used = 0
            starts.append(row)
        shard_of.append(shard)
        offsets.append(shard * shard_frames + used)
        used += frames
    fingerprints = columns["example_fingerprint"].astype("U").tolist()
    bounds = [*starts, len(offsets)]
    shard_fingerprints = [
        stable_hash(list(zip(fingerprints[a:b], offsets[a:b], strict=True)), 24)
        for a, b in itertools.pairwise(bounds)
    ]
    return {
        "example_frame_count": frame_count.astype(np.int64),
        "example_shard": np.array(shard_of, np.int64),
        "example_frame_offset": np.array(offsets, np.int64),
        "shard_start": np.array(starts, np.int64),
        "shard_fingerprint": np.array(shard_fingerprints, "S24"),
    }
