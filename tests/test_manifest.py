"""Tests for the dataset manifest schema (dereverb_data.manifest).

Every rejection must be a single ManifestError whose message names the source file and the
field path of each problem; typos in keys must never fall back to a default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from dereverb_data.manifest import (
    DemoCorpus,
    FolderCorpus,
    LhotseCorpus,
    Manifest,
    ManifestError,
    load_manifest,
    parse_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO_ROOT / "manifests").glob("*.yaml"))


def _base(**overrides: Any) -> dict[str, Any]:
    """A small valid manifest as a plain mapping (demo corpus, default rooms)."""
    data: dict[str, Any] = {"name": "unit", "seed": 3, "corpus": {"kind": "demo"}}
    return _merge(data, overrides)


def _merge(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _problem_lines(message: str) -> list[str]:
    return [line.strip() for line in message.splitlines() if line.strip().startswith("- ")]


# --------------------------------------------------------------------------- shipped manifests


def test_there_are_shipped_manifests() -> None:
    assert SHIPPED, "manifests/*.yaml should hold at least the demo manifest"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_manifest_loads(path: Path) -> None:
    manifest = load_manifest(path)
    assert isinstance(manifest, Manifest)
    assert manifest.name
    assert isinstance(manifest.corpus, DemoCorpus | FolderCorpus | LhotseCorpus)
    if isinstance(manifest.corpus, FolderCorpus):
        # The folder may not exist on this machine, but the path is resolved and absolute.
        assert Path(manifest.corpus.path).is_absolute()
    # Loading is idempotent: the same file gives the same validated content.
    assert load_manifest(path).digest() == manifest.digest()


def test_minimal_manifest_gets_documented_defaults() -> None:
    manifest = parse_manifest(_base(), "unit.yaml")
    assert manifest.sample_rate == 16000
    assert manifest.target.kind == "direct"
    assert manifest.stft.n_fft % manifest.stft.hop == 0
    assert manifest.storage.frames_per_shard % manifest.storage.frames_per_chunk == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"target": {"kind": "early", "early_ms": 50}},
        {"rooms": {"absorption": {"kind": "materials", "materials": [{"walls": "brickwork"}]}}},
        {"stft": {"n_fft": 512, "hop": 256}},
        {"storage": {"frames_per_chunk": 64, "frames_per_shard": 256}},
        {"splits": {"train": 0.5, "valid": 0.5, "test": 0.0}},
    ],
    ids=["early-target", "materials", "hop-256", "small-shards", "no-test-split"],
)
def test_valid_variants_are_accepted(overrides: dict[str, Any]) -> None:
    # Positive controls for the rejection cases below: the same fields with good values pass.
    manifest = parse_manifest(_base(**overrides), "unit.yaml")
    assert _subset(overrides, manifest.model_dump(mode="json"))


def _subset(wanted: Any, actual: Any) -> bool:
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(
            key in actual and _subset(value, actual[key]) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return len(wanted) == len(actual) and all(map(_subset, wanted, actual))
    return wanted == actual


# --------------------------------------------------------------------------- rejections

# (id, overrides, substrings the message must contain: the field path first)
REJECTIONS: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "top-level-typo",
        {"varients_per_utterance": 3},
        ["unknown key 'varients_per_utterance'", "did you mean 'variants_per_utterance'"],
    ),
    (
        "nested-typo-rooms",
        {"rooms": {"absorbtion": {"kind": "profile"}}},
        ["- rooms:", "unknown key 'absorbtion'", "did you mean 'absorption'"],
    ),
    (
        "nested-typo-corpus",
        {"corpus": {"kind": "folder", "path": "audio", "speakerz": {"kind": "regex"}}},
        ["- corpus:", "unknown key 'speakerz'", "did you mean 'speaker'"],
    ),
    ("wrong-type", {"sample_rate": "fast"}, ["- sample_rate:", "integer"]),
    ("negative-size", {"rooms": {"length_m": [-3, 5]}}, ["rooms.length_m", "greater than 0"]),
    (
        "reversed-range",
        {"rooms": {"length_m": [5, 3]}},
        ["- rooms.length_m:", "minimum above its maximum"],
    ),
    (
        "rt60-too-short-for-largest-room",
        {"rooms": {"rt60_s": [0.03, 1.0]}},
        ["- rooms.rt60_s:", "0.03 s", "largest room"],
    ),
    (
        "rt60-too-long-for-smallest-room",
        {"rooms": {"rt60_s": [0.3, 10.0]}},
        ["- rooms.rt60_s:", "10.0 s", "smallest room"],
    ),
    (
        "distance-does-not-fit",
        {"rooms": {"distance_m": [5.0, 6.0]}},
        ["- rooms.distance_m:", "5.0 m", "smallest room"],
    ),
    (
        "early-window-zero",
        {"target": {"kind": "early", "early_ms": 0}},
        ["- target.early_ms:", "(0, 500]"],
    ),
    ("early-without-window", {"target": {"kind": "early"}}, ["- target.early_ms:", "early"]),
    (
        "splits-do-not-sum-to-one",
        {"splits": {"train": 0.8, "valid": 0.3, "test": 0.1}},
        ["- splits:", "add up to 1", "1.2"],
    ),
    ("hop-not-dividing-n-fft", {"stft": {"n_fft": 512, "hop": 100}}, ["- stft.hop:", "100"]),
    (
        "shard-not-multiple-of-chunk",
        {"storage": {"frames_per_chunk": 512, "frames_per_shard": 1000}},
        ["- storage.frames_per_shard:", "1000", "frames_per_chunk 512"],
    ),
    (
        "unknown-material",
        {"rooms": {"absorption": {"kind": "materials", "materials": [{"walls": "brickwrok"}]}}},
        ["- rooms.absorption:", "unknown material 'brickwrok'", "did you mean 'brickwork'"],
    ),
    (
        "tail-too-short",
        {"render": {"tail_ms": 5}},
        ["render.tail_ms", "5.0 ms", "farthest source"],
    ),
    (
        "source-above-ceiling",
        {"rooms": {"source_height_m": [1.2, 3.0]}},
        ["- rooms.source_height_m:", "3.0 m", "ceiling"],
    ),
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_bad_field_is_rejected_naming_it(overrides: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(_base(**overrides), "bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml: ")
    assert "(1 problem(s))" in message, message
    assert len(_problem_lines(message)) == 1, message
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_bad_field_in_yaml_file_names_file_and_field(
    tmp_path: Path, overrides: dict[str, Any], expected: list[str]
) -> None:
    path = _write(tmp_path / "bad.yaml", _base(**overrides))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


def test_level_above_0_dbfs_names_level_rms_dbfs_once() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(_base(level={"rms_dbfs": [-30, 5]}), "bad.yaml")
    message = str(info.value)
    assert "at most 0 dBFS" in message
    assert "- level.rms_dbfs: " in message, message


def test_invalid_yaml_text_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: demo\nseed: [1, 2\ncorpus: {kind: demo}\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "not valid YAML" in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "missing.yaml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message
    assert "cannot read" in message


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- name: demo\n- seed: 1\n", "list"), ("just a string\n", "str"), ("", "NoneType")],
    ids=["list", "scalar", "empty-file"],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "shape.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "mapping" in message
    assert kind in message


def test_parse_manifest_rejects_a_list_naming_the_source() -> None:
    with pytest.raises(ManifestError, match=r"^cfg\.yaml: expected a mapping"):
        parse_manifest([{"name": "x"}], "cfg.yaml")


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest({"corpus": {"kind": "demo"}}, "cfg.yaml")
    message = str(info.value)
    assert "(2 problem(s))" in message
    assert "- name:" in message
    assert "- seed:" in message


def test_unknown_corpus_kind_is_named() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(_base(corpus={"kind": "librispeech"}), "cfg.yaml")
    assert "corpus" in str(info.value)
    assert "librispeech" in str(info.value)


def test_several_problems_are_all_reported_in_one_message(tmp_path: Path) -> None:
    data = _base(
        smaple_rate=16000,
        variants_per_utterance=0,
        rooms={"length_m": [5, 3], "absorbtion": {}},
        stft={"hop": 100},
        storage={"frames_per_chunk": 512, "frames_per_shard": 1000},
        splits={"train": 0.9, "valid": 0.1, "test": 0.1},
        corpus={"kind": "folder", "path": "audio", "speakerz": {}},
    )
    path = _write(tmp_path / "many.yaml", data)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    lines = _problem_lines(message)
    assert message.startswith(f"{path}: ")
    assert f"({len(lines)} problem(s))" in message
    expected = [
        "unknown key 'smaple_rate' (did you mean 'sample_rate'?)",
        "- variants_per_utterance:",
        "- rooms.length_m:",
        "unknown key 'absorbtion' (did you mean 'absorption'?)",
        "- stft.hop:",
        "- storage.frames_per_shard:",
        "- splits:",
        "unknown key 'speakerz' (did you mean 'speaker'?)",
    ]
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    assert len(lines) == len(expected), message


# --------------------------------------------------------------------------- digest


DIGEST_A = """\
# comment at the top
name: digest
seed: 11
corpus: {kind: demo, speakers: 3}
rooms:
  positions_per_room: 2   # trailing comment
  length_m: [4.0, 8.0]
