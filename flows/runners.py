"""Choosing where mapped tasks run: in-process, a local Dask cluster, or an existing one."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from prefect.task_runners import ThreadPoolTaskRunner


class ClusterError(RuntimeError):
    """The Dask scheduler given by address cannot be used; the message names it."""


def check_scheduler(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at a ``tcp://host:port`` address
    (Dask itself retries for 30 s and then fails with a chain of tracebacks)."""
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("tcp", "tls") or not parsed.hostname or not parsed.port:
        raise ClusterError(f"--dask-address {address!r}: expected tcp://HOST:PORT")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(
            f"--dask-address {address}: no Dask scheduler reachable ({exc.strerror or exc})"
        ) from None


class InProcessTaskRunner(ThreadPoolTaskRunner):
    """Prefect's thread pool, saying how many tasks it runs at once (``slots``), which the
    build's scheduling reads (Prefect keeps it in a private attribute)."""

    def __init__(self, max_workers: int | None = None) -> None:
        super().__init__(max_workers=max_workers)
        self.slots = max_workers or default_workers()


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def starts_local_cluster(workers: int | None, dask_address: str | None) -> bool:
    """Whether ``task_runner(workers, dask_address)`` creates a local Dask cluster."""
    return not dask_address and (workers or default_workers()) > 1


def task_runner(workers: int | None = None, dask_address: str | None = None):
    """``workers=1``: in-process (for debugging); N > 1: a ``LocalCluster`` of N one-thread
    worker processes; ``dask_address``: an existing scheduler (``tcp://host:port``)."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        check_scheduler(dask_address)
        return DaskTaskRunner(address=dask_address)
    if not starts_local_cluster(workers, None):
        return InProcessTaskRunner(max_workers=1)
    from .local_dask import LocalDaskTaskRunner, local_cluster_kwargs

    return LocalDaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs=local_cluster_kwargs(workers or default_workers()),
    )
