"""Checks a build makes before any work, so a mistake costs one clear line, not a started build.

Each raises the user-error class of what it checks (``AudioError`` for the corpus,
``StoreError`` for the store) with a message naming the path or field. The flow's planning step
runs :func:`check_same_dataset` again, so builds started by a deployment or a schedule are
protected too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .corpus import AudioError
from .fsio import read_bytes, url_to_fs
from .manifest import LHOTSE_MISSING, FolderCorpus, LhotseCorpus, Manifest, lhotse_installed
from .store_format import (
    LEGACY_PLAN_INPUTS,
    PLAN_FILE,
    StoreError,
    StoreReadError,
    read_plan_header,
)


def check_corpus(manifest: Manifest) -> None:
    """A folder corpus must be a folder with at least one file matching its pattern; a Lhotse
    corpus needs lhotse installed and its manifest files present (and, for JSONL, of the right
    type: a CutSet given as recordings is caught here, not after a server has started)."""
    corpus = manifest.corpus
    if isinstance(corpus, LhotseCorpus):
        _check_lhotse_corpus(corpus)
        return
    if not isinstance(corpus, FolderCorpus):
        return
    root = Path(corpus.path)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise AudioError(f"corpus.path: {root} {what}")
    for pattern in corpus.pattern.split("|"):
        if any(p.is_file() for p in _first(root.glob(pattern), 1000)):
            return
    raise AudioError(f"corpus.path: no files match {corpus.pattern!r} under {root}")


def _check_lhotse_corpus(corpus: LhotseCorpus) -> None:
    from .lhotse_io import peek_manifest_type, require_file

    if not lhotse_installed():
        raise AudioError(LHOTSE_MISSING)
    expected = {"recordings": "RecordingSet", "supervisions": "SupervisionSet"}
    for field, kind in expected.items():
        value = getattr(corpus, field)
        if value is None:
            continue
        path = Path(value)
        require_file(path, field)
        try:
            found = peek_manifest_type(path)
        except AudioError as exc:
            raise AudioError(f"corpus.{field}: {exc}") from None
        if found == "empty":
            raise AudioError(f"corpus.{field}: {path} is empty (no {kind} items)")
        if found not in (None, kind, "unknown"):
            raise AudioError(f"corpus.{field}: {path} is a Lhotse {found}, not a {kind}")
    if corpus.audio_root is not None and not Path(corpus.audio_root).is_dir():
        raise AudioError(f"corpus.audio_root: {corpus.audio_root} is not a folder")


def _first(items, n: int):
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def check_store_target(store_url: str) -> None:
    """A local store path must be a folder (or not exist yet) that this user can write."""
    if "://" in store_url and not store_url.startswith("file://"):
        return  # object stores: their errors come with their own messages
    path = Path(store_url.removeprefix("file://")).expanduser()
    if path.exists():
        if not path.is_dir():
            raise StoreError(f"{path}: is a file, not a store folder; choose another --store")
        if not os.access(path, os.W_OK | os.X_OK):
            raise StoreError(f"{path}: the store is read-only for this user")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StoreError(f"{path}: cannot create the store: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"{path}: cannot create the store: {parent} is read-only for this user")


def dataset_identity(manifest: dict) -> dict:
    """What makes a store *this* dataset rather than an edit of it: its name, its seed and the
    corpus it draws from (kind, and its folder or Lhotse manifests). Rooms, levels, limits and
    the rest are edits, which a rebuild applies incrementally."""
    corpus = manifest.get("corpus") or {}
    return {
        "name": manifest.get("name"),
        "seed": manifest.get("seed"),
        "corpus": {
            k: corpus.get(k) for k in ("kind", "path", "recordings", "supervisions") if k in corpus
        },
    }


def stored_manifest(store_url: str) -> dict | None:
    """The manifest the store was last planned from, or None for a new (or empty) store.

    Read from the stored plan's header (only that part of the file), or from the inputs file
    of a store built before plans were stored."""
    fs, root = url_to_fs(store_url.rstrip("/"))  # no listings cache: see fsio
    try:
        with fs.open(f"{root}/{PLAN_FILE}", "rb") as handle:
            return read_plan_header(handle, f"{store_url}/{PLAN_FILE}")["manifest"]
    except FileNotFoundError:
        pass
    except StoreReadError as exc:
        raise StoreError(
            f"{store_url}: its stored plan cannot be read, so it cannot be checked against this "
            f"manifest; --replace rebuilds it as this manifest's dataset ({exc})"
        ) from None
    try:
        return json.loads(read_bytes(fs, f"{root}/{LEGACY_PLAN_INPUTS}"))["manifest"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"{store_url}: its build plan ({LEGACY_PLAN_INPUTS}) is unreadable ({exc}); "
            "it cannot be checked against this manifest"
        ) from None


def check_same_dataset(store_url: str, manifest: Manifest, replace: bool = False) -> None:
    """Refuse to build a different dataset into an existing store unless ``replace``."""
    if replace:
        return
    old = stored_manifest(store_url)
    if old is None:
        return
    before, after = dataset_identity(old), dataset_identity(manifest.model_dump(mode="json"))
    changed = [
        f"{key} {before[key]!r} -> {after[key]!r}" for key in before if before[key] != after[key]
    ]
    if changed:
        raise StoreError(
            f"{store_url}: holds another dataset ({'; '.join(changed)}); build into a new "
            "store, or pass --replace to rebuild this one as the new dataset"
        )
