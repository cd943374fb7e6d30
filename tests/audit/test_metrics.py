"""Attack scoring, confidence intervals and the label-DP bounds (pcvr.audit.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from pcvr.audit.metrics import (
    Estimate,
    _weighted_aucs,
    attack_accuracy,
    attack_auc,
    epsilon_lower_bound,
    label_dp_auc_bound,
)


def _keep_prob(epsilon: float) -> float:
    return 1.0 if math.isinf(epsilon) else math.exp(epsilon) / (1.0 + math.exp(epsilon))


def _rr_canaries(n: int, *, epsilon: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels as the attack's scores, clean labels): n canaries, exactly half positive.

    The noisy label is the most an attack can learn under ε-label-DP (everything
    else is post-processing of it), so it is the worst case for the bounds.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    keep = rng.random(n) < _keep_prob(epsilon)
    return np.where(keep, labels, 1 - labels).astype(np.float64), labels


# --- label_dp_auc_bound ------------------------------------------------------------


@pytest.mark.parametrize("epsilon, expected", [(0.0, 0.5), (1.0, 0.7311), (3.0, 0.9526), (math.inf, 1.0)])
def test_label_dp_auc_bound_pinned(epsilon, expected):
    assert label_dp_auc_bound(epsilon=epsilon) == pytest.approx(expected, abs=5e-5)


def test_label_dp_auc_bound_large_epsilon_does_not_overflow():
    assert label_dp_auc_bound(epsilon=1000.0) == 1.0


@pytest.mark.parametrize("epsilon", [-0.1, float("nan")])
def test_label_dp_auc_bound_validates(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        label_dp_auc_bound(epsilon=epsilon)


# --- Estimate ----------------------------------------------------------------------


def test_estimate_to_dict_and_validation():
    assert Estimate(value=0.7, low=0.6, high=0.8, n=10).to_dict() == {"value": 0.7, "low": 0.6, "high": 0.8, "n": 10}
    with pytest.raises(ValueError, match="low <= high"):
        Estimate(value=0.7, low=0.8, high=0.6, n=10)
    with pytest.raises(ValueError, match="n >= 1"):
        Estimate(value=0.7, low=0.6, high=0.8, n=0)


# --- attack_auc --------------------------------------------------------------------


def test_weighted_aucs_match_sklearn_on_explicit_resamples():
    """Fast path (cumulative weights) against roc_auc_score on the repeated records, ties included."""
    rng = np.random.default_rng(0)
    positives = rng.integers(0, 6, size=30).astype(float)  # few distinct values: many ties
    negatives = rng.integers(0, 5, size=40).astype(float)
    positive_weights = rng.integers(0, 4, size=(5, 30)).astype(float)
    negative_weights = rng.integers(0, 4, size=(5, 40)).astype(float)
    fast = _weighted_aucs(positives, negatives, positive_weights, negative_weights)
    for row in range(5):
        scores = np.concatenate([np.repeat(positives, positive_weights[row].astype(int)),
                                 np.repeat(negatives, negative_weights[row].astype(int))])
        labels = np.concatenate([np.ones(int(positive_weights[row].sum())), np.zeros(int(negative_weights[row].sum()))])
        assert fast[row] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_attack_auc_of_randomized_response_is_keep_prob():
    q = _keep_prob(3.0)
    scores, labels = _rr_canaries(4000, epsilon=3.0, seed=1)
    estimate = attack_auc(scores, labels, generator=np.random.default_rng(1))
    assert estimate.n == 4000
    assert estimate.value == pytest.approx(roc_auc_score(labels, scores))
    assert abs(estimate.value - q) < 0.01
    assert estimate.low <= q <= estimate.high
    assert estimate.high - estimate.low < 0.03


def test_attack_auc_control_random_scores_exclude_keep_prob():
    _, labels = _rr_canaries(4000, epsilon=3.0, seed=2)
    scores = np.random.default_rng(2).random(4000)
    estimate = attack_auc(scores, labels, generator=np.random.default_rng(2))
    assert estimate.low <= 0.5 <= estimate.high
    assert estimate.high < _keep_prob(1.0)


def test_attack_auc_perfect_scores():
    _, labels = _rr_canaries(1000, epsilon=1.0, seed=3)
    estimate = attack_auc(labels + 0.1 * np.random.default_rng(3).random(1000), labels,
                          generator=np.random.default_rng(3))
    assert (estimate.value, estimate.low, estimate.high) == (1.0, 1.0, 1.0)


def test_attack_auc_interval_shrinks_with_canaries():
    widths = []
    for n in (400, 4000):
        scores, labels = _rr_canaries(n, epsilon=1.0, seed=4)
        estimate = attack_auc(scores, labels, generator=np.random.default_rng(4))
        widths.append(estimate.high - estimate.low)
    assert widths[1] < 0.5 * widths[0]  # ~ 1/sqrt(10) expected


@pytest.mark.parametrize("confidence, min_covered, max_covered", [(0.95, 52, 60), (0.5, 18, 42)])
def test_attack_auc_coverage(confidence, min_covered, max_covered):
    """60 trials of N(y, 1) scores; true AUC Φ(1/√2). At 95% expect 57 covered (Binomial(60, 0.95):
    P(X < 52) ≈ 0.3%); the 50% control expects 30 and shows the check can fail."""
    true_auc = stats.norm.cdf(1.0 / math.sqrt(2.0))
    labels = np.repeat([0, 1], 200)
    covered = 0
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        scores = rng.standard_normal(400) + labels
        estimate = attack_auc(scores, labels, confidence=confidence, generator=rng, resamples=500)
        covered += estimate.low <= true_auc <= estimate.high
    assert min_covered <= covered <= max_covered


def test_attack_auc_validates():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="both classes"):
        attack_auc(np.arange(5.0), np.ones(5), generator=rng)
    with pytest.raises(ValueError, match="binary"):
        attack_auc(np.arange(3.0), np.array([0, 1, 2]), generator=rng)
    with pytest.raises(ValueError, match="equal length"):
        attack_auc(np.arange(3.0), np.array([0, 1]), generator=rng)
    with pytest.raises(ValueError, match="NaN or inf"):
        attack_auc(np.array([0.0, np.nan]), np.array([0, 1]), generator=rng)
    with pytest.raises(ValueError, match="confidence"):
        attack_auc(np.arange(2.0), np.array([0, 1]), confidence=1.0, generator=rng)


# --- attack_accuracy ---------------------------------------------------------------


@pytest.mark.parametrize("successes, trials", [(7, 20), (0, 12), (12, 12), (480, 1000)])
def test_attack_accuracy_clopper_pearson_matches_scipy(successes, trials):
    correct = np.arange(trials) < successes
    estimate = attack_accuracy(correct, confidence=0.9)
    interval = stats.binomtest(successes, trials).proportion_ci(confidence_level=0.9, method="exact")
    assert estimate.value == successes / trials and estimate.n == trials
    assert estimate.low == pytest.approx(interval.low, abs=1e-12)
    assert estimate.high == pytest.approx(interval.high, abs=1e-12)


def test_attack_accuracy_pinned():
    estimate = attack_accuracy(np.arange(20) < 7)  # 7 of 20 at 95%
    assert (estimate.low, estimate.high) == pytest.approx((0.1539, 0.5922), abs=1e-4)


def test_attack_accuracy_validates():
    with pytest.raises(ValueError, match="non-empty"):
        attack_accuracy(np.array([], dtype=bool))
    with pytest.raises(ValueError, match="0/1"):
        attack_accuracy(np.array([0, 2]))


# --- epsilon_lower_bound -----------------------------------------------------------


def _bounds(*, epsilon: float, n: int, trials: int) -> np.ndarray:
    return np.array([
        epsilon_lower_bound(*_rr_canaries(n, epsilon=epsilon, seed=seed), generator=np.random.default_rng(seed))
        for seed in range(trials)
    ])


def test_epsilon_lower_bound_is_valid_at_epsilon_one():
    """Validity: under ε = 1 the 95% bound may exceed 1 in ≤ 5% of trials. Allow at most 7 of 50:
    P(Binomial(50, 0.05) ≥ 8) ≈ 0.1%."""
    bounds = _bounds(epsilon=1.0, n=2000, trials=50)
    assert (bounds > 1.0).sum() <= 7
    assert bounds.max() > 0.5  # and the bound is not trivially 0


def test_epsilon_lower_bound_control_detects_more_leakage():
    """Control for the validity test: at true ε = 2 the bound exceeds 1 nearly always."""
    bounds = _bounds(epsilon=2.0, n=2000, trials=20)
    assert (bounds > 1.0).sum() >= 18


def test_epsilon_lower_bound_without_label_dp_is_large():
    scores, labels = _rr_canaries(1000, epsilon=math.inf, seed=5)
    assert epsilon_lower_bound(scores, labels, generator=np.random.default_rng(5)) > 4.0


def test_epsilon_lower_bound_at_epsilon_three():
    scores, labels = _rr_canaries(4000, epsilon=3.0, seed=6)
    bound = epsilon_lower_bound(scores, labels, generator=np.random.default_rng(6))
    assert 1.5 < bound < 3.0


def test_epsilon_lower_bound_continuous_scores():
    """Thresholds are chosen among many distinct scores; ε = 3 RR blurred by noise still bounds ≥ 1.5."""
    scores, labels = _rr_canaries(4000, epsilon=3.0, seed=7)
    scores = scores + 0.2 * np.random.default_rng(7).standard_normal(4000)
    bound = epsilon_lower_bound(scores, labels, generator=np.random.default_rng(7))
    assert 1.5 < bound < 3.0


def test_epsilon_lower_bound_zero_without_signal_or_classes():
    rng = np.random.default_rng(8)
    labels = np.arange(2000) % 2
    assert epsilon_lower_bound(rng.random(2000), labels, generator=rng) < 0.3
    assert epsilon_lower_bound(rng.random(10), np.ones(10), generator=rng) == 0.0
    assert epsilon_lower_bound(np.array([0.0, 1.0, 2.0]), np.array([0, 0, 1]), generator=rng) == 0.0


def test_epsilon_lower_bound_validates():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(np.arange(4.0), np.array([0, 1, 0, 1]), confidence=0.0, generator=rng)
    with pytest.raises(ValueError, match="empty"):
        epsilon_lower_bound(np.array([]), np.array([]), generator=rng)


def test_auc_lower_limit_pinned_and_validated() -> None:
    from pcvr.audit.metrics import auc_lower_limit

    # the lower root of (0.9 − A)² = z²·A(1 − A)/100, z = 1.6449 (Wilson)
    assert auc_lower_limit(0.9, positives=100, negatives=400, confidence=0.95) == pytest.approx(0.83964, abs=1e-5)
    # a perfect score: k / (k + z²), not 1 (a plug-in variance would give the interval no width)
    assert auc_lower_limit(1.0, positives=5, negatives=5) == pytest.approx(5 / (5 + 1.6448536**2), abs=1e-6)
    with pytest.raises(ValueError, match="at least one positive"):
        auc_lower_limit(0.7, positives=0, negatives=10)


def test_a_perfect_canary_score_at_a_large_epsilon_is_not_read_as_above_the_bound() -> None:
    """At ε = 8 randomized response flips one label in ~3000: 90 canaries are scored perfectly in
    97% of audits, which the bound e^8/(1 + e^8) = 0.99966 allows."""
    from pcvr.audit.metrics import auc_lower_limit

    assert auc_lower_limit(1.0, positives=45, negatives=45) < label_dp_auc_bound(epsilon=8.0)
    assert auc_lower_limit(1.0, positives=45, negatives=45) > label_dp_auc_bound(epsilon=2.0)  # still tells ε = 2 apart


def test_auc_lower_limit_rarely_exceeds_the_true_auc_of_randomized_response() -> None:
    """Scores = RR noisy labels at ε=3 on 180 canaries, so the true AUC is the bound q itself: a
    95% lower limit may exceed q in at most 5% of trials (binomial tolerance). The control, the
    plain AUC point estimate, exceeds q in about half of them: the check can fail."""
    from pcvr.audit.metrics import auc_lower_limit

    q = label_dp_auc_bound(epsilon=3.0)
    over_limit = over_estimate = 0
    trials = 200
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 2, size=180)
        scores = np.where(rng.random(180) < q, labels, 1 - labels).astype(float)
        positives = int(labels.sum())
        value = roc_auc_score(labels, scores)
        over_limit += auc_lower_limit(value, positives=positives, negatives=180 - positives, confidence=0.95) > q
        over_estimate += value > q
    tolerance = 0.05 * trials + 3 * math.sqrt(0.05 * 0.95 * trials)  # about 19
    assert over_limit <= tolerance
    assert over_estimate > tolerance
