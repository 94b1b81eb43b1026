"""Prefect flow ``build-dataset``: plan, simulate RIRs per room, render shards, finalize.

A thin layer over :mod:`dereverb_data.build`: tasks pass the store URL and ids, never arrays.
Idempotency lives in the library (done-markers, the content-addressed RIR bank), so tasks are
not cached by Prefect and can simply be retried.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

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
from dereverb_data.verify import forget_damaged_shards

from .runners import task_runner

if TYPE_CHECKING:
    from .local_dask import ClusterStart


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
        "room_costs": [steps.room_cost(plan, room, rooms[room]) for room in pending_rooms],
        "rirs_already_banked": sum(len(rooms[r]) for r in rooms if r not in pending_rooms),
        "shards": pending_shards,
        "shard_costs": steps.shard_costs(plan, pending_shards),
        "shard_rooms": steps.shard_rooms(plan, pending_shards),
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


TASKS_PER_SLOT = 4  # enough tasks to balance the load, few enough that orchestration is cheap
MIN_TASK_SECONDS = 1.0  # a task run costs about 0.1-0.2 s of orchestration


def batch_count(estimated_seconds: float, slots: int) -> int:
    """How many batches to map: ``TASKS_PER_SLOT`` per parallel slot to balance the load, but
    no more than leave each about ``MIN_TASK_SECONDS`` of work (small updates), and at least
    one per slot so no worker idles."""
    wanted = math.ceil(estimated_seconds / MIN_TASK_SECONDS)
    return max(slots, min(TASKS_PER_SLOT * slots, wanted))


def parallel_slots() -> int:
    """How many tasks the running flow's task runner executes at once."""
    runner = FlowRunContext.get().task_runner  # type: ignore[union-attr]
    if isinstance(runner, ThreadPoolTaskRunner):
        return max(1, min(runner._max_workers, os.cpu_count() or 1))
    from .local_dask import LocalDaskTaskRunner, planned_slots  # a Dask runner: imported

    if isinstance(runner, LocalDaskTaskRunner):
        return planned_slots(runner)  # without waiting for the cluster to start
    client = getattr(runner, "client", None)  # prefect-dask's DaskTaskRunner
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    return os.cpu_count() or 1


def _start_local_cluster() -> ClusterStart | None:
    """Start creating the flow's local Dask cluster, if it has a cold one, in the background."""
    runner = FlowRunContext.get().task_runner  # type: ignore[union-attr]
    if isinstance(runner, ThreadPoolTaskRunner):
        return None
    from .local_dask import start_cluster_in_background

    return start_cluster_in_background(runner)


