"""The build's scheduling policy (``flows.scheduling``, issue 14 item 3): how the work is cut
into task runs and in what order, apart from the flow, through public interfaces only.

The batching heuristics themselves (balanced, tapered, batch counts, shard costs) are checked
in ``tests/test_operations.py``; here: the schedule a flow gets from a plan task's listing,
the slots each runner gives, the cold-cluster start, and the order of submission."""

from __future__ import annotations

import inspect
import re
import threading
from concurrent.futures import Future

import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from flows import build as flow_module
from flows import local_dask, scheduling
from flows.runners import InProcessTaskRunner, task_runner


def _pending() -> dict:
    """A plan task's listing: 5 rooms, 7 shards (shard 10 shared by rooms b and c; 15 and 16
    need no room, as after a repair)."""
    return {
        "rooms": ["a", "b", "c", "d", "e"],
        "room_costs": [4.0, 3.0, 2.0, 1.0, 1.0],
        "shards": [9, 10, 11, 12, 13, 15, 16],
        "shard_costs": [1.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5],
        "shard_rooms": [["a"], ["b", "c"], ["c"], ["d"], ["e"], ["x"], []],
    }


def test_room_units_share_a_shared_shard_between_its_rooms() -> None:
    rooms = scheduling.room_units(_pending())
    assert rooms.units == [("a", [9]), ("b", [10]), ("c", [10, 11]), ("d", [12]), ("e", [13])]
    assert rooms.costs == [5.0, 4.0, 4.0, 2.0, 2.0]
    assert rooms.apart == [5, 6]  # shards 15 and 16


@pytest.mark.parametrize("taken", [0, 2, 5])
def test_schedule_covers_every_room_and_shard_once(taken: int) -> None:
    pending = _pending()
    rooms = scheduling.room_units(pending)
    plan = scheduling.schedule(pending, rooms, taken, slots=2)
    assert plan.room_batches[:taken] == [([room], shards) for room, shards in rooms.units[:taken]]
    assert sorted(r for batch, _ in plan.room_batches for r in batch) == pending["rooms"]
    rendered = {s for _, shards in plan.room_batches for s in shards}
    assert rendered == {9, 10, 11, 12, 13}
    assert sorted(s for batch in plan.shard_batches for s in batch) == [15, 16]
    assert scheduling.schedule(pending, rooms, taken, slots=2) == plan  # deterministic


def test_slots_come_from_the_runners_own_settings() -> None:
    assert scheduling.parallel_slots(InProcessTaskRunner(max_workers=1)) == 1
    assert scheduling.parallel_slots(task_runner(1)) == 1
    dask_runner = task_runner(2)
    assert isinstance(dask_runner, local_dask.LocalDaskTaskRunner)
    assert scheduling.parallel_slots(dask_runner) == 2  # known before the cluster exists
    assert not dask_runner.cluster_asked_for  # and asking did not create it
    assert scheduling.start_cluster(InProcessTaskRunner(max_workers=1)) is None
    assert scheduling.start_cluster(ThreadPoolTaskRunner(max_workers=3)) is None
    duplicate = InProcessTaskRunner(max_workers=1).duplicate()  # Prefect copies runners
    assert isinstance(duplicate, InProcessTaskRunner) and duplicate.slots == 1


def test_no_private_attributes_of_prefect_or_dask_are_read() -> None:
    """The private attributes the flow read before: the thread pool's and the Dask runner's."""
    private = re.compile(r"\._(?:client|cluster|max_workers|connect_to|exit_stack|initializer)\b")
    for module in (scheduling, flow_module, local_dask):
        found = private.findall(inspect.getsource(module))
        assert not found, (module.__name__, found)


class _Future:
    """Enough of a PrefectFuture for the policy: a finished or pending task run."""

    def __init__(self, value: object = None, done: bool = True) -> None:
        self.wrapped_future: Future = Future()
        self.value = value
        if done:
            self.wrapped_future.set_result(value)

    def result(self) -> object:
        return self.wrapped_future.result()

    def wait(self) -> None:
        self.wrapped_future.result()


class _Start:
    def __init__(self, after: int, error: BaseException | None = None) -> None:
        self.ready = threading.Event()
        self.after, self.error, self.calls = after, error, 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls >= self.after:
            self.ready.set()

    def wait(self) -> None:
        if self.error is not None:
            raise self.error


def test_the_flow_process_builds_rooms_one_at_a_time_until_the_cluster_is_up() -> None:
    start = _Start(after=2)
    taken = []

    def submit(room: str, shards: list[int]) -> _Future:
        taken.append(room)
        start.tick()
        return _Future(room)

    units = scheduling.room_units(_pending()).units
    futures = scheduling.work_while_cluster_starts(start, submit, units)
    assert taken == ["a", "b"] and [f.result() for f in futures] == taken
    failed = _Start(after=1, error=RuntimeError("cluster failed to start"))
    with pytest.raises(RuntimeError, match="failed to start"):
        scheduling.work_while_cluster_starts(
            failed, lambda r, s: (failed.tick(), _Future(r))[1], units
        )


def test_shard_batches_are_submitted_once_no_room_batch_waits(monkeypatch) -> None:
    import prefect.futures

    monkeypatch.setattr(prefect.futures, "as_completed", lambda futures: iter(list(futures)))
    pending = _pending()
    rooms = scheduling.room_units(pending)
    plan = scheduling.schedule(pending, rooms, 0, slots=1)
    events: list[str] = []

    def submit_rooms(batches):
        events.append(f"rooms:{len(batches)}")
        return [_Future({"shards": []}) for _ in batches]

    def submit_shards(batch):
        events.append("shards")
        return _Future([])

    results, renders = scheduling.rooms_then_shards(
        plan, 1, [], submit_rooms, submit_shards, lambda line: None
    )
    assert events[0] == f"rooms:{len(plan.room_batches)}"
    assert events.count("shards") == len(plan.shard_batches) == len(renders)
    assert len(results) == len(plan.room_batches)
