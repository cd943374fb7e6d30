"""A platform killed mid-run resumes from its checkpoint: nothing lost, nothing applied twice.

Real ClientApps behind an in-process grid. The platform "dies" while it pushes round 4
(its checkpoint holds round 3); a new platform process restores the checkpoint and runs
a new Flower run with ``resume-run``; the clean rooms come back with fresh state (a new
run id). With the lossless codec both ways and no DP-SGD, the resumed run's final
weights equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from pcvr.clean_room.policy import ReleaseLog, RoomPolicy
from pcvr.models.cvr import backbone_digest, get_adapter_vector
from pcvr.platform.app import _resume_state
from pcvr.platform.federation import CHECKPOINT_FILE, Holdout, run_federated_training
from pcvr.platform.training import AdapterTrainer
from pcvr.protocols.codecs import Codec
from pcvr.protocols.run_config import RunConfig
from support import InProcessGrid, SimulatedCrash, clean_room_data, make_backbone, make_trainer, room_context, write_clean_room

NODES = (2**40 + 7, 2**40 + 8)
FIRST_RUN, SECOND_RUN, ROUNDS = 11, 12, 6
NONE = Codec.parse("none")


def rooms(directory, *, run_id: int, resume_run: int = 0) -> dict:
    contexts = {}
    for k, node in enumerate(NODES):
        room = directory / f"room{k}"
        if not room.exists():
            write_clean_room(room, rows=300, seed=k, eval_rows=128, policy=RoomPolicy(min_batch_size=64))
        run_config = {"downstream-codec": "none", "num-rounds": ROUNDS, "resume-run": resume_run}
        context = room_context(room, run_config=run_config, node_config={"clean-room-id": k})
        context.node_id, context.run_id = node, run_id
        contexts[node] = context
    return contexts


def train(monkeypatch, directory, trainer, *, run_id: int, resume: dict | None = None, crash_at=None):
    monkeypatch.setattr(TaskIdentity, "_run_id", run_id)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    config = RunConfig(
        run_dir=directory / "run", num_rounds=ROUNDS, clean_rooms=2, batch_size=64, min_batch_size=64, eval_every=100,
        codec=NONE, downstream_codec=NONE, resume_run=0 if resume is None else int(resume["run"]),
    )
    data = clean_room_data(200, seed=9)
    holdout = Holdout(data.features, (data.noisy_labels.numpy() > 0.5).astype("int8"))
    grid = InProcessGrid(rooms(directory, run_id=run_id, resume_run=config.resume_run), run_id=run_id, crash_at=crash_at)
    return run_federated_training(grid, config, trainer, holdout, backbone=backbone_digest(make_backbone()), resume=resume)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    trainer = make_trainer(total_steps=ROUNDS)
    log = train(monkeypatch, tmp_path_factory.mktemp("once"), trainer, run_id=FIRST_RUN)
    monkeypatch.undo()
    return get_adapter_vector(trainer.model), log


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path, monkeypatch, uninterrupted) -> None:
    weights, once = uninterrupted
    with pytest.raises(SimulatedCrash):
        train(monkeypatch, tmp_path, make_trainer(total_steps=ROUNDS), run_id=FIRST_RUN, crash_at=("train", 4))
    checkpoint = tmp_path / "run" / CHECKPOINT_FILE
    state = AdapterTrainer.saved_run_state(checkpoint)
    assert (state["run"], state["round"]) == (FIRST_RUN, 3)

    trainer = make_trainer(total_steps=ROUNDS)  # the new platform process
    trainer.restore(checkpoint)
    log = train(monkeypatch, tmp_path, trainer, run_id=SECOND_RUN, resume=state)
    assert torch.equal(get_adapter_vector(trainer.model), weights)  # bit for bit
    assert not torch.equal(weights, get_adapter_vector(make_trainer().model))  # the run moved the weights
    # one step per round with a valid reply: none lost, none applied twice
    assert trainer.steps == ROUNDS == once.steps
    assert [r["round"] for r in log.rounds] == list(range(1, ROUNDS + 1))
    assert all(room.served == ROUNDS and room.missed == 0 for room in log.participation.values())
    for k in range(2):  # each clean room counted the two Flower runs as one run
        releases = ReleaseLog(tmp_path / f"room{k}", run_key=f"eps=3/run-{FIRST_RUN}")
        assert releases.in_run == releases.total == ROUNDS


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path, monkeypatch) -> None:
    with pytest.raises(SimulatedCrash):
        train(monkeypatch, tmp_path, make_trainer(total_steps=ROUNDS), run_id=FIRST_RUN, crash_at=("train", 2))
    config = RunConfig(run_dir=tmp_path / "run", resume_run=FIRST_RUN + 5)
    with pytest.raises(ValueError, match=f"holds run {FIRST_RUN}, not run {FIRST_RUN + 5}"):
        _resume_state(config, make_trainer())
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        _resume_state(dataclasses.replace(config, run_dir=tmp_path / "elsewhere"), make_trainer())
    assert _resume_state(dataclasses.replace(config, resume_run=0), make_trainer()) is None  # a new run


def test_pcvr_train_resume_names_the_run_its_checkpoint_belongs_to(tmp_path, monkeypatch) -> None:
    from pcvr.platform.federation import interrupted_run

    with pytest.raises(SimulatedCrash):
        train(monkeypatch, tmp_path, make_trainer(total_steps=ROUNDS), run_id=FIRST_RUN, crash_at=("train", 3))
    assert interrupted_run(tmp_path / "run") == FIRST_RUN
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        interrupted_run(tmp_path / "never-ran")
