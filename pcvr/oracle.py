"""What only a simulation can know: the true labels of the clean rooms' held-out rows.

Outside a simulation nobody but the advertiser holds true labels, and the platform
learns the model's quality only from the clean rooms' de-biased sums
(:mod:`pcvr.protocols.private_eval`). In ``pcvr simulate`` every party's data is
at hand, so the same metrics are computed here from the true labels of the very
rows the clean rooms scored, to print beside the private estimates: they should
agree within the estimates' standard errors (which are those of the
randomized-response noise given the rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.metrics import roc_auc_score

from pcvr.advertiser.handoff import read_conversions
from pcvr.clean_room.dataset import load_training_data
from pcvr.data import schema
from pcvr.models.cvr import CVRNet, attach_adapters, predict, set_adapter_vector
from pcvr.platform.evaluate import holdout_metrics
from pcvr.protocols.keys import pseudonymous_keys

__all__ = ["HeldOutRows", "held_out_truth"]


@dataclass(frozen=True)
class HeldOutRows:
    """One clean room's held-out split and where its true labels are."""

    eval_path: Path  # the clean room's eval.parquet
    conversions_path: Path  # the advertiser's conversions (true labels by click id)
    join_secret: bytes


def _true_labels(rows: HeldOutRows) -> np.ndarray:
    conversions = read_conversions(rows.conversions_path)
    click_ids = conversions.column(schema.CLICK_ID).to_numpy(zero_copy_only=False)
    by_key = dict(zip(pseudonymous_keys(click_ids, secret=rows.join_secret), conversions.column(schema.CONVERTED).to_numpy()))
    keys = pq.read_table(rows.eval_path, columns=[schema.JOIN_KEY]).column(schema.JOIN_KEY).to_pylist()
    return np.array([by_key[key] for key in keys], dtype=np.int8)


def held_out_truth(backbone: CVRNet, adapters: torch.Tensor, rooms: Sequence[HeldOutRows]) -> dict[str, float]:
    """AUC (over pairs within a clean room, as the private estimate), NE and calibration on the held-out rows' true labels."""
    model = attach_adapters(backbone)
    set_adapter_vector(model, adapters)
    labels, probs, pairs, ordered = [], [], 0.0, 0.0
    for rows in rooms:
        data = load_training_data(rows.eval_path, num_categorical=len(schema.CATEGORICAL_FIELDS), num_dense=len(schema.DENSE_FIELDS))
        room_labels, room_probs = _true_labels(rows), predict(model, data.features)
        room_pairs = float(room_labels.sum()) * float(len(room_labels) - room_labels.sum())
        pairs += room_pairs
        ordered += room_pairs * roc_auc_score(room_labels, room_probs) if room_pairs else 0.0
        labels.append(room_labels)
        probs.append(room_probs)
    pooled = holdout_metrics(np.concatenate(labels), np.concatenate(probs))
    return {**pooled, "auc": ordered / pairs, "rows": int(sum(len(l) for l in labels))}
