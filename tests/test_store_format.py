"""The store format module: the index schema comes from one label record, old stores still
read (a later column as NaN), another format version is refused in one line."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from dereverb_data.store_format import (
    FORMAT_VERSION,
    INDEX_COLUMNS,
    PLANNED_COLUMNS,
    ExampleLabels,
    StoreReadError,
    decode,
    encode,
    index_columns,
    open_store,
)

from .test_training import write_synthetic_store


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_store(tmp_path_factory.mktemp("format") / "store.zarr")


def labels(**changes: object) -> ExampleLabels:
    values = dict(
        example_id="a#0",
        fingerprint="f",
        frame_offset=0,
        gain=0.5,
        clean_gain=0.25,
        direct_index=40,
        gain_limited=False,
        rt60_t20=0.4,
        rt60_t30=0.41,
        drr_db=2.0,
        c50_db=8.0,
        distance_m=1.2,
        simulation="ism",
    )
    values.update(changes)
    return ExampleLabels(**values)  # type: ignore[arg-type]


def test_index_columns_are_the_planned_ones_and_the_indexed_label_fields() -> None:
    indexed = [f.name for f in dataclasses.fields(ExampleLabels) if f.metadata["index"]]
    assert [c.name for c in INDEX_COLUMNS] == [c.name for c in PLANNED_COLUMNS] + indexed
    dtypes = {c.name: c.dtype for c in INDEX_COLUMNS}
    assert dtypes["gain_limited"] == "bool" and dtypes["direct_index"] == "int64"
    assert dtypes["snr_db"] == dtypes["c80_db"] == "float64" and dtypes["speaker"] == "str"
    assert [c.name for c in INDEX_COLUMNS if c.optional] == ["c80_db", "snr_db"]
    assert {c.name: c.since for c in INDEX_COLUMNS if c.optional} == {
        "c80_db": "2026-12",
        "snr_db": "2026-12",
    }


def test_labels_round_trip_and_older_rows_lack_later_fields() -> None:
    row = labels(snr_db=12.5, noise="pink", noise_gain=0.1)
    assert ExampleLabels.from_json(row.to_json()) == row
    plain = labels().to_json()
    assert "noise" not in plain and "augmented" not in plain  # as without noise before
    assert plain["snr_db"] is None
    del plain["snr_db"], plain["c80_db"]  # a labels file written before they existed
    assert ExampleLabels.from_json(plain).snr_db is None
    assert ExampleLabels.from_json(plain).c80_db is None
    assert ExampleLabels.from_json(labels(c80_db=9.5).to_json()).c80_db == 9.5


def test_index_columns_type_values_and_missing_floats_are_nan() -> None:
    planned = {c.name: 0 for c in PLANNED_COLUMNS} | {"example_id": "a#0", "split": "train"}
    planned.update(utterance_id="u", speaker="s", rir_id="r", room_id="m", target_rt60=None)
    columns = index_columns([{**planned, **labels().index_values()}])
    assert np.isnan(columns["snr_db"][0]) and np.isnan(columns["target_rt60"][0])
    assert columns["gain_limited"].dtype == bool and columns["example_id"].dtype.kind == "U"
    with pytest.raises(KeyError):
        index_columns([planned])  # a label missing is an error, not a silent NaN
    later = {**planned, **labels().index_values()}
    del later["snr_db"], later["c80_db"]  # columns added later may be absent: NaN, as before
    assert np.isnan(index_columns([later])["snr_db"][0])
    assert np.isnan(index_columns([later])["c80_db"][0])


def test_a_store_without_a_later_column_reads_it_as_nan(synthetic: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.zarr"
    shutil.copytree(synthetic, old)
    shutil.rmtree(old / "index" / "snr_db")
    shutil.rmtree(old / "index" / "c80_db")
    store = open_store(old)
    for name in ("snr_db", "c80_db"):
        assert store.columns[name].shape == (store.n_examples,)
        assert np.isnan(store.columns[name]).all()


def test_another_format_version_is_refused_in_one_line(synthetic: Path, tmp_path: Path) -> None:
    other = tmp_path / "v2.zarr"
    shutil.copytree(synthetic, other)
    zarr.open_group(str(other), mode="r+").attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreReadError) as error:
        open_store(other)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(other))
    assert f"format version {FORMAT_VERSION + 1}" in message
    assert f"reads version {FORMAT_VERSION}" in message


def test_a_missing_index_column_is_named(synthetic: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.zarr"
    shutil.copytree(synthetic, broken)
    shutil.rmtree(broken / "index" / "drr_db")
    with pytest.raises(StoreReadError, match="index/drr_db is missing"):
        open_store(broken)


def test_decode_inverts_encode_and_keeps_infinite_parts_apart() -> None:
    spec = np.array([[1.5 - 2j, -0.0 + 0.25j]], dtype=np.complex64)
    for dtype in ("complex64", "float16"):
        np.testing.assert_array_equal(decode(encode(spec, dtype)), spec)
    pair = np.array([[1.0, np.inf]], dtype=np.float16)
    assert decode(pair)[0] == complex(1.0, np.inf)
