"""Operations benchmark: parallel speed-up, orchestration overhead, incremental rebuild.

All runs build the same plan (the demo corpus written as a folder of wav files, 6 speakers x
30 utterances x 4 variants = 720 examples, 0.65 h, 40 rooms, ~120 unique RIRs, ~160 shards)
into fresh stores, each with its own RIR bank, so every run simulates and renders everything.
A Prefect server is started first (or ``PREFECT_API_URL`` is used) and warmed with one trivial
flow run, so no run pays for it.

(a) Speed-up: the Prefect flow on a Dask ``LocalCluster`` of 2 one-thread worker processes
    (``--workers 2``) against the same with 1 worker process. Cluster start is included.
    Read against **this machine's ceiling**, measured in the same repetition: the same library
    steps (``build_serial``, no Prefect, no Dask) on a slice of the plan (1/6 of the
    utterances, 1/5 of the rooms), in one process alone and then in two processes at once.
    Two vCPUs of a VM need not compute twice as fast as one (siblings of one physical core, a
    shared host): where two plain processes only reach 1.45x, no scheduler reaches 1.7x, and
    the share of the ceiling the flow reaches is what orchestration decides.
(b) Overhead: the same library steps in a plain loop in one process
    (``dereverb_data.build.build_serial``, no Prefect, no Dask) against the Prefect flow in
    process (``--workers 1``) and the flow with one Dask worker process. Same work, same number
    of worker processes, so the difference is what orchestration costs (task runs, state and
    log traffic to the server, cluster start, moving results between processes).
(c) Incremental rebuild after changing 10% of the room specs. The edit: the ``acoustic_tile``
    and ``concrete`` absorption profiles get 30% more absorption at 125 Hz (as when correcting
    materials' low band). Rooms draw their profile at random; with this manifest and seed 4 of
    40 rooms use them (10% of rooms, 12 of 118 RIR specs, ~9% of examples; the script prints
    the exact numbers from the two plans). (Sessions 1-4 edited ``soft_highs``: 5 rooms, 12.5%,
    more than the goal names.) Those rooms are recalibrated and their RIRs resimulated, their
    examples re-rendered, and the shards holding them rewritten (shards hold one room's
    examples side by side, so ~10% of shards are touched). Timed against a full build of the
    edited manifest with the same runner (2 workers); the updated store is checked to equal
    that full build. Three ways: as one-off builds in this process (each starts its own
    ``LocalCluster``, whose workers start and import cold, as in a command); as real
    ``dereverb build`` commands (interpreter start, imports and exit included); and on a warm
    cluster kept between runs (as ``dereverb serve`` keeps one, or ``--dask-address``).

Goals: (a) >= 1.7x, (b) <= 15% overhead, (c) <= 20% of a full build. Each build is repeated
(``--repeat``, default 3; one repetition varied by up to 30% on a shared 2-core VM) and the
median reported, with the ratios within each repetition; the load average is printed before
and after.

    python benchmarks/operations.py [--utterances 30 --rooms 32,4,4 --repeat 3 --only-speedup]

``--only-speedup`` runs (a) alone: the ceiling and the 1- and 2-worker builds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

for _name in ("PRA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_name] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import soundfile as sf  # noqa: E402
import yaml  # noqa: E402
import zarr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dereverb_data import build as steps  # noqa: E402
from dereverb_data.corpus import scan_corpus  # noqa: E402
from dereverb_data.demo_corpus import demo_utterances, synthesize_utterance  # noqa: E402
from dereverb_data.manifest import load_manifest, parse_manifest  # noqa: E402
from dereverb_data.plan import make_plan  # noqa: E402

PROFILES = {
    "acoustic_tile": [0.6, 0.8, 1.0, 1.1, 1.1, 1.0],
    "boomy": [1.4, 1.2, 1.0, 0.9, 0.8, 0.8],
    "carpet": [0.3, 0.5, 0.8, 1.2, 1.5, 1.7],
    "concrete": [0.8, 0.9, 1.0, 1.0, 1.1, 1.2],
    "curtains": [0.4, 0.6, 0.9, 1.1, 1.3, 1.3],
    "flat": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "glass": [1.8, 1.3, 1.0, 0.8, 0.6, 0.5],
    "plaster": [1.1, 1.0, 1.0, 1.0, 0.9, 0.9],
    "soft_highs": [0.5, 0.7, 1.0, 1.2, 1.4, 1.5],
    "wood": [1.5, 1.2, 1.0, 0.9, 0.9, 0.8],
}
EDITED_PROFILES = ("acoustic_tile", "concrete")


def write_corpus(folder: Path, utterances: int) -> None:
    """The demo corpus as a folder of wav files (one folder per speaker), as users have it."""
    for item in demo_utterances(6, utterances):
        path = folder / item.speaker / f"{item.utterance_id}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, synthesize_utterance(item.speaker, item.index, 16000), 16000)


def manifest_dict(corpus: Path, rooms: tuple[int, int, int]) -> dict:
    return {
        "name": "ops-bench",
        "seed": 7,
        "corpus": {"kind": "folder", "path": str(corpus), "pattern": "**/*.wav"},
        "variants_per_utterance": 4,
        "rooms": {
            "rooms_per_split": dict(zip(("train", "valid", "test"), rooms, strict=True)),
            "positions_per_room": 3,
            "length_m": [4.0, 8.0],
            "width_m": [3.0, 6.0],
            "height_m": [2.5, 3.5],
            "rt60_s": [0.3, 0.9],
            "distance_m": [0.7, 2.5],
            "absorption": {"kind": "profile", "profiles": PROFILES},
        },
        "storage": {"frames_per_chunk": 256, "frames_per_shard": 2048},
        "splits": {"train": 0.67, "valid": 0.17, "test": 0.16},
    }


def edited(data: dict) -> dict:
    out = copy.deepcopy(data)
    for name in EDITED_PROFILES:
        band = out["rooms"]["absorption"]["profiles"][name]
        band[0] = round(band[0] * 1.3, 4)
    return out


def plan_of(data: dict):
    manifest = parse_manifest(data)
    utterances, quarantined = scan_corpus(manifest.corpus, manifest.sample_rate)
    return make_plan(manifest, utterances, quarantined)


def change_fractions(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    p0, p1 = plan_of(before), plan_of(after)
    changed_examples = [
        b for a, b in zip(p0.examples, p1.examples, strict=True) if a.fingerprint != b.fingerprint
    ]
    return {
        "rooms": (sum(p0.rooms[r] != p1.rooms[r] for r in p0.rooms), len(p0.rooms)),
        "RIR specs": (len(set(p1.rirs) - set(p0.rirs)), len(p1.rirs)),
        "examples": (len(changed_examples), len(p1.examples)),
        "shards touched": (len({e.shard for e in changed_examples}), len(p1.shards)),
    }


def dask_runner(workers: int):
    """The runner ``--workers N`` uses, with any N (``task_runner(1)`` is in-process)."""
    from flows.runners import task_runner

    template = task_runner(2)
    return type(template)(
        cluster_class=template.cluster_class,
        cluster_kwargs={**template.cluster_kwargs, "n_workers": workers},
    )


def cli_build(manifest: Path, url: str) -> dict:
    """``dereverb build --workers 2`` in its own process, as a user runs it: interpreter start,
    imports and exit included; the Prefect server is the warm one (``PREFECT_API_URL``). Output
    goes to a file, not a pipe, so the time is the command's, as a shell waits for it (the
    workers' fork server may outlive it by a moment, holding its stdout)."""
    with tempfile.TemporaryFile("w+") as log:
        command = [sys.executable, "-m", "flows.cli", "build", str(manifest), "--store", url]
        returncode = subprocess.call(
            [*command, "--workers", "2", "--no-progress"], cwd=REPO, stdout=log, stderr=log
        )
        log.seek(0)
        output = log.read()
    if returncode:
        raise RuntimeError(f"dereverb build failed:\n{output[-3000:]}")
    line = next(line for line in output.splitlines() if line.startswith("counts: "))
    pairs = (item.rsplit(" ", 1) for item in line.removeprefix("counts: ").split(", "))
    return {"counts": {key: int(value) for key, value in pairs}}


