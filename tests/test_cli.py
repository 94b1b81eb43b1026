"""The ``dereverb`` command line as a user runs it: real processes, real files, real server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml
import zarr

from dereverb_data.demo_corpus import synthesize_utterance

from .conftest import DEMO_MANIFEST, run_cli


def test_plan_prints_a_summary_without_simulating(tmp_path: Path) -> None:
    result = run_cli("plan", str(DEMO_MANIFEST), "--show", "3")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout[: result.stdout.index("}\n") + 1])
    assert summary["examples"] == 48 and summary["unique_rirs"] >= 6
    assert result.stdout.count("#") >= 3  # three example rows


def test_bad_manifest_gives_one_readable_message(tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    data["variants_per_utterence"] = data.pop("variants_per_utterance")
    data["rooms"]["rt60_s"] = [0.3, 30.0]
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_cli("build", str(path), "--store", str(tmp_path / "x.zarr"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "variants_per_utterence" in result.stderr and "did you mean" in result.stderr
    assert "rooms.rt60_s" in result.stderr
    assert not (tmp_path / "x.zarr").exists()  # rejected before any work


def write_corpus(root: Path) -> None:
    """Three speakers at 44.1 kHz stereo and 16 kHz mono, plus bad files beside them."""
    for n, speaker in enumerate(("demo_f1", "demo_m1", "demo_f2")):
        folder = root / f"spk{n}"
        folder.mkdir(parents=True)
        for index in range(2):
            x = synthesize_utterance(speaker, index, 44100 if n == 0 else 16000, 2.0)
            if n == 0:
                sf.write(folder / f"u{index}.wav", np.stack([x, 0.5 * x], axis=1), 44100)
            else:
                sf.write(folder / f"u{index}.flac", x, 16000)


def folder_manifest(root: Path, path: Path) -> None:
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    data["name"] = "folder-test"
    data["corpus"] = {
        "kind": "folder",
        "path": str(root),
        "pattern": "**/*.wav|**/*.flac",
        "speaker": {"kind": "parent_dir", "level": 1},
    }
    data["variants_per_utterance"] = 1
    data["splits"] = {"train": 0.34, "valid": 0.33, "test": 0.33}
    path.write_text(yaml.safe_dump(data))


def test_build_quarantines_bad_files_and_keeps_built_data(tmp_path: Path, prefect_api: str) -> None:
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    manifest = tmp_path / "m.yaml"
    folder_manifest(corpus, manifest)
    store = tmp_path / "s.zarr"
    first = run_cli(
        "build", str(manifest), "--store", str(store), "--workers", "1", api_url=prefect_api
    )
    assert first.returncode == 0, first.stderr[-3000:]
    before = zarr.open_group(str(store), mode="r")["shard_checksums"][:]

    # New bad files arrive: corrupt, silent, NaN. The rebuild goes on and reports each one.
    (corpus / "spk1" / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    sf.write(corpus / "spk2" / "silent.wav", np.zeros(32000, np.float32), 16000)
    nan = synthesize_utterance("demo_m1", 5, 16000, 2.0)
    nan[100] = np.nan
    sf.write(corpus / "spk2" / "nan.wav", nan, 16000, subtype="FLOAT")
    second = run_cli(
        "build", str(manifest), "--store", str(store), "--workers", "1", api_url=prefect_api
    )
    assert second.returncode == 0, second.stderr[-3000:]
    for name, reason in (
        ("corrupt.wav", "unreadable"),
        ("silent.wav", "silent"),
        ("nan.wav", "NaN"),
    ):
        line = next(x for x in second.stdout.splitlines() if name in x)
        assert line.startswith("quarantined:") and reason in line
    assert "shards_rendered 0" in second.stdout  # nothing already built was redone or lost
    after = zarr.open_group(str(store), mode="r")
    assert list(after["shard_checksums"][:]) == list(before)
    report = json.loads((store / "_build" / "report.json").read_text())
    assert len(report["quarantined"]) == 3
    assert report["summary"]["examples"] == 6

    # The stereo 44.1 kHz speaker was resampled and downmixed, not dropped.
    speakers = set(after["index"]["speaker"][:])
    assert speakers == {"spk0", "spk1", "spk2"}


def test_inspect_prints_and_plots(demo_store: str, tmp_path: Path) -> None:
    png = tmp_path / "demo.png"
    result = run_cli("inspect", demo_store, "--plot", str(png))
    assert result.returncode == 0, result.stderr
    assert "examples       48" in result.stdout
    assert "kB per second of audio" in result.stdout and "rt60_t30" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    as_json = json.loads(run_cli("inspect", demo_store, "--json").stdout)
    assert as_json["examples"] == 48 and as_json["bytes_per_second_of_audio"] > 1000


def test_inspect_of_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("inspect", str(tmp_path / "nope.zarr"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nope.zarr" in result.stderr
