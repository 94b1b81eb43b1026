"""The build's scheduling policy: how its work is cut into task runs, and in what order.

Every task run costs orchestration time (state updates, logs, moving between processes), and a
build ends when its last task does, so the flow (:mod:`flows.build`) asks this module:

- **cost estimates**: seconds of work per room (its RIRs) and per shard (its audio);
- **batching**: rooms are batched with the shards that need them, up to ``TASKS_PER_SLOT``
  batches per parallel slot, **tapered** (each round of batches ``TAPER_RATIO`` the size of the
  one before, so the workers finish together) down to about ``MIN_TASK_SECONDS``; shards that
  need no room (a repair) in balanced batches of their own;
- **order**: the room batches are submitted first and the shard batches once no room batch
  waits for a worker (Dask runs later submissions first);
- **the cold-cluster start**: while a local Dask cluster starts (seconds), the flow's own
  process builds rooms one at a time.

Only public Prefect and Dask interfaces are used: the tasks are passed in as functions, and
how many tasks run at once comes from the runners' own settings.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dereverb_data.measured_rirs import MeasuredRirSpec
from dereverb_data.plan import Plan
from dereverb_data.rir_bank import base_spec

if TYPE_CHECKING:
    from prefect.futures import PrefectFuture

    from .local_dask import ClusterStart

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Cost estimates
# ---------------------------------------------------------------------------------------------

# Rough CPU seconds per unit of work on a 2-core x86 VM (benchmarks/operations.py), used only
# to size task batches: a room's RIRs per second of RT60 (the tail to simulate grows with it),
# and rendering per second of audio.
ROOM_SECONDS_PER_RT60_S = 0.4
RENDER_SECONDS_PER_AUDIO_S = 0.005


# The diffuse method (benchmarks/rir_methods.py): about 10 ms per RIR with its calibration,
# nearly independent of the RT60.
ROOM_SECONDS_PER_DIFFUSE_RIR = 0.01
# A measured RIR is read, resampled and measured, not simulated.
ROOM_SECONDS_PER_MEASURED_RIR = 0.02


def room_cost(plan: Plan, room_id: str, rir_ids: Sequence[str]) -> float:
    """Estimated CPU seconds to simulate a room's RIRs."""
    # An augmented RIR costs about its base (its room's only other cost is the base itself).
    if rir_ids and isinstance(base_spec(plan.rirs[rir_ids[0]]), MeasuredRirSpec):
        return ROOM_SECONDS_PER_MEASURED_RIR * len(rir_ids)
    if plan.manifest.simulation.method == "diffuse":
        return ROOM_SECONDS_PER_DIFFUSE_RIR * len(rir_ids)
    rt60 = plan.rooms[room_id].target_rt60 or 0.5
    return ROOM_SECONDS_PER_RT60_S * rt60 * len(rir_ids)


def shard_costs(plan: Plan, shard_ids: Sequence[int]) -> list[float]:
    """Estimated CPU seconds to render each shard (proportional to its audio)."""
    samples = plan.shard_samples().tolist()
    rate = plan.manifest.sample_rate
    return [RENDER_SECONDS_PER_AUDIO_S * samples[i] / rate for i in shard_ids]


def shard_rooms(plan: Plan, shard_ids: Sequence[int]) -> list[list[str]]:
    """The rooms whose RIRs each shard's examples use."""
    rooms = plan.shard_room_ids()
    return [rooms[i] for i in shard_ids]


def shards_by_room(
    rooms: Sequence[str], rooms_needed: Sequence[Sequence[str]]
) -> tuple[dict[str, list[int]], list[int]]:
    """For each room of ``rooms`` (the rooms still to simulate), the shards (positions in
    ``rooms_needed``) that need it; and apart, the shards that need none of them. A shard
    holds one room's examples, or two where one room's end and the next's start share it, so
    most shards are listed under one room and a few under two. Positions keep their order."""
    pending = set(rooms)
    needing: dict[str, list[int]] = {room: [] for room in rooms}
    apart: list[int] = []
    for position, needed in enumerate(rooms_needed):
        waits = sorted({room for room in needed if room in pending})
        for room in waits:
            needing[room].append(position)
        if not waits:
            apart.append(position)
    return needing, apart


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------

TASKS_PER_SLOT = 5  # enough tasks to balance the load, few enough that orchestration is cheap
MIN_TASK_SECONDS = 1.0  # a task run costs about 0.2 s of orchestration
# Each round of tapered batches (one per slot) costs this fraction of the round before: the
# build ends when its last round does, so that one is small, while the early rounds are few
# and big (with linear steps, 4 rounds left the last batches at 5 % of the build each).
TAPER_RATIO = 0.5


