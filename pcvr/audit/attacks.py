"""Label-inference attacks an honest-but-curious platform can run on batch gradients.

What the platform receives per round and clean room is one adapter gradient

    g = Σ_{i ∈ batch} c_i · J_i,        g ∈ R^P,

where J_i = ∂z_i/∂θ is example i's gradient of its output logit with respect to
the adapter parameters and c_i = ∂ℓ/∂z_i is a scalar set by the example's (noisy)
label. For plain log loss c_i = σ(z_i) − ỹ_i: negative for a positive, positive
for a negative. The last adapter parameter is a bias on the output logit, so
g[-1] = Σ c_i. The platform owns the features and the weights, so it can
recompute z_i and J_i for every example; the caller does that (with torch) and
passes numpy arrays in. Every function here is pure and deterministic.

For every loss this project trains with (plain, forward- or backward-corrected
log loss) c_i is affine in the label: c_i(ỹ) = c_i(0) − ỹ_i · b_i with
b_i = c_i(0) − c_i(1) > 0. That is what the count and inversion attacks use.

None of these attacks can beat ε-label-DP: randomized response happens before
any gradient is computed, so whatever they read they read about the noisy
label, and their AUC on the clean label is at most e^ε / (1 + e^ε)
(:func:`pcvr.audit.metrics.label_dp_auc_bound`). Per-sample clipping (DP-SGD)
breaks the affine form above; Gaussian noise and compression blur it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "norm_scores",
    "direction_scores",
    "positive_count",
    "least_squares_coefficients",
    "label_scores_from_coefficients",
]


def _finite_array(name: str, array: np.ndarray, *, ndim: int, dtype: type = np.float64) -> np.ndarray:
    """``array`` as ``dtype`` after checking its rank, that it is non-empty and finite."""
    values = np.asarray(array, dtype=dtype)
    if values.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"{name} is empty (shape {values.shape})")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf")
    return values


def _label_slopes(grad_if_negative: np.ndarray, grad_if_positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (c(0), b = c(0) − c(1)), both float64 of shape [B]."""
    c_negative = _finite_array("grad_if_negative", grad_if_negative, ndim=1)
    c_positive = _finite_array("grad_if_positive", grad_if_positive, ndim=1)
    if c_negative.shape != c_positive.shape:
        raise ValueError(
            f"grad_if_negative shape {c_negative.shape} != grad_if_positive shape {c_positive.shape}"
        )
    slopes = c_negative - c_positive
    if not (slopes > 0).all():
        bad = int(np.argmin(slopes))
        raise ValueError(
            "grad_if_negative - grad_if_positive must be > 0 for every example "
            f"(a positive label lowers ∂ℓ/∂z); example {bad} has {slopes[bad]!r}"
        )
    return c_negative, slopes


def norm_scores(grads: np.ndarray) -> np.ndarray:
    """L2 norm of each received gradient: larger means "more likely positive".

    Li et al., "Label Leakage and Protection in Two-party Split Learning", ICLR
    2022, §4.1: with batch size 1, g = (σ(z) − y)·J and at a low conversion rate
    |σ(z) − 1| ≫ |σ(z)|, so positives send much larger gradients. Larger batches
    dilute it: the norm then mostly tracks how many positives the batch holds.

    Args:
        grads: received gradients, shape [M, P] (one row per round × clean room,
            after whatever compression or noise was applied).

    Returns:
        float64 array of shape [M].
    """
    grads = _finite_array("grads", grads, ndim=2)
    return np.linalg.norm(grads, axis=1)


