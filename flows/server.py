"""A real local Prefect server for runs that need one.

Flows with worker processes must talk to one API: without ``PREFECT_API_URL`` each process
starts its own temporary server, which is slow and fails with SQLite "database is locked".
``prefect_server()`` uses ``PREFECT_API_URL`` when it is set, and otherwise starts
``prefect server start --host 127.0.0.1`` on a free port, waits until healthy, and stops it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
}


def quiet_prefect() -> None:
    """No telemetry (there is no network here, and users may not want it)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(
    api_url: str, timeout_s: float = 90.0, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the Prefect server at {api_url} did not become healthy in {timeout_s} s")


def start_server(home: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME; return its URL."""
    port = port or _free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    log = (home / "server.log").open("ab")
    process = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api_url, process=process)
    except Exception:
        stop_server(process)
        raise
    return process, api_url


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """Yield an API URL: the configured one, or a server started (and stopped) here."""
    quiet_prefect()
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with tempfile.TemporaryDirectory(prefix="dereverb-prefect-") as home:
        process, api_url = start_server(Path(home))
        # The environment variable reaches worker processes started from here on; the
        # settings context reaches this process, whose Prefect settings are already loaded.
        os.environ["PREFECT_API_URL"] = api_url
        try:
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                yield api_url
        finally:
            _flush_logs()
            os.environ.pop("PREFECT_API_URL", None)
            stop_server(process)


def _flush_logs() -> None:
    """Send buffered run logs while the server is still up (they go in the background)."""
    from prefect.logging.handlers import APILogWorker

    # A log we cannot send must not fail a finished build.
    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=10)
