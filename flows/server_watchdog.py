"""Run ``prefect server start`` for one parent process, and end it when that parent ends.

``flows.server.start_server`` launches ``python -m flows.server_watchdog`` instead of the
server itself. A parent that is SIGKILLed runs no cleanup code, so the server (about 270 MB,
several processes) and its home folder would outlive it; this process survives the parent and
does the cleanup instead: when the parent is gone it ends the server's whole process group,
then removes the home folder if it was told that it owns it.

It notices the parent's death at once on Linux (``PR_SET_PDEATHSIG`` sends it ``SIGUSR1``)
and otherwise within ``POLL_S`` (its parent pid changes when it is reparented). ``SIGTERM``
asks for a normal stop: the server ends, the home folder stays for the caller to remove.

Only the standard library and psutil are imported: this runs beside every build, and a
light process is quick to start.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SERVER_FILE = "server.json"  # written here: which processes to end if this one is killed
POLL_S = 0.5
GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent thread exits.

    Returns False where that is not available (the caller then relies on polling)."""
    libc = _libc()
    try:
        return libc is not None and libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except AttributeError:
        return False


def _exited(process: subprocess.Popen) -> bool:
    """Whether a child has exited, without reaping it where possible: an unreaped child keeps
    its pid (and so its process group id) from being reused by a stranger."""
    if hasattr(os, "waitid"):
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, process.pid, flags) is not None
        except ChildProcessError:
            return True
    return process.poll() is not None


def write_json(path: Path, record: dict) -> None:
    # Written whole and renamed, so a reader never sees half a record.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants, taken before they are signalled: once the server's
    main process exits its children are reparented and can no longer be found from it."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def is_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end_process_group(
    processes: list[psutil.Process],
    grace_s: float,
    pgid: int | None = None,
    leader: subprocess.Popen | None = None,
) -> None:
    """SIGTERM the processes (and the group ``pgid``), SIGKILL what is left after ``grace_s``.

    ``leader`` (the group's first process, a child of the caller) is reaped only at the end:
    while it is unreaped its pid cannot be reused, so ``killpg(pgid)`` cannot hit a stranger.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not any(map(is_running, processes)) and (pgid is None or not _group_alive(pgid)):
                break
            time.sleep(0.1)
        else:
            continue  # something is still running: SIGKILL
        break
    if leader is not None:
        leader.wait()
    # Reap the caller's own children among them (init reaps the others).
    psutil.wait_procs(processes, timeout=1)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (an unreaped dead leader does not count)."""
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getpgid(process.pid) == pgid and is_running(process):
                return True
    return False


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.server_watchdog", description=__doc__)
    parser.add_argument("--parent", type=int, required=True, help="pid to watch")
    parser.add_argument("--home", type=Path, required=True, help="the server's PREFECT_HOME")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--remove-home", action="store_true", help="remove --home if the parent dies"
    )
    parser.add_argument("--grace", type=float, default=GRACE_S, help="seconds from TERM to KILL")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    stop = {"requested": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["requested"] = True

    # Signals only wake the loop below (through the wakeup fd); it decides what they mean.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, request_stop)
    for signum in (signal.SIGUSR1, signal.SIGCHLD):
        signal.signal(signum, lambda signum, frame: None)
    # SIGUSR1, not SIGTERM: Linux also sends it when only the parent's *thread* that started
    # this process exits, so it means "check the parent", not "stop".
    set_parent_death_signal(signal.SIGUSR1)

    def parent_gone() -> bool:
        return os.getppid() != args.parent

    if parent_gone():  # it died before the death signal was set up
        if args.remove_home:
            shutil.rmtree(args.home, ignore_errors=True)
        return 1

    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(args.port)],
        # Its own session and group: one killpg ends all of it and nothing else, and signals
        # meant for a terminal's foreground group do not reach it.
        start_new_session=True,
        # If this watchdog is SIGKILLed, the server still hears of it.
        preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM),
    )
    with contextlib.suppress(psutil.Error, OSError):
        me = psutil.Process()
        record = {
            "watchdog": {"pid": me.pid, "create_time": me.create_time()},
            "server": {"pid": server.pid, "create_time": psutil.Process(server.pid).create_time()},
            "pgid": server.pid,
            "port": args.port,
        }
        write_json(args.home / SERVER_FILE, record)

    code = 0
    while True:
        if stop["requested"]:
            break
        if parent_gone():
            print(f"server_watchdog: parent {args.parent} is gone; stopping the server", flush=True)
            break
        if _exited(server):
            code = 1  # it stopped by itself (its log, beside this output, says why)
            break
        select.select([wake_r], [], [], POLL_S)
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_r, 512):
                pass

    end_process_group(process_tree(server.pid), args.grace, pgid=server.pid, leader=server)
    if code:
        code = server.returncode or 1
    if parent_gone() and args.remove_home:
        shutil.rmtree(args.home, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
