"""Prefect flow ``build-dataset``: plan, simulate RIRs per room, render shards, finalize.

A thin layer over :mod:`dereverb_data.build`: tasks pass the store URL, the plan id and ids,
never arrays (each task loads the stored plan). Idempotency lives in the library
(done-markers, the content-addressed RIR bank), so tasks are not cached by Prefect and can
simply be retried. How the work is cut into task runs and in what order they are submitted
is :mod:`flows.scheduling`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from dereverb_data import build as steps
from dereverb_data.lock import build_lock
from dereverb_data.manifest import load_manifest
from dereverb_data.rir_bank import RirBank
from dereverb_data.store import DatasetStore
from dereverb_data.store_format import SUMMARY_LABELS
from dereverb_data.verify import forget_damaged_shards

from . import scheduling
from .runners import task_runner


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(
    manifest_path: str,
    store_url: str,
    rir_cache: str,
    corpus_path: str | None = None,
    replace: bool = False,
) -> dict:
    """Plan, and list only the work not already done: every mapped task costs orchestration
    time, so rooms whose RIRs are all banked and shards already done are not mapped."""
    steps.limit_threads()
    plan = steps.prepare_build(load_manifest(manifest_path, corpus_path), store_url, replace)
    banked = RirBank(rir_cache).rir_ids()
    rooms = steps.rirs_by_room(plan)
    pending_rooms = [room for room, rirs in rooms.items() if not set(rirs) <= banked]
    store = DatasetStore(store_url)
    done, pending_shards = [], []
    for shard_id, fingerprint in enumerate(plan.columns["shard_fingerprint"].astype("U").tolist()):
        is_done = store.shard_is_done(shard_id, fingerprint)
        (done if is_done else pending_shards).append(shard_id)
    return {
        "plan_id": plan.plan_id,  # tasks load this plan from the store, and check it is this
        "summary": plan.summary(),
        "rooms": pending_rooms,
        "room_costs": [scheduling.room_cost(plan, room, rooms[room]) for room in pending_rooms],
        "rirs_already_banked": sum(len(rooms[r]) for r in rooms if r not in pending_rooms),
        "shards": pending_shards,
        "shard_costs": scheduling.shard_costs(plan, pending_shards),
        "shard_rooms": scheduling.shard_rooms(plan, pending_shards),
        "shards_done": len(done),
        "examples_done": sum(len(plan.shard_rows(s)) for s in done),
        "quarantined": [q.reason for q in plan.quarantined],
    }


@task(name="build-rooms", cache_policy=NO_CACHE, retries=2)
def build_rooms_task(
    store_url: str,
    room_ids: list[str],
    shard_ids: list[int],
    rir_cache: str,
    plan_id: str | None = None,
) -> dict:
    """Simulate the missing RIRs of a batch of rooms, then render those of ``shard_ids`` (the
    shards that need these rooms) whose RIRs are all banked: one task run instead of two (each
    costs orchestration time), and shards start as soon as their RIRs exist.

    A shard shared with a room of another batch is rendered by whichever batch finishes its
    rooms last, since that one finds every RIR banked (rarely both, which write the same
    bytes; the flow renders any shard that neither did)."""
    steps.limit_threads()
    counts = [steps.simulate_room_step(store_url, room, rir_cache, plan_id) for room in room_ids]
    ready = steps.shards_ready(store_url, shard_ids, rir_cache, plan_id)
    return {
        "simulated": sum(new for new, _ in counts),
        "reused": sum(old for _, old in counts),
        "shards": _render(store_url, ready, rir_cache, plan_id),
    }


@task(name="render-shards", cache_policy=NO_CACHE, retries=2)
def render_shards_task(
    store_url: str, shard_ids: list[int], rir_cache: str, plan_id: str | None = None
) -> list[dict]:
    """Render a batch of shards whose rooms are all simulated."""
    steps.limit_threads()
    return _render(store_url, shard_ids, rir_cache, plan_id)


def _render(
    store_url: str, shard_ids: list[int], rir_cache: str, plan_id: str | None
) -> list[dict]:
    """Each shard is written whole and marked done on its own, so a crash mid-batch keeps the
    shards already finished."""
    results = []
    for shard_id in shard_ids:
        result = steps.render_shard_step(store_url, shard_id, rir_cache, plan_id)
        results.append(
            {
                "shard_id": result.shard_id,
                "rendered": result.rendered,
                "examples_rendered": result.examples_rendered,
                "examples_reused": result.examples_reused,
            }
        )
    return results


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(store_url: str, plan_id: str | None = None) -> dict:
    return steps.finalize_step(store_url, plan_id)


@flow(name="build-dataset", log_prints=True)
def build_dataset(
    manifest_path: str,
    store_url: str,
    rir_cache: str | None = None,
    corpus_path: str | None = None,
    then_train: dict | None = None,
    break_lock: bool = False,
    repair: bool = False,
    replace: bool = False,
) -> dict:
    """Build (or resume, or incrementally update) the store described by a manifest.

    Holds the store's build lock for the whole build (one writer per store, whoever starts
    the flow: the CLI, a deployment or a schedule). ``repair`` first forgets the shards that
    fail verification; ``then_train`` (``{"config_path": ..., "out_dir": ...}``) kicks off the
    ``train-model`` flow on the finished store. A store that holds another dataset (name,
    seed or corpus) is refused unless ``replace``.
    """
    with build_lock(store_url, break_lock):
        repaired = []
        if repair and DatasetStore(store_url).exists():
            repaired = forget_damaged_shards(store_url)
        report = _build(manifest_path, store_url, rir_cache, corpus_path, replace)
    report["repaired_shards"] = repaired
    if then_train:
        from .train import train_model

        report["training"] = train_model(store_url, **then_train)
    return report


def _build(
    manifest_path: str,
    store_url: str,
    rir_cache: str | None,
    corpus_path: str | None,
    replace: bool = False,
) -> dict:
    """Plan, simulate and render in batches (:mod:`flows.scheduling` cuts and orders them),
    render what no batch did, finalize."""
    logger = get_run_logger()
    rir_cache = rir_cache or steps.default_rir_cache(store_url)
    planned = plan_task(manifest_path, store_url, rir_cache, corpus_path, replace)
    plan_id = planned["plan_id"]
    logger.info("plan: %s", planned["summary"])
    # INFO, not WARNING: the run's log keeps them, and the command lists them once at its end.
    for reason in planned["quarantined"]:
        logger.info("quarantined: %s", reason)

    runner = FlowRunContext.get().task_runner  # type: ignore[union-attr]
    # A rerun with nothing left to do (or a resume whose work is done) starts no cluster.
    has_work = bool(planned["rooms"] or planned["shards"])
    cluster_start = scheduling.start_cluster(runner) if has_work else None
    slots = scheduling.parallel_slots(runner)
    rooms = scheduling.room_units(planned)
    with contextlib.ExitStack() as stack:
        started: list[PrefectFuture] = []
        if cluster_start is not None:  # this process works while its cluster starts
            lane = stack.enter_context(ThreadPoolTaskRunner(max_workers=1))
            started = scheduling.work_while_cluster_starts(
                cluster_start,
                lambda room, shards: lane.submit(
                    build_rooms_task,
                    {
                        "store_url": store_url,
                        "room_ids": [room],
                        "shard_ids": shards,
                        "rir_cache": rir_cache,
                        "plan_id": plan_id,
                    },
                ),
                rooms.units,
            )
        batches = scheduling.schedule(planned, rooms, len(started), slots)
        built, render_futures = scheduling.rooms_then_shards(
            batches,
            slots,
            started,
            lambda room_batches: build_rooms_task.map(
                unmapped(store_url),
                [room_ids for room_ids, _ in room_batches],
                [shard_ids for _, shard_ids in room_batches],
                unmapped(rir_cache),
                unmapped(plan_id),
            ),
            lambda shard_ids: render_shards_task.submit(store_url, shard_ids, rir_cache, plan_id),
            logger.info,
        )
        rendered = [s for batch in _results(render_futures, "shard batches") for s in batch]
        rendered += [s for batch in built for s in batch["shards"]]
        reported = {s["shard_id"] for s in rendered}
        missed = [s for s in planned["shards"] if s not in reported]
        if missed:  # no task found every RIR of these banked (see build_rooms_task)
            logger.warning("rendering %d shards no room batch rendered", len(missed))
            rendered += render_shards_task(store_url, missed, rir_cache, plan_id)

    report = finalize_task(store_url, plan_id)
    shard_results = scheduling.merged(rendered)
    counts = {
        "rirs_simulated": sum(batch["simulated"] for batch in built),
        "rirs_reused": planned["rirs_already_banked"] + sum(batch["reused"] for batch in built),
        "shards_rendered": sum(s["rendered"] for s in shard_results),
        "shards_kept": planned["shards_done"] + sum(not s["rendered"] for s in shard_results),
        "examples_rendered": sum(s["examples_rendered"] for s in shard_results),
        "examples_kept": planned["examples_done"]
        + sum(s["examples_reused"] for s in shard_results),
    }
    report["counts"] = counts
    # How the work was split into task runs (it varies with the runner; the data does not).
    report["tasks"] = {
        "local_cluster_started": cluster_start is not None,
        "room_batches": len(batches.room_batches),
        "rooms_in_flow_process": len(started),
        "shards_with_their_rooms": len(planned["shards"]) - len(rooms.apart) - len(missed),
        "shard_batches": len(batches.shard_batches) + bool(missed),
    }
    logger.info("build counts: %s; task runs: %s", counts, report["tasks"])
    create_markdown_artifact(
        key="dataset-build",
        markdown=markdown_summary(manifest_path, store_url, report, counts),
        description=f"Build of {store_url}",
    )
    return report


def run_build(
    manifest_path: str,
    store_url: str,
    rir_cache: str | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
    corpus_path: str | None = None,
    break_lock: bool = False,
    repair: bool = False,
    then_train: dict | None = None,
    replace: bool = False,
) -> dict:
    """Run the flow with the task runner for ``workers`` / ``dask_address``."""
    # Dask's own INFO lines (workers starting and closing) drown the build's progress.
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    runner = task_runner(workers, dask_address)
    flow = build_dataset.with_options(task_runner=runner)
    return flow(
        manifest_path, store_url, rir_cache, corpus_path, then_train, break_lock, repair, replace
    )


# -- helpers ----------------------------------------------------------------------------------


def _results(futures: list[PrefectFuture], what: str) -> list:
    """Wait for mapped tasks, logging progress as they finish; a failed task raises here."""
    logger = get_run_logger()
    total = len(futures)
    every = max(1, total // 10)
    for finished, _ in enumerate(as_completed(futures), 1):
        if finished % every == 0 or finished == total:
            logger.info("%s: %d/%d done", what, finished, total)
    return [future.result() for future in futures]


def markdown_summary(manifest_path: str, store_url: str, report: dict, counts: dict) -> str:
    s = report["summary"]
    lines = [
        f"# Dataset build: {Path(manifest_path).name}",
        f"Store: `{store_url}`",
        "",
        "| examples | hours | shards | unique RIRs | quarantined | size on disk |",
        "|---|---|---|---|---|---|",
        f"| {s['examples']} | {s['hours']:.3f} | {s['shards']} | {s['unique_rirs']} | "
        f"{s['quarantined']} | {s['size_on_disk_bytes'] / 1e6:.1f} MB |",
        "",
        f"Examples per split: {s['examples_per_split']}; speakers per split: "
        f"{s['speakers_per_split']}.",
        f"RIRs simulated now: {counts['rirs_simulated']}, reused: {counts['rirs_reused']}; "
        f"shards rendered now: {counts['shards_rendered']}, kept: {counts['shards_kept']}; "
        f"examples rendered now: {counts['examples_rendered']}, kept: {counts['examples_kept']}.",
        "",
        "| label | min | p10 | median | p90 | max |",
        "|---|---|---|---|---|---|",
    ]
    for label in ("rt60_t30_s", *SUMMARY_LABELS):
        d = s[label]  # build_report gives every one of them
        lines.append(
            f"| {label} | {d.get('min')} | {d.get('p10')} | {d.get('median')} | {d.get('p90')} | "
            f"{d.get('max')} |"
        )
    if s.get("rt60_in_requested_range") is not None:
        lines.append(
            f"\nMeasured RT60 inside the requested range: {s['rt60_in_requested_range']:.0%}"
        )
    if report.get("warnings"):
        lines += ["", "## Warnings", ""]
        lines += [f"- {warning}" for warning in report["warnings"]]
    if report["quarantined"]:
        lines += ["", "## Quarantined files", ""]
        lines += [f"- `{q['file']}`: {q['reason']}" for q in report["quarantined"]]
    return "\n".join(lines)
