"""The build's local Dask cluster: worker processes that fork from a warm server.

Spawned workers each import Prefect, scipy, pyroomacoustics and the library before their first
task (2.3-2.9 s per worker here, paid by every build command). Dask can instead fork workers
from a ``multiprocessing`` fork server that imported those modules once; the server is started
when the flow enters its task runner, so its imports overlap the planning step. The server is
single-threaded and holds no Prefect state, so forking from it is safe (forking this process,
which runs Prefect's threads, would not be); Dask's own test suite runs its workers this way.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prefect_dask import DaskTaskRunner

from dereverb_data.build import THREAD_VARIABLES

# What a build task needs; the fork server imports them once, every worker inherits them.
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
    "flows.worker_preload",
)

# Dask's housekeeping, made quieter for the clusters the build starts itself. By default every
# scheduler, nanny and worker checks its event loop 50 times a second, and every worker samples
# its own stack 100 times a second for the dashboard's profile page (these clusters have no
# dashboard). On 2 cores an idle 2-worker cluster used 2.4 CPU-s per 20 s with the defaults and
# 0.4 with these (scratch measurement, see benchmarks/RESULTS.md): CPU the workers' tasks get
# back. Clusters given by address keep their own configuration.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "200ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """``LocalCluster`` arguments of the build's local cluster: ``workers`` one-thread worker
    processes, no dashboard, Dask's INFO lines off, one BLAS/pyroomacoustics thread each."""
    return {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        # No dashboard, but the scheduler still serves /health over HTTP, on 8787 unless told
        # otherwise: a second build (or a user's own cluster) there made Dask warn.
        "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
        "silence_logs": logging.ERROR,
        "env": {name: "1" for name in THREAD_VARIABLES},
        # Each worker: no heartbeat traceback while it closes (see the module's docstring).
        "preload": ["flows.worker_preload"],
    }


@contextlib.contextmanager
def _one_thread_environment() -> Iterator[None]:
    """BLAS and pyroomacoustics read their thread counts at import, i.e. in the fork server."""
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


@contextlib.contextmanager
def _sigint_ignored_by_children() -> Iterator[None]:
    """SIGINT ignored while the fork server starts, so it and every worker it forks ignore it.

    Ctrl-C on a terminal (how ``dereverb serve`` is stopped) sends SIGINT to the whole process
    group, the workers included: each died on its own, printing a KeyboardInterrupt traceback
    and CommClosedError tracebacks for the connections it dropped, before the cluster could
    close it. An ignored signal stays ignored across fork and exec (Python then installs no
    KeyboardInterrupt handler), so only the process that owns the cluster gets Ctrl-C, and it
    closes the cluster in order, which ends the workers. Signal handlers can only be changed
    in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_worker_forkserver() -> None:
    """Have local Dask workers fork from a fork server preloaded with ``WORKER_PRELOAD``.

    Returns at once: the server imports in the background. Idempotent; it lives as long as
    this process, so later clusters in the same process (a notebook, a test session) start
    their workers without imports.
    """
    import dask
    from distributed.utils import get_mp_context

    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    context = get_mp_context()  # Dask sets its preload list on first use; replace it with ours
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    with _one_thread_environment(), _sigint_ignored_by_children():
        multiprocessing.forkserver.ensure_running()


# The local clusters this process created, for close_local_clusters (Ctrl-C).
_CREATED_CLIENTS: weakref.WeakSet = weakref.WeakSet()


class LocalDaskTaskRunner(DaskTaskRunner):
    """``DaskTaskRunner`` on a ``LocalCluster`` whose workers fork from a warm server."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cluster_asked_for = False

    @property
    def cluster_asked_for(self) -> bool:
        """Whether the cluster exists or is being created (``client`` was asked for)."""
        return self._cluster_asked_for

    def __enter__(self):
        # Prefect also enters the flow's task runner around each task run on a worker, where
        # no cluster is created: a fork server there would only compete with the task for CPU.
        if not _inside_dask_worker():
            start_worker_forkserver()
        return super().__enter__()

    @property
    def client(self):
        """prefect-dask creates the cluster on first access: with ``LOCAL_CLUSTER_CONFIG``
        (the nannies hand the configuration they were created with to their workers)."""
        if self._cluster_asked_for:
            return super().client
        self._cluster_asked_for = True
        import dask

        with dask.config.set(LOCAL_CLUSTER_CONFIG):
            client = super().client
        _CREATED_CLIENTS.add(client)
        return client


def close_local_clusters() -> None:
    """Close, in Dask's order (workers, then the scheduler), every local cluster this process
    created and has not closed yet; what their tasks were running fails at once.

    For Ctrl-C: the flow runs in another thread, which no signal reaches, and the workers
    ignore SIGINT (see ``_sigint_ignored_by_children``), so this is how a stop reaches them.
    """
    for client in list(_CREATED_CLIENTS):
        cluster = client.cluster
        if cluster is not None and cluster.status.name not in ("closing", "closed"):
            cluster.close()


class ClusterStart:
    """A cold local cluster being created in a background thread.

    Starting the cluster takes seconds (the fork server's imports, then the workers), during
    which the flow's own process would only wait; the flow works meanwhile and checks
    ``ready``. ``wait()`` re-raises the error if the cluster failed to start.
    """

    def __init__(self, runner: LocalDaskTaskRunner) -> None:
        self.ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._create, args=(runner,), name="dask-cluster-start", daemon=True
        )
        self._thread.start()

    def _create(self, runner: LocalDaskTaskRunner) -> None:
        try:
            runner.client  # noqa: B018 - prefect-dask creates the cluster on first access
        except BaseException as error:  # handed to the flow's thread by wait()
            self._error = error
        finally:
            self.ready.set()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def start_cluster_in_background(runner: object) -> ClusterStart | None:
    """Begin creating the flow's local cluster unless it exists or is not ours to create
    (an in-process runner, or an existing cluster given by address)."""
    if isinstance(runner, LocalDaskTaskRunner) and not runner.cluster_asked_for:
        return ClusterStart(runner)
    return None


def planned_slots(runner: LocalDaskTaskRunner) -> int:
    """How many tasks the local cluster will run at once, known before it exists."""
    kwargs = runner.cluster_kwargs
    return max(1, int(kwargs.get("n_workers", 1)) * int(kwargs.get("threads_per_worker", 1)))


def _inside_dask_worker() -> bool:
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def served_cluster(workers: int | None, dask_address: str | None) -> Iterator[str | None]:
    """The Dask address a long-lived process (``dereverb serve``) gives its build runs.

    Without an address, and unless ``workers == 1`` (in-process), start a ``LocalCluster``
    for the life of the process: each served run then connects to warm workers instead of
    starting and importing its own, which dominated small regenerations.
    """
    if dask_address or workers == 1:
        yield dask_address
        return
    import dask
    from distributed import LocalCluster

    start_worker_forkserver()
    with dask.config.set(LOCAL_CLUSTER_CONFIG):
        # One worker per core by default, as flows.runners.task_runner (not imported: the two
        # modules must not import each other).
        cluster = LocalCluster(**local_cluster_kwargs(workers or max(1, os.cpu_count() or 1)))
    with cluster:
        yield cluster.scheduler_address
