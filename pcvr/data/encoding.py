"""How the feature columns a spec names become model inputs; fitted on the platform's data, saved with the backbone.

* A categorical value of any type is hashed by its *string form* (an int column 7
  in CSV and the string "7" in Parquet land in the same bucket) into its column's
  ``buckets``; under ``missing = "bucket"`` every missing value goes to one extra
  bucket of its own (index ``buckets``), so the column's embedding has
  ``buckets + 1`` rows.
* A dense value is filled when missing (null, NaN or ±inf: ``zero`` puts 0, ``mean``
  the pretraining mean, both *before* the transform; ``error`` stops naming the row)
  and transformed: ``none``; ``log1p``: sign(x)·log1p(|x|); ``standardize``:
  (x − mean) / std with the pretraining data's mean and (population) std, or
  x − mean for a column that is constant there.

:class:`FeatureEncoding` is saved as ``encoding.json`` inside the backbone
directory, so every copy of a backbone carries the encoding it was trained with,
and a spec whose feature columns differ from it is refused
(:meth:`FeatureEncoding.check`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pcvr.data.io import DataError, write_json_atomic
from pcvr.data.readers import Chunk, Role, as_strings, first_row, iter_chunks, to_float
from pcvr.data.spec import (
    CategoricalColumn,
    CategoricalMissing,
    DatasetSpec,
    DenseColumn,
    DenseMissing,
    FeatureSpec,
    LabelSpec,
    Transform,
)
from pcvr.models.features import cat_column, dense_column
from pcvr.protocols.layout import ENCODING_FILE

__all__ = ["FeatureEncoding", "fit_encoding", "hash_strings", "column_salt", "feature_roles"]

_VERSION = 1
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def column_salt(column: str) -> int:
    """A column's 64-bit hash salt: the first 8 bytes of SHA-256 of its name."""
    return int.from_bytes(hashlib.sha256(b"pcvr/categorical/v1|" + column.encode()).digest()[:8], "big")


def hash_strings(array: pa.Array, *, salt: int) -> np.ndarray:
    """A stable 64-bit hash (uint64) of each string's UTF-8 bytes: FNV-1a, then a salted SplitMix64 finalizer.

    Hand-written because neither pyarrow nor numpy exposes a stable vectorized
    string hash (pyarrow's hashing kernels are internal and unversioned; Python's
    ``hash`` is salted per process), and a bucket must be the same on every
    machine, run and library version. Vectorized over byte positions: rows are
    ordered by length, and step j updates the rows longer than j, so the work is
    the total byte count plus one numpy call per position. Null entries hash as
    whatever bytes they span; callers mask them.
    """
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise TypeError(f"hash_strings needs a string array; got {array.type}")
    n = len(array)
    offsets_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=offsets_type)[array.offset : array.offset + n + 1].astype(np.int64)
    data_buffer = array.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, dtype=np.uint8)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    starts, sorted_lengths = offsets[:-1][order], lengths[order]
    longer_than = np.searchsorted(-sorted_lengths, -np.arange(int(sorted_lengths[0]) if n else 0), side="left")
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j, active in enumerate(longer_than):
            h[:active] ^= data[starts[:active] + j]
            h[:active] *= _FNV_PRIME
        x = h ^ np.uint64(salt)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    out = np.empty(n, dtype=np.uint64)
    out[order] = x
    return out


def feature_roles(features: FeatureSpec) -> dict[str, Role]:
    """The feature columns to read, each with its role."""
    return {**{c.column: Role.CATEGORICAL for c in features.categorical}, **{d.column: Role.DENSE for d in features.dense}}


def _missing_what(values: np.ndarray, row: int, null: np.ndarray) -> str:
    if null[row]:
        return "is missing a value"
    return "is NaN" if np.isnan(values[row]) else f"is {values[row]}"


