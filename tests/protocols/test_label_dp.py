"""Randomized response and the de-biased losses (pcvr.protocols.label_dp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcvr.protocols.keys import prf_uniforms, pseudonymous_keys
from pcvr.protocols.label_dp import Correction, corrected_loss, debias_rate, flip_prob, randomized_response

JOIN_SECRET = bytes(range(32))
RR_SECRET = bytes(range(100, 132))
N_RECORDS = 1_000_000
Z_SIGMA = 3.29  # two-sided 0.1% band of a normal
RHOS = (0.01, 0.1, 0.3, 0.45)
CLEAN_PROBS = (0.02, 0.1, 0.3, 0.7, 0.95)  # 0.5 left out: there RR does not bias the rate


def _bce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Reference log loss in float64, written out: max(z, 0) − z·y + log(1 + e^−|z|)."""
    return np.maximum(logits, 0.0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))


def _loss(logits: torch.Tensor, label: float, rho: float, correction: Correction) -> torch.Tensor:
    labels = torch.full_like(logits, label)
    flip_probs = torch.full_like(logits, rho)
    return corrected_loss(logits, labels, flip_probs, correction=correction)


# --- randomized response with the real keyed draws ---------------------------------


@pytest.fixture(scope="module")
def keyed_records() -> tuple[np.ndarray, np.ndarray]:
    """1M alternating clean labels and their keyed uniforms (HMAC join key, then HMAC draw)."""
    click_ids = [f"click-{i:07d}" for i in range(N_RECORDS)]
    keys = pseudonymous_keys(click_ids, secret=JOIN_SECRET)
    uniforms = prf_uniforms(keys, secret=RR_SECRET)
    labels = (np.arange(N_RECORDS) % 2).astype(np.int8)
    return labels, uniforms


def _z_score(flips: np.ndarray, rho: float) -> float:
    sigma = math.sqrt(rho * (1.0 - rho) / flips.size)
    return (flips.mean() - rho) / sigma


@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_keyed_flip_rate_matches_flip_prob(keyed_records, epsilon):
    labels, uniforms = keyed_records
    rho = 1.0 / (1.0 + math.exp(epsilon))
    noisy = randomized_response(labels, uniforms, flip_probs=np.full(labels.size, flip_prob(epsilon=epsilon)))
    flips = noisy != labels
    assert abs(_z_score(flips, rho)) < Z_SIGMA
    # The flip rate must not depend on the clean label.
    for value in (0, 1):
        assert abs(_z_score(flips[labels == value], rho)) < Z_SIGMA


@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_keyed_flip_rate_rejects_wrong_flip_prob(keyed_records, epsilon):
    """Control: the same statistic against ρ(ε + 0.1) is far outside the band."""
    labels, uniforms = keyed_records
    noisy = randomized_response(labels, uniforms, flip_probs=flip_prob(epsilon=epsilon))
    wrong_rho = 1.0 / (1.0 + math.exp(epsilon + 0.1))
    assert abs(_z_score(noisy != labels, wrong_rho)) > Z_SIGMA


def test_randomized_response_flips_exactly_below_threshold():
    labels = np.array([0, 1, 0, 1, 1, 0])
    uniforms = np.array([0.0, 0.2499999, 0.25, 0.9, 0.1, 0.3])
    noisy = randomized_response(labels, uniforms, flip_probs=np.array([0.25, 0.25, 0.25, 0.25, 0.0, 0.4]))
    np.testing.assert_array_equal(noisy, [1, 0, 0, 1, 1, 1])
    assert noisy.dtype == np.int8


def test_randomized_response_per_record_flip_probs():
    labels = np.zeros(4, dtype=np.int8)
    uniforms = np.full(4, 0.1)
    noisy = randomized_response(labels, uniforms, flip_probs=np.array([0.05, 0.2, 0.0, 0.45]))
    np.testing.assert_array_equal(noisy, [0, 1, 0, 1])


def test_randomized_response_rejects_bad_inputs():
    with pytest.raises(ValueError, match="binary"):
        randomized_response(np.array([0, 2]), np.array([0.1, 0.1]), flip_probs=0.1)
    with pytest.raises(ValueError, match="shape"):
        randomized_response(np.array([0, 1]), np.array([0.1]), flip_probs=0.1)


