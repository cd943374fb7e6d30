"""Fuzzing the wire: mutated replies never reach the model, and mutated instructions never reach training.

Each mutation is applied either to the serialized payload (truncation, bit flips,
overwritten bytes — as corruption would) or to the record by a sender that follows
the framing and recomputes the digest (wrong shape, dtype, NaN/inf, oversized,
wrong version, replayed or misbound, unknown keys — as a buggy or hostile sender
would). Every mutated reply goes through the platform's own round step
(:func:`pcvr.platform.federation.apply_round`); the model's weights and optimizer
state must be byte-identical afterwards, and every rejection must say why.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import Metadata

from pcvr.clean_room.session import RoomState, weights_for
from pcvr.platform.federation import apply_round
from pcvr.platform.training import AdapterTrainer
from pcvr.protocols.codecs import Codec, Quantization, encode
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.messages import (
    PROTOCOL_VERSION,
    SECTION,
    Binding,
    ProtocolError,
    TrainIns,
    TrainReply,
    record_from_bytes,
    record_to_bytes,
)
from pcvr.protocols.run_config import RunConfig
from support import fields_of, make_trainer, resealed

RUN, NODE, ROUND = 2**63 + 5, 2**63 + 99, 7
LIMIT = 64 * 1024


def snapshot(trainer: AdapterTrainer) -> bytes:
    """Every parameter and every optimizer tensor, as bytes."""
    parts = [p.detach().numpy().tobytes() for p in trainer.model.parameters()]
    for state in trainer.optimizer.state.values():
        parts += [v.detach().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode() for _, v in sorted(state.items())]
    return b"".join(parts) + repr(trainer.steps).encode()


def reply_message(content: RecordDict, *, src: int = NODE) -> Message:
    metadata = Metadata(
        run_id=RUN, message_id="", src_node_id=src, dst_node_id=1, reply_to_message_id="e" * 64,
        group_id=str(ROUND), created_at=time.time(), ttl=600.0, message_type="train",
    )
    return Message(metadata=metadata, content=content)


class ReplyFuzzer:
    """Mutations of one genuine reply; each yields (kind, bytes or record)."""

    def __init__(self, codec: Codec, length: int, rng: np.random.Generator) -> None:
        self.codec, self.length, self.rng = codec, length, rng
        grad = rng.normal(size=length).astype(np.float32)
        self.frame = encode(grad, codec, generator=rng)
        self.record = TrainReply(
            binding=Binding(run_id=RUN, round=ROUND, node_id=NODE), codec=codec, size=length, grad=self.frame, num_examples=512, loss=0.2
        ).to_record()
        self.previous = resealed(self.record, round=ROUND - 1)  # a genuine reply of the round before
        self.data = record_to_bytes(self.record)

    def truncated(self) -> bytes:
        return self.data[: int(self.rng.integers(0, len(self.data)))]

    def bit_flipped(self) -> bytes:
        data = bytearray(self.data)
        for position in self.rng.choice(len(data) * 8, size=int(self.rng.integers(1, 5)), replace=False):
            data[position // 8] ^= 1 << (position % 8)
        return bytes(data)

    def overwritten(self) -> bytes:
        data = bytearray(self.data)
        start = int(self.rng.integers(0, len(data)))
        span = min(len(data) - start, int(self.rng.integers(1, 17)))
        data[start : start + span] = self.rng.integers(0, 256, size=span, dtype=np.uint8).tobytes()
        return bytes(data) if bytes(data) != self.data else self.data[:-1]

    def wrong_shape(self) -> RecordDict:
        other = self.length + int(self.rng.choice([-1, 1])) * int(self.rng.integers(1, self.length))
        frame = encode(self.rng.normal(size=other).astype(np.float32), self.codec, generator=self.rng)
        return resealed(self.record, size=other, grad=frame)  # a model of another shape

    def wrong_dtype(self) -> RecordDict:
        values = self.rng.normal(size=self.length)
        choice = int(self.rng.integers(0, 7))
        return resealed(
            self.record,
            **[
                {"grad": values.astype(np.float64).tobytes()},
                {"grad": values.astype(np.float16).tobytes()},
                {"grad": [float(v) for v in values[:8]]},
                {"grad": "not bytes"},
                {"examples": 512.0},
                {"examples": "512"},
                {"loss": int(self.rng.integers(0, 3))},
            ][choice],
        )

    def non_finite(self) -> RecordDict:
        bad = float(self.rng.choice([np.nan, np.inf, -np.inf]))
        if self.rng.random() < 0.2:
            return resealed(self.record, loss=bad)
        # overwrite a float32 of the frame: a value (dense) or a per-block scale (quantized)
        kept = self.codec.kept(self.length)
        if self.codec.quantization is Quantization.NONE:
            start, count = len(self.frame) - 4 * kept, kept
        else:
            values = kept if self.codec.quantization is Quantization.Q8 else (kept + 1) // 2
            count = math.ceil(kept / self.codec.block_size)
            start = len(self.frame) - values - 4 * count
        data = bytearray(self.frame)
        at = start + 4 * int(self.rng.integers(0, count))
        data[at : at + 4] = np.float32(bad).tobytes()
        return resealed(self.record, grad=bytes(data))

    def oversized(self) -> RecordDict:
        padding = bytes(int(self.rng.integers(LIMIT, 2 * LIMIT)))
        if self.rng.random() < 0.5:
            return resealed(self.record, grad=self.frame + padding)
        return resealed(self.record, padding=padding)

    def wrong_version(self) -> RecordDict:
        v = PROTOCOL_VERSION
        version = [0, v - 1, v + 1, -1, 2**40, str(v), float(v)][int(self.rng.integers(0, 7))]
        if self.rng.random() < 0.5:
            values = fields_of(self.record)
            values["version"] = version
            return RecordDict({SECTION: ConfigRecord(values)})  # digest no longer matches
        return resealed(self.record, version=version)

    def replayed(self) -> RecordDict:
        choice = int(self.rng.integers(0, 5))
        if choice == 0:
            return self.previous
        if choice == 1:
            return resealed(self.record, round=ROUND - int(self.rng.integers(1, ROUND + 1)))
        if choice == 2:
            return resealed(self.record, round=ROUND + int(self.rng.integers(1, 100)))
        if choice == 3:
            return resealed(self.record, run=RUN + int(self.rng.integers(1, 1000)))
        return resealed(self.record, node=NODE - int(self.rng.integers(1, 1000)))

    def bad_keys(self) -> RecordDict:
        key = ["version", "run", "round", "node", "codec", "grad", "examples"][int(self.rng.integers(0, 7))]
        if self.rng.random() < 0.5:
            return resealed(self.record, drop=(key,))
        return resealed(self.record, **{f"x-{key}": 1})

    # what the rejection must say, for mutations made by a sender that recomputes the digest
    REASONS = {
        "wrong shape": r"adapter gradient has \d+ entries; expected \d+",
        "wrong dtype": r"must be bytes|must be an integer|loss must be a finite float|adapter gradient \(",
        "NaN/inf": r"is nan|is inf|is -inf|must be finite|loss must be a finite float",
        "oversized": r"bytes; the limit is",
        "wrong version": r"protocol version|digest does not match",
        "replayed or misbound": r"stale or replayed|bound to run|bound to node",
        "unknown or missing keys": r"unexpected keys|missing keys",
    }

    def kinds(self) -> dict[str, tuple[Callable[[], bytes | RecordDict], int]]:
        return {
            "truncated": (self.truncated, 800),
            "bit-flipped": (self.bit_flipped, 1600),
            "overwritten": (self.overwritten, 600),
            "wrong shape": (self.wrong_shape, 300),
            "wrong dtype": (self.wrong_dtype, 350),
            "NaN/inf": (self.non_finite, 350),
            "oversized": (self.oversized, 100),
            "wrong version": (self.wrong_version, 300),
            "replayed or misbound": (self.replayed, 500),
            "unknown or missing keys": (self.bad_keys, 300),
        }

    def mutations(self) -> Iterator[tuple[str, bytes | RecordDict]]:
        for kind, (make, count) in self.kinds().items():
            for _ in range(count):
                yield kind, make()


def flip_bit(data: bytes, position: int) -> bytes:
    flipped = bytearray(data)
    flipped[position // 8] ^= 1 << (position % 8)
    return bytes(flipped)


def config_for(codec: Codec) -> RunConfig:
    return RunConfig(codec=codec, min_batch_size=256, batch_size=512, max_message_bytes=LIMIT)


def reject_all(trainer: AdapterTrainer, codec: Codec, rng: np.random.Generator) -> collections.Counter:
    """Feed every mutation through the platform's round step; returns how many per kind."""
    fuzzer = ReplyFuzzer(codec, trainer.num_adapter_params, rng)
    expected = {NODE: Binding(run_id=RUN, round=ROUND, node_id=NODE)}
    config = config_for(codec)
    before = snapshot(trainer)
    counts: collections.Counter = collections.Counter()
    for kind, payload in fuzzer.mutations():
        if isinstance(payload, bytes):
            try:
                content = record_from_bytes(payload)
            except ProtocolError as exc:  # the platform's decoder refuses it before validation
                assert str(exc), kind
                counts[kind] += 1
                continue
        else:
            content = payload
        accepted, rejected = apply_round(trainer, [reply_message(content)], round_=ROUND, expected=expected, config=config)
        assert not accepted, f"{kind}: a mutated reply was accepted"
        assert len(rejected) == 1 and len(rejected[0]["reason"]) > 10, (kind, rejected)
        pattern = ReplyFuzzer.REASONS.get(kind)
        assert pattern is None or re.search(pattern, rejected[0]["reason"]), (kind, rejected[0]["reason"])
        counts[kind] += 1
    assert snapshot(trainer) == before, "the model changed"
    return counts


