"""Streaming readers for the files a dataset spec names (CSV, Parquet, Criteo TSV), and their value checks.

A file is read one chunk at a time (``pyarrow.csv.open_csv`` for CSV and TSV,
``ParquetFile.iter_batches`` for Parquet), so memory holds one chunk of raw input
whatever the file's size. Every chunk carries the file it came from and the
0-based row of its first row in that file, so an error names the true row:

    clicks.csv: row 1048577: column 'price' has 'n/a'; expected a number

CSV and TSV columns are read as strings and converted here (pyarrow's own CSV
conversion errors do not say which row failed); only an empty field is missing
(a dense "NaN" or "inf" is read as that number, and then handled as missing). Label and consent values are
compared by their string form, so an integer column 1 matches "1".

Duplicate keys across chunks are found with bounded memory by
:class:`DuplicateKeys`: it keeps 16 bytes per row (a prefix of the keyed
HMAC-SHA256 join key), not the ids themselves.
"""

from __future__ import annotations

import bisect
import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pcvr.data.io import DataError
from pcvr.data.spec import CRITEO_COLUMNS, CRITEO_ROW, Format

__all__ = ["Chunk", "Role", "RowIndex", "DuplicateKeys", "key_bytes", "split_keys", "data_files", "iter_chunks", "as_strings", "to_float", "map_values", "first_row", "click_ids", "label_values"]

_CSV_BLOCK_BYTES = 1 << 22
_SUFFIXES = {Format.PARQUET: (".parquet",), Format.CSV: (".csv",), Format.CRITEO_TSV: (".tsv", ".txt")}


class Role(enum.Enum):
    """What a column is for, which decides the types it may have."""

    CLICK_ID = "click id"  # string or integer
    CATEGORICAL = "categorical"  # string or integer (hashed by its string form)
    DENSE = "dense"  # a number
    VALUE = "value"  # a label or consent value: string, integer or boolean (compared as strings)
    TIMESTAMP = "timestamp"  # integer, timestamp or date

    def accepts(self, data_type: pa.DataType) -> bool:
        t = pa.types
        stringy = t.is_string(data_type) or t.is_large_string(data_type) or (
            t.is_dictionary(data_type) and (t.is_string(data_type.value_type) or t.is_large_string(data_type.value_type))
        )
        if self in (Role.CLICK_ID, Role.CATEGORICAL):
            return stringy or t.is_integer(data_type)
        if self is Role.DENSE:
            return t.is_integer(data_type) or t.is_floating(data_type) or t.is_null(data_type)
        if self is Role.VALUE:
            return stringy or t.is_integer(data_type) or t.is_boolean(data_type)
        return t.is_integer(data_type) or t.is_timestamp(data_type) or t.is_date(data_type)

    @property
    def expected(self) -> str:
        return {
            Role.CLICK_ID: "string or integer",
            Role.CATEGORICAL: "string or integer",
            Role.DENSE: "a number",
            Role.VALUE: "string, integer or boolean",
            Role.TIMESTAMP: "integer, timestamp or date",
        }[self]


@dataclass(frozen=True)
class Chunk:
    """Rows ``start`` .. ``start + len(table) - 1`` (0-based) of ``path``; ``first_row`` counts over all files."""

    path: Path
    start: int
    first_row: int
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    def fail(self, row: int, message: str) -> DataError:
        """A DataError naming this chunk's file and its ``row``-th row (0-based within the chunk)."""
        return DataError(f"{self.path}: row {self.start + int(row)}: {message}")