def test_randomized_response_empty():
    noisy = randomized_response(np.zeros(0, dtype=np.int8), np.zeros(0), flip_probs=np.zeros(0))
    assert noisy.shape == (0,)


# --- flip_prob, debias_rate, Correction ------------------------------------------------


def test_flip_prob_pinned_values():
    assert flip_prob(epsilon=math.inf) == 0.0
    assert flip_prob(epsilon=math.log(3.0)) == pytest.approx(0.25, abs=1e-15)
    assert flip_prob(epsilon=1.0) == pytest.approx(1.0 / (1.0 + math.e), abs=1e-15)
    assert flip_prob(epsilon=3.0) == pytest.approx(0.04742587317756678, abs=1e-15)
    assert flip_prob(epsilon=1e-9) == pytest.approx(0.5, abs=1e-9)


def test_flip_prob_decreases_with_epsilon():
    rhos = [flip_prob(epsilon=e) for e in (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)]
    assert all(a > b for a, b in zip(rhos, rhos[1:]))
    assert all(0.0 < r < 0.5 for r in rhos)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, -math.inf, math.nan])
def test_flip_prob_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        flip_prob(epsilon=epsilon)


@pytest.mark.parametrize("rho", (0.0,) + RHOS)
@pytest.mark.parametrize("clean_rate", (0.0, 0.025, 0.3, 1.0))
def test_debias_rate_inverts_noisy_rate(rho, clean_rate):
    noisy_rate = rho + (1.0 - 2.0 * rho) * clean_rate
    assert debias_rate(noisy_rate, flip_prob=rho) == pytest.approx(clean_rate, abs=1e-12)


@pytest.mark.parametrize("rho", [0.5, 0.7, -0.01, math.nan])
def test_debias_rate_rejects_bad_flip_prob(rho):
    with pytest.raises(ValueError, match="flip_prob"):
        debias_rate(0.3, flip_prob=rho)


def test_correction_parse():
    assert Correction.parse("forward") is Correction.FORWARD
    assert Correction.parse("backward") is Correction.BACKWARD
    assert Correction.parse("none") is Correction.NONE
    with pytest.raises(ValueError) as excinfo:
        Correction.parse("Forward")
    for choice in Correction:
        assert choice.value in str(excinfo.value)


# --- backward (unbiased) loss --------------------------------------------------------


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("clean_label", [0, 1])
def test_backward_loss_expectation_equals_clean_loss(rho, clean_label):
    """(1 − ρ)·ℓ̃(z, y) + ρ·ℓ̃(z, 1 − y) = ℓ(z, y) exactly, in closed form."""
    logits = torch.linspace(-30.0, 30.0, 121, dtype=torch.float64)
    expected = (1.0 - rho) * _loss(logits, clean_label, rho, Correction.BACKWARD) + rho * _loss(
        logits, 1 - clean_label, rho, Correction.BACKWARD
    )
    clean = _bce(logits.numpy(), float(clean_label))
    np.testing.assert_allclose(expected.numpy(), clean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rho", RHOS)
def test_expectation_check_detects_biased_losses(rho):
    """Control: the same identity fails for no correction and for a mis-stated ρ."""
    logits = torch.linspace(-8.0, 8.0, 33, dtype=torch.float64)
    clean = _bce(logits.numpy(), 1.0)
    for correction, loss_rho in ((Correction.NONE, rho), (Correction.BACKWARD, rho * 0.9)):
        expected = (1.0 - rho) * _loss(logits, 1, loss_rho, correction) + rho * _loss(logits, 0, loss_rho, correction)
        assert np.abs(expected.numpy() - clean).max() > 1e-3


def test_backward_loss_formula_pinned():
    logits = torch.tensor([0.7], dtype=torch.float64)
    rho = 0.2
    loss = _loss(logits, 1, rho, Correction.BACKWARD).item()
    by_hand = ((1 - rho) * _bce(np.array([0.7]), 1.0)[0] - rho * _bce(np.array([0.7]), 0.0)[0]) / (1 - 2 * rho)
    assert loss == pytest.approx(by_hand, rel=1e-14)


# --- forward loss ---------------------------------------------------------------------


def _expected_noisy_loss(logits: torch.Tensor, clean_prob: float, rho: float, correction: Correction) -> torch.Tensor:
    """E over ỹ ~ Bernoulli(ρ + (1 − 2ρ)p*) of the per-record loss, in closed form."""
    noisy_rate = rho + (1.0 - 2.0 * rho) * clean_prob
    return noisy_rate * _loss(logits, 1, rho, correction) + (1.0 - noisy_rate) * _loss(logits, 0, rho, correction)


def _derivatives(clean_prob: float, rho: float, correction: Correction) -> tuple[float, float]:
    z = torch.tensor([math.log(clean_prob / (1.0 - clean_prob))], dtype=torch.float64, requires_grad=True)
    loss = _expected_noisy_loss(z, clean_prob, rho, correction).sum()
    (first,) = torch.autograd.grad(loss, z, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), z)
    return first.item(), second.item()


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("clean_prob", CLEAN_PROBS)
def test_forward_loss_minimised_at_clean_logit(rho, clean_prob):
    first, second = _derivatives(clean_prob, rho, Correction.FORWARD)
    assert abs(first) < 1e-10
    assert second > 0.0
    z_star = math.log(clean_prob / (1.0 - clean_prob))
    delta = 0.1
    logits = torch.tensor([z_star - delta, z_star, z_star + delta], dtype=torch.float64)
    below, at, above = _expected_noisy_loss(logits, clean_prob, rho, Correction.FORWARD).tolist()
    assert below > at and above > at


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("clean_prob", CLEAN_PROBS)
def test_uncorrected_loss_not_minimised_at_clean_logit(rho, clean_prob):
    """Control: without correction the slope at logit(p*) is p* − p̃ = ρ(2p* − 1) ≠ 0."""
    first, _ = _derivatives(clean_prob, rho, Correction.NONE)
    assert abs(first) > 1e-3
    assert first == pytest.approx(rho * (2.0 * clean_prob - 1.0), rel=1e-9)


