"""Tests of pcvr.protocols.messages: round trips, binding, and rejection of malformed records.

Flower ``Message`` objects are built in the platform's tests; these work on the
``RecordDict`` content that ``to_record`` / ``from_record`` exchange.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from pcvr.protocols.codecs import Codec, encode
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.messages import (
    PROTOCOL_VERSION,
    SECTION,
    Binding,
    LedgerIns,
    LedgerReply,
    ProtocolError,
    TrainIns,
    TrainReply,
    record_from_bytes,
    record_size,
    record_to_bytes,
)
from support import fields_of, resealed

SIZE = 50
RUN, NODE = 2**63 + 11, 2**64 - 3  # Flower ids are unsigned 64-bit
BINDING = Binding(run_id=RUN, round=3, node_id=NODE)
TOPK_Q4 = Codec.parse("topk:0.2+q4")
NONE = Codec.parse("none")
LIMIT = 1 << 20


def vector(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=size).astype(np.float32)


def frame(values: np.ndarray, codec: Codec = NONE) -> bytes:
    return encode(values, codec, generator=np.random.default_rng(0))


def make_ins(**changes) -> TrainIns:
    fields = dict(
        binding=BINDING,
        base_round=2,
        codec=NONE,
        size=SIZE,
        weights=frame(vector(0)),
        batch_size=64,
        min_batch_size=16,
        correction=Correction.BACKWARD,
    )
    return TrainIns(**{**fields, **changes})


def make_reply(**changes) -> TrainReply:
    fields = dict(binding=BINDING, codec=TOPK_Q4, size=SIZE, grad=frame(vector(1), TOPK_Q4), num_examples=64, loss=0.4321)
    return TrainReply(**{**fields, **changes})


def read_ins(record: RecordDict, *, last_round: int = 2) -> TrainIns:
    return TrainIns.from_record(
        record, run_id=RUN, node_id=NODE, last_round=last_round, num_adapter_params=SIZE, max_bytes=LIMIT
    )


def read_reply(record: RecordDict, *, codec: Codec = TOPK_Q4, max_bytes: int = LIMIT) -> TrainReply:
    return TrainReply.from_record(
        record, expected=BINDING, codec=codec, num_adapter_params=SIZE, min_batch_size=16, max_bytes=max_bytes
    )


def altered(record: RecordDict, **changes) -> RecordDict:
    """Change fields without recomputing the digest (corruption in transit)."""
    values = fields_of(record)
    values.update({k.replace("_", "-"): v for k, v in changes.items()})
    return RecordDict({SECTION: ConfigRecord(values)})


# --- round trips -----------------------------------------------------------------------------


def test_train_ins_round_trip_leaves_the_record_untouched() -> None:
    ins = make_ins()
    record = ins.to_record()
    before = record_to_bytes(record)
    back = read_ins(record)
    assert back == ins
    np.testing.assert_array_equal(back.weights_delta(), vector(0))
    assert record_to_bytes(record) == before
    assert fields_of(record)["version"] == PROTOCOL_VERSION


@pytest.mark.parametrize("correction", list(Correction), ids=lambda c: c.value)
def test_train_ins_round_trip_every_correction(correction: Correction) -> None:
    assert read_ins(make_ins(correction=correction).to_record()).correction is correction


@pytest.mark.parametrize("loss", [0.4321, None])
def test_train_reply_round_trip(loss: float | None) -> None:
    reply = make_reply(loss=loss)
    back = read_reply(reply.to_record())
    assert back == reply
    np.testing.assert_array_equal(back.adapter_grad(), reply.adapter_grad())


def test_ledger_messages_round_trip() -> None:
    assert LedgerIns.from_record(LedgerIns(BINDING).to_record(), run_id=RUN, node_id=NODE, max_bytes=LIMIT).binding == BINDING
    ledger = {"clean_room_id": 1, "dp_sgd": {"enabled": True, "epsilon": 2.5}, "levels": {"standard": 3.0}}
    back = LedgerReply.from_record(LedgerReply(BINDING, ledger).to_record(), expected=BINDING, max_bytes=LIMIT)
    assert back.ledger == ledger


def test_bytes_round_trip_is_exact() -> None:
    record = make_reply().to_record()
    data = record_to_bytes(record)
    assert record_to_bytes(record_from_bytes(data)) == data
    assert read_reply(record_from_bytes(data)) == make_reply()
    assert record_size(record) == len(data)


# --- binding: run, round, node ---------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(run=RUN + 1), "bound to run"),
        (dict(node=NODE - 1), "bound to node"),
        (dict(round=2), "stale or replayed"),
        (dict(round=4), "stale or replayed"),
    ],
)
def test_reply_bound_elsewhere_is_rejected(changes: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        read_reply(resealed(make_reply().to_record(), **changes))


def test_instruction_for_a_served_round_is_a_replay() -> None:
    record = make_ins().to_record()
    read_ins(record, last_round=2)
    with pytest.raises(ProtocolError, match="stale or replayed"):
        read_ins(record, last_round=3)


def test_instruction_for_another_node_or_run_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="bound to node"):
        read_ins(resealed(make_ins().to_record(), node=5))
    with pytest.raises(ProtocolError, match="bound to run"):
        read_ins(resealed(make_ins().to_record(), run=5))


def test_delta_base_must_precede_the_round() -> None:
    with pytest.raises(ProtocolError, match="base-round"):
        read_ins(resealed(make_ins().to_record(), base_round=3))


# --- integrity and framing -------------------------------------------------------------------


def test_any_change_without_a_new_digest_is_rejected() -> None:
    record = make_reply().to_record()
    with pytest.raises(ProtocolError, match="digest does not match"):
        read_reply(altered(record, examples=65))
    grad = bytearray(fields_of(record)["grad"])
    grad[3] ^= 0x10
    with pytest.raises(ProtocolError, match="digest does not match"):
        read_reply(altered(record, grad=bytes(grad)))


def test_wrong_version_is_rejected_even_when_resealed() -> None:
    for version in (PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, str(PROTOCOL_VERSION), float(PROTOCOL_VERSION)):
        with pytest.raises(ProtocolError, match="protocol version"):
            read_reply(resealed(make_reply().to_record(), version=version))


def test_unknown_and_missing_keys_are_rejected() -> None:
    with pytest.raises(ProtocolError, match=r"unexpected keys \['extra'\]"):
        read_reply(resealed(make_reply().to_record(), extra=1))
    with pytest.raises(ProtocolError, match=r"missing keys \['examples'\]"):
        read_reply(resealed(make_reply().to_record(), drop=("examples",)))
    with pytest.raises(ProtocolError, match="expected only"):
        record = make_reply().to_record()
        record["other"] = ArrayRecord()
        read_reply(record)


def test_oversized_message_is_rejected_before_it_is_read() -> None:
    record = make_reply().to_record()
    size = record_size(record)
    read_reply(record, max_bytes=size)
    with pytest.raises(ProtocolError, match=f"{size} bytes; the limit is {size - 1}"):
        read_reply(record, max_bytes=size - 1)


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(examples=15), "'examples' must be an integer in \\[16"),
        (dict(examples=64.0), "'examples' must be an integer"),
        (dict(examples=True), "'examples' must be an integer"),
        (dict(loss=float("nan")), "loss must be a finite float"),
        (dict(loss=1), "loss must be a finite float"),
        (dict(grad=[1.0, 2.0]), "'grad' must be bytes"),
        (dict(codec="zip"), "codec"),
        (dict(codec="none"), "reply uses codec none; this run uses topk:0.2\\+q4"),
    ],
)
def test_malformed_reply_fields_are_rejected(changes: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        read_reply(resealed(make_reply().to_record(), **changes))


@pytest.mark.parametrize("size", [SIZE - 1, SIZE + 1])
def test_gradient_of_the_wrong_length_is_rejected(size: int) -> None:
    record = make_reply(codec=NONE, size=size, grad=frame(vector(1, size))).to_record()
    with pytest.raises(ProtocolError, match=f"adapter gradient has {size} entries; expected {SIZE}"):
        read_reply(record, codec=NONE)
    lying = make_reply(codec=NONE, grad=frame(vector(1, size))).to_record()  # declares SIZE, sends another length
    with pytest.raises(ProtocolError, match="adapter gradient \\(none\\)"):
        read_reply(lying, codec=NONE)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    values = vector(1)
    raw = bytearray(values.tobytes())
    raw[8:12] = np.float32(bad).tobytes()  # encode() refuses NaN, so forge the frame
    with pytest.raises(ProtocolError, match="adapter gradient"):
        read_reply(make_reply(codec=NONE, grad=bytes(raw)).to_record(), codec=NONE)
    with pytest.raises(ProtocolError, match="adapter weights"):
        read_ins(make_ins(weights=bytes(raw)).to_record())


def test_float64_frame_is_rejected() -> None:
    wide = vector(1).astype(np.float64).tobytes()
    with pytest.raises(ProtocolError, match="adapter gradient"):
        read_reply(make_reply(codec=NONE, grad=wide).to_record(), codec=NONE)


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(batch_size=8), "batch size 8 is below the minimum 16"),
        (dict(batch_size=0), "'batch-size' must be an integer in \\[1"),
        (dict(correction="sideways"), "correction must be one of none, forward, backward"),
        (dict(weights="abc"), "'weights' must be bytes"),
        (dict(applied_round=1), "delta against round 2, whose reply was not applied"),
        (dict(local_steps=0), "'local-steps' must be an integer in \\[1"),
        (dict(local_steps=1001), "'local-steps' must be an integer in \\[1, 1000\\]"),
        (dict(local_steps=4, learning_rate=0.0), "local steps need a learning rate > 0"),
        (dict(learning_rate=float("nan")), "learning rate must be a finite float"),
        (dict(learning_rate=1), "learning rate must be a finite float"),
    ],
)
def test_malformed_instruction_fields_are_rejected(changes: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        read_ins(resealed(make_ins().to_record(), **changes))


def test_garbage_bytes_do_not_parse() -> None:
    with pytest.raises(ProtocolError, match="does not parse"):
        record_from_bytes(b"\xff\xff\xff\x07garbage")


def test_ledger_reply_must_be_a_json_object() -> None:
    record = LedgerReply(BINDING, {"a": 1}).to_record()
    for text in ("[1, 2]", "{not json"):
        with pytest.raises(ProtocolError, match="ledger"):
            LedgerReply.from_record(resealed(record, ledger=text), expected=BINDING, max_bytes=LIMIT)
