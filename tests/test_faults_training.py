"""User errors in enhance, checkpoints, training runs and training configs (issue 15).

Every case checks the three promises: the exception is of the user-error class the CLI reports,
its message is one line naming the file or field (and never advises ``weights_only=False``), and
the user's files are byte-identical afterwards, with no ``.partial`` file or empty run folder.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import zarr

from dereverb_data.stft import StftConfig
from dereverb_data.store_format import StoreError, StoreReadError
from training.checkpoint import CheckpointError
from training.enhance import EnhanceError, enhance_file, plan_outputs
from training.inference import load_checkpoint
from training.train import RunFolderError, load_model, train

from .test_training import tiny_config, write_synthetic_store

CONFIG = StftConfig(512, 128)
RATE = 16000


def identity(spec: np.ndarray) -> np.ndarray:
    return spec


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, symlink targets, and folders (even empty)."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            entries[key] = "<dir>"
        else:
            entries[key] = path.read_bytes()
    return entries


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    assert "weights_only=False" not in message and "weights_only" not in message, message
    return message


def write_audio(path: Path, seconds: float = 1.0, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    subtype = "FLOAT" if path.suffix == ".wav" else None
    sf.write(path, 0.1 * rng.standard_normal(int(seconds * RATE)), RATE, subtype=subtype)
    return path


# ---------------------------------------------------------------------------------------------
# plan_outputs and enhance_file
# ---------------------------------------------------------------------------------------------


def test_plan_outputs_pairs_inputs_with_out_dir_names(tmp_path: Path) -> None:
    a = write_audio(tmp_path / "a" / "x.wav")
    b = write_audio(tmp_path / "b" / "y.flac")
    assert plan_outputs([a, b], tmp_path / "out") == [
        (a, tmp_path / "out" / "x.wav"),
        (b, tmp_path / "out" / "y.flac"),
    ]
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_output_that_is_another_input_is_refused(tmp_path: Path) -> None:
    a = write_audio(tmp_path / "a" / "x.wav", seed=1)
    b = write_audio(tmp_path / "b" / "x.wav", seed=2)
    before = snapshot(tmp_path)
    # enhance a/x.wav b/x.wav --out b: a's output would be b/x.wav, the second input.
    with pytest.raises(EnhanceError) as exc:
        plan_outputs([a, b], tmp_path / "b")
    message = one_line(exc)
    assert str(b) in message and "overwrite" in message
    assert snapshot(tmp_path) == before


def test_two_inputs_with_one_output_name_are_refused_naming_both(tmp_path: Path) -> None:
    a = write_audio(tmp_path / "a" / "x.wav", seed=1)
    b = write_audio(tmp_path / "b" / "x.wav", seed=2)
    before = snapshot(tmp_path)
    with pytest.raises(EnhanceError) as exc:
        plan_outputs([a, b], tmp_path / "o")
    message = one_line(exc)
    assert str(a) in message and str(b) in message
    with pytest.raises(EnhanceError, match="both"):
        plan_outputs([a, a], tmp_path / "o")  # the same file given twice
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_out_dir_symlinked_to_the_input_folder_is_refused(tmp_path: Path) -> None:
    a = write_audio(tmp_path / "a" / "x.wav")
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(EnhanceError) as exc:
        plan_outputs([a], tmp_path / "link")
    assert str(a) in one_line(exc)
    with pytest.raises(EnhanceError, match="overwrite"):
        enhance_file(identity, a, tmp_path / "link" / "x.wav", RATE, CONFIG)
    assert snapshot(tmp_path) == before


def test_input_symlinked_to_the_output_is_refused(tmp_path: Path) -> None:
    real = write_audio(tmp_path / "o" / "x.wav")
    link = tmp_path / "a" / "x.wav"
    link.parent.mkdir()
    link.symlink_to(real)
    before = snapshot(tmp_path)
    with pytest.raises(EnhanceError) as exc:
        plan_outputs([link], tmp_path / "o")  # writing o/x.wav would destroy what link reads
    assert str(link) in one_line(exc)
    assert snapshot(tmp_path) == before


def test_hard_linked_output_and_input_are_refused(tmp_path: Path) -> None:
    a = write_audio(tmp_path / "a" / "x.wav", seed=1)
    z = write_audio(tmp_path / "b" / "z.wav", seed=2)
    (tmp_path / "o").mkdir()
    os.link(a, tmp_path / "o" / "x.wav")  # o/x.wav: a second name of a/x.wav
    before = snapshot(tmp_path)
    with pytest.raises(EnhanceError) as exc:
        plan_outputs([a], tmp_path / "o")
    assert str(a) in one_line(exc)
    # The output of one input is a hard link of another input.
    os.link(z, tmp_path / "o" / "y.wav")
    y = write_audio(tmp_path / "c" / "y.wav", seed=3)
    before = snapshot(tmp_path)
    with pytest.raises(EnhanceError) as exc:
        plan_outputs([y, z], tmp_path / "o")
    assert str(z) in one_line(exc)
    with pytest.raises(EnhanceError, match="overwrite"):
        enhance_file(identity, z, tmp_path / "o" / "y.wav", RATE, CONFIG)
    assert snapshot(tmp_path) == before


def test_bad_suffix_and_out_dir_that_is_a_file_are_refused(tmp_path: Path) -> None:
    mp3 = tmp_path / "talk.mp3"
    mp3.write_bytes(b"ID3 not really")
    with pytest.raises(EnhanceError) as exc:
        plan_outputs([mp3], tmp_path / "out")
    assert "talk.mp3" in one_line(exc)
    wav = write_audio(tmp_path / "x.wav")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(EnhanceError) as exc:
        plan_outputs([wav], tmp_path / "file")
    assert str(tmp_path / "file") in one_line(exc)
    (tmp_path / "out" / "x.wav").mkdir(parents=True)
    with pytest.raises(EnhanceError, match="existing folder"):
        plan_outputs([wav], tmp_path / "out")
    assert (tmp_path / "file").read_text() == "mine"


def test_nan_part_way_leaves_no_partial_and_keeps_the_old_output(tmp_path: Path) -> None:
    source = tmp_path / "in" / "nan.wav"
    source.parent.mkdir()
    signal = 0.1 * np.random.default_rng(0).standard_normal(6 * RATE)
    signal[5 * RATE] = np.nan  # in a late block: several blocks are written before it
    sf.write(source, signal, RATE, subtype="FLOAT")
    out = tmp_path / "out"
    out.mkdir()
    (out / "nan.wav").write_bytes(b"yesterday's output")
    before = snapshot(tmp_path)
    with pytest.raises(EnhanceError) as exc:
        enhance_file(identity, source, out / "nan.wav", RATE, CONFIG, block_s=1.0, context_s=0.1)
    assert str(source) in one_line(exc) and "NaN" in str(exc.value)
    assert snapshot(tmp_path) == before  # no .partial, old output untouched
    # A model that fails mid-file (any exception, not only ours) cleans up the same way.
    calls = 0

    def flaky(spec: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("out of memory")
        return spec

    good = write_audio(tmp_path / "in" / "good.wav", seconds=5.0)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="out of memory"):
        enhance_file(flaky, good, out / "good.wav", RATE, CONFIG, block_s=1.0, context_s=0.1)
    assert snapshot(tmp_path) == before
    written = enhance_file(identity, good, out / "good.wav", RATE, CONFIG, block_s=1.0)
    assert sf.info(written).frames == 5 * RATE
    assert not list(out.glob(".*partial"))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic.zarr"))


@pytest.fixture(scope="module")
def checkpoint(store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (two-step) checkpoint of the repo's tiny model."""
    run = tmp_path_factory.mktemp("run")
    train(tiny_config(steps=2, eval_examples=0, checkpoint_every=2), store_url, run)
    return run / "checkpoint.pt"