def _build_serial_seconds(manifest: str, url: str) -> float:
    """One plain-loop build in this (pool) process, timed without the process's start."""
    start = time.perf_counter()
    steps.build_serial(load_manifest(manifest), url)
    return time.perf_counter() - start


def parallel_ceiling(manifest: Path, work: Path) -> tuple[float, float]:
    """(seconds alone, seconds of the slower of two at once) for the same plain-loop build in
    fresh stores: what two processes gain on this machine with no orchestration at all."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters, like Dask's workers
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        list(pool.map(abs, (1, 2)))  # both processes started and imported before timing
        alone = pool.submit(_build_serial_seconds, str(manifest), str(work / "ceil-0.zarr"))
        seconds_alone = alone.result()
        pair = [
            pool.submit(_build_serial_seconds, str(manifest), str(work / f"ceil-{i}.zarr"))
            for i in (1, 2)
        ]
        seconds_pair = max(future.result() for future in pair)
    for i in range(3):
        shutil.rmtree(work / f"ceil-{i}.zarr", ignore_errors=True)
    return seconds_alone, seconds_pair


@dataclass
class Run:
    wall: float
    cpu: float  # CPU seconds of this process, its finished children and the Prefect server
    report: dict


def _server_process() -> psutil.Process | None:
    """The ``prefect server`` started by ``prefect_server()`` (None if the API is external)."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "server" in child.cmdline() and "start" in child.cmdline():
                return child
    return None


