"""Typed, versioned messages between the platform and a clean room.

Each message is a frozen value with ``to_record()`` / ``from_record()`` over
Flower's :class:`~flwr.app.RecordDict`: one :class:`~flwr.app.ConfigRecord`
whose key names are defined once, here. Every message carries

* the protocol version;
* its **binding** — run id, round and the clean room's node id — so a gradient
  replayed from another run, round or clean room is rejected;
* a digest (BLAKE2b-128, unkeyed) over all of its fields, so a corrupted payload
  is rejected even where the corruption still parses. The digest detects
  corruption, not forgery: anyone who can write a message can compute it.
  Authenticity — that a reply comes from the clean room it names — rests on the
  transport: TLS on every Flower connection and SuperNode authentication. What
  the platform also bounds is one clean room's influence on an update
  (``num_examples`` at most the batch asked for; optionally each decoded gradient
  clipped, :func:`pcvr.platform.training.clip_room_gradient`).

Vectors travel as codec frames (:mod:`pcvr.protocols.codecs`): the clean room's
adapter gradient, compressed with error feedback, and the platform's adapter
weights as a compressed delta against the version the clean room acknowledged.

``from_record`` validates everything before it returns (size, keys, version,
binding, digest, types, ranges, and the frame itself: shape, NaN/inf) and raises
:class:`ProtocolError` naming the part and the reason. It never mutates the
incoming record.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from pcvr.protocols.codecs import Codec, CodecError, decode
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.run_config import MAX_LOCAL_STEPS

__all__ = [
    "PROTOCOL_VERSION",
    "PREFLIGHT_ACTION",
    "ProtocolError",
    "Binding",
    "TrainIns",
    "TrainReply",
    "LedgerIns",
    "LedgerReply",
    "PreflightIns",
    "PreflightReply",
    "record_size",
    "record_to_bytes",
    "record_from_bytes",
]

PROTOCOL_VERSION = 4  # 3: refusal codes moved clear of Flower's error codes (pcvr.protocols.refusals); 4: local steps
PREFLIGHT_ACTION = "preflight"  # Flower message type "query.preflight"

SECTION = "pcvr"
_VERSION = "version"
_RUN = "run"
_ROUND = "round"
_NODE = "node"
_DIGEST = "digest"
_BASE_ROUND = "base-round"
_APPLIED_ROUND = "applied-round"
_CODEC = "codec"
_WEIGHTS = "weights"
_BATCH_SIZE = "batch-size"
_MIN_BATCH_SIZE = "min-batch-size"
_CORRECTION = "correction"
_LOCAL_STEPS = "local-steps"
_LEARNING_RATE = "learning-rate"
_GRAD = "grad"
_SIZE = "size"  # the length of the vector a frame encodes
_EXAMPLES = "examples"
_LOSS = "loss"
_LEDGER = "ledger"
_BACKBONE = "backbone-digest"
_CLEAN_ROOM = "clean-room-id"
_REFUSAL = "refusal"

_BINDING_KEYS = {_VERSION, _RUN, _ROUND, _NODE, _DIGEST}
_TRAIN_INS_KEYS = _BINDING_KEYS | {
    _BASE_ROUND, _APPLIED_ROUND, _CODEC, _SIZE, _WEIGHTS, _BATCH_SIZE, _MIN_BATCH_SIZE, _CORRECTION, _LOCAL_STEPS,
    _LEARNING_RATE,
}
_TRAIN_REPLY_KEYS = _BINDING_KEYS | {_CODEC, _SIZE, _GRAD, _EXAMPLES}  # + optional _LOSS
_LEDGER_INS_KEYS = _BINDING_KEYS
_LEDGER_REPLY_KEYS = _BINDING_KEYS | {_LEDGER}
_PREFLIGHT_INS_KEYS = _BINDING_KEYS | {_BACKBONE, _BATCH_SIZE, _MIN_BATCH_SIZE}
_PREFLIGHT_REPLY_KEYS = _BINDING_KEYS | {_CLEAN_ROOM, _REFUSAL}
_DIGEST_SIZE = 16
_UINT64 = 2**64


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says which part and why."""


@dataclass(frozen=True)
class Binding:
    """What a message is for: the Flower run, the round, and the clean room's node id."""

    run_id: int
    round: int
    node_id: int


# --- wire helpers ------------------------------------------------------------------------------


