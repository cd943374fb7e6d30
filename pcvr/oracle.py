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
import torch
from sklearn.metrics import roc_auc_score

from pcvr.advertiser.handoff import true_labels
from pcvr.clean_room.dataset import load_training_data
from pcvr.data import schema
from pcvr.data.io import read_ipc
from pcvr.data.spec import DatasetSpec
from pcvr.models.cvr import CVRNet, attach_adapters, predict, set_adapter_vector
from pcvr.platform.evaluate import holdout_metrics

__all__ = ["HeldOutRows", "held_out_truth"]


@dataclass(frozen=True)
class HeldOutRows:
    """One clean room's held-out split and where its true labels are."""

    eval_path: Path  # the clean room's held-out split
    conversions_spec: Path  # the advertiser's dataset spec (its [conversions]: true labels by click id)
    join_secret: bytes


def _true_labels(rows: HeldOutRows) -> np.ndarray:
    by_key = true_labels(DatasetSpec.load(rows.conversions_spec), join_secret=rows.join_secret)
    keys = read_ipc(rows.eval_path).column(schema.JOIN_KEY).to_pylist()
    return np.array([by_key[key] for key in keys], dtype=np.int8)


def held_out_truth(backbone: CVRNet, adapters: torch.Tensor, rooms: Sequence[HeldOutRows]) -> dict[str, float]:
    """AUC (over pairs within a clean room, as the private estimate), NE and calibration on the held-out rows' true labels."""
    model = attach_adapters(backbone)
    set_adapter_vector(model, adapters)
    labels, probs, pairs, ordered = [], [], 0.0, 0.0
    for rows in rooms:
        data = load_training_data(rows.eval_path)
        room_labels, room_probs = _true_labels(rows), predict(model, data.features)
        room_pairs = float(room_labels.sum()) * float(len(room_labels) - room_labels.sum())
        pairs += room_pairs
        ordered += room_pairs * roc_auc_score(room_labels, room_probs) if room_pairs else 0.0
        labels.append(room_labels)
        probs.append(room_probs)
    pooled = holdout_metrics(np.concatenate(labels), np.concatenate(probs))
    return {**pooled, "auc": ordered / pairs, "rows": int(sum(len(l) for l in labels))}
