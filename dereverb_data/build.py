"""The build's steps as plain functions of small references (store URL, ids).

The Prefect flow maps these over rooms, RIRs and shards; a plain loop (:func:`build_serial`)
calls the same functions, which is how the library is tested without an orchestrator and how
the orchestration overhead is measured. Each step is idempotent: running it again after a crash
redoes only what is not recorded as done.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .corpus import AudioError, load_utterance, scan_corpus
from .inspect import distribution
from .lock import build_lock
from .manifest import Manifest
from .measured_rirs import ROOM_PREFIX, scan_measured
from .noise import noise_signal, scan_noise_files
from .plan import Plan, make_plan
from .preflight import check_same_dataset
from .render import render_pair
from .rir_bank import BankedRir, RirBank, get_or_simulate
from .stft import stft
from .store import DatasetStore, package_versions
from .store_format import (
    BUILD_DIR,
    LEGACY_PLAN_INPUTS,
    PLAN_FILE,
    PLAN_FORMAT_VERSION,
    PLANNED_FROM_EXAMPLE,
    SUMMARY_LABELS,
    ExampleLabels,
    StoreReadError,
    decode,
    encode,
    index_columns,
    shard_checksum,
)

THREAD_VARIABLES = ("PRA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def limit_threads() -> None:
    """One thread per worker: pyroomacoustics and BLAS otherwise start one per core each,
    and oversubscription made STFTs 10-70x slower on these machines."""
    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
    _tune_malloc()
    torch = sys.modules.get("torch")  # never imported for it: torch's import alone takes ~2 s
    if torch is not None:
        torch.set_num_threads(1)


def _tune_malloc() -> None:
    """Undo the malloc settings Dask's nanny gives its workers.

    The nanny sets ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's mmap threshold:
    every array over 128 KiB is then mapped and unmapped on each allocation, and STFTs and
    convolutions took 2-3x the CPU in a worker than in-process (measured here).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum)
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


def default_rir_cache(store_url: str) -> str:
    return f"{store_url.rstrip('/')}/{BUILD_DIR}/rir_bank"


def plan_inputs(manifest: Manifest, cache: dict[str, dict] | None = None) -> Plan:
    """Scan everything the manifest reads (corpus, measured RIRs, noise files) and plan it.

    ``cache`` is the store's corpus scan cache (updated in place). Bad RIR and noise files join
    the corpus's quarantine list; the plan goes on without them.
    """
    utterances, quarantined = scan_corpus(manifest.corpus, manifest.sample_rate, cache)
    measured = None
    if manifest.rooms.measured is not None:
        measured, bad_rirs = scan_measured(manifest.rooms.measured, manifest.sample_rate)
        quarantined = [*quarantined, *bad_rirs]
    noise_files = None
    if manifest.noise is not None and manifest.noise.files is not None:
        noise_files, bad_noise = scan_noise_files(
            manifest.noise.files, manifest.noise.pattern, manifest.sample_rate
        )
        quarantined = [*quarantined, *bad_noise]
    return make_plan(manifest, utterances, quarantined, measured, noise_files)


def prepare_build(manifest: Manifest, store_url: str, replace: bool = False) -> Plan:
    """Scan the corpus, plan every example, and create (or check) the store for the plan.

    The store keeps the corpus scan, so planning again (a resume, an edit of the rooms) reads
    only files that are new or changed. A store that holds another dataset (name, seed or
    corpus) is refused unless ``replace``.
    """
    check_same_dataset(store_url, manifest, replace)
    store = DatasetStore(store_url)
    cache = _read_scan_cache(store)
    plan = plan_inputs(manifest, cache)
    if not plan.n_examples:
        raise AudioError(
            f"no usable utterances: {len(plan.quarantined)} file(s) quarantined, e.g. "
            + "; ".join(q.reason for q in plan.quarantined[:3])
        )
    store.prepare(plan)
    store._write_text(SCAN_CACHE, json.dumps(cache))
    return plan


SCAN_CACHE = f"{BUILD_DIR}/corpus_scan.json"


