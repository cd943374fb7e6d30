"""Tests of pcvr.protocols.eval_messages: round trips, binding, and rejection of malformed records."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from pcvr.protocols.codecs import Codec, encode
from pcvr.protocols.eval_messages import EvaluateIns, EvaluateReply
from pcvr.protocols.messages import PROTOCOL_VERSION, SECTION, Binding, ProtocolError, record_to_bytes
from pcvr.protocols.private_eval import room_aggregates
from support import fields_of, resealed

SIZE = 40
RUN, NODE = 2**63 + 5, 2**64 - 9
BINDING = Binding(run_id=RUN, round=31, node_id=NODE)
LIMIT = 1 << 20
NONE = Codec.parse("none")


def weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=SIZE).astype(np.float32)


def make_ins(**changes) -> EvaluateIns:
    fields = dict(binding=BINDING, size=SIZE, weights=encode(weights(), NONE, generator=np.random.default_rng(0)), min_batch_size=64)
    return EvaluateIns(**{**fields, **changes})


def make_reply() -> EvaluateReply:
    rng = np.random.default_rng(1)
    probs = rng.random(200)
    aggregates = room_aggregates(probs, (rng.random(200) < probs).astype(int), np.full(200, 0.1), min_rows=64)
    return EvaluateReply(binding=BINDING, aggregates=aggregates)


def read_ins(record: RecordDict) -> EvaluateIns:
    return EvaluateIns.from_record(record, run_id=RUN, node_id=NODE, num_adapter_params=SIZE, max_bytes=LIMIT)


def read_reply(record: RecordDict, *, min_rows: int = 64) -> EvaluateReply:
    return EvaluateReply.from_record(record, expected=BINDING, min_rows=min_rows, max_bytes=LIMIT)


def test_evaluate_ins_round_trip_leaves_the_record_untouched() -> None:
    ins = make_ins()
    record = ins.to_record()
    before = record_to_bytes(record)
    back = read_ins(record)
    assert back == ins
    np.testing.assert_array_equal(back.adapter_weights(), weights())
    assert record_to_bytes(record) == before
    assert fields_of(record)["version"] == PROTOCOL_VERSION


def test_evaluate_reply_round_trip_carries_exactly_the_aggregates() -> None:
    reply = make_reply()
    record = reply.to_record()
    assert read_reply(record) == reply
    assert set(fields_of(record)) == {"version", "run", "round", "node", "digest"} | {
        key.replace("_", "-") for key in reply.aggregates.to_dict()
    }


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(run=RUN + 1), "bound to run"),
        (dict(node=NODE - 1), "bound to node"),
        (dict(round=30), "stale or replayed"),
        (dict(rows=63), "'rows' must be an integer in \\[64"),
        (dict(rooms=2), "'rooms' must be an integer in \\[1, 1\\]"),
        (dict(loss=float("nan")), "loss must be a finite float"),
        (dict(positives_var=-1.0), "positives_var must be >= 0"),
        (dict(pairs=3), "'pairs' must be a float"),
        (dict(version=PROTOCOL_VERSION + 1), "protocol version"),
    ],
)
def test_a_reply_bound_elsewhere_or_out_of_range_is_rejected(changes: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        read_reply(resealed(make_reply().to_record(), **changes))


def test_a_reply_with_a_per_row_field_or_a_missing_sum_is_rejected() -> None:
    record = make_reply().to_record()
    with pytest.raises(ProtocolError, match="unexpected keys \\['labels'\\]"):
        read_reply(resealed(record, labels=b"\x00\x01"))
    with pytest.raises(ProtocolError, match="missing keys \\['loss'\\]"):
        read_reply(resealed(record, drop=("loss",)))


def test_a_corrupted_reply_fails_its_digest() -> None:
    values = fields_of(make_reply().to_record())
    values["sum-pred"] = values["sum-pred"] + 1.0
    with pytest.raises(ProtocolError, match="digest does not match"):
        read_reply(RecordDict({SECTION: ConfigRecord(values)}))


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(run=RUN + 1), "bound to run"),
        (dict(codec="q8"), "must use codec none"),
        (dict(size=SIZE + 1), "adapter weights has 41 entries"),
        (dict(min_batch_size=0), "'min-batch-size' must be an integer"),
        (dict(weights=b"\x00" * 7), "adapter weights"),
    ],
)
def test_a_malformed_instruction_is_rejected(changes: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        read_ins(resealed(make_ins().to_record(), **changes))


def test_an_instruction_with_non_finite_weights_is_rejected() -> None:
    bad = weights()
    bad[3] = np.inf
    frame = bad.astype("<f4").tobytes()
    good = make_ins().weights
    forged = good[: len(good) - len(frame)] + frame  # same framing, an infinite entry
    with pytest.raises(ProtocolError, match="adapter weights"):
        read_ins(make_ins(weights=forged).to_record())
