"""Holdout metrics: AUC, normalized entropy, calibration.

* AUC: ``sklearn.metrics.roc_auc_score``.
* NE (He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook",
  2014): mean log loss divided by the entropy of the holdout's base rate; < 1
  beats predicting the base rate, lower is better.
* calibration: Σp / Σy on the holdout's true labels; 1 is calibrated, 4 means the
  model predicts four times as many conversions as happen.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from pcvr.models.cvr import predict

__all__ = ["holdout_metrics", "predict"]


def holdout_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, NE and calibration of ``probs`` against binary ``labels``."""
    labels = np.asarray(labels, dtype=np.float64)
    if labels.sum() in (0, len(labels)):
        raise ValueError("holdout needs both classes to compute AUC and NE")
    base_rate = labels.mean()
    entropy = -(base_rate * np.log(base_rate) + (1 - base_rate) * np.log(1 - base_rate))
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    return {
        "auc": float(roc_auc_score(labels, probs)),
        "ne": float(log_loss(labels, clipped) / entropy),
        "calibration": float(probs.sum() / labels.sum()),
    }
