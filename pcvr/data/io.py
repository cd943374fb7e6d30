"""Validated reading and atomic writing of tables (Parquet or CSV).

Every reader check names the file, the field and, where one row is at fault,
the row (0-based, as in the file), and raises :class:`DataError` — a
``ValueError`` — before anything is written.
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

__all__ = [
    "DataError",
    "Kind",
    "read_table",
    "require_unique",
    "require_values_in",
    "write_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
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


def read_table(path: Path, *, columns: Mapping[str, Kind], allow_infinite: tuple[str, ...] = ()) -> pa.Table:
    """Read ``path`` and check it holds ``columns`` of the given kinds, with no missing values.

    Extra columns are dropped. Integers are accepted where floats are expected.
    Float columns must be finite, except those in ``allow_infinite`` (which still reject NaN).

    Raises:
        DataError: missing file, unreadable or empty file, missing column, wrong type,
            null, NaN or infinite value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix == ".csv":
            string_columns = [name for name, kind in columns.items() if kind is Kind.STRING]
            options = pacsv.ConvertOptions(
                column_types={name: pa.string() for name in string_columns}, strings_can_be_null=True
            )
            table = pacsv.read_csv(path, convert_options=options)
        else:
            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot be read as {'CSV' if path.suffix == '.csv' else 'Parquet'}: {first_line}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: file has no rows")
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}")
    for name, kind in columns.items():
        column = table.column(name)
        if not kind.accepts(column.type):
            raise DataError(f"{path}: column {name!r} has type {column.type}; expected {kind.value}")
        if column.null_count:
            raise DataError(f"{path}: row {_first_row(column.is_null())}: column {name!r} is missing a value")
        if pa.types.is_floating(column.type):
            infinite_ok = name in allow_infinite
            bad = pc.is_nan(column) if infinite_ok else pc.invert(pc.is_finite(column))
            if pc.any(bad).as_py():
                what = "NaN" if infinite_ok else "NaN or infinite"
                raise DataError(f"{path}: row {_first_row(bad)}: column {name!r} is {what}")
    return table.select(list(columns))


def require_unique(table: pa.Table, column: str, *, path: Path) -> None:
    """Raise :class:`DataError` naming the first row whose ``column`` value repeats an earlier one."""
    values = table.column(column).to_numpy(zero_copy_only=False)
    _, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        seen: set = set()
        for row, value in enumerate(values):
            if value in seen:
                raise DataError(f"{path}: row {row}: duplicate {column} {value!r}")
            seen.add(value)


def require_values_in(table: pa.Table, column: str, allowed: tuple, *, path: Path) -> None:
    """Raise :class:`DataError` naming the first row whose ``column`` is not in ``allowed``."""
    values = table.column(column)
    bad = pc.invert(pc.is_in(values, value_set=pa.array(allowed, type=values.type)))
    if pc.any(bad).as_py():
        row = _first_row(bad)
        raise DataError(
            f"{path}: row {row}: column {column!r} has {values[row].as_py()!r}; expected one of {', '.join(map(repr, allowed))}"
        )


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(staging)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    A reader sees the old file or the complete new one, never a half-written one;
    on any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(staging))
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda staging: staging.write_bytes(data))


def write_json_atomic(path: Path, document: object) -> None:
    """Write ``document`` as indented JSON to ``path`` atomically (:func:`write_atomic`)."""
    write_bytes_atomic(path, (json.dumps(document, indent=2) + "\n").encode())


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` via a temporary file and an atomic rename."""
    write_atomic(path, lambda staging: pq.write_table(table, staging))
