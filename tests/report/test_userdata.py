"""``pcvr report --spec``: the report on a user's own files, end to end through ``pcvr report``.

Two advertisers' CSV click logs and conversions (tests/userdata.py). The report holds out a keyed
tenth of each advertiser's clicks with their true labels (opted-out users excluded) and trains on
the rest; a second run reuses every cell; a changed input file runs them again; a spec whose
feature columns differ is refused before anything is written.
"""

from __future__ import annotations

import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pcvr.cli import main
from pcvr.protocols.layout import SimulationDir
from pcvr.report.userdata import CLICK_ID, HOLDOUT_FRACTION, _held_out
from userdata import conversions, write_table, write_user_files

GRID = """
seeds = 1
[model]
embedding_dim = 8
mlp_dims = [16, 8]
[run]
num_rounds = 3
batch_size = 128
min_batch_size = 64
eval_every = 3
pretrain_epochs = 1
[audit]
canaries_per_room = 10
canaries_per_batch = 10
control_canaries = 10
[[sweep]]
epsilon = [3]
correction = ["forward"]
audit_corrections = ["forward"]
"""
ROWS = 1500


@pytest.fixture(scope="module")
def user_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("userdata")
    specs = [write_user_files(root / f"advertiser_{k}", rows=ROWS, seed=10 * k).source for k in range(2)]
    grid = root / "grid.toml"
    grid.write_text(GRID, encoding="utf-8")
    out = root / "report"
    argv = ["report", "--grid", str(grid), "--out", str(out), "--jobs", "1", "--no-progress"]
    argv += [arg for spec in specs for arg in ("--spec", str(spec))]
    assert main(argv) == 0
    return {"root": root, "specs": specs, "out": out, "argv": argv}


def _results(out):
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_the_report_runs_on_the_users_files_with_a_true_label_holdout_kept_out_of_training(user_report):
    out = user_report["out"]
    results = _results(out)
    (row,) = results["rows"]  # one cell: ε = 3, forward, one seed (these labels do not depend on the features)
    assert 0.0 <= row["auc"] <= 1.0 and row["private_auc"] is not None and row["rounds"] == 3
    assert row["audit_passed"] is True and results["control"]["audit_passed"] is True  # canaries on the users' rows
    page = (out / "index.html").read_text(encoding="utf-8")
    assert f"{results['reference']['holdout_rows']:,} of your clicks held out with their true labels" in page
    world = SimulationDir(out / "work" / "base").world
    summary = json.loads((world / "world.json").read_text(encoding="utf-8"))
    assert summary["config"]["advertisers"] == 2
    assert results["reference"]["holdout_rows"] == summary["user_data"]["holdout_rows"] == pq.read_metadata(world / "holdout.parquet").num_rows
    secret = (out / "secrets" / "holdout_split.key").read_bytes()
    kept = 0
    for k, spec in enumerate(user_report["specs"]):
        clicks = pacsv.read_csv(spec.parent / "clicks.csv").column("click").to_pylist()
        held = {c for c, out_ in zip(clicks, _held_out(clicks, secret=secret)) if out_}
        trains = pq.read_table(world / f"advertiser_{k}" / "features.parquet").column(CLICK_ID).to_pylist()
        assert set(trains) == set(clicks) - held  # the held-out clicks never reach a clean room
        kept += len(trains)
    assert summary["config"]["rows"] == kept
    held_total = 2 * ROWS - kept  # binomial around the fraction
    assert 0.5 * HOLDOUT_FRACTION * 2 * ROWS < held_total < 1.5 * HOLDOUT_FRACTION * 2 * ROWS
    # their labels, without the opted-out users' (a tenth of the conversions file)
    assert 0.75 * held_total < summary["user_data"]["holdout_rows"] < held_total


def test_a_second_run_reuses_every_cell_and_a_changed_file_runs_them_again(user_report):
    out, argv = user_report["out"], user_report["argv"]
    assert main(argv) == 0
    again = _results(out)
    cells = len(again["rows"]) + 1  # and the audit's control
    assert again["cells_run"] == 0 and again["cells_cached"] == cells
    before = json.loads((SimulationDir(out / "work" / "base").world / "world.json").read_text())["user_data"]["digest"]
    directory = user_report["specs"][1].parent  # the advertiser's conversions change: the labels differ
    clicks = pacsv.read_csv(directory / "clicks.csv").column("click").to_pylist()
    write_table(conversions(clicks, seed=99), directory / "conversions.csv")
    assert main(argv) == 0
    changed = _results(out)
    assert changed["cells_run"] == cells and changed["cells_cached"] == 0
    after = json.loads((SimulationDir(out / "work" / "base").world / "world.json").read_text())["user_data"]["digest"]
    assert after != before


def test_specs_whose_feature_columns_differ_are_refused_before_anything_is_written(user_report, tmp_path, capsys):
    first = user_report["specs"][0]
    other = write_user_files(tmp_path / "other", rows=200, seed=3).source
    other.write_text(other.read_text().replace('column = "ad"\n', 'column = "ad"\nbuckets = 7\n', 1))
    out = tmp_path / "report"
    assert main(["report", "--out", str(out), "--spec", str(first), "--spec", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(other) in err[0] and "[features] columns differ" in err[0]
    assert not out.exists()
