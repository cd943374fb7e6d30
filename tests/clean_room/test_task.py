"""Tests of pcvr.clean_room.task: batch sampling and the batch-summed adapter gradient."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pcvr.clean_room.dataset import CleanRoomData
from pcvr.clean_room.task import batch_gradient, batch_indices, local_update
from pcvr.models.cvr import adapter_parameters, get_adapter_vector, parameter_counts
from pcvr.models.features import EncodedFeatures
from pcvr.protocols.label_dp import Correction, corrected_loss
from support import adapted_model, clean_room_data

def slow_reference(model: torch.nn.Module, data: CleanRoomData, index: torch.Tensor, correction: Correction):
    """Sum of per-example gradients, one example at a time, in float64."""
    reference = copy.deepcopy(model).double()
    params = adapter_parameters(reference)
    total = [torch.zeros_like(p) for p in params]
    losses = []
    for row in index.tolist():
        one = torch.tensor([row])
        features = EncodedFeatures(data.features.categorical[one], data.features.dense[one].double())
        loss = corrected_loss(
            reference(features), data.noisy_labels[one].double(), data.flip_probs[one].double(), correction=correction
        ).sum()
        grads = torch.autograd.grad(loss, params)
        total = [t + g for t, g in zip(total, grads)]
        losses.append(float(loss.detach()))
    return torch.cat([t.reshape(-1) for t in total]).numpy(), float(np.mean(losses))


@pytest.mark.parametrize("correction", list(Correction), ids=lambda c: c.value)
def test_batch_gradient_is_sum_of_per_example_gradients(correction: Correction) -> None:
    model = adapted_model(seed=1)
    data = clean_room_data(200, seed=2)
    index = torch.tensor([5, 17, 3, 199, 42, 0, 77, 120, 8, 64, 150, 33])
    result = batch_gradient(model, data, index, correction=correction, min_batch_size=4)
    expected, expected_loss = slow_reference(model, data, index, correction)

    assert result.num_examples == len(index)
    assert result.adapter_grad.dtype == np.float32
    assert result.adapter_grad.shape == (parameter_counts(model)["adapters"],)
    assert np.abs(expected).max() > 0
    assert (expected != 0).mean() > 0.5  # the comparison covers most of the vector
    error = np.abs(result.adapter_grad.astype(np.float64) - expected).max()
    assert error <= 1e-5 * np.abs(expected).max()
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)


def test_batch_gradient_is_a_sum_not_a_mean() -> None:
    model = adapted_model(seed=3)
    data = clean_room_data(40, seed=4)
    index = torch.arange(8)
    doubled = torch.cat([index, index])
    once = batch_gradient(model, data, index, correction=Correction.FORWARD, min_batch_size=1)
    twice = batch_gradient(model, data, doubled, correction=Correction.FORWARD, min_batch_size=1)
    np.testing.assert_allclose(twice.adapter_grad, 2 * once.adapter_grad, rtol=1e-5, atol=1e-7)
    assert twice.num_examples == 16


def test_batch_gradient_ignores_stale_grads_and_leaves_model_alone() -> None:
    model = adapted_model(seed=5)
    data = clean_room_data(60, seed=6)
    index = torch.arange(10, 30)
    weights = get_adapter_vector(model).clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    first = batch_gradient(model, data, index, correction=Correction.BACKWARD, min_batch_size=20)
    second = batch_gradient(model, data, index, correction=Correction.BACKWARD, min_batch_size=20)
    assert np.array_equal(first.adapter_grad, second.adapter_grad)
    assert torch.equal(get_adapter_vector(model), weights)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
            assert torch.equal(parameter, frozen[name]), name


def test_batch_below_min_batch_size_is_never_computed() -> None:
    model = adapted_model(seed=7)
    data = clean_room_data(50, seed=8)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(1))
    sentinel = [torch.full_like(p, 3.0) for p in adapter_parameters(model)]
    for parameter, grad in zip(adapter_parameters(model), sentinel):
        parameter.grad = grad.clone()
    with pytest.raises(ValueError, match="min_batch_size=10"):
        batch_gradient(model, data, torch.arange(9), correction=Correction.FORWARD, min_batch_size=10)
    assert calls == []
    for parameter, grad in zip(adapter_parameters(model), sentinel):
        assert torch.equal(parameter.grad, grad)
    # exactly min_batch_size rows is allowed
    result = batch_gradient(model, data, torch.arange(10), correction=Correction.FORWARD, min_batch_size=10)
    assert result.num_examples == 10 and calls == [1]


# --- batch_indices ---------------------------------------------------------------------------


def test_batch_indices_deterministic_per_seed_clean_room_and_round() -> None:
    kwargs = dict(batch_size=16, seed=3, clean_room_id=2)
    first = batch_indices(100, round_=4, **kwargs)
    assert torch.equal(first, batch_indices(100, round_=4, **kwargs))
    assert first.dtype == torch.int64
    assert not torch.equal(first, batch_indices(100, round_=5, **kwargs))
    assert not torch.equal(first, batch_indices(100, round_=4, batch_size=16, seed=4, clean_room_id=2))
    assert not torch.equal(first, batch_indices(100, round_=4, batch_size=16, seed=3, clean_room_id=3))


def test_batch_indices_full_distinct_batches_within_an_epoch() -> None:
    num_rows, batch_size = 103, 10  # 10 full batches per epoch, 3 rows left over
    epoch = [batch_indices(num_rows, round_=r, batch_size=batch_size, seed=0, clean_room_id=1) for r in range(1, 11)]
    for batch in epoch:
        assert batch.shape == (batch_size,)
        assert batch.min() >= 0 and batch.max() < num_rows
    rows = torch.cat(epoch)
    assert len(set(rows.tolist())) == 100
    # the next epoch is a fresh permutation, again full batches of distinct rows
    nxt = torch.cat(
        [batch_indices(num_rows, round_=r, batch_size=batch_size, seed=0, clean_room_id=1) for r in range(11, 21)]
    )
    assert len(set(nxt.tolist())) == 100
    assert not torch.equal(nxt, rows)


def test_batch_indices_order_differs_between_clean_rooms() -> None:
    orders = [
        torch.cat([batch_indices(64, round_=r, batch_size=8, seed=0, clean_room_id=c) for r in range(1, 9)])
        for c in range(3)
    ]
    for order in orders:
        assert sorted(order.tolist()) == list(range(64))
    assert not torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[1], orders[2])
    # not merely a shift of each other
    assert (orders[0] == orders[1]).float().mean() < 0.5


def test_batch_indices_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    batch_indices(50, round_=1, batch_size=5, seed=0, clean_room_id=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_batch_indices_with_no_rows_raises() -> None:
    with pytest.raises(ValueError, match="no training rows"):
        batch_indices(0, round_=1, batch_size=4, seed=0, clean_room_id=0)


# --- local steps ---------------------------------------------------------------------------------


def _steps(model, data, batches, *, min_batch_size=1):
    return [
        lambda index=index: batch_gradient(model, data, index, correction=Correction.FORWARD, min_batch_size=min_batch_size)
        for index in batches
    ]


def test_local_update_is_torch_adam_on_each_batch_mean() -> None:
    """Reference: a plain torch loop, Adam on the mean corrected loss of each batch in turn."""
    model, reference = adapted_model(seed=5), adapted_model(seed=5)
    data = clean_room_data(120, seed=6)
    batches = [torch.arange(0, 40), torch.arange(40, 80), torch.arange(80, 120)]
    start = get_adapter_vector(model).numpy().copy()
    update = local_update(model, _steps(model, data, batches), learning_rate=0.05, moments=None)

    optimizer = torch.optim.Adam(adapter_parameters(reference), lr=0.05)
    for index in batches:
        optimizer.zero_grad()
        corrected_loss(reference(data.features.take(index)), data.noisy_labels[index], data.flip_probs[index], correction=Correction.FORWARD).mean().backward()
        optimizer.step()
    expected = get_adapter_vector(reference).numpy() - start
    assert np.abs(expected).max() > 1e-3  # the steps moved the weights
    np.testing.assert_allclose(update.delta, expected, atol=1e-6)
    np.testing.assert_allclose(get_adapter_vector(model).numpy(), start + update.delta, atol=1e-7)
    assert update.num_examples == 120 and update.moments.step == 3


def test_local_update_continues_its_moments_across_rounds() -> None:
    """Two rounds of two steps with the moments carried equal one round of four steps."""
    data = clean_room_data(160, seed=7)
    batches = [torch.arange(k * 40, (k + 1) * 40) for k in range(4)]
    split, whole = adapted_model(seed=8), adapted_model(seed=8)
    first = local_update(split, _steps(split, data, batches[:2]), learning_rate=0.02, moments=None)
    second = local_update(split, _steps(split, data, batches[2:]), learning_rate=0.02, moments=first.moments)
    once = local_update(whole, _steps(whole, data, batches), learning_rate=0.02, moments=None)
    np.testing.assert_allclose(first.delta + second.delta, once.delta, atol=1e-6)
    fresh = local_update(adapted_model(seed=8), _steps(split, data, batches[2:]), learning_rate=0.02, moments=None)
    assert np.abs(fresh.delta - second.delta).max() > 1e-4  # control: without the moments the steps differ


def test_local_update_refuses_a_batch_below_the_floor_and_bad_rates() -> None:
    model, data = adapted_model(seed=9), clean_room_data(40, seed=10)
    start = get_adapter_vector(model).clone()
    with pytest.raises(ValueError, match="below min_batch_size=16"):
        local_update(model, _steps(model, data, [torch.arange(8)], min_batch_size=16), learning_rate=0.1, moments=None)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        local_update(model, _steps(model, data, [torch.arange(20)]), learning_rate=0.0, moments=None)
    with pytest.raises(ValueError, match="at least one step"):
        local_update(model, [], learning_rate=0.1, moments=None)
    assert torch.equal(get_adapter_vector(model), start)
