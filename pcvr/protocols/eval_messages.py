"""The private-evaluation messages: the platform's model out, a clean room's aggregates back.

Same framing as :mod:`pcvr.protocols.messages` (one ConfigRecord, key names
defined once here, protocol version, binding to run/round/node, digest; every
check made before ``from_record`` returns, the incoming record never mutated).

* :class:`EvaluateIns` carries the adapter weights to score with, in full and
  lossless (``none`` codec: an evaluation of a rounded model would not be the
  model's), and the minimum number of rows a release may cover.
* :class:`EvaluateReply` carries only the sums of
  :class:`~pcvr.protocols.private_eval.EvalAggregates`: no per-row value.

Flower message type: ``evaluate``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from pcvr.protocols.codecs import Codec
from pcvr.protocols.messages import (
    _BINDING_KEYS,
    _CODEC,
    _MIN_BATCH_SIZE,
    _SIZE,
    _WEIGHTS,
    Binding,
    ProtocolError,
    _bytes,
    _check_binding,
    _check_size,
    _codec,
    _decode_frame,
    _int,
    _open,
    _seal,
)
from pcvr.protocols.private_eval import EvalAggregates

__all__ = ["EVALUATE_MESSAGE", "WEIGHTS_CODEC", "EvaluateIns", "EvaluateReply"]

EVALUATE_MESSAGE = "evaluate"
WEIGHTS_CODEC = Codec.parse("none")
_AGGREGATE_KEYS = {item.name: item.name.replace("_", "-") for item in dataclasses.fields(EvalAggregates)}
_COUNT_FIELDS = ("rows", "rooms")
_EVALUATE_INS_KEYS = _BINDING_KEYS | {_CODEC, _SIZE, _WEIGHTS, _MIN_BATCH_SIZE}
_EVALUATE_REPLY_KEYS = _BINDING_KEYS | set(_AGGREGATE_KEYS.values())


@dataclass(frozen=True)
class EvaluateIns:
    """Platform → clean room: score your held-out split with these adapter weights; send back only sums.

    ``weights`` is a :data:`WEIGHTS_CODEC` frame of the full adapter vector.
    ``min_batch_size`` is the platform's floor; the clean room enforces the larger of
    it and its own policy's.
    """

    binding: Binding
    size: int
    weights: bytes
    min_batch_size: int

    def to_record(self) -> RecordDict:
        return _seal(
            self.binding,
            {_CODEC: str(WEIGHTS_CODEC), _SIZE: self.size, _WEIGHTS: self.weights, _MIN_BATCH_SIZE: self.min_batch_size},
        )

    def adapter_weights(self) -> np.ndarray:
        """The decoded adapter weights (float32 [size])."""
        return _decode_frame(self.weights, WEIGHTS_CODEC, length=self.size, what="adapter weights")

    @classmethod
    def from_record(
        cls, record: RecordDict, *, run_id: int, node_id: int, num_adapter_params: int, max_bytes: int
    ) -> "EvaluateIns":
        values = _open(record, required=_EVALUATE_INS_KEYS, max_bytes=max_bytes)
        round_ = _check_binding(values, run_id=run_id, node_id=node_id)
        if _codec(values) != WEIGHTS_CODEC:
            raise ProtocolError(f"evaluation weights must use codec {WEIGHTS_CODEC}; got {values[_CODEC]}")
        _check_size(values, length=num_adapter_params, what="adapter weights")
        ins = cls(
            binding=Binding(run_id=run_id, round=round_, node_id=node_id),
            size=num_adapter_params,
            weights=_bytes(values, _WEIGHTS),
            min_batch_size=_int(values, _MIN_BATCH_SIZE, minimum=1, maximum=2**31 - 1),
        )
        ins.adapter_weights()  # shape, dtype, NaN/inf (the codec's decode): rejected before anything is scored
        return ins


@dataclass(frozen=True)
class EvaluateReply:
    """Clean room → platform: the sums of its held-out split (:class:`EvalAggregates`), nothing per row."""

    binding: Binding
    aggregates: EvalAggregates

    def to_record(self) -> RecordDict:
        fields = {key: getattr(self.aggregates, name) for name, key in _AGGREGATE_KEYS.items()}
        return _seal(self.binding, fields)

    @classmethod
    def from_record(cls, record: RecordDict, *, expected: Binding, min_rows: int, max_bytes: int) -> "EvaluateReply":
        """Validate a reply; a split of fewer than ``min_rows`` rows (the floor asked for) is rejected."""
        values = _open(record, required=_EVALUATE_REPLY_KEYS, max_bytes=max_bytes)
        round_ = _check_binding(values, run_id=expected.run_id, node_id=expected.node_id)
        if round_ != expected.round:
            raise ProtocolError(f"evaluation reply is for round {round_}; expected {expected.round} (stale or replayed)")
        rows = _int(values, _AGGREGATE_KEYS["rows"], minimum=max(1, min_rows), maximum=2**63 - 1)
        rooms = _int(values, _AGGREGATE_KEYS["rooms"], minimum=1, maximum=1)
        sums = {}
        for name, key in _AGGREGATE_KEYS.items():
            if name in _COUNT_FIELDS:
                continue
            if type(values[key]) is not float:
                raise ProtocolError(f"{key!r} must be a float; got {type(values[key]).__name__}")
            sums[name] = values[key]
        try:
            aggregates = EvalAggregates(rows=rows, rooms=rooms, **sums)
        except ValueError as exc:
            raise ProtocolError(f"evaluation aggregates: {exc}") from None
        return cls(binding=expected, aggregates=aggregates)
