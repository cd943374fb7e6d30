"""Tests of pcvr.platform.training: aggregation, the learning-rate schedule and AdapterTrainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcvr.models.cvr import adapter_parameters
from pcvr.platform.training import AdapterTrainer, aggregate, cosine_learning_rate
from support import make_backbone, make_trainer

def random_grad(size: int, *, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=size).astype(np.float32)


def frozen_state(trainer: AdapterTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}


def optimizer_state(trainer: AdapterTrainer) -> list[tuple]:
    """The Adam moments and step counters, parameter by parameter in wire order."""
    rows = []
    for parameter in adapter_parameters(trainer.model):
        state = trainer.optimizer.state.get(parameter, {})
        rows.append(tuple((k, v.detach().clone() if torch.is_tensor(v) else v) for k, v in sorted(state.items())))
    return rows


def assert_same_optimizer_state(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        assert [k for k, _ in row_a] == [k for k, _ in row_b]
        for (_, va), (_, vb) in zip(row_a, row_b):
            if torch.is_tensor(va):
                assert torch.equal(va, vb)
            else:
                assert va == vb


# --- aggregate -------------------------------------------------------------------------------


def test_aggregate_is_example_weighted_mean_pinned() -> None:
    grads = [np.array([2.0, 4.0, -6.0], dtype=np.float32), np.array([10.0, 0.0, 3.0], dtype=np.float32)]
    mean = aggregate(grads, num_examples=[2, 8])
    assert mean.dtype == np.float32 and mean.shape == (3,)
    # (2 + 10, 4 + 0, -6 + 3) / (2 + 8); the mean of per-reply means would be (1.125, 1.0, -1.3125)
    np.testing.assert_allclose(mean, [1.2, 0.4, -0.3], rtol=1e-6)
    # the inputs are not modified
    assert grads[0].tolist() == [2.0, 4.0, -6.0]


def test_aggregate_of_one_reply_divides_by_its_size() -> None:
    grad = random_grad(50, seed=1)
    mean = aggregate([grad], num_examples=[4])
    np.testing.assert_allclose(mean, grad / 4, rtol=1e-6)


def test_aggregate_matches_slow_reference() -> None:
    rng = np.random.default_rng(2)
    grads = [random_grad(20, seed=k) for k in range(5)]
    sizes = [int(rng.integers(1, 100)) for _ in range(5)]
    total = np.zeros(20)
    for grad in grads:
        total += grad.astype(np.float64)
    np.testing.assert_allclose(aggregate(grads, num_examples=sizes), total / sum(sizes), rtol=1e-6)


def test_aggregate_of_nothing_or_mismatched_counts_raises() -> None:
    with pytest.raises(ValueError):
        aggregate([], num_examples=[])
    with pytest.raises(ValueError, match="example counts"):
        aggregate([random_grad(3, seed=0)], num_examples=[1, 2])


# --- cosine_learning_rate --------------------------------------------------------------------


def test_cosine_learning_rate_pinned() -> None:
    kwargs = dict(peak=0.02, total_steps=100)
    assert cosine_learning_rate(0, **kwargs) == pytest.approx(0.02, rel=1e-12)
    assert cosine_learning_rate(25, **kwargs) == pytest.approx(0.0173639610306789, rel=1e-12)
    assert cosine_learning_rate(50, **kwargs) == pytest.approx(0.011, rel=1e-12)
    assert cosine_learning_rate(100, **kwargs) == pytest.approx(0.002, rel=1e-12)
    assert cosine_learning_rate(250, **kwargs) == pytest.approx(0.002, rel=1e-12)
    assert cosine_learning_rate(50, peak=1.0, total_steps=100, floor=0.0) == pytest.approx(0.5, rel=1e-12)
    rates = [cosine_learning_rate(s, **kwargs) for s in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


# --- AdapterTrainer.step ---------------------------------------------------------------------


def test_step_changes_only_adapters_and_follows_the_schedule() -> None:
    trainer = make_trainer(learning_rate=0.01, total_steps=4)
    backbone_before = frozen_state(trainer)
    weights_before = trainer.adapter_weights().copy()
    grad = random_grad(trainer.num_adapter_params, seed=3)

    trainer.step(grad)

    after = trainer.adapter_weights()
    assert after.shape == (trainer.num_adapter_params,)
    # Adam's first step moves every coordinate by lr * sign(grad) (up to eps)
    np.testing.assert_allclose(after - weights_before, -0.01 * np.sign(grad), rtol=1e-3, atol=1e-7)
    for name, parameter in trainer.model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, backbone_before[name]), name
    assert trainer.steps == 1
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    trainer.step(grad)
    assert trainer.steps == 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cosine_learning_rate(1, peak=0.01, total_steps=4))


def _nan_grad(size: int) -> np.ndarray:
    grad = random_grad(size, seed=4)
    grad[7] = np.nan
    return grad


def _inf_grad(size: int) -> np.ndarray:
    grad = random_grad(size, seed=4)
    grad[-1] = -np.inf
    return grad


BAD_GRADS = {
    "nan": _nan_grad,
    "inf": _inf_grad,
    "too-short": lambda size: random_grad(size - 1, seed=5),
    "too-long": lambda size: random_grad(size + 1, seed=5),
    "2-d": lambda size: random_grad(size, seed=5).reshape(1, size),
    "scalar": lambda size: np.float32(0.1) * np.ones((), dtype=np.float32),
}


@pytest.mark.parametrize("case", list(BAD_GRADS))
def test_step_rejects_bad_gradient_without_changing_anything(case: str) -> None:
    trainer = make_trainer()
    trainer.step(random_grad(trainer.num_adapter_params, seed=6))  # so the optimizer has state
    weights = trainer.adapter_weights().tobytes()
    moments = optimizer_state(trainer)
    lr = trainer.optimizer.param_groups[0]["lr"]

    with pytest.raises(ValueError):
        trainer.step(BAD_GRADS[case](trainer.num_adapter_params))

    assert trainer.adapter_weights().tobytes() == weights
    assert_same_optimizer_state(optimizer_state(trainer), moments)
    assert trainer.steps == 1
    assert trainer.optimizer.param_groups[0]["lr"] == lr


def test_step_with_float64_gradient_is_applied_or_rejected_with_value_error() -> None:
    """A float64 mean gradient of the right shape must not fail half-way with a RuntimeError."""
    trainer = make_trainer()
    reference = make_trainer()
    grad = random_grad(trainer.num_adapter_params, seed=7)
    weights = trainer.adapter_weights().tobytes()
    try:
        trainer.step(grad.astype(np.float64))
    except ValueError:
        assert trainer.adapter_weights().tobytes() == weights
        assert trainer.steps == 0
    else:
        reference.step(grad)
        np.testing.assert_array_equal(trainer.adapter_weights(), reference.adapter_weights())


def test_step_does_not_keep_a_reference_to_the_caller_array() -> None:
    trainer = make_trainer()
    grad = random_grad(trainer.num_adapter_params, seed=8)
    trainer.step(grad)
    snapshot = [p.grad.clone() for p in adapter_parameters(trainer.model)]
    grad[:] = 1e6
    for parameter, before in zip(adapter_parameters(trainer.model), snapshot):
        assert torch.equal(parameter.grad, before)


# --- checkpoint / restore --------------------------------------------------------------------


def test_checkpoint_restore_round_trip(tmp_path) -> None:
    trainer = make_trainer(seed=1, total_steps=6)
    for k in range(3):
        trainer.step(random_grad(trainer.num_adapter_params, seed=10 + k))
    path = tmp_path / "adapters.pt"
    trainer.checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["adapters.pt"]  # no staging file left

    restored = make_trainer(seed=2, total_steps=6)  # different initial adapters, no optimizer state
    assert restored.adapter_weights().tobytes() != trainer.adapter_weights().tobytes()
    restored.restore(path)

    assert restored.steps == 3
    assert restored.adapter_weights().tobytes() == trainer.adapter_weights().tobytes()
    assert_same_optimizer_state(optimizer_state(restored), optimizer_state(trainer))

    # both continue identically: same moments, same step count, same learning rate
    grad = random_grad(trainer.num_adapter_params, seed=20)
    trainer.step(grad)
    restored.step(grad)
    assert restored.steps == trainer.steps == 4
    assert restored.adapter_weights().tobytes() == trainer.adapter_weights().tobytes()
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(
        cosine_learning_rate(3, peak=0.01, total_steps=6)
    )


def test_checkpoint_overwrites_previous(tmp_path) -> None:
    trainer = make_trainer()
    path = tmp_path / "adapters.pt"
    trainer.checkpoint(path)
    trainer.step(random_grad(trainer.num_adapter_params, seed=30))
    trainer.checkpoint(path)
    fresh = make_trainer()
    fresh.restore(path)
    assert fresh.steps == 1
    assert fresh.adapter_weights().tobytes() == trainer.adapter_weights().tobytes()


def test_trainer_does_not_modify_the_backbone() -> None:
    backbone = make_backbone()
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    trainer = AdapterTrainer(backbone, learning_rate=0.1, total_steps=2, seed=0)
    trainer.step(random_grad(trainer.num_adapter_params, seed=40))
    for name, parameter in backbone.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert math.isclose(trainer.optimizer.param_groups[0]["lr"], 0.1)


# --- participation and failures: what makes a run a failed run ----------------------------------


def test_a_room_that_served_too_few_rounds_fails_the_run_naming_it_and_why() -> None:
    from pcvr.platform.training import Participation, RunLog

    log = RunLog(steps=10)
    log.participation = {5: Participation(node=5, clean_room_id=0), 9: Participation(node=9, clean_room_id=1)}
    for round_ in range(10):
        log.participation[5].count(accepted=True, reasons=[])
        log.participation[9].count(accepted=round_ < 8, reasons=["clean room refused: failed: …"] if round_ == 8 else [])
    assert log.failures(rounds=10, min_share=0.8) == []  # 8 of 10 is enough at 0.8
    (line,) = log.failures(rounds=10, min_share=0.9)
    assert line == "clean room 1: served 8 of 10 rounds (min-participation 0.9): clean room refused: failed: …"
    assert log.participation[9].to_dict() == {
        "node": 9, "clean_room_id": 1, "preflight": "passed", "served": 8, "missed": 1,
        "rejected": {"clean room refused: failed: …": 1},
    }


def test_a_run_that_applied_no_update_failed_even_if_every_room_answered() -> None:
    from pcvr.platform.training import Participation, RunLog

    log = RunLog(steps=0, participation={1: Participation(node=1, clean_room_id=0, served=3)})
    assert log.failures(rounds=3, min_share=1.0) == ["no update was applied: the adapters are still the backbone's"]
    log.steps = 3
    assert log.failures(rounds=3, min_share=1.0) == []


def test_a_failed_pre_flight_check_is_the_rooms_failure() -> None:
    from pcvr.platform.training import Participation, RunLog

    log = RunLog(steps=0)
    log.participation = {
        1: Participation(node=1, clean_room_id=2, preflight="clean room refused: x"),
        2: Participation(node=2, clean_room_id=0),  # passed, then never asked: not a reason of its own
    }
    assert log.failures(rounds=5, min_share=0.9) == ["clean room 2: pre-flight check failed: clean room refused: x"]
