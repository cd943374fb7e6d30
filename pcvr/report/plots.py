"""The report's plots: each is first a :class:`Plot` record (the exact numbers it shows, kept in
``results.json``), then drawn from that record with matplotlib's Agg backend to a PNG.

Every point is a configuration's mean over its seeds, and its error bar their sample
standard deviation. A curve over ε holds the other axes at the grid's reference values
(its ``[run]`` table); a curve over codecs or DP-SGD noise holds the others where that
sweep put them (the most common point among the cells that vary it).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pcvr.audit.metrics import label_dp_auc_bound  # noqa: E402
from pcvr.report.results import as_float  # noqa: E402

__all__ = ["Series", "Level", "Plot", "build_plots", "draw", "png_bytes", "CORRECTIONS", "ATTACK_LABELS"]

CORRECTIONS = ("none", "forward", "backward")
AXES = ("epsilon", "correction", "codec", "dp_noise_multiplier", "min_batch_size")
ATTACK_LABELS = {
    "norm": "gradient norm",
    "direction": "gradient direction",
    "positive_count": "batch positive count",
    "least_squares": "least-squares inversion",
}

LEVEL_STYLES = {
    "non-private (ε = ∞)": {"color": "black", "linestyle": "--"},
    "frozen backbone": {"color": "tab:gray", "linestyle": ":"},
    "perfectly calibrated": {"color": "tab:green", "linestyle": "-."},
    "chance": {"color": "tab:gray", "linestyle": ":"},
    "no DP-SGD": {"color": "black", "linestyle": "--"},
}
TRAINING_FLOOR = "training alone (spread at ε = ∞)"
LEVEL_STYLES[TRAINING_FLOOR] = {"color": "tab:gray", "linestyle": ":"}


@dataclass(frozen=True)
class Series:
    """One plotted line: points with error bars (``yerr`` None where a point has one seed)."""

    label: str
    x: list[float]
    y: list[float]
    yerr: list[float | None] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # the configuration behind each point


@dataclass(frozen=True)
class Level:
    """A horizontal reference line."""

    label: str
    y: float


@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    levels: list[Level] = field(default_factory=list)
    curves: list[Series] = field(default_factory=list)  # drawn without markers (e.g. the label-DP bound)
    log_x: bool = False
    log_y: bool = False

    @property
    def file(self) -> str:
        return f"{self.name}.png"

    def to_dict(self) -> dict:
        return {**asdict(self), "file": self.file}


def _mean(entry: dict, metric: str) -> float | None:
    return as_float(entry["mean"].get(metric))


def _finite_epsilon(entry: dict) -> float | None:
    epsilon = as_float(entry["epsilon"])
    return None if epsilon is None or math.isinf(epsilon) else epsilon


def _at(entries: Sequence[dict], **fixed: object) -> list[dict]:
    return [e for e in entries if all(e[k] == v for k, v in fixed.items())]


def _series(label: str, entries: Sequence[dict], *, x_of, metric: str) -> Series | None:
    points = sorted(
        (x_of(e), _mean(e, metric), e["std"].get(metric), e["name"])
        for e in entries
        if x_of(e) is not None and _mean(e, metric) is not None
    )
    if not points:
        return None
    return Series(label, [p[0] for p in points], [p[1] for p in points], [p[2] for p in points], [p[3] for p in points])


def _pivot(entries: Sequence[dict], axis: str, reference: dict) -> list[dict]:
    """The configurations that vary ``axis`` around one point of the other axes (see the module doc)."""
    others = [a for a in AXES if a != axis]
    varied = [e for e in entries if e[axis] != reference[axis]]
    if not varied:
        return []
    point = Counter(tuple(e[a] for a in others) for e in varied).most_common(1)[0][0]
    return [e for e in entries if tuple(e[a] for a in others) == point]


def _epsilon_curves(entries: Sequence[dict], reference: dict) -> dict[str, list[dict]]:
    base = _at(entries, codec=reference["codec"], dp_noise_multiplier=reference["dp_noise_multiplier"],
               min_batch_size=reference["min_batch_size"])  # fmt: skip
    return {c: [e for e in _at(base, correction=c) if _finite_epsilon(e) is not None] for c in CORRECTIONS} | {
        "non_private": [e for e in base if e["epsilon"] == "inf"]
    }


def _metric_vs_epsilon(name: str, metric: str, label: str, curves: dict, backbone: dict) -> Plot:
    series = [s for c in CORRECTIONS if (s := _series(f"correction {c}", curves[c], x_of=_finite_epsilon, metric=metric))]
    levels = [Level("non-private (ε = ∞)", _mean(e, metric)) for e in curves["non_private"][:1]]
    levels.append(Level("frozen backbone", backbone[metric]))
    if metric == "calibration":
        levels.append(Level("perfectly calibrated", 1.0))
    log_y = metric == "calibration"  # a ratio: 2x over and 2x under are as far from 1
    ylabel = f"{label} (log scale)" if log_y else label
    return Plot(name, f"{label} vs label-DP ε", "label-DP ε of standard consent (log scale)", ylabel, series, levels,
                log_x=True, log_y=log_y)  # fmt: skip


def _attack_plot(entries: Sequence[dict], reference: dict) -> Plot | None:
    audited = [e for e in _at(entries, codec=reference["codec"], dp_noise_multiplier=reference["dp_noise_multiplier"],
                              min_batch_size=reference["min_batch_size"]) if e["audit"]]  # fmt: skip
    if not audited:
        return None
    correction = next(c for c in CORRECTIONS if _at(audited, correction=c))
    audited = _at(audited, correction=correction)
    series = [s for attack, label in ATTACK_LABELS.items()
              if (s := _series(label, audited, x_of=_finite_epsilon, metric=f"attack_{attack}_auc"))]  # fmt: skip
    epsilons = [_finite_epsilon(e) for e in audited]
    low, high = min(epsilons), max(epsilons)
    grid = [low * (high / low) ** (i / 49) for i in range(50)] if high > low else [low]
    bound = Series("label-DP bound e^ε/(1+e^ε)", grid, [label_dp_auc_bound(epsilon=e) for e in grid])
    return Plot(
        "attack_auc_vs_epsilon",
        f"Label-inference attacks on canaries vs ε (batch {reference['min_batch_size']}, correction {correction})",
        "label-DP ε of standard consent (log scale)",
        "attack AUC on canaries",
        series,
        [Level("chance", 0.5)],
        [bound],
        log_x=True,
    )


def _bytes_plot(entries: Sequence[dict], reference: dict) -> Plot | None:
    cells = _pivot(entries, "codec", reference)
    if not cells:  # no codec was varied
        return None
    series = [
        Series(f"codec {e['codec']}", [_mean(e, "bytes_up_per_round")], [_mean(e, "auc")], [e["std"].get("auc")], [e["name"]])
        for e in sorted(cells, key=lambda e: _mean(e, "bytes_up_per_round"))
    ]
    where = cells[0]
    return Plot(
        "bytes_vs_auc",
        f"Bytes up per round vs AUC, per codec (ε={where['epsilon']}, correction {where['correction']})",
        "bytes up per round, all clean rooms (log scale)",
        "AUC",
        series,
        log_x=True,
    )


def _dp_sgd_plot(entries: Sequence[dict], reference: dict, backbone: dict) -> Plot | None:
    cells = _pivot(entries, "dp_noise_multiplier", reference)
    noisy = [e for e in cells if as_float(e["dp_noise_multiplier"]) > 0]
    if not noisy:
        return None
    series = [_series("DP-SGD in the clean rooms", noisy, x_of=lambda e: _mean(e, "dp_sgd_epsilon"), metric="auc")]
    levels = [Level("no DP-SGD", _mean(e, "auc")) for e in cells if as_float(e["dp_noise_multiplier"]) == 0]
    levels.append(Level("frozen backbone", backbone["auc"]))
    where = noisy[0]
    return Plot(
        "dp_sgd_vs_auc",
        f"DP-SGD ε vs AUC (label-DP ε={where['epsilon']}, correction {where['correction']})",
        "DP-SGD ε at the run's δ (per clean room)",
        "AUC",
        [s for s in series if s],
        levels,
    )


def _spread_plot(planner: Sequence[dict]) -> Plot | None:
    if not planner:
        return None
    series = [Series("planner: relative SE of the de-biased rate", [p["epsilon"] for p in planner],
                     [p["planner_relative_se"] for p in planner])]  # fmt: skip
    for correction in CORRECTIONS[1:]:
        points = [(p["epsilon"], p["measured"][correction]) for p in planner if p["measured"].get(correction) is not None]
        if points:
            series.append(Series(f"measured: spread over seeds, {correction}", [x for x, _ in points], [y for _, y in points]))
    floor = planner[0]["training_floor"]
    return Plot(
        "calibration_spread_vs_epsilon",
        "Planner vs sweep: relative spread of calibration over seeds",
        "label-DP ε of standard consent (log scale)",
        "relative standard deviation of calibration",
        series,
        [] if floor is None else [Level(TRAINING_FLOOR, floor)],
        log_x=True,
    )


def build_plots(entries: Sequence[dict], *, reference: dict, backbone: dict, planner: Sequence[dict]) -> list[Plot]:
    """Every plot the results support, as data (a plot without data is left out)."""
    curves = _epsilon_curves(entries, reference)
    plots = [
        _metric_vs_epsilon("auc_vs_epsilon", "auc", "AUC", curves, backbone),
        _metric_vs_epsilon("calibration_vs_epsilon", "calibration", "calibration Σp/Σy", curves, backbone),
        _metric_vs_epsilon("ne_vs_epsilon", "ne", "normalized entropy", curves, backbone),
        _attack_plot(entries, reference),
        _bytes_plot(entries, reference),
        _dp_sgd_plot(entries, reference, backbone),
        _spread_plot(planner),
    ]
    return [p for p in plots if p is not None and p.series]


def draw(plot: Plot) -> Figure:
    """The figure of ``plot``: one errorbar line per series, dashed reference levels, plain curves."""
    figure, axes = plt.subplots(figsize=(7.0, 4.2), dpi=100)
    for series in plot.series:
        yerr = [0.0 if e is None else e for e in series.yerr] if series.yerr else None
        axes.errorbar(series.x, series.y, yerr=yerr, marker="o", capsize=3, label=series.label)
        if plot.name == "bytes_vs_auc":
            for x, y in zip(series.x, series.y):
                axes.annotate(series.label.removeprefix("codec "), (x, y), textcoords="offset points", xytext=(5, 5))
    for curve in plot.curves:
        axes.plot(curve.x, curve.y, color="black", linewidth=1.5, label=curve.label)
    for level in plot.levels:
        style = LEVEL_STYLES.get(level.label, {"color": "tab:purple", "linestyle": "--"})
        axes.axhline(level.y, linewidth=1.2, label=level.label, **style)
    if plot.log_x:
        axes.set_xscale("log")
        ticks = sorted({x for series in plot.series for x in series.x})
        if 0 < len(ticks) <= 12:  # the values swept, not powers of ten
            axes.set_xticks(ticks, [f"{t:,.0f}" if t >= 100 else f"{t:.3g}" for t in ticks])
            axes.minorticks_off()
    if plot.log_y:
        axes.set_yscale("log")
    axes.set_title(plot.title, fontsize=10)
    axes.set_xlabel(plot.xlabel)
    axes.set_ylabel(plot.ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
