"""One writer per store: a lock file naming its holder, with safe takeover of stale locks.

The lock lives at ``<store>/_build/lock.json`` and records host, pid, the process's start time
and when the build started. A second build is refused with a message naming the holder. A lock
whose holder is dead (same host, no such process, or a different process reusing the pid) is
stale and is taken over; the exclusive create means two builds racing for a stale lock cannot
both win. A lock held from another host cannot be checked from here, so it is refused, and the
message says how to break it.

On local disk the lock is written to a temporary file and hard-linked into place, so it is
never seen empty or half-written. On object stores it is one conditional PUT (``If-None-Match:
*``, through fsspec's ``pipe_file(mode="create")``): S3 creates it only if no lock object
exists, atomically, and a PUT is never seen half-written; filesystems without conditional
writes fall back to fsspec's check-then-write. Either way the lock is read back and counts as
taken only if it carries this build's token: where a server ignores the condition, the later
of two racing PUTs wins and the earlier build sees a token that is not its own (unless it read
back within the milliseconds before that PUT landed). A lock file that does not parse
(damaged) names no holder: once it is old enough not to be a write in progress, it is refused
with a message pointing at ``--break-lock``, and taken over with it.
"""

from __future__ import annotations

import contextlib
import errno
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

from .fsio import is_local, read_bytes, remove_file, url_to_fs
from .store_format import BUILD_DIR, StoreError


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


LOCK_FILE = "lock.json"
# A lock file this young that does not parse may be a write in progress (the exclusive-create
# fallbacks write it in place: no hard links, or a filesystem without conditional writes);
# older than this, it is a leftover and is reported or, with --break-lock, taken over.
UNREADABLE_GRACE_S = 5.0
POLL_S = 0.2


def _create_local(path: str, text: str) -> bool:
    """Create the lock file on local disk, atomically: False if it exists.

    The content goes into a temporary file first, which is then hard-linked to the lock path
    (link fails if the path exists), so a crash can leave a stray temporary file but never an
    empty or half-written lock.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "x") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
        # No hard links here (some network and FUSE filesystems): exclusive create, which
        # only a crash within the few microseconds of its write can leave unreadable.
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, text: str) -> bool:
    if is_local(fs):
        return _create_local(path, text)
    # S3 (s3fs): a conditional PUT, refused with 412 (FileExistsError) if the object exists.
    # Other fsspec filesystems: their pipe_file's create mode, at worst check-then-write.
    try:
        fs.pipe_file(path, text.encode(), mode="create")
    except FileExistsError:
        return False
    return True


def _read_lock(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, dict | None] | None:
    """The lock file's bytes and its holder (None when it does not parse as one), or None when
    there is no lock file."""
    try:
        raw = read_bytes(fs, path)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return raw, None
    if not isinstance(holder, dict) or not all(k in holder for k in ("host", "pid", "token")):
        return raw, None
    return raw, holder


def _age_s(fs: fsspec.AbstractFileSystem, path: str) -> float | None:
    """Seconds since the file was last written; None when the filesystem cannot say."""
    try:
        if is_local(fs):
            return time.time() - os.stat(path).st_mtime
        return (datetime.now(UTC) - fs.modified(path)).total_seconds()
    except FileNotFoundError:
        return 0.0  # removed meanwhile: look again
    except (NotImplementedError, TypeError, OSError):
        return None


def _holds(fs: fsspec.AbstractFileSystem, path: str, me: dict) -> bool:
    """Whether the lock file is ours (carries our token)."""
    found = _read_lock(fs, path)
    return found is not None and found[1] is not None and found[1].get("token") == me["token"]


def _describe_unreadable(raw: bytes) -> str:
    if not raw.strip():
        return "empty"
    return f"not a lock record: {raw[:40]!r}"


@contextlib.contextmanager
def build_lock(store_url: str, break_lock: bool = False) -> Iterator[dict]:
    """Hold the store's build lock for the duration of the block.

    Raises :class:`StoreLocked` when a live build holds it, when it is held from another host
    (unless ``break_lock``), or when the lock file is unreadable (unless ``break_lock``).
    """
    fs, root = url_to_fs(store_url.rstrip("/"))
    path = f"{root}/{BUILD_DIR}/{LOCK_FILE}"
    me = _me()
    takeovers = 0
    seen: tuple[bytes, float] | None = None  # an unreadable lock's bytes, first seen when
    give_up = time.monotonic() + UNREADABLE_GRACE_S + 10.0
    while True:
        if _create_exclusive(fs, path, json.dumps(me)) and _holds(fs, path, me):
            break
        if time.monotonic() > give_up:  # the lock keeps changing under us
            raise StoreLocked(f"{store_url}: could not take the build lock; try again")
        found = _read_lock(fs, path)
        if found is None:
            continue  # released between our create and our read: try again at once
        raw, holder = found
        if holder is None:
            age = _age_s(fs, path)
            if age is None:  # no mtime: watch the same bytes for the grace period instead
                if seen is None or seen[0] != raw:
                    seen = (raw, time.monotonic())
                age = time.monotonic() - seen[1]
            if age < UNREADABLE_GRACE_S:
                time.sleep(POLL_S)  # maybe being written right now: look again
                continue
            if not break_lock:
                raise StoreLocked(
                    f"{store_url}: the build lock {path} is unreadable "
                    f"({_describe_unreadable(raw)}), so its holder is unknown; if no build is "
                    "running on this store, rerun with --break-lock"
                )
        else:
            alive = holder_alive(holder)
            if alive is True or (alive is None and not break_lock):
                hint = "" if alive else " (on another host: rerun with --break-lock if it is dead)"
                raise StoreLocked(
                    f"{store_url}: another build holds this store ({_describe(holder)}){hint}"
                )
        # Stale, or unreadable and broken on request: remove it only if it is still the same
        # file, then race fairly for it through the exclusive create.
        takeovers += 1
        if takeovers > 3:
            raise StoreLocked(f"{store_url}: could not take the build lock; try again")
        again = _read_lock(fs, path)
        if again is not None and again[0] == raw:
            remove_file(fs, path)
    try:
        yield me
    finally:
        if _holds(fs, path, me):
            remove_file(fs, path)