def _results(futures: list[PrefectFuture], what: str) -> list:
    """Wait for mapped tasks, logging progress as they finish; a failed task raises here."""
    logger = get_run_logger()
    total = len(futures)
    every = max(1, total // 10)
    for finished, _ in enumerate(as_completed(futures), 1):
        if finished % every == 0 or finished == total:
            logger.info("%s: %d/%d done", what, finished, total)
    return [future.result() for future in futures]


def _simulate_then_render(
    store_url: str,
    rir_cache: str,
    plan_id: str,
    room_batches: list[tuple[list[str], list[int]]],
    shard_batches: list[list[int]],
    slots: int,
    started: list[PrefectFuture] | None = None,
) -> tuple[list, list[PrefectFuture]]:
    """Submit every room batch (rooms, then their shards), then the batches of shards that
    need no room: (room batch results, shard batch futures).

    Rooms go first: the shard batches are submitted once no room batch is left waiting for a
    worker. (Submitted earlier, they would run ahead of queued rooms: Dask runs later
    submissions first.) ``started`` are the futures of the first batches, already running
    elsewhere.
    """
    room_futures = list(started or [])
    rest = room_batches[len(room_futures) :]
    room_futures += build_rooms_task.map(
        unmapped(store_url),
        [rooms for rooms, _ in rest],
        [shards for _, shards in rest],
        unmapped(rir_cache),
        unmapped(plan_id),
    )
    render_futures: list[PrefectFuture] = []

    def submit_renders(finished: int) -> None:
        if render_futures or len(room_futures) - finished > slots:
            return
        render_futures.extend(
            render_shards_task.submit(store_url, batch, rir_cache, plan_id)
            for batch in shard_batches
        )

    submit_renders(0)
    logger = get_run_logger()
    every = max(1, len(room_futures) // 10)
    for finished, future in enumerate(as_completed(room_futures), 1):
        future.result()  # a failed batch (after its retries) fails the build here
        submit_renders(finished)
        if finished % every == 0 or finished == len(room_futures):
            logger.info("room batches: %d/%d done", finished, len(room_futures))
    return [future.result() for future in room_futures], render_futures


def _simulate_while_starting(
    lane: ThreadPoolTaskRunner,
    cluster_start: ClusterStart,
    store_url: str,
    rir_cache: str,
    plan_id: str,
    rooms: list[tuple[str, list[int]]],
) -> list[PrefectFuture]:
    """Build rooms (each with the shards that need it) in this process, one at a time, until
    the cluster is up (or none is left): the futures of the rooms taken, in order (the last
    may still be running). Raises if the cluster failed to start, once the room in progress
    is done.

    One room at a time, so this process stops within a room of the cluster being ready and the
    rest is batched for the workers then. Which process builds a room never changes its data
    (each RIR is seeded by its spec): the store is the same however the race goes.
    """
    futures: list[PrefectFuture] = []
    while len(futures) < len(rooms) and not cluster_start.ready.is_set():
        room, shards = rooms[len(futures)]
        parameters = {
            "store_url": store_url,
            "room_ids": [room],
            "shard_ids": shards,
            "rir_cache": rir_cache,
            "plan_id": plan_id,
        }
        future = lane.submit(build_rooms_task, parameters)
        futures.append(future)
        while not future.wrapped_future.done() and not cluster_start.ready.wait(0.02):
            pass
    try:
        cluster_start.wait()
    except BaseException:
        for future in futures:
            future.wait()  # the room in progress finishes and banks its RIRs for the rerun
        raise
    return futures


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
    for label in ("rt60_t30_s", "drr_db", "c50_db", "distance_m"):
        d = s[label]
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


def _room_units(planned: dict) -> tuple[list[tuple[str, list[int]]], list[float], list[int]]:
    """Each room to simulate with the shards that need it, their estimated costs (a shard's
    cost shared between its rooms), and the positions of the shards that need no room."""
    shards, shard_costs = planned["shards"], planned["shard_costs"]
    needing, apart = steps.shards_by_room(planned["rooms"], planned["shard_rooms"])
    rooms_of = Counter(j for positions in needing.values() for j in positions)
    units = [(room, [shards[j] for j in needing[room]]) for room in planned["rooms"]]
    costs = [
        cost + sum(shard_costs[j] / rooms_of[j] for j in needing[room])
        for room, cost in zip(planned["rooms"], planned["room_costs"], strict=True)
    ]
    return units, costs, apart


def _batched(
    units: list[tuple[str, list[int]]], costs: list[float], slots: int
) -> list[tuple[list[str], list[int]]]:
    """Room units in tapered batches (big first, small last): (rooms, shards) each."""
    batches = steps.tapered_batches(range(len(units)), costs, batch_count(sum(costs), slots), slots)
    return [
        ([units[i][0] for i in batch], sorted({s for i in batch for s in units[i][1]}))
        for batch in batches
    ]


def _merged(results: list[dict]) -> list[dict]:
    """One result per shard: where two tasks reported a shard, the one that rendered it."""
    by_shard: dict[int, dict] = {}
    for result in results:
        seen = by_shard.get(result["shard_id"])
        if seen is None or (result["rendered"] and not seen["rendered"]):
            by_shard[result["shard_id"]] = result
    return list(by_shard.values())


def _build(
    manifest_path: str,
    store_url: str,
    rir_cache: str | None,
    corpus_path: str | None,
    replace: bool = False,
) -> dict:
    logger = get_run_logger()
    rir_cache = rir_cache or steps.default_rir_cache(store_url)
    planned = plan_task(manifest_path, store_url, rir_cache, corpus_path, replace)
    logger.info("plan: %s", planned["summary"])
    # INFO, not WARNING: the run's log keeps them, and the command lists them once at its end.
    for reason in planned["quarantined"]:
        logger.info("quarantined: %s", reason)
    # A rerun with nothing left to do (or a resume whose work is done) starts no cluster.
    cluster_start = _start_local_cluster() if planned["rooms"] or planned["shards"] else None
    # Each task run costs orchestration time (state updates, logs, moving between processes),
    # so rooms are batched with the shards that need them, a few batches per slot.
    slots = parallel_slots()
    units, unit_costs, apart = _room_units(planned)
    with contextlib.ExitStack() as stack:
        started: list[PrefectFuture] = []
        if cluster_start is not None:  # this process works while its cluster starts
            lane = stack.enter_context(ThreadPoolTaskRunner(max_workers=1))
            started = _simulate_while_starting(
                lane, cluster_start, store_url, rir_cache, planned["plan_id"], units
            )
        taken = len(started)
        room_batches = [([room], shard_ids) for room, shard_ids in units[:taken]]
        room_batches += _batched(units[taken:], unit_costs[taken:], slots)
        apart_costs = [planned["shard_costs"][j] for j in apart]
        shard_batches = steps.balanced_batches(  # e.g. a repair: shards whose RIRs are banked
            [planned["shards"][j] for j in apart], apart_costs, batch_count(sum(apart_costs), slots)
        )
        built, render_futures = _simulate_then_render(
            store_url, rir_cache, planned["plan_id"], room_batches, shard_batches, slots, started
        )
        rendered = [s for batch in _results(render_futures, "shard batches") for s in batch]
        rendered += [s for batch in built for s in batch["shards"]]
        reported = {s["shard_id"] for s in rendered}
        missed = [s for s in planned["shards"] if s not in reported]
        if missed:  # no task found every RIR of these banked (see build_rooms_task)
            logger.warning("rendering %d shards no room batch rendered", len(missed))
            rendered += render_shards_task(store_url, missed, rir_cache, planned["plan_id"])
    shard_results = _merged(rendered)
    report = finalize_task(store_url, planned["plan_id"])
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
        "room_batches": len(room_batches),
        "rooms_in_flow_process": taken,
        "shards_with_their_rooms": len(planned["shards"]) - len(apart) - len(missed),
        "shard_batches": len(shard_batches) + bool(missed),
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
