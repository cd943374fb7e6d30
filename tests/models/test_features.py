"""Tests of pcvr.models.features: hashed bucketing and encoding of raw feature rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pcvr.data import schema
from pcvr.models.features import (
    EncodedFeatures,
    cat_column,
    dense_column,
    encode_features,
    encode_table,
    hash_buckets,
)

BUCKETS = (97, 31, 11, 5, 7, 3, 5, 3)
MASK = (1 << 64) - 1


def splitmix64_reference(value: int, *, field_index: int, buckets: int) -> int:
    """Slow, pure-Python SplitMix64 finaliser of (id + golden * (field + 1)) mod 2^64."""
    x = (value + 0x9E3779B97F4A7C15 * (field_index + 1)) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    x ^= x >> 31
    return x % buckets


def raw_feature_table(n: int, *, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns: dict[str, object] = {schema.CLICK_ID: [f"click-{i:05d}" for i in range(n)]}
    for name in schema.CATEGORICAL_FIELDS:
        columns[name] = rng.integers(0, 10**12, size=n, dtype=np.int64)
    for name in schema.DENSE_FIELDS:
        columns[name] = rng.normal(size=n)
    columns[schema.TIMESTAMP] = rng.integers(1_700_000_000, 1_800_000_000, size=n)
    return pa.table(columns)


def test_hash_buckets_matches_pure_python_splitmix64() -> None:
    values = np.array([0, 1, 2, 12345, -1, -(2**63), 2**63 - 1, 10**12 + 7], dtype=np.int64)
    for field_index, buckets in [(0, 97), (3, 5), (7, 1_000_003)]:
        got = hash_buckets(values, field_index=field_index, buckets=buckets)
        expected = [
            splitmix64_reference(int(v) & MASK, field_index=field_index, buckets=buckets) for v in values
        ]
        assert got.tolist() == expected
        assert got.dtype == np.int64


def test_hash_buckets_deterministic_and_in_range() -> None:
    values = np.random.default_rng(0).integers(-(10**15), 10**15, size=20_000)
    first = hash_buckets(values, field_index=2, buckets=13)
    assert np.array_equal(first, hash_buckets(values.copy(), field_index=2, buckets=13))
    assert first.min() >= 0 and first.max() < 13
    # every bucket used, roughly evenly (expected 1538 each)
    counts = np.bincount(first, minlength=13)
    assert counts.min() > 1300 and counts.max() < 1800
    assert np.array_equal(hash_buckets(values, field_index=2, buckets=1), np.zeros_like(values))


def test_hash_buckets_salted_by_field() -> None:
    values = np.arange(5_000, dtype=np.int64)
    by_field = [hash_buckets(values, field_index=i, buckets=1_000) for i in range(len(BUCKETS))]
    for i in range(len(by_field)):
        for j in range(i + 1, len(by_field)):
            # the same id lands in the same bucket in two fields only by chance (~1/1000)
            assert np.mean(by_field[i] == by_field[j]) < 0.01, (i, j)


def test_hash_buckets_does_not_mutate_input() -> None:
    values = np.array([5, 6, 7], dtype=np.int64)
    hash_buckets(values, field_index=0, buckets=10)
    assert values.tolist() == [5, 6, 7]


def test_encode_table_columns_types_and_values() -> None:
    table = raw_feature_table(50, seed=1)
    encoded = encode_table(table, buckets=BUCKETS)
    expected_names = [cat_column(i) for i in range(len(BUCKETS))] + [
        dense_column(j) for j in range(len(schema.DENSE_FIELDS))
    ]
    assert list(encoded) == expected_names
    assert cat_column(0) == "cat_0" and dense_column(17) == "dense_17"
    for i, (name, size) in enumerate(zip(schema.CATEGORICAL_FIELDS, BUCKETS)):
        column = encoded[cat_column(i)]
        assert column.dtype == np.int32 and column.shape == (50,)
        raw = table.column(name).to_numpy()
        assert column.tolist() == hash_buckets(raw, field_index=i, buckets=size).tolist()
        assert column.min() >= 0 and column.max() < size
    for j, name in enumerate(schema.DENSE_FIELDS):
        column = encoded[dense_column(j)]
        assert column.dtype == np.float32
        assert np.array_equal(column, table.column(name).to_numpy().astype(np.float32))
    # no raw id survives encoding: every categorical output is a bucket index
    for name in (schema.USER_ID, schema.AD_ID, schema.CLICK_ID):
        assert name not in encoded


def test_encode_table_needs_one_bucket_count_per_field() -> None:
    with pytest.raises(ValueError, match="bucket"):
        encode_table(raw_feature_table(3, seed=0), buckets=BUCKETS[:-1])


def test_encode_features_tensors() -> None:
    table = raw_feature_table(20, seed=2)
    features = encode_features(table, buckets=BUCKETS)
    assert len(features) == 20
    assert features.categorical.dtype == torch.int64 and features.categorical.shape == (20, len(BUCKETS))
    assert features.dense.dtype == torch.float32 and features.dense.shape == (20, len(schema.DENSE_FIELDS))
    columns = encode_table(table, buckets=BUCKETS)
    assert features.categorical[:, 3].tolist() == columns[cat_column(3)].tolist()
    assert np.array_equal(features.dense[:, 5].numpy(), columns[dense_column(5)])
    picked = features.take(torch.tensor([4, 0]))
    assert isinstance(picked, EncodedFeatures) and len(picked) == 2
    assert torch.equal(picked.categorical[1], features.categorical[0])
    assert torch.equal(picked.dense[0], features.dense[4])