def _read_scan_cache(store: DatasetStore) -> dict[str, dict]:
    """The store's corpus scan cache; empty when there is none or it cannot be read."""
    try:
        cache = json.loads(store.read_text(SCAN_CACHE))
    except (FileNotFoundError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


_LOADED: dict[str, tuple[object, Plan]] = {}  # store URL -> (what identifies the file, plan)


def load_plan(store_url: str, plan_id: str | None = None) -> Plan:
    """The plan the build stored in the store, read once per process and never planned again.

    ``plan_id``, when given, is the plan the caller expects (the flow passes the one it made):
    a plan cached under that id is returned without touching the store, and a stored plan of
    another id is an error. Otherwise the file's size and time decide whether the cached one
    is still the stored one. A store built before plans were stored, and a damaged plan, are
    refused in one line.
    """
    store = DatasetStore(store_url)
    cached = _LOADED.get(store.url)
    if cached is not None and plan_id is not None and cached[1].plan_id == plan_id:
        return cached[1]
    path = f"{store.root}/{PLAN_FILE}"
    try:
        info = store.fs.info(path)
    except FileNotFoundError:
        if store.fs.exists(f"{store.root}/{LEGACY_PLAN_INPUTS}"):
            raise StoreReadError(
                f"{store_url}: built before plans were stored (it has {LEGACY_PLAN_INPUTS}, no "
                f"{PLAN_FILE} of plan format {PLAN_FORMAT_VERSION}); run the build again, which "
                "stores its plan and keeps every shard already done"
            ) from None
        raise StoreReadError(f"{store_url}: no stored plan ({PLAN_FILE}); build it first") from None
    stamp = tuple(sorted((k, str(v)) for k, v in info.items()))
    if cached is not None and cached[0] == stamp and plan_id in (None, cached[1].plan_id):
        return cached[1]
    plan = Plan.from_stored(store.read_bytes(PLAN_FILE), f"{store_url}/{PLAN_FILE}")
    if plan_id is not None and plan.plan_id != plan_id:
        raise StoreReadError(
            f"{store_url}: the stored plan is {plan.plan_id!r}, not {plan_id!r} that this build "
            "made: another build planned this store since; run the build again"
        )
    _LOADED[store.url] = (stamp, plan)
    return plan


def rirs_by_room(plan: Plan) -> dict[str, list[str]]:
    """The RIR ids of each room in use, in a stable order."""
    return plan.rir_ids_by_room()


def shards_ready(
    store_url: str, shard_ids: Sequence[int], rir_cache: str, plan_id: str | None = None
) -> list[int]:
    """The shards of ``shard_ids`` whose RIRs are all in the bank, in order."""
    plan = load_plan(store_url, plan_id)
    bank = RirBank(rir_cache)
    banked: dict[str, bool] = {}
    ready = []
    for shard_id in shard_ids:
        rir_ids = set(plan.example_rir_ids(plan.shard_rows(shard_id)))
        for rir_id in rir_ids - banked.keys():
            banked[rir_id] = bank.has_rir(rir_id)
        if all(banked[rir_id] for rir_id in rir_ids):
            ready.append(shard_id)
    return ready


def simulate_room_step(
    store_url: str, room_id: str, rir_cache: str, plan_id: str | None = None
) -> tuple[int, int]:
    """Calibrate a room (once) and simulate its missing RIRs: (simulated, reused).

    One task per room rather than per RIR: a room's placements share its calibration, and
    fewer, larger tasks keep the orchestration overhead small.
    """
    plan = load_plan(store_url, plan_id)
    bank = RirBank(rir_cache)
    simulated = 0
    rir_ids = rirs_by_room(plan)[room_id]
    for rir_id in rir_ids:
        simulated += get_or_simulate(bank, plan.rirs[rir_id])[2]
    return simulated, len(rir_ids) - simulated


@dataclass
class ShardResult:
    shard_id: int
    rendered: bool  # the shard was (re)written
    examples: int
    examples_rendered: int = 0
    examples_reused: int = 0  # copied from the previous version of the shard, unchanged
    seconds: dict[str, float] = field(default_factory=dict)


def _reusable_frames(
    store: DatasetStore, plan: Plan, shard_id: int
) -> dict[str, tuple[np.ndarray, np.ndarray, ExampleLabels]]:
    """Examples of the shard's previous version that the new plan keeps unchanged.

    Reused only when the old shard still matches its recorded checksum, so a repair never
    copies damaged data, and only when an example's fingerprint and position are unchanged.
    """
    marker = store.marker(shard_id)
    if marker is None:
        return {}
    try:
        old_rows = {row.example_id: row for row in store.read_labels(shard_id)}
        frames = plan.manifest.storage.frames_per_shard
        rev, clean = store.read_shard(shard_id * frames, frames)
    except (FileNotFoundError, KeyError, TypeError, ValueError, RuntimeError):
        return {}  # damaged (zarr raises ValueError or RuntimeError): rendered afresh
    if shard_checksum(rev, clean) != marker.checksum:
        return {}
    reusable = {}
    for example in plan.shard_examples(shard_id):
        example_id, row = example.example_id, old_rows.get(example.example_id)
        if (
            row is not None
            and row.fingerprint == example.fingerprint
            and row.frame_offset == example.frame_offset
        ):
            start = example.frame_offset - shard_id * frames
            stop = start + example.frame_count
            reusable[example_id] = (decode(rev[start:stop]), decode(clean[start:stop]), row)
    return reusable


_EXAMPLE_LABELS = frozenset(f.name for f in dataclasses.fields(ExampleLabels))


def rir_labels(banked: BankedRir) -> dict[str, Any]:
    """An example's labels from its RIR: every acoustic label (``RirLabels``) that
    ``ExampleLabels`` also has, by name, so a new acoustic label needs no line here; and the
    RIR's distance and how it was made."""
    acoustic = banked.acoustics.to_dict()
    return {
        **{name: value for name, value in acoustic.items() if name in _EXAMPLE_LABELS},
        "distance_m": banked.distance_m,
        "simulation": banked.simulation,
    }


def render_shard_step(
    store_url: str, shard_id: int, rir_cache: str, plan_id: str | None = None
) -> ShardResult:
    """Render every example of a shard, write the shard whole, then mark it done."""
    plan = load_plan(store_url, plan_id)
    shard = plan.shard(shard_id)
    store = DatasetStore(store_url)
    n = len(shard.example_ids)
    if store.shard_is_done(shard_id, shard.fingerprint):
        return ShardResult(shard_id, False, n, examples_reused=n)
    reusable = _reusable_frames(store, plan, shard_id)
    manifest = plan.manifest
    bank = RirBank(rir_cache)
    frames = manifest.storage.frames_per_shard
    n_freq = plan.stft.n_freq
    blocks = {name: np.zeros((frames, n_freq), np.complex64) for name in ("rev", "clean")}
    timing: Counter[str] = Counter()
    rows: list[ExampleLabels] = []
    noise_cache: dict[str, np.ndarray] = {}  # a shard's examples share a few noise files
    for example in plan.shard_examples(shard_id):
        example_id = example.example_id
        start = example.frame_offset - shard.frame_start
        stop = start + example.frame_count
        if example_id in reusable:
            blocks["rev"][start:stop], blocks["clean"][start:stop], row = reusable[example_id]
            rows.append(row)
            continue
        t0 = time.perf_counter()
        rir, banked, _ = get_or_simulate(bank, plan.rirs[example.rir_id])
        t1 = time.perf_counter()
        utterance = plan.utterances[example.utterance_id]
        downmix = getattr(manifest.corpus, "downmix", "mean")
        audio = load_utterance(utterance, manifest.sample_rate, downmix)
        noise = example.noise
        rendered = render_pair(
            audio,
            rir,
            manifest,
            example.num_samples,
            example.rms_dbfs,
            None
            if noise is None
            else noise_signal(noise, example.num_samples, manifest.sample_rate, noise_cache),
            None if noise is None else noise.snr_db,
            0 if noise is None else noise.offset,
        )
        t2 = time.perf_counter()
        blocks["rev"][start:stop] = stft(rendered.reverberant, plan.stft)
        blocks["clean"][start:stop] = stft(rendered.clean, plan.stft)
        t3 = time.perf_counter()
        timing.update({"rir": t1 - t0, "render": t2 - t1, "stft": t3 - t2})
        rows.append(
            ExampleLabels(
                # The render's direct index, where it aligned the target: the banked one's rule
                # on the same RIR, but a bank's labels may predate a change of rule.
                **{**rir_labels(banked), "direct_index": rendered.direct_index},
                example_id=example_id,
                fingerprint=example.fingerprint,
                frame_offset=example.frame_offset,
                gain=rendered.gain,
                clean_gain=rendered.clean_gain,
                gain_limited=rendered.gain_limited,
                snr_db=rendered.snr_db,
                # Only with augmentation or noise: other stores' labels stay as they were.
                augmented=None if manifest.augmentation is None else banked.augmented,
                noise=None
                if noise is None
                else (noise.colour if noise.kind == "colour" else noise.source),
                noise_gain=None if noise is None else rendered.noise_gain,
            )
        )
    t4 = time.perf_counter()
    dtype = manifest.storage.dtype
    store.write_shard(
        shard_id,
        shard.frame_start,
        encode(blocks["rev"], dtype),
        encode(blocks["clean"], dtype),
        shard.fingerprint,
        rows,
    )
    timing["write"] = time.perf_counter() - t4
    reused = len(reusable)
    return ShardResult(shard_id, True, n, n - reused, reused, dict(timing))


def finalize_step(store_url: str, plan_id: str | None = None) -> dict:
    """Write the index, the shard checksums and the build report; mark the store complete."""
    plan = load_plan(store_url, plan_id)
    store = DatasetStore(store_url)
    missing = [
        s.shard_id for s in plan.shards if not store.shard_is_done(s.shard_id, s.fingerprint)
    ]
    if missing:
        raise RuntimeError(f"{store_url}: shards {missing[:10]} are not done; run the build again")
    labels = {row.example_id: row for s in plan.shards for row in store.read_labels(s.shard_id)}
    arrays = index_columns(
        {
            **{name: getattr(example, name) for name in PLANNED_FROM_EXAMPLE},
            "target_rt60": plan.rirs[example.rir_id].room.target_rt60,
            **labels[example.example_id].index_values(),
        }
        for example in plan.examples
    )
    checksums = [store.marker(s.shard_id).checksum for s in plan.shards]  # type: ignore[union-attr]
    report = build_report(plan, arrays, store)
    attrs = {
        "manifest": plan.manifest.model_dump(mode="json"),
        "manifest_sha256": plan.manifest.digest(),
        "versions": package_versions(),
        "n_examples": plan.n_examples,
        "summary": report["summary"],
    }
    store.write_index(arrays, checksums, attrs)
    store._write_text(f"{BUILD_DIR}/report.json", json.dumps(report, indent=2, default=float))
    return report


def build_report(plan: Plan, index: dict[str, np.ndarray], store: DatasetStore) -> dict:
    manifest = plan.manifest
    rt60 = index["rt60_t30"]
    in_range = None
    # Measured rooms have the RT60 they have: only simulated examples are held to rt60_s.
    simulated = ~np.char.startswith(index["room_id"].astype(str), ROOM_PREFIX)
    # Augmented RIRs were moved off the requested RT60 on purpose.
    simulated &= ~plan.augmented_rows()
    if manifest.rooms.rt60_s is not None and simulated.any():
        low, high = manifest.rooms.rt60_s
        within = (rt60[simulated] >= low) & (rt60[simulated] <= high)
        in_range = round(float(np.mean(within)), 4)
    clipped = [
        source
        for source, flags in zip(
            plan.utterance_table["source"], plan.utterance_table["flags"], strict=True
        )
        if "clipped" in flags
    ]
    summary = {
        **plan.summary(),
        "rt60_t30_s": distribution(rt60),
        "rt60_in_requested_range": in_range,
        **{name: distribution(index[name]) for name in SUMMARY_LABELS},
        "gain_limited": int(index["gain_limited"].sum()),
        "clipped_sources": len(clipped),
        "size_on_disk_bytes": store.size_bytes(),
    }
    return {
        "summary": summary,
        "quarantined": [{"file": q.source, "reason": q.reason} for q in plan.quarantined],
        "clipped": clipped,
        "warnings": label_warnings(manifest, in_range),
    }


# Below this share of measured RT60 inside the requested range, a build warns: the labels are
# still true (they are measured), but the data no longer matches what the manifest asked for.
RT60_IN_RANGE_MIN = 0.95


def label_warnings(manifest: Manifest, rt60_in_range: float | None) -> list[str]:
    """Warnings about how far the built data is from what the manifest asked for."""
    if rt60_in_range is None or rt60_in_range >= RT60_IN_RANGE_MIN:
        return []
    low, high = manifest.rooms.rt60_s  # type: ignore[misc]
    return [
        f"rooms.rt60_s: only {rt60_in_range:.0%} of measured RT60 (T30) fall inside the "
        f"requested [{low}, {high}] s (rule: at least {RT60_IN_RANGE_MIN:.0%}); the labels "
        "record the measured values; widen rt60_s or change the room sizes and absorption"
    ]


def build_serial(
    manifest: Manifest, store_url: str, rir_cache: str | None = None, replace: bool = False
) -> dict:
    """The whole build in one process, in a plain loop: same steps as the flow, no Prefect."""
    rir_cache = rir_cache or default_rir_cache(store_url)
    with build_lock(store_url):
        plan = prepare_build(manifest, store_url, replace)
        plan_id = plan.plan_id
        rooms = [
            simulate_room_step(store_url, room, rir_cache, plan_id) for room in rirs_by_room(plan)
        ]
        shards = [
            render_shard_step(store_url, shard_id, rir_cache, plan_id)
            for shard_id in range(plan.n_shards)
        ]
        report = finalize_step(store_url, plan_id)
    report["counts"] = {
        "rirs_simulated": sum(new for new, _ in rooms),
        "rirs_reused": sum(old for _, old in rooms),
        "shards_rendered": sum(s.rendered for s in shards),
        "shards_kept": sum(not s.rendered for s in shards),
        "examples_rendered": sum(s.examples_rendered for s in shards),
        "examples_kept": sum(s.examples_reused for s in shards),
    }
    return report
