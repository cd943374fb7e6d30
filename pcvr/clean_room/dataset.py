"""The clean room's training data: platform features joined with noisy labels by pseudonymous key.

Rows without a label (opted-out users, clicks the advertiser has no record of)
are dropped; labels without features are counted, never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pcvr.clean_room.holdout import HOLDOUT_FRACTION, split_holdout
from pcvr.data import schema
from pcvr.data.io import DataError, Kind, read_table, require_unique, require_values_in, write_parquet_atomic
from pcvr.models.features import EncodedFeatures, cat_column, dense_column

__all__ = ["CleanRoomData", "JoinSummary", "join_inputs", "load_training_data"]

_ROW = "_feature_row"
LABEL_KINDS = {
    schema.JOIN_KEY: Kind.BINARY,
    schema.NOISY_LABEL: Kind.INTEGER,
    schema.EPSILON: Kind.FLOAT,
    schema.FLIP_PROB: Kind.FLOAT,
}


@dataclass(frozen=True)
class CleanRoomData:
    """Joined training rows: encoded features, noisy labels and per-row flip probabilities."""

    features: EncodedFeatures
    noisy_labels: torch.Tensor  # float32 [N], values in {0, 1}
    flip_probs: torch.Tensor  # float32 [N], values in [0, 0.5)

    def __len__(self) -> int:
        return len(self.noisy_labels)


@dataclass(frozen=True)
class JoinSummary:
    rows: int  # joined rows trained on
    features_without_label: int
    labels_without_features: int
    eval_rows: int = 0  # joined rows held out for evaluation


def _feature_kinds(num_categorical: int, num_dense: int) -> dict[str, Kind]:
    return {
        schema.JOIN_KEY: Kind.BINARY,
        **{cat_column(i): Kind.INTEGER for i in range(num_categorical)},
        **{dense_column(j): Kind.FLOAT for j in range(num_dense)},
    }


def join_inputs(
    features_path: Path,
    labels_path: Path,
    out_path: Path,
    *,
    num_categorical: int,
    num_dense: int,
    eval_path: Path | None = None,
    holdout_key: bytes | None = None,
    eval_fraction: float = HOLDOUT_FRACTION,
) -> JoinSummary:
    """Validate both inputs, inner-join on the join key, write ``out_path``; nothing written on error.

    With ``eval_path`` (and the clean room's ``holdout_key``), the joined rows are split
    (:func:`pcvr.clean_room.holdout.split_holdout`): ``out_path`` gets the training rows
    and ``eval_path`` the held-out ones, same columns.
    """
    if (eval_path is None) != (holdout_key is None):
        raise ValueError("a held-out split needs both eval_path and holdout_key")
    features = read_table(features_path, columns=_feature_kinds(num_categorical, num_dense))
    require_unique(features, schema.JOIN_KEY, path=features_path)
    labels = read_table(labels_path, columns=LABEL_KINDS, allow_infinite=(schema.EPSILON,))
    require_unique(labels, schema.JOIN_KEY, path=labels_path)
    require_values_in(labels, schema.NOISY_LABEL, (0, 1), path=labels_path)
    flip = labels.column(schema.FLIP_PROB).to_numpy()
    bad = np.flatnonzero((flip < 0) | (flip >= 0.5))
    if bad.size:
        raise DataError(f"{labels_path}: row {bad[0]}: column {schema.FLIP_PROB!r} must be in [0, 0.5); got {flip[bad[0]]}")
    # Same key type on both sides, and the features file's row order in the output: batches are
    # drawn by row position, so the join must give the same table on every run.
    features = features.set_column(0, schema.JOIN_KEY, features.column(schema.JOIN_KEY).cast(pa.binary()))
    features = features.append_column(_ROW, pa.array(np.arange(features.num_rows)))
    labels = labels.set_column(0, schema.JOIN_KEY, labels.column(schema.JOIN_KEY).cast(pa.binary()))
    joined = features.join(labels, keys=schema.JOIN_KEY, join_type="inner")
    joined = joined.sort_by(_ROW).drop_columns([_ROW])
    if joined.num_rows == 0:
        raise DataError(f"{labels_path}: no label matches a row of {features_path} (different join secrets?)")
    matched = joined.num_rows
    held_out = None
    if eval_path is not None:
        joined, held_out = split_holdout(joined, fraction=eval_fraction, seed_key=holdout_key)
        write_parquet_atomic(held_out, eval_path)
    write_parquet_atomic(joined, out_path)
    return JoinSummary(
        rows=joined.num_rows,
        features_without_label=features.num_rows - matched,
        labels_without_features=labels.num_rows - matched,
        eval_rows=0 if held_out is None else held_out.num_rows,
    )


def load_training_data(path: Path, *, num_categorical: int, num_dense: int) -> CleanRoomData:
    """Load a table written by :func:`join_inputs` into tensors."""
    table = pq.read_table(path)
    return CleanRoomData(
        features=EncodedFeatures.from_encoded_table(table, num_categorical=num_categorical, num_dense=num_dense),
        noisy_labels=torch.from_numpy(table.column(schema.NOISY_LABEL).to_numpy().astype(np.float32)),
        flip_probs=torch.from_numpy(table.column(schema.FLIP_PROB).to_numpy().astype(np.float32)),
    )
