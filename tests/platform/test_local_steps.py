"""The platform's side of rounds that carry local steps: the instruction, and the averaging of weight changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcvr.models.cvr import get_adapter_vector
from pcvr.platform.federation import apply_round
from pcvr.platform.training import cosine_learning_rate
from pcvr.protocols.codecs import Codec
from pcvr.protocols.messages import Binding
from pcvr.protocols.run_config import RunConfig
from support import make_trainer, train_reply_message

RUN, ROUND, BATCH, STEPS = 3, 1, 100, 4


def reply(node: int, delta: np.ndarray, *, examples: int):
    return train_reply_message(node, delta, run_id=RUN, round_=ROUND, examples=examples)


def config(**changes) -> RunConfig:
    return RunConfig(codec=Codec.parse("none"), batch_size=BATCH, min_batch_size=1, local_steps=STEPS, **changes)


def test_the_round_adds_the_example_weighted_mean_of_the_weight_changes() -> None:
    trainer = make_trainer()
    before = get_adapter_vector(trainer.model).numpy().copy()
    optimizer_state = {k: v for k, v in trainer.optimizer.state_dict().items()}
    rng = np.random.default_rng(0)
    deltas = {11: rng.normal(size=before.size).astype(np.float32), 12: rng.normal(size=before.size).astype(np.float32)}
    examples = {11: STEPS * BATCH, 12: BATCH}  # room 12 served fewer rows: it weighs a quarter as much
    expected = {node: Binding(run_id=RUN, round=ROUND, node_id=node) for node in deltas}
    replies = [reply(node, delta, examples=examples[node]) for node, delta in deltas.items()]
    accepted, rejected = apply_round(trainer, replies, round_=ROUND, expected=expected, config=config())
    assert not rejected and set(accepted) == {11, 12}
    mean = (4 * deltas[11].astype(np.float64) + deltas[12]) / 5
    np.testing.assert_allclose(get_adapter_vector(trainer.model).numpy() - before, mean, atol=1e-5)
    assert trainer.steps == 1
    assert trainer.optimizer.state_dict() == optimizer_state  # the platform's Adam is not stepped: the rooms did


def test_more_rows_than_the_local_steps_could_use_are_rejected_and_nothing_is_applied() -> None:
    trainer = make_trainer()
    before = get_adapter_vector(trainer.model).clone()
    delta = np.ones(before.numel(), dtype=np.float32)
    expected = {11: Binding(run_id=RUN, round=ROUND, node_id=11)}
    accepted, rejected = apply_round(trainer, [reply(11, delta, examples=STEPS * BATCH + 1)], round_=ROUND, expected=expected, config=config())
    assert not accepted and "must be an integer in" in rejected[0]["reason"]
    assert torch.equal(get_adapter_vector(trainer.model), before) and trainer.steps == 0


def test_the_local_learning_rate_follows_the_schedule_over_every_local_step() -> None:
    trainer = make_trainer(learning_rate=0.1, total_steps=10)
    assert trainer.local_learning_rate(local_steps=STEPS) == pytest.approx(0.1)
    trainer.steps = 5  # half the rounds done: half of all local steps
    assert trainer.local_learning_rate(local_steps=STEPS) == pytest.approx(cosine_learning_rate(20, peak=0.1, total_steps=40))
    assert trainer.local_learning_rate(local_steps=1) == pytest.approx(cosine_learning_rate(5, peak=0.1, total_steps=10))
