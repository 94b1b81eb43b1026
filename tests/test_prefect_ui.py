"""A Prefect UI that works: a server tells its UI its own API address, and ``dereverb ui``
keeps a server (and so runs and artifacts) for later commands to use and for a user to open.

Real servers and real ``dereverb`` processes. Each test has a private DEREVERB_HOME and TMPDIR,
so it sees neither a user's persistent server nor other runs' temporary ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from flows.server import (
    UI_STATE_FILE,
    _free_port,
    find_persistent_server,
    start_server,
    stop_server,
    ui_url,
)

from .conftest import DEMO_MANIFEST, REPO


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post_json(url: str, body: dict) -> object:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _using_home(home: Path) -> list[psutil.Process]:
    """Live processes whose PREFECT_HOME is ``home``: the server's whole tree has it."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("PREFECT_HOME") == str(home) and _running(process):
                found.append(process)
    return found


def _kill_all(processes: list[psutil.Process]) -> None:
    """Test cleanup: whatever the code under test failed to end must not outlive the test."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(processes, timeout=5)


def test_ui_settings_name_the_servers_own_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's UI API URL is meant for their own server, not for one on a port chosen here.
    monkeypatch.setenv("PREFECT_UI_API_URL", "http://127.0.0.1:4200/api")
    process, api_url = start_server(tmp_path / "home")
    try:
        settings = _get_json(f"{ui_url(api_url)}/ui-settings")
    finally:
        stop_server(process)
    assert api_url != "http://127.0.0.1:4200/api"  # a free port, so the default would be wrong
    assert settings["api_url"] == api_url


@pytest.fixture
def private_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user with no PREFECT_API_URL, and this test's own folders."""
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "DEREVERB_HOME": str(tmp_path / "dereverb"),
        "TMPDIR": str(tmp_path / "tmp"),
    }
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture
def ui_process(private_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """``dereverb ui`` running in the background, with its API URL and Prefect home."""
    home = Path(private_env["DEREVERB_HOME"]) / "prefect"
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--port", str(_free_port())],
        cwd=REPO,
        env=private_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        api = None
        while api is None and time.monotonic() < deadline and process.poll() is None:
            api = find_persistent_server(home)
            time.sleep(0.3)
        assert api is not None, f"dereverb ui did not start: {process.communicate(timeout=30)}"
        started = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
        yield process, api, home
    finally:
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=60)
        _kill_all([*started, *_using_home(home)])


def test_dereverb_ui_keeps_a_builds_run_after_the_command(
    ui_process: tuple[subprocess.Popen, str, Path],
    private_env: dict[str, str],
    tmp_path: Path,
) -> None:
    process, api, home = ui_process
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    assert any("server" in p.cmdline() and "start" in p.cmdline() for p in tree[1:])
    # The persistent server's UI can reach its API too.
    assert _get_json(f"{ui_url(api)}/ui-settings")["api_url"] == api

    # A second `dereverb ui` finds it instead of starting another.
    again = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ui", "--port", str(_free_port())],
        cwd=REPO,
        env=private_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert f"already running at {ui_url(api)}" in again.stdout

    store = tmp_path / "demo.zarr"
    command = ["build", str(DEMO_MANIFEST), "--store", str(store), "--workers", "1"]
    build = subprocess.run(
        [sys.executable, "-m", "flows.cli", *command, "--no-progress"],
        cwd=REPO,
        env=private_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    link = re.search(rf"{re.escape(ui_url(api))}/runs/flow-run/([0-9a-f-]{{36}})", build.stdout)
    assert link is not None, build.stdout
    run_id = link.group(1)
    # It used the persistent server: it started no temporary one (nor left its home).
    assert not list((tmp_path / "tmp").glob("dereverb-prefect-*"))

    # After the command has exited, its run and artifact are on the persistent server.
    runs = _post_json(f"{api}/flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    assert len(runs) == 1
    assert runs[0]["state_type"] == "COMPLETED"
    assert runs[0]["parameters"]["store_url"] == str(store)
    artifacts = _post_json(
        f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    )
    assert [a["key"] for a in artifacts] == ["dataset-build"]

    # Stopped as by Ctrl-C or `kill`: nothing is left running, and the home (runs) stays.
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"Prefect UI at {ui_url(api)}" in out
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not [p for p in alive if _running(p)]
    assert not _using_home(home)
    assert not (home / UI_STATE_FILE).exists()
    assert find_persistent_server(home) is None
    assert (home / "prefect.db").exists()