stft: {n_fft: 512, hop: 128}
"""

DIGEST_B = """\
stft:
  hop: 128
  n_fft: 512
rooms:
  length_m:
    - 4
    - 8
  positions_per_room: 2
corpus:
  speakers: 3
  kind: demo
seed: 11
sample_rate: 16000   # the default, written out
name: digest
"""


def test_digest_ignores_key_order_comments_and_spelled_out_defaults(tmp_path: Path) -> None:
    a = load_manifest(_write_text(tmp_path / "a.yaml", DIGEST_A))
    b = load_manifest(_write_text(tmp_path / "b.yaml", DIGEST_B))
    assert a.digest() == b.digest()
    assert a.digest() == a.digest()
    assert len(a.digest()) == 64


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("seed: 11", "seed: 12"),
        ("positions_per_room: 2", "positions_per_room: 3"),
        ("length_m: [4.0, 8.0]", "length_m: [4.0, 8.5]"),
        ("speakers: 3", "speakers: 4"),
    ],
)
def test_digest_changes_when_a_value_changes(tmp_path: Path, old: str, new: str) -> None:
    assert old in DIGEST_A
    a = load_manifest(_write_text(tmp_path / "a.yaml", DIGEST_A))
    changed = load_manifest(_write_text(tmp_path / "c.yaml", DIGEST_A.replace(old, new)))
    assert a.digest() != changed.digest()


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- corpus paths


def _folder_manifest(corpus_path: str) -> dict[str, Any]:
    return _base(corpus={"kind": "folder", "path": corpus_path})


def test_relative_corpus_path_is_relative_to_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "configs" / "m.yaml", _folder_manifest("../audio/clean"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    manifest = load_manifest(path)
    assert isinstance(manifest.corpus, FolderCorpus)
    assert Path(manifest.corpus.path) == (tmp_path / "audio" / "clean").resolve()


def test_relative_manifest_path_and_corpus_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "configs" / "m.yaml", _folder_manifest("corpus"))
    monkeypatch.chdir(tmp_path)
    manifest = load_manifest("configs/m.yaml")
    assert Path(manifest.corpus.path) == (tmp_path / "configs" / "corpus").resolve()


def test_absolute_corpus_path_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "somewhere" / "audio"
    path = _write(tmp_path / "configs" / "m.yaml", _folder_manifest(str(target)))
    manifest = load_manifest(path)
    assert Path(manifest.corpus.path) == target


def test_home_corpus_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = _write(tmp_path / "configs" / "m.yaml", _folder_manifest("~/corpus"))
    manifest = load_manifest(path)
    assert Path(manifest.corpus.path) == tmp_path / "home" / "corpus"


def test_parse_manifest_leaves_corpus_path_untouched() -> None:
    # Only load_manifest knows the file's folder; parse_manifest keeps what it is given.
    manifest = parse_manifest(_folder_manifest("audio"), "cfg.yaml")
    assert manifest.corpus.path == "audio"
