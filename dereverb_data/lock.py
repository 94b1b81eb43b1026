"""One writer per store: a lock file naming its holder, with safe takeover of stale locks.

The lock lives at ``<store>/_build/lock.json`` and records host, pid, the process's start time
and when the build started. A second build is refused with a message naming the holder. A lock
whose holder is dead (same host, no such process, or a different process reusing the pid) is
stale and is taken over; the exclusive create means two builds racing for a stale lock cannot
both win. A lock held from another host cannot be checked from here, so it is refused, and the
message says how to break it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import psutil

from .store import BUILD_DIR, StoreError


class StoreLocked(StoreError):
    """Another live build holds the store."""


def _me() -> dict:
    process = psutil.Process()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_started": process.create_time(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }


def holder_alive(holder: dict) -> bool | None:
    """True/False on this host; None when the holder is on another host (unknowable here)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        process = psutil.Process(int(holder["pid"]))
        return abs(process.create_time() - float(holder["process_started"])) < 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return False


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, text: str) -> bool:
    if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return True
    # Object stores have no exclusive create; check-then-write narrows, not closes, the race.
    if fs.exists(path):
        return False
    with fs.open(path, "w") as handle:
        handle.write(text)
    return True


@contextlib.contextmanager
def build_lock(store_url: str, break_lock: bool = False) -> Iterator[dict]:
    """Hold the store's build lock for the duration of the block."""
    fs, root = fsspec.core.url_to_fs(store_url.rstrip("/"))
    path = f"{root}/{BUILD_DIR}/lock.json"
    me = _me()
    for _ in range(3):
        if _create_exclusive(fs, path, json.dumps(me)):
            break
        try:
            with fs.open(path, "r") as handle:
                holder = json.load(handle)
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.2)  # being written or removed right now: look again
            continue
        alive = holder_alive(holder)
        if alive is True or (alive is None and not break_lock):
            hint = "" if alive else " (on another host: rerun with --break-lock if it is dead)"
            raise StoreLocked(
                f"{store_url}: another build holds this store ({_describe(holder)}){hint}"
            )
        # Stale: remove it only if it is still the same stale lock, then race fairly for it.
        with contextlib.suppress(FileNotFoundError), fs.open(path, "r") as handle:
            if json.load(handle).get("token") == holder.get("token"):
                fs.rm(path)
    else:
        raise StoreLocked(f"{store_url}: could not take the build lock; try again")
    try:
        yield me
    finally:
        with (
            contextlib.suppress(FileNotFoundError, json.JSONDecodeError),
            fs.open(path, "r") as handle,
        ):
            if json.load(handle).get("token") == me["token"]:
                fs.rm(path)
