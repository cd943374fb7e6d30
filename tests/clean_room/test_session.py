"""Tests of pcvr.clean_room.session: state between rounds, and applying weight deltas."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import RecordDict

from pcvr.clean_room.session import RoomState, carried_residual, load_state, save_state, weights_for
from pcvr.protocols.codecs import Codec, encode
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.messages import Binding, ProtocolError, TrainIns

LENGTH = 40


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=LENGTH).astype(np.float32)


def instruction(*, round_: int, base_round: int, delta: np.ndarray) -> TrainIns:
    codec = Codec.parse("none")
    return TrainIns(
        binding=Binding(run_id=1, round=round_, node_id=2),
        base_round=base_round,
        codec=codec,
        size=LENGTH,
        weights=encode(delta, codec, generator=np.random.default_rng(0)),
        batch_size=8,
        min_batch_size=8,
        correction=Correction.FORWARD,
    )


def test_state_round_trips_through_the_record_dict() -> None:
    state = RecordDict()
    assert load_state(state, length=LENGTH) == RoomState()
    room = RoomState(held_round=4, last_round=4, weights=vector(0), residual=vector(1))
    save_state(state, room)
    back = load_state(state, length=LENGTH)
    assert (back.held_round, back.last_round) == (4, 4)
    np.testing.assert_array_equal(back.weights, room.weights)
    np.testing.assert_array_equal(back.residual, room.residual)
    assert load_state(state, length=None).last_round == 4


def test_state_of_another_shape_starts_over() -> None:
    state = RecordDict()
    save_state(state, RoomState(held_round=4, last_round=4, weights=vector(0), residual=vector(1)))
    assert load_state(state, length=LENGTH + 1) == RoomState()


def test_full_weights_and_deltas_apply() -> None:
    full = weights_for(RoomState(), instruction(round_=1, base_round=0, delta=vector(0)), length=LENGTH)
    np.testing.assert_array_equal(full, vector(0))
    room = RoomState(held_round=1, last_round=1, weights=full)
    np.testing.assert_allclose(
        weights_for(room, instruction(round_=2, base_round=1, delta=vector(1)), length=LENGTH), vector(0) + vector(1)
    )


def test_delta_against_a_version_not_held_is_refused() -> None:
    with pytest.raises(ProtocolError, match="delta against round 3; this clean room holds round 0"):
        weights_for(RoomState(), instruction(round_=4, base_round=3, delta=vector(0)), length=LENGTH)
    room = RoomState(held_round=2, last_round=2, weights=vector(0))
    with pytest.raises(ProtocolError, match="holds round 2"):
        weights_for(room, instruction(round_=4, base_round=3, delta=vector(1)), length=LENGTH)


def test_delta_that_overflows_to_infinity_is_refused() -> None:
    room = RoomState(held_round=1, last_round=1, weights=np.full(LENGTH, 3e38, dtype=np.float32))
    with pytest.raises(ProtocolError, match="infinite"):
        weights_for(room, instruction(round_=2, base_round=1, delta=np.full(LENGTH, 3e38, dtype=np.float32)), length=LENGTH)


def test_a_reply_the_platform_did_not_apply_is_added_back_to_the_residual() -> None:
    """Error feedback survives a rejected or lost reply: the next instruction's base tells which."""
    room = RoomState(held_round=3, last_round=3, weights=vector(0), residual=vector(1), pending=vector(2))
    acknowledged = instruction(round_=4, base_round=3, delta=vector(3))
    np.testing.assert_array_equal(carried_residual(room, acknowledged, length=LENGTH), vector(1))
    forgotten = instruction(round_=4, base_round=0, delta=vector(3))  # the platform resends in full
    np.testing.assert_allclose(carried_residual(room, forgotten, length=LENGTH), vector(1) + vector(2))
    assert not carried_residual(RoomState(), forgotten, length=LENGTH).any()


def test_state_keeps_pending_and_the_noise_multiplier() -> None:
    state = RecordDict()
    save_state(state, RoomState(held_round=2, last_round=2, pending=vector(5), noise_multiplier=1.25))
    back = load_state(state, length=LENGTH)
    np.testing.assert_array_equal(back.pending, vector(5))
    assert back.noise_multiplier == 1.25


def test_full_weights_that_name_the_held_round_as_applied_do_not_resend_its_reply() -> None:
    """The lossless downlink sends full weights every round; the reply they acknowledge is not sent again."""
    room = RoomState(held_round=3, last_round=3, weights=vector(0), residual=np.zeros(LENGTH, np.float32), pending=vector(1))
    applied = dataclasses.replace(instruction(round_=4, base_round=0, delta=vector(2)), applied_round=3)
    np.testing.assert_array_equal(carried_residual(room, applied, length=LENGTH), np.zeros(LENGTH))
    lost = dataclasses.replace(applied, applied_round=2)  # control: the reply for round 3 was not applied
    np.testing.assert_array_equal(carried_residual(room, lost, length=LENGTH), vector(1))
