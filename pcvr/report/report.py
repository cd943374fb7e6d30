"""``pcvr report``: sweep a grid, then write one folder a person reads.

    OUT/results.json    every row, the aggregates over seeds, the planner check, the
                        ledger summary, and the data behind each plot
    OUT/results.csv     the rows (one per cell and seed)
    OUT/*.png           the plots (:mod:`pcvr.report.plots`)
    OUT/index.html      one self-contained page (:mod:`pcvr.report.page`)

The report folder's working layout (secrets, cached cells) is :mod:`pcvr.report.cells`'.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pcvr.data.io import write_bytes_atomic
from pcvr.report.cells import ReportLayout
from pcvr.report.grid import ReportGrid, format_epsilon
from pcvr.report.page import render_page
from pcvr.report.planner import mixed_rate_se, plan
from pcvr.report.plots import build_plots, draw, png_bytes
from pcvr.report.results import aggregate, as_float, write_results
from pcvr.report.runner import SweepOutcome, run_cells

__all__ = ["make_report", "write_report", "planner_check", "parse_rows_by_epsilon"]


def parse_rows_by_epsilon(text: str) -> list[tuple[int, float]]:
    """"3:45798;1:5808" → [(45798, 3.0), (5808, 1.0)] (the planner's groups)."""
    return [(int(rows), float(eps)) for eps, rows in (part.split(":") for part in text.split(";") if part)]


def _relative_spread(entry: dict | None) -> float | None:
    if entry is None or entry["std"].get("calibration") is None:
        return None
    return entry["std"]["calibration"] / as_float(entry["mean"]["calibration"])


def planner_check(entries: Sequence[dict], rows: Sequence[dict], *, reference: dict, reference_config: dict) -> list[dict]:
    """For each ε of the ε curve: the planner's figures on the cells' own training rows beside
    the relative spread of calibration the sweep measured over seeds.

    The runs of one configuration differ by their randomized-response draws (and batch
    order) on the same rows, so the planner figure to compare is the de-biased rate's
    relative SE over fixed rows (``sampling=False``); the spread at ε = ∞ is what
    training alone contributes.
    """
    at_reference = [
        e for e in entries
        if e["codec"] == reference_config["codec"] and e["dp_noise_multiplier"] == reference_config["dp_noise_multiplier"]
        and e["min_batch_size"] == reference_config["min_batch_size"]
    ]  # fmt: skip
    base_rate = reference["train_positive_rate"]
    floor = _relative_spread(next((e for e in at_reference if e["epsilon"] == "inf"), None))
    section = []
    for epsilon in sorted({as_float(e["epsilon"]) for e in at_reference if e["epsilon"] != "inf"}):
        by_correction = {e["correction"]: e for e in at_reference if as_float(e["epsilon"]) == epsilon}
        names = {e["name"] for e in by_correction.values()}
        counts = [parse_rows_by_epsilon(r["train_rows_by_epsilon"]) for r in rows if r["name"] in names]
        merged: dict[float, list[int]] = {}
        for groups in counts:
            for n, eps in groups:
                merged.setdefault(eps, []).append(n)
        groups = [(round(sum(ns) / len(ns)), eps) for eps, ns in merged.items()]
        total = sum(n for n, _ in groups)
        (row,) = plan(base_rate=base_rate, rows=total, epsilons=[epsilon])
        section.append(
            {
                "epsilon": epsilon,
                "train_rows": total,
                "rows_by_epsilon": {format_epsilon(eps): n for n, eps in groups},
                "base_rate": base_rate,
                "flip_share": row.flip_share,
                "planner_relative_se": mixed_rate_se(base_rate=base_rate, groups=groups, sampling=False) / base_rate,
                "planner_relative_se_with_sampling": mixed_rate_se(base_rate=base_rate, groups=groups) / base_rate,
                "rows_for_3_percent": row.rows_needed,
                "measured": {c: _relative_spread(by_correction.get(c)) for c in ("forward", "backward")},
                "seeds": max(e["seeds"] for e in by_correction.values()),
                "training_floor": floor,
            }
        )
    return section


def ledger_summary(layout: ReportLayout, rows: Sequence[dict]) -> dict:
    """What was spent: label-DP ε per consent level and records per level for each ε run,
    DP-SGD (ε, δ) per noise multiplier, and the private evaluation's cost (none)."""
    by_epsilon: dict[str, dict] = {}
    for row in rows:
        key = format_epsilon(as_float(row["epsilon"]))
        if key in by_epsilon:
            continue
        ledger = json.loads((layout.artifacts(row["cell"]) / "privacy_ledger.json").read_text(encoding="utf-8"))
        levels: dict[str, dict] = {}
        for room in ledger["clean_rooms"].values():
            for level, entry in room["label_dp"]["levels"].items():
                summary = levels.setdefault(level, {"epsilon": entry["epsilon"], "excluded": entry["excluded"], "records": 0})
                summary["records"] += entry["records"]
        evaluation = next(iter(ledger["clean_rooms"].values())).get("evaluation", {})
        by_epsilon[key] = {"levels": levels, "clean_rooms": len(ledger["clean_rooms"]), "evaluation_epsilon": evaluation.get("label_dp_epsilon_spent")}
    dp_sgd = {}
    for row in rows:
        if row["dp_sgd_epsilon"] is not None:
            dp_sgd.setdefault(f"{row['dp_noise_multiplier']:g}", []).append(as_float(row["dp_sgd_epsilon"]))
    return {
        "label_dp": by_epsilon,
        "dp_sgd": {sigma: {"epsilon_max": max(values), "delta": next(r["dp_sgd_delta"] for r in rows if r["dp_sgd_epsilon"] is not None)}
                   for sigma, values in dp_sgd.items()},  # fmt: skip
        "private_evaluation_epsilon": 0.0,
    }


def _reference_config(grid: ReportGrid) -> dict:
    return {
        "correction": grid.reference("correction").value,
        "codec": str(grid.reference("codec")),
        "dp_noise_multiplier": float(grid.reference("dp_noise_multiplier")),
        "min_batch_size": int(grid.reference("min_batch_size")),
    }


def write_report(grid: ReportGrid, outcome: SweepOutcome, *, out: Path) -> dict:
    """Aggregate ``outcome``'s rows and write results.json/csv, the PNGs and index.html."""
    layout = ReportLayout(out)
    entries = aggregate(outcome.rows)
    reference_config = _reference_config(grid)
    planner = planner_check(entries, outcome.rows, reference=outcome.reference, reference_config=reference_config)
    plots = build_plots(entries, reference=reference_config, backbone=outcome.reference["backbone"], planner=planner)
    images = {}
    for plot in plots:
        images[plot.file] = png_bytes(draw(plot))
        write_bytes_atomic(out / plot.file, images[plot.file])
    document = {
        "report": "privacy-accuracy trade-off",
        "grid": grid.name,
        "seeds": grid.seeds,
        "world": (
            {"rows": grid.world.rows, "clean_rooms": grid.world.advertisers, "data": "user", "data_digest": grid.data_digest}
            if grid.data_digest
            else {"rows": grid.world.rows, "clean_rooms": grid.world.advertisers, "base_rate": grid.world.base_rate, "data": "synthetic"}
        ),
        "rounds": grid.spec(work_dir=out).num_rounds,
        "reference_config": reference_config,
        "reference": outcome.reference,
        "rows": outcome.rows,
        "aggregates": entries,
        "control": outcome.control,
        "audit_confidence": grid.audit.confidence,
        "planner": planner,
        "ledger": ledger_summary(layout, outcome.rows),
        "plots": {plot.name: plot.to_dict() for plot in plots},
        "cells_run": len(outcome.ran),
        "cells_cached": len(outcome.rows) + (outcome.control is not None) - len(outcome.ran),
        "wall_s": outcome.wall_s,
    }
    write_results(out, document)
    write_bytes_atomic(out / "index.html", render_page(document, images).encode("utf-8"))
    return document


def make_report(grid: ReportGrid, *, out: Path, jobs: int, show_progress: bool = True) -> dict:
    """Run the grid's missing cells, then write the folder; returns results.json's document."""
    return write_report(grid, run_cells(grid, out=out, jobs=jobs, show_progress=show_progress), out=out)