def data_files(paths: Sequence[Path], fmt: Format) -> list[Path]:
    """The files ``paths`` names, in order; a directory stands for its files of ``fmt``'s suffix, sorted."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES[fmt] and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path}: directory holds no {'/'.join(_SUFFIXES[fmt])} file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file")
    return files


def iter_chunks(
    paths: Sequence[Path], *, fmt: Format, columns: Mapping[str, Role], chunk_rows: int
) -> Iterator[Chunk]:
    """Yield chunks of at most ``chunk_rows`` rows holding exactly ``columns``, file after file.

    Raises:
        DataError: missing file, empty file, missing column (the message lists the file's
            columns), a column of the wrong type, an unreadable row.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
    first_row = 0
    for path in data_files(paths, fmt):
        rows = 0
        for start, table in _read(path, fmt, columns, chunk_rows):
            table = table.select(list(columns))
            if fmt is not Format.PARQUET:
                table = _convert_text(path, start, table, columns)
            for name, role in columns.items():
                column = table.column(name)
                if not role.accepts(column.type):
                    raise DataError(f"{path}: column {name!r} has type {column.type}; expected {role.expected}")
            yield Chunk(path=path, start=start, first_row=first_row + start, table=table)
            rows = start + table.num_rows
        if rows == 0:
            raise DataError(f"{path}: file has no rows")
        first_row += rows


def _missing_columns(path: Path, wanted: Mapping[str, Role], present: Sequence[str]) -> DataError | None:
    missing = [name for name in wanted if name not in present]
    if not missing:
        return None
    return DataError(
        f"{path}: no column {', '.join(map(repr, missing))} (the file has {', '.join(map(repr, present)) or 'no columns'})"
    )


def _read(path: Path, fmt: Format, columns: Mapping[str, Role], chunk_rows: int) -> Iterator[tuple[int, pa.Table]]:
    if fmt is Format.PARQUET:
        yield from _read_parquet(path, columns, chunk_rows)
    else:
        yield from _read_text(path, fmt, columns, chunk_rows)


def _read_parquet(path: Path, columns: Mapping[str, Role], chunk_rows: int) -> Iterator[tuple[int, pa.Table]]:
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read as Parquet: {_first_line(exc)}") from None
    error = _missing_columns(path, columns, file.schema_arrow.names)
    if error:
        raise error
    start = 0
    try:
        for batch in file.iter_batches(batch_size=chunk_rows, columns=list(columns)):
            if batch.num_rows:
                yield start, pa.Table.from_batches([batch])
                start += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: rows from {start}: cannot be read as Parquet: {_first_line(exc)}") from None


def _read_text(path: Path, fmt: Format, columns: Mapping[str, Role], chunk_rows: int) -> Iterator[tuple[int, pa.Table]]:
    if fmt is Format.CRITEO_TSV:
        read = pacsv.ReadOptions(column_names=list(CRITEO_COLUMNS), block_size=_CSV_BLOCK_BYTES)
        parse = pacsv.ParseOptions(delimiter="\t", quote_char=False)
        present: Sequence[str] = CRITEO_COLUMNS
    else:
        read, parse = pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES), pacsv.ParseOptions()
        present = _csv_header(path)
    error = _missing_columns(path, columns, present)
    if error:
        raise error
    convert = pacsv.ConvertOptions(
        include_columns=list(columns),
        column_types={name: pa.string() for name in columns},
        null_values=[""],  # only an empty field is missing: "NA" may be a value (a country, a code)
        strings_can_be_null=True,
    )
    start = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= chunk_rows:
                table = pa.Table.from_batches(pending).combine_chunks()
                yield start, table.slice(0, chunk_rows)
                start += chunk_rows
                rest = table.slice(chunk_rows)
                pending, pending_rows = rest.to_batches(), rest.num_rows
    except pa.ArrowInvalid as exc:
        if "Empty CSV" in str(exc):
            return  # no rows: the caller says so
        raise DataError(f"{path}: rows from {start + pending_rows}: cannot be read: {_first_line(exc)}") from None
    if pending_rows:
        yield start, pa.Table.from_batches(pending).combine_chunks()


def _csv_header(path: Path) -> list[str]:
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 16))
    except pa.ArrowInvalid as exc:
        text = _first_line(exc)
        raise DataError(f"{path}: file has no rows" if "Empty CSV" in text else f"{path}: cannot be read as CSV: {text}") from None
    return reader.schema.names