def batch_count(estimated_seconds: float, slots: int) -> int:
    """How many batches to map: ``TASKS_PER_SLOT`` per parallel slot to balance the load, but
    no more than leave each about ``MIN_TASK_SECONDS`` of work (small updates), and at least
    one per slot so no worker idles."""
    wanted = math.ceil(estimated_seconds / MIN_TASK_SECONDS)
    return max(slots, min(TASKS_PER_SLOT * slots, wanted))


def taper_weights(n: int, slots: int) -> list[float]:
    """The relative cost of each of ``n`` tapered batches: ``slots`` batches per round, each
    round ``TAPER_RATIO`` times the one before."""
    return [TAPER_RATIO ** (b // max(1, slots)) for b in range(n)]


def tapered_batch_count(estimated_seconds: float, slots: int) -> int:
    """How many tapered batches to map: the most rounds, at most ``TASKS_PER_SLOT``, whose
    last batches still hold ``MIN_TASK_SECONDS`` each (a small update gets few, big tasks),
    and at least one round, so no worker idles."""
    slots = max(1, slots)
    for rounds in range(TASKS_PER_SLOT, 1, -1):
        weights = taper_weights(rounds * slots, slots)
        if estimated_seconds * weights[-1] / sum(weights) >= MIN_TASK_SECONDS:
            return rounds * slots
    return slots


def balanced_batches(items: Sequence[T], costs: Sequence[float], n: int) -> list[list[T]]:
    """Split ``items`` into at most ``n`` batches of near-equal total cost.

    Greedy longest-processing-time first (each item, costliest first, joins the batch with the
    least cost so far), ties by position, so the result is deterministic. Items keep their
    original order inside a batch.
    """
    n = max(1, min(n, len(items)))
    totals = [0.0] * n
    members: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(items)), key=lambda i: (-costs[i], i)):
        b = min(range(n), key=lambda b: (totals[b], b))
        totals[b] += costs[i]
        members[b].append(i)
    return [[items[i] for i in sorted(m)] for m in members if m]


def tapered_batches(
    items: Sequence[T], costs: Sequence[float], n: int, slots: int
) -> list[list[T]]:
    """Split ``items`` into at most ``n`` batches whose cost shrinks, ``slots`` at a time.

    Workers take batches in order as they come free, so a build ends when its last batches
    do: if those are big, one worker finishes early and idles while another works through a
    big one. Here each round of ``slots`` batches has ``TAPER_RATIO`` times the share of the
    round before (:func:`taper_weights`), so the tail is small and the early batches amortize
    their orchestration. Greedy: each item, costliest first, joins the batch furthest below
    its share; ties by position, so the result is deterministic. Items keep their original
    order inside a batch; batches come biggest first.
    """
    n = max(1, min(n, len(items)))
    slots = max(1, min(slots, n))
    weights = taper_weights(n, slots)
    total_cost = sum(costs)
    shares = [total_cost * w / sum(weights) for w in weights]
    totals = [0.0] * n
    members: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(items)), key=lambda i: (-costs[i], i)):
        b = min(range(n), key=lambda b: (totals[b] - shares[b], b))
        totals[b] += costs[i]
        members[b].append(i)
    return [[items[i] for i in sorted(m)] for m in members if m]


@dataclass
class RoomUnits:
    """Each room to simulate with the shards that need it, their estimated costs (a shard's
    cost shared between its rooms), and the positions of the shards that need no room."""

    units: list[tuple[str, list[int]]]
    costs: list[float]
    apart: list[int]


def room_units(pending: dict[str, Any]) -> RoomUnits:
    """``pending``: the plan task's listing (``rooms``, ``room_costs``, ``shards``,
    ``shard_costs``, ``shard_rooms``)."""
    shards, costs = pending["shards"], pending["shard_costs"]
    needing, apart = shards_by_room(pending["rooms"], pending["shard_rooms"])
    rooms_of = Counter(j for positions in needing.values() for j in positions)
    units = [(room, [shards[j] for j in needing[room]]) for room in pending["rooms"]]
    unit_costs = [
        cost + sum(costs[j] / rooms_of[j] for j in needing[room])
        for room, cost in zip(pending["rooms"], pending["room_costs"], strict=True)
    ]
    return RoomUnits(units, unit_costs, apart)


@dataclass
class Schedule:
    """The task runs of a build: room batches (rooms, then the shards that need them), and
    batches of shards that need no room."""

    room_batches: list[tuple[list[str], list[int]]]
    shard_batches: list[list[int]]