@pytest.mark.parametrize("codec", ["topk:0.05+q4", "none"])
def test_every_mutated_reply_is_rejected_and_the_model_is_untouched(codec: str) -> None:
    trainer = make_trainer()
    trainer.step(np.random.default_rng(1).normal(size=trainer.num_adapter_params).astype(np.float32))  # Adam has state
    counts = reject_all(trainer, Codec.parse(codec), np.random.default_rng(2))
    assert counts == {kind: count for kind, (_, count) in ReplyFuzzer(Codec.parse(codec), 10, np.random.default_rng(0)).kinds().items()}
    assert sum(counts.values()) == 5200  # two codecs: 10,400 mutated replies in all


def test_control_the_genuine_reply_is_accepted_and_moves_the_model() -> None:
    """Without this, a platform that rejected everything would pass the fuzz test."""
    trainer = make_trainer()
    codec = Codec.parse("topk:0.05+q4")
    fuzzer = ReplyFuzzer(codec, trainer.num_adapter_params, np.random.default_rng(3))
    expected = {NODE: Binding(run_id=RUN, round=ROUND, node_id=NODE)}
    before = snapshot(trainer)
    content = record_from_bytes(fuzzer.data)
    accepted, rejected = apply_round(trainer, [reply_message(content)], round_=ROUND, expected=expected, config=config_for(codec))
    assert list(accepted) == [NODE] and not rejected
    assert snapshot(trainer) != before