def _convert_text(path: Path, start: int, table: pa.Table, columns: Mapping[str, Role]) -> pa.Table:
    """CSV/TSV text columns into the types their roles need (dense → float64; timestamp → int64, or an ISO 8601 time)."""
    for name, role in columns.items():
        if role is Role.DENSE:
            converted = _cast_or_fail(path, start, name, table.column(name), (pa.float64(),), "a number")
        elif role is Role.TIMESTAMP:
            targets = (pa.int64(), pa.timestamp("us"))
            converted = _cast_or_fail(path, start, name, table.column(name), targets, "an integer or ISO 8601 timestamp")
        else:
            continue
        table = table.set_column(table.schema.get_field_index(name), name, converted)
    return table


def _cast(array: pa.Array, targets: tuple[pa.DataType, ...]) -> pa.Array | None:
    """``array`` cast to the first of ``targets`` that takes every value, or None."""
    trimmed = pc.utf8_trim_whitespace(array)
    for target in targets:
        try:
            return pc.cast(trimmed, target)
        except pa.ArrowInvalid:
            continue
    return None


def _cast_or_fail(
    path: Path, start: int, name: str, column: pa.ChunkedArray, targets: tuple[pa.DataType, ...], what: str
) -> pa.ChunkedArray:
    array = column.combine_chunks()
    converted = _cast(array, targets)
    if converted is not None:
        return pa.chunked_array([converted])
    lo, hi = 0, len(array)  # bisect for the first value that converts to none of the targets
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _cast(array.slice(lo, mid - lo), targets) is not None:
            lo = mid
        else:
            hi = mid
    raise DataError(f"{path}: row {start + lo}: column {name!r} has {array[lo].as_py()!r}; expected {what}")


def first_row(mask: pa.Array | pa.ChunkedArray | np.ndarray) -> int:
    """Index of the first true value of a boolean mask."""
    values = mask if isinstance(mask, np.ndarray) else np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
    return int(np.flatnonzero(values)[0])


