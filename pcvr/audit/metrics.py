"""How well a label-inference attack did, with confidence intervals, and what label DP allows.

Attacks are scored on canary records whose labels are independent of their
features, so anything above chance comes from the gradients. Under ε-label-DP
(randomized response, DESIGN.md §7) each canary's attack outcome obeys the
hypothesis-testing constraint of ε-DP (Wasserman & Zhou 2010; Kairouz, Oh &
Viswanath, "The Composition Theorem for Differential Privacy", ICML 2015):

    TPR ≤ e^ε · FPR   and   TNR ≤ e^ε · FNR,

which caps accuracy at a balanced prior and ROC AUC at e^ε / (1 + e^ε).
:func:`epsilon_lower_bound` turns the constraint around into an empirical lower
bound on ε (privacy auditing).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

__all__ = [
    "auc_lower_limit",
    "Estimate",
    "label_dp_auc_bound",
    "attack_auc",
    "attack_accuracy",
    "epsilon_lower_bound",
]

_BOOTSTRAP_CELLS = 1 << 22  # resamples × records per bootstrap block (bounds memory at ~32 MB)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided confidence interval.

    Attributes:
        value: the point estimate.
        low: lower end of the confidence interval.
        high: upper end of the confidence interval.
        n: number of records (canaries or trials) it rests on.
    """

    value: float
    low: float
    high: float
    n: int

    def __post_init__(self) -> None:
        if not all(math.isfinite(x) for x in (self.value, self.low, self.high)):
            raise ValueError(f"Estimate needs finite value and bounds; got {self!r}")
        if not self.low <= self.high:
            raise ValueError(f"Estimate needs low <= high; got low={self.low!r}, high={self.high!r}")
        if self.n < 1:
            raise ValueError(f"Estimate needs n >= 1; got {self.n!r}")

    def to_dict(self) -> dict[str, float | int]:
        """Plain JSON-ready dict: value, low, high, n."""
        return dataclasses.asdict(self)


def label_dp_auc_bound(*, epsilon: float) -> float:
    """e^ε / (1 + e^ε): the largest AUC any attack reaches on an ε-label-DP label.

    Binary randomized response (Warner 1965; Ghazi et al., "Deep Learning with
    Label Differential Privacy", NeurIPS 2021) keeps the label with probability
    q = e^ε / (1 + e^ε). Any ε-DP mechanism's ROC curve lies under the lines
    TPR = e^ε·FPR and 1 − FPR = e^ε(1 − TPR) (Kairouz et al. 2015), which meet
    at (1 − q, q); the area under that broken line is exactly q, and
    randomized response attains it (score = the noisy label). q is also the
    best accuracy at a balanced prior.

    Args:
        epsilon: label-DP parameter, ε ≥ 0; ``math.inf`` means no label noise.

    Returns:
        The bound in [0.5, 1.0]; 1.0 for ε = inf.
    """
    if math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be >= 0 (or inf); got {epsilon!r}")
    return 1.0 / (1.0 + math.exp(-epsilon))


