"""Tests of pcvr.platform.evaluate: holdout AUC, normalized entropy, calibration and predict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pcvr.models.cvr import CVRNet
from pcvr.models.features import EncodedFeatures
from pcvr.platform.evaluate import holdout_metrics, predict
from support import TINY


def pairwise_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Slow reference: P(score of a positive > score of a negative), ties counting half."""
    positives, negatives = probs[labels == 1], probs[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def reference_ne(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    log_loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    rate = labels.mean()
    return log_loss / -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def test_holdout_metrics_pinned_small_example() -> None:
    labels = np.array([1, 0, 1, 0, 0])
    probs = np.array([0.9, 0.8, 0.3, 0.3, 0.1])
    metrics = holdout_metrics(labels, probs)
    assert set(metrics) == {"auc", "ne", "calibration"}
    assert all(isinstance(v, float) for v in metrics.values())
    # positive 0.9 beats all 3 negatives; positive 0.3 beats 0.1, ties 0.3, loses to 0.8: 4.5 / 6
    assert metrics["auc"] == pytest.approx(0.75, abs=1e-12)
    assert metrics["calibration"] == pytest.approx(2.4 / 2, rel=1e-12)
    # log loss -(ln .9 + ln .2 + ln .3 + ln .7 + ln .9) / 5 = 0.676161 nats; entropy of a 40% base rate 0.673012 nats
    assert metrics["ne"] == pytest.approx(1.0046800, rel=1e-6)
    assert metrics["ne"] == pytest.approx(reference_ne(labels.astype(float), probs), rel=1e-9)


def test_auc_matches_sklearn_and_pairwise_reference() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.2).astype(int)
    probs = np.round(np.clip(0.15 + 0.3 * labels * rng.random(400) + 0.2 * rng.random(400), 0, 1), 2)  # with ties
    metrics = holdout_metrics(labels, probs)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert metrics["auc"] == pytest.approx(pairwise_auc(labels, probs), abs=1e-12)
    assert metrics["calibration"] == pytest.approx(probs.sum() / labels.sum(), rel=1e-12)
    assert metrics["ne"] == pytest.approx(reference_ne(labels.astype(float), probs), rel=1e-9)


@pytest.mark.parametrize("base_rate_labels", [[1, 0, 0, 0], [1, 1, 1, 0, 0], [0] * 97 + [1] * 3])
def test_predicting_the_base_rate_has_ne_one_and_calibration_one(base_rate_labels: list[int]) -> None:
    labels = np.array(base_rate_labels)
    probs = np.full(len(labels), labels.mean())
    metrics = holdout_metrics(labels, probs)
    assert metrics["ne"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["calibration"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["auc"] == pytest.approx(0.5, abs=1e-12)


def test_calibration_shows_four_times_over_prediction() -> None:
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    probs = np.full(8, 0.5)
    assert holdout_metrics(labels, probs)["calibration"] == pytest.approx(4.0, rel=1e-12)


def test_ne_is_finite_for_certain_wrong_predictions() -> None:
    labels = np.array([1, 0, 0, 1])
    probs = np.array([0.0, 1.0, 0.2, 0.9])
    metrics = holdout_metrics(labels, probs)
    assert math.isfinite(metrics["ne"]) and metrics["ne"] > 1
    assert metrics["ne"] == pytest.approx(reference_ne(labels.astype(float), probs), rel=1e-9)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []], ids=["all-negative", "all-positive", "empty"])
def test_single_class_labels_raise(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="both classes"):
        holdout_metrics(np.array(labels), np.full(len(labels), 0.3))


# --- predict ---------------------------------------------------------------------------------


def test_predict_probabilities_chunked_equal_unchunked() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CVRNet(TINY)
    generator = torch.Generator().manual_seed(1)
    n = 53
    features = EncodedFeatures(
        torch.stack([torch.randint(0, b, (n,), generator=generator) for b in TINY.buckets], dim=1),
        torch.randn(n, TINY.num_dense, generator=generator),
    )
    probs = predict(model, features)
    assert probs.dtype == np.float64 and probs.shape == (n,)
    assert ((probs > 0) & (probs < 1)).all()
    with torch.no_grad():
        expected = torch.sigmoid(model(features)).double().numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    np.testing.assert_allclose(predict(model, features, batch_size=7), probs, rtol=1e-6)
    np.testing.assert_allclose(predict(model, features, batch_size=1), probs, rtol=1e-6)
