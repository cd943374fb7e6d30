"""The clean room's training data: platform features joined with noisy labels by pseudonymous key.

Rows without a label (opted-out users, clicks the advertiser has no record of)
are dropped; labels without features are counted, never trained on.

The join streams the features file one record batch at a time against the
labels held in memory, sorted by key (about 50 bytes per label), so memory does
not grow with the feature log. Joined rows keep the features file's order
(batches are drawn by row position, so the join must give the same table on
every run) and go to two Arrow IPC files, training and held-out evaluation
(:mod:`pcvr.clean_room.holdout`), which a ClientApp memory-maps
(:func:`load_training_data`) instead of decoding them for every message.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pcvr.clean_room.holdout import HOLDOUT_FRACTION, holdout_mask
from pcvr.data import schema
from pcvr.data.io import DataError, Kind, iter_ipc, read_ipc, staged
from pcvr.data.readers import DuplicateKeys, key_bytes
from pcvr.models.features import EncodedFeatures, cat_column, dense_column, encoded_counts

__all__ = ["CleanRoomData", "JoinSummary", "join_inputs", "load_training_data", "LABEL_KINDS"]

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


@dataclass(frozen=True)
class _Labels:
    """The label file, sorted by join key."""

    keys: np.ndarray  # S32 [L], sorted
    prefixes: np.ndarray | None  # uint64 [L]: the keys' first 8 bytes, when they are distinct (fast lookup)
    noisy_label: np.ndarray  # int8 [L]
    epsilon: np.ndarray  # float64 [L]
    flip_prob: np.ndarray  # float64 [L]

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask, label positions of the hits) of S32 ``keys``."""
        if self.prefixes is not None:
            index = np.searchsorted(self.prefixes, _prefixes(keys))
        else:
            index = np.searchsorted(self.keys, keys)
        index = np.minimum(index, len(self.keys) - 1)
        hit = self.keys[index] == keys
        return hit, index[hit]


def _prefixes(keys: np.ndarray) -> np.ndarray:
    return keys.view(np.uint8).reshape(-1, 32)[:, :8].copy().view(">u8").reshape(-1).astype(np.uint64)


def _read_labels(path: Path) -> _Labels:
    parts: dict[str, list[np.ndarray]] = {name: [] for name in LABEL_KINDS}
    for start, batch in iter_ipc(path, columns=LABEL_KINDS, allow_infinite=(schema.EPSILON,)):
        parts[schema.JOIN_KEY].append(key_bytes(batch.column(schema.JOIN_KEY), path=path, start=start))
        noisy = batch.column(schema.NOISY_LABEL).to_numpy()
        bad = np.flatnonzero((noisy != 0) & (noisy != 1))
        if bad.size:
            raise DataError(f"{path}: row {start + bad[0]}: column {schema.NOISY_LABEL!r} has {noisy[bad[0]]}; expected 0 or 1")
        flip = batch.column(schema.FLIP_PROB).to_numpy()
        bad = np.flatnonzero((flip < 0) | (flip >= 0.5))
        if bad.size:
            raise DataError(f"{path}: row {start + bad[0]}: column {schema.FLIP_PROB!r} must be in [0, 0.5); got {flip[bad[0]]}")
        parts[schema.NOISY_LABEL].append(noisy.astype(np.int8))
        parts[schema.EPSILON].append(batch.column(schema.EPSILON).to_numpy().astype(np.float64))
        parts[schema.FLIP_PROB].append(flip.astype(np.float64))
    keys = np.concatenate(parts.pop(schema.JOIN_KEY))
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    same = np.flatnonzero(keys[1:] == keys[:-1])
    if same.size:
        row = int(np.min(np.maximum(order[same], order[same + 1])))
        raise DataError(f"{path}: row {row}: column {schema.JOIN_KEY!r} repeats an earlier row's key")
    prefixes = _prefixes(keys)
    distinct = prefixes.size < 2 or bool((prefixes[1:] != prefixes[:-1]).all())
    columns = {name: np.concatenate(values)[order] for name, values in parts.items()}
    return _Labels(keys, prefixes if distinct else None, columns[schema.NOISY_LABEL], columns[schema.EPSILON], columns[schema.FLIP_PROB])


def _joined_schema(num_categorical: int, num_dense: int) -> pa.Schema:
    fields = [pa.field(schema.JOIN_KEY, pa.binary(32))]
    fields += [pa.field(cat_column(i), pa.int32()) for i in range(num_categorical)]
    fields += [pa.field(dense_column(j), pa.float32()) for j in range(num_dense)]
    fields += [pa.field(schema.NOISY_LABEL, pa.int8()), pa.field(schema.EPSILON, pa.float64()), pa.field(schema.FLIP_PROB, pa.float64())]
    return pa.schema(fields)


