"""Tests of pcvr.clean_room.dataset: validated join of features and noisy labels, and loading."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pcvr.clean_room.dataset import join_inputs, load_training_data
from pcvr.clean_room.holdout import holdout_mask
from pcvr.data import schema
from pcvr.data.io import DataError, read_ipc, write_ipc
from pcvr.models.features import cat_column, dense_column

NUM_CAT = 8
NUM_DENSE = 18
HOLDOUT_KEY = b"h" * 32


def key(i: int) -> bytes:
    return hashlib.sha256(f"click-{i}".encode()).digest()


def features_table(ids: list[int], *, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(ids)
    columns: dict[str, pa.Array] = {schema.JOIN_KEY: pa.array([key(i) for i in ids], type=pa.binary(32))}
    for c in range(NUM_CAT):
        columns[cat_column(c)] = pa.array(rng.integers(0, 5, size=n).astype(np.int32))
    for d in range(NUM_DENSE):
        columns[dense_column(d)] = pa.array(rng.normal(size=n).astype(np.float32))
    return pa.table(columns)


def labels_table(ids: list[int], *, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(ids)
    epsilon = rng.choice([1.0, 3.0, math.inf], size=n)
    flip = np.where(np.isinf(epsilon), 0.0, 1.0 / (1.0 + np.exp(np.minimum(epsilon, 50))))
    return pa.table(
        {
            schema.JOIN_KEY: pa.array([key(i) for i in ids], type=pa.binary(32)),
            schema.NOISY_LABEL: pa.array(rng.integers(0, 2, size=n).astype(np.int8)),
            schema.EPSILON: pa.array(epsilon),
            schema.FLIP_PROB: pa.array(flip),
        }
    )


def write_inputs(tmp_path: Path, features: pa.Table, labels: pa.Table, *, batch_rows: int = 3) -> tuple[Path, Path, Path]:
    """Both inputs as Arrow IPC files of small record batches (the join streams them batch by batch)."""
    features_path, labels_path = tmp_path / "features.arrow", tmp_path / "labels.arrow"
    write_ipc(features_path, features.schema, features.to_batches(max_chunksize=batch_rows))
    write_ipc(labels_path, labels.schema, labels.to_batches(max_chunksize=batch_rows))
    return features_path, labels_path, tmp_path / "out" / "train.arrow"


def join(features_path: Path, labels_path: Path, out_path: Path, *, eval_fraction: float = 0.1):
    return join_inputs(
        features_path,
        labels_path,
        train_path=out_path,
        eval_path=out_path.with_name("eval.arrow"),
        holdout_key=HOLDOUT_KEY,
        eval_fraction=eval_fraction,
    )


def both(out_path: Path) -> pa.Table:
    """Training and held-out rows together."""
    return pa.concat_tables([read_ipc(out_path), read_ipc(out_path.with_name("eval.arrow"))])


def replace_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


# --- the happy path --------------------------------------------------------------------------


def test_inner_join_on_join_key_drops_unlabelled_rows(tmp_path) -> None:
    features = features_table(list(range(10)))
    labels = labels_table([12, 3, 9, 0, 7, 11, 5])  # 3, 9, 0, 7, 5 have features; 12, 11 do not
    features_path, labels_path, out_path = write_inputs(tmp_path, features, labels)

    summary = join(features_path, labels_path, out_path)

    assert (summary.rows + summary.eval_rows, summary.features_without_label, summary.labels_without_features) == (5, 5, 2)
    joined = both(out_path)
    assert joined.num_rows == 5
    assert set(joined.column_names) == set(features.column_names) | set(labels.column_names)
    by_key_features = {r[schema.JOIN_KEY]: r for r in features.to_pylist()}
    by_key_labels = {r[schema.JOIN_KEY]: r for r in labels.to_pylist()}
    assert {r[schema.JOIN_KEY] for r in joined.to_pylist()} == {key(i) for i in (0, 3, 5, 7, 9)}
    for row in joined.to_pylist():
        expected = {**by_key_features[row[schema.JOIN_KEY]], **by_key_labels[row[schema.JOIN_KEY]]}
        assert row == expected
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["eval.arrow", "train.arrow"]  # no staging file left


def test_the_join_writes_the_held_out_rows_beside_the_training_rows(tmp_path) -> None:
    features_path, labels_path, out_path = write_inputs(tmp_path, features_table(list(range(400))), labels_table(list(range(400))))
    summary = join(features_path, labels_path, out_path, eval_fraction=0.2)
    train, held = read_ipc(out_path), read_ipc(out_path.with_name("eval.arrow"))
    assert (summary.rows, summary.eval_rows) == (train.num_rows, held.num_rows) and train.num_rows + held.num_rows == 400
    assert 0 < held.num_rows < 200 and train.schema == held.schema
    assert not set(train.column(schema.JOIN_KEY).to_pylist()) & set(held.column(schema.JOIN_KEY).to_pylist())
    # The split is the keyed draw of each row's join key: reference, row by row.
    expected = holdout_mask([key(i) for i in range(400)], fraction=0.2, seed_key=HOLDOUT_KEY)
    assert set(held.column(schema.JOIN_KEY).to_pylist()) == {key(i) for i in range(400) if expected[i]}


def test_load_training_data_tensors(tmp_path) -> None:
    features_path, labels_path, out_path = write_inputs(
        tmp_path, features_table(list(range(30))), labels_table(list(range(5, 40)))
    )
    summary = join(features_path, labels_path, out_path)
    data = load_training_data(out_path)
    table = read_ipc(out_path)
    n = summary.rows

    assert len(data) == n and len(data.features) == n and 15 < n <= 25
    assert data.features.categorical.dtype == torch.int64 and data.features.categorical.shape == (n, NUM_CAT)
    assert data.features.dense.dtype == torch.float32 and data.features.dense.shape == (n, NUM_DENSE)
    assert data.noisy_labels.dtype == torch.float32 and data.noisy_labels.shape == (n,)
    assert data.flip_probs.dtype == torch.float32 and data.flip_probs.shape == (n,)
    assert set(data.noisy_labels.tolist()) <= {0.0, 1.0}
    assert data.flip_probs.min() >= 0 and data.flip_probs.max() < 0.5
    # row i of every tensor is row i of the file
    assert data.noisy_labels.tolist() == table.column(schema.NOISY_LABEL).to_numpy().astype(float).tolist()
    assert data.features.categorical[:, 6].tolist() == table.column(cat_column(6)).to_pylist()
    np.testing.assert_array_equal(data.features.dense[:, 11].numpy(), table.column(dense_column(11)).to_numpy())
    np.testing.assert_allclose(data.flip_probs.numpy(), table.column(schema.FLIP_PROB).to_numpy(), rtol=1e-6)


def test_variable_length_binary_join_key_joins_or_is_rejected_clearly(tmp_path) -> None:
    """Kind.BINARY accepts binary and fixed_size_binary; a mix must not crash inside Arrow."""
    labels = labels_table([1, 2, 3])
    labels = replace_column(labels, schema.JOIN_KEY, pa.array([key(i) for i in (1, 2, 3)], type=pa.binary()))
    features_path, labels_path, out_path = write_inputs(tmp_path, features_table(list(range(5))), labels)
    summary = join(features_path, labels_path, out_path)
    assert summary.rows + summary.eval_rows == 3


def test_join_is_reproducible(tmp_path) -> None:
    """Batches are chosen by row position, so the same inputs must give the same row order."""
    n = 70_000
    ids = list(range(n))
    shuffled = np.random.default_rng(0).permutation(n).tolist()
    features = pa.table(
        {
            schema.JOIN_KEY: pa.array([key(i) for i in ids], type=pa.binary(32)),
            **{cat_column(c): pa.array(np.zeros(n, dtype=np.int32)) for c in range(NUM_CAT)},
            **{dense_column(d): pa.array(np.arange(n, dtype=np.float32)) for d in range(NUM_DENSE)},
        }
    )
    labels = pa.table(
        {
            schema.JOIN_KEY: pa.array([key(i) for i in shuffled], type=pa.binary(32)),
            schema.NOISY_LABEL: pa.array(np.zeros(n, dtype=np.int8)),
            schema.EPSILON: pa.array(np.full(n, 3.0)),
            schema.FLIP_PROB: pa.array(np.full(n, 0.1)),
        }
    )
    features_path, labels_path, _ = write_inputs(tmp_path, features, labels, batch_rows=8192)
    orders = []
    for attempt in range(3):
        out_path = tmp_path / f"joined-{attempt}" / "train.arrow"
        join(features_path, labels_path, out_path)
        orders.append(read_ipc(out_path).column(dense_column(0)).to_numpy())
    assert np.all(np.diff(orders[0]) > 0)  # the features file's order
    for order in orders[1:]:
        assert np.array_equal(order, orders[0])


# --- bad inputs: one-line DataError naming file and field, nothing written -------------------


def _duplicate_feature_key(features: pa.Table, labels: pa.Table):
    keys = features.column(schema.JOIN_KEY).to_pylist()
    keys[3] = keys[1]
    return replace_column(features, schema.JOIN_KEY, pa.array(keys, type=pa.binary(32))), labels


def _duplicate_label_key(features: pa.Table, labels: pa.Table):
    keys = labels.column(schema.JOIN_KEY).to_pylist()
    keys[4] = keys[0]
    return features, replace_column(labels, schema.JOIN_KEY, pa.array(keys, type=pa.binary(32)))


def _nan_noisy_label(features: pa.Table, labels: pa.Table):
    values = labels.column(schema.NOISY_LABEL).to_numpy().astype(np.float64)
    values[2] = np.nan
    return features, replace_column(labels, schema.NOISY_LABEL, pa.array(values))


def _noisy_label_two(features: pa.Table, labels: pa.Table):
    values = labels.column(schema.NOISY_LABEL).to_numpy().copy()
    values[2] = 2
    return features, replace_column(labels, schema.NOISY_LABEL, pa.array(values))


def _flip_prob_half(features: pa.Table, labels: pa.Table):
    values = labels.column(schema.FLIP_PROB).to_numpy().copy()
    values[5] = 0.5
    return features, replace_column(labels, schema.FLIP_PROB, pa.array(values))


def _flip_prob_negative(features: pa.Table, labels: pa.Table):
    values = labels.column(schema.FLIP_PROB).to_numpy().copy()
    values[0] = -0.01
    return features, replace_column(labels, schema.FLIP_PROB, pa.array(values))


def _nan_epsilon(features: pa.Table, labels: pa.Table):
    values = labels.column(schema.EPSILON).to_numpy().copy()
    values[1] = np.nan
    return features, replace_column(labels, schema.EPSILON, pa.array(values))


def _missing_label_column(features: pa.Table, labels: pa.Table):
    return features, labels.drop_columns([schema.FLIP_PROB])


def _missing_feature_column(features: pa.Table, labels: pa.Table):
    return features.drop_columns([dense_column(3)]), labels


def _inf_dense_feature(features: pa.Table, labels: pa.Table):
    values = features.column(dense_column(7)).to_numpy().copy()
    values[4] = np.inf
    return replace_column(features, dense_column(7), pa.array(values)), labels


def _string_categorical(features: pa.Table, labels: pa.Table):
    values = [str(v) for v in features.column(cat_column(2)).to_pylist()]
    return replace_column(features, cat_column(2), pa.array(values)), labels


def _short_join_key(features: pa.Table, labels: pa.Table):
    keys = labels.column(schema.JOIN_KEY).to_pylist()
    keys[6] = keys[6][:16]
    return features, replace_column(labels, schema.JOIN_KEY, pa.array(keys, type=pa.binary()))


def _null_noisy_label(features: pa.Table, labels: pa.Table):
    values = labels.column(schema.NOISY_LABEL).to_pylist()
    values[3] = None
    return features, replace_column(labels, schema.NOISY_LABEL, pa.array(values, type=pa.int8()))


BAD_INPUTS = {  # case: (mutation, file at fault, column named, row named or None)
    "duplicate-feature-join-key": (_duplicate_feature_key, "features", schema.JOIN_KEY, 3),
    "duplicate-label-join-key": (_duplicate_label_key, "labels", schema.JOIN_KEY, 4),
    "nan-noisy-label-float-column": (_nan_noisy_label, "labels", schema.NOISY_LABEL, None),
    "noisy-label-2": (_noisy_label_two, "labels", schema.NOISY_LABEL, 2),
    "null-noisy-label": (_null_noisy_label, "labels", schema.NOISY_LABEL, 3),
    "flip-prob-0.5": (_flip_prob_half, "labels", schema.FLIP_PROB, 5),
    "flip-prob-negative": (_flip_prob_negative, "labels", schema.FLIP_PROB, 0),
    "nan-epsilon": (_nan_epsilon, "labels", schema.EPSILON, 1),
    "missing-label-column": (_missing_label_column, "labels", schema.FLIP_PROB, None),
    "missing-feature-column": (_missing_feature_column, "features", dense_column(3), None),
    "inf-dense-feature": (_inf_dense_feature, "features", dense_column(7), 4),
    "string-categorical": (_string_categorical, "features", cat_column(2), None),
    "short-join-key": (_short_join_key, "labels", schema.JOIN_KEY, 6),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line_data_error_and_writes_nothing(tmp_path, case: str) -> None:
    mutate, culprit, field, row = BAD_INPUTS[case]
    features, labels = mutate(features_table(list(range(8))), labels_table(list(range(8))))
    features_path, labels_path, out_path = write_inputs(tmp_path, features, labels)
    with pytest.raises(DataError) as caught:
        join(features_path, labels_path, out_path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(features_path if culprit == "features" else labels_path) in message
    assert repr(field) in message, message
    if row is not None:
        assert f"row {row}:" in message, message
    assert not out_path.exists()
    assert not out_path.parent.exists() or list(out_path.parent.iterdir()) == []


def test_duplicate_join_key_names_the_row(tmp_path) -> None:
    features, labels = _duplicate_label_key(features_table(list(range(8))), labels_table(list(range(8))))
    features_path, labels_path, out_path = write_inputs(tmp_path, features, labels)
    with pytest.raises(DataError, match="row 4"):
        join(features_path, labels_path, out_path)


def test_flip_prob_error_names_the_row(tmp_path) -> None:
    features, labels = _flip_prob_half(features_table(list(range(8))), labels_table(list(range(8))))
    features_path, labels_path, out_path = write_inputs(tmp_path, features, labels)
    with pytest.raises(DataError, match="row 5"):
        join(features_path, labels_path, out_path)


@pytest.mark.parametrize("which", ["features", "labels"])
def test_empty_file_rejected(tmp_path, which: str) -> None:
    features, labels = features_table(list(range(4))), labels_table(list(range(4)))
    if which == "features":
        features = features.slice(0, 0)
    else:
        labels = labels.slice(0, 0)
    features_path, labels_path, out_path = write_inputs(tmp_path, features, labels)
    with pytest.raises(DataError, match="has no rows") as caught:
        join(features_path, labels_path, out_path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(features_path if which == "features" else labels_path) in message
    assert not out_path.exists()


def test_zero_byte_file_rejected(tmp_path) -> None:
    features_path, labels_path, out_path = write_inputs(tmp_path, features_table([1, 2]), labels_table([1, 2]))
    labels_path.write_bytes(b"")
    with pytest.raises(DataError) as caught:
        join(features_path, labels_path, out_path)
    assert str(labels_path) in str(caught.value) and "\n" not in str(caught.value)
    assert not out_path.exists()


def test_missing_file_rejected(tmp_path) -> None:
    features_path, labels_path, out_path = write_inputs(tmp_path, features_table([1, 2]), labels_table([1, 2]))
    labels_path.unlink()
    with pytest.raises(DataError, match="no such file"):
        join(features_path, labels_path, out_path)
    assert not out_path.exists()


def test_no_overlap_rejected(tmp_path) -> None:
    features_path, labels_path, out_path = write_inputs(
        tmp_path, features_table(list(range(5))), labels_table(list(range(100, 105)))
    )
    with pytest.raises(DataError) as caught:
        join(features_path, labels_path, out_path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(labels_path) in message and str(features_path) in message
    assert not out_path.exists()


def test_existing_output_untouched_on_error(tmp_path) -> None:
    features, labels = _noisy_label_two(features_table(list(range(8))), labels_table(list(range(8))))
    features_path, labels_path, out_path = write_inputs(tmp_path, features, labels)
    out_path.parent.mkdir()
    out_path.write_bytes(b"previous run")
    with pytest.raises(DataError):
        join(features_path, labels_path, out_path)
    assert out_path.read_bytes() == b"previous run"
    assert list(out_path.parent.iterdir()) == [out_path]


def test_keys_sharing_their_first_bytes_still_join_exactly(tmp_path) -> None:
    """The fast lookup sorts on 8-byte prefixes; labels whose prefixes collide take the exact path."""
    prefix = b"\x01" * 8
    keys = [prefix + hashlib.sha256(b"%d" % i).digest()[:24] for i in range(6)] + [key(i) for i in range(6)]
    features = features_table(list(range(12)))
    features = replace_column(features, schema.JOIN_KEY, pa.array(keys, type=pa.binary(32)))
    labels = labels_table(list(range(12)))
    labels = replace_column(labels, schema.JOIN_KEY, pa.array(keys[::-1], type=pa.binary(32)))
    features_path, labels_path, out_path = write_inputs(tmp_path, features.slice(0, 9), labels.slice(1, 10))
    summary = join(features_path, labels_path, out_path)
    joined = both(out_path).to_pylist()
    expected = set(keys[:9]) & set(keys[::-1][1:11])
    assert {row[schema.JOIN_KEY] for row in joined} == expected and summary.rows + summary.eval_rows == len(expected)
    by_key = {r[schema.JOIN_KEY]: r for r in labels.to_pylist()}
    assert all(row[schema.NOISY_LABEL] == by_key[row[schema.JOIN_KEY]][schema.NOISY_LABEL] for row in joined)
