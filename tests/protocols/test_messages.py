"""Tests of pcvr.protocols.messages: round trips and rejection of malformed records.

Flower ``Message`` objects need a running Flower context, so these tests work on the
``RecordDict`` content that ``to_record`` / ``from_record`` exchange.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pcvr.protocols.label_dp import Correction
from pcvr.protocols.messages import PROTOCOL_VERSION, ProtocolError, TrainIns, TrainReply

SIZE = 50
ARRAYS, CONFIG, METRICS = "pcvr.arrays", "pcvr.config", "pcvr.metrics"


def vector(seed: int, size: int = SIZE, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=size).astype(dtype)


def make_ins() -> TrainIns:
    return TrainIns(round=3, adapter_weights=vector(0), batch_size=64, min_batch_size=16, correction=Correction.BACKWARD)


def make_reply() -> TrainReply:
    return TrainReply(round=3, adapter_grad=vector(1), num_examples=64, loss=0.4321)


def read_ins(record: RecordDict) -> TrainIns:
    return TrainIns.from_record(record, num_adapter_params=SIZE)


def read_reply(record: RecordDict) -> TrainReply:
    return TrainReply.from_record(record, num_adapter_params=SIZE, expected_round=3, min_batch_size=16)


def snapshot(record: RecordDict) -> dict:
    """Everything a record holds, as plain values, to detect mutation."""
    out: dict = {}
    for name, section in record.items():
        if isinstance(section, ArrayRecord):
            out[name] = ("arrays", {k: (a.dtype, tuple(a.shape), a.stype, bytes(a.data)) for k, a in section.items()})
        else:
            out[name] = (type(section).__name__, {k: repr(v) for k, v in section.items()})
    return out


# --- round trips -----------------------------------------------------------------------------


def test_train_ins_round_trip() -> None:
    ins = make_ins()
    record = ins.to_record()
    before = snapshot(record)
    back = read_ins(record)
    assert back.round == 3 and back.batch_size == 64 and back.min_batch_size == 16
    assert back.correction is Correction.BACKWARD
    assert back.adapter_weights.dtype == np.float32
    np.testing.assert_array_equal(back.adapter_weights, ins.adapter_weights)
    assert snapshot(record) == before
    back.adapter_weights[:] = 0  # the decoded value does not alias the record
    assert snapshot(record) == before
    config = record[CONFIG]
    assert config["version"] == PROTOCOL_VERSION


@pytest.mark.parametrize("correction", list(Correction), ids=lambda c: c.value)
def test_train_ins_round_trip_every_correction(correction: Correction) -> None:
    ins = TrainIns(round=1, adapter_weights=vector(2), batch_size=8, min_batch_size=8, correction=correction)
    assert read_ins(ins.to_record()).correction is correction


def test_train_ins_to_record_casts_weights_to_float32() -> None:
    weights = vector(3, dtype=np.float64)
    ins = TrainIns(round=1, adapter_weights=weights, batch_size=8, min_batch_size=8, correction=Correction.NONE)
    back = read_ins(ins.to_record())
    assert back.adapter_weights.dtype == np.float32
    np.testing.assert_array_equal(back.adapter_weights, weights.astype(np.float32))


def test_train_reply_round_trip() -> None:
    reply = make_reply()
    record = reply.to_record()
    before = snapshot(record)
    back = read_reply(record)
    assert back.round == 3 and back.num_examples == 64
    assert back.loss == pytest.approx(0.4321, rel=1e-12)
    assert back.adapter_grad.dtype == np.float32
    np.testing.assert_array_equal(back.adapter_grad, reply.adapter_grad)
    assert snapshot(record) == before
    back.adapter_grad[:] = 0
    assert snapshot(record) == before


def test_train_reply_at_exactly_min_batch_size_is_accepted() -> None:
    reply = TrainReply(round=3, adapter_grad=vector(4), num_examples=16, loss=0.1)
    assert read_reply(reply.to_record()).num_examples == 16


# --- rejections ------------------------------------------------------------------------------


def _set_config(key: str, value) -> Callable[[RecordDict], None]:
    def mutate(record: RecordDict) -> None:
        record[CONFIG][key] = value

    return mutate


def _del(section: str, key: str) -> Callable[[RecordDict], None]:
    def mutate(record: RecordDict) -> None:
        del record[section][key]

    return mutate


def _del_section(section: str) -> Callable[[RecordDict], None]:
    def mutate(record: RecordDict) -> None:
        del record[section]

    return mutate


def _set_array(key: str, array: Array) -> Callable[[RecordDict], None]:
    def mutate(record: RecordDict) -> None:
        record[ARRAYS][key] = array

    return mutate


def _set_metric(key: str, value) -> Callable[[RecordDict], None]:
    def mutate(record: RecordDict) -> None:
        record[METRICS][key] = value

    return mutate


def _extra_section(record: RecordDict) -> None:
    record["pcvr.extra"] = ConfigRecord({"x": 1})


def _config_as_metrics(record: RecordDict) -> None:
    record[CONFIG] = MetricRecord({k: v for k, v in record[CONFIG].items() if not isinstance(v, str)})


def _with(vector_: np.ndarray, index: int, value: float) -> np.ndarray:
    out = vector_.copy()
    out[index] = value
    return out


CORRUPT = Array(dtype="float32", shape=(SIZE,), stype="numpy.ndarray", data=b"not an array")

BAD_INS = {
    "version-2": _set_config("version", 2),
    "version-0": _set_config("version", 0),
    "version-string": _set_config("version", "1"),
    "missing-version": _del(CONFIG, "version"),
    "missing-round": _del(CONFIG, "round"),
    "missing-correction": _del(CONFIG, "correction"),
    "missing-weights": _del(ARRAYS, "adapter-weights"),
    "missing-arrays": _del_section(ARRAYS),
    "missing-config": _del_section(CONFIG),
    "extra-config-key": _set_config("learning-rate", 0.1),
    "extra-array": _set_array("adapter-grad", Array(vector(5))),
    "extra-section": _extra_section,
    "config-wrong-record-type": _config_as_metrics,
    "short-weights": _set_array("adapter-weights", Array(vector(5, size=SIZE - 1))),
    "2-d-weights": _set_array("adapter-weights", Array(vector(5).reshape(5, 10))),
    "float64-weights": _set_array("adapter-weights", Array(vector(5, dtype=np.float64))),
    "nan-weights": _set_array("adapter-weights", Array(_with(vector(5), 4, np.nan))),
    "inf-weights": _set_array("adapter-weights", Array(_with(vector(5), 0, -np.inf))),
    "corrupt-weights": _set_array("adapter-weights", CORRUPT),
    "round-0": _set_config("round", 0),
    "round-negative": _set_config("round", -2),
    "round-float": _set_config("round", 3.0),
    "round-bool": _set_config("round", True),
    "batch-below-min": _set_config("batch-size", 8),
    "min-batch-0": _set_config("min-batch-size", 0),
    "unknown-correction": _set_config("correction", "median"),
}


@pytest.mark.parametrize("case", list(BAD_INS))
def test_train_ins_from_record_rejects(case: str) -> None:
    record = make_ins().to_record()
    BAD_INS[case](record)
    before = snapshot(record)
    with pytest.raises(ProtocolError):
        read_ins(record)
    assert snapshot(record) == before


BAD_REPLIES = {
    "version-2": _set_config("version", 2),
    "missing-version": _del(CONFIG, "version"),
    "missing-num-examples": _del(METRICS, "num-examples"),
    "missing-loss": _del(METRICS, "loss"),
    "missing-grad": _del(ARRAYS, "adapter-grad"),
    "missing-metrics": _del_section(METRICS),
    "missing-arrays": _del_section(ARRAYS),
    "extra-metric": _set_metric("auc", 0.7),
    "extra-config-key": _set_config("node", 4),
    "extra-array": _set_array("adapter-weights", Array(vector(6))),
    "extra-section": _extra_section,
    "short-grad": _set_array("adapter-grad", Array(vector(6, size=SIZE + 1))),
    "2-d-grad": _set_array("adapter-grad", Array(vector(6).reshape(10, 5))),
    "float64-grad": _set_array("adapter-grad", Array(vector(6, dtype=np.float64))),
    "float16-grad": _set_array("adapter-grad", Array(vector(6, dtype=np.float16))),
    "nan-grad": _set_array("adapter-grad", Array(_with(vector(6), 9, np.nan))),
    "inf-grad": _set_array("adapter-grad", Array(_with(vector(6), 9, np.inf))),
    "corrupt-grad": _set_array("adapter-grad", CORRUPT),
    "wrong-round-stale": _set_config("round", 2),
    "wrong-round-future": _set_config("round", 4),
    "num-examples-below-min": _set_metric("num-examples", 15),
    "num-examples-zero": _set_metric("num-examples", 0),
    "num-examples-float": _set_metric("num-examples", 64.0),
    "nan-loss": _set_metric("loss", float("nan")),
    "inf-loss": _set_metric("loss", float("inf")),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_train_reply_from_record_rejects(case: str) -> None:
    record = make_reply().to_record()
    BAD_REPLIES[case](record)
    before = snapshot(record)
    with pytest.raises(ProtocolError):
        read_reply(record)
    assert snapshot(record) == before


def test_rejections_say_what_is_wrong() -> None:
    record = make_reply().to_record()
    _set_config("round", 2)(record)
    with pytest.raises(ProtocolError, match="round 2.*expected round 3"):
        read_reply(record)
    record = make_ins().to_record()
    _set_config("version", 7)(record)
    with pytest.raises(ProtocolError, match="version 7"):
        read_ins(record)
    record = make_reply().to_record()
    _set_array("adapter-grad", Array(vector(6, dtype=np.float64)))(record)
    with pytest.raises(ProtocolError, match="float64"):
        read_reply(record)


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
def test_version_must_be_the_integer_protocol_version(version) -> None:
    """``True == 1`` and ``1.0 == 1`` in Python, but neither is protocol version 1 on the wire."""
    for record, read in ((make_ins().to_record(), read_ins), (make_reply().to_record(), read_reply)):
        _set_config("version", version)(record)
        with pytest.raises(ProtocolError, match="version"):
            read(record)
