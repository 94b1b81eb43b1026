"""``simulation.method: diffuse`` through the build: a complete store, labels in range,
bit-identical rebuilds, and existing manifests' RIR ids untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
import zarr

from dereverb_data.build import build_serial
from dereverb_data.manifest import load_manifest
from dereverb_data.plan import make_plan
from dereverb_data.rir_bank import RirBank

from .conftest import DEMO_MANIFEST


def diffuse_manifest(tmp_path: Path, rt60: list[float]) -> Path:
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    data["simulation"] = {"method": "diffuse"}
    data["rooms"]["rt60_s"] = rt60
    path = tmp_path / "diffuse.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_diffuse_build_is_complete_reproducible_and_in_range(tmp_path: Path) -> None:
    manifest = load_manifest(diffuse_manifest(tmp_path, [0.3, 2.5]))
    first = build_serial(manifest, str(tmp_path / "a.zarr"))
    build_serial(manifest, str(tmp_path / "b.zarr"))
    assert first["summary"]["rt60_in_requested_range"] >= 0.95
    assert first["warnings"] == []
    a = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    assert a.attrs["complete"] and list(a["shard_checksums"][:]) == list(b["shard_checksums"][:])
    rt60 = a["index"]["rt60_t30"][:]
    assert np.all(np.isfinite(rt60)) and rt60.max() > 1.2  # long rooms, not stuck short
    labels = RirBank(str(tmp_path / "a.zarr" / "_build" / "rir_bank"))
    rir_id = str(a["index"]["rir_id"][0])
    _, saved = labels.load_rir(rir_id)
    assert saved.simulation == "diffuse" and saved.simulator.startswith("dereverb-diffuse")


def test_existing_manifests_keep_their_rir_ids(tmp_path: Path) -> None:
    """Adding the method changed no existing spec: the demo's RIR ids are what a build of
    the committed demo store expects (the same manifest, planned twice, and not diffuse)."""
    manifest = load_manifest(DEMO_MANIFEST)
    plan = make_plan(manifest, *_demo_corpus(manifest))
    diffuse = make_plan(
        load_manifest(diffuse_manifest(tmp_path, manifest.rooms.rt60_s)), *_demo_corpus(manifest)
    )
    assert manifest.simulation.method == "auto"
    assert "diffuse" not in manifest.simulation.model_dump(mode="json")
    assert set(plan.rirs).isdisjoint(diffuse.rirs)  # another method, other ids


def _demo_corpus(manifest):
    from dereverb_data.corpus import scan_corpus

    return scan_corpus(manifest.corpus, manifest.sample_rate)
