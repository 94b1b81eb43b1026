"""Fault cases as a user meets them: each ends in one readable line and exit status 2, and
nothing already built (the store) or owned by the user (their files) changes.

Real processes through the ``dereverb`` command; a real Prefect server where the error is
raised inside the build flow. The library-level halves of these cases live in
``test_faults_store.py`` (damaged stores, locks) and ``test_faults_training.py`` (checkpoints,
enhance outputs, training configs).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
import zarr

from dereverb_data.demo_corpus import synthesize_utterance

from .conftest import DEMO_MANIFEST, REPO, run_cli


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path: "nothing changed" means equal."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one non-empty stderr line starting ``error:``."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(("error:", "dereverb")), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    _record(result, lines[0])
    return lines[0]


def _record(result: subprocess.CompletedProcess, line: str) -> None:
    """For ``benchmarks/fault_table.py``: what each case printed (only when it asks)."""
    path = os.environ.get("DEREVERB_FAULT_RECORD")
    if not path:
        return
    args = [str(a) for a in result.args]
    if "flows.cli" in args:
        args = ["dereverb", *args[args.index("flows.cli") + 1 :]]
    case = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    with open(path, "a") as handle:
        record = {"case": case, "command": args, "line": line, "exit": result.returncode}
        handle.write(json.dumps(record) + "\n")


@pytest.fixture
def demo_copy(demo_store: str, tmp_path: Path) -> Path:
    """A private copy of the built demo store, so a test may try to damage it."""
    copy = tmp_path / "demo.zarr"
    shutil.copytree(demo_store, copy)
    return copy


def write_manifest(tmp_path: Path, file_name: str = "m.yaml", **changes) -> Path:
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for part in parents:
            node = node[part]
        node[key] = value
    path = tmp_path / file_name
    path.write_text(yaml.safe_dump(data))
    return path


def folder_manifest(tmp_path: Path, corpus: Path) -> Path:
    return write_manifest(
        tmp_path,
        "folder.yaml",
        name="faults",
        corpus={
            "kind": "folder",
            "path": str(corpus),
            "pattern": "**/*.wav",
            "speaker": {"kind": "parent_dir", "level": 1},
        },
        variants_per_utterance=1,
        splits={"train": 0.34, "valid": 0.33, "test": 0.33},
    )


# -- build: inputs and the store ------------------------------------------------------------


def test_corpus_without_files_or_not_a_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    store = tmp_path / "s.zarr"
    result = run_cli("build", str(folder_manifest(tmp_path, empty)), "--store", str(store))
    assert_one_line_error(result, "corpus.path", "no files match", str(empty))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a corpus")
    result = run_cli("build", str(folder_manifest(tmp_path, a_file)), "--store", str(store))
    assert_one_line_error(result, "corpus.path", "is not a folder")
    assert not store.exists()  # refused before any work
    assert a_file.read_text() == "not a corpus"


def test_store_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "precious.bin"
    target.write_bytes(b"user data")
    result = run_cli("build", str(DEMO_MANIFEST), "--store", str(target))
    assert_one_line_error(result, str(target), "is a file")
    assert target.read_bytes() == b"user data"


def _read_only_command(store: Path, command: list[str]) -> list[str]:
    """``command`` run where ``store`` is read-only: for root (who writes anywhere, whatever
    the permissions) a read-only bind mount in a private mount namespace; else permissions."""
    if os.geteuid() != 0:
        for path in [store, *store.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        return command
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("root without mount namespaces: cannot make a read-only store here")
    quoted = " ".join(shlex.quote(part) for part in command)
    mount = f"mount --bind {store} {store} && mount -o remount,ro,bind {store}"
    return ["unshare", "--mount", "sh", "-c", f"{mount} && exec {quoted}"]


def test_read_only_store(tmp_path: Path, demo_store: str) -> None:
    store = tmp_path / "demo.zarr"
    shutil.copytree(demo_store, store)
    before = tree_digest(store)
    command = [sys.executable, "-m", "flows.cli", "build", str(DEMO_MANIFEST), "--store"]
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run(
        _read_only_command(store, [*command, str(store)]),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(result, str(store), "read-only")
    for path in [store, *store.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert tree_digest(store) == before


def test_another_layout_is_refused_inside_the_flow(demo_copy: Path, prefect_api: str) -> None:
    before = tree_digest(demo_copy)
    manifest = write_manifest(demo_copy.parent, storage__frames_per_chunk=128)
    result = run_cli(
        "build", str(manifest), "--store", str(demo_copy), "--workers", "1", api_url=prefect_api
    )
    assert_one_line_error(result, "another layout", "frames_per_chunk")
    assert tree_digest(demo_copy) == before


@pytest.mark.parametrize(
    ("change", "named"),
    [({"seed": 7}, "seed"), ({"name": "someone-else"}, "name")],
)
def test_another_dataset_needs_replace(demo_copy: Path, change: dict, named: str) -> None:
    before = tree_digest(demo_copy)
    manifest = write_manifest(demo_copy.parent, **change)
    result = run_cli("build", str(manifest), "--store", str(demo_copy))
    line = assert_one_line_error(result, "holds another dataset", named, "--replace")
    assert str(next(iter(change.values()))) in line  # names the new value
    assert tree_digest(demo_copy) == before


def test_replace_rebuilds_as_the_new_dataset(demo_copy: Path) -> None:
    from dereverb_data.build import build_serial
    from dereverb_data.manifest import load_manifest
    from dereverb_data.store_format import StoreError

    manifest = load_manifest(write_manifest(demo_copy.parent, seed=7))
    with pytest.raises(StoreError, match="another dataset"):
        build_serial(manifest, str(demo_copy))  # the flow's own planning step refuses too
    report = build_serial(manifest, str(demo_copy), replace=True)
    assert report["counts"]["examples_rendered"] > 0
    group = zarr.open_group(str(demo_copy), mode="r")
    assert group.attrs["manifest"]["seed"] == 7 and group.attrs["complete"]


def test_editing_rooms_is_not_another_dataset(demo_copy: Path) -> None:
    from dereverb_data.manifest import load_manifest
    from dereverb_data.preflight import check_same_dataset

    edited = load_manifest(write_manifest(demo_copy.parent, rooms__positions_per_room=3))
    check_same_dataset(str(demo_copy), edited)  # an edit: no error


def test_store_held_by_another_build(demo_copy: Path, prefect_api: str) -> None:
    from dereverb_data.lock import build_lock

    before = tree_digest(demo_copy)
    with build_lock(str(demo_copy)):
        lock = (demo_copy / "_build" / "lock.json").read_bytes()
        result = run_cli(
            "build",
            str(DEMO_MANIFEST),
            "--store",
            str(demo_copy),
            "--workers",
            "1",
            api_url=prefect_api,
        )
        assert (demo_copy / "_build" / "lock.json").read_bytes() == lock  # not taken over
    assert_one_line_error(result, "another build holds this store", f"pid {os.getpid()}")
    assert tree_digest(demo_copy) == before


def _limit_file_size(limit: int):
    def apply() -> None:
        # A full disk, as one process sees it: writes past the limit fail with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_mid_build_then_resume(tmp_path: Path, demo_store: str, prefect_api: str) -> None:
    store = tmp_path / "s.zarr"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    command = [sys.executable, "-m", "flows.cli", "build", str(DEMO_MANIFEST)]
    command += ["--store", str(store), "--workers", "1"]
    full = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit_file_size(1_000_000),
    )
    assert_one_line_error(full, "File too large", "rerun the same command to resume")
    resumed = run_cli(*command[3:], api_url=prefect_api)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    built = zarr.open_group(str(store), mode="r")
    reference = zarr.open_group(demo_store, mode="r")
    assert list(built["shard_checksums"][:]) == list(reference["shard_checksums"][:])


def test_unreachable_dask_scheduler(tmp_path: Path) -> None:
    result = run_cli(
        "build",
        str(DEMO_MANIFEST),
        "--store",
        str(tmp_path / "s.zarr"),
        "--dask-address",
        "tcp://127.0.0.1:9",
    )
    assert_one_line_error(result, "--dask-address", "127.0.0.1:9", "no Dask scheduler")
    assert not (tmp_path / "s.zarr").exists()


# -- manifests and options ------------------------------------------------------------------


def test_non_utf8_manifest(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(DEMO_MANIFEST.read_text().replace("demo", "d\xe9mo").encode("latin-1"))
    result = run_cli("plan", str(path))
    assert_one_line_error(result, str(path), "not UTF-8")


@pytest.mark.parametrize("value", [True, "3"])
def test_seed_must_be_a_number(tmp_path: Path, value: object) -> None:
    result = run_cli("plan", str(write_manifest(tmp_path, seed=value)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "seed" in result.stderr


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_workers_must_be_positive(tmp_path: Path, workers: str) -> None:
    result = run_cli(
        "build", str(DEMO_MANIFEST), "--store", str(tmp_path / "s.zarr"), "--workers", workers
    )
    assert_one_line_error(result, "--workers")
    assert not (tmp_path / "s.zarr").exists()


def test_corpus_option_on_a_demo_manifest(tmp_path: Path) -> None:
    result = run_cli("plan", str(DEMO_MANIFEST), "--corpus", str(tmp_path))
    line = assert_one_line_error(result, "--corpus", "'demo'")
    assert "did you mean" not in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("--debug", "plan", str(tmp_path / "missing.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr
    result = run_cli("plan", str(tmp_path / "missing.yaml"))
    assert_one_line_error(result, "missing.yaml")


def test_inspect_example_out_of_range(demo_store: str, tmp_path: Path) -> None:
    result = run_cli("inspect", demo_store, "--plot", str(tmp_path / "p.png"), "--example", "48")
    assert_one_line_error(result, "--example 48", "48 examples")
    assert not (tmp_path / "p.png").exists()


def test_evaluate_without_data(tmp_path: Path) -> None:
    result = run_cli("evaluate", "--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path))
    assert_one_line_error(result, "--data", "--speech", "--rirs")


# -- a build that succeeds, with bad and clipped files beside good ones ----------------------


def test_successful_build_is_quiet_and_lists_each_bad_file_once(
    tmp_path: Path, prefect_api: str
) -> None:
    corpus = tmp_path / "corpus"
    for n, speaker in enumerate(("demo_f1", "demo_m1", "demo_f2")):
        (corpus / f"spk{n}").mkdir(parents=True)
        for index in range(2):
            x = synthesize_utterance(speaker, index, 16000, 2.0)
            sf.write(corpus / f"spk{n}" / f"u{index}.wav", x, 16000)
    loud = synthesize_utterance("demo_m1", 7, 16000, 2.0)
    sf.write(corpus / "spk1" / "loud.wav", np.clip(loud * 50, -1, 1), 16000)
    whole = (corpus / "spk2" / "u0.wav").read_bytes()
    (corpus / "spk2" / "cut.wav").write_bytes(whole[: len(whole) // 2])  # a half-copied file
    sf.write(corpus / "spk0" / "silent.wav", np.zeros(32000, np.float32), 16000)
    before = tree_digest(corpus)
    store = tmp_path / "s.zarr"
    command = ["build", str(folder_manifest(tmp_path, corpus)), "--store", str(store)]
    result = run_cli(*command, "--workers", "1", api_url=prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "| INFO" not in output
    for name, reason in (("cut.wav", "truncated"), ("silent.wav", "silent")):
        assert output.count(name) == 1, output
        line = next(x for x in result.stdout.splitlines() if name in x)
        assert line.startswith("quarantined:") and reason in line
    assert f"clipped source (kept, flagged): {corpus / 'spk1' / 'loud.wav'}" in result.stdout
    described = run_cli("inspect", str(store))
    assert described.returncode == 0 and "loud.wav" in described.stdout
    assert "cut.wav: truncated" in described.stdout
    assert tree_digest(corpus) == before  # the user's files are untouched


def test_rt60_range_the_rooms_cannot_reach_warns(tmp_path: Path) -> None:
    from dereverb_data.build import RT60_IN_RANGE_MIN, build_serial
    from dereverb_data.manifest import load_manifest

    manifest = load_manifest(write_manifest(tmp_path, rooms__rt60_s=[0.1, 0.15]))
    report = build_serial(manifest, str(tmp_path / "s.zarr"))
    share = report["summary"]["rt60_in_requested_range"]
    assert share < RT60_IN_RANGE_MIN
    assert len(report["warnings"]) == 1 and f"{share:.0%}" in report["warnings"][0]
    saved = json.loads((tmp_path / "s.zarr" / "_build" / "report.json").read_text())
    assert saved["warnings"] == report["warnings"]


# -- training, evaluation and enhancement through the command --------------------------------


def test_bad_training_config_via_then_train(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("steps: [1, 2\nlr: 0.1\n")
    result = run_cli(
        "build",
        str(DEMO_MANIFEST),
        "--store",
        str(tmp_path / "s.zarr"),
        "--then-train",
        str(config),
    )
    assert_one_line_error(result, str(config))
    assert not (tmp_path / "s.zarr").exists()


def test_train_on_an_incomplete_store(demo_copy: Path, tmp_path: Path) -> None:
    group = zarr.open_group(str(demo_copy), mode="r+")
    group.attrs["complete"] = False
    out = tmp_path / "run"
    result = run_cli("train", "--data", str(demo_copy), "--out", str(out), "--steps", "1")
    assert_one_line_error(result, str(demo_copy))
    assert not out.exists()  # no empty run folder left behind


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dereverb-pwned",))


@pytest.mark.parametrize("kind", ["text", "empty", "tensor", "pickle"])
def test_checkpoint_that_is_not_one(tmp_path: Path, kind: str) -> None:
    import torch

    checkpoint = tmp_path / "c.pt"
    if kind == "text":
        checkpoint.write_text("hello")
    elif kind == "empty":
        checkpoint.write_bytes(b"")
    elif kind == "tensor":
        torch.save(torch.zeros(3), checkpoint)
    else:
        checkpoint.write_bytes(pickle.dumps(_Exploit()))
    audio = tmp_path / "a.wav"
    sf.write(audio, synthesize_utterance("demo_f1", 0, 16000, 1.0), 16000)
    before = tree_digest(tmp_path)
    out = tmp_path / "out"
    result = run_cli("enhance", "--checkpoint", str(checkpoint), str(audio), "--out", str(out))
    line = assert_one_line_error(result, str(checkpoint))
    assert "weights_only=False" not in line
    assert not Path("/tmp/dereverb-pwned").exists()
    assert tree_digest(tmp_path) == before


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-step checkpoint of a tiny model (on a small synthetic store)."""
    from training.train import train

    from .test_training import tiny_config, write_synthetic_store

    root = tmp_path_factory.mktemp("ckpt")
    store = write_synthetic_store(root / "synthetic.zarr")
    train(tiny_config(steps=2, eval_examples=0, checkpoint_every=2), str(store), root / "run")
    return root / "run" / "checkpoint.pt"


