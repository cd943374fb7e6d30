"""The clean room's held-out split: keyed, deterministic, the stated share, disjoint from training."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pcvr.clean_room.holdout import split_holdout
from pcvr.data import schema

KEY_A, KEY_B = b"a" * 32, b"b" * 32


def table(rows: int) -> pa.Table:
    return pa.table({schema.JOIN_KEY: pa.array([i.to_bytes(32, "big") for i in range(rows)], type=pa.binary(32)), "row": range(rows)})


def test_the_split_is_deterministic_disjoint_and_in_row_order() -> None:
    rows = table(5_000)
    train, held = split_holdout(rows, fraction=0.1, seed_key=KEY_A)
    again_train, again_held = split_holdout(rows, fraction=0.1, seed_key=KEY_A)
    assert train.equals(again_train) and held.equals(again_held)
    train_rows, held_rows = train.column("row").to_pylist(), held.column("row").to_pylist()
    assert sorted(train_rows + held_rows) == list(range(5_000)) and not set(train_rows) & set(held_rows)
    assert train_rows == sorted(train_rows) and held_rows == sorted(held_rows)


def test_the_share_held_out_is_the_fraction_asked_within_binomial_error() -> None:
    n, fraction = 20_000, 0.1
    _, held = split_holdout(table(n), fraction=fraction, seed_key=KEY_A)
    assert abs(held.num_rows - n * fraction) <= 4 * math.sqrt(n * fraction * (1 - fraction))


def test_another_key_holds_out_other_rows() -> None:
    """The split depends on the clean room's secret, not on the join key alone (which the platform knows)."""
    _, held_a = split_holdout(table(5_000), fraction=0.1, seed_key=KEY_A)
    _, held_b = split_holdout(table(5_000), fraction=0.1, seed_key=KEY_B)
    overlap = set(held_a.column("row").to_pylist()) & set(held_b.column("row").to_pylist())
    assert len(overlap) < 0.25 * held_a.num_rows  # independent draws overlap in ~10% of them


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_a_fraction_outside_zero_one_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="holdout fraction must be in \\(0, 1\\)"):
        split_holdout(table(10), fraction=fraction, seed_key=KEY_A)

