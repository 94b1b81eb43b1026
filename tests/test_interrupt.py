"""Ctrl-C during a build on a local Dask cluster: one line, exit 130, finished shards kept,
the same command resumes. A real ``dereverb build`` process, SIGINT to its process group as a
terminal sends it (the workers included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dereverb_data.verify import verify_store

from .conftest import DEMO_MANIFEST, REPO, run_cli

# Ctrl-C handling even when the tests run in a background job (SIGINT ignored there).
_SCRIPT = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from flows.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _wait_for_first_shard(store: Path, process: subprocess.Popen, timeout_s: float) -> None:
    markers = store / "_build" / "shards"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if markers.is_dir() and any(p.suffix == ".json" for p in markers.iterdir()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no shard finished in {timeout_s} s (exit {process.poll()})")


def test_ctrl_c_during_a_two_worker_build_is_one_line_and_resumable(tmp_path: Path) -> None:
    store = tmp_path / "demo.zarr"
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)  # its own temporary server, as a user's first build
    env.pop("DEREVERB_DEBUG", None)
    command = ["build", str(DEMO_MANIFEST), "--store", str(store), "--workers", "2"]
    process = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, *command],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_first_shard(store, process, timeout_s=300)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == 130, stderr[-3000:]
    assert stderr == "interrupted\n", stderr[-3000:]  # no worker or logging tracebacks
    assert "built" not in stdout
    kept = len(list((store / "_build" / "shards").glob("*.json")))
    assert kept >= 1

    resumed = run_cli("build", str(DEMO_MANIFEST), "--store", str(store), "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert f"shards_kept {kept}" in resumed.stdout, resumed.stdout
    assert verify_store(str(store)).ok