def record_to_bytes(record: RecordDict) -> bytes:
    """The record as Flower serializes it (protobuf), e.g. to keep a copy of what was received."""
    return recorddict_to_proto(record).SerializeToString(deterministic=True)


def record_from_bytes(data: bytes) -> RecordDict:
    """Parse bytes written by :func:`record_to_bytes`.

    Raises:
        ProtocolError: the bytes do not parse, or are not exactly what serializing the
            parsed record gives (protobuf skips unknown fields, so a corrupted field tag
            can parse into a record that looks intact).
    """
    try:
        record = recorddict_from_proto(ProtoRecordDict.FromString(bytes(data)))
        canonical = record_to_bytes(record)
    except Exception as exc:  # protobuf and Flower raise many types on garbage
        raise ProtocolError(f"payload does not parse as a record: {type(exc).__name__}: {exc}") from None
    if canonical != bytes(data):
        raise ProtocolError("payload is not in canonical form: bytes were altered in transit")
    return record


def record_size(record: RecordDict) -> int:
    """Serialized size of ``record`` in bytes."""
    return recorddict_to_proto(record).ByteSize()


def _canonical_value(value: object) -> bytes:
    if isinstance(value, bytes):
        return b"b" + value
    if isinstance(value, bool):
        return b"?" + (b"1" if value else b"0")
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, float):
        return b"f" + struct.pack("<d", value)
    if isinstance(value, str):
        return b"s" + value.encode()
    if isinstance(value, list):  # a ConfigRecord may hold lists; none of ours does, but they must not crash
        return b"l" + b"".join(struct.pack("<Q", len(item)) + item for item in map(_canonical_value, value))
    raise ProtocolError(f"a field has unsupported type {type(value).__name__}")


def _canonical(values: dict[str, object]) -> bytes:
    """A byte string that determines every (key, value) pair, independent of key order."""
    parts: list[bytes] = []
    for key in sorted(values):
        body = _canonical_value(values[key])
        parts += [struct.pack("<I", len(key)), key.encode(), struct.pack("<Q", len(body)), body]
    return b"".join(parts)


def _digest(values: dict[str, object]) -> bytes:
    return hashlib.blake2b(_canonical(values), digest_size=_DIGEST_SIZE).digest()


def _seal(binding: Binding, fields: dict[str, object]) -> RecordDict:
    values: dict[str, object] = {
        _VERSION: PROTOCOL_VERSION,
        _RUN: binding.run_id,
        _ROUND: binding.round,
        _NODE: binding.node_id,
        **fields,
    }
    values[_DIGEST] = _digest(values)
    return RecordDict({SECTION: ConfigRecord(values)})  # type: ignore[arg-type]


def _open(record: RecordDict, *, required: set[str], optional: set[str] = frozenset(), max_bytes: int) -> dict[str, object]:
    """Size, structure, version and digest checks shared by every message; returns the fields."""
    if not isinstance(record, RecordDict):
        raise ProtocolError(f"message content is a {type(record).__name__}; expected a RecordDict")
    try:
        size = record_size(record)
    except Exception as exc:
        raise ProtocolError(f"message cannot be serialized to measure it: {exc}") from None
    if size > max_bytes:
        raise ProtocolError(f"message is {size} bytes; the limit is {max_bytes}")
    if set(record.keys()) != {SECTION}:
        raise ProtocolError(f"message holds records {sorted(record.keys())}; expected only {SECTION!r}")
    section = record[SECTION]
    if not isinstance(section, ConfigRecord):
        raise ProtocolError(f"record {SECTION!r} is a {type(section).__name__}; expected ConfigRecord")
    values = dict(section.items())
    present = set(values)
    if not required <= present or not present <= required | optional:
        extra, missing = sorted(present - required - optional), sorted(required - present)
        raise ProtocolError(f"unexpected keys {extra}, missing keys {missing}")
    version = values[_VERSION]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}; this side speaks {PROTOCOL_VERSION}")
    digest = values.pop(_DIGEST)
    if not isinstance(digest, bytes) or len(digest) != _DIGEST_SIZE:
        raise ProtocolError(f"digest must be {_DIGEST_SIZE} bytes")
    if _digest(values) != digest:
        raise ProtocolError("digest does not match the content (corrupted or altered in transit)")
    return values


def _int(values: dict[str, object], key: str, *, minimum: int, maximum: int = _UINT64 - 1) -> int:
    value = values[key]
    if type(value) is not int or not minimum <= value <= maximum:
        raise ProtocolError(f"{key!r} must be an integer in [{minimum}, {maximum}]; got {value!r}")
    return value


