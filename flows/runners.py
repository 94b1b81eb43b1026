"""Choosing where mapped tasks run: in-process, a local Dask cluster, or an existing one."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Iterator

from prefect.task_runners import ThreadPoolTaskRunner

from dereverb_data.build import THREAD_VARIABLES

# What a build task imports. Local workers fork from a server that has imported these once,
# instead of each spawned worker importing them itself (2.9 s per worker, measured here).
WORKER_PRELOAD = (
    "distributed",
    "numpy",
    "scipy.signal",
    "pyroomacoustics",
    "zarr",
    "prefect",
    "prefect_dask",
    "dereverb_data.build",
    "flows.build",
)


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _one_thread_environment() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: "1" for name in THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_worker_forkserver() -> None:
    """Make local Dask workers fork from a warm server (started now, importing in the
    background) rather than spawn and import everything themselves.

    The fork server is single-threaded and imports only libraries, so forking from it is safe
    (unlike forking this process, which runs Prefect's threads); Dask's own test suite runs
    this way. Thread limits are read by BLAS and pyroomacoustics at import, so the server is
    started with one thread each. Idempotent; the server lives as long as this process.
    """
    import dask
    from distributed.utils import get_mp_context

    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    context = get_mp_context()  # Dask sets its own preload list on first use: extend it
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    with _one_thread_environment():
        multiprocessing.forkserver.ensure_running()


def task_runner(workers: int | None = None, dask_address: str | None = None):
    """``workers=1``: in-process (for debugging); N > 1: a ``LocalCluster`` of N one-thread
    worker processes; ``dask_address``: an existing scheduler (``tcp://host:port``)."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    workers = workers or default_workers()
    if workers == 1:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    start_worker_forkserver()
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "silence_logs": logging.ERROR,
            "env": {name: "1" for name in THREAD_VARIABLES},
        },
    )
