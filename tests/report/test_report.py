"""`pcvr report` end to end on a tiny grid: real federated runs, cached cells, files that agree."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib.image
import pytest

from pcvr.audit.harness import ATTACKS
from pcvr.cli import main
from pcvr.report.cells import ATTACK_NAMES, ReportLayout
from pcvr.report.grid import load_grid
from pcvr.report.plots import Plot, Series, Level, build_plots, draw
from pcvr.report.results import COLUMNS, aggregate, as_float, read_csv_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _csv_rows(out: Path) -> list[dict[str, str]]:
    return read_csv_rows((out / "results.csv").read_text(encoding="utf-8"))


def _as_json_value(text: str, like: object) -> object:
    """A CSV field read back with the JSON value's type."""
    if text == "":
        return None
    if isinstance(like, bool):
        return text == "True"
    if isinstance(like, (int, float)) and not isinstance(like, bool):
        return type(like)(float(text)) if isinstance(like, int) else float(text)
    return text


def test_every_cell_ran_once_for_real(tiny_report) -> None:
    out, results = tiny_report
    rows = results["rows"]
    assert len(rows) == 4 and {r["name"] for r in rows} == {"ε=3,forward,q8,σ=0,b=128", "ε=∞,none,q8,σ=0,b=128"}
    assert results["cells_run"] == 5  # 4 training cells and the audit's control
    for row in rows:
        assert row["rounds"] == 4 and row["rejected"] == 0
        assert 0.0 < row["auc"] < 1.0 and row["bytes_up_per_round"] > 0
        assert (out / "cells" / row["cell"] / "result.json").exists()
        assert not ReportLayout(out).work(row["cell"]).exists()  # the cell's work dir is gone once it is done
    private = [r for r in rows if r["epsilon"] == 3.0]
    assert all(r["audit"] and r["audit_bound"] == pytest.approx(math.exp(3) / (1 + math.exp(3))) for r in private)
    assert all(r["attack_least_squares_auc"] is not None for r in private)
    assert all(r["label_dp_epsilon_standard"] == 3.0 and r["label_dp_epsilon_opt_out"] == "excluded" for r in private)
    assert results["control"]["attack_norm_auc"] >= 0.9  # the control sees labels when nothing protects them


def test_seeds_draw_fresh_randomized_response(tiny_report) -> None:
    out, results = tiny_report
    secrets = [(out / "secrets" / f"seed_{s}" / "advertiser_0" / "rr.key").read_bytes() for s in (0, 1)]
    assert secrets[0] != secrets[1]
    by_seed = {r["seed"]: r for r in results["rows"] if r["epsilon"] == 3.0}
    assert by_seed[0]["calibration"] != by_seed[1]["calibration"]  # a real spread over seeds
    assert by_seed[0]["cell"] != by_seed[1]["cell"]


def test_csv_and_json_hold_the_same_rows(tiny_report) -> None:
    out, results = tiny_report
    csv_rows = _csv_rows(out)
    assert list(csv_rows[0]) == list(COLUMNS)
    assert len(csv_rows) == len(results["rows"])
    for from_csv, from_json in zip(csv_rows, results["rows"]):
        for column in COLUMNS:
            value = from_json[column]
            read = _as_json_value(from_csv[column], value)
            if isinstance(value, float):
                assert read == pytest.approx(value, rel=1e-12), column
            else:
                assert read == value, column


def test_plots_are_pngs_of_exactly_the_results(tiny_report) -> None:
    out, results = tiny_report
    assert set(results["plots"]) >= {"auc_vs_epsilon", "calibration_vs_epsilon", "ne_vs_epsilon", "attack_auc_vs_epsilon"}
    # the aggregates recomputed here from the CSV alone
    by_name: dict[str, list[dict]] = {}
    for row in _csv_rows(out):
        by_name.setdefault(row["name"], []).append(row)
    forward = by_name["ε=3,forward,q8,σ=0,b=128"]
    auc = results["plots"]["auc_vs_epsilon"]
    (series,) = [s for s in auc["series"] if s["label"] == "correction forward"]
    assert series["x"] == [3.0]
    assert series["y"][0] == pytest.approx(statistics.fmean(float(r["auc"]) for r in forward))
    assert series["yerr"][0] == pytest.approx(statistics.stdev(float(r["auc"]) for r in forward))
    levels = {level["label"]: level["y"] for level in auc["levels"]}
    assert levels["non-private (ε = ∞)"] == pytest.approx(statistics.fmean(float(r["auc"]) for r in by_name["ε=∞,none,q8,σ=0,b=128"]))
    assert levels["frozen backbone"] == results["reference"]["backbone"]["auc"]
    attack = results["plots"]["attack_auc_vs_epsilon"]
    (ls,) = [s for s in attack["series"] if s["label"] == "least-squares inversion"]
    assert ls["y"][0] == pytest.approx(statistics.fmean(float(r["attack_least_squares_auc"]) for r in forward))
    assert attack["curves"][0]["y"][0] == pytest.approx(math.exp(3) / (1 + math.exp(3)))
    for plot in results["plots"].values():
        data = (out / plot["file"]).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        height, width, _ = matplotlib.image.imread(out / plot["file"]).shape
        assert (width, height) == (700, 420)