def _bytes(values: dict[str, object], key: str) -> bytes:
    value = values[key]
    if not isinstance(value, bytes):
        raise ProtocolError(f"{key!r} must be bytes; got {type(value).__name__}")
    return value


def _codec(values: dict[str, object]) -> Codec:
    text = values[_CODEC]
    if not isinstance(text, str):
        raise ProtocolError(f"{_CODEC!r} must be a string; got {type(text).__name__}")
    try:
        return Codec.parse(text)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def _check_binding(values: dict[str, object], *, run_id: int, node_id: int) -> int:
    """Checks run and node; returns the message's round."""
    run = _int(values, _RUN, minimum=0)
    if run != run_id:
        raise ProtocolError(f"message is bound to run {run}; this is run {run_id}")
    node = _int(values, _NODE, minimum=0)
    if node != node_id:
        raise ProtocolError(f"message is bound to node {node}; expected node {node_id}")
    return _int(values, _ROUND, minimum=0)


def _check_size(values: dict[str, object], *, length: int, what: str) -> None:
    size = _int(values, _SIZE, minimum=1)
    if size != length:
        raise ProtocolError(f"{what} has {size} entries; expected {length}")


def _decode_frame(frame: bytes, codec: Codec, *, length: int, what: str) -> np.ndarray:
    try:
        return decode(frame, codec, length=length)
    except CodecError as exc:
        raise ProtocolError(f"{what} ({codec}): {exc}") from None


# --- platform → clean room ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrainIns:
    """Platform → clean room: adapter weights (as a compressed delta) and what to compute on them.

    ``weights`` is a codec frame. With ``base_round == 0`` it holds the full weights
    (a delta against zeros); otherwise the delta against the weights the clean room
    acknowledged for ``base_round``. ``applied_round`` is the newest round whose reply
    from this clean room the platform applied (0: none it knows of; ``None`` when
    building: the same as ``base_round``): a reply after it that was not applied is
    what the clean room's error feedback sends again. The two differ when the
    platform sends full weights to a clean room whose reply it did apply — always
    with the lossless codec, whose weights then arrive exact rather than as a sum.

    ``local_steps`` 1: reply with one batch's summed gradient. More: take that many
    Adam steps of ``learning_rate`` locally, each on its own batch of ``batch_size``
    rows, and reply with the change of the weights (:func:`pcvr.clean_room.task.local_update`).
    """

    binding: Binding
    base_round: int
    codec: Codec
    size: int
    weights: bytes
    batch_size: int
    min_batch_size: int
    correction: Correction
    local_steps: int = 1
    learning_rate: float = 0.0
    applied_round: int | None = None  # None: the same as base_round

    def __post_init__(self) -> None:
        if self.applied_round is None:
            object.__setattr__(self, "applied_round", self.base_round)

    def to_record(self) -> RecordDict:
        return _seal(
            self.binding,
            {
                _BASE_ROUND: self.base_round,
                _APPLIED_ROUND: self.applied_round,
                _CODEC: str(self.codec),
                _SIZE: self.size,
                _WEIGHTS: self.weights,
                _BATCH_SIZE: self.batch_size,
                _MIN_BATCH_SIZE: self.min_batch_size,
                _CORRECTION: self.correction.value,
                _LOCAL_STEPS: self.local_steps,
                _LEARNING_RATE: float(self.learning_rate),
            },
        )

    def weights_delta(self) -> np.ndarray:
        """The decoded delta (float32 [size]); add it to the base version's weights."""
        return _decode_frame(self.weights, self.codec, length=self.size, what="adapter weights")

    @classmethod
    def from_record(
        cls, record: RecordDict, *, run_id: int, node_id: int, last_round: int, num_adapter_params: int, max_bytes: int
    ) -> "TrainIns":
        """Validate an instruction; ``last_round`` is the newest round this clean room already served."""
        values = _open(record, required=_TRAIN_INS_KEYS, max_bytes=max_bytes)
        round_ = _check_binding(values, run_id=run_id, node_id=node_id)
        if round_ <= last_round:
            raise ProtocolError(f"instruction for round {round_} is stale or replayed (already served round {last_round})")
        base_round = _int(values, _BASE_ROUND, minimum=0, maximum=round_ - 1)
        applied_round = _int(values, _APPLIED_ROUND, minimum=0, maximum=round_ - 1)
        if base_round and base_round != applied_round:
            raise ProtocolError(f"weights are a delta against round {base_round}, whose reply was not applied ({applied_round})")
        _check_size(values, length=num_adapter_params, what="adapter weights")
        codec = _codec(values)
        try:
            correction = Correction.parse(str(values[_CORRECTION]))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        batch_size = _int(values, _BATCH_SIZE, minimum=1, maximum=2**31 - 1)
        min_batch_size = _int(values, _MIN_BATCH_SIZE, minimum=1, maximum=2**31 - 1)
        if batch_size < min_batch_size:
            raise ProtocolError(f"batch size {batch_size} is below the minimum {min_batch_size}")
        local_steps = _int(values, _LOCAL_STEPS, minimum=1, maximum=MAX_LOCAL_STEPS)
        learning_rate = values[_LEARNING_RATE]
        if not isinstance(learning_rate, float) or not math.isfinite(learning_rate) or learning_rate < 0:
            raise ProtocolError(f"learning rate must be a finite float >= 0; got {learning_rate!r}")
        if local_steps > 1 and learning_rate == 0:
            raise ProtocolError("local steps need a learning rate > 0")
        ins = cls(
            binding=Binding(run_id=run_id, round=round_, node_id=node_id),
            base_round=base_round,
            applied_round=applied_round,
            codec=codec,
            size=num_adapter_params,
            weights=_bytes(values, _WEIGHTS),
            batch_size=batch_size,
            min_batch_size=min_batch_size,
            correction=correction,
            local_steps=local_steps,
            learning_rate=learning_rate,
        )
        ins.weights_delta()  # validates the frame before anything is computed
        return ins


