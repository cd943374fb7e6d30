"""Binary randomized response and the losses that undo its bias.

Randomized response with privacy parameter ε keeps a binary label with
probability q = e^ε / (1 + e^ε) and flips it with ρ = 1 / (1 + e^ε). The
mechanism is ε-label-DP (Warner 1965; Ghazi et al., "Deep Learning with Label
Differential Privacy", NeurIPS 2021), and everything computed from its output
(losses, gradients, models) inherits the guarantee by post-processing.

Training on noisy labels biases the model towards ρ + (1 − 2ρ)·p. Two
corrections (Natarajan et al., "Learning with Noisy Labels", NeurIPS 2013; Patrini
et al., CVPR 2017) remove it:

* forward: the model predicts the clean p; the loss is the log loss of
  p̃ = ρ + (1 − 2ρ)p against the noisy label. Its expected value is minimised
  exactly at the clean probability.
* backward: ℓ̃(z, ỹ) = [(1 − ρ)ℓ(z, ỹ) − ρ ℓ(z, 1 − ỹ)] / (1 − 2ρ), whose
  expectation over the noise equals the clean loss ℓ(z, y) exactly.

Every function takes a per-record flip probability, so records with different
consent levels (and hence different ε) mix in one batch.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Correction",
    "flip_prob",
    "randomized_response",
    "corrected_loss",
    "debias_rate",
]


class Correction(enum.Enum):
    """How the clean room de-biases its loss against randomized-response noise."""

    NONE = "none"
    FORWARD = "forward"
    BACKWARD = "backward"

    @classmethod
    def parse(cls, value: str) -> "Correction":
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(c.value for c in cls)
            raise ValueError(f"correction must be one of {choices}; got {value!r}") from None


def flip_prob(*, epsilon: float) -> float:
    """ρ = 1 / (1 + e^ε), the probability that randomized response flips a label.

    Args:
        epsilon: privacy parameter, ε > 0; ``math.inf`` means no noise (ρ = 0).
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (or inf for no noise); got {epsilon!r}")
    if math.isinf(epsilon):
        return 0.0
    return 1.0 / (1.0 + math.exp(epsilon))


def randomized_response(
    labels: np.ndarray, uniforms: np.ndarray, *, flip_probs: np.ndarray
) -> np.ndarray:
    """Flip each binary label where its uniform draw falls below its flip probability.

    The draws come in from the caller so that they can be keyed (one PRF value per
    record, see :func:`pcvr.protocols.keys.prf_uniforms`): the same record then gets
    the same noisy label on every rerun and ε never grows with repetition.

    Args:
        labels: int array of 0/1, shape [N].
        uniforms: float array in [0, 1), shape [N].
        flip_probs: float array of ρ in [0, 0.5), shape [N] (or a scalar).

    Returns:
        int8 array of noisy labels, shape [N].
    """
    labels = np.asarray(labels)
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("randomized_response takes binary labels (0 or 1)")
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if uniforms.shape != labels.shape:
        raise ValueError(f"uniforms shape {uniforms.shape} != labels shape {labels.shape}")
    flips = uniforms < np.asarray(flip_probs, dtype=np.float64)
    return np.where(flips, 1 - labels, labels).astype(np.int8)


def _log_mix(flip_probs: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """log(ρ + (1 − 2ρ)·p) computed from log p without underflow."""
    log_rho = torch.log(flip_probs)  # -inf where ρ = 0, which logaddexp handles
    return torch.logaddexp(log_rho, torch.log1p(-2.0 * flip_probs) + log_p)


def corrected_loss(
    logits: torch.Tensor,
    noisy_labels: torch.Tensor,
    flip_probs: torch.Tensor,
    *,
    correction: Correction,
) -> torch.Tensor:
    """Per-record loss of clean-probability logits against randomized-response labels.

    Args:
        logits: model output z for the clean label, shape [N].
        noisy_labels: ỹ in {0, 1}, float, shape [N].
        flip_probs: ρ per record in [0, 0.5), shape [N].
        correction: which de-biasing to apply (module docstring).

    Returns:
        Per-record losses, shape [N] (nats). Sum or average them as needed.
    """
    flip_probs = flip_probs.to(logits.dtype)
    noisy_labels = noisy_labels.to(logits.dtype)
    if correction is Correction.NONE:
        return F.binary_cross_entropy_with_logits(logits, noisy_labels, reduction="none")
    if correction is Correction.FORWARD:
        log_p1 = _log_mix(flip_probs, F.logsigmoid(logits))  # log p̃
        log_p0 = _log_mix(flip_probs, F.logsigmoid(-logits))  # log (1 − p̃)
        return -(noisy_labels * log_p1 + (1.0 - noisy_labels) * log_p0)
    if correction is Correction.BACKWARD:
        loss_observed = F.binary_cross_entropy_with_logits(logits, noisy_labels, reduction="none")
        loss_other = F.binary_cross_entropy_with_logits(logits, 1.0 - noisy_labels, reduction="none")
        return ((1.0 - flip_probs) * loss_observed - flip_probs * loss_other) / (1.0 - 2.0 * flip_probs)
    raise ValueError(f"unknown correction {correction!r}")


def debias_rate(noisy_rate: float, *, flip_prob: float) -> float:
    """Unbiased estimate of the clean positive rate: E[ỹ] = ρ + (1 − 2ρ)·E[y]."""
    if not 0.0 <= flip_prob < 0.5:
        raise ValueError(f"flip_prob must be in [0, 0.5); got {flip_prob!r}")
    return (noisy_rate - flip_prob) / (1.0 - 2.0 * flip_prob)
