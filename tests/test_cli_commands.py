"""``dereverb train``, ``evaluate``, ``enhance`` and ``serve`` run through the command line.

The stage itself is tested in test_training.py and test_train_evaluate.py; here the point is the
command: its options reach the code, it writes what it says, exits 0, and a user error is one
``error:`` line with exit status 2. Everything runs on the tiny synthetic store of
test_training.py (a few seconds to write) and a two-step run of a tiny model, so the file stays
well under a minute apart from ``serve``, which needs a real server and process.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from dereverb_data.demo_corpus import synthesize_utterance
from flows.cli import main
from training.evaluate import SYSTEMS

from .conftest import DEMO_MANIFEST, REPO, run_cli
from .test_deployments import _read_deployment, _wait_for_deployments
from .test_training import write_synthetic_store

# A run small enough for a test: tiny model, short crops, no loader workers, no progress bar.
TINY_CONFIG = {
    "model": "bsrnn_lite",
    "model_kwargs": {"channels": 8, "hidden": 8, "blocks": 1},
    "crop_frames": 32,
    "batch_size": 2,
    "num_workers": 0,
    "warmup_steps": 1,
    "steps": 2,
    "eval_every": 2,
    "eval_examples": 1,
    "checkpoint_every": 2,
    "log_every": 1,
    "progress": False,
    "seed": 7,
    "device": "cpu",
}


@contextlib.contextmanager
def cli_environment() -> Iterator[None]:
    """``main`` installs its console filter through an environment variable that every process
    started later inherits; keep it from leaking into the rest of the test session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_LOGGING_SETTINGS_PATH", "")  # unset for main, restored after
        patch.delenv("DEREVERB_DEBUG", raising=False)
        yield


def run_main(*args: str) -> int:
    with cli_environment():
        return main(list(args))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_synthetic_store(tmp_path_factory.mktemp("cli-store") / "synthetic.zarr"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG, sort_keys=False))
    return path


def train_args(store: str, config: Path, run: Path) -> list[str]:
    """``dereverb train`` of ``config`` into ``run``, with ``--steps 3`` replacing its 2."""
    return ["train", "--data", store, "--config", str(config), "--out", str(run), "--steps", "3"]