def _dense_values(chunk: Chunk, column: DenseColumn) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, missing mask) of a dense column; an error on a missing value under ``missing = "error"``."""
    raw = chunk.table.column(column.column)
    values, missing = to_float(raw)
    if column.missing is DenseMissing.ERROR and missing.any():
        row = first_row(missing)
        null = np.asarray(raw.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        raise chunk.fail(
            row, f"column {column.column!r} {_missing_what(values, row, null)}; give it missing = \"zero\" or \"mean\" in the spec"
        )
    return values, missing


@dataclass(frozen=True)
class FeatureEncoding:
    """Per categorical column its buckets and missing policy; per dense column its transform, policy, mean and std."""

    categorical: tuple[CategoricalColumn, ...]
    dense: tuple[DenseColumn, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    spec_digest: str

    @property
    def buckets(self) -> tuple[int, ...]:
        """Embedding rows per categorical column (one more than its buckets when missing values get their own)."""
        return tuple(c.buckets + (c.missing is CategoricalMissing.BUCKET) for c in self.categorical)

    @property
    def num_dense(self) -> int:
        return len(self.dense)

    def encode(self, chunk: Chunk) -> dict[str, np.ndarray]:
        """Columns ``cat_i`` (int32 bucket indices) and ``dense_j`` (float32) of one chunk of raw rows.

        Raises:
            DataError: a missing value in a column whose policy is ``error`` (naming file, row, column).
        """
        encoded: dict[str, np.ndarray] = {}
        for i, column in enumerate(self.categorical):
            values = as_strings(chunk.table.column(column.column))
            missing = np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            if column.missing is CategoricalMissing.ERROR and missing.any():
                raise chunk.fail(first_row(missing), f"column {column.column!r} is missing a value")
            buckets = (hash_strings(values, salt=column_salt(column.column)) % np.uint64(column.buckets)).astype(np.int32)
            buckets[missing] = column.buckets
            encoded[cat_column(i)] = buckets
        for j, column in enumerate(self.dense):
            values, missing = _dense_values(chunk, column)
            values[missing] = 0.0 if column.missing is DenseMissing.ZERO else self.means[j]
            if column.transform is Transform.LOG1P:
                values = np.sign(values) * np.log1p(np.abs(values))
            elif column.transform is Transform.STANDARDIZE:
                values = (values - self.means[j]) / (self.stds[j] if self.stds[j] > 0 else 1.0)
            encoded[dense_column(j)] = values.astype(np.float32)
        return encoded

    def check(self, spec: DatasetSpec, *, backbone_dir: Path | None = None) -> None:
        """Refuse a spec whose feature columns are not those the backbone was trained with.

        Raises:
            DataError: naming the spec, the first key that differs and the backbone's encoding file.
        """
        features = spec.require("features")
        if features.digest() == self.spec_digest:
            return
        saved = "encoding.json" if backbone_dir is None else Path(backbone_dir) / ENCODING_FILE
        here = [("categorical", i, c) for i, c in enumerate(features.categorical)] + [("dense", j, d) for j, d in enumerate(features.dense)]
        there = [("categorical", i, c) for i, c in enumerate(self.categorical)] + [("dense", j, d) for j, d in enumerate(self.dense)]
        for mine, theirs in zip(here, there):
            if mine != theirs:
                kind, index, column = mine
                raise DataError(
                    f"{spec.source}: features.{kind}[{index}] (column {column.column!r}) differs from the backbone's "
                    f"encoding ({saved}: {_describe(theirs[2])}); use the spec the backbone was pretrained with"
                )
        raise DataError(
            f"{spec.source}: [features] lists {len(here)} columns, the backbone's encoding ({saved}) {len(there)}; "
            "use the spec the backbone was pretrained with"
        )

    def to_dict(self) -> dict:
        return {
            "version": _VERSION,
            "spec_digest": self.spec_digest,
            "categorical": [{"column": c.column, "buckets": c.buckets, "missing": c.missing.value} for c in self.categorical],
            "dense": [
                {"column": d.column, "transform": d.transform.value, "missing": d.missing.value, "mean": m, "std": s}
                for d, m, s in zip(self.dense, self.means, self.stds)
            ],
        }

    @classmethod
    def from_dict(cls, document: dict) -> "FeatureEncoding":
        if document.get("version") != _VERSION:
            raise ValueError(f"encoding version {document.get('version')!r}; expected {_VERSION}")
        categorical = tuple(
            CategoricalColumn(str(c["column"]), int(c["buckets"]), CategoricalMissing(c["missing"])) for c in document["categorical"]
        )
        dense = tuple(DenseColumn(str(d["column"]), Transform(d["transform"]), DenseMissing(d["missing"])) for d in document["dense"])
        return cls(
            categorical=categorical,
            dense=dense,
            means=tuple(float(d["mean"]) for d in document["dense"]),
            stds=tuple(float(d["std"]) for d in document["dense"]),
            spec_digest=str(document["spec_digest"]),
        )

    def save(self, backbone_dir: Path) -> None:
        """Write ``encoding.json`` inside ``backbone_dir`` (atomically)."""
        write_json_atomic(Path(backbone_dir) / ENCODING_FILE, self.to_dict())

    @classmethod
    def load(cls, backbone_dir: Path) -> "FeatureEncoding":
        """Read the ``encoding.json`` of a backbone directory.

        Raises:
            ValueError: missing or unreadable file (one line, naming it).
        """
        path = Path(backbone_dir) / ENCODING_FILE
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path}: not a feature encoding written by pcvr: {text}") from None


def _describe(column: CategoricalColumn | DenseColumn) -> str:
    if isinstance(column, CategoricalColumn):
        return f"categorical {column.column!r}, {column.buckets} buckets, missing {column.missing.value}"
    return f"dense {column.column!r}, transform {column.transform.value}, missing {column.missing.value}"


def labelled_chunks(section: LabelSpec, features: FeatureSpec, *, extra: tuple[str, ...] = ()) -> Iterator[Chunk]:
    """Chunks of a labelled file: the feature columns, its label, and any ``extra`` numeric columns."""
    columns = {**feature_roles(features), section.label: Role.VALUE, **{name: Role.DENSE for name in extra}}
    yield from iter_chunks(section.paths, fmt=section.format, columns=columns, chunk_rows=features.chunk_rows)


def fit_encoding(spec: DatasetSpec) -> FeatureEncoding:
    """The encoding of ``spec``'s feature columns, its dense statistics streamed over [pretrain] in float64.

    Means and variances are merged chunk by chunk (Chan et al.'s pairwise update),
    over each column's finite values only.

    Raises:
        ValueError: the spec lacks [features] or [pretrain].
        DataError: a missing value under ``missing = "error"``, or a dense column with no finite value.
    """
    features: FeatureSpec = spec.require("features")
    pretrain: LabelSpec = spec.require("pretrain")
    k = len(features.dense)
    count, mean, m2 = np.zeros(k), np.zeros(k), np.zeros(k)
    path = pretrain.paths[0]
    if k:
        columns = {d.column: Role.DENSE for d in features.dense}
        for chunk in iter_chunks(pretrain.paths, fmt=pretrain.format, columns=columns, chunk_rows=features.chunk_rows):
            path = chunk.path
            for j, column in enumerate(features.dense):
                values, missing = _dense_values(chunk, column)
                finite = values[~missing]
                if finite.size == 0:
                    continue
                n_b, mean_b = float(finite.size), float(finite.mean())
                m2_b = float(((finite - mean_b) ** 2).sum())
                total = count[j] + n_b
                delta = mean_b - mean[j]
                mean[j] += delta * n_b / total
                m2[j] += m2_b + delta * delta * count[j] * n_b / total
                count[j] = total
    for j, column in enumerate(features.dense):
        if count[j] == 0:
            raise DataError(f"{path}: column {column.column!r} has no finite value in the pretraining data; its statistics are undefined")
    return FeatureEncoding(
        categorical=features.categorical,
        dense=features.dense,
        means=tuple(float(v) for v in mean),
        stds=tuple(float(np.sqrt(m2[j] / count[j])) for j in range(k)),
        spec_digest=features.digest(),
    )