def _two_folders_with_x(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    for n, folder in enumerate((a, b)):
        folder.mkdir()
        sf.write(folder / "x.wav", synthesize_utterance("demo_f1", n, 16000, 1.0), 16000)
    return a / "x.wav", b / "x.wav"


def test_enhance_never_writes_over_another_input(checkpoint: Path, tmp_path: Path) -> None:
    first, second = _two_folders_with_x(tmp_path)
    before = tree_digest(tmp_path)
    result = run_cli(
        "enhance",
        "--checkpoint",
        str(checkpoint),
        str(first),
        str(second),
        "--out",
        str(second.parent),
    )
    assert_one_line_error(result, str(second))
    assert tree_digest(tmp_path) == before  # nothing written, the original b/x.wav intact


def test_enhance_refuses_two_inputs_with_one_output_name(checkpoint: Path, tmp_path: Path) -> None:
    first, second = _two_folders_with_x(tmp_path)
    out = tmp_path / "o"
    result = run_cli(
        "enhance", "--checkpoint", str(checkpoint), str(first), str(second), "--out", str(out)
    )
    assert_one_line_error(result, str(first), str(second))
    assert not out.exists() or not any(out.iterdir())


def test_enhance_of_a_nan_file_leaves_no_partial(checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "in" / "nan.wav"
    source.parent.mkdir()
    signal_ = synthesize_utterance("demo_f1", 0, 16000, 2.0)
    signal_[20000] = np.nan
    sf.write(source, signal_, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    result = run_cli("enhance", "--checkpoint", str(checkpoint), str(source), "--out", str(out))
    assert_one_line_error(result, str(source), "NaN")
    assert not out.exists() or not any(out.iterdir())  # no .partial, no output


# -- verify and repair on damaged metadata ---------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("root_json", "zarr.json"),
        ("shard_checksums", "shard_checksums"),
        ("index_column", "index/rt60_t30"),
    ],
)
def test_verify_and_repair_of_damaged_metadata(
    demo_copy: Path, prefect_api: str, damage: str, named: str
) -> None:
    if damage == "root_json":
        (demo_copy / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    elif damage == "shard_checksums":
        shutil.rmtree(demo_copy / "shard_checksums")
    else:
        shutil.rmtree(demo_copy / "index" / "rt60_t30")
    before = tree_digest(demo_copy)
    verify = run_cli("verify", str(demo_copy))
    assert_one_line_error(verify, str(demo_copy), named.split("/")[0])
    repair = run_cli(
        "build",
        str(DEMO_MANIFEST),
        "--store",
        str(demo_copy),
        "--repair",
        "--workers",
        "1",
        api_url=prefect_api,
    )
    if repair.returncode == 0:  # the index and checksums are derived data: rebuilt, verified
        assert run_cli("verify", str(demo_copy)).returncode == 0
    else:
        assert_one_line_error(repair, str(demo_copy))
        assert tree_digest(demo_copy) == before


def test_train_config_with_bad_values(tmp_path: Path, demo_store: str) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("steps: -5\n")
    out = tmp_path / "run"
    result = run_cli("train", "--data", demo_store, "--out", str(out), "--config", str(config))
    assert_one_line_error(result, str(config), "steps")
    assert not out.exists()


def test_a_store_finalized_before_later_columns_still_verifies(demo_copy: Path) -> None:
    """Stores built before ``snr_db`` existed have no such column: still whole, not damaged."""
    shutil.rmtree(demo_copy / "index" / "snr_db")
    result = run_cli("verify", str(demo_copy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok:")
