"""End to end: a small multi-party run in Flower's simulation engine.

One module-scoped run (about a minute on 2 cores) backs every assertion: the
world is synthesized, the backbone pretrained, labels randomized and handed
off, and four settings trained and evaluated on the holdout's true labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcvr.cli import main
from pcvr.data.synth import WorldConfig
from pcvr.models.cvr import ModelConfig
from pcvr.simulate import SimulationSpec, simulate


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationSpec, dict]:
    spec = SimulationSpec(
        work_dir=tmp_path_factory.mktemp("sim") / "work",
        world=WorldConfig(rows=90_000, users=5_000, pretrain_rows=90_000, holdout_rows=40_000, seed=3),
        model=ModelConfig(buckets=(5_000, 2_000, 100, 16, 64, 8, 16, 8), mlp_dims=(64, 32)),
        epsilon=3.0,
        num_rounds=40,
        batch_size=4096,
        min_batch_size=512,
        learning_rate=0.03,
        eval_every=20,
        seed=3,
    )
    return spec, simulate(spec)


def test_adapters_beat_the_frozen_backbone(small_run):
    _, summary = small_run
    results = summary["results"]
    assert results["non_private"]["auc"] > results["backbone"]["auc"] + 0.01
    assert results["eps=3,forward"]["auc"] > results["backbone"]["auc"] + 0.01


def test_correction_restores_calibration_that_randomized_response_breaks(small_run):
    results = small_run[1]["results"]
    assert 0.85 <= results["eps=3,forward"]["calibration"] <= 1.15
    assert results["eps=3,none"]["calibration"] > 2.0  # predicts the noisy rate, not the clean one
    assert results["eps=3,forward"]["ne"] < results["eps=3,none"]["ne"]


def test_private_auc_stays_close_to_non_private(small_run):
    results = small_run[1]["results"]
    assert results["eps=3,forward"]["auc"] >= 0.97 * results["non_private"]["auc"]


def test_every_round_crossed_the_wire_and_was_accepted(small_run):
    spec, summary = small_run
    for name in ("non_private", "eps=3,forward", "eps=3,none"):
        result = json.loads((spec.work_dir / "runs" / name / "result.json").read_text())
        assert result["rounds"] == spec.num_rounds
        assert result["rejected"] == 0
        assert all(r["clean_rooms"] == spec.world.advertisers for r in result["history"])
        assert all(r["examples"] == spec.world.advertisers * spec.batch_size for r in result["history"])
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0


def test_ledger_records_exclusions_and_epsilons(small_run):
    summary = small_run[1]
    for ledger in summary["ledger"]:
        assert ledger["levels"]["opt_out"]["excluded"] is True
        assert ledger["levels"]["opt_out"]["records"] > 0
        assert ledger["levels"]["standard"]["epsilon"] == 3.0
        assert ledger["levels"]["limited"]["epsilon"] == 1.0


def test_rerun_reuses_prepared_inputs_byte_for_byte(small_run):
    from pcvr.simulate import prepare

    spec, _ = small_run
    labels = spec.work_dir / "clean_room_0" / "eps=3" / "labels.parquet"
    before = labels.read_bytes()
    prepare(spec)
    assert labels.read_bytes() == before


def test_cli_rejects_a_work_dir_holding_another_world(small_run, capsys):
    spec, _ = small_run
    code = main(["prepare", "--work-dir", str(spec.work_dir), "--rows", "1000"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pcvr: error:") and "world generated with other settings" in err and "\n" not in err