# --- clean room → platform ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrainReply:
    """Clean room → platform: the adapter gradient summed over one batch (a codec frame), and its size.

    After local steps (``TrainIns.local_steps`` > 1) the frame holds the change of the
    adapter weights instead, and ``num_examples`` the rows of all the steps' batches.

    A reply to round r also acknowledges that the clean room now holds the weights of round r.
    ``loss`` is the batch's mean corrected loss, or ``None`` when the clean room withholds
    it (under DP-SGD only the noised gradient may leave).
    """

    binding: Binding
    codec: Codec
    size: int
    grad: bytes
    num_examples: int
    loss: float | None = None

    def to_record(self) -> RecordDict:
        fields: dict[str, object] = {
            _CODEC: str(self.codec),
            _SIZE: self.size,
            _GRAD: self.grad,
            _EXAMPLES: self.num_examples,
        }
        if self.loss is not None:
            fields[_LOSS] = float(self.loss)
        return _seal(self.binding, fields)

    def adapter_grad(self) -> np.ndarray:
        """The decoded, batch-summed gradient (float32 [size])."""
        return _decode_frame(self.grad, self.codec, length=self.size, what="adapter gradient")

    @classmethod
    def from_record(
        cls,
        record: RecordDict,
        *,
        expected: Binding,
        codec: Codec,
        num_adapter_params: int,
        min_batch_size: int,
        max_bytes: int,
        max_examples: int = 2**31 - 1,
    ) -> "TrainReply":
        """Validate a reply against the round the platform is in and the node it asked.

        ``num_examples`` must lie in [``min_batch_size``, ``max_examples``]: a clean room
        cannot have used more rows than the platform asked for.
        """
        values = _open(record, required=_TRAIN_REPLY_KEYS, optional={_LOSS}, max_bytes=max_bytes)
        round_ = _check_binding(values, run_id=expected.run_id, node_id=expected.node_id)
        if round_ != expected.round:
            raise ProtocolError(f"reply is for round {round_}; expected round {expected.round} (stale or replayed)")
        _check_size(values, length=num_adapter_params, what="adapter gradient")
        reply_codec = _codec(values)
        if reply_codec != codec:
            raise ProtocolError(f"reply uses codec {reply_codec}; this run uses {codec}")
        loss = values.get(_LOSS)
        if loss is not None and (not isinstance(loss, float) or not math.isfinite(loss)):
            raise ProtocolError(f"loss must be a finite float; got {loss!r}")
        reply = cls(
            binding=expected,
            codec=codec,
            size=num_adapter_params,
            grad=_bytes(values, _GRAD),
            num_examples=_int(values, _EXAMPLES, minimum=min_batch_size, maximum=max_examples),
            loss=loss,
        )
        reply.adapter_grad()  # shape, dtype, NaN/inf: rejected here, never applied
        return reply