def schedule(pending: dict[str, Any], rooms: RoomUnits, taken: int, slots: int) -> Schedule:
    """The batches for ``slots`` parallel slots, after the first ``taken`` rooms (built one
    at a time while the cluster started): the rest of the rooms in tapered batches."""
    units, costs = rooms.units[taken:], rooms.costs[taken:]
    n = tapered_batch_count(sum(costs), slots)
    batches = tapered_batches(range(len(units)), costs, n, slots)
    room_batches = [([room], shards) for room, shards in rooms.units[:taken]]
    room_batches += [
        ([units[i][0] for i in batch], sorted({s for i in batch for s in units[i][1]}))
        for batch in batches
    ]
    apart_costs = [pending["shard_costs"][j] for j in rooms.apart]
    shard_batches = balanced_batches(  # e.g. a repair: shards whose RIRs are banked
        [pending["shards"][j] for j in rooms.apart],
        apart_costs,
        batch_count(sum(apart_costs), slots),
    )
    return Schedule(room_batches, shard_batches)


def merged(results: list[dict]) -> list[dict]:
    """One result per shard: where two tasks reported a shard, the one that rendered it."""
    by_shard: dict[int, dict] = {}
    for result in results:
        seen = by_shard.get(result["shard_id"])
        if seen is None or (result["rendered"] and not seen["rendered"]):
            by_shard[result["shard_id"]] = result
    return list(by_shard.values())


# ---------------------------------------------------------------------------------------------
# Parallel slots, the cold-cluster start and the order of submission
# ---------------------------------------------------------------------------------------------


def parallel_slots(runner: object) -> int:
    """How many tasks ``runner`` (the flow's task runner) executes at once."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from .runners import InProcessTaskRunner

    cores = os.cpu_count() or 1
    if isinstance(runner, InProcessTaskRunner):
        return max(1, min(runner.slots, cores))
    if isinstance(runner, ThreadPoolTaskRunner):
        return cores  # someone else's thread pool: at most a task per core is useful
    from .local_dask import LocalDaskTaskRunner, planned_slots  # a Dask runner: imported

    if isinstance(runner, LocalDaskTaskRunner):
        return planned_slots(runner)  # without waiting for the cluster to start
    client = getattr(runner, "client", None)  # prefect-dask's DaskTaskRunner
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    return cores


def start_cluster(runner: object) -> ClusterStart | None:
    """Start creating the flow's local Dask cluster, if it has a cold one, in the background."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if isinstance(runner, ThreadPoolTaskRunner):
        return None
    from .local_dask import start_cluster_in_background

    return start_cluster_in_background(runner)


def work_while_cluster_starts(
    cluster_start: ClusterStart,
    submit_room: Callable[[str, list[int]], PrefectFuture],
    units: list[tuple[str, list[int]]],
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
    while len(futures) < len(units) and not cluster_start.ready.is_set():
        future = submit_room(*units[len(futures)])
        futures.append(future)
        while not _done(future) and not cluster_start.ready.wait(0.02):
            pass
    try:
        cluster_start.wait()
    except BaseException:
        for future in futures:
            future.wait()  # the room in progress finishes and banks its RIRs for the rerun
        raise
    return futures


def _done(future: PrefectFuture) -> bool:
    """Whether the task run has finished, without waiting (or asking the server)."""
    return future.wrapped_future.done()  # type: ignore[attr-defined]


def rooms_then_shards(
    plan: Schedule,
    slots: int,
    started: list[PrefectFuture],
    submit_rooms: Callable[[list[tuple[list[str], list[int]]]], list[PrefectFuture]],
    submit_shards: Callable[[list[int]], PrefectFuture],
    log: Callable[[str], None],
) -> tuple[list, list[PrefectFuture]]:
    """Submit every room batch not ``started`` already, then the shard batches once no room
    batch is left waiting for a worker (submitted earlier, they would run ahead of queued
    rooms: Dask runs later submissions first): (room batch results, shard batch futures).
    A failed room batch (after its retries) raises here."""
    from prefect.futures import as_completed

    room_futures = list(started) + list(submit_rooms(plan.room_batches[len(started) :]))
    render_futures: list[PrefectFuture] = []

    def submit_renders(finished: int) -> None:
        if render_futures or len(room_futures) - finished > slots:
            return
        render_futures.extend(submit_shards(batch) for batch in plan.shard_batches)

    submit_renders(0)
    every = max(1, len(room_futures) // 10)
    for finished, future in enumerate(as_completed(room_futures), 1):
        future.result()
        submit_renders(finished)
        if finished % every == 0 or finished == len(room_futures):
            log(f"room batches: {finished}/{len(room_futures)} done")
    return [future.result() for future in room_futures], render_futures
