"""De-biased evaluation from randomized-response labels, against the true labels of the same rows.

The statistical tests draw randomized response ``N_DRAWS`` times over one fixed
synthetic (p, y) set with mixed flip probabilities (no noise, ε=3, ε=1) and check,
for each metric, that the de-biased estimate's mean is within 4 Monte-Carlo SEs
of the true-label metric and that its 95% interval covers it at a rate within 3
binomial SDs of 0.95. The raw noisy metrics fail the same checks (the control).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from pcvr.platform.evaluate import holdout_metrics
from pcvr.protocols.private_eval import EvalAggregates, combine, estimate, room_aggregates

N_DRAWS = 400
ROWS = 20_000
ROOMS = 3
METRICS = ("auc", "ne", "calibration")
COVERAGE_TOLERANCE = 3 * math.sqrt(0.95 * 0.05 / N_DRAWS)  # ≈ 0.033


def _flip_probs(epsilons: list[float]) -> np.ndarray:
    return np.array([0.0 if math.isinf(e) else 1 / (1 + math.exp(e)) for e in epsilons])


@pytest.fixture(scope="module")
def world() -> dict:
    """A model that is informative but not perfect, a 14% base rate and three consent levels."""
    rng = np.random.default_rng(20)
    x = rng.normal(size=ROWS)
    labels = (rng.random(ROWS) < 1 / (1 + np.exp(-(-2.3 + 1.2 * x)))).astype(np.int8)
    probs = 1 / (1 + np.exp(-(-2.1 + 1.0 * x + 0.3 * rng.normal(size=ROWS))))
    flip_probs = _flip_probs([math.inf, 3.0, 1.0])[rng.integers(0, 3, ROWS)]
    rooms = rng.integers(0, ROOMS, ROWS)
    return {"labels": labels, "probs": probs, "flip_probs": flip_probs, "rooms": rooms}


def _within_room_auc(labels: np.ndarray, probs: np.ndarray, rooms: np.ndarray) -> float:
    """The clean AUC over (positive, negative) pairs of the same room."""
    pairs = ordered = 0.0
    for room in np.unique(rooms):
        y, p = labels[rooms == room], probs[rooms == room]
        room_pairs = y.sum() * (1 - y).sum()
        pairs += room_pairs
        ordered += room_pairs * roc_auc_score(y, p)
    return ordered / pairs


def _raw_metrics(noisy: np.ndarray, probs: np.ndarray, ranks: np.ndarray) -> dict[str, float]:
    """The metrics as if the noisy labels were true (holdout_metrics, vectorised: one sort for every draw)."""
    n1 = noisy.sum()
    n0 = len(noisy) - n1
    rate = n1 / len(noisy)
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = -np.mean(noisy * np.log(clipped) + (1 - noisy) * np.log1p(-clipped))
    return {
        "auc": (ranks[noisy == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0),
        "ne": loss / -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)),
        "calibration": probs.sum() / n1,
    }


@pytest.fixture(scope="module")
def draws(world) -> dict:
    """Per draw: the one-room and the three-room estimates (value, SE) and the raw noisy metrics."""
    rng = np.random.default_rng(21)
    labels, probs, flip_probs, rooms = world["labels"], world["probs"], world["flip_probs"], world["rooms"]
    ranks = rankdata(probs)
    out = {kind: {m: [] for m in METRICS} for kind in ("one", "one_se", "three", "three_se", "raw")}
    for _ in range(N_DRAWS):
        noisy = np.where(rng.random(ROWS) < flip_probs, 1 - labels, labels)
        one = estimate(room_aggregates(probs, noisy, flip_probs, min_rows=1))
        three = estimate(
            combine(room_aggregates(probs[rooms == r], noisy[rooms == r], flip_probs[rooms == r], min_rows=1) for r in range(ROOMS))
        )
        raw = _raw_metrics(noisy, probs, ranks)
        for metric in METRICS:
            out["one"][metric].append(getattr(one, metric).value)
            out["one_se"][metric].append(getattr(one, metric).se)
            out["three"][metric].append(getattr(three, metric).value)
            out["three_se"][metric].append(getattr(three, metric).se)
            out["raw"][metric].append(raw[metric])
    return {kind: {m: np.array(v) for m, v in values.items()} for kind, values in out.items()}


def _bias_z(values: np.ndarray, truth: float) -> float:
    """(mean − truth) in Monte-Carlo standard errors of the mean."""
    return (values.mean() - truth) / (values.std(ddof=1) / math.sqrt(len(values)))


def _coverage(values: np.ndarray, ses: np.ndarray, truth: float) -> float:
    return float(np.mean(np.abs(values - truth) <= 1.959964 * ses))


def _unbiased_and_covered(values: np.ndarray, ses: np.ndarray, truth: float) -> bool:
    return abs(_bias_z(values, truth)) <= 4.0 and abs(_coverage(values, ses, truth) - 0.95) <= COVERAGE_TOLERANCE


@pytest.mark.parametrize("metric", METRICS)
def test_one_room_estimates_are_unbiased_and_their_intervals_cover_the_true_label_metric(world, draws, metric):
    truth = holdout_metrics(world["labels"], world["probs"])[metric]
    values, ses = draws["one"][metric], draws["one_se"][metric]
    assert abs(_bias_z(values, truth)) <= 4.0, (values.mean(), truth)
    assert abs(_coverage(values, ses, truth) - 0.95) <= COVERAGE_TOLERANCE
    assert ses.mean() == pytest.approx(values.std(ddof=1), rel=0.15)  # the SE is the spread, not just wide


@pytest.mark.parametrize("metric", METRICS)
def test_combined_rooms_estimate_the_pooled_calibration_and_ne_and_the_within_room_auc(world, draws, metric):
    labels, probs = world["labels"], world["probs"]
    truth = _within_room_auc(labels, probs, world["rooms"]) if metric == "auc" else holdout_metrics(labels, probs)[metric]
    assert _unbiased_and_covered(draws["three"][metric], draws["three_se"][metric], truth)


@pytest.mark.parametrize("metric", METRICS)
def test_control_raw_noisy_metrics_fail_the_same_checks(world, draws, metric):
    """Without de-biasing the noisy AUC is shrunk towards ½, the noisy rate inflated: both are far off."""
    truth = holdout_metrics(world["labels"], world["probs"])[metric]
    raw = draws["raw"][metric]
    assert abs(_bias_z(raw, truth)) > 4.0
    assert not _unbiased_and_covered(raw, draws["one_se"][metric], truth)


def test_without_noise_the_estimates_are_the_true_label_metrics_with_zero_se(world):
    labels, probs = world["labels"], world["probs"]
    metrics = estimate(room_aggregates(probs, labels, np.zeros(ROWS), min_rows=1))
    truth = holdout_metrics(labels, probs)
    for metric in METRICS:
        assert getattr(metrics, metric).value == pytest.approx(truth[metric], rel=1e-9)
        assert getattr(metrics, metric).se == 0.0
    assert metrics.positive_rate.value == pytest.approx(labels.mean())


def test_every_sum_has_the_expectation_and_variance_the_formulas_claim_exactly():
    """All 2⁶ flip patterns of 6 rows, weighted by their probabilities: E and Var are exact, not sampled."""
    labels = np.array([1, 0, 1, 0, 0, 1])
    probs = np.array([0.9, 0.2, 0.4, 0.4, 0.7, 0.3])  # a tie across classes
    flip_probs = np.array([0.0, 0.1, 0.27, 0.05, 0.3, 0.2])
    moments = {name: [0.0, 0.0] for name in ("positives", "loss", "pairs", "pairs_ordered")}
    cross = 0.0
    for flips in itertools.product((0, 1), repeat=len(labels)):
        flips = np.array(flips)
        weight = float(np.prod(np.where(flips == 1, flip_probs, 1 - flip_probs)))
        if weight == 0:
            continue
        part = room_aggregates(probs, np.where(flips == 1, 1 - labels, labels), flip_probs, min_rows=1)
        for name, acc in moments.items():
            acc[0] += weight * getattr(part, name)
            acc[1] += weight * getattr(part, name) ** 2
        cross += weight * part.positives * part.loss
    clean = room_aggregates(probs, labels, np.zeros(len(labels)), min_rows=1)  # the true-label sums
    noise = room_aggregates(probs, labels, flip_probs, min_rows=1)  # variances depend on ρ and p only
    for name, (mean, _) in moments.items():
        assert mean == pytest.approx(getattr(clean, name), abs=1e-12), name
    var = {name: second - mean**2 for name, (mean, second) in moments.items()}
    assert var["positives"] == pytest.approx(noise.positives_var, rel=1e-12)
    assert var["loss"] == pytest.approx(noise.loss_var, rel=1e-12)
    assert cross - moments["positives"][0] * moments["loss"][0] == pytest.approx(noise.loss_positives_cov, rel=1e-12)


def test_for_a_common_flip_probability_the_auc_is_affine_in_the_noisy_auc(world):
    """Â = a + b·Ã with a, b from ρ and the noisy counts only (the module docstring's map)."""
    rng = np.random.default_rng(5)
    labels, probs = world["labels"], world["probs"]
    rho = 1 / (1 + math.exp(2.0))
    noisy = np.where(rng.random(ROWS) < rho, 1 - labels, labels)
    n, n1 = ROWS, int(noisy.sum())
    n0 = n - n1
    denominator = n1 * n0 - rho * (1 - rho) * n * (n - 1)
    b = (1 - 2 * rho) * n1 * n0 / denominator
    a = (rho**2 * n * (n - 1) / 2 - rho / 2 * (n1**2 + n0**2 - n)) / denominator
    metrics = estimate(room_aggregates(probs, noisy, np.full(ROWS, rho), min_rows=1))
    assert metrics.auc.value == pytest.approx(a + b * roc_auc_score(noisy, probs), rel=1e-10)
    # and the large-n form: Ã − ½ = (A − ½)(1 − 2ρ)π(1 − π) / (π̃(1 − π̃))
    noisy_rate = n1 / n
    rate = (noisy_rate - rho) / (1 - 2 * rho)
    slope = (1 - 2 * rho) * rate * (1 - rate) / (noisy_rate * (1 - noisy_rate))
    assert 0.5 + (roc_auc_score(noisy, probs) - 0.5) / slope == pytest.approx(metrics.auc.value, abs=1e-3)


def test_combining_adds_the_sums_so_calibration_and_ne_are_the_pooled_ones(world):
    labels, probs, flip_probs, rooms = world["labels"], world["probs"], world["flip_probs"], world["rooms"]
    noisy = np.where(np.random.default_rng(6).random(ROWS) < flip_probs, 1 - labels, labels)
    parts = [room_aggregates(probs[rooms == r], noisy[rooms == r], flip_probs[rooms == r], min_rows=1) for r in range(ROOMS)]
    combined, pooled = combine(parts), room_aggregates(probs, noisy, flip_probs, min_rows=1)
    assert combined.rows == ROWS and combined.rooms == ROOMS
    for name in ("sum_pred", "positives", "positives_var", "loss", "loss_var", "loss_positives_cov"):
        assert getattr(combined, name) == pytest.approx(getattr(pooled, name), rel=1e-12)
    assert estimate(combined).calibration.value == pytest.approx(estimate(pooled).calibration.value, rel=1e-12)
    assert estimate(combined).ne.value == pytest.approx(estimate(pooled).ne.value, rel=1e-12)


def test_a_split_below_the_minimum_rows_is_refused_and_bad_inputs_are_named():
    probs, labels, flips = np.full(10, 0.5), np.array([0, 1] * 5), np.zeros(10)
    with pytest.raises(ValueError, match="10 rows; a release needs at least 11"):
        room_aggregates(probs, labels, flips, min_rows=11)
    with pytest.raises(ValueError, match="noisy labels"):
        room_aggregates(probs, labels + 1, flips, min_rows=1)
    with pytest.raises(ValueError, match="flip probabilities"):
        room_aggregates(probs, labels, np.full(10, 0.5), min_rows=1)
    with pytest.raises(ValueError, match="probabilities must be finite"):
        room_aggregates(np.full(10, np.nan), labels, flips, min_rows=1)
    with pytest.raises(ValueError, match="shapes differ"):
        room_aggregates(probs[:9], labels, flips, min_rows=1)


def test_too_few_de_biased_positives_give_no_estimate():
    """All-negative noisy labels at a high flip rate: the de-biased count is negative."""
    part = room_aggregates(np.linspace(0.1, 0.9, 50), np.zeros(50), np.full(50, 0.3), min_rows=1)
    assert part.positives < 0
    with pytest.raises(ValueError, match="too few rows to evaluate"):
        estimate(part)


def test_aggregates_validate_their_fields():
    good = room_aggregates(np.linspace(0.1, 0.9, 20), np.array([0, 1] * 10), np.full(20, 0.1), min_rows=1)
    with pytest.raises(ValueError, match="rows must be an integer"):
        EvalAggregates(**{**good.to_dict(), "rows": 0})
    with pytest.raises(ValueError, match="loss must be a finite float"):
        EvalAggregates(**{**good.to_dict(), "loss": math.nan})
    with pytest.raises(ValueError, match="positives_var must be >= 0"):
        EvalAggregates(**{**good.to_dict(), "positives_var": -1.0})
    assert EvalAggregates(**good.to_dict()) == good


def test_the_raw_metrics_of_the_control_are_holdout_metrics(world):
    noisy = np.where(np.random.default_rng(7).random(ROWS) < world["flip_probs"], 1 - world["labels"], world["labels"])
    raw = _raw_metrics(noisy, world["probs"], rankdata(world["probs"]))
    assert raw == pytest.approx(holdout_metrics(noisy, world["probs"]), rel=1e-9)
