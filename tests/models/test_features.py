"""Encoded model inputs (pcvr.models.features): column names, counts read from the table, tensors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pcvr.models.features import EncodedFeatures, cat_column, dense_column, encoded_counts


def _columns(n: int, *, cats: int, dense: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    columns = {cat_column(i): rng.integers(0, 50, n).astype(np.int32) for i in range(cats)}
    columns |= {dense_column(j): rng.standard_normal(n).astype(np.float32) for j in range(dense)}
    return columns


@pytest.mark.parametrize("cats,dense", [(8, 18), (1, 0), (0, 3), (26, 13)])
def test_counts_and_tensors_come_from_the_table(cats, dense):
    columns = _columns(7, cats=cats, dense=dense)
    table = pa.table({"join_key": [b"k" * 32] * 7, **columns, "noisy_label": np.zeros(7, np.int8)})
    assert encoded_counts(table.column_names) == (cats, dense)
    features = EncodedFeatures.from_encoded_table(table)
    assert features.categorical.dtype == torch.int64 and features.categorical.shape == (7, cats)
    assert features.dense.dtype == torch.float32 and features.dense.shape == (7, dense)
    for i in range(cats):
        assert features.categorical[:, i].tolist() == columns[cat_column(i)].tolist()
    for j in range(dense):
        assert features.dense[:, j].tolist() == columns[dense_column(j)].tolist()
    assert torch.equal(EncodedFeatures.from_columns(columns).dense, features.dense)


def test_a_gap_in_the_numbering_is_refused():
    with pytest.raises(ValueError, match="no column 'cat_1'"):
        encoded_counts(["cat_0", "cat_2", "dense_0"])
    with pytest.raises(ValueError, match="no column 'dense_0'"):
        encoded_counts(["cat_0", "dense_1"])


def test_take_selects_rows():
    features = EncodedFeatures.from_columns(_columns(10, cats=2, dense=3))
    index = torch.tensor([9, 0, 4])
    part = features.take(index)
    assert len(part) == 3
    assert torch.equal(part.categorical, features.categorical[index]) and torch.equal(part.dense, features.dense[index])
