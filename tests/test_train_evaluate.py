"""Build-then-train through Prefect, evaluation on a store and on measured rooms, enhance CLI."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dereverb_data.build import default_rir_cache
from dereverb_data.demo_corpus import synthesize_utterance
from training.evaluate import SYSTEMS, direct_path_window, evaluate, load_rir

from .conftest import DEMO_MANIFEST, REPO, run_cli

TRAIN_DEMO = REPO / "manifests" / "training" / "demo.yaml"


@pytest.fixture(scope="module")
def trained(demo_store: str, prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo manifest built and then trained by the build flow (RIRs from the demo store)."""
    from flows.build import run_build

    root = tmp_path_factory.mktemp("then-train")
    store, run = str(root / "demo.zarr"), str(root / "run")
    report = run_build(
        str(DEMO_MANIFEST),
        store,
        rir_cache=default_rir_cache(demo_store),
        workers=1,
        then_train={"config_path": str(TRAIN_DEMO), "out_dir": run},
    )
    return {"store": store, "run": Path(run), "report": report}


def test_build_then_train_runs_end_to_end(trained: dict, prefect_api: str) -> None:
    report = trained["report"]
    assert report["counts"]["rirs_simulated"] == 0  # the shared RIR bank served every spec
    metrics = report["training"]
    assert metrics["step"] == 20 and np.isfinite(metrics["valid_si_sdr"])
    checkpoint = torch.load(trained["run"] / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["model"] == "bsrnn_lite" and checkpoint["sample_rate"] == 16000

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def artifacts() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-run"]))
            )

    published = asyncio.run(artifacts())
    assert published and "valid_si_sdr" in published[-1].data


def test_evaluate_on_the_demo_store(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    table = evaluate(
        trained["run"] / "checkpoint.pt",
        out,
        data=trained["store"],
        limit=2,
        metrics=("pesq_wb", "estoi", "si_sdr", "srmr"),
    )
    with (out / "per_example.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(SYSTEMS)
    assert {r["system"] for r in rows} == set(SYSTEMS)
    by_system = {r["system"]: r for r in rows if r["example_id"] == rows[0]["example_id"]}
    # The oracle magnitude beats the unprocessed input on every example's PESQ.
    assert float(by_system["oracle_mag"]["pesq_wb"]) > float(by_system["input"]["pesq_wb"])
    assert float(by_system["input"]["srmr_delta"]) == 0.0
    assert "| all | model |" in table and "srmr_delta" in table
    for name in (
        "summary.md",
        "metrics_vs_rt60.png",
        "spectrograms.png",
        "example0_model.wav",
        "example0_target.wav",
    ):
        assert (out / name).stat().st_size > 0, name


def write_measured_room(folder: Path) -> Path:
    """A 44.1 kHz, 3-channel 'measured' RIR: direct peak then an exponential tail (RT60 0.6 s)."""
    fs, rt60 = 44100, 0.6
    rng = np.random.default_rng(1)
    t = np.arange(int(0.9 * fs)) / fs
    tail = rng.standard_normal(t.size) * np.exp(-6.9078 * t / rt60) * 0.2
    rir = np.zeros(t.size + 300)
    rir[300] = 1.0
    rir[330:] += tail[: rir.size - 330]
    channels = np.stack([rir, 0.5 * rir, -rir], axis=1)
    path = folder / "room_3ch_44k.wav"
    sf.write(path, channels, fs, subtype="FLOAT")
    return path


def test_real_room_path_with_a_multichannel_44k_rir(trained: dict, tmp_path: Path) -> None:
    speech, rirs = tmp_path / "speech", tmp_path / "rirs"
    speech.mkdir()
    rirs.mkdir()
    for i in range(2):
        sf.write(speech / f"s{i}.wav", synthesize_utterance("demo_m2", i, 16000, 2.5), 16000)
    path = write_measured_room(rirs)
    rir = load_rir(path, 16000)
    d = int(np.argmax(np.abs(rir)))
    assert abs(d - round(300 * 16000 / 44100)) <= 2  # resampled, channel 0
    window = direct_path_window(rir, 16000)
    assert np.count_nonzero(window) <= 2 * 40 + 1 and window[d] == rir[d]

    out = tmp_path / "real"
    evaluate(
        trained["run"] / "checkpoint.pt",
        out,
        speech=speech,
        rirs=rirs,
        pairs_per_rir=2,
        metrics=("pesq_wb", "si_sdr"),
    )
    with (out / "per_example.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(SYSTEMS)
    rt60 = float(rows[0]["rt60"])
    assert 0.5 < rt60 < 0.7  # measured from the resampled file
    inputs = [float(r["si_sdr"]) for r in rows if r["system"] == "input"]
    oracle = [float(r["si_sdr"]) for r in rows if r["system"] == "oracle_mag"]
    assert min(oracle) > max(inputs)


def test_enhance_cli_keeps_names_and_rates_and_reports_bad_files(
    trained: dict, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    sf.write(inputs / "talk.flac", synthesize_utterance("demo_f2", 0, 22050, 3.0), 22050)
    stereo = synthesize_utterance("demo_m1", 1, 16000, 2.0)
    sf.write(inputs / "stereo.wav", np.stack([stereo, stereo], axis=1), 16000)
    (inputs / "broken.wav").write_bytes(b"garbage")
    out = tmp_path / "out"
    result = run_cli(
        "enhance",
        "--checkpoint",
        str(trained["run"] / "checkpoint.pt"),
        str(inputs / "talk.flac"),
        str(inputs / "broken.wav"),
        str(inputs / "stereo.wav"),
        "--out",
        str(out),
    )
    assert result.returncode == 2  # one file failed...
    assert "broken.wav: unreadable" in result.stderr and "Traceback" not in result.stderr
    talk = sf.info(out / "talk.flac")  # ...and the others were still enhanced
    assert talk.samplerate == 22050 and talk.frames == 3 * 22050
    assert sf.info(out / "stereo.wav").channels == 1
    refused = run_cli(
        "enhance",
        "--checkpoint",
        str(trained["run"] / "checkpoint.pt"),
        str(inputs / "talk.flac"),
        "--out",
        str(inputs),
    )
    assert refused.returncode == 2 and "overwrite" in refused.stderr
    assert sf.info(inputs / "talk.flac").frames == 3 * 22050
