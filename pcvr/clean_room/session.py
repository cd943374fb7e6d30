"""What a clean room keeps between rounds of one run, in Flower's ``context.state``.

* the adapter weights it holds and the round they belong to (instructions arrive as
  deltas against them);
* the newest round it served (an instruction for that round or an older one is a
  replay and is refused);
* the error-feedback residual: what the gradient codec dropped so far, added to the
  next gradient before it is compressed, so it is sent later rather than lost; and
  what the last reply carried, until the next instruction shows whether the platform
  applied it (a delta against that round) or not (full weights: it is added back);
* the DP-SGD noise multiplier of this run, once derived;
* with local steps, the clean room's own Adam moments (:class:`~pcvr.clean_room.task.AdamMoments`).

The state stays on the clean room's node; nothing of it crosses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from pcvr.clean_room.task import AdamMoments
from pcvr.protocols.messages import ProtocolError, TrainIns

__all__ = ["RoomState", "load_state", "save_state", "weights_for", "carried_residual"]

_ARRAYS = "pcvr.clean-room.arrays"
_ROUNDS = "pcvr.clean-room.rounds"
_WEIGHTS = "weights"
_RESIDUAL = "residual"
_PENDING = "pending"
_HELD = "held-round"
_LAST = "last-round"
_SIGMA = "noise-multiplier"
_ADAM_M = "adam-exp-avg"
_ADAM_V = "adam-exp-avg-sq"
_ADAM_STEP = "adam-step"


@dataclass(frozen=True)
class RoomState:
    held_round: int = 0  # 0: holds no weights
    last_round: int = 0
    weights: np.ndarray | None = None
    residual: np.ndarray | None = None
    pending: np.ndarray | None = None  # the decoded gradient of the reply for held_round
    noise_multiplier: float | None = None
    moments: AdamMoments | None = None


def load_state(state: RecordDict, *, length: int | None) -> RoomState:
    """The clean room's state for this run (empty at the first round or after a restart).

    ``length`` is the adapter vector's length; ``None`` skips the shape check.
    """
    if _ROUNDS not in state:
        return RoomState()
    rounds, arrays = state[_ROUNDS], state[_ARRAYS]
    weights, residual, pending, adam_m, adam_v = (
        arrays[key].numpy() if key in arrays else None for key in (_WEIGHTS, _RESIDUAL, _PENDING, _ADAM_M, _ADAM_V)
    )
    for value in (weights, residual, pending, adam_m, adam_v):
        if value is not None and length is not None and value.shape != (length,):
            return RoomState()  # a state from another model: start over (the platform resends in full)
    sigma = rounds.get(_SIGMA)
    return RoomState(
        held_round=int(rounds[_HELD]),
        last_round=int(rounds[_LAST]),
        weights=weights,
        residual=residual,
        pending=pending,
        noise_multiplier=None if sigma is None else float(sigma),
        moments=None if adam_m is None or adam_v is None else AdamMoments(adam_m, adam_v, step=int(rounds[_ADAM_STEP])),
    )


def save_state(state: RecordDict, room: RoomState) -> None:
    arrays = {}
    if room.weights is not None:
        arrays[_WEIGHTS] = Array(np.ascontiguousarray(room.weights, dtype=np.float32))
    if room.residual is not None:
        arrays[_RESIDUAL] = Array(np.ascontiguousarray(room.residual, dtype=np.float32))
    if room.pending is not None:
        arrays[_PENDING] = Array(np.ascontiguousarray(room.pending, dtype=np.float32))
    rounds: dict[str, int | float] = {_HELD: room.held_round, _LAST: room.last_round}
    if room.moments is not None:
        arrays[_ADAM_M] = Array(np.ascontiguousarray(room.moments.exp_avg, dtype=np.float32))
        arrays[_ADAM_V] = Array(np.ascontiguousarray(room.moments.exp_avg_sq, dtype=np.float32))
        rounds[_ADAM_STEP] = room.moments.step
    state[_ARRAYS] = ArrayRecord(arrays)
    if room.noise_multiplier is not None:
        rounds[_SIGMA] = room.noise_multiplier
    state[_ROUNDS] = ConfigRecord(rounds)


def carried_residual(room: RoomState, ins: TrainIns, *, length: int) -> np.ndarray:
    """The error-feedback residual to add to this round's gradient.

    If the last reply was not applied by the platform (its next instruction names an
    older applied round), what it carried is added back.
    """
    residual = room.residual if room.residual is not None else np.zeros(length, dtype=np.float32)
    if room.pending is not None and ins.applied_round != room.held_round:
        residual = residual + room.pending
    return residual


def weights_for(room: RoomState, ins: TrainIns, *, length: int) -> np.ndarray:
    """The weights ``ins`` describes: its delta applied to the version it names.

    Raises:
        ProtocolError: the delta is against a version this clean room does not hold.
    """
    delta = ins.weights_delta()
    if ins.base_round == 0:
        return delta
    if room.weights is None or room.held_round != ins.base_round:
        raise ProtocolError(
            f"weights are a delta against round {ins.base_round}; this clean room holds round {room.held_round}"
        )
    with np.errstate(over="ignore"):
        weights = room.weights + delta
    if not np.isfinite(weights).all():
        raise ProtocolError("applying the weight delta gives NaN or infinite weights")
    return weights
