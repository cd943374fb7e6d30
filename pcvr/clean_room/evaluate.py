"""The clean room's side of private evaluation: score the held-out split, release only its sums. No Flower here.

The held-out rows (:mod:`pcvr.clean_room.holdout`) are scored with the model the
platform sent; what leaves is :class:`~pcvr.protocols.private_eval.EvalAggregates`
(sums over the split, from which the platform de-biases AUC, NE and calibration),
never a prediction or a label. A split with fewer rows than the clean room's
minimum batch is refused.

Privacy: the sums are post-processing of the ε-label-DP noisy labels, so they cost
no label-DP budget (a label is randomized once; asking again reveals nothing new
about it); held-out rows never enter a gradient, so DP-SGD's accounting of the
training rows is unaffected. They are not gradient releases and do not count
against the policy's release limits; the ledger reports them
(:func:`evaluation_ledger`).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, RecordDict

from pcvr.clean_room.dataset import CleanRoomData
from pcvr.models.cvr import predict
from pcvr.protocols.layout import EVAL_FILE
from pcvr.protocols.private_eval import EvalAggregates, room_aggregates

__all__ = ["EVAL_FILE", "evaluate_split", "record_release", "evaluation_ledger"]

_STATE = "pcvr.clean-room.evaluations"
_RELEASES = "releases"
_ROWS = "rows"


def evaluate_split(model: torch.nn.Module, data: CleanRoomData, *, min_rows: int) -> EvalAggregates:
    """The sums a release of ``model``'s scores on the held-out ``data`` may carry.

    Raises:
        ValueError: ``data`` has fewer than ``min_rows`` rows.
    """
    if len(data) < min_rows:
        raise ValueError(f"the held-out split has {len(data)} rows; a release needs at least {min_rows}")
    probs = predict(model, data.features)
    return room_aggregates(
        probs, data.noisy_labels.double().numpy(), data.flip_probs.double().numpy(), min_rows=min_rows
    )


def record_release(state: RecordDict, *, rows: int) -> None:
    """Count one evaluation release of ``rows`` rows in the clean room's run state (kept on its node)."""
    previous = state[_STATE] if _STATE in state else ConfigRecord({_RELEASES: 0, _ROWS: rows})
    state[_STATE] = ConfigRecord({_RELEASES: int(previous[_RELEASES]) + 1, _ROWS: rows})


def evaluation_ledger(state: RecordDict) -> dict[str, object]:
    """What the privacy ledger says about this run's evaluation releases."""
    entry = state[_STATE] if _STATE in state else None
    return {
        "releases": 0 if entry is None else int(entry[_RELEASES]),
        "rows": None if entry is None else int(entry[_ROWS]),
        "released": "sums over the held-out split only (no per-row value)",
        "label_dp_epsilon_spent": 0.0,
        "why": (
            "post-processing of the epsilon-label-DP noisy labels; held-out rows never enter a gradient, "
            "so DP-SGD accounting is unaffected; not gradient releases, so not counted against the policy's release limits"
        ),
    }
