"""Tests of pcvr.platform.features: reading feature logs and exporting them to a clean room."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from pcvr.data import schema
from pcvr.data.io import DataError
from pcvr.models.features import cat_column, dense_column, hash_buckets
from pcvr.platform.features import export_for_clean_room, read_features, read_labelled
from pcvr.protocols.keys import pseudonymous_keys

BUCKETS = (97, 31, 11, 5, 7, 3, 5, 3)
SECRET = bytes(range(32))
RAW_ID_FLOOR = 10**11  # raw ids far above any bucket index, so they cannot hide among the encoded values


def feature_log(n: int, *, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns: dict[str, object] = {schema.CLICK_ID: [f"clk-{seed}-{i:06d}" for i in range(n)]}
    for name in schema.CATEGORICAL_FIELDS:
        columns[name] = rng.integers(RAW_ID_FLOOR, RAW_ID_FLOOR + 10**6, size=n, dtype=np.int64)
    for name in schema.DENSE_FIELDS:
        columns[name] = rng.normal(size=n)
    columns[schema.TIMESTAMP] = rng.integers(1_767_225_600, 1_767_225_600 + 86_400, size=n)
    return pa.table(columns)


def write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


# --- export_for_clean_room -------------------------------------------------------------------


def test_export_has_join_key_and_encoded_columns_only(tmp_path) -> None:
    log = feature_log(40)
    source = write(log, tmp_path / "features.parquet")
    out = tmp_path / "export" / "features.parquet"

    rows = export_for_clean_room(source, out, join_secret=SECRET, buckets=BUCKETS)

    assert rows == 40
    exported = pq.read_table(out)
    expected_columns = [schema.JOIN_KEY] + [cat_column(i) for i in range(len(BUCKETS))] + [
        dense_column(j) for j in range(len(schema.DENSE_FIELDS))
    ]
    assert exported.column_names == expected_columns
    assert exported.schema.field(schema.JOIN_KEY).type == pa.binary(32)
    keys = exported.column(schema.JOIN_KEY).to_pylist()
    assert keys == pseudonymous_keys(log.column(schema.CLICK_ID).to_pylist(), secret=SECRET)
    assert all(len(k) == 32 for k in keys) and len(set(keys)) == 40
    for i, (name, size) in enumerate(zip(schema.CATEGORICAL_FIELDS, BUCKETS)):
        expected = hash_buckets(log.column(name).to_numpy(), field_index=i, buckets=size)
        assert exported.column(cat_column(i)).to_pylist() == expected.tolist()
    for j, name in enumerate(schema.DENSE_FIELDS):
        np.testing.assert_array_equal(
            exported.column(dense_column(j)).to_numpy(), log.column(name).to_numpy().astype(np.float32)
        )


def test_export_contains_no_raw_id_column_or_value(tmp_path) -> None:
    log = feature_log(60, seed=3)
    source = write(log, tmp_path / "features.parquet")
    out = tmp_path / "features-export.parquet"
    export_for_clean_room(source, out, join_secret=SECRET, buckets=BUCKETS)

    exported = pq.read_table(out)
    for name in (schema.CLICK_ID, schema.USER_ID, schema.AD_ID, schema.ADVERTISER_ID, schema.TIMESTAMP):
        assert name not in exported.column_names
    raw_ids = set()
    for name in schema.CATEGORICAL_FIELDS:
        raw_ids |= set(log.column(name).to_pylist())
    for name in exported.column_names:
        if name != schema.JOIN_KEY:
            assert not set(exported.column(name).to_pylist()) & raw_ids, name
    click_ids = {c.encode() for c in log.column(schema.CLICK_ID).to_pylist()}
    assert not set(exported.column(schema.JOIN_KEY).to_pylist()) & click_ids
    # nor in the file's metadata (the Parquet footer is stored uncompressed)
    metadata = exported.schema.metadata or {}
    assert not any(name.encode() in b"".join([*metadata.keys(), *metadata.values()]) for name in ("click_id", "user_id"))
    blob = out.read_bytes()
    for name in (schema.CLICK_ID, schema.USER_ID, schema.AD_ID):
        assert name.encode() not in blob


def test_export_join_key_depends_on_secret_and_matches_advertiser_side(tmp_path) -> None:
    log = feature_log(10, seed=5)
    source = write(log, tmp_path / "features.parquet")
    export_for_clean_room(source, tmp_path / "a.parquet", join_secret=SECRET, buckets=BUCKETS)
    export_for_clean_room(source, tmp_path / "b.parquet", join_secret=b"another-secret-of-32-bytes-long!", buckets=BUCKETS)
    keys_a = pq.read_table(tmp_path / "a.parquet").column(schema.JOIN_KEY).to_pylist()
    keys_b = pq.read_table(tmp_path / "b.parquet").column(schema.JOIN_KEY).to_pylist()
    assert not set(keys_a) & set(keys_b)


def test_export_from_csv_keeps_click_ids_as_strings(tmp_path) -> None:
    log = feature_log(5, seed=1)
    click_ids = ["007", "7", "0070", "1e3", "000"]  # would collide or change if parsed as numbers
    log = log.set_column(0, schema.CLICK_ID, pa.array(click_ids))
    source = write(log, tmp_path / "features.csv")
    out = tmp_path / "export.parquet"
    assert export_for_clean_room(source, out, join_secret=SECRET, buckets=BUCKETS) == 5
    keys = pq.read_table(out).column(schema.JOIN_KEY).to_pylist()
    assert keys == pseudonymous_keys(click_ids, secret=SECRET)


def test_export_of_bad_log_writes_nothing(tmp_path) -> None:
    log = feature_log(6)
    log = log.set_column(0, schema.CLICK_ID, pa.array(["a", "b", "c", "d", "b", "e"]))
    source = write(log, tmp_path / "features.parquet")
    out = tmp_path / "export" / "features.parquet"
    with pytest.raises(DataError):
        export_for_clean_room(source, out, join_secret=SECRET, buckets=BUCKETS)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# --- read_features ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_read_features_rejects_duplicate_click_ids_naming_file_and_row(tmp_path, suffix: str) -> None:
    log = feature_log(6)
    log = log.set_column(0, schema.CLICK_ID, pa.array(["a", "b", "c", "d", "b", "e"]))
    source = write(log, tmp_path / f"features{suffix}")
    with pytest.raises(DataError) as caught:
        read_features(source)
    message = str(caught.value)
    assert "\n" not in message
    assert str(source) in message
    assert "row 4" in message
    assert schema.CLICK_ID in message


def test_read_features_returns_the_validated_columns(tmp_path) -> None:
    log = feature_log(8)
    extra = log.append_column("unused", pa.array(np.zeros(8)))
    table = read_features(write(extra, tmp_path / "features.parquet"))
    assert table.column_names == [schema.CLICK_ID, *schema.CATEGORICAL_FIELDS, *schema.DENSE_FIELDS, schema.TIMESTAMP]
    assert table.num_rows == 8
    assert table.column(schema.CLICK_ID).to_pylist() == log.column(schema.CLICK_ID).to_pylist()


@pytest.mark.parametrize(
    "mutation, field",
    [
        ("missing-column", schema.AD_ID),
        ("nan-dense", schema.DENSE_FIELDS[2]),
        ("float-categorical", schema.USER_ID),
    ],
)
def test_read_features_rejects_bad_columns(tmp_path, mutation: str, field: str) -> None:
    log = feature_log(5)
    index = log.schema.get_field_index(field)
    if mutation == "missing-column":
        log = log.remove_column(index)
    elif mutation == "nan-dense":
        values = log.column(field).to_numpy().copy()
        values[3] = np.nan
        log = log.set_column(index, field, pa.array(values))
    else:
        log = log.set_column(index, field, pa.array(log.column(field).to_numpy().astype(np.float64)))
    source = write(log, tmp_path / "features.parquet")
    with pytest.raises(DataError) as caught:
        read_features(source)
    assert str(source) in str(caught.value) and field in str(caught.value)


# --- read_labelled ---------------------------------------------------------------------------


def test_read_labelled_encodes_features_and_reads_truth(tmp_path) -> None:
    log = feature_log(12, seed=2)
    labels = np.array([0, 1] * 6, dtype=np.int8)
    truth = np.linspace(0.01, 0.5, 12)
    table = log.append_column(schema.LABEL, pa.array(labels)).append_column(schema.TRUE_PROB, pa.array(truth))
    features, got_labels, got_truth = read_labelled(write(table, tmp_path / "holdout.parquet"), buckets=BUCKETS)
    assert got_labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(got_truth, truth)
    assert features.categorical.dtype == torch.int64 and features.categorical.shape == (12, len(BUCKETS))
    expected = hash_buckets(log.column(schema.AD_ID).to_numpy(), field_index=1, buckets=BUCKETS[1])
    assert features.categorical[:, 1].tolist() == expected.tolist()


def test_read_labelled_single_class_raises(tmp_path) -> None:
    log = feature_log(4)
    table = log.append_column(schema.LABEL, pa.array(np.zeros(4, dtype=np.int8)))
    path = write(table, tmp_path / "holdout.parquet")
    with pytest.raises(DataError, match="single class"):
        read_labelled(path, buckets=BUCKETS)
