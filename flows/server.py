"""A real local Prefect server for runs that need one.

Flows with worker processes must talk to one API: without ``PREFECT_API_URL`` each process
starts its own temporary server, which is slow and fails with SQLite "database is locked".
``prefect_server()`` uses ``PREFECT_API_URL`` when it is set, then a running persistent
server (``dereverb ui``), and otherwise starts ``prefect server start --host 127.0.0.1`` on a
free port, waits until healthy, and stops it.

Every server started here tells its web UI its own API address (``PREFECT_SERVER_UI_API_URL``):
Prefect derives it from ``PREFECT_SERVER_API_PORT`` (4200), not from ``--port``, so the UI of a
server on another port could not reach its API.

The persistent server (``persistent_server()``, run by ``dereverb ui`` in the foreground until
Ctrl-C) keeps its home, and so its runs and artifacts, in ``$DEREVERB_HOME/prefect``
(default ``~/.dereverb/prefect``). While it runs, ``ui.json`` there names its URL and the pid
of its ``dereverb ui``; other commands use it when that process is alive and the API healthy.

Nothing outlives a run, even a SIGKILLed one: the server is started by a watchdog process
(``flows.server_watchdog``) that ends it, and removes its temporary home, when the process
that started it dies. Each home ``dereverb-prefect-*`` holds an owner record (``owner.json``:
pid and create time); every ``prefect_server()`` start removes the homes, and ends the
processes, of owners that are gone, in case a watchdog was killed too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from .server_watchdog import (
    GRACE_S,
    SERVER_FILE,
    end_process_group,
    is_running,
    process_tree,
    write_json,
)

HOME_PREFIX = "dereverb-prefect-"
OWNER_FILE = "owner.json"
UI_STATE_FILE = "ui.json"  # the persistent server's URL and owner, while it runs
UI_LOCK_FILE = "ui.lock"  # held by the one ``dereverb ui`` that serves a home
DEFAULT_UI_PORT = 4200
# psutil derives create times from boot time and clock ticks: equal for one process, and a
# pid is not reused within this time.
_CREATE_TIME_TOLERANCE_S = 0.5

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


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be bound now (nothing listens there)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def is_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def ui_url(api_url: str) -> str:
    """The web UI's address for a local server's API URL."""
    return api_url.removesuffix("/").removesuffix("/api")


def wait_healthy(
    api_url: str, timeout_s: float = 90.0, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited early with code {process.returncode}")
        if is_healthy(api_url):
            return
        time.sleep(0.3)
    raise RuntimeError(f"the Prefect server at {api_url} did not become healthy in {timeout_s} s")


def _log_tail(home: Path, chars: int = 2000) -> str:
    try:
        return (home / "server.log").read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def start_server(
    home: Path, port: int | None = None, *, owns_home: bool = False
) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME; return its URL.

    The process returned is the server's watchdog: pass it to ``stop_server``. If this
    process dies first, the watchdog ends the server, and removes ``home`` if ``owns_home``.
    """
    port = port or _free_port()
    home.mkdir(parents=True, exist_ok=True)
    me = psutil.Process()
    # First, so that a home is never without an owner for a later start's cleanup to judge.
    write_json(home / OWNER_FILE, {"pid": me.pid, "create_time": me.create_time(), "port": port})
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    # The UI asks /ui-settings where the API is; left alone, the answer is port 4200. A
    # user's PREFECT_UI_API_URL (meant for their own server) would be as wrong here.
    env.pop("PREFECT_UI_API_URL", None)
    env["PREFECT_SERVER_UI_API_URL"] = api_url
    env["PREFECT_UI_URL"] = ui_url(api_url)  # links the server itself makes
    command = [sys.executable, "-m", "flows.server_watchdog"]
    command += ["--parent", str(me.pid), "--home", str(home), "--port", str(port)]
    if owns_home:
        command.append("--remove-home")
    with (home / "server.log").open("ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a signal for this process's group (Ctrl-C, or a SIGKILL of the
            # whole group) does not take the watchdog with it, which then cleans up.
            start_new_session=True,
        )
    try:
        wait_healthy(api_url, process=process)
    except Exception as exc:
        stop_server(process)
        raise RuntimeError(f"{exc}; its log ends:\n{_log_tail(home)}") from exc
    return process, api_url


