"""Atomic writes to a local path or any fsspec filesystem."""

from __future__ import annotations

import uuid

import fsspec


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write to a unique temporary name, then rename: readers never see a partial file."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)
