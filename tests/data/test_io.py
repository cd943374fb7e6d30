"""pcvr's own files (pcvr.data.io): checked, memory-mapped Arrow IPC reading and atomic writing."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pcvr.data.io import DataError, Kind, iter_ipc, read_ipc, staged, write_ipc, write_parquet_atomic

COLUMNS = {"key": Kind.STRING, "count": Kind.INTEGER, "score": Kind.FLOAT}


def _assert_names(error: Exception, path: Path, field: str, row: int | None = None) -> None:
    message = str(error)
    assert "\n" not in message
    assert str(path) in message and repr(field) in message
    if row is not None:
        assert re.search(rf"\brow {row}\b", message), message


def _ipc(path: Path, *, batch_rows: int | None = None, **columns: pa.Array | list) -> Path:
    table = pa.table(columns)
    write_ipc(path, table.schema, table.to_batches(max_chunksize=batch_rows))
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


# --- staged ----------------------------------------------------------------------------


def test_staged_renames_every_output_together(tmp_path):
    a, b = tmp_path / "x" / "a.arrow", tmp_path / "b.json"
    with staged(a, b) as (sa, sb):
        sa.write_text("A")
        sb.write_text("B")
        assert not a.exists() and not b.exists()
    assert a.read_text() == "A" and b.read_text() == "B"
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["a.arrow"]


def test_staged_leaves_nothing_when_the_block_fails(tmp_path):
    a, b = tmp_path / "a.arrow", tmp_path / "b.json"
    b.write_text("old")
    with pytest.raises(DataError):
        with staged(a, b) as (sa, sb):
            sa.write_text("A")
            sb.write_text("B")
            raise DataError("bad row")
    assert not a.exists() and b.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


# --- iter_ipc / read_ipc ----------------------------------------------------------------


def test_iter_ipc_streams_batches_with_their_first_row(tmp_path):
    path = _ipc(tmp_path / "t.arrow", batch_rows=4, extra=list(range(10)), score=[0.5] * 10, count=list(range(10)), key=list("abcdefghij"))
    batches = list(iter_ipc(path, columns=COLUMNS))
    assert [start for start, _ in batches] == [0, 4, 8]
    assert batches[1][1].schema.names == ["key", "count", "score"]
    assert batches[2][1].column("count").to_pylist() == [8, 9]


def test_read_ipc_is_memory_mapped_not_copied(tmp_path):
    n = 200_000
    path = _ipc(tmp_path / "t.arrow", key=["k"] * n, count=list(range(n)), score=[0.5] * n)
    before = pa.total_allocated_bytes()
    table = read_ipc(path, columns=COLUMNS)
    assert pa.total_allocated_bytes() - before < 10_000  # the buffers are the mapped file's pages
    assert table.column("count")[n - 1].as_py() == n - 1
    with pa.OSFile(str(path)) as handle:  # control: reading the same file into memory allocates its size
        copied = pa.ipc.open_file(handle).read_all()
    assert pa.total_allocated_bytes() - before > 8 * n
    assert copied.equals(table)


def test_integers_are_accepted_as_floats(tmp_path):
    path = _ipc(tmp_path / "t.arrow", key=["a"], count=[1], score=[7])
    assert next(iter_ipc(path, columns=COLUMNS))[1].column("score").to_pylist() == [7]


def test_binary_kind(tmp_path):
    path = _ipc(tmp_path / "t.arrow", k=pa.array([b"\x00" * 32], type=pa.binary(32)))
    assert len(list(iter_ipc(path, columns={"k": Kind.BINARY}))) == 1
    with pytest.raises(DataError):
        list(iter_ipc(path, columns={"k": Kind.STRING}))


def test_allow_infinite_lets_inf_through_but_rejects_nan(tmp_path):
    path = _ipc(tmp_path / "t.arrow", key=["a", "b", "c"], count=[1, 2, 3], score=[0.1, math.inf, -math.inf])
    assert list(iter_ipc(path, columns=COLUMNS, allow_infinite=("score",)))[0][1].column("score").to_pylist() == [0.1, math.inf, -math.inf]
    nan_path = _ipc(tmp_path / "nan.arrow", key=["a", "b", "c"], count=[1, 2, 3], score=[math.inf, 0.2, math.nan])
    with pytest.raises(DataError) as excinfo:
        list(iter_ipc(nan_path, columns=COLUMNS, allow_infinite=("score",)))
    _assert_names(excinfo.value, nan_path, "score", row=2)


def test_infinite_rejected_unless_allowed(tmp_path):
    path = _ipc(tmp_path / "t.arrow", key=["a", "b"], count=[1, 2], score=[0.1, -math.inf])
    with pytest.raises(DataError) as excinfo:
        list(iter_ipc(path, columns=COLUMNS))
    _assert_names(excinfo.value, path, "score", row=1)
    with pytest.raises(DataError):
        list(iter_ipc(path, columns=COLUMNS, allow_infinite=("count",)))


def test_null_named_with_its_row_across_batches(tmp_path):
    counts = list(range(20))
    counts[13] = None
    path = _ipc(tmp_path / "t.arrow", batch_rows=5, key=[f"k{i}" for i in range(20)], count=counts, score=[0.0] * 20)
    with pytest.raises(DataError) as excinfo:
        list(iter_ipc(path, columns=COLUMNS))
    _assert_names(excinfo.value, path, "count", row=13)


def test_missing_column_is_named_with_the_file_columns(tmp_path):
    path = _ipc(tmp_path / "t.arrow", key=["a"], score=[0.1])
    with pytest.raises(DataError) as excinfo:
        list(iter_ipc(path, columns=COLUMNS))
    _assert_names(excinfo.value, path, "count")
    assert "'key', 'score'" in str(excinfo.value)


def test_wrong_type_is_named(tmp_path):
    path = _ipc(tmp_path / "t.arrow", key=["a"], count=[1.5], score=[0.1])
    with pytest.raises(DataError) as excinfo:
        list(iter_ipc(path, columns=COLUMNS))
    _assert_names(excinfo.value, path, "count")


def test_missing_file_and_no_rows(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(iter_ipc(tmp_path / "absent.arrow", columns=COLUMNS))
    empty = pa.table({"key": pa.array([], pa.string()), "count": pa.array([], pa.int64()), "score": pa.array([], pa.float64())})
    write_ipc(tmp_path / "empty.arrow", empty.schema, [])
    with pytest.raises(DataError, match="has no rows"):
        list(iter_ipc(tmp_path / "empty.arrow", columns=COLUMNS))


@pytest.mark.parametrize("content", [b"this is not arrow\n" * 10, b"PAR1 garbage"])
def test_unreadable_file_gives_one_line(tmp_path, content):
    path = tmp_path / "garbage.arrow"
    path.write_bytes(content)
    for read in (lambda: list(iter_ipc(path, columns=COLUMNS)), lambda: read_ipc(path)):
        with pytest.raises(DataError) as excinfo:
            read()
        assert str(path) in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
