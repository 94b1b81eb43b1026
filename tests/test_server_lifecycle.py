"""Nothing outlives a run: the Prefect server of a SIGKILLed build ends, and its home goes.

Real processes throughout. Each test uses a private temporary folder (TMPDIR, or
``tempfile.tempdir`` in this process) so that it sees only its own ``dereverb-prefect-*``
homes, not those of other runs on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from flows.server import HOME_PREFIX, OWNER_FILE, prefect_server
from flows.server_watchdog import SERVER_FILE

from .conftest import DEMO_MANIFEST, REPO

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _homes(root: Path) -> list[Path]:
    return sorted(root.glob(f"{HOME_PREFIX}*"))


def _server_tree(parent: psutil.Process, exclude: set[int] = frozenset()) -> list[psutil.Process]:
    """The watchdog among ``parent``'s children (but not those in ``exclude``, e.g. the test
    session's own server), and everything below it."""
    for child in parent.children():
        if child.pid in exclude:
            continue
        with contextlib.suppress(psutil.Error):
            if "flows.server_watchdog" in child.cmdline():
                return [child, *child.children(recursive=True)]
    return []


def _kill_all(processes: list[psutil.Process]) -> None:
    """Test cleanup: whatever the code under test failed to end must not outlive the test."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(processes, timeout=5)


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_sigkilled_build_leaves_no_server_and_no_home(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("PREFECT_API_URL", None)
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    log = (tmp_path / "cli.log").open("wb")
    command = ["build", str(DEMO_MANIFEST), "--store", str(tmp_path / "s.zarr"), "--no-progress"]
    cli = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *command, "--workers", "1"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    tree: list[psutil.Process] = []
    try:
        # The server is up once its home names the port and that port answers.
        def server_up() -> bool:
            for home in _homes(tmp):
                with contextlib.suppress(OSError, ValueError):
                    if _healthy(json.loads((home / OWNER_FILE).read_text())["port"]):
                        return True
            assert cli.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
            return False

        assert _wait_for(server_up, 120), "the build's Prefect server never became healthy"
        (home,) = _homes(tmp)
        tree = _server_tree(psutil.Process(cli.pid))
        names = [" ".join(p.cmdline()) for p in tree]
        assert len(tree) >= 2, names  # the watchdog and the server at least
        assert any("prefect server start" in name for name in names), names

        cli.send_signal(signal.SIGKILL)
        cli.wait()

        assert _wait_for(lambda: not any(map(_running, tree)), 30), [
            " ".join(p.cmdline()) for p in tree if _running(p)
        ]
        assert _wait_for(lambda: not home.exists(), 10), sorted(os.listdir(home))
    finally:
        log.close()
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        _kill_all(tree)


def _owned_home(root: Path, name: str, pid: int, create_time: float) -> Path:
    home = root / f"{HOME_PREFIX}{name}"
    home.mkdir()
    (home / OWNER_FILE).write_text(json.dumps({"pid": pid, "create_time": create_time}))
    return home


def _sleeper(home: Path) -> subprocess.Popen:
    """A stand-in for a server process of ``home``: it has the home as PREFECT_HOME."""
    env = {**os.environ, "PREFECT_HOME": str(home)}
    return subprocess.Popen(SLEEPER, env=env, start_new_session=True)


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Leftovers of dead runs and of a live one, then one ``with prefect_server():`` over them:
    what was there while it ran, and what is left once it exits."""
    root = tmp_path_factory.mktemp("tmp")
    me = psutil.Process()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid is now a dead owner

    dead = _owned_home(root, "dead", finished.pid, time.time() - 60)
    # A server the dead run's watchdog never got to end, recorded in server.json, and a
    # process of its tree found only through its PREFECT_HOME.
    dead_server, dead_child = _sleeper(dead), _sleeper(dead)
    record = {"pid": dead_server.pid, "create_time": psutil.Process(dead_server.pid).create_time()}
    (dead / SERVER_FILE).write_text(json.dumps({"server": record, "pgid": dead_server.pid}))
    # This process's pid, but an earlier create time: the owner died and its pid was reused.
    reused = _owned_home(root, "reused", me.pid, me.create_time() - 1000)
    alive = _owned_home(root, "alive", me.pid, me.create_time())
    alive_server = _sleeper(alive)
    # No owner record: removed once old (and unused), kept while it may still be starting.
    old = root / f"{HOME_PREFIX}old"
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    young = root / f"{HOME_PREFIX}young"
    young.mkdir()
    prepared = {dead, reused, alive, old, young}

    seen: dict = {"prepared": {p.name: p for p in prepared}}
    sleepers = [dead_server, dead_child, alive_server]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tempfile, "tempdir", str(root))
            patch.delenv("PREFECT_API_URL", raising=False)
            earlier = {child.pid for child in me.children()}
            with prefect_server() as api:
                seen["during"] = set(_homes(root))
                seen["api"] = api
                seen["tree"] = _server_tree(me, exclude=earlier)
                seen["tree_names"] = [" ".join(p.cmdline()) for p in seen["tree"]]
                seen["healthy"] = _healthy(int(api.rsplit(":", 1)[1].split("/")[0]))
            seen["after"] = set(_homes(root))
        seen["own"] = seen["during"] - prepared
        seen["sleepers"] = {"dead_server": dead_server, "dead_child": dead_child}
        seen["alive_server_running"] = alive_server.poll() is None
        yield seen
    finally:
        for sleeper in sleepers:
            if sleeper.poll() is None:
                sleeper.kill()
            sleeper.wait()
        _kill_all(seen.get("tree", []))


def test_next_start_removes_dead_runs_and_keeps_live_ones(lifecycle: dict) -> None:
    homes = lifecycle["prepared"]
    during = lifecycle["during"]
    for name in ("dead", "reused", "old"):
        assert homes[f"{HOME_PREFIX}{name}"] not in during, name
    for name in ("alive", "young"):
        assert homes[f"{HOME_PREFIX}{name}"] in during, name
    # The dead run's processes were ended; the live run's was left alone.
    for name, sleeper in lifecycle["sleepers"].items():
        try:
            sleeper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} of the dead run still runs")
    assert lifecycle["alive_server_running"]


def test_normal_exit_leaves_no_process_and_no_home(lifecycle: dict) -> None:
    assert lifecycle["healthy"]
    (own,) = lifecycle["own"]  # the server's home while it ran
    assert own not in lifecycle["after"]
    names = lifecycle["tree_names"]
    assert any("prefect server start" in name for name in names), names
    assert not [p for p in lifecycle["tree"] if _running(p)]
    # Only the live run's leftovers (and the young one) remain.
    kept = {lifecycle["prepared"][f"{HOME_PREFIX}{n}"] for n in ("alive", "young")}
    assert lifecycle["after"] == kept