def auc_lower_limit(auc: float, *, positives: int, negatives: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence limit of an AUC that holds for any score distribution.

    Uses van Dantzig's bound on the variance of the Mann–Whitney estimate,
    Var(AUC) ≤ A·(1 − A) / min(m, n) for the true AUC A (van Dantzig 1951;
    Birnbaum & Klose 1957), with a normal quantile z, inverted for A as a score
    (Wilson) interval: the limit is the lower root of (Â − A)² = z² A(1 − A) / k,
    k = min(m, n). Plugging Â in for A instead would give the interval no width at
    Â = 1, where a perfect score on a few dozen canaries would read as certain; the
    score interval's limit there is k / (k + z²). It is wider than the bootstrap
    interval of :func:`attack_auc` and does not rest on resampling a few hundred
    canaries, where a handful of flipped labels decide an AUC near 1: the audit
    decides "above the label-DP bound" with it.
    """
    _check_confidence(confidence)
    if positives < 1 or negatives < 1:
        raise ValueError(f"need at least one positive and one negative; got {positives} and {negatives}")
    if not 0.0 <= auc <= 1.0:
        raise ValueError(f"auc must be in [0, 1]; got {auc!r}")
    k = min(positives, negatives)
    z2 = float(stats.norm.ppf(confidence)) ** 2
    centre = auc + z2 / (2 * k)
    half = math.sqrt(auc * (1.0 - auc) / k + z2 / (4 * k * k))
    return max(0.0, (centre - math.sqrt(z2) * half) / (1.0 + z2 / k))


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}")


def _scored_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (scores as float64, labels as bool), both 1-D of equal, non-zero length."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 1-D of equal length; got {scores.shape} and {labels.shape}")
    if scores.size == 0:
        raise ValueError("scores and labels are empty")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be binary (0 or 1)")
    return scores, labels.astype(bool)


def _clopper_pearson(
    successes: np.ndarray, trials: int, *, alpha_low: float, alpha_high: float
) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper–Pearson bounds: P(p < low) ≤ alpha_low, P(p > high) ≤ alpha_high.

    Clopper & Pearson, Biometrika 1934: low = Beta⁻¹(alpha_low; k, n − k + 1)
    (0 when k = 0) and high = Beta⁻¹(1 − alpha_high; k + 1, n − k) (1 when k = n).
    """
    k = np.asarray(successes, dtype=np.float64)
    low = np.where(k > 0, stats.beta.ppf(alpha_low, np.maximum(k, 1.0), trials - k + 1.0), 0.0)
    high = np.where(k < trials, stats.beta.ppf(1.0 - alpha_high, k + 1.0, np.maximum(trials - k, 1.0)), 1.0)
    return low, high


def _weighted_aucs(
    positive_scores: np.ndarray,
    negative_scores: np.ndarray,
    positive_weights: np.ndarray,
    negative_weights: np.ndarray,
) -> np.ndarray:
    """AUC of each row of record multiplicities (one bootstrap resample per row).

    AUC_r = Σ_ij w⁺_ri w⁻_rj [1(s_i > s_j) + ½·1(s_i = s_j)] / (Σ_i w⁺_ri · Σ_j w⁻_rj),
    computed with a cumulative sum of the negatives' weights in score order,
    O(R·(n⁺ + n⁻)) instead of O(R·n⁺·n⁻).

    Args:
        positive_scores: shape [n⁺]; negative_scores: shape [n⁻].
        positive_weights: shape [R, n⁺]; negative_weights: shape [R, n⁻].

    Returns:
        float64 array of shape [R].
    """
    order = np.argsort(negative_scores, kind="stable")
    sorted_negatives = negative_scores[order]
    cumulative = np.zeros((negative_weights.shape[0], sorted_negatives.size + 1))
    np.cumsum(negative_weights[:, order], axis=1, out=cumulative[:, 1:])  # [R, n⁻ + 1]
    below = np.searchsorted(sorted_negatives, positive_scores, side="left")  # [n⁺]
    not_above = np.searchsorted(sorted_negatives, positive_scores, side="right")  # [n⁺]
    wins = 0.5 * (cumulative[:, below] + cumulative[:, not_above])  # [R, n⁺]
    pairs = positive_weights.sum(axis=1) * negative_weights.sum(axis=1)
    return (positive_weights * wins).sum(axis=1) / pairs


def _resample_counts(size: int, resamples: int, generator: np.random.Generator) -> np.ndarray:
    """Multiplicity of each of ``size`` records in each of ``resamples`` bootstrap draws, shape [R, size]."""
    draws = generator.integers(0, size, size=(resamples, size))
    draws += np.arange(resamples)[:, None] * size
    return np.bincount(draws.ravel(), minlength=resamples * size).reshape(resamples, size).astype(np.float64)


def attack_auc(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    confidence: float = 0.95,
    generator: np.random.Generator,
    resamples: int = 2000,
) -> Estimate:
    """ROC AUC of attack scores against the canaries' clean labels, with a bootstrap CI.

    The point estimate is ``sklearn.metrics.roc_auc_score`` (ties count ½). The
    interval is the percentile interval of a stratified bootstrap (Efron &
    Tibshirani 1993, §13): positives and negatives are resampled separately so
    every resample keeps the class sizes. Compare it with
    :func:`label_dp_auc_bound`.

    Args:
        scores: attack scores, larger means "more likely positive", shape [N].
        labels: clean canary labels, 0 or 1, shape [N]; both classes needed.
        confidence: two-sided coverage of the interval, in (0, 1).
        generator: source of the bootstrap draws.
        resamples: number of bootstrap resamples (cost O(resamples · N)).

    Returns:
        Estimate with n = N.
    """
    _check_confidence(confidence)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1; got {resamples!r}")
    scores, labels = _scored_labels(scores, labels)
    positives, negatives = scores[labels], scores[~labels]
    if positives.size == 0 or negatives.size == 0:
        raise ValueError(
            f"AUC needs both classes; got {positives.size} positive and {negatives.size} negative labels"
        )
    value = float(roc_auc_score(labels, scores))
    block = max(1, _BOOTSTRAP_CELLS // max(positives.size, negatives.size))
    aucs = []
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        aucs.append(
            _weighted_aucs(
                positives,
                negatives,
                _resample_counts(positives.size, count, generator),
                _resample_counts(negatives.size, count, generator),
            )
        )
    alpha = 1.0 - confidence
    low, high = np.quantile(np.concatenate(aucs), [alpha / 2.0, 1.0 - alpha / 2.0])
    return Estimate(value=value, low=float(low), high=float(high), n=int(scores.size))


def attack_accuracy(correct: np.ndarray, *, confidence: float = 0.95) -> Estimate:
    """Fraction of correct guesses with a two-sided Clopper–Pearson ("exact") interval.

    Args:
        correct: one entry per guess, True/1 when it was right, shape [N].
        confidence: two-sided coverage of the interval, in (0, 1).

    Returns:
        Estimate with n = N.
    """
    _check_confidence(confidence)
    correct = np.asarray(correct)
    if correct.ndim != 1 or correct.size == 0:
        raise ValueError(f"correct must be a non-empty 1-D array; got shape {correct.shape}")
    if not np.isin(correct, (0, 1)).all():
        raise ValueError("correct must hold booleans or 0/1")
    trials = int(correct.size)
    successes = int(np.count_nonzero(correct))
    alpha = (1.0 - confidence) / 2.0
    low, high = _clopper_pearson(np.array(successes), trials, alpha_low=alpha, alpha_high=alpha)
    return Estimate(value=successes / trials, low=float(low), high=float(high), n=trials)


def _stratified_halves(labels: np.ndarray, generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint index sets (selection, held-out), each with half of each class."""
    selection, held_out = [], []
    for value in (False, True):
        members = generator.permutation(np.flatnonzero(labels == value))
        selection.append(members[: members.size // 2])
        held_out.append(members[members.size // 2 :])
    return np.concatenate(selection), np.concatenate(held_out)


def _log_ratio_bounds(
    scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, *, alpha: float, guess_positive: bool
) -> np.ndarray:
    """Per threshold t, a lower confidence bound on log(hit rate / false-alarm rate).

    With ``guess_positive`` the guess is "positive" when score ≥ t and the
    ratio is TPR/FPR; otherwise the guess is "negative" when score < t and the
    ratio is TNR/FNR. Each rate gets a one-sided Clopper–Pearson bound at
    level ``alpha``; −inf where the hit rate's lower bound is 0.
    """
    positives = np.sort(scores[labels])
    negatives = np.sort(scores[~labels])
    true_positives = positives.size - np.searchsorted(positives, thresholds, side="left")
    false_positives = negatives.size - np.searchsorted(negatives, thresholds, side="left")
    if guess_positive:
        hits, hit_trials = true_positives, positives.size
        false_alarms, false_alarm_trials = false_positives, negatives.size
    else:
        hits, hit_trials = negatives.size - false_positives, negatives.size
        false_alarms, false_alarm_trials = positives.size - true_positives, positives.size
    hit_low, _ = _clopper_pearson(hits, hit_trials, alpha_low=alpha, alpha_high=alpha)
    _, false_alarm_high = _clopper_pearson(false_alarms, false_alarm_trials, alpha_low=alpha, alpha_high=alpha)
    with np.errstate(divide="ignore"):
        return np.log(hit_low) - np.log(false_alarm_high)


def epsilon_lower_bound(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    confidence: float = 0.95,
    generator: np.random.Generator,
) -> float:
    """Empirical lower bound on the label's ε from attack scores on canaries.

    Privacy auditing (Jagielski, Ullman & Oprea, "Auditing Differentially
    Private Machine Learning: How Private is Private SGD?", NeurIPS 2020; Nasr
    et al., "Adversary Instantiation", IEEE S&P 2021): ε-label-DP forces
    TPR ≤ e^ε·FPR and TNR ≤ e^ε·FNR for any threshold guess, so confident
    bounds on those rates give ε ≥ log(TPR_low / FPR_high).

    The canaries are split at random, stratified by label, into two halves.
    On the first, for each guess direction (positive when score ≥ t; negative
    when score < t), t is chosen to maximise the same Clopper–Pearson bound
    computed on that half (not the raw point estimate, which is infinite at any
    threshold with no false alarms). On the other half, four one-sided
    Clopper–Pearson bounds (TPR low, FPR high, TNR low, FNR high), each at
    level (1 − confidence)/4 (Bonferroni), give

        max(0, log(TPR_low / FPR_high), log(TNR_low / FNR_high)),

    which exceeds the true ε with probability at most 1 − confidence.

    Assumption: the held-out canaries' guesses are independent trials given
    their labels — true when each score comes from a separate batch or run
    (or is the randomized-response output itself). Scores from one training
    run that mixes many canaries only approximately satisfy it; for a rigorous
    one-run audit see Steinke, Nasr & Jagielski, NeurIPS 2023.

    Args:
        scores: attack scores, larger means "more likely positive", shape [N].
        labels: clean canary labels, 0 or 1, shape [N].
        confidence: probability that the bound is valid, in (0, 1).
        generator: source of the random split.

    Returns:
        The bound in nats, ≥ 0; 0.0 when nothing can be bounded (e.g. a half
        without one of the classes).
    """
    _check_confidence(confidence)
    scores, labels = _scored_labels(scores, labels)
    selection, held_out = _stratified_halves(labels, generator)
    for half in (selection, held_out):
        if labels[half].all() or not labels[half].any():
            return 0.0
    alpha = (1.0 - confidence) / 4.0
    candidates = np.unique(scores[selection])
    bound = 0.0
    for guess_positive in (True, False):
        chosen = _log_ratio_bounds(
            scores[selection], labels[selection], candidates, alpha=alpha, guess_positive=guess_positive
        )
        threshold = candidates[np.argmax(chosen)]
        held_out_bound = _log_ratio_bounds(
            scores[held_out], labels[held_out], np.array([threshold]), alpha=alpha, guess_positive=guess_positive
        )[0]
        bound = max(bound, float(held_out_bound))
    return bound
