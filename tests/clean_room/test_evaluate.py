"""The clean room's evaluate handler: the held-out split's sums for the weights sent, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcvr.clean_room.app import make_client_app
from pcvr.clean_room.dataset import load_training_data
from pcvr.clean_room.evaluate import evaluate_split
from pcvr.clean_room.policy import RELEASES_FILE, RoomPolicy
from pcvr.models.cvr import attach_adapters, get_adapter_vector, predict, set_adapter_vector
from pcvr.protocols.codecs import encode
from pcvr.protocols.eval_messages import WEIGHTS_CODEC, EvaluateIns, EvaluateReply
from pcvr.protocols.messages import Binding, LedgerIns, LedgerReply
from pcvr.protocols.private_eval import room_aggregates
from pcvr.protocols.refusals import Refusal
from pcvr.protocols.layout import EVAL_FILE
from support import NODE_ID, RUN_ID, clean_room_data, deliver, make_backbone, room_context, write_clean_room

EVAL_ROWS = 300


@pytest.fixture
def room(tmp_path):
    write_clean_room(tmp_path, rows=200, eval_rows=EVAL_ROWS, policy=RoomPolicy(min_batch_size=64))
    return tmp_path


def weights(seed: int) -> np.ndarray:
    base = get_adapter_vector(attach_adapters(make_backbone(), seed=0))
    return (base + 0.3 * torch.randn(len(base), generator=torch.Generator().manual_seed(seed))).numpy()


def instruction(vector: np.ndarray, *, round_: int = 5, min_batch_size: int = 64):
    frame = encode(vector, WEIGHTS_CODEC, generator=np.random.default_rng(0))
    binding = Binding(run_id=RUN_ID, round=round_, node_id=NODE_ID)
    return EvaluateIns(binding=binding, size=len(vector), weights=frame, min_batch_size=min_batch_size).to_record()


def ask(room, content, **context):
    return deliver(make_client_app(), content, room_context(room, **context), message_type="evaluate")


def test_the_reply_is_the_split_scored_with_the_weights_sent(room) -> None:
    vector = weights(1)
    reply = ask(room, instruction(vector))
    assert not reply.has_error()
    got = EvaluateReply.from_record(
        reply.content, expected=Binding(RUN_ID, 5, NODE_ID), min_rows=64, max_bytes=1 << 20
    ).aggregates
    model = attach_adapters(make_backbone(), seed=0)
    set_adapter_vector(model, torch.from_numpy(vector))
    data = load_training_data(room / "eps=3" / EVAL_FILE)
    expected = room_aggregates(predict(model, data.features), data.noisy_labels.numpy(), data.flip_probs.numpy(), min_rows=64)
    assert got.rows == EVAL_ROWS
    for name, value in expected.to_dict().items():
        assert getattr(got, name) == pytest.approx(value, rel=1e-6), name
    other = EvaluateReply.from_record(
        ask(room, instruction(weights(2))).content, expected=Binding(RUN_ID, 5, NODE_ID), min_rows=64, max_bytes=1 << 20
    )
    assert other.aggregates.sum_pred != got.sum_pred  # the weights sent are the ones scored


def test_a_room_without_a_held_out_split_refuses_with_its_code(room) -> None:
    (room / "eps=3" / EVAL_FILE).unlink()
    assert ask(room, instruction(weights(1))).error.code == Refusal.NO_HOLDOUT


@pytest.mark.parametrize(
    "min_batch_size, policy_floor, refusal",
    [(EVAL_ROWS + 1, 64, Refusal.TOO_FEW_ROWS), (64, EVAL_ROWS + 1, Refusal.TOO_FEW_ROWS)],
    ids=["instruction's floor", "policy's floor"],
)
def test_a_split_below_the_floor_is_refused(tmp_path, min_batch_size, policy_floor, refusal) -> None:
    write_clean_room(tmp_path, rows=200, eval_rows=EVAL_ROWS, policy=RoomPolicy(min_batch_size=policy_floor))
    run_config = {"min-batch-size": min_batch_size, "batch-size": max(min_batch_size, policy_floor)}
    reply = ask(tmp_path, instruction(weights(1), min_batch_size=min_batch_size), run_config=run_config)
    assert reply.has_error() and reply.error.code == refusal and reply.error.reason == refusal.reason


def test_a_malformed_or_disallowed_instruction_is_refused_with_its_code(room) -> None:
    bad = instruction(weights(1))
    bad["pcvr"]["min-batch-size"] = 0  # digest no longer matches
    assert ask(room, bad).error.code == Refusal.MALFORMED
    write_clean_room(room, rows=200, eval_rows=EVAL_ROWS, policy=RoomPolicy(min_batch_size=64, label_sets=("other",)))
    assert ask(room, instruction(weights(1))).error.code == Refusal.LABEL_SET_NOT_ALLOWED


def test_the_ledger_reports_evaluations_as_free_and_they_are_not_gradient_releases(room) -> None:
    context = room_context(room)
    app = make_client_app()
    for round_ in (5, 6):
        assert not deliver(app, instruction(weights(1), round_=round_), context, message_type="evaluate").has_error()
    query = LedgerIns(Binding(RUN_ID, 7, NODE_ID)).to_record()
    ledger = LedgerReply.from_record(
        deliver(app, query, context, message_type="query").content, expected=Binding(RUN_ID, 7, NODE_ID), max_bytes=1 << 20
    ).ledger
    assert ledger["evaluation"]["releases"] == 2 and ledger["evaluation"]["rows"] == EVAL_ROWS
    assert ledger["evaluation"]["label_dp_epsilon_spent"] == 0.0
    assert ledger["releases"]["in_run"] == 0 and not (room / RELEASES_FILE).exists()


def test_evaluate_split_refuses_fewer_rows_than_the_floor() -> None:
    data = clean_room_data(50, seed=0)
    model = attach_adapters(make_backbone(), seed=0)
    assert evaluate_split(model, data, min_rows=50).rows == 50
    with pytest.raises(ValueError, match="50 rows; a release needs at least 51"):
        evaluate_split(model, data, min_rows=51)