def stop_server(process: subprocess.Popen, timeout_s: float = GRACE_S + 10) -> None:
    """Stop a server from ``start_server`` and every process it started."""
    # Taken first: if the watchdog fails, its server is found through it no longer.
    tree = process_tree(process.pid)[1:]
    if process.poll() is None:
        process.terminate()  # the watchdog's normal stop
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    left = [p for p in tree if is_running(p)]
    if left:
        end_process_group(left, grace_s=5.0)


def _read_owner(folder: Path) -> dict | None:
    """The owner record, or None where there is none (yet) or it cannot be read."""
    try:
        record = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    pid, created = record.get("pid"), record.get("create_time")
    if not isinstance(pid, int) or not isinstance(created, int | float):
        return None
    return record


def _same_process(pid: int, create_time: float) -> psutil.Process | None:
    """The live process ``pid`` if it is the one recorded (not a later one given its pid)."""
    try:
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE
        same = abs(process.create_time() - create_time) < _CREATE_TIME_TOLERANCE_S
    except psutil.Error:
        return None
    return process if alive and same else None


def _owner_alive(owner: dict) -> bool:
    try:
        psutil.Process(owner["pid"]).create_time()
    except psutil.AccessDenied:
        return True  # cannot tell: count it as alive, so its home stays
    except psutil.Error:
        return False
    return _same_process(owner["pid"], owner["create_time"]) is not None


def _processes_by_home(root: Path) -> dict[str, list[psutil.Process]]:
    """Live processes whose PREFECT_HOME is a ``dereverb-prefect-*`` folder under ``root``:
    the server's whole tree has it, whatever was (or was not) recorded."""
    prefix = str(root / HOME_PREFIX)
    found: dict[str, list[psutil.Process]] = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            home = process.environ().get("PREFECT_HOME", "")
            if home.startswith(prefix) and is_running(process):
                found.setdefault(os.path.realpath(home), []).append(process)
    return found


def _recorded_processes(folder: Path) -> tuple[list[psutil.Process], int | None]:
    """The watchdog and server named in ``server.json`` that still run, with their
    descendants, and the server's process group if its leader still runs."""
    try:
        record = json.loads((folder / SERVER_FILE).read_text())
    except (OSError, ValueError):
        return [], None
    processes: list[psutil.Process] = []
    pgid = None
    for role in ("watchdog", "server"):
        entry = record.get(role) if isinstance(record, dict) else None
        with contextlib.suppress(AttributeError, TypeError, psutil.Error):
            process = _same_process(int(entry["pid"]), float(entry["create_time"]))
            if process is not None:
                processes += process_tree(process.pid)
                if role == "server":
                    pgid = process.pid
    return processes, pgid


def clean_leftovers(tmpdir: str | Path | None = None, min_age_s: float = 60.0) -> list[Path]:
    """End the processes of, and remove, ``dereverb-prefect-*`` homes whose owner is gone.

    A home whose owner still runs is never touched. One with no owner record is either being
    created right now or was left by a version that wrote none: it is removed only once older
    than ``min_age_s`` and used by no live process. Returns the folders removed.
    """
    root = Path(tmpdir or tempfile.gettempdir())
    removed: list[Path] = []
    users: dict[str, list[psutil.Process]] | None = None
    for folder in sorted(root.glob(f"{HOME_PREFIX}*")):
        try:
            info = folder.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue  # not a folder we made (or another user's: not ours to judge)
        owner = _read_owner(folder)
        if owner is not None and _owner_alive(owner):
            continue
        if owner is None and time.time() - info.st_mtime < min_age_s:
            continue
        if users is None:  # reading every process's environment: only when needed
            users = _processes_by_home(root)
        using = users.get(os.path.realpath(folder), [])
        if owner is None and using:
            continue  # someone's server runs there, and we cannot tell whose
        recorded, pgid = _recorded_processes(folder)
        processes = list({p.pid: p for p in [*recorded, *using]}.values())
        if processes or pgid is not None:
            end_process_group(processes, grace_s=5.0, pgid=pgid)
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


_TEMPORARY_URLS: set[str] = set()  # servers that prefect_server() started and will stop