def test_forward_loss_pinned_value():
    rho, z = 0.1, 0.4
    p = 1.0 / (1.0 + math.exp(-z))
    noisy_p = rho + (1 - 2 * rho) * p
    logits = torch.tensor([z], dtype=torch.float64)
    assert _loss(logits, 1, rho, Correction.FORWARD).item() == pytest.approx(-math.log(noisy_p), rel=1e-13)
    assert _loss(logits, 0, rho, Correction.FORWARD).item() == pytest.approx(-math.log(1 - noisy_p), rel=1e-13)


@pytest.mark.parametrize("correction", [Correction.FORWARD, Correction.BACKWARD, Correction.NONE])
def test_zero_flip_prob_is_plain_log_loss_with_finite_gradient(correction):
    logits = torch.linspace(-40.0, 40.0, 41, dtype=torch.float64, requires_grad=True)
    labels = (torch.arange(41) % 2).to(torch.float64)
    loss = corrected_loss(logits, labels, torch.zeros(41, dtype=torch.float64), correction=correction)
    np.testing.assert_allclose(loss.detach().numpy(), _bce(logits.detach().numpy(), labels.numpy()), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(grad).all()
    expected_grad = torch.sigmoid(logits.detach()) - labels
    np.testing.assert_allclose(grad.numpy(), expected_grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("correction", [Correction.FORWARD, Correction.BACKWARD])
def test_corrected_loss_finite_at_extreme_logits_float32(correction):
    logits = torch.tensor([-80.0, -20.0, 0.0, 20.0, 80.0], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    flip_probs = torch.tensor([0.1, 0.3, 0.45, 0.0, 0.01])
    loss = corrected_loss(logits, labels, flip_probs, correction=correction)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_corrected_loss_mixes_flip_probs_per_record():
    """One batch with per-record ρ equals each record computed on its own."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=generator, dtype=torch.float64)
    labels = (torch.rand(8, generator=generator) < 0.5).to(torch.float64)
    flip_probs = torch.tensor([0.0, 0.01, 0.1, 0.3, 0.45, 0.047, 0.269, 0.2], dtype=torch.float64)
    for correction in Correction:
        batch = corrected_loss(logits, labels, flip_probs, correction=correction)
        assert batch.shape == (8,)
        one_by_one = torch.cat(
            [corrected_loss(logits[i : i + 1], labels[i : i + 1], flip_probs[i : i + 1], correction=correction) for i in range(8)]
        )
        torch.testing.assert_close(batch, one_by_one, rtol=1e-14, atol=1e-14)