@pytest.fixture(scope="module")
def trained(store: str, config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dereverb train`` of the tiny config, with ``--steps`` replacing the file's value."""
    run = tmp_path_factory.mktemp("cli-run") / "run"
    assert run_main(*train_args(store, config_file, run)) == 0
    return run


def test_train_writes_a_checkpoint_and_metrics(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["step"] == 3  # --steps replaced the file's 2
    assert np.isfinite(metrics["valid_si_sdr"]) and np.isfinite(metrics["train_loss"])
    config = json.loads((trained / "config.json").read_text())
    assert {**TINY_CONFIG, "steps": 3}.items() <= config.items()
    assert (trained / "checkpoint.pt").stat().st_size > 0
    assert any((trained / "tensorboard").iterdir())


def test_train_prints_its_outcome_and_resumes(
    trained: Path, store: str, config_file: Path, capsys: pytest.CaptureFixture
) -> None:
    # The same command again: the finished run resumes at its last step and trains no more.
    before = (trained / "checkpoint.pt").read_bytes()
    code = run_main(*train_args(store, config_file, trained))
    assert code == 0
    assert f"trained bsrnn_lite into {trained}: " in capsys.readouterr().out
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_evaluate_on_a_store_writes_metrics_and_plots(
    trained: Path, store: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "eval"
    code = run_main(
        "evaluate",
        "--checkpoint",
        str(trained / "checkpoint.pt"),
        "--data",
        store,
        "--split",
        "test",
        "--limit",
        "1",
        "--out",
        str(out),
    )
    assert code == 0
    with (out / "per_example.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["system"] for r in rows) == sorted(SYSTEMS)  # one example, every system
    assert all(r["si_sdr"] not in ("", "nan") for r in rows)
    for name in ("summary.md", "metrics_vs_rt60.png", "spectrograms.png"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "| all | model |" in printed and str(out) in printed


def test_enhance_writes_each_input_and_takes_the_old_phase_name(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "in" / "talk.wav"
    source.parent.mkdir()
    sf.write(source, synthesize_utterance("demo_f1", 0, 22050, 1.5), 22050)
    checkpoint = str(trained / "checkpoint.pt")
    outputs = {}
    for phase in ("model", "reverberant"):
        out = tmp_path / phase
        code = run_main(
            "enhance",
            "--checkpoint",
            checkpoint,
            str(source),
            "--out",
            str(out),
            "--phase",
            phase,
        )
        assert code == 0
        info = sf.info(out / "talk.wav")
        assert (info.samplerate, info.frames) == (22050, int(1.5 * 22050))
        outputs[phase] = sf.read(out / "talk.wav")[0]
        captured = capsys.readouterr()
        assert f"{source} -> " in captured.out
        assert ("deprecated" in captured.err) == (phase == "reverberant")
    # `reverberant` is only the old name of `model`: the same output.
    np.testing.assert_array_equal(outputs["model"], outputs["reverberant"])
    assert np.max(np.abs(outputs["model"])) > 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["evaluate", "--checkpoint", "{run}/checkpoint.pt", "--out", "{tmp}/e"], "--data"),
        (
            [
                "evaluate",
                "--checkpoint",
                "{run}/checkpoint.pt",
                "--out",
                "{tmp}/e",
                "--speech",
                "{tmp}",
            ],
            "--rirs",
        ),
        (["train", "--data", "{store}", "--config", "{tmp}/bad.yaml", "--out", "{tmp}/r"], "steps"),
        (["train", "--data", "{store}", "--config", "{tmp}/typo.yaml", "--out", "{tmp}/r"], "lr"),
        (["train", "--data", "{tmp}/none.zarr", "--out", "{tmp}/r"], "none.zarr"),
        (
            ["enhance", "--checkpoint", "{tmp}/none.pt", "{tmp}/a.wav", "--out", "{tmp}/o"],
            "none.pt",
        ),
        (
            [
                "enhance",
                "--checkpoint",
                "{run}/checkpoint.pt",
                "{tmp}/a.wav",
                "--out",
                "{tmp}/o",
                "--phase",
                "oracle",
            ],
            "--phase",
        ),
        (["plan", str(DEMO_MANIFEST), "--corpus", "{tmp}"], "kind 'demo'"),
    ],
    ids=[
        "evaluate-no-data",
        "evaluate-speech-without-rirs",
        "train-bad-value",
        "train-unknown-key",
        "train-no-store",
        "enhance-no-checkpoint",
        "enhance-bad-phase",
        "plan-corpus-on-demo",
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    args: list[str], words: str, trained: Path, store: str, tmp_path: Path
) -> None:
    (tmp_path / "bad.yaml").write_text('steps: "ten"\n')
    (tmp_path / "typo.yaml").write_text("lrr: 0.1\n")
    sf.write(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    before = sorted(p.name for p in tmp_path.iterdir())
    values = {"run": str(trained), "store": store, "tmp": str(tmp_path)}
    result = run_cli(*(arg.format(**values) for arg in args))
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "error: " in lines[0], result.stderr
    assert words in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_unknown_training_key_gets_a_suggestion(store: str, tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("lrr: 0.1\n")
    result = run_cli(
        "train",
        "--data",
        store,
        "--config",
        str(tmp_path / "typo.yaml"),
        "--out",
        str(tmp_path / "r"),
    )
    assert result.returncode == 2
    assert "unknown key 'lrr' (did you mean 'lr'?)" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# serve: a real process against the session's Prefect server
# ---------------------------------------------------------------------------------------------

TRAIN = "train-model/train"
SERVED = ("build-dataset/scheduled", "regenerate-dataset/regenerate", TRAIN)


@pytest.mark.slow
def test_serve_registers_and_runs_the_train_deployment(
    prefect_api: str, store: str, config_file: Path, tmp_path: Path
) -> None:
    """``dereverb serve --train-config``: three deployments, the train one runs on request."""
    from prefect.deployments import run_deployment

    run = tmp_path / "served-run"
    log = tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONUNBUFFERED": "1"}
    env.pop("DEREVERB_DEBUG", None)
    # Ctrl-C handling even when the tests run in a background job (SIGINT ignored there).
    script = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [
        "serve",
        str(DEMO_MANIFEST),
        "--store",
        store,
        "--cron",
        "",
        "--workers",
        "1",
        "--train-config",
        str(config_file),
        "--train-out",
        str(run),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", script, *command],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        found = _wait_for_deployments(process, log, SERVED)
        assert found[SERVED[0]].schedules == []  # --cron '': no schedule
        assert found[TRAIN].parameters == {
            "data_url": store,
            "out_dir": str(run),
            "config_path": str(config_file),
        }
        flow_run = run_deployment(TRAIN, timeout=300, poll_interval=1)
        assert flow_run.state is not None and flow_run.state.is_completed(), log.read_text()
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["step"] == TINY_CONFIG["steps"] and np.isfinite(metrics["valid_si_sdr"])
        assert f"serving {', '.join(SERVED)} against {prefect_api}" in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert asyncio.run(_read_deployment(TRAIN)).paused  # a clean stop pauses what it served


# ---------------------------------------------------------------------------------------------
# The parser itself: every option explained, and --help without the heavy imports


def test_every_option_of_every_command_has_help() -> None:
    import argparse

    from flows.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert not missing, missing


def test_help_imports_none_of_the_heavy_libraries() -> None:
    # What made `dereverb --help` take seconds: torch, scipy and zarr imported for nothing.
    code = (
        "import sys, contextlib, io\n"
        "from flows.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('torch', 'scipy', 'zarr', 'prefect', 'dask')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