def direction_scores(grads: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Cosine similarity of each received gradient with its positive-label reference.

    Li et al. 2022 (ICLR), §4.2 "direction score": the gradient of a positive
    points along −J, that of a negative along +J, so the cosine with the
    gradient the example would produce if it were positive, J·(σ(z) − 1), is
    +1 for a positive and −1 for a negative at batch size 1.

    Args:
        grads: received gradients, shape [M, P].
        references: for each row, the gradient a positive label would produce,
            shape [M, P].

    Returns:
        float64 array of shape [M] in [−1, 1]; 0.0 where either row has zero norm.
    """
    grads = _finite_array("grads", grads, ndim=2)
    references = _finite_array("references", references, ndim=2)
    if grads.shape != references.shape:
        raise ValueError(f"grads shape {grads.shape} != references shape {references.shape}")
    norms = np.linalg.norm(grads, axis=1) * np.linalg.norm(references, axis=1)
    dots = np.einsum("mp,mp->m", grads, references)
    cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return np.clip(cosines, -1.0, 1.0)


def positive_count(
    bias_grad: float,
    *,
    grad_if_negative: np.ndarray,
    grad_if_positive: np.ndarray,
    prior: np.ndarray | None = None,
) -> float:
    """Number of (noisy-)positive examples in a batch, read off the bias gradient.

    The bias gradient is Σ_i c_i(ỹ_i) = Σ_i c_i(0) − Σ_i ỹ_i b_i with
    b_i = c_i(0) − c_i(1) > 0 (module docstring), so

        count ≈ (Σ_i c_i(0) − bias_grad) / b̄,

    where b̄ is the mean of b_i, weighted by ``prior`` (each example's
    probability of a positive label, e.g. from the model) when given: the
    slope a positive example is expected to have. It is exact when every b_i
    is equal (plain log loss: b_i = 1; backward correction: b_i = 1 / (1 − 2ρ))
    and otherwise off by Σ ỹ_i (b_i − b̄) / b̄ (forward correction). This is the leak
    DESIGN.md §2 warns about: batch aggregation does not hide the batch's
    positive count from a platform that can recompute the logits.

    Args:
        bias_grad: the received gradient's bias coordinate, g[-1].
        grad_if_negative: c_i(0) = ∂ℓ/∂z_i if example i's label were 0, shape [B].
        grad_if_positive: c_i(1), shape [B].
        prior: optional weights in [0, 1], shape [B] (not all zero).

    Returns:
        The estimated count, a real number not clipped to [0, B] (compression
        or DP noise on the bias coordinate can push it outside).
    """
    if not np.isfinite(bias_grad):
        raise ValueError(f"bias_grad must be finite; got {bias_grad!r}")
    c_negative, slopes = _label_slopes(grad_if_negative, grad_if_positive)
    if prior is None:
        slope = slopes.mean()
    else:
        weights = _finite_array("prior", prior, ndim=1)
        if weights.shape != slopes.shape or weights.min() < 0 or weights.max() > 1 or weights.sum() <= 0:
            raise ValueError(f"prior must be {slopes.shape[0]} weights in [0, 1], not all zero")
        slope = float(np.dot(weights, slopes) / weights.sum())
    return float((c_negative.sum() - float(bias_grad)) / slope)


def least_squares_coefficients(grad: np.ndarray, jacobian: np.ndarray) -> np.ndarray:
    """Per-example loss slopes c recovered from a batch gradient: min_c ‖Jᵀc − g‖₂.

    When the batch is smaller than the parameter count (B < P) and the rows J_i
    are linearly independent, g = Jᵀc has exactly one solution, so the
    aggregate gives every example's c_i back — and with it the label
    (:func:`label_scores_from_coefficients`). Batch summation then hides
    nothing; only label DP (or DP-SGD noise) protects. With B ≥ P the system is
    underdetermined and this returns the minimum-norm solution, the projection
    of c onto the row space of Jᵀ, which recovers it only partly.

    Solved with ``torch.linalg.lstsq`` and LAPACK's gelsy driver (complete
    orthogonal factorization; minimum-norm when rank-deficient). On 2 CPU cores
    for B = 1024, P = 4466 it takes about 0.11 s in float32 and 0.21 s in
    float64, against 0.5–0.6 s for ``np.linalg.lstsq`` (gelsd, which also
    always computes in float64). Computation is in float32 when both inputs
    are float32, else float64.

    Args:
        grad: the received gradient, shape [P].
        jacobian: J, each example's ∂z_i/∂θ as a row, shape [B, P].

    Returns:
        float64 array c of shape [B].
    """
    dtype = np.float32 if np.asarray(grad).dtype == np.asarray(jacobian).dtype == np.float32 else np.float64
    grad = _finite_array("grad", grad, ndim=1, dtype=dtype)
    jacobian = _finite_array("jacobian", jacobian, ndim=2, dtype=dtype)
    if jacobian.shape[1] != grad.shape[0]:
        raise ValueError(
            f"jacobian has {jacobian.shape[1]} parameters per row but grad has {grad.shape[0]}"
        )
    design = torch.tensor(jacobian).T  # [P, B] (a copy: LAPACK overwrites it), column-major as LAPACK wants
    target = torch.tensor(grad).unsqueeze(1)  # [P, 1]
    solution = torch.linalg.lstsq(design, target, driver="gelsy").solution  # [B, 1]
    return solution[:, 0].numpy().astype(np.float64)


def label_scores_from_coefficients(
    coefficients: np.ndarray, *, grad_if_negative: np.ndarray, grad_if_positive: np.ndarray
) -> np.ndarray:
    """Where each recovered slope c_i sits between its negative and positive value.

    score_i = (c_i(0) − c_i) / (c_i(0) − c_i(1)): 0 for a negative and 1 for a
    positive when the recovery is exact; larger means "more likely positive".

    Args:
        coefficients: recovered c, shape [B] (:func:`least_squares_coefficients`).
        grad_if_negative: c_i(0), shape [B].
        grad_if_positive: c_i(1), shape [B].

    Returns:
        float64 array of shape [B].
    """
    coefficients = _finite_array("coefficients", coefficients, ndim=1)
    c_negative, slopes = _label_slopes(grad_if_negative, grad_if_positive)
    if coefficients.shape != c_negative.shape:
        raise ValueError(
            f"coefficients shape {coefficients.shape} != grad_if_negative shape {c_negative.shape}"
        )
    return (c_negative - coefficients) / slopes
