"""The pre-flight check a clean room answers before round 1: it names itself and says whether it can serve."""

from __future__ import annotations

import pytest

from pcvr.clean_room.app import make_client_app
from pcvr.clean_room.policy import RoomPolicy
from pcvr.models.cvr import backbone_digest
from pcvr.protocols.messages import Binding, PreflightIns, PreflightReply
from pcvr.protocols.refusals import Refusal
from pcvr.protocols.layout import TRAIN_FILE
from support import NODE_ID, RUN_ID, deliver, make_backbone, room_context, write_clean_room

BINDING = Binding(run_id=RUN_ID, round=0, node_id=NODE_ID)


def ask(directory, *, digest: bytes | None = None, batch_size: int = 64, min_batch_size: int = 64, **context) -> PreflightReply:
    ins = PreflightIns(
        BINDING,
        backbone_digest=backbone_digest(make_backbone()) if digest is None else digest,
        batch_size=batch_size,
        min_batch_size=min_batch_size,
    )
    reply = deliver(make_client_app(), ins.to_record(), room_context(directory, **context), message_type="query.preflight")
    assert not reply.has_error()
    return PreflightReply.from_record(reply.content, expected=BINDING, max_bytes=1 << 20)


@pytest.fixture
def room(tmp_path):
    write_clean_room(tmp_path, rows=200, policy=RoomPolicy(min_batch_size=64))
    return tmp_path


def test_a_ready_clean_room_passes_and_names_itself(room) -> None:
    reply = ask(room)
    assert reply.refusal == 0 and reply.clean_room_id == 0


def test_another_backbone_is_caught_before_round_1(room) -> None:
    assert ask(room, digest=backbone_digest(make_backbone(seed=1))).refusal == Refusal.BACKBONE_MISMATCH


def test_fewer_rows_than_the_floor_is_caught_before_round_1(room) -> None:
    assert ask(room, batch_size=4096, min_batch_size=201).refusal == Refusal.TOO_FEW_ROWS
    assert ask(room, batch_size=4096, min_batch_size=200).refusal == 0  # the control: exactly enough


def test_a_batch_below_the_policy_floor_is_caught_before_round_1(room) -> None:
    assert ask(room, batch_size=8, min_batch_size=8).refusal == Refusal.BATCH_BELOW_FLOOR


def test_a_garbage_backbone_fails_with_the_fixed_code(room) -> None:
    (room / "backbone" / "backbone.pt").write_bytes(b"not a torch file")
    reply = ask(room)
    assert reply.refusal == Refusal.FAILED and reply.clean_room_id == 0


def test_unreadable_training_rows_fail_with_the_fixed_code(room) -> None:
    (room / "eps=3" / TRAIN_FILE).write_bytes(b"PAR1 garbage")
    assert ask(room).refusal == Refusal.FAILED


def test_a_label_set_outside_is_refused_at_pre_flight(room) -> None:
    assert ask(room, run_config={"label-set": "../x"}).refusal == Refusal.BAD_NAME
