"""Model inputs: hashed categorical bucket indices and dense values, as tensors.

The platform encodes its feature rows (:mod:`pcvr.data.encoding`) before they
leave for a clean room, so the model never needs a vocabulary and the clean room
never receives a raw id. An encoded table has columns ``cat_0 .. cat_{F-1}``
(int32 bucket indices) and ``dense_0 .. dense_{D-1}`` (float32); F and D are read
from the table itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

__all__ = ["EncodedFeatures", "cat_column", "dense_column", "encoded_counts"]


def cat_column(field_index: int) -> str:
    """Name of the encoded (bucketed) column of categorical field ``field_index``."""
    return f"cat_{field_index}"


def dense_column(field_index: int) -> str:
    """Name of the encoded dense column ``field_index``."""
    return f"dense_{field_index}"


def encoded_counts(names: list[str]) -> tuple[int, int]:
    """(categorical, dense) column counts of an encoded table's column names.

    Raises:
        ValueError: the ``cat_i`` / ``dense_j`` columns are not numbered 0, 1, ... without gaps.
    """
    counts = []
    for prefix in ("cat", "dense"):
        indices = {int(m.group(1)) for name in names if (m := re.fullmatch(rf"{prefix}_(\d+)", name))}
        gaps = sorted(set(range(max(indices, default=-1) + 1)) - indices)
        if gaps:
            raise ValueError(f"no column '{prefix}_{gaps[0]}' (the encoded {prefix}_i columns are numbered from 0 without gaps)")
        counts.append(len(indices))
    return counts[0], counts[1]


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
    def from_encoded_table(cls, table: pa.Table) -> "EncodedFeatures":
        """Read the ``cat_i`` / ``dense_j`` columns of an encoded table (their counts from its column names)."""
        num_categorical, num_dense = encoded_counts(table.column_names)
        n = table.num_rows
        categorical = np.empty((n, num_categorical), dtype=np.int64)
        for i in range(num_categorical):
            categorical[:, i] = table.column(cat_column(i)).to_numpy()
        dense = np.empty((n, num_dense), dtype=np.float32)
        for j in range(num_dense):
            dense[:, j] = table.column(dense_column(j)).to_numpy()
        return cls(torch.from_numpy(categorical), torch.from_numpy(dense))

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray]) -> "EncodedFeatures":
        """Tensors of encoded columns as :meth:`pcvr.data.encoding.FeatureEncoding.encode` returns them."""
        return cls.from_encoded_table(pa.table(columns))