class Exploit:
    """A pickle that runs code when loaded unsafely: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_checkpoints(folder: Path, real: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a word the error must contain)."""
    saved = torch.load(real, weights_only=True)
    folder.mkdir(exist_ok=True)
    cases: dict[str, tuple[Path, str]] = {}

    def add(name: str, word: str) -> Path:
        path = folder / f"{name}.pt"
        cases[name] = (path, word)
        return path

    add("text", "not a PyTorch file").write_text("model: bsrnn_lite\nsteps: 10\n")
    add("empty", "empty").write_bytes(b"")
    torch.save(torch.zeros(4), add("tensor", "Tensor"))
    torch.save({"model": saved["model"]}, add("missing_keys", "missing"))
    torch.save({**saved, "model_name": "transformer9000"}, add("unknown_model", "transformer9000"))
    weights = dict(saved["model"])
    weights.pop(next(iter(weights)))
    torch.save({**saved, "model": weights}, add("wrong_weights", "weights"))
    torch.save({**saved, "config": {**saved["config"], "steps": -3}}, add("bad_config", "steps"))
    with add("exploit", "Python objects").open("wb") as handle:
        pickle.dump({"model": Exploit(folder / "pwned")}, handle)
    torch.save({**saved, "model": Exploit(folder / "pwned")}, add("exploit_zip", "Python objects"))
    data = real.read_bytes()
    add("truncated", "truncated").write_bytes(data[: len(data) // 2])
    return cases


def test_files_that_are_not_checkpoints_raise_checkpoint_error(
    checkpoint: Path, tmp_path: Path
) -> None:
    cases = bad_checkpoints(tmp_path / "bad", checkpoint)
    before = snapshot(tmp_path)
    for name, (path, word) in cases.items():
        for load in (load_checkpoint, load_model):
            with pytest.raises(CheckpointError) as exc:
                load(path)
            message = one_line(exc)
            assert message.startswith(f"{path}: not a dereverb checkpoint ("), (name, message)
            assert word in message, (name, message)
            assert isinstance(exc.value, ValueError)
    assert not (tmp_path / "bad" / "pwned").exists()  # the exploit never ran
    assert snapshot(tmp_path) == before


def test_missing_or_folder_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        load_checkpoint(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in one_line(exc)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in one_line(exc)


def test_real_checkpoint_still_loads(checkpoint: Path) -> None:
    model, config, rate = load_checkpoint(checkpoint)
    assert rate == 16000 and config == CONFIG and not model.training


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------


def incomplete_copy(store_url: str, folder: Path) -> Path:
    path = write_synthetic_store(folder / "half.zarr")
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    return path


def test_training_on_something_that_is_not_a_store_leaves_nothing(
    store_url: str, tmp_path: Path
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a store")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.wav").write_bytes(b"RIFF")
    stores = {
        tmp_path / "missing.zarr": "no such store",
        text: "not a zarr store",
        plain: "not a zarr store",
        incomplete_copy(store_url, tmp_path): "not finished",
    }
    before = snapshot(tmp_path)
    for store, words in stores.items():
        with pytest.raises(StoreError) as exc:
            train(tiny_config(), store, tmp_path / "runs" / "new")
        message = one_line(exc)
        assert message.startswith(str(store)) and words in message, message
        assert isinstance(exc.value, StoreReadError) and isinstance(exc.value, ValueError)
        assert snapshot(tmp_path) == before  # no run folder, no parents


def test_failure_before_the_first_checkpoint_removes_only_what_it_created(
    store_url: str, tmp_path: Path
) -> None:
    bad_split = tiny_config(train_split="tarin")
    with pytest.raises(StoreError) as exc:
        train(bad_split, store_url, tmp_path / "runs" / "deep" / "run")
    assert "tarin" in one_line(exc) and store_url in str(exc.value)
    assert list(tmp_path.iterdir()) == []  # run folder and the parents it made are gone

    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("keep me")
    (mine / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(tmp_path)
    with pytest.raises(StoreError):
        train(bad_split, store_url, mine)
    assert snapshot(tmp_path) == before  # config.json and tensorboard/ it wrote are gone


def test_failure_after_a_checkpoint_keeps_the_run(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.train as train_module

    def broken(*args, **kwargs):
        raise RuntimeError("validation blew up")

    monkeypatch.setattr(train_module, "evaluate", broken)
    config = tiny_config(steps=4, checkpoint_every=2, eval_every=3)
    with pytest.raises(RuntimeError, match="blew up"):
        train(config, store_url, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2  # resumable: kept
    assert (tmp_path / "run" / "config.json").exists()


def test_resuming_from_a_damaged_checkpoint_keeps_it(store_url: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x80\x04garbage")
    (run / "config.json").write_text(json.dumps({"note": "the user's"}))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as exc:
        train(tiny_config(), store_url, run)
    assert one_line(exc).startswith(str(run / "checkpoint.pt"))
    assert snapshot(tmp_path) == before


def test_run_folder_that_is_a_file_or_another_runs_is_refused(
    store_url: str, checkpoint: Path, tmp_path: Path
) -> None:
    mine = tmp_path / "results.txt"
    mine.write_text("my results")
    with pytest.raises(RunFolderError) as exc:
        train(tiny_config(), store_url, mine)
    assert str(mine) in one_line(exc)
    assert mine.read_text() == "my results"
    run = checkpoint.parent
    before = snapshot(run)
    with pytest.raises(RunFolderError) as exc:  # resuming with another learning rate
        train(tiny_config(steps=2, eval_examples=0, checkpoint_every=2, lr=0.5), store_url, run)
    message = one_line(exc)
    assert str(checkpoint) in message and "lr" in message
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------
# Training configs
# ---------------------------------------------------------------------------------------------


def test_unreadable_config_files_name_the_file(tmp_path: Path) -> None:
    from training.config import TrainConfigError, load_train_config

    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("model: unet\nsteps: [10\nlr: 0.1\n")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: unet  # réglé\n".encode("latin-1"))
    tab = tmp_path / "tab.yaml"
    tab.write_text("model: unet\n\tsteps: 3\n")
    before = snapshot(tmp_path)
    cases = {
        syntax: "line",
        latin: "UTF-8",
        tab: "line 2",
        tmp_path / "missing.yaml": "no such",
        tmp_path: "cannot read",
    }
    for path, word in cases.items():
        with pytest.raises(TrainConfigError) as exc:
            load_train_config(str(path))
        message = one_line(exc)
        assert message.startswith(f"{path}: ") and word in message, message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("steps: -5", "steps"),
        ('steps: "ten"', "steps"),
        ("steps: true", "steps"),
        ("lr: -1", "lr"),
        ("lr: .nan", "lr"),
        ("batch_size: 0", "batch_size"),
        ("batch_size: 2.5", "batch_size"),
        ("eval_every: 0", "eval_every"),
        ("progress: 3", "progress"),
        ("model: transformer", "model"),
        ("model_kwargs: [1, 2]", "model_kwargs"),
        ("stepz: 10", "stepz"),
    ],
)
def test_bad_config_values_name_the_file_and_field(tmp_path: Path, line: str, field: str) -> None:
    from training.config import TrainConfigError, load_train_config

    path = tmp_path / "config.yaml"
    path.write_text(f"model: unet\n{line}\n" if not line.startswith("model:") else line + "\n")
    with pytest.raises(TrainConfigError) as exc:
        load_train_config(str(path))
    message = one_line(exc)
    assert message.startswith(f"{path}: ") and field in message, message


def test_good_config_values_still_load(tmp_path: Path) -> None:
    from training.config import load_train_config

    path = tmp_path / "config.yaml"
    path.write_text("model: unet\nsteps: 20_000\nlr: 1e-3\nwarmup_steps: 0\n")
    config = load_train_config(str(path), {"steps": 30})
    assert (config.steps, config.lr, config.warmup_steps) == (30, 1e-3, 0)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_train_config(str(empty)).steps == 20_000


# What the dataclass TrainConfig (before training/config.py) wrote into every checkpoint for
# the defaults: old checkpoints must read, and compare equal when a run resumes.
OLD_DEFAULTS_DICT = {
    "model": "bsrnn_lite",
    "model_kwargs": {},
    "features": None,
    "compress_exponent": 0.3,
    "train_split": "train",
    "valid_split": "valid",
    "crop_frames": 256,
    "batch_size": 16,
    "num_workers": 2,
    "lr": 0.001,
    "min_lr": 1e-05,
    "warmup_steps": 500,
    "steps": 20000,
    "weight_decay": 0.0,
    "grad_clip": 5.0,
    "magnitude_weight": 0.7,
    "complex_weight": 0.3,
    "mrstft_weight": 0.0,
    "eval_every": 1000,
    "eval_examples": 8,
    "checkpoint_every": 1000,
    "log_every": 50,
    "progress": True,
    "seed": 0,
    "device": "auto",
    "amp": True,
}


def test_config_fields_defaults_and_dict_form_are_unchanged() -> None:
    from training.config import DEFAULT_MODEL, TrainConfig
    from training.models import DEFAULT_MODEL as MODELS_DEFAULT

    assert DEFAULT_MODEL == MODELS_DEFAULT  # the copy that keeps torch out of config imports
    assert TrainConfig().to_dict() == OLD_DEFAULTS_DICT
    assert list(TrainConfig().to_dict()) == list(OLD_DEFAULTS_DICT)
    assert TrainConfig.from_dict(OLD_DEFAULTS_DICT) == TrainConfig()
    config = TrainConfig.from_dict({"lr": "2e-3", "steps": 3.0e2, "model_kwargs": {"k": (1, 2)}})
    assert (config.lr, config.steps, type(config.steps)) == (2e-3, 300, int)
    assert json.loads(json.dumps(config.to_dict()))["model_kwargs"] == {"k": [1, 2]}


def test_config_errors_name_every_field_on_one_line() -> None:
    from training.config import TrainConfig, TrainConfigError

    with pytest.raises(TrainConfigError) as exc:
        TrainConfig.from_dict({"stepz": 10, "lr": -1, "batch_size": 0, "steps": "ten"})
    message = one_line(exc)
    assert "\n" not in str(exc.value)
    assert "unknown key 'stepz' (did you mean 'steps'?)" in message, message
    for field in ("lr: must be > 0", "batch_size: must be >= 1", "steps: must be a whole"):
        assert field in message, message
    with pytest.raises(TrainConfigError, match="a TrainConfig is a mapping"):
        TrainConfig.from_dict([("steps", 1)])
    config = TrainConfig()
    with pytest.raises(ValueError, match="steps"):
        config.steps = 0  # assignments are validated too
    assert config.steps == 20_000
