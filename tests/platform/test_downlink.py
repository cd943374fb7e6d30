"""Tests of pcvr.platform.downlink: compressed weight deltas against what each clean room acknowledged."""

from __future__ import annotations

import numpy as np
import pytest

from pcvr.platform.downlink import Downlink
from pcvr.protocols.codecs import Codec, decode, encode

LENGTH = 300


def weights(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=LENGTH).astype(np.float32)


def clean_room_copy(downlink: Downlink, node: int, rounds: int, *, drift: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Play ``rounds`` rounds: the clean room applies each payload as it would; returns (its copy, the truth)."""
    current, held = weights(0), np.zeros(LENGTH, dtype=np.float32)
    rng = np.random.default_rng(1)
    for round_ in range(1, rounds + 1):
        current = current + drift * rng.normal(size=LENGTH).astype(np.float32)
        out = downlink.prepare(node, round_=round_, weights=current)
        delta = decode(out.frame, out.codec, length=LENGTH)
        held = delta if out.base_round == 0 else held + delta
        downlink.acknowledge(node, round_=round_)
    return held, current


def test_first_instruction_is_the_full_weights_dense_then_deltas() -> None:
    downlink = Downlink(Codec.parse("q8"), length=LENGTH, seed=0)
    first = downlink.prepare(7, round_=1, weights=weights(0))
    assert first.base_round == 0 and first.codec.is_identity and len(first.frame) == 4 * LENGTH
    downlink.acknowledge(7, round_=1)
    second = downlink.prepare(7, round_=2, weights=weights(0) + 0.01)
    assert second.base_round == 1 and str(second.codec) == "q8" and len(second.frame) < LENGTH + 40


@pytest.mark.parametrize("codec", ["none", "q8", "q4", "topk:0.1+q8"])
def test_clean_room_copy_stays_within_one_rounds_compression_error(codec: str) -> None:
    """The mirror is updated with the decoded delta, so errors do not accumulate over rounds."""
    downlink = Downlink(Codec.parse(codec), length=LENGTH, seed=0)
    held, truth = clean_room_copy(downlink, node=3, rounds=60)
    np.testing.assert_array_equal(held, downlink.held(3)[1])  # the platform knows the clean room's copy exactly
    error = np.abs(held - truth).max()
    if codec == "none":
        assert error == 0
    else:
        # one round's delta is ~0.05·N(0,1) per entry (|.| < 0.25); a drifting error would be far larger after 60 rounds
        assert error < 0.25, error


def test_control_without_the_mirror_errors_accumulate() -> None:
    """Sending each round's own change, compressed, lets the copy drift: the check above can fail."""
    codec = Codec.parse("topk:0.1+q8")
    current, held = weights(0), weights(0).copy()
    rng, generator = np.random.default_rng(1), np.random.default_rng(2)
    for _ in range(60):
        change = 0.05 * rng.normal(size=LENGTH).astype(np.float32)
        current = current + change
        held = held + decode(encode(change, codec, generator=generator), codec, length=LENGTH)
    assert np.abs(held - current).max() > 0.25


def test_an_unacknowledged_round_sends_the_full_weights_again() -> None:
    downlink = Downlink(Codec.parse("q8"), length=LENGTH, seed=0)
    downlink.prepare(1, round_=1, weights=weights(0))
    downlink.acknowledge(1, round_=1)
    downlink.prepare(1, round_=2, weights=weights(1))
    downlink.forget(1)  # its reply was rejected or never came
    again = downlink.prepare(1, round_=3, weights=weights(2))
    assert again.base_round == 0 and again.codec.is_identity


def test_acknowledging_a_round_that_was_not_sent_is_an_error() -> None:
    downlink = Downlink(Codec.parse("q8"), length=LENGTH, seed=0)
    downlink.prepare(1, round_=1, weights=weights(0))
    with pytest.raises(ValueError, match="not sent"):
        downlink.acknowledge(1, round_=2)
    with pytest.raises(ValueError, match="shape"):
        downlink.prepare(1, round_=2, weights=weights(0)[:-1])


def test_the_clean_rooms_own_path_reproduces_the_mirror_bit_for_bit() -> None:
    """Through the real message and the clean room's weights_for, not a re-implementation."""
    from pcvr.clean_room.session import RoomState, weights_for
    from pcvr.protocols.label_dp import Correction
    from pcvr.protocols.messages import Binding, TrainIns

    downlink = Downlink(Codec.parse("topk:0.2+q4"), length=LENGTH, seed=0)
    room, current, rng = RoomState(), weights(0), np.random.default_rng(3)
    for round_ in range(1, 30):
        current = current + 0.05 * rng.normal(size=LENGTH).astype(np.float32)
        out = downlink.prepare(5, round_=round_, weights=current)
        record = TrainIns(
            binding=Binding(run_id=1, round=round_, node_id=5), base_round=out.base_round, codec=out.codec,
            size=LENGTH, weights=out.frame, batch_size=8, min_batch_size=8, correction=Correction.FORWARD,
        ).to_record()
        ins = TrainIns.from_record(
            record, run_id=1, node_id=5, last_round=round_ - 1, num_adapter_params=LENGTH, max_bytes=1 << 20
        )
        held = weights_for(room, ins, length=LENGTH)
        room = RoomState(held_round=round_, last_round=round_, weights=held)
        downlink.acknowledge(5, round_=round_)
        assert held.tobytes() == downlink.held(5)[1].tobytes()


def test_the_lossless_codec_always_sends_the_exact_weights_and_says_which_reply_was_applied() -> None:
    downlink = Downlink(Codec.parse("none"), length=LENGTH, seed=0)
    current = weights(0)
    for round_ in range(1, 5):
        current = current + np.float32(0.1) * weights(round_)
        out = downlink.prepare(9, round_=round_, weights=current)
        assert out.base_round == 0 and out.applied_round == round_ - 1
        np.testing.assert_array_equal(decode(out.frame, out.codec, length=LENGTH), current)  # bit for bit
        downlink.acknowledge(9, round_=round_)
    downlink.forget(9)
    assert downlink.prepare(9, round_=5, weights=current).applied_round == 0  # control: unknown again
    lossy = Downlink(Codec.parse("q8"), length=LENGTH, seed=0)
    lossy.prepare(9, round_=1, weights=current)
    lossy.acknowledge(9, round_=1)
    second = lossy.prepare(9, round_=2, weights=current)
    assert (second.base_round, second.applied_round) == (1, 1)  # a lossy codec sends deltas against the applied round
