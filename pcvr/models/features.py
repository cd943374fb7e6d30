"""Encoding of platform feature rows into model inputs.

Categorical ids are hashed into a fixed number of buckets per field, so the
model never needs a vocabulary and the clean room never receives a raw id: the
platform encodes its feature log before export (see ``pcvr.platform.export``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pcvr.data import schema

__all__ = ["EncodedFeatures", "hash_buckets", "encode_table", "cat_column", "dense_column"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def cat_column(field_index: int) -> str:
    """Name of the encoded (bucketed) column of categorical field ``field_index``."""
    return f"cat_{field_index}"


def dense_column(field_index: int) -> str:
    """Name of the encoded dense column ``field_index``."""
    return f"dense_{field_index}"


def hash_buckets(values: np.ndarray, *, field_index: int, buckets: int) -> np.ndarray:
    """SplitMix64 hash of int64 ids, salted by field, reduced to [0, buckets)."""
    with np.errstate(over="ignore"):
        x = values.astype(np.int64).view(np.uint64) + _GOLDEN * np.uint64(field_index + 1)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(buckets)).astype(np.int64)


@dataclass(frozen=True)
class EncodedFeatures:
    """Model-ready inputs: categorical bucket indices [N, F_cat] and dense values [N, F_dense]."""

    categorical: torch.Tensor
    dense: torch.Tensor

    def __len__(self) -> int:
        return self.categorical.shape[0]

    def take(self, index: torch.Tensor) -> "EncodedFeatures":
        return EncodedFeatures(self.categorical[index], self.dense[index])

    @classmethod
    def from_encoded_table(cls, table: pa.Table, *, num_categorical: int, num_dense: int) -> "EncodedFeatures":
        """Read ``cat_i`` / ``dense_j`` columns written by :func:`encode_table`."""
        categorical = np.stack([table.column(cat_column(i)).to_numpy() for i in range(num_categorical)], axis=1)
        dense = np.stack([table.column(dense_column(j)).to_numpy() for j in range(num_dense)], axis=1)
        return cls(torch.from_numpy(categorical.astype(np.int64)), torch.from_numpy(dense.astype(np.float32)))


def encode_table(table: pa.Table, *, buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Encode raw feature columns (``schema.CATEGORICAL_FIELDS``, ``schema.DENSE_FIELDS``).

    Returns columns ``cat_i`` (int32 bucket indices) and ``dense_j`` (float32).
    """
    if len(buckets) != len(schema.CATEGORICAL_FIELDS):
        raise ValueError(f"need one bucket count per categorical field ({len(schema.CATEGORICAL_FIELDS)})")
    encoded: dict[str, np.ndarray] = {}
    for i, (name, size) in enumerate(zip(schema.CATEGORICAL_FIELDS, buckets)):
        values = table.column(name).to_numpy()
        encoded[cat_column(i)] = hash_buckets(values, field_index=i, buckets=size).astype(np.int32)
    for j, name in enumerate(schema.DENSE_FIELDS):
        encoded[dense_column(j)] = table.column(name).to_numpy().astype(np.float32)
    return encoded


def encode_features(table: pa.Table, *, buckets: tuple[int, ...]) -> EncodedFeatures:
    """Encode a raw feature table straight into tensors."""
    columns = encode_table(table, buckets=buckets)
    return EncodedFeatures.from_encoded_table(
        pa.table(columns), num_categorical=len(buckets), num_dense=len(schema.DENSE_FIELDS)
    )
