"""Streaming readers (pcvr.data.readers): chunks with their true rows, formats, checks, duplicate keys."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pcvr.data.io import DataError
from pcvr.data.readers import DuplicateKeys, Role, RowIndex, iter_chunks, key_bytes, label_values, map_values, split_keys
from pcvr.data.spec import CRITEO_COLUMNS, Format

COLUMNS = {"id": Role.CLICK_ID, "cat": Role.CATEGORICAL, "x": Role.DENSE, "y": Role.VALUE}


def _assert_names(error: Exception, path: Path, column: str | None, row: int | None) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    if column is not None:
        assert repr(column) in message, message
    if row is not None:
        assert re.search(rf"\brow {row}\b", message), message


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _rows(n: int) -> str:
    return "id,cat,x,y\n" + "".join(f"c{i},k{i % 7},{i / 2},{i % 2}\n" for i in range(n))


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_csv_chunks_carry_their_file_and_row(tmp_path, chunk_rows):
    path = _csv(tmp_path / "a.csv", _rows(23))
    chunks = list(iter_chunks([path], fmt=Format.CSV, columns=COLUMNS, chunk_rows=chunk_rows))
    assert all(len(c) <= chunk_rows for c in chunks)
    assert [c.start for c in chunks] == list(range(0, 23, chunk_rows))
    ids = [v for c in chunks for v in c.table.column("id").to_pylist()]
    assert ids == [f"c{i}" for i in range(23)]
    assert chunks[-1].table.schema.field("x").type == pa.float64()
    assert chunks[-1].table.schema.field("cat").type == pa.string()


def test_rows_count_over_several_files_and_a_directory(tmp_path):
    first = _csv(tmp_path / "a.csv", _rows(5))
    folder = tmp_path / "more"
    folder.mkdir()
    for name, n in (("b.parquet", 4), ("a.parquet", 3)):
        pq.write_table(pa.table({"id": [f"{name}{i}" for i in range(n)], "cat": [1] * n, "x": [0.5] * n, "y": [1] * n}), folder / name)
    (folder / "notes.txt").write_text("ignored")
    chunks = list(iter_chunks([folder], fmt=Format.PARQUET, columns=COLUMNS, chunk_rows=2))
    assert [(c.path.name, c.start, c.first_row) for c in chunks] == [
        ("a.parquet", 0, 0), ("a.parquet", 2, 2), ("b.parquet", 0, 3), ("b.parquet", 2, 5),
    ]
    index = RowIndex()
    for chunk in chunks:
        index.add(chunk)
    assert index.locate(4) == (folder / "b.parquet", 1)
    csv_chunks = list(iter_chunks([first, first], fmt=Format.CSV, columns=COLUMNS, chunk_rows=3))
    assert [(c.start, c.first_row) for c in csv_chunks] == [(0, 0), (3, 3), (0, 5), (3, 8)]


def test_criteo_tsv_has_fixed_columns_and_empty_is_missing(tmp_path):
    line = ["1", "5", ""] + [""] * 11 + ["68fd1e64", ""] + ["a"] * 24
    assert len(line) == len(CRITEO_COLUMNS)
    path = tmp_path / "day.tsv"
    path.write_text("\t".join(line) + "\n" + "\t".join(["0"] + ["2"] * 13 + ["ff"] * 26) + "\n")
    columns = {"label": Role.VALUE, "I1": Role.DENSE, "I2": Role.DENSE, "C1": Role.CATEGORICAL, "C2": Role.CATEGORICAL}
    (chunk,) = iter_chunks([path], fmt=Format.CRITEO_TSV, columns=columns, chunk_rows=10)
    assert chunk.table.column("I1").to_pylist() == [5.0, 2.0]
    assert chunk.table.column("I2").to_pylist() == [None, 2.0]
    assert chunk.table.column("C1").to_pylist() == ["68fd1e64", "ff"] and chunk.table.column("C2").to_pylist() == [None, "ff"]
    assert chunk.table.column("label").to_pylist() == ["1", "0"]


def test_criteo_row_with_too_few_fields_is_one_line(tmp_path):
    path = tmp_path / "day.tsv"
    path.write_text("1\t2\t3\n")
    with pytest.raises(DataError) as caught:
        list(iter_chunks([path], fmt=Format.CRITEO_TSV, columns={"label": Role.VALUE}, chunk_rows=10))
    _assert_names(caught.value, path, None, None)


def test_unknown_column_lists_the_file_columns(tmp_path):
    path = _csv(tmp_path / "a.csv", "id,cat,price\nc0,k,1\n")
    with pytest.raises(DataError) as caught:
        list(iter_chunks([path], fmt=Format.CSV, columns=COLUMNS, chunk_rows=10))
    _assert_names(caught.value, path, "x", None)
    assert "(the file has 'id', 'cat', 'price')" in str(caught.value)


def test_csv_value_that_is_not_a_number_names_its_row(tmp_path):
    text = _rows(40).replace("c33,k5,16.5,", "c33,k5,n/a,")
    path = _csv(tmp_path / "a.csv", text)
    with pytest.raises(DataError) as caught:
        list(iter_chunks([path], fmt=Format.CSV, columns=COLUMNS, chunk_rows=16))
    _assert_names(caught.value, path, "x", 33)
    assert "'n/a'" in str(caught.value)


def test_parquet_column_of_the_wrong_type(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": ["a"], "cat": [1.5], "x": [1.0], "y": [1]}), path)
    with pytest.raises(DataError) as caught:
        list(iter_chunks([path], fmt=Format.PARQUET, columns=COLUMNS, chunk_rows=10))
    _assert_names(caught.value, path, "cat", None)
    assert "expected string or integer" in str(caught.value)


@pytest.mark.parametrize("content", ["", "id,cat,x,y\n"])
def test_empty_csv_files(tmp_path, content):
    path = _csv(tmp_path / "a.csv", content)
    with pytest.raises(DataError, match="has no rows") as caught:
        list(iter_chunks([path], fmt=Format.CSV, columns=COLUMNS, chunk_rows=10))
    _assert_names(caught.value, path, None, None)


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(iter_chunks([tmp_path / "absent.csv"], fmt=Format.CSV, columns=COLUMNS, chunk_rows=10))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .parquet file"):
        list(iter_chunks([tmp_path / "empty"], fmt=Format.PARQUET, columns=COLUMNS, chunk_rows=10))


def test_values_are_compared_as_strings(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "cat": [1, 2, 3], "x": [0.0] * 3, "y": [1, 0, 1]}), path)
    (chunk,) = iter_chunks([path], fmt=Format.PARQUET, columns=COLUMNS, chunk_rows=10)
    assert label_values(chunk, "y", positive=("1",), negative=("0",)).tolist() == [1, 0, 1]
    assert map_values(chunk, "cat", {"1": 10, "3": 30}, default=-5).tolist() == [10, -5, 30]
    with pytest.raises(DataError) as caught:
        label_values(chunk, "y", positive=("1",), negative=("no",))
    _assert_names(caught.value, path, "y", 1)
    assert "'0'; expected one of '1', 'no'" in str(caught.value)


def test_key_bytes_of_fixed_and_variable_binary(tmp_path):
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(5)] + [b"\x00" * 31 + b"\x01", b"\x01" + b"\x00" * 31]
    for type_ in (pa.binary(32), pa.binary()):
        got = key_bytes(pa.array(keys, type=type_).slice(1), path=tmp_path / "f")
        assert split_keys(got) == keys[1:]  # trailing zero bytes survive
    with pytest.raises(DataError, match=r"row 3: column 'join_key' has 31 bytes"):
        key_bytes(pa.array(keys[:3] + [b"x" * 31], type=pa.binary()), path=tmp_path / "f")


def test_duplicate_keys_finds_the_first_repeat_across_adds():
    keys = np.array([hashlib.sha256(b"%d" % i).digest() for i in range(1000)], dtype="S32")
    finder = DuplicateKeys()
    for start in range(0, 1000, 64):
        finder.add(keys[start : start + 64])
    assert finder.first_repeat() is None
    stream = keys.copy()
    stream[700] = keys[12]
    stream[900] = keys[650]  # a later repeat: the first one (row 700) is reported
    finder = DuplicateKeys()
    for start in range(0, 1000, 64):
        finder.add(stream[start : start + 64])
    assert finder.first_repeat() == (700, 12)


def test_csv_timestamps_are_integers_or_iso_8601(tmp_path):
    columns = {"ts": Role.TIMESTAMP}
    ints = _csv(tmp_path / "a.csv", "ts\n1767225600\n1767225700\n")
    (chunk,) = iter_chunks([ints], fmt=Format.CSV, columns=columns, chunk_rows=10)
    assert chunk.table.column("ts").type == pa.int64()
    iso = _csv(tmp_path / "b.csv", "ts\n2026-01-01T00:00:00\n2026-01-02 10:30:00\n")
    (chunk,) = iter_chunks([iso], fmt=Format.CSV, columns=columns, chunk_rows=10)
    assert pa.types.is_timestamp(chunk.table.column("ts").type)
    bad = _csv(tmp_path / "c.csv", "ts\n2026-01-01T00:00:00\n2026-01-02T00:00:00\nyesterday\n")
    with pytest.raises(DataError) as caught:
        list(iter_chunks([bad], fmt=Format.CSV, columns=columns, chunk_rows=10))
    _assert_names(caught.value, bad, "ts", 2)
