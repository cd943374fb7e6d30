"""Typed, versioned messages between the platform and a clean room.

Each message is a frozen value with ``to_record()`` / ``from_record()`` over
Flower's :class:`~flwr.app.RecordDict`. Key names are defined once, here.
``from_record`` validates everything it reads (version, keys, shape, dtype,
finiteness) and raises :class:`ProtocolError` — it never returns a half-checked
value, and it never mutates the incoming record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pcvr.protocols.label_dp import Correction

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "TrainIns", "TrainReply"]

PROTOCOL_VERSION = 1

_ARRAYS = "pcvr.arrays"
_CONFIG = "pcvr.config"
_METRICS = "pcvr.metrics"
_ADAPTER_WEIGHTS = "adapter-weights"
_ADAPTER_GRAD = "adapter-grad"
_VERSION = "version"
_ROUND = "round"
_BATCH_SIZE = "batch-size"
_MIN_BATCH_SIZE = "min-batch-size"
_CORRECTION = "correction"
_NUM_EXAMPLES = "num-examples"
_LOSS = "loss"


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says which part and why."""


def _section(record: RecordDict, name: str, kind: type) -> object:
    if name not in record:
        raise ProtocolError(f"missing record {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        raise ProtocolError(f"record {name!r} is a {type(value).__name__}; expected {kind.__name__}")
    return value


def _expect_keys(section: object, name: str, keys: set[str]) -> None:
    present = set(section.keys())  # type: ignore[attr-defined]
    if present != keys:
        extra, missing = sorted(present - keys), sorted(keys - present)
        raise ProtocolError(f"record {name!r}: unexpected keys {extra}, missing keys {missing}")


def _int(section: ConfigRecord | MetricRecord, key: str, *, minimum: int) -> int:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProtocolError(f"{key!r} must be an integer >= {minimum}; got {value!r}")
    return value


def _vector(arrays: ArrayRecord, key: str) -> np.ndarray:
    try:
        value = arrays[key].numpy()
    except Exception as exc:  # a corrupt Array can fail in many ways inside numpy
        raise ProtocolError(f"array {key!r} cannot be decoded: {exc}") from None
    if value.dtype != np.float32 or value.ndim != 1:
        raise ProtocolError(f"array {key!r} must be a 1-d float32 vector; got {value.dtype} {value.shape}")
    if not np.isfinite(value).all():
        raise ProtocolError(f"array {key!r} holds NaN or infinite values")
    return value


def _check_version(config: ConfigRecord) -> None:
    version = config.get(_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}; this side speaks {PROTOCOL_VERSION}")


@dataclass(frozen=True)
class TrainIns:
    """Platform → clean room: current adapter weights and what to compute on them."""

    round: int
    adapter_weights: np.ndarray
    batch_size: int
    min_batch_size: int
    correction: Correction

    def to_record(self) -> RecordDict:
        return RecordDict(
            {
                _ARRAYS: ArrayRecord({_ADAPTER_WEIGHTS: Array(np.ascontiguousarray(self.adapter_weights, dtype=np.float32))}),
                _CONFIG: ConfigRecord(
                    {
                        _VERSION: PROTOCOL_VERSION,
                        _ROUND: self.round,
                        _BATCH_SIZE: self.batch_size,
                        _MIN_BATCH_SIZE: self.min_batch_size,
                        _CORRECTION: self.correction.value,
                    }
                ),
            }
        )

    @classmethod
    def from_record(cls, record: RecordDict, *, num_adapter_params: int) -> "TrainIns":
        _expect_keys(record, "message", {_ARRAYS, _CONFIG})
        config = _section(record, _CONFIG, ConfigRecord)
        _expect_keys(config, _CONFIG, {_VERSION, _ROUND, _BATCH_SIZE, _MIN_BATCH_SIZE, _CORRECTION})
        _check_version(config)
        arrays = _section(record, _ARRAYS, ArrayRecord)
        _expect_keys(arrays, _ARRAYS, {_ADAPTER_WEIGHTS})
        weights = _vector(arrays, _ADAPTER_WEIGHTS)
        if weights.shape != (num_adapter_params,):
            raise ProtocolError(f"adapter weights have shape {weights.shape}; expected ({num_adapter_params},)")
        try:
            correction = Correction.parse(str(config[_CORRECTION]))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        batch_size = _int(config, _BATCH_SIZE, minimum=1)
        min_batch_size = _int(config, _MIN_BATCH_SIZE, minimum=1)
        if batch_size < min_batch_size:
            raise ProtocolError(f"batch size {batch_size} is below the minimum {min_batch_size}")
        return cls(
            round=_int(config, _ROUND, minimum=1),
            adapter_weights=weights,
            batch_size=batch_size,
            min_batch_size=min_batch_size,
            correction=correction,
        )


@dataclass(frozen=True)
class TrainReply:
    """Clean room → platform: the adapter gradient summed over one batch, and its size."""

    round: int
    adapter_grad: np.ndarray
    num_examples: int
    loss: float

    def to_record(self) -> RecordDict:
        return RecordDict(
            {
                _ARRAYS: ArrayRecord({_ADAPTER_GRAD: Array(np.ascontiguousarray(self.adapter_grad, dtype=np.float32))}),
                _CONFIG: ConfigRecord({_VERSION: PROTOCOL_VERSION, _ROUND: self.round}),
                _METRICS: MetricRecord({_NUM_EXAMPLES: self.num_examples, _LOSS: self.loss}),
            }
        )

    @classmethod
    def from_record(
        cls, record: RecordDict, *, num_adapter_params: int, expected_round: int, min_batch_size: int
    ) -> "TrainReply":
        _expect_keys(record, "message", {_ARRAYS, _CONFIG, _METRICS})
        config = _section(record, _CONFIG, ConfigRecord)
        _expect_keys(config, _CONFIG, {_VERSION, _ROUND})
        _check_version(config)
        round_ = _int(config, _ROUND, minimum=1)
        if round_ != expected_round:
            raise ProtocolError(f"reply is for round {round_}; expected round {expected_round}")
        metrics = _section(record, _METRICS, MetricRecord)
        _expect_keys(metrics, _METRICS, {_NUM_EXAMPLES, _LOSS})
        num_examples = _int(metrics, _NUM_EXAMPLES, minimum=min_batch_size)
        loss = metrics[_LOSS]
        if not isinstance(loss, float) or not np.isfinite(loss):
            raise ProtocolError(f"loss must be a finite float; got {loss!r}")
        arrays = _section(record, _ARRAYS, ArrayRecord)
        _expect_keys(arrays, _ARRAYS, {_ADAPTER_GRAD})
        grad = _vector(arrays, _ADAPTER_GRAD)
        if grad.shape != (num_adapter_params,):
            raise ProtocolError(f"adapter gradient has shape {grad.shape}; expected ({num_adapter_params},)")
        return cls(round=round_, adapter_grad=grad, num_examples=num_examples, loss=float(loss))
