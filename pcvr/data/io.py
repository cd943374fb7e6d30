"""The files pcvr writes for its own later steps: Arrow IPC reading (memory-mapped, checked) and atomic writers.

A user's own files are read by :mod:`pcvr.data.readers`. Every check here names
the file, the field and, where one row is at fault, the row (0-based, as in the
file), and raises :class:`DataError` — a ``ValueError``. Every file a later step
trusts is written to a staging path and renamed into place (:func:`write_atomic`,
:func:`staged`), so nothing half-written is ever seen.
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = [
    "DataError",
    "Kind",
    "iter_ipc",
    "read_ipc",
    "staged",
    "write_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_ipc",
    "write_parquet_atomic",
]


class DataError(ValueError):
    """Bad input data; the message names the file, field and row."""


class Kind(enum.Enum):
    """What a column must hold."""

    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    BINARY = "binary"

    def accepts(self, data_type: pa.DataType) -> bool:
        if self is Kind.STRING:
            return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)
        if self is Kind.INTEGER:
            return pa.types.is_integer(data_type)
        if self is Kind.FLOAT:
            return pa.types.is_floating(data_type) or pa.types.is_integer(data_type)
        return pa.types.is_binary(data_type) or pa.types.is_fixed_size_binary(data_type)


def _first_row(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _open_ipc(path: Path) -> pa.ipc.RecordBatchFileReader:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (pa.ArrowInvalid, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot be read as an Arrow IPC file: {first_line}") from None


def _check_columns(path: Path, names: list[str], columns: Mapping[str, Kind], types: Mapping[str, pa.DataType]) -> None:
    missing = [name for name in columns if name not in names]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))} (the file has {', '.join(map(repr, names))})")
    for name, kind in columns.items():
        if not kind.accepts(types[name]):
            raise DataError(f"{path}: column {name!r} has type {types[name]}; expected {kind.value}")


def _check_values(path: Path, start: int, batch: pa.RecordBatch, columns: Mapping[str, Kind], allow_infinite: tuple[str, ...]) -> None:
    for name in columns:
        column = batch.column(name)
        if column.null_count:
            raise DataError(f"{path}: row {start + _first_row(column.is_null())}: column {name!r} is missing a value")
        if pa.types.is_floating(column.type):
            infinite_ok = name in allow_infinite
            bad = pc.is_nan(column) if infinite_ok else pc.invert(pc.is_finite(column))
            if pc.any(bad).as_py():
                what = "NaN" if infinite_ok else "NaN or infinite"
                raise DataError(f"{path}: row {start + _first_row(bad)}: column {name!r} is {what}")


def iter_ipc(
    path: Path, *, columns: Mapping[str, Kind], allow_infinite: tuple[str, ...] = ()
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream the record batches of an Arrow IPC file (memory-mapped) as (first row, batch of ``columns``).

    Each batch is checked as it comes: the columns exist with the given kinds, no
    value is missing, floats are finite (``allow_infinite`` columns may be ±inf,
    never NaN). Errors name the file, the column and the 0-based row.

    Raises:
        DataError: missing or unreadable file, no rows, missing column, wrong type, null, NaN or inf.
    """
    path = Path(path)
    reader = _open_ipc(path)
    schema = reader.schema
    _check_columns(path, schema.names, columns, {f.name: f.type for f in schema})
    start = 0
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i).select(list(columns))
        _check_values(path, start, batch, columns, allow_infinite)
        if batch.num_rows:
            yield start, batch
        start += batch.num_rows
    if start == 0:
        raise DataError(f"{path}: file has no rows")


def read_ipc(path: Path, *, columns: Mapping[str, Kind] | None = None) -> pa.Table:
    """The whole Arrow IPC file as a table backed by the memory-mapped file (no copy, no decoding).

    Raises:
        DataError: missing or unreadable file, or (with ``columns``) a missing column or wrong type.
    """
    path = Path(path)
    reader = _open_ipc(path)
    if columns is not None:
        _check_columns(path, reader.schema.names, columns, {f.name: f.type for f in reader.schema})
    return reader.read_all()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(staging)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    A reader sees the old file or the complete new one, never a half-written one;
    on any error the temporary file is removed and ``path`` is untouched.
    """
    with staged(path) as (staging,):
        write(staging)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda staging: staging.write_bytes(data))


def write_json_atomic(path: Path, document: object) -> None:
    """Write ``document`` as indented JSON to ``path`` atomically (:func:`write_atomic`)."""
    write_bytes_atomic(path, (json.dumps(document, indent=2) + "\n").encode())


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` via a temporary file and an atomic rename."""
    write_atomic(path, lambda staging: pq.write_table(table, staging))


def write_ipc(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch | pa.Table]) -> int:
    """Stream ``batches`` into an uncompressed Arrow IPC file at ``path``; returns the rows written.

    Not atomic by itself: write to a staging path (:func:`staged`) and rename.
    """
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write(batch)
            rows += batch.num_rows
    return rows


@contextmanager
def staged(*paths: Path) -> Iterator[tuple[Path, ...]]:
    """Staging paths for several outputs that appear together: all renamed into place at the end, or none.

    Yields one temporary path beside each of ``paths``; when the block ends normally
    each is fsynced and renamed onto its target; on any error every staging file is
    removed and the targets are untouched (a reader never sees a half-written file).
    """
    targets = [Path(p) for p in paths]
    staging: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            os.close(fd)
            staging.append(Path(name))
        yield tuple(staging)
        for path in staging:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        for path, target in zip(staging, targets):
            os.replace(path, target)
    except BaseException:
        for path in staging:
            path.unlink(missing_ok=True)
        raise
