"""Validated table reading and atomic Parquet writing (pcvr.data.io)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pcvr.data.io import DataError, Kind, read_table, require_unique, require_values_in, write_parquet_atomic

COLUMNS = {"key": Kind.STRING, "count": Kind.INTEGER, "score": Kind.FLOAT}


def _assert_names(error: Exception, path: Path, field: str, row: int | None = None) -> None:
    message = str(error)
    assert "\n" not in message
    assert str(path) in message and repr(field) in message
    if row is not None:
        assert re.search(rf"\brow {row}\b", message), message


def _parquet(path: Path, **columns: pa.Array | list) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# --- write_parquet_atomic ---------------------------------------------------------------


def test_write_parquet_atomic_round_trips_and_leaves_no_temp_files(tmp_path):
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    target = tmp_path / "nested" / "dir" / "table.parquet"
    write_parquet_atomic(table, target)
    assert pq.read_table(target).equals(table)
    assert list(target.parent.iterdir()) == [target]


def test_write_parquet_atomic_replaces_existing_file(tmp_path):
    target = tmp_path / "table.parquet"
    write_parquet_atomic(pa.table({"a": [1]}), target)
    write_parquet_atomic(pa.table({"a": [2, 3]}), target)
    assert pq.read_table(target).column("a").to_pylist() == [2, 3]
    assert list(tmp_path.iterdir()) == [target]


def test_failed_write_keeps_old_file_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "table.parquet"
    write_parquet_atomic(pa.table({"a": [1]}), target)
    with pytest.raises(Exception):
        write_parquet_atomic("not a table", target)  # type: ignore[arg-type]
    assert pq.read_table(target).column("a").to_pylist() == [1]
    assert list(tmp_path.iterdir()) == [target]


# --- read_table -------------------------------------------------------------------------


def test_read_table_selects_and_orders_requested_columns(tmp_path):
    path = _parquet(tmp_path / "t.parquet", extra=[9, 9], score=[0.5, 1], count=[1, 2], key=["a", "b"])
    table = read_table(path, columns=COLUMNS)
    assert table.column_names == ["key", "count", "score"]
    assert table.column("score").to_pylist() == [0.5, 1.0]


def test_integers_are_accepted_as_floats(tmp_path):
    path = _parquet(tmp_path / "t.parquet", key=["a"], count=[1], score=[7])
    assert read_table(path, columns=COLUMNS).column("score").to_pylist() == [7]


def test_binary_kind(tmp_path):
    path = _parquet(tmp_path / "t.parquet", k=pa.array([b"\x00" * 32], type=pa.binary(32)))
    assert read_table(path, columns={"k": Kind.BINARY}).num_rows == 1
    with pytest.raises(DataError):
        read_table(path, columns={"k": Kind.STRING})


def test_allow_infinite_lets_inf_through_but_rejects_nan(tmp_path):
    path = _parquet(tmp_path / "t.parquet", key=["a", "b", "c"], count=[1, 2, 3], score=[0.1, math.inf, -math.inf])
    table = read_table(path, columns=COLUMNS, allow_infinite=("score",))
    assert table.column("score").to_pylist() == [0.1, math.inf, -math.inf]

    nan_path = _parquet(tmp_path / "nan.parquet", key=["a", "b", "c"], count=[1, 2, 3], score=[math.inf, 0.2, math.nan])
    with pytest.raises(DataError) as excinfo:
        read_table(nan_path, columns=COLUMNS, allow_infinite=("score",))
    _assert_names(excinfo.value, nan_path, "score", row=2)


def test_infinite_rejected_unless_allowed(tmp_path):
    path = _parquet(tmp_path / "t.parquet", key=["a", "b"], count=[1, 2], score=[0.1, -math.inf])
    with pytest.raises(DataError) as excinfo:
        read_table(path, columns=COLUMNS)
    _assert_names(excinfo.value, path, "score", row=1)
    # allow_infinite is per column: another column's exemption does not help.
    with pytest.raises(DataError):
        read_table(path, columns=COLUMNS, allow_infinite=("count",))


def test_null_named_with_row_across_row_groups(tmp_path):
    path = tmp_path / "t.parquet"
    counts = list(range(20))
    counts[13] = None
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(20)], "count": counts, "score": [0.0] * 20}), path, row_group_size=5)
    assert pq.ParquetFile(path).num_row_groups == 4
    with pytest.raises(DataError) as excinfo:
        read_table(path, columns=COLUMNS)
    _assert_names(excinfo.value, path, "count", row=13)


def test_missing_column_is_named(tmp_path):
    path = _parquet(tmp_path / "t.parquet", key=["a"], score=[0.1])
    with pytest.raises(DataError) as excinfo:
        read_table(path, columns=COLUMNS)
    _assert_names(excinfo.value, path, "count")


def test_wrong_type_is_named(tmp_path):
    path = _parquet(tmp_path / "t.parquet", key=["a"], count=[1.5], score=[0.1])
    with pytest.raises(DataError) as excinfo:
        read_table(path, columns=COLUMNS)
    _assert_names(excinfo.value, path, "count")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.parquet"
    with pytest.raises(DataError) as excinfo:
        read_table(path, columns=COLUMNS)
    assert str(path) in str(excinfo.value)


def test_unreadable_parquet_gives_one_line(tmp_path):
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"this is not parquet\n" * 10)
    with pytest.raises(DataError) as excinfo:
        read_table(path, columns=COLUMNS)
    assert str(path) in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# --- CSV --------------------------------------------------------------------------------


def test_csv_string_columns_stay_strings(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("key,count,score\n00123,1,0.5\n7,2,1\n")
    table = read_table(path, columns=COLUMNS)
    assert table.column("key").to_pylist() == ["00123", "7"]
    assert table.schema.field("key").type == pa.string()


def test_csv_missing_integer_named_with_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("key,count,score\na,1,0.5\nb,,0.5\n")
    with pytest.raises(DataError) as excinfo:
        read_table(path, columns=COLUMNS)
    _assert_names(excinfo.value, path, "count", row=1)


def test_csv_nan_float_named_with_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("key,count,score\na,1,0.5\nb,2,0.25\nc,3,NaN\n")
    with pytest.raises(DataError) as excinfo:
        read_table(path, columns=COLUMNS, allow_infinite=("score",))
    _assert_names(excinfo.value, path, "score", row=2)


def test_csv_empty_string_field_is_a_missing_value(tmp_path):
    """An empty CSV field in a string column is a missing value, like one in any other column."""
    path = tmp_path / "t.csv"
    path.write_text("key,count,score\na,1,0.5\n,2,0.5\n")
    with pytest.raises(DataError) as excinfo:
        read_table(path, columns=COLUMNS)
    _assert_names(excinfo.value, path, "key", row=1)


def test_csv_header_only_and_zero_bytes(tmp_path):
    header_only = tmp_path / "header.csv"
    header_only.write_text("key,count,score\n")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    for path in (header_only, empty):
        with pytest.raises(DataError) as excinfo:
            read_table(path, columns=COLUMNS)
        assert str(path) in str(excinfo.value) and "\n" not in str(excinfo.value)


# --- require_unique / require_values_in -------------------------------------------------


def test_require_unique_names_first_repeat(tmp_path):
    table = pa.table({"key": ["a", "b", "c", "b", "a"]})
    require_unique(pa.table({"key": ["a", "b", "c"]}), "key", path=tmp_path / "f")
    with pytest.raises(DataError) as excinfo:
        require_unique(table, "key", path=tmp_path / "f")
    message = str(excinfo.value)
    assert re.search(r"\brow 3\b", message) and "key" in message and "'b'" in message


def test_require_values_in_names_first_bad_row(tmp_path):
    table = pa.table({"level": ["low", "high", "mid", "huge"]})
    require_values_in(pa.table({"level": ["low", "high"]}), "level", ("low", "high", "mid"), path=tmp_path / "f")
    with pytest.raises(DataError) as excinfo:
        require_values_in(table, "level", ("low", "high", "mid"), path=tmp_path / "f")
    message = str(excinfo.value)
    assert re.search(r"\brow 3\b", message) and "'level'" in message and "'huge'" in message