def is_temporary(api_url: str) -> bool:
    """Whether ``api_url`` is a server that stops with this command (its links will not open)."""
    return api_url in _TEMPORARY_URLS


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """Yield an API URL: the configured one, the persistent server's (``dereverb ui``) if one
    runs, or a server started (and stopped) here."""
    quiet_prefect()
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    persistent = find_persistent_server()
    if persistent is not None:
        with _using(persistent):
            yield persistent
        return
    try:
        clean_leftovers()
    except Exception as exc:  # a failed cleanup of old runs must not stop this one
        print(f"warning: could not clean up old Prefect servers: {exc}", file=sys.stderr)
    home = Path(tempfile.mkdtemp(prefix=HOME_PREFIX))
    try:
        process, api_url = start_server(home, owns_home=True)
        _TEMPORARY_URLS.add(api_url)
        try:
            with _using(api_url):
                yield api_url
        finally:
            _TEMPORARY_URLS.discard(api_url)
            stop_server(process)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def _using(api_url: str) -> Iterator[None]:
    """Point this process, and the worker processes it starts, at ``api_url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # The environment variable reaches worker processes started from here on; the settings
    # context reaches this process, whose Prefect settings are already loaded.
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield
    finally:
        _flush_logs()
        os.environ.pop("PREFECT_API_URL", None)


class PersistentServerError(RuntimeError):
    """The persistent server cannot be started (port taken, another ``dereverb ui``)."""


def persistent_home() -> Path:
    """``$DEREVERB_HOME/prefect``, by default ``~/.dereverb/prefect``: a home that is kept,
    unlike the temporary ones, so runs stay visible from one ``dereverb ui`` to the next."""
    base = os.environ.get("DEREVERB_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".dereverb") / "prefect"


def _read_ui_state(home: Path) -> dict | None:
    try:
        record = json.loads((home / UI_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("api_url"), str):
        return None
    if not isinstance(record.get("pid"), int) or not isinstance(
        record.get("create_time"), int | float
    ):
        return None
    return record


def find_persistent_server(home: Path | None = None) -> str | None:
    """The API URL of the persistent server of ``home`` if it runs and is healthy, else None.

    Its ``dereverb ui`` must be the very process recorded (a dead one's pid may be reused),
    and the API must answer: a state file left by a SIGKILLed run names neither.
    """
    record = _read_ui_state(home or persistent_home())
    if record is None or _same_process(record["pid"], record["create_time"]) is None:
        return None
    return record["api_url"] if is_healthy(record["api_url"]) else None


@contextlib.contextmanager
def persistent_server(
    port: int = DEFAULT_UI_PORT, home: Path | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run the persistent server on ``port`` for as long as the block runs; yield its watchdog
    (which exits if the server stops by itself) and its API URL.

    The server's watchdog watches this process, so the server ends with it, even if it is
    SIGKILLed; the home (database, runs, artifacts) is kept for the next time.
    """
    import fcntl  # POSIX only, like the watchdog

    home = home or persistent_home()
    home.mkdir(parents=True, exist_ok=True)
    quiet_prefect()
    with (home / UI_LOCK_FILE).open("a+") as lock:
        try:
            # Released by the kernel however this process ends: a stale lock cannot exist.
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise PersistentServerError(
                f"{home}: a `dereverb ui` (pid {holder}) is starting or stopping its server; "
                "try again in a moment"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        if not port_is_free(port):
            raise PersistentServerError(
                f"--port {port}: 127.0.0.1:{port} is in use; pass another --port, or if it is "
                f"a Prefect server of yours, export PREFECT_API_URL=http://127.0.0.1:{port}/api"
            )
        process, api_url = start_server(home, port)
        try:
            me = psutil.Process()
            # Written only once the API answers, so a finder never gets a server still starting.
            state = {
                "api_url": api_url,
                "ui_url": ui_url(api_url),
                "pid": me.pid,
                "create_time": me.create_time(),
                "watchdog_pid": process.pid,
            }
            write_json(home / UI_STATE_FILE, state)
            yield process, api_url
        finally:
            # First: a command starting now must not pick a server that is going away.
            with contextlib.suppress(OSError):
                (home / UI_STATE_FILE).unlink()
            stop_server(process)


def _flush_logs() -> None:
    """Send buffered run logs while the server is still up (they go in the background)."""
    from prefect.logging.handlers import APILogWorker

    # A log we cannot send must not fail a finished build.
    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=10)
