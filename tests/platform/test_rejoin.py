"""A clean room that dies mid-run and comes back: the round it missed is counted as missed, and it
rejoins with the full weights (its copy of them died with it).

Real ClientApps behind an in-process grid (:class:`support.InProcessGrid`'s ``killed_at``: the
SuperLink answers NODE_UNAVAILABLE for the dead room, which then restarts with empty state).
The downlink codec is lossy (q8 deltas), so a restarted room that were sent a delta against a
copy it no longer holds would refuse it: every round after the restart must be served.
"""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity

from pcvr.clean_room.policy import RoomPolicy
from pcvr.models.cvr import backbone_digest
from pcvr.platform.federation import Holdout, round_line, run_federated_training
from pcvr.protocols.codecs import Codec
from pcvr.protocols.run_config import RunConfig
from support import InProcessGrid, clean_room_data, make_backbone, make_trainer, room_context, write_clean_room

NODES = (2**40 + 7, 2**40 + 8)
RUN_ID, ROUNDS, KILLED_ROUND = 21, 5, 3


def test_a_restarted_clean_room_misses_one_round_and_rejoins_with_full_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    contexts = {}
    for k, node in enumerate(NODES):
        room = tmp_path / f"room{k}"
        write_clean_room(room, rows=300, seed=k, eval_rows=128, policy=RoomPolicy(min_batch_size=64))
        context = room_context(room, run_config={"downstream-codec": "q8", "num-rounds": ROUNDS}, node_config={"clean-room-id": k})
        context.node_id, context.run_id = node, RUN_ID
        contexts[node] = context
    config = RunConfig(
        run_dir=tmp_path / "run", num_rounds=ROUNDS, clean_rooms=2, batch_size=64, min_batch_size=64, eval_every=100,
        codec=Codec.parse("none"), downstream_codec=Codec.parse("q8"), min_participation=0.5,
    )
    data = clean_room_data(200, seed=9)
    holdout = Holdout(data.features, (data.noisy_labels.numpy() > 0.5).astype("int8"))
    lines: list[str] = []
    trainer = make_trainer(total_steps=ROUNDS)
    grid = InProcessGrid(contexts, run_id=RUN_ID, killed_at={NODES[1]: KILLED_ROUND})
    log = run_federated_training(
        grid, config, trainer, holdout, backbone=backbone_digest(make_backbone()), on_round=lines.append
    )

    room0, room1 = (log.participation[node] for node in NODES)
    assert (room0.served, room0.missed, room0.rejected) == (ROUNDS, 0, {})
    assert (room1.served, room1.missed, room1.rejected) == (ROUNDS - 1, 1, {})  # missed, not rejected
    assert log.rejected == []  # nothing malformed arrived
    assert [r["clean_rooms"] for r in log.rounds] == [2, 2, 1, 2, 2]
    assert [r["missed"] for r in log.rounds] == [[], [], ["clean room 1"], [], []]
    assert "clean room 1 missed the round" in lines[KILLED_ROUND - 1] and "missed" not in lines[KILLED_ROUND]
    assert trainer.steps == ROUNDS  # one step per round with a valid reply


@pytest.mark.parametrize("missed, rejected, expected", [(3, {}, "missed 3 rounds"), (1, {"bad": 2}, "bad")])
def test_a_clean_room_that_served_too_few_rounds_is_named_with_what_kept_it_out(missed, rejected, expected) -> None:
    from pcvr.platform.training import Participation

    room = Participation(node=5, clean_room_id=1, served=1, missed=missed, rejected=dict(rejected))
    failure = room.failure(rounds=5, min_share=0.9)
    assert failure.startswith("clean room 1: served 1 of 5 rounds") and expected in failure
    assert Participation(node=5, served=5).failure(rounds=5, min_share=0.9) is None


def test_the_round_line_names_the_rooms_that_missed_it() -> None:
    entry = {"round": 2, "clean_rooms": 1, "loss": 0.5, "wall_s": 1.0, "missed": ["clean room 1"]}
    assert round_line(entry, rounds=5, clean_rooms=2, evaluation=None).endswith("(clean room 1 missed the round)")
    assert "missed" not in round_line({**entry, "missed": []}, rounds=5, clean_rooms=2, evaluation=None)
