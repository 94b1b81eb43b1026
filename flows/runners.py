"""Choosing where mapped tasks run: in-process, a local Dask cluster, or an existing one."""

from __future__ import annotations

import logging
import os

from prefect.task_runners import ThreadPoolTaskRunner

from dereverb_data.build import THREAD_VARIABLES


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def task_runner(workers: int | None = None, dask_address: str | None = None):
    """``workers=1``: in-process (for debugging); N > 1: a ``LocalCluster`` of N one-thread
    worker processes; ``dask_address``: an existing scheduler (``tcp://host:port``)."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    workers = workers or default_workers()
    if workers == 1:
        return ThreadPoolTaskRunner(max_workers=1)
    from .local_dask import LocalDaskTaskRunner

    return LocalDaskTaskRunner(
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