def test_figures_draw_the_recorded_numbers(tiny_report) -> None:
    """The plots rebuilt from the CSV equal those in results.json, and each figure's lines carry them."""
    out, results = tiny_report
    rebuilt = build_plots(
        aggregate(results["rows"]), reference=results["reference_config"], backbone=results["reference"]["backbone"], planner=results["planner"]
    )
    assert {p.name: p.to_dict() for p in rebuilt} == results["plots"]
    for plot in rebuilt:
        figure = draw(plot)
        (axes,) = figure.axes
        lines = {line.get_label(): line for line in axes.get_lines()}
        lines |= {container.get_label(): container.lines[0] for container in axes.containers}  # errorbar's data line
        for series in plot.series + plot.curves:
            assert list(lines[series.label].get_xdata()) == pytest.approx(series.x)
            assert list(lines[series.label].get_ydata()) == pytest.approx(series.y)
        for level in plot.levels:
            assert list(lines[level.label].get_ydata()) == pytest.approx([level.y, level.y])
        assert axes.get_xlabel() == plot.xlabel and axes.get_ylabel() == plot.ylabel


def test_a_figure_with_other_numbers_is_told_apart() -> None:
    """Control for the check above: a figure drawn from other data does not match the record."""
    plot = Plot("p", "t", "x", "y", [Series("s", [1.0, 2.0], [0.5, 0.6], [None, None])], [Level("non-private (ε = ∞)", 0.7)])
    other = Plot("p", "t", "x", "y", [Series("s", [1.0, 2.0], [0.5, 0.61], [None, None])], [Level("non-private (ε = ∞)", 0.7)])
    (axes,) = draw(other).axes
    line = next(container.lines[0] for container in axes.containers if container.get_label() == "s")
    assert list(line.get_ydata()) != pytest.approx(plot.series[0].y)


def test_page_states_the_numbers_and_the_guarantee(tiny_report) -> None:
    out, results = tiny_report
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page  # self-contained
    assert page.count('src="data:image/png;base64,') == len(results["plots"])
    assert "Batch aggregation alone is not a guarantee" in page
    forward = [r["auc"] for r in results["rows"] if r["epsilon"] == 3.0]
    assert f"{statistics.fmean(forward):.4f} ± {statistics.stdev(forward):.4f} at ε=3" in page
    assert "Privacy ledger" in page and "excluded (never leaves the advertiser)" in page
    entry = results["planner"][0]
    assert entry["epsilon"] == 3.0 and f"{100 * entry['planner_relative_se']:.1f}%" in page


def test_rerun_reuses_every_cell_and_resumes_a_missing_one(tiny_report, tiny_grid_file, capsys) -> None:
    out, first = tiny_report
    layout = ReportLayout(out)
    stamps = {r["cell"]: layout.row(r["cell"]).stat().st_mtime_ns for r in first["rows"]}
    assert main(["report", "--grid", str(tiny_grid_file), "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert again["cells_run"] == 0 and again["rows"] == first["rows"]
    assert {c: layout.row(c).stat().st_mtime_ns for c in stamps} == stamps  # no cell re-ran
    assert "report:" in capsys.readouterr().out
    # an interrupted report: one cell's row is missing, so exactly that cell runs again
    missing = next(r["cell"] for r in first["rows"] if r["epsilon"] == "inf")
    layout.row(missing).unlink()
    assert main(["report", "--grid", str(tiny_grid_file), "--out", str(out), "--no-progress", "--jobs", "1"]) == 0
    resumed = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert resumed["cells_run"] == 1 and layout.row(missing).exists()
    assert {c: layout.row(c).stat().st_mtime_ns for c in stamps if c != missing} == {c: t for c, t in stamps.items() if c != missing}


def test_attack_names_match_the_audit() -> None:
    assert ATTACK_NAMES == ATTACKS


def test_shipped_grids_load_and_have_three_seeds() -> None:
    for name in ("default", "full"):
        grid = load_grid(name)
        cells = grid.cells()
        assert grid.seeds >= 3 and cells[-1].kind.value == "control"
        assert {c.correction.value for c in cells} == {"none", "forward", "backward"}
        assert any(math.isinf(c.epsilon) for c in cells)
        assert len({c.codec for c in cells}) >= 2 and any(c.dp_noise_multiplier > 0 for c in cells)
    assert len({c.min_batch_size for c in load_grid("full").cells() if c.kind.value == "train"}) >= 2
    assert as_float("inf") == math.inf


def test_planner_check_uses_the_cells_own_rows_and_the_seed_spread() -> None:
    from pcvr.report.planner import mixed_rate_se
    from pcvr.report.report import planner_check

    config = {"codec": "q8", "dp_noise_multiplier": 0.0, "min_batch_size": 512}

    def entry(epsilon, correction, calibrations):
        rows = [{"name": f"{epsilon},{correction}", "calibration": c, "train_rows_by_epsilon": "3:9000;1:1000"} for c in calibrations]
        return rows, {"name": f"{epsilon},{correction}", "epsilon": epsilon, "correction": correction, **config,
                      "seeds": len(calibrations), "mean": {"calibration": statistics.fmean(calibrations)},
                      "std": {"calibration": statistics.stdev(calibrations)}}  # fmt: skip

    forward_rows, forward = entry(3.0, "forward", [0.9, 1.0, 1.1])
    _, backward = entry(3.0, "backward", [0.8, 1.0, 1.2])
    _, clean = entry("inf", "none", [0.98, 1.0, 1.02])
    (check,) = planner_check([forward, backward, clean], forward_rows, reference={"train_positive_rate": 0.02}, reference_config=config)
    groups = [(9000, 3.0), (1000, 1.0)]
    assert check["train_rows"] == 10_000
    assert check["planner_relative_se"] == pytest.approx(mixed_rate_se(base_rate=0.02, groups=groups, sampling=False) / 0.02)
    assert check["planner_relative_se"] < check["planner_relative_se_with_sampling"]
    assert check["measured"]["forward"] == pytest.approx(0.1) and check["measured"]["backward"] == pytest.approx(0.2)
    assert check["training_floor"] == pytest.approx(0.02)