def cpu_seconds(live: list[psutil.Process]) -> float:
    """CPU time used so far by this process, its waited-for children (a cluster's workers once
    it closes and its fork server is reaped) and the given live processes with their children
    (the Prefect server; a warm cluster's workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    for parent in live:
        with contextlib.suppress(psutil.Error):
            for process in (parent, *parent.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
    return total


def stop_worker_forkserver() -> None:
    """Each one-off run starts its workers cold, as a ``dereverb build`` command does: in one
    long-lived process (this script) later clusters would fork from the server the first one
    started, without paying for its imports."""
    import multiprocessing.forkserver

    multiprocessing.forkserver._forkserver._stop()  # the method CPython's own tests use


def forkserver_pid() -> int:
    import multiprocessing.forkserver

    return multiprocessing.forkserver._forkserver._forkserver_pid


def timed(what: str, fn, live: list[psutil.Process], cold: bool = True) -> Run:
    if cold:
        stop_worker_forkserver()
    cpu0, start = cpu_seconds(live), time.perf_counter()
    report = fn()
    seconds = time.perf_counter() - start
    if cold:
        stop_worker_forkserver()  # reaps it, so its workers' CPU time counts as our children's
    cpu = cpu_seconds(live) - cpu0
    counts = report.get("counts", {})
    brief = {k: v for k, v in counts.items() if k in ("rirs_simulated", "shards_rendered")}
    if report.get("tasks", {}).get("rooms_in_flow_process"):
        brief["rooms simulated by the flow's process"] = report["tasks"]["rooms_in_flow_process"]
    print(f"  {what:<46} {seconds:7.1f} s wall {cpu:7.1f} s CPU   {brief}", flush=True)
    return Run(seconds, cpu, report)


def median_run(runs: list[Run]) -> Run:
    """The repetition with the median wall time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda run: run.wall)[(len(runs) - 1) // 2]


def checksums(url: str) -> list[str]:
    return list(zarr.open_group(url, mode="r")["shard_checksums"][:])


def same_data(a: str, b: str) -> bool:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    return checksums(a) == checksums(b) and all(
        np.array_equal(
            ga["index"][k][:], gb["index"][k][:], equal_nan=ga["index"][k].dtype.kind == "f"
        )
        for k in gb["index"].array_keys()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=30, help="per speaker (6 speakers)")
    parser.add_argument("--rooms", default="32,4,4", help="rooms per split: train,valid,test")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (medians reported)")
    parser.add_argument(
        "--only-speedup",
        action="store_true",
        help="run (a) only: the machine's ceiling and the 1- and 2-worker builds",
    )
    args = parser.parse_args()
    rooms = tuple(int(x) for x in args.rooms.split(","))
    work = Path(tempfile.mkdtemp(prefix="dereverb-ops-bench-"))
    write_corpus(work / "corpus", args.utterances)
    data = manifest_dict(work / "corpus", rooms)  # type: ignore[arg-type]
    data_edited = edited(data)
    # The ceiling's slice: the same kind of work (RIRs per example, rooms per split), smaller.
    write_corpus(work / "corpus-slice", max(2, args.utterances // 6))
    manifest_slice = work / "slice.yaml"
    slice_rooms = tuple(max(1, n // 5) for n in rooms)
    manifest_slice.write_text(
        yaml.safe_dump(manifest_dict(work / "corpus-slice", slice_rooms), sort_keys=False)  # type: ignore[arg-type]
    )

    from prefect import flow, task

    from flows.build import build_dataset, run_build
    from flows.local_dask import served_cluster
    from flows.server import prefect_server

    try:
        manifest, manifest_edited = work / "bench.yaml", work / "bench-edited.yaml"
        manifest.write_text(yaml.safe_dump(data, sort_keys=False))
        manifest_edited.write_text(yaml.safe_dump(data_edited, sort_keys=False))
        summary = plan_of(data).summary()
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}; load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"plan: {summary['examples']} examples, {summary['hours']} h, {summary['rooms']} "
            f"rooms, {summary['unique_rirs']} RIRs, {summary['shards']} shards"
        )
        with prefect_server() as api:
            print(f"Prefect API: {api}")

            @task
            def _noop() -> int:
                return 1

            @flow
            def _warm() -> int:
                return _noop()

            _warm()  # first flow run of the process: client, settings, server tables

            def store(name: str) -> str:
                return str(work / f"{name}.zarr")

            def flow_with(runner, path: Path, url: str) -> dict:
                return build_dataset.with_options(task_runner=runner)(str(path), url)

            server = _server_process()
            live = [server] if server else []
            fractions = change_fractions(data, data_edited)
            print("the edit (c) changes:")
            for what, (n, total) in fractions.items():
                print(f"  {what:<15} {n:4d} / {total:<4d} ({n / total:.1%})")
            runs: dict[str, list[Run]] = {}
            ceilings: list[tuple[float, float]] = []
            identical = incremental_ok = True
            for rep in range(args.repeat):
                print(f"\nrepetition {rep + 1}/{args.repeat} (fresh store and RIR bank each):")
                alone, pair = parallel_ceiling(manifest_slice, work)
                ceilings.append((alone, pair))
                print(
                    f"  {'ceiling: plain loop on a slice, alone / 2 at once':<46} "
                    f"{alone:7.1f} s / {pair:.1f} s: {2 * alone / pair:.2f}x",
                    flush=True,
                )
                for key, what, fn in (
                    (
                        "serial",
                        "plain loop, 1 process (build_serial)",
                        lambda url: steps.build_serial(load_manifest(manifest), url),
                    ),
                    (
                        "inproc",
                        "flow, in-process (--workers 1)",
                        lambda url: run_build(str(manifest), url, workers=1),
                    ),
                    (
                        "dask1",
                        "flow + Dask, 1 worker process",
                        lambda url: flow_with(dask_runner(1), manifest, url),
                    ),
                    (
                        "dask2",
                        "flow + Dask, 2 worker processes (--workers 2)",
                        lambda url: run_build(str(manifest), url, workers=2),
                    ),
                    (
                        "incr",
                        "update of that store after editing 2 profiles",
                        lambda url: run_build(str(manifest_edited), store("dask2"), workers=2),
                    ),
                    (
                        "full",
                        "full build of the edited manifest (2 workers)",
                        lambda url: run_build(str(manifest_edited), url, workers=2),
                    ),
                ):
                    if args.only_speedup and key not in ("dask1", "dask2"):
                        continue
                    if key == "incr":
                        shutil.copytree(store("dask2"), store("cli_incr"))  # base for the CLI
                        identical &= all(
                            checksums(store(n)) == checksums(store("serial"))
                            for n in ("inproc", "dask1", "dask2")
                        )
                    run = timed(what, functools.partial(fn, store(key)), live)
                    runs.setdefault(key, []).append(run)
                if args.only_speedup:
                    identical &= checksums(store("dask1")) == checksums(store("dask2"))
                    for key in runs:
                        shutil.rmtree(store(key), ignore_errors=True)
                    continue
                incremental_ok &= same_data(store("dask2"), store("full"))
                print(f"    update counts: {runs['incr'][-1].report['counts']}")
                # The command's CPU column counts only its own process, not its workers.
                for key, what in (
                    ("cli_incr", "`dereverb build` command: the same update"),
                    ("cli_full", "`dereverb build` command: full build of the edit"),
                ):
                    run = timed(
                        what, functools.partial(cli_build, manifest_edited, store(key)), live
                    )
                    runs.setdefault(key, []).append(run)
                incremental_ok &= same_data(store("cli_incr"), store("full"))
                with served_cluster(2, None) as address:  # as `dereverb serve` keeps one
                    warm_live = [*live, psutil.Process(forkserver_pid())]
                    for key, what, path, target in (
                        ("warm_base", "full build, warm cluster of 2 workers", manifest, None),
                        (
                            "warm_incr",
                            "update of that store after the edit",
                            manifest_edited,
                            "warm_base",
                        ),
                        ("warm_full", "full build of the edited manifest", manifest_edited, None),
                    ):
                        fn = functools.partial(
                            run_build, str(path), store(target or key), dask_address=address
                        )
                        run = timed(what, fn, warm_live, cold=False)
                        runs.setdefault(key, []).append(run)
                incremental_ok &= same_data(store("warm_base"), store("warm_full"))
                for key in runs:
                    shutil.rmtree(store(key), ignore_errors=True)
        report(runs, ceilings, args.repeat, identical, incremental_ok, server is not None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(
    runs: dict[str, list[Run]],
    ceilings: list[tuple[float, float]],
    repeat: int,
    identical: bool,
    incremental_ok: bool,
    server_counted: bool,
) -> None:
    """The summary: medians over the repetitions, then the ratios within each repetition."""
    med = {key: median_run(values) for key, values in runs.items()}
    full_run = "serial" in runs

    # Medians pair builds from different repetitions; on a VM whose speed drifts between
    # minutes, the ratios within each repetition are the fairer pairing.
    def per_rep(num: str, den: str, fmt: str) -> str:
        pairs = zip(runs[num], runs[den], strict=True)
        return ", ".join(format(a.wall / b.wall, fmt) for a, b in pairs)

    ceiling = sorted(2 * alone / pair for alone, pair in ceilings)[(len(ceilings) - 1) // 2]
    speedups = [a.wall / b.wall for a, b in zip(runs["dask1"], runs["dask2"], strict=True)]
    print(f"\nall builds bit-identical, every repetition: {identical}")
    if full_run:
        print(f"incrementally updated stores equal full builds of the edit: {incremental_ok}")
    if not server_counted:
        print("(the Prefect server is external: its CPU time is not counted)")
    print(
        f"\nresults (median of {repeat} repetitions; wall time, CPU seconds in brackets, "
        "which a busy machine affects less):"
    )
    dask1, dask2 = med["dask1"], med["dask2"]
    print(
        f"(a) 2 workers vs 1 (Dask, both):     {dask1.wall / dask2.wall:5.2f}x   "
        f"({dask1.wall:.1f} s -> {dask2.wall:.1f} s; goal >= 1.7x) "
        f"[CPU {dask1.cpu:.0f} s -> {dask2.cpu:.0f} s]"
    )
    print(
        f"    this machine's ceiling:          {ceiling:5.2f}x   (the plain loop on a slice, "
        "2 processes at once vs 1 alone; no orchestration)"
    )
    print(f"    share of the ceiling reached:    {dask1.wall / dask2.wall / ceiling:6.1%}")
    if full_run:
        serial, inproc = med["serial"], med["inproc"]
        print(
            f"    2 workers vs in-process flow:    {inproc.wall / dask2.wall:5.2f}x   "
            f"({inproc.wall:.1f} s -> {dask2.wall:.1f} s)"
        )
        print(
            f"(b) flow + Dask (1 worker) vs loop:  {dask1.wall / serial.wall - 1:+6.1%}   "
            f"({serial.wall:.1f} s loop, {dask1.wall:.1f} s flow; goal <= +15%) "
            f"[CPU {dask1.cpu / serial.cpu - 1:+.1%}: {serial.cpu:.0f} s -> {dask1.cpu:.0f} s]"
        )
        print(
            f"    flow in-process vs loop:         {inproc.wall / serial.wall - 1:+6.1%}   "
            f"({inproc.wall:.1f} s) [CPU {inproc.cpu / serial.cpu - 1:+.1%}]"
        )
        incr, full = med["incr"], med["full"]
        cli_incr, cli_full = med["cli_incr"], med["cli_full"]
        warm_incr, warm_full = med["warm_incr"], med["warm_full"]
        print(
            f"(c) incremental vs full build:       {incr.wall / full.wall:6.1%}   "
            f"({incr.wall:.1f} s vs {full.wall:.1f} s; goal <= 20%) "
            f"[CPU {incr.cpu / full.cpu:.1%}]"
        )
        print(
            f"    as `dereverb build` commands:    {cli_incr.wall / cli_full.wall:6.1%}   "
            f"({cli_incr.wall:.1f} s vs {cli_full.wall:.1f} s; interpreter start, imports and "
            "exit included)"
        )
        print(
            f"    the same on a warm cluster:      {warm_incr.wall / warm_full.wall:6.1%}   "
            f"({warm_incr.wall:.1f} s vs {warm_full.wall:.1f} s; `dereverb serve` or "
            f"--dask-address) [CPU {warm_incr.cpu / warm_full.cpu:.1%}]"
        )
    line = (
        f"per repetition: (a) {per_rep('dask1', 'dask2', '.2f')}; ceiling "
        + ", ".join(f"{2 * alone / pair:.2f}" for alone, pair in ceilings)
        + "; (a) / ceiling "
        + ", ".join(
            f"{x / (2 * alone / pair):.0%}"
            for x, (alone, pair) in zip(speedups, ceilings, strict=True)
        )
    )
    if full_run:
        line += (
            f"; (c) {per_rep('incr', 'full', '.1%')}; "
            f"(c) as commands {per_rep('cli_incr', 'cli_full', '.1%')}; "
            f"(c) warm {per_rep('warm_incr', 'warm_full', '.1%')}"
        )
    print(line)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
