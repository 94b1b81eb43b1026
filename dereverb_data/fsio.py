"""Files on a local path or any fsspec filesystem (object stores included), done safely.

A store and its RIR bank are shared by many processes at once (Dask workers, the flow's own
process, a second build that must be refused, ``verify``). Two fsspec habits do not suit that:

- **Listing caches.** s3fs (and other object-store filesystems) remember every directory they
  have listed, for the life of the process, and answer ``exists``, ``info`` and ``open`` from
  that memory. A listing taken by one process says nothing about what the others wrote since,
  so :func:`url_to_fs` opens filesystems with the listings cache off.
- **Rename.** Object stores have none: ``mv`` is a copy and a delete (three requests, and a
  crash between them leaves the temporary object behind). A single PUT is already atomic
  there (readers see the old object or the new one, never part of one), so
  :func:`write_atomic` writes in place on object stores and renames only where renaming is
  atomic.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import fsspec

# Filesystems whose writes are whole-object PUTs (atomic per object) and whose ``mv`` is a
# copy plus a delete: written in place, no temporary name.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"file", "local"} & set(protocols(fs)))


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(OBJECT_STORE_PROTOCOLS & set(protocols(fs)))


def url_to_fs(url: str, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` without a listings cache (see the module docstring).

    Credentials and endpoints come from the environment as usual (for S3: ``AWS_*`` variables
    such as ``AWS_ENDPOINT_URL``, or fsspec's ``FSSPEC_S3_*``), so every process of a build,
    Dask workers included, reaches the same store without options passed around.
    """
    return fsspec.core.url_to_fs(url, use_listings_cache=False, **options)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write so that readers never see a partial file: on object stores one PUT; elsewhere a
    unique temporary name, then a rename."""
    if is_object_store(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole file, in one request on object stores. Raises ``FileNotFoundError`` when it
    is absent, so callers need no ``exists`` (another request, and a race) first.

    ``open`` asks for the size first, and so does s3fs's ``cat_file`` (a HEAD, to decide
    whether to download in parallel parts) unless told to use one connection: these files
    (markers, labels, plans, RIRs, locks) are small.
    """
    if "s3" in protocols(fs) or "s3a" in protocols(fs):
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def remove_file(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete one file if it is there: one request (``rm`` expands the path first)."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