# --- the privacy ledger, asked for at the end of a run ------------------------------------------


@dataclass(frozen=True)
class LedgerIns:
    """Platform → clean room: report your privacy ledger for this run."""

    binding: Binding

    def to_record(self) -> RecordDict:
        return _seal(self.binding, {})

    @classmethod
    def from_record(cls, record: RecordDict, *, run_id: int, node_id: int, max_bytes: int) -> "LedgerIns":
        values = _open(record, required=_LEDGER_INS_KEYS, max_bytes=max_bytes)
        round_ = _check_binding(values, run_id=run_id, node_id=node_id)
        return cls(binding=Binding(run_id=run_id, round=round_, node_id=node_id))


@dataclass(frozen=True)
class LedgerReply:
    """Clean room → platform: what protected this clean room's records in this run (a JSON object)."""

    binding: Binding
    ledger: dict

    def to_record(self) -> RecordDict:
        return _seal(self.binding, {_LEDGER: json.dumps(self.ledger, sort_keys=True)})

    @classmethod
    def from_record(cls, record: RecordDict, *, expected: Binding, max_bytes: int) -> "LedgerReply":
        values = _open(record, required=_LEDGER_REPLY_KEYS, max_bytes=max_bytes)
        round_ = _check_binding(values, run_id=expected.run_id, node_id=expected.node_id)
        if round_ != expected.round:
            raise ProtocolError(f"ledger reply is for round {round_}; expected {expected.round}")
        text = values[_LEDGER]
        if not isinstance(text, str):
            raise ProtocolError(f"{_LEDGER!r} must be a JSON string")
        try:
            ledger = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"{_LEDGER!r} is not valid JSON: {exc}") from None
        if not isinstance(ledger, dict):
            raise ProtocolError(f"{_LEDGER!r} must be a JSON object")
        return cls(binding=expected, ledger=ledger)


# --- the pre-flight check, before round 1 ------------------------------------------------------


@dataclass(frozen=True)
class PreflightIns:
    """Platform → clean room, before round 1: can you serve this run?

    ``backbone_digest`` is :func:`pcvr.models.cvr.backbone_digest` of the platform's
    backbone; the clean room compares its own copy's.
    """

    binding: Binding
    backbone_digest: bytes
    batch_size: int
    min_batch_size: int

    def to_record(self) -> RecordDict:
        return _seal(
            self.binding,
            {_BACKBONE: self.backbone_digest, _BATCH_SIZE: self.batch_size, _MIN_BATCH_SIZE: self.min_batch_size},
        )

    @classmethod
    def from_record(cls, record: RecordDict, *, run_id: int, node_id: int, max_bytes: int) -> "PreflightIns":
        values = _open(record, required=_PREFLIGHT_INS_KEYS, max_bytes=max_bytes)
        round_ = _check_binding(values, run_id=run_id, node_id=node_id)
        return cls(
            binding=Binding(run_id=run_id, round=round_, node_id=node_id),
            backbone_digest=_bytes(values, _BACKBONE),
            batch_size=_int(values, _BATCH_SIZE, minimum=1, maximum=2**31 - 1),
            min_batch_size=_int(values, _MIN_BATCH_SIZE, minimum=1, maximum=2**31 - 1),
        )


@dataclass(frozen=True)
class PreflightReply:
    """Clean room → platform: its id, and 0 if it can serve the run or else a :class:`~pcvr.protocols.refusals.Refusal` code."""

    binding: Binding
    clean_room_id: int
    refusal: int = 0

    def to_record(self) -> RecordDict:
        return _seal(self.binding, {_CLEAN_ROOM: self.clean_room_id, _REFUSAL: self.refusal})

    @classmethod
    def from_record(cls, record: RecordDict, *, expected: Binding, max_bytes: int) -> "PreflightReply":
        values = _open(record, required=_PREFLIGHT_REPLY_KEYS, max_bytes=max_bytes)
        round_ = _check_binding(values, run_id=expected.run_id, node_id=expected.node_id)
        if round_ != expected.round:
            raise ProtocolError(f"pre-flight reply is for round {round_}; expected {expected.round}")
        return cls(
            binding=expected,
            clean_room_id=_int(values, _CLEAN_ROOM, minimum=0, maximum=2**31 - 1),
            refusal=_int(values, _REFUSAL, minimum=0, maximum=2**31 - 1),
        )
