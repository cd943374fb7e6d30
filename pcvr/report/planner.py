"""What each ε costs before any budget is spent: the planner behind ``pcvr plan``.

Binary randomized response at ε flips a label with ρ = 1/(1 + e^ε)
(:func:`pcvr.protocols.label_dp.flip_prob`). On n rows with clean conversion
rate π the noisy labels ỹ have rate π̃ = ρ + (1 − 2ρ)π, and the de-biased rate

    p̂ = (mean ỹ − ρ) / (1 − 2ρ)

is unbiased for π (DESIGN.md §7). Its variance, each row's ỹ being Bernoulli(π̃),
is

    Var p̂ = π̃(1 − π̃) / (n (1 − 2ρ)²)
          = [ρ(1 − ρ) + (1 − 2ρ)² π(1 − π)] / (n (1 − 2ρ)²),

the first term the randomized response's own noise, the second the sampling of
the rows themselves (the binomial variance π(1 − π)/n one would have without
privacy). A de-biased model is calibrated to p̂, so its calibration Σp/Σy is off
by the relative error p̂/π − 1; with SE(p̂)/π the relative standard error, a
±t calibration band at confidence c needs

    n ≥ (z_c / t)² · π̃(1 − π̃) / ((1 − 2ρ)² π²),    z_c the normal quantile.

Of the noisy positives, the share that are flipped negatives is ρ(1 − π)/π̃: at a
low base rate even a large ε leaves most of them fake.

Rows at several ε (consent levels) combine as p̂ = (1/N) Σ_g Σ_{i∈g} (ỹ_i − ρ_g)/(1 − 2ρ_g),
whose variance is (1/N²) Σ_g n_g π̃_g(1 − π̃_g)/(1 − 2ρ_g)² (:func:`mixed_rate_se`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

from pcvr.protocols.label_dp import flip_prob

__all__ = [
    "PlanRow",
    "noisy_rate",
    "flip_share_of_noisy_positives",
    "mixed_rate_se",
    "debiased_rate_se",
    "rows_for_calibration",
    "plan",
    "format_plan",
]

DEFAULT_TOLERANCE = 0.03
DEFAULT_CONFIDENCE = 0.95
DEFAULT_EPSILONS = (0.5, 1.0, 2.0, 3.0, 4.0, 8.0)


def _check_rate(base_rate: float) -> None:
    if not 0.0 < base_rate < 1.0:
        raise ValueError(f"base rate must be in (0, 1); got {base_rate!r}")


def noisy_rate(*, base_rate: float, epsilon: float) -> float:
    """π̃ = ρ + (1 − 2ρ)π, the positive rate of randomized-response labels."""
    _check_rate(base_rate)
    rho = flip_prob(epsilon=epsilon)
    return rho + (1.0 - 2.0 * rho) * base_rate


def flip_share_of_noisy_positives(*, base_rate: float, epsilon: float) -> float:
    """ρ(1 − π)/π̃: the share of noisy positives that are flipped negatives."""
    return flip_prob(epsilon=epsilon) * (1.0 - base_rate) / noisy_rate(base_rate=base_rate, epsilon=epsilon)


def mixed_rate_se(*, base_rate: float, groups: Sequence[tuple[int, float]], sampling: bool = True) -> float:
    """Standard error of the de-biased rate over rows at several ε.

    Args:
        base_rate: clean conversion rate π, in (0, 1).
        groups: (rows, ε) per group; ε may be ``math.inf`` (no noise).
        sampling: include the rows' own sampling variance (True: the error on the
            population's rate); False keeps the randomized response's variance
            alone, which is the run-to-run spread on one fixed set of rows.

    Returns:
        SE of p̂ in rate units (divide by π for the relative SE).
    """
    _check_rate(base_rate)
    total = sum(rows for rows, _ in groups)
    if not groups or total < 1 or min(rows for rows, _ in groups) < 0:
        raise ValueError(f"groups need non-negative row counts summing to >= 1; got {list(groups)!r}")
    variance = 0.0
    for rows, epsilon in groups:
        rho = flip_prob(epsilon=epsilon)
        per_row = rho * (1.0 - rho) + (sampling * (1.0 - 2.0 * rho) ** 2) * base_rate * (1.0 - base_rate)
        variance += rows * per_row / (1.0 - 2.0 * rho) ** 2
    return math.sqrt(variance) / total


def debiased_rate_se(*, base_rate: float, rows: int, epsilon: float) -> float:
    """SE of (mean ỹ − ρ)/(1 − 2ρ) on ``rows`` rows at ε: √(π̃(1 − π̃)/n)/(1 − 2ρ)."""
    return mixed_rate_se(base_rate=base_rate, groups=[(rows, epsilon)])


def rows_for_calibration(
    *, base_rate: float, epsilon: float, tolerance: float = DEFAULT_TOLERANCE, confidence: float = DEFAULT_CONFIDENCE
) -> int:
    """Smallest n whose de-biased rate is within ±``tolerance`` (relative) at ``confidence``."""
    if not 0.0 < tolerance < 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"tolerance and confidence must be in (0, 1); got {tolerance!r}, {confidence!r}")
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    per_row_se = debiased_rate_se(base_rate=base_rate, rows=1, epsilon=epsilon)  # SE · √n
    return math.ceil((z * per_row_se / (tolerance * base_rate)) ** 2)


@dataclass(frozen=True)
class PlanRow:
    """What one ε costs on ``rows`` rows at ``base_rate``."""

    epsilon: float
    flip_prob: float
    noisy_rate: float
    flip_share: float  # of noisy positives
    rate_se: float  # SE of the de-biased rate, rate units
    relative_se: float  # rate_se / base rate: the calibration error's standard deviation
    calibration_halfwidth: float  # z_c · relative_se: calibration within 1 ± this at the confidence
    rows_needed: int  # for ±tolerance at the confidence

    def to_dict(self) -> dict[str, float | int | None]:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {**values, "epsilon": None if math.isinf(self.epsilon) else self.epsilon}


def plan(
    *,
    base_rate: float,
    rows: int,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    tolerance: float = DEFAULT_TOLERANCE,
    confidence: float = DEFAULT_CONFIDENCE,
) -> list[PlanRow]:
    """One :class:`PlanRow` per ε (``math.inf``: no randomized response)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1; got {rows!r}")
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    table = []
    for epsilon in epsilons:
        se = debiased_rate_se(base_rate=base_rate, rows=rows, epsilon=epsilon)
        table.append(
            PlanRow(
                epsilon=epsilon,
                flip_prob=flip_prob(epsilon=epsilon),
                noisy_rate=noisy_rate(base_rate=base_rate, epsilon=epsilon),
                flip_share=flip_share_of_noisy_positives(base_rate=base_rate, epsilon=epsilon),
                rate_se=se,
                relative_se=se / base_rate,
                calibration_halfwidth=z * se / base_rate,
                rows_needed=rows_for_calibration(
                    base_rate=base_rate, epsilon=epsilon, tolerance=tolerance, confidence=confidence
                ),
            )
        )
    return table


