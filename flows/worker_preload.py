"""Dask worker preload of the build's local clusters (``LocalCluster(preload=[__name__])``).

A Dask worker that is closing stops its heartbeat callback but does not wait for a heartbeat
already in flight; it then closes its connections, and that heartbeat fails with
``CommClosedError``, which the worker logs as an ERROR with a traceback ("Failed to
communicate with scheduler during heartbeat"), intermittently, at the end of a successful
build (dask/distributed#7105). Dask runs a preload's ``dask_teardown`` while the worker closes,
before it closes its connections: from then on this worker is leaving, so that one record is
dropped. A heartbeat that fails while the worker runs is still logged.
"""

from __future__ import annotations

import logging

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat."


def _not_a_heartbeat_failure(record: logging.LogRecord) -> bool:
    return record.getMessage() != HEARTBEAT_FAILED


def dask_teardown(worker: object) -> None:
    """The worker is closing: a heartbeat that fails from now on is its own doing."""
    logging.getLogger("distributed.worker").addFilter(_not_a_heartbeat_failure)