def test_a_second_reply_and_a_reply_from_a_stranger_are_rejected() -> None:
    trainer = make_trainer()
    codec = Codec.parse("topk:0.05+q4")
    fuzzer = ReplyFuzzer(codec, trainer.num_adapter_params, np.random.default_rng(4))
    expected = {NODE: Binding(run_id=RUN, round=ROUND, node_id=NODE)}
    replies = [reply_message(fuzzer.record), reply_message(fuzzer.record), reply_message(fuzzer.record, src=NODE + 1)]
    accepted, rejected = apply_round(trainer, replies, round_=ROUND, expected=expected, config=config_for(codec))
    assert list(accepted) == [NODE]
    assert [r["reason"] for r in rejected] == [
        "a second reply for this round (replayed)",
        f"reply from node {NODE + 1}, which was not asked this round",
    ]


# --- the clean room's side: a mutated instruction never reaches training ------------------------


def test_every_mutated_instruction_is_rejected_before_training() -> None:
    rng = np.random.default_rng(5)
    length = make_trainer().num_adapter_params
    codec = Codec.parse("q8")
    held = RoomState(held_round=ROUND - 1, last_round=ROUND - 1, weights=rng.normal(size=length).astype(np.float32))
    ins = TrainIns(
        binding=Binding(run_id=RUN, round=ROUND, node_id=NODE),
        base_round=ROUND - 1,
        codec=codec,
        size=length,
        weights=encode(rng.normal(size=length).astype(np.float32) * 0.01, codec, generator=rng),
        batch_size=512,
        min_batch_size=256,
        correction=Correction.FORWARD,
    )
    record = ins.to_record()
    data = record_to_bytes(record)

    def receive(content: RecordDict) -> None:
        parsed = TrainIns.from_record(
            content, run_id=RUN, node_id=NODE, last_round=held.last_round, num_adapter_params=length, max_bytes=LIMIT
        )
        weights_for(held, parsed, length=length)

    receive(record)  # control: the genuine instruction is accepted
    mutations: list[Callable[[], bytes | RecordDict]] = [
        lambda: data[: int(rng.integers(0, len(data)))],
        lambda: flip_bit(data, int(rng.integers(0, 8 * len(data)))),
        lambda: resealed(record, round=ROUND - 1),
        lambda: resealed(record, **{"base-round": ROUND - 2}),  # a delta against a version it does not hold
        lambda: resealed(record, size=length + 3, weights=encode(rng.normal(size=length + 3).astype(np.float32), codec, generator=rng)),
        lambda: resealed(record, correction="sideways"),
        lambda: resealed(record, **{"batch-size": 100}),
        lambda: resealed(record, version=1),
    ]
    rejected = 0
    for _ in range(250):
        for mutate in mutations:
            payload = mutate()
            with pytest.raises(ProtocolError):
                receive(record_from_bytes(payload) if isinstance(payload, bytes) else payload)
            rejected += 1
    assert rejected == 2000