def format_plan(
    table: Sequence[PlanRow], *, base_rate: float, rows: int, tolerance: float = DEFAULT_TOLERANCE, confidence: float = DEFAULT_CONFIDENCE
) -> str:
    """The plan as a fixed-width table with a one-line reading guide."""
    lines = [
        f"base rate {100 * base_rate:.3g}%, {rows:,} rows",
        f"{'ε':>5} {'flip ρ':>8} {'noisy rate':>11} {'fake share of noisy +':>22} {'SE of rate':>11}"
        f" {'relative SE':>12} {f'calib. ±{100 * confidence:.0f}%':>13} {f'rows for ±{100 * tolerance:g}%':>14}",
    ]
    for row in table:
        eps = "∞" if math.isinf(row.epsilon) else f"{row.epsilon:g}"
        lines.append(
            f"{eps:>5} {row.flip_prob:>8.4f} {100 * row.noisy_rate:>10.3f}% {100 * row.flip_share:>21.1f}%"
            f" {100 * row.rate_se:>10.4f}% {100 * row.relative_se:>11.1f}% {100 * row.calibration_halfwidth:>12.1f}%"
            f" {row.rows_needed:>14,}"
        )
    lines.append(
        "relative SE: standard deviation of the de-biased rate, hence of a de-biased model's calibration Σp/Σy, "
        "around 1; the last column is the smallest row count keeping it within the band"
    )
    return "\n".join(lines)