def as_strings(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The column's values as one ``string`` array (integers in decimal, booleans as true/false); nulls stay null."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if not pa.types.is_string(array.type):
        array = pc.cast(array, pa.string())
    return array


def to_float(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, missing mask): missing is null, NaN or ±inf."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
    values = np.array(values, dtype=np.float64, copy=True)
    missing = ~np.isfinite(values)  # nulls come out as NaN
    return values, missing


def map_values(chunk: Chunk, name: str, mapping: Mapping[str, int], *, default: int | None = None) -> np.ndarray:
    """Each row's ``mapping[str(value)]`` as int64; ``default`` for other values, or an error naming the row.

    Raises:
        DataError: a missing value, or a value outside ``mapping`` when there is no default.
    """
    values = as_strings(chunk.table.column(name))
    if values.null_count:
        raise chunk.fail(first_row(values.is_null()), f"column {name!r} is missing a value")
    keys = list(mapping)
    index = pc.index_in(values, value_set=pa.array(keys, type=pa.string())).to_numpy(zero_copy_only=False)
    unknown = np.isnan(index) if index.dtype.kind == "f" else np.zeros(len(index), dtype=bool)
    codes = np.array([mapping[k] for k in keys], dtype=np.int64)
    out = np.full(len(index), -1 if default is None else default, dtype=np.int64)
    out[~unknown] = codes[index[~unknown].astype(np.int64)]
    if unknown.any() and default is None:
        row = first_row(unknown)
        raise chunk.fail(row, f"column {name!r} has {values[row].as_py()!r}; expected one of {', '.join(map(repr, keys))}")
    return out


def click_ids(chunk: Chunk, column: str, fmt: Format) -> list[str]:
    """A chunk's click ids as strings; for criteo-tsv's ``row``, the row number over all files.

    Raises:
        DataError: a missing click id (naming file, row, column).
    """
    if fmt is Format.CRITEO_TSV and column == CRITEO_ROW:
        return [str(row) for row in range(chunk.first_row, chunk.first_row + len(chunk))]
    values = as_strings(chunk.table.column(column))
    if values.null_count:
        raise chunk.fail(first_row(values.is_null()), f"column {column!r} is missing a value")
    return values.to_pylist()


def label_values(chunk: Chunk, column: str, *, positive: tuple[str, ...], negative: tuple[str, ...] | None) -> np.ndarray:
    """Binary labels (int8): 1 for a ``positive`` value, 0 for a ``negative`` one (or for any other, when none are listed).

    Raises:
        DataError: a missing label, or (with ``negative``) a value in neither list.
    """
    mapping = {value: 1 for value in positive} | {value: 0 for value in negative or ()}
    return map_values(chunk, column, mapping, default=None if negative is not None else 0).astype(np.int8)


class RowIndex:
    """Where a row counted over a whole stream of chunks (``Chunk.first_row`` + offset) lies: file and row."""

    def __init__(self) -> None:
        self._first_rows: list[int] = []
        self._chunks: list[tuple[Path, int]] = []

    def add(self, chunk: Chunk) -> None:
        self._first_rows.append(chunk.first_row)
        self._chunks.append((chunk.path, chunk.start - chunk.first_row))

    def locate(self, row: int) -> tuple[Path, int]:
        """(file, 0-based row in that file) of stream row ``row``."""
        path, shift = self._chunks[bisect.bisect_right(self._first_rows, row) - 1]
        return path, row + shift


def key_bytes(array: pa.Array | pa.ChunkedArray, *, path: Path, start: int = 0, column: str = "join_key") -> np.ndarray:
    """32-byte keys (a ``binary`` or ``binary(32)`` array, rows ``start``.. of ``path``) as a numpy ``S32`` array.

    Raises:
        DataError: a key is null or not 32 bytes long (naming file, row, column).
    """
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    if array.null_count:
        raise DataError(f"{path}: row {start + first_row(array.is_null())}: column {column!r} is missing a value")
    if pa.types.is_fixed_size_binary(array.type) and array.type.byte_width == 32:
        data = np.frombuffer(array.buffers()[1], dtype=np.uint8)[array.offset * 32 : (array.offset + len(array)) * 32]
        return data.view("S32").copy()
    lengths = pc.binary_length(array).to_numpy(zero_copy_only=False)
    if (lengths != 32).any():
        row = int(np.flatnonzero(lengths != 32)[0])
        raise DataError(f"{path}: row {start + row}: column {column!r} has {lengths[row]} bytes; expected 32")
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view("S32").copy()


def split_keys(keys: np.ndarray) -> list[bytes]:
    """``S32`` keys back into 32-byte ``bytes`` (indexing an ``S32`` array would drop trailing zero bytes)."""
    raw = keys.tobytes()
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


class DuplicateKeys:
    """Finds the first repeated key over a stream of 32-byte keyed join keys, with bounded memory.

    Keeps a 16-byte prefix per row (so 160 MB for 10M rows) and sorts them once at
    the end. The keys are HMAC-SHA256 of the click ids, so two different ids share
    a prefix with probability below n² / 2¹²⁹: a reported duplicate is a real one.
    """

    def __init__(self) -> None:
        self._prefixes: list[np.ndarray] = []

    def add(self, keys: np.ndarray) -> None:
        """Append the next rows' keys (``S32``, as :func:`key_bytes` gives them), in row order."""
        self._prefixes.append(keys.view(np.uint8).reshape(-1, 32)[:, :16].copy().view("S16").reshape(-1))

    def first_repeat(self) -> tuple[int, int] | None:
        """(row, earlier row) of the first row whose key repeats an earlier one, rows counted from 0 over every add."""
        if not self._prefixes:
            return None
        prefixes = np.concatenate(self._prefixes)
        self._prefixes = [prefixes]
        order = np.argsort(prefixes, kind="stable")
        same = prefixes[order[1:]] == prefixes[order[:-1]]
        if not same.any():
            return None
        repeats = order[1:][same]
        position = int(np.argmin(repeats))
        row = int(repeats[position])
        sorted_at = int(np.flatnonzero(same)[position])
        while sorted_at > 0 and prefixes[order[sorted_at - 1]] == prefixes[row]:
            sorted_at -= 1
        return row, int(order[sorted_at])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return re.sub(r"\s+", " ", text.splitlines()[0]) if text else type(exc).__name__
