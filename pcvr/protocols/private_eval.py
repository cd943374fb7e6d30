"""Evaluation without true labels: de-biased AUC, NE and calibration from randomized-response labels.

A clean room holds, for each row of its held-out split, the model's predicted
probability p, the noisy label ỹ (randomized response of the true y at the row's
flip probability ρ, :mod:`pcvr.protocols.label_dp`) and ρ. Nobody outside the
advertiser holds y. The clean room releases only the sums in
:class:`EvalAggregates` (:func:`room_aggregates`); the platform adds them over
clean rooms (:func:`combine`) and turns them into estimates with standard errors
(:func:`estimate`).

**Privacy.** Every sum is a function of the ε-label-DP noisy labels and of the
model (which the platform chose), so by post-processing it costs no label-DP
budget; a label is randomized once, so asking again reveals nothing new about it.
Held-out rows never enter a gradient, so DP-SGD's (ε, δ), which is about the
training rows, is unaffected. Only sums over the whole split leave, never a
per-row value, and a split with fewer rows than the clean room's minimum batch is
refused.

**What the estimates estimate, and their SE.** The target is the metric that the
true labels of the *same* rows would give. The standard errors are those of the
randomized-response noise given those rows (the rows themselves are fixed); they
do not include the sampling error of the split, which a true-label metric on the
split has too. The noise is independent across rows: flips are independent draws.

Per row let sᵢ = (ỹᵢ − ρᵢ)/(1 − 2ρᵢ). Then E[sᵢ] = yᵢ and, whatever yᵢ is,
Var(sᵢ) = vᵢ = ρᵢ(1 − ρᵢ)/(1 − 2ρᵢ)², a known number. Every estimator below is
built from the sᵢ, so per-row ρ (mixed consent levels) needs no approximation.

* **Calibration** Σp / Σy. Σy is estimated without bias by S = Σsᵢ
  (for a common ρ: (Σỹ − nρ)/(1 − 2ρ)), Var(S) = Σvᵢ. Ĉ = Σp / S; delta method:
  SE(Ĉ) = Ĉ·√Var(S)/S. The ratio is biased at second order, ≈ C·Var(S)/S².
* **NE** (mean log loss over the entropy of the base rate; He et al. 2014, as
  :func:`pcvr.platform.evaluate.holdout_metrics`). The backward loss
  ℓ̃ᵢ = [(1 − ρ)ℓ(pᵢ, ỹᵢ) − ρℓ(pᵢ, 1 − ỹᵢ)]/(1 − 2ρ) has E[ℓ̃ᵢ] = ℓ(pᵢ, yᵢ), so
  L̃ = Σℓ̃ᵢ estimates the clean log loss sum without bias. As a function of ỹᵢ,
  ℓ̃ᵢ = const − logit(pᵢ)·sᵢ, hence Var(L̃) = Σ logit(pᵢ)²vᵢ and
  Cov(L̃, S) = −Σ logit(pᵢ)vᵢ, both known. NÊ = (L̃/n)/H(S/n); SE by the delta method
  over (L̃, S).
* **AUC** (Mann–Whitney: the share of (positive, negative) pairs ordered correctly,
  ties counting ½). With hᵢⱼ = 1[pᵢ > pⱼ] + ½·1[pᵢ = pⱼ], the clean AUC is
  A = N/D, N = Σᵢ≠ⱼ yᵢ(1 − yⱼ)hᵢⱼ, D = n₁n₀. Since sᵢ and sⱼ are independent for
  i ≠ j, N̂ = Σᵢ≠ⱼ sᵢ(1 − sⱼ)hᵢⱼ and D̂ = Σᵢ≠ⱼ sᵢ(1 − sⱼ) are *exactly* unbiased for N
  and D, and Â = N̂/D̂.

  *The affine map from the noisy AUC.* For a common ρ, expand sᵢ(1 − sⱼ) =
  [ỹᵢ(1 − ỹⱼ) − ρỹᵢ − ρ(1 − ỹⱼ) + ρ²]/(1 − 2ρ)² and use Σᵢ≠ⱼ hᵢⱼỹᵢ = Ũ + ñ₁(ñ₁ − 1)/2,
  Σᵢ≠ⱼ hᵢⱼ(1 − ỹⱼ) = Ũ + ñ₀(ñ₀ − 1)/2, Σᵢ≠ⱼ hᵢⱼ = n(n − 1)/2, where Ũ = Ã·ñ₁ñ₀ is the
  noisy Mann–Whitney count and ñ₁, ñ₀ the noisy class counts:

      (1 − 2ρ)²N̂ = (1 − 2ρ)·ñ₁ñ₀·Ã − (ρ/2)(ñ₁² + ñ₀² − n) + ρ²n(n − 1)/2
      (1 − 2ρ)²D̂ = ñ₁ñ₀ − ρ(1 − ρ)n(n − 1)

  so Â = a + b·Ã, affine in the noisy AUC with coefficients fixed by ρ and the
  noisy counts. For large n, with π̃ = ñ₁/n and π = (π̃ − ρ)/(1 − 2ρ) the de-biased
  base rate, this is Ã − ½ = (A − ½)·(1 − 2ρ)π(1 − π)/(π̃(1 − π̃)): a noisy positive
  is a clean one with probability α = (1 − ρ)π/π̃, a noisy negative a clean one with
  β = (1 − ρ)(1 − π)/(1 − π̃), so Ã = αβA + (1 − α)(1 − β)(1 − A) + ½[α(1 − β) + (1 − α)β]
  and α + β − 1 = (1 − 2ρ)π(1 − π)/(π̃(1 − π̃)). The noisy AUC is shrunk towards ½;
  de-biasing stretches it back. With per-row ρ there is no single (a, b); N̂ and D̂
  above are the general form (they reduce to the map for a common ρ, as tested).

  *SE.* Linearise N̂ − A·D̂ in the noise δᵢ = sᵢ − yᵢ: its coefficient is
  cᵢ = cᴺᵢ − A·cᴰᵢ with cᴺᵢ = Rᵢ − n₁ + yᵢ, cᴰᵢ = n − 1 − 2n₁ + 2yᵢ and
  Rᵢ = Σⱼ≠ᵢ hᵢⱼ (the row's mid-rank − 1). So Var(Â) ≈ Σvᵢcᵢ²/D², with n₁ and yᵢ
  replaced by S and sᵢ (the quadratic term is smaller by a factor of order n).

  *Across clean rooms* a pair needs both rows' scores, and no row leaves its room,
  so the combined AUC is over pairs *within* a clean room: ΣN̂ / ΣD̂ (with one
  clean room, the ordinary AUC). Calibration and NE are sums, so their combination
  is exactly the pooled metric. The estimates are not clipped to [0, 1] or
  [0, ∞): clipping would bias them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["LOSS_CLIP", "EvalAggregates", "Estimate", "PrivateMetrics", "room_aggregates", "combine", "estimate"]

LOSS_CLIP = 1e-7  # predictions are clipped to [LOSS_CLIP, 1 − LOSS_CLIP] for the log loss, as the true-label NE is
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class EvalAggregates:
    """The sums one clean room releases about its held-out split (or several rooms', added).

    Every field is a sum over rows (the AUC fields over pairs of rows of one clean
    room); none is a per-row value. Names follow the module docstring.
    """

    rows: int  # n
    rooms: int  # clean rooms whose sums these are
    sum_pred: float  # Σp
    positives: float  # S = Σsᵢ, the de-biased positive count
    positives_var: float  # Var(S) = Σvᵢ
    loss: float  # L̃ = Σℓ̃ᵢ, backward log loss (nats)
    loss_var: float  # Var(L̃) = Σ logit(pᵢ)²vᵢ
    loss_positives_cov: float  # Cov(L̃, S) = −Σ logit(pᵢ)vᵢ
    pairs: float  # D̂ = Σᵢ≠ⱼ sᵢ(1 − sⱼ), de-biased (positive, negative) pairs
    pairs_ordered: float  # N̂ = Σᵢ≠ⱼ sᵢ(1 − sⱼ)hᵢⱼ
    auc_var_nn: float  # Σvᵢ(cᴺᵢ)²
    auc_var_nd: float  # Σvᵢcᴺᵢcᴰᵢ
    auc_var_dd: float  # Σvᵢ(cᴰᵢ)²

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{item.name} must be an integer >= 1; got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
                raise ValueError(f"{item.name} must be a finite float; got {value!r}")
        for name in ("positives_var", "loss_var", "auc_var_nn", "auc_var_dd", "sum_pred"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Estimate:
    """A de-biased metric and its standard error (randomized-response noise, given the rows)."""

    value: float
    se: float

    def interval(self, *, z: float = _Z95) -> tuple[float, float]:
        """The normal-approximation interval value ± z·SE (95% by default)."""
        return self.value - z * self.se, self.value + z * self.se

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "se": self.se}


@dataclass(frozen=True)
class PrivateMetrics:
    """What the platform learns about the model on the clean rooms' held-out splits."""

    auc: Estimate  # over pairs within a clean room (module docstring)
    ne: Estimate
    calibration: Estimate  # Σp / Σy
    positive_rate: Estimate  # Σy / n
    rows: int
    rooms: int

    def to_dict(self) -> dict[str, object]:
        return {
            "auc": self.auc.to_dict(),
            "ne": self.ne.to_dict(),
            "calibration": self.calibration.to_dict(),
            "positive_rate": self.positive_rate.to_dict(),
            "rows": self.rows,
            "rooms": self.rooms,
        }


def _check_inputs(probs: np.ndarray, noisy_labels: np.ndarray, flip_probs: np.ndarray) -> None:
    if not probs.shape == noisy_labels.shape == flip_probs.shape or probs.ndim != 1:
        raise ValueError(f"shapes differ: probs {probs.shape}, noisy labels {noisy_labels.shape}, flip probs {flip_probs.shape}")
    if not np.isfinite(probs).all() or ((probs < 0) | (probs > 1)).any():
        raise ValueError("predicted probabilities must be finite and in [0, 1]")
    if not np.isin(noisy_labels, (0, 1)).all():
        raise ValueError("noisy labels must be 0 or 1")
    if not np.isfinite(flip_probs).all() or ((flip_probs < 0) | (flip_probs >= 0.5)).any():
        raise ValueError("flip probabilities must be in [0, 0.5)")


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Σ aᵢbᵢ without BLAS (whose threads only contend here)."""
    return float(np.sum(a * b))


def room_aggregates(
    probs: np.ndarray, noisy_labels: np.ndarray, flip_probs: np.ndarray, *, min_rows: int
) -> EvalAggregates:
    """The sums a clean room may release about one held-out split.

    Args:
        probs: the model's predicted conversion probabilities, shape [n].
        noisy_labels: randomized-response labels ỹ in {0, 1}, shape [n].
        flip_probs: each row's flip probability ρ in [0, 0.5), shape [n].
        min_rows: the fewest rows a release may cover (the clean room's minimum batch).

    Raises:
        ValueError: fewer than ``min_rows`` rows, or inputs out of range.
    """
    probs = np.asarray(probs, dtype=np.float64)
    noisy_labels = np.asarray(noisy_labels, dtype=np.float64)
    flip_probs = np.asarray(flip_probs, dtype=np.float64)
    _check_inputs(probs, noisy_labels, flip_probs)
    n = len(probs)
    if n < max(1, min_rows):
        raise ValueError(f"the held-out split has {n} rows; a release needs at least {max(1, min_rows)}")
    scale = 1.0 - 2.0 * flip_probs
    s = (noisy_labels - flip_probs) / scale  # E[s] = y
    v = flip_probs * (1.0 - flip_probs) / scale**2  # Var(s), whatever y is
    clipped = np.clip(probs, LOSS_CLIP, 1.0 - LOSS_CLIP)
    logit = np.log(clipped) - np.log1p(-clipped)
    loss_if_1, loss_if_0 = -np.log(clipped), -np.log1p(-clipped)
    observed = np.where(noisy_labels == 1, loss_if_1, loss_if_0)
    other = np.where(noisy_labels == 1, loss_if_0, loss_if_1)
    backward = ((1.0 - flip_probs) * observed - flip_probs * other) / scale
    positives = float(s.sum())
    # AUC: G_i = Σ_j (1 − s_j) h_ij over all j (h_ii = ½), from one sort of the scores.
    values, inverse = np.unique(probs, return_inverse=True)
    negatives_at = np.bincount(inverse, weights=1.0 - s, minlength=len(values))
    below = np.cumsum(negatives_at) - negatives_at
    g = below[inverse] + 0.5 * negatives_at[inverse]
    pairs_ordered = float(_dot(s, g) - 0.5 * _dot(s, 1.0 - s))  # drop the j = i terms
    pairs = positives * (n - positives) - _dot(s, 1.0 - s)
    from scipy.stats import rankdata  # here, not at the top: a ClientApp process that only trains never pays for scipy.stats

    below_rank = rankdata(probs, method="average") - 1.0  # R_i = Σ_{j≠i} h_ij
    c_n = below_rank - positives + s
    c_d = (n - 1) - 2.0 * positives + 2.0 * s
    return EvalAggregates(
        rows=n,
        rooms=1,
        sum_pred=float(probs.sum()),
        positives=positives,
        positives_var=float(v.sum()),
        loss=float(backward.sum()),
        loss_var=_dot(v, logit**2),
        loss_positives_cov=-_dot(v, logit),
        pairs=float(pairs),
        pairs_ordered=pairs_ordered,
        auc_var_nn=_dot(v, c_n**2),
        auc_var_nd=_dot(v, c_n * c_d),
        auc_var_dd=_dot(v, c_d**2),
    )


def combine(parts: Iterable[EvalAggregates]) -> EvalAggregates:
    """The sums of several clean rooms, added (their noise is independent)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no clean room's aggregates to combine")
    return EvalAggregates(
        **{item.name: sum(getattr(part, item.name) for part in parts) for item in dataclasses.fields(EvalAggregates)}
    )


def _entropy(rate: float) -> float:
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def estimate(aggregates: EvalAggregates) -> PrivateMetrics:
    """De-biased AUC, NE, calibration and positive rate, each with its standard error.

    Raises:
        ValueError: the de-biased positive count is not inside (0, n), or the
            de-biased pair count is not positive: too few rows for this noise level.
    """
    a = aggregates
    n, positives = a.rows, a.positives
    if not 0.0 < positives < n or a.pairs <= 0:
        raise ValueError(
            f"the de-biased positive count is {positives:.1f} of {n} rows: too few rows to evaluate at this noise level"
        )
    rate = positives / n
    calibration = a.sum_pred / positives
    calibration_se = calibration * math.sqrt(a.positives_var) / positives
    entropy = _entropy(rate)
    ne = (a.loss / n) / entropy
    d_loss = 1.0 / (n * entropy)
    d_positives = -(a.loss / n) * math.log((1.0 - rate) / rate) / (entropy**2 * n)
    ne_var = d_loss**2 * a.loss_var + 2 * d_loss * d_positives * a.loss_positives_cov + d_positives**2 * a.positives_var
    auc = a.pairs_ordered / a.pairs
    auc_var = (a.auc_var_nn - 2.0 * auc * a.auc_var_nd + auc**2 * a.auc_var_dd) / a.pairs**2
    return PrivateMetrics(
        auc=Estimate(auc, math.sqrt(max(auc_var, 0.0))),
        ne=Estimate(ne, math.sqrt(max(ne_var, 0.0))),
        calibration=Estimate(calibration, calibration_se),
        positive_rate=Estimate(rate, math.sqrt(a.positives_var) / n),
        rows=n,
        rooms=a.rooms,
    )
