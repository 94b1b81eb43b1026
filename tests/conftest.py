"""Shared fixtures: a real local Prefect server and the demo store built through the flow."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports Prefect: its own home in a temporary folder, no telemetry. Dask
# workers that run a test's function import this module too; they inherit the session's home
# (and exit without atexit handlers, so a folder of their own would be left behind).
_HOME_PREFIX = "dereverb-test-prefect-"
if Path(os.environ.get("PREFECT_HOME", "")).name.startswith(_HOME_PREFIX):
    _PREFECT_HOME = os.environ["PREFECT_HOME"]
else:
    _PREFECT_HOME = tempfile.mkdtemp(prefix=_HOME_PREFIX)
    atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
# A user's persistent `dereverb ui` server (under ~/.dereverb) must not be reused by the tests.
os.environ["DEREVERB_HOME"] = str(Path(_PREFECT_HOME) / "dereverb-home")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
for _name in ("PRA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_name] = "1"

REPO = Path(__file__).resolve().parents[1]
DEMO_MANIFEST = REPO / "manifests" / "demo.yaml"


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real ``prefect server`` on 127.0.0.1 for the whole session (one start: ~10 s)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import start_server, stop_server

    process, api_url = start_server(Path(_PREFECT_HOME) / "server")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        from flows.server import _flush_logs

        _flush_logs()
        stop_server(process)


@pytest.fixture(scope="session")
def demo_store(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """manifests/demo.yaml built through the real Prefect flow (in-process task runner)."""
    from flows.build import run_build

    url = str(tmp_path_factory.mktemp("stores") / "demo.zarr")
    report = run_build(str(DEMO_MANIFEST), url, workers=1)
    assert report["counts"]["shards_rendered"] == report["summary"]["shards"]
    return url


def run_cli(*args: str, api_url: str | None = None) -> subprocess.CompletedProcess:
    """``dereverb`` as a user runs it, in a real process; Prefect only where ``api_url`` says."""
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
