"""The planner's closed forms against a Monte-Carlo of randomized response, with controls that must fail."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pcvr.cli import main
from pcvr.protocols.label_dp import debias_rate, flip_prob, randomized_response
from pcvr.report.planner import (
    debiased_rate_se,
    flip_share_of_noisy_positives,
    mixed_rate_se,
    plan,
    rows_for_calibration,
)

TRIALS = 4_000


def _monte_carlo_counts(*, base_rate: float, rows: int, epsilon: float, seed: int) -> dict:
    """Randomized response on fresh rows, TRIALS times, drawn as counts: positives ~ Bin(n, π), and each
    class flips ~ Bin(class size, ρ) — the same distribution as flipping row by row."""
    generator = np.random.default_rng(seed)
    rho = flip_prob(epsilon=epsilon)
    positives = generator.binomial(rows, base_rate, size=TRIALS)
    kept = positives - generator.binomial(positives, rho)
    fake = generator.binomial(rows - positives, rho)
    noisy_rate = (kept + fake) / rows
    return {"rates": (noisy_rate - rho) / (1 - 2 * rho), "flip_share": float(np.mean(fake / np.maximum(kept + fake, 1)))}


def _monte_carlo_rows(*, base_rate: float, groups: list[tuple[int, float]], trials: int, seed: int) -> np.ndarray:
    """De-biased rates on one fixed set of rows, re-randomized ``trials`` times by the project's own randomized response."""
    generator = np.random.default_rng(seed)
    labels = [(generator.random(rows) < base_rate).astype(np.int8) for rows, _ in groups]
    rates = []
    for _ in range(trials):
        total = 0.0
        for (rows, epsilon), clean in zip(groups, labels):
            rho = flip_prob(epsilon=epsilon)
            noisy = randomized_response(clean, generator.random(rows), flip_probs=rho)
            total += rows * debias_rate(float(noisy.mean()), flip_prob=rho)
        rates.append(total / sum(rows for rows, _ in groups))
    return np.array(rates)


@pytest.mark.parametrize(("base_rate", "rows", "epsilon"), [(0.009, 45_000, 3.0), (0.025, 20_000, 1.0), (0.2, 5_000, 8.0)])
def test_standard_error_matches_monte_carlo(base_rate: float, rows: int, epsilon: float) -> None:
    draws = _monte_carlo_counts(base_rate=base_rate, rows=rows, epsilon=epsilon, seed=rows)
    predicted = debiased_rate_se(base_rate=base_rate, rows=rows, epsilon=epsilon)
    assert abs(draws["rates"].std(ddof=1) / predicted - 1) < 0.10
    assert abs(draws["rates"].mean() - base_rate) < 4 * predicted / math.sqrt(TRIALS)  # unbiased
    assert flip_share_of_noisy_positives(base_rate=base_rate, epsilon=epsilon) == pytest.approx(draws["flip_share"], rel=0.05)


def test_control_the_naive_binomial_error_fails_the_same_check() -> None:
    """Without randomized response's own variance the SE is ~2.6x too small here: the 10% check must reject it."""
    base_rate, rows, epsilon = 0.009, 45_000, 3.0
    draws = _monte_carlo_counts(base_rate=base_rate, rows=rows, epsilon=epsilon, seed=7)
    naive = math.sqrt(base_rate * (1 - base_rate) / rows)
    assert abs(draws["rates"].std(ddof=1) / naive - 1) > 0.10


def test_mixed_consent_and_fixed_rows_match_monte_carlo() -> None:
    """Standard rows at ε=3 and limited ones at ε=1, labels held fixed: the spread seeds can show."""
    groups = [(4_250, 3.0), (500, 1.0)]
    spread = _monte_carlo_rows(base_rate=0.2, groups=groups, trials=1_500, seed=11).std(ddof=1)
    assert abs(spread / mixed_rate_se(base_rate=0.2, groups=groups, sampling=False) - 1) < 0.10
    assert abs(spread / mixed_rate_se(base_rate=0.2, groups=groups) - 1) > 0.10  # control: the rows' sampling is not in it  # the control: sampling variance is not in it


def test_issue_example_at_09_percent_with_45k_rows() -> None:
    (row,) = plan(base_rate=0.009, rows=45_000, epsilons=[3.0])
    assert row.flip_share == pytest.approx(0.846, abs=0.002)  # "85% of noisy positives fake"
    assert row.relative_se == pytest.approx(0.133, abs=0.002)  # ~14% quoted; 13.3% on exactly 45k rows


def test_rows_needed_reach_the_tolerance() -> None:
    needed = rows_for_calibration(base_rate=0.025, epsilon=2.0, tolerance=0.03, confidence=0.95)
    z = 1.959964
    assert z * debiased_rate_se(base_rate=0.025, rows=needed, epsilon=2.0) / 0.025 <= 0.03
    assert z * debiased_rate_se(base_rate=0.025, rows=int(0.98 * needed), epsilon=2.0) / 0.025 > 0.03
    assert rows_for_calibration(base_rate=0.025, epsilon=1.0) > needed > rows_for_calibration(base_rate=0.025, epsilon=8.0)


def test_no_noise_is_the_binomial_error() -> None:
    assert debiased_rate_se(base_rate=0.1, rows=900, epsilon=math.inf) == pytest.approx(0.01)
    assert flip_share_of_noisy_positives(base_rate=0.1, epsilon=math.inf) == 0.0


@pytest.mark.parametrize("kwargs", [{"base_rate": 0.0, "rows": 10}, {"base_rate": 0.5, "rows": 0}])
def test_bad_input_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        plan(**kwargs)


def test_plan_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--base-rate", "0.009", "--rows", "45000", "--epsilon", "3", "inf", "--json"]) == 0
    import json

    table = json.loads(capsys.readouterr().out)["plan"]
    assert [row["epsilon"] for row in table] == [3.0, None]
    assert table[0]["flip_share"] == pytest.approx(0.846, abs=0.002)
    assert main(["plan", "--base-rate", "1.5", "--rows", "10"]) == 2
    assert "--base-rate" in capsys.readouterr().err