def join_inputs(
    features_path: Path,
    labels_path: Path,
    *,
    train_path: Path,
    eval_path: Path,
    holdout_key: bytes,
    eval_fraction: float = HOLDOUT_FRACTION,
) -> JoinSummary:
    """Validate both inputs, inner-join on the join key, write the training and held-out splits.

    ``eval_path`` gets the joined rows whose keyed draw under the clean room's own
    ``holdout_key`` falls below ``eval_fraction``
    (:func:`pcvr.clean_room.holdout.holdout_mask`), ``train_path`` the others; same
    columns, both Arrow IPC. Both appear together, or (on any error) neither.

    Raises:
        DataError: bad input (naming file, row, column), or no label matching any feature row.
    """
    features_path, labels_path = Path(features_path), Path(labels_path)
    labels = _read_labels(labels_path)
    names = read_ipc(features_path).schema.names
    try:
        num_categorical, num_dense = encoded_counts(names)
    except ValueError as exc:
        raise DataError(f"{features_path}: {exc}") from None
    kinds = {
        schema.JOIN_KEY: Kind.BINARY,
        **{cat_column(i): Kind.INTEGER for i in range(num_categorical)},
        **{dense_column(j): Kind.FLOAT for j in range(num_dense)},
    }
    out_schema = _joined_schema(num_categorical, num_dense)
    duplicates = DuplicateKeys()
    counts = {"features": 0, "train": 0, "eval": 0}
    matched = np.zeros(len(labels.keys), dtype=bool)

    def joined() -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
        for start, batch in iter_ipc(features_path, columns=kinds):
            keys = key_bytes(batch.column(schema.JOIN_KEY), path=features_path, start=start)
            duplicates.add(keys)
            counts["features"] += batch.num_rows
            hit, position = labels.find(keys)
            matched[position] = True
            rows = batch.filter(pa.array(hit))
            columns = {name: rows.column(name) for name in kinds}
            columns[schema.JOIN_KEY] = columns[schema.JOIN_KEY].cast(pa.binary(32))
            columns |= {
                schema.NOISY_LABEL: pa.array(labels.noisy_label[position]),
                schema.EPSILON: pa.array(labels.epsilon[position]),
                schema.FLIP_PROB: pa.array(labels.flip_prob[position]),
            }
            yield pa.record_batch(columns, schema=out_schema), holdout_mask(keys[hit], fraction=eval_fraction, seed_key=holdout_key)

    with staged(train_path, eval_path) as (train_staging, eval_staging):
        with pa.OSFile(str(train_staging), "wb") as train_sink, pa.OSFile(str(eval_staging), "wb") as eval_sink:
            with pa.ipc.new_file(train_sink, out_schema) as train, pa.ipc.new_file(eval_sink, out_schema) as held_out:
                for batch, held in joined():
                    train.write(batch.filter(pa.array(~held)))
                    held_out.write(batch.filter(pa.array(held)))
                    counts["eval"] += int(held.sum())
                    counts["train"] += int((~held).sum())
        repeat = duplicates.first_repeat()
        if repeat is not None:
            raise DataError(f"{features_path}: row {repeat[0]}: column {schema.JOIN_KEY!r} repeats the key of row {repeat[1]}")
        if counts["train"] + counts["eval"] == 0:
            raise DataError(f"{labels_path}: no label matches a row of {features_path} (different join secrets?)")
    joined_rows = counts["train"] + counts["eval"]
    return JoinSummary(
        rows=counts["train"],
        features_without_label=counts["features"] - joined_rows,
        labels_without_features=int(len(labels.keys) - matched.sum()),
        eval_rows=counts["eval"],
    )


def load_training_data(path: Path) -> CleanRoomData:
    """The joined rows of an IPC file written by :func:`join_inputs`, memory-mapped (no decoding), as tensors.

    The number of categorical and dense columns is read from the file itself.

    Raises:
        DataError: missing or unreadable file, or a missing column.
    """
    table = read_ipc(path, columns={schema.NOISY_LABEL: Kind.INTEGER, schema.FLIP_PROB: Kind.FLOAT})
    try:
        features = EncodedFeatures.from_encoded_table(table)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    return CleanRoomData(
        features=features,
        noisy_labels=torch.from_numpy(table.column(schema.NOISY_LABEL).to_numpy().astype(np.float32)),
        flip_probs=torch.from_numpy(table.column(schema.FLIP_PROB).to_numpy().astype(np.float32)),
    )
