"""CPU an idle local Dask cluster spends on its own housekeeping: Dask's defaults against the
configuration the build gives its clusters (``flows.local_dask.LOCAL_CLUSTER_CONFIG``).

Every scheduler, nanny and worker checks its event loop every 20 ms by default, and every
worker samples its own stack every 10 ms for the dashboard's profile page. On 2 cores that is
CPU the tasks do not get. Each configuration starts the same 2-worker cluster the build uses
(workers forked from the preloaded fork server), lets it settle, then counts the CPU seconds of
this process (scheduler, nannies, client) and of the workers over an idle window.

    python benchmarks/cluster_housekeeping.py [--seconds 20 --repeat 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import dask
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.local_dask import LOCAL_CLUSTER_CONFIG, start_worker_forkserver
from flows.runners import task_runner


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def idle_cpu(config: dict, seconds: float) -> tuple[float, float]:
    """CPU seconds of (this process, the workers) while a fresh 2-worker cluster idles."""
    from distributed import LocalCluster

    start_worker_forkserver()
    with dask.config.set(config):
        cluster = LocalCluster(**task_runner(2).cluster_kwargs)
    with cluster:
        time.sleep(3)  # workers settled
        me = psutil.Process()
        workers = [p for p in me.children(recursive=True) if p.ppid() != me.pid]
        before = _cpu(me), sum(_cpu(w) for w in workers)
        time.sleep(seconds)
        after = _cpu(me), sum(_cpu(w) for w in workers)
    return after[0] - before[0], after[1] - before[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="idle window")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average {os.getloadavg()[0]:.2f}; "
        f"{args.seconds:.0f} s idle windows"
    )
    totals = {"Dask defaults": 0.0, "build's cluster config": 0.0}
    for rep in range(args.repeat):
        for name, config in (
            ("Dask defaults", {}),
            ("build's cluster config", LOCAL_CLUSTER_CONFIG),
        ):
            own, workers = idle_cpu(config, args.seconds)
            totals[name] += own + workers
            print(
                f"  {rep + 1}. {name:<24} scheduler+nannies {own:5.2f} CPU-s, "
                f"workers {workers:5.2f} CPU-s ({(own + workers) / args.seconds:.1%} of a core)"
            )
    default, ours = totals.values()
    print(f"housekeeping CPU, defaults / ours: {default / max(ours, 1e-9):.1f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
