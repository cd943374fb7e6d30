"""Label-inference attacks on a synthetic linear model (pcvr.audit.attacks).

Each example has a random Gaussian Jacobian row J_i whose last coordinate is 1
(the output-bias parameter), so a batch gradient is g = Σ c_i J_i with
g[-1] = Σ c_i, exactly the shape of what the platform receives.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pcvr.audit.attacks import (
    direction_scores,
    label_scores_from_coefficients,
    least_squares_coefficients,
    norm_scores,
    positive_count,
)

N_PARAMS = 200
BASE_RATE = 0.05


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(jacobian [n, P] with a bias column of ones, logits [n] at a ~3% CVR, labels [n] at BASE_RATE)."""
    rng = np.random.default_rng(seed)
    jacobian = rng.standard_normal((n, N_PARAMS))
    jacobian[:, -1] = 1.0
    logits = rng.normal(-3.5, 0.5, size=n)
    labels = (rng.random(n) < BASE_RATE).astype(np.int64)
    labels[:2] = (0, 1)[:n]  # both classes, whatever the draw
    return jacobian, logits, labels


def _log_loss_slopes(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c(0), c(1)) for plain log loss: ∂ℓ/∂z = σ(z) − y."""
    p = _sigmoid(logits)
    return p, p - 1.0


def _forward_slopes(logits: np.ndarray, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """(c(0), c(1)) for the forward-corrected log loss of p̃ = ρ + (1 − 2ρ)σ(z)."""
    p = _sigmoid(logits)
    p_noisy = rho + (1.0 - 2.0 * rho) * p
    dp_dz = (1.0 - 2.0 * rho) * p * (1.0 - p)
    return dp_dz / (1.0 - p_noisy), -dp_dz / p_noisy


# --- batch size 1: norm and direction ----------------------------------------------


def test_norm_scores_separate_labels_at_batch_one():
    jacobian, logits, labels = _examples(2000, seed=0)
    c_negative, c_positive = _log_loss_slopes(logits)
    grads = jacobian * np.where(labels == 1, c_positive, c_negative)[:, None]  # one example per gradient
    scores = norm_scores(grads)
    assert scores.shape == (2000,)
    np.testing.assert_allclose(scores[:5], [np.linalg.norm(g) for g in grads[:5]], rtol=1e-12)
    assert roc_auc_score(labels, scores) > 0.99


def test_norm_scores_control_label_independent_slopes_give_chance():
    jacobian, logits, labels = _examples(2000, seed=1)
    rng = np.random.default_rng(11)
    slopes = _sigmoid(logits) - (rng.random(2000) < BASE_RATE)  # ignores the canary label
    scores = norm_scores(jacobian * slopes[:, None])
    assert abs(roc_auc_score(labels, scores) - 0.5) < 0.1


def test_direction_scores_are_plus_one_for_positives_minus_one_for_negatives():
    jacobian, logits, labels = _examples(500, seed=2)
    c_negative, c_positive = _log_loss_slopes(logits)
    grads = jacobian * np.where(labels == 1, c_positive, c_negative)[:, None]
    references = jacobian * c_positive[:, None]
    scores = direction_scores(grads, references)
    np.testing.assert_allclose(scores, np.where(labels == 1, 1.0, -1.0), atol=1e-12)


def test_direction_scores_control_unrelated_references_give_chance():
    jacobian, logits, labels = _examples(2000, seed=3)
    c_negative, c_positive = _log_loss_slopes(logits)
    grads = jacobian * np.where(labels == 1, c_positive, c_negative)[:, None]
    references = np.random.default_rng(33).standard_normal(grads.shape)
    scores = direction_scores(grads, references)
    assert abs(roc_auc_score(labels, scores) - 0.5) < 0.1
    assert np.abs(scores).max() < 0.5


def test_direction_scores_zero_rows_give_zero_not_nan():
    grads = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    references = np.array([[1.0, 0.0], [0.0, 0.0], [-2.0, -2.0]])
    np.testing.assert_allclose(direction_scores(grads, references), [0.0, 0.0, -1.0], atol=1e-15)


# --- positive count from the bias gradient -----------------------------------------


@pytest.mark.parametrize("batch_size", [1, 10, 100])
def test_positive_count_exact_for_plain_log_loss(batch_size):
    jacobian, logits, _ = _examples(batch_size, seed=4)
    labels = (np.random.default_rng(batch_size).random(batch_size) < 0.3).astype(np.int64)
    labels[0] = 1  # at batch size 1 the count must be 1, not a trivial 0
    c_negative, c_positive = _log_loss_slopes(logits)
    grad = jacobian.T @ np.where(labels == 1, c_positive, c_negative)
    count = positive_count(grad[-1], grad_if_negative=c_negative, grad_if_positive=c_positive)
    assert abs(count - labels.sum()) < 1e-6


def test_positive_count_approximate_with_unequal_slopes():
    jacobian, logits, _ = _examples(1000, seed=5)
    logits = logits + np.random.default_rng(55).normal(0.0, 1.0, size=1000)  # spread the b_i
    labels = (np.random.default_rng(5).random(1000) < 0.2).astype(np.int64)
    c_negative, c_positive = _forward_slopes(logits, rho=0.1)
    slopes = c_negative - c_positive
    assert slopes.std() / slopes.mean() > 0.1  # the b_i really differ, so exactness is not free
    grad = jacobian.T @ np.where(labels == 1, c_positive, c_negative)
    count = positive_count(grad[-1], grad_if_negative=c_negative, grad_if_positive=c_positive)
    assert abs(count - labels.sum()) < 0.1 * labels.sum()
    assert abs(count - labels.sum()) > 1e-6  # not exact: the approximation is exercised


def test_positive_count_validates():
    c_negative, c_positive = _log_loss_slopes(np.array([-3.0, -2.0]))
    with pytest.raises(ValueError, match="must be > 0"):
        positive_count(0.0, grad_if_negative=c_positive, grad_if_positive=c_negative)  # swapped
    with pytest.raises(ValueError, match="shape"):
        positive_count(0.0, grad_if_negative=c_negative, grad_if_positive=c_positive[:1])
    with pytest.raises(ValueError, match="finite"):
        positive_count(float("nan"), grad_if_negative=c_negative, grad_if_positive=c_positive)
    with pytest.raises(ValueError, match="NaN or inf"):
        positive_count(0.0, grad_if_negative=np.array([np.inf, 0.1]), grad_if_positive=c_positive)
    with pytest.raises(ValueError, match="empty"):
        positive_count(0.0, grad_if_negative=np.array([]), grad_if_positive=np.array([]))


# --- least-squares inversion -------------------------------------------------------


def _batch_gradient(batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    jacobian, logits, labels = _examples(batch_size, seed=seed)
    c_negative, c_positive = _log_loss_slopes(logits)
    slopes = np.where(labels == 1, c_positive, c_negative)
    return jacobian.T @ slopes, jacobian, slopes, c_negative, c_positive


def test_least_squares_recovers_slopes_when_batch_below_params():
    grad, jacobian, slopes, c_negative, c_positive = _batch_gradient(50, seed=6)
    recovered = least_squares_coefficients(grad, jacobian)
    assert recovered.dtype == np.float64 and recovered.shape == (50,)
    np.testing.assert_allclose(recovered, slopes, atol=1e-10)
    scores = label_scores_from_coefficients(recovered, grad_if_negative=c_negative, grad_if_positive=c_positive)
    labels = slopes < 0
    np.testing.assert_allclose(scores, labels.astype(float), atol=1e-8)
    assert scores[labels].min() > scores[~labels].max()


def test_least_squares_float32_inputs():
    grad, jacobian, slopes, _, _ = _batch_gradient(50, seed=7)
    recovered = least_squares_coefficients(grad.astype(np.float32), jacobian.astype(np.float32))
    assert recovered.dtype == np.float64
    np.testing.assert_allclose(recovered, slopes, atol=1e-3)


def test_least_squares_fails_when_batch_exceeds_params():
    grad, jacobian, slopes, _, _ = _batch_gradient(400, seed=8)
    recovered = least_squares_coefficients(grad, jacobian)
    np.testing.assert_allclose(jacobian.T @ recovered, grad, atol=1e-8)  # fits the aggregate ...
    assert np.linalg.norm(recovered - slopes) / np.linalg.norm(slopes) > 0.3  # ... but not the examples
    reference = np.linalg.lstsq(jacobian.T, grad, rcond=None)[0]  # slow reference: minimum-norm (gelsd)
    np.testing.assert_allclose(recovered, reference, atol=1e-10)


def test_least_squares_validates():
    with pytest.raises(ValueError, match="parameters per row"):
        least_squares_coefficients(np.zeros(5), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="2-D"):
        least_squares_coefficients(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        least_squares_coefficients(np.array([0.0, np.nan]), np.zeros((1, 2)))


def test_label_scores_validate():
    c_negative, c_positive = _log_loss_slopes(np.array([-3.0, -2.0]))
    with pytest.raises(ValueError, match="shape"):
        label_scores_from_coefficients(np.zeros(3), grad_if_negative=c_negative, grad_if_positive=c_positive)
    with pytest.raises(ValueError, match="must be > 0"):
        label_scores_from_coefficients(np.zeros(2), grad_if_negative=c_negative, grad_if_positive=c_negative)


def test_score_functions_validate():
    with pytest.raises(ValueError, match="2-D"):
        norm_scores(np.zeros(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        norm_scores(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="shape"):
        direction_scores(np.zeros((2, 3)), np.zeros((2, 4)))


def test_positive_count_weighted_by_a_prior_is_exact_when_positives_share_a_slope() -> None:
    """Unequal slopes: the unweighted mean is off; weighting by who is likely positive recovers it."""
    rng = np.random.default_rng(7)
    labels = np.zeros(200)
    labels[:20] = 1
    c0 = rng.uniform(0.01, 0.1, size=200)
    slopes = np.where(labels == 1, 2.0, rng.uniform(0.2, 0.4, size=200))  # positives' slope differs
    bias_grad = float(np.sum(c0 - labels * slopes))
    c1 = c0 - slopes
    plain = positive_count(bias_grad, grad_if_negative=c0, grad_if_positive=c1)
    weighted = positive_count(bias_grad, grad_if_negative=c0, grad_if_positive=c1, prior=labels)
    assert abs(plain - 20) > 5  # the control: the plain estimate is far off here
    assert weighted == pytest.approx(20, abs=1e-9)
    with pytest.raises(ValueError, match="prior"):
        positive_count(bias_grad, grad_if_negative=c0, grad_if_positive=c1, prior=np.zeros(200))
