"""End to end: a small multi-party run in Flower's simulation engine.

One module-scoped run (about a minute on 2 cores) backs every assertion: the
world is synthesized, the backbone pretrained, labels randomized and handed
off, and four settings trained and evaluated on the holdout's true labels.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from pcvr.cli import main
from pcvr.data.synth import WorldConfig
from pcvr.models.cvr import ModelShape
from pcvr.parties import open_clean_room
from pcvr.protocols.layout import SimulationDir
from pcvr.simulate import SimulationSpec, simulate


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationSpec, dict]:
    work_dir = tmp_path_factory.mktemp("sim") / "work"
    for k in range(3):  # fixed secrets: the same noisy labels and held-out rows, so the same figures, on every run
        secrets = SimulationDir(work_dir).secrets(k)
        secrets.join.parent.mkdir(parents=True, exist_ok=True)
        room = SimulationDir(work_dir).clean_room(k)
        open_clean_room(room)
        room.holdout_key.unlink()
        for path in (secrets.join, secrets.rr, room.holdout_key):
            path.write_bytes(hashlib.sha256(f"simulate-test {k} {path.name}".encode()).digest())
    spec = SimulationSpec(
        work_dir=work_dir,
        world=WorldConfig(rows=90_000, users=5_000, pretrain_rows=90_000, holdout_rows=40_000, seed=3),
        model=ModelShape(mlp_dims=(64, 32)),
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


def test_private_auc_stays_within_one_percent_of_non_private(small_run):
    results = small_run[1]["results"]
    assert results["eps=3,forward"]["auc"] >= 0.99 * results["non_private"]["auc"]


def test_every_round_crossed_the_wire_and_was_accepted(small_run):
    spec, summary = small_run
    for name in ("non_private", "eps=3,forward", "eps=3,none"):
        result = json.loads((spec.layout.platform.run_dir(name) / "result.json").read_text())
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
    labels = spec.layout.handoff(0, "eps=3").labels
    before = labels.read_bytes()
    prepare(spec)
    assert labels.read_bytes() == before


def test_cli_rejects_a_work_dir_holding_another_world(small_run, capsys):
    spec, _ = small_run
    code = main(["prepare", "--work-dir", str(spec.work_dir), "--rows", "1000"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pcvr: error:") and "world generated with other settings" in err and "\n" not in err


def test_compressed_gradients_cross_the_wire_at_a_fraction_of_the_dense_size(small_run):
    """Default codec (8-bit stochastic quantization, error feedback) up; 8-bit deltas down after a dense first round."""
    spec, summary = small_run
    params = summary["parameters"]["adapters"]
    dense_reply = 4 * params  # the float32 gradient alone, before any framing
    result = json.loads((spec.layout.platform.run_dir("eps=3,forward") / "result.json").read_text())
    ups = [r["bytes_up"] / r["clean_rooms"] for r in result["history"]]
    downs = [r["bytes_down"] / spec.world.advertisers for r in result["history"]]
    assert max(ups) < dense_reply / 3
    assert downs[0] > dense_reply and max(downs[1:]) < dense_reply / 3
    assert summary["results"]["eps=3,forward"]["bytes_up_per_round"] == pytest.approx(sum(ups) * 3 / len(ups))


def test_each_run_writes_its_privacy_ledger(small_run):
    spec, _ = small_run
    ledger = json.loads((spec.layout.platform.run_dir("eps=3,forward") / "privacy_ledger.json").read_text())
    assert ledger["platform"]["min_batch_size"] == spec.min_batch_size
    assert ledger["platform"]["codec"] == str(spec.codec)
    rooms = ledger["clean_rooms"]
    assert sorted(entry["clean_room_id"] for entry in rooms.values()) == [0, 1, 2]
    for entry in rooms.values():
        assert entry["label_dp"]["levels"]["standard"]["epsilon"] == 3.0
        assert entry["label_dp"]["levels"]["opt_out"]["excluded"] is True
        assert entry["dp_sgd"] == {"enabled": False}
        assert entry["rounds_served"] == spec.num_rounds and entry["min_batch_size"] == spec.min_batch_size
        assert "source" not in entry["label_dp"]  # no advertiser-side paths leave


def test_dp_sgd_is_accounted_per_clean_room_across_runs(small_run):
    """Opacus DP-SGD in the clean rooms; the accountant's file outlives the run, so ε composes."""
    from pcvr.protocols.label_dp import Correction
    from pcvr.simulate import run_setting

    spec, _ = small_run
    ledgers = []
    for name in ("dp-a", "dp-b"):
        result = run_setting(
            spec, name=name, label_set="eps=3", correction=Correction.FORWARD, num_rounds=4, eval_every=4,
            dp_noise_multiplier=1.0, dp_clip_norm=0.5,
        )
        assert result["rejected"] == 0 and all(r["loss"] is None for r in result["history"])  # no exact loss leaves
        ledgers.append(json.loads((spec.layout.platform.run_dir(name) / "privacy_ledger.json").read_text()))
    for first, second in zip(*(sorted(l["clean_rooms"].values(), key=lambda e: e["clean_room_id"]) for l in ledgers)):
        assert first["dp_sgd"]["enabled"] and first["dp_sgd"]["steps"] == 4 and first["dp_sgd"]["noise_multiplier"] == 1.0
        assert 0 < first["dp_sgd"]["epsilon"] == pytest.approx(second["dp_sgd"]["epsilon"])  # same σ, q, steps
        assert second["dp_sgd"]["total_epsilon"] > second["dp_sgd"]["epsilon"]  # both runs used the same rows


def test_a_clean_room_with_fewer_rows_than_the_floor_fails_the_run_before_round_1(small_run):
    """Every room is short of a 60,000-row batch: no round is run, and each room is named with its reason."""
    from pcvr.protocols.label_dp import Correction
    from pcvr.simulate import run_setting

    spec, _ = small_run
    result = run_setting(
        spec, name="too-few-rows", label_set="eps=3", correction=Correction.FORWARD, num_rounds=2, eval_every=2,
        batch_size=60_000, min_batch_size=60_000,
    )
    assert result["rounds"] == 0 and result["steps"] == 0 and result["final"] is None
    reason = "pre-flight check failed: clean room refused: too_few_rows"
    assert sorted(line.split(":", 1)[0] for line in result["failures"] if reason in line) == [f"clean room {k}" for k in range(3)]
    assert {entry["served"] for entry in result["participation"].values()} == {0}


def test_a_clean_room_with_another_backbone_is_named_and_fails_the_run(small_run):
    import shutil

    import torch

    from pcvr.protocols.label_dp import Correction
    from pcvr.simulate import run_setting

    spec, _ = small_run
    weights = spec.layout.clean_room(1).backbone / "backbone.pt"
    shutil.copy(weights, weights.with_suffix(".good"))
    try:
        state = torch.load(weights, weights_only=True)
        name = next(key for key, value in state.items() if value.is_floating_point())
        state[name] = state[name] + 0.01
        torch.save(state, weights)
        result = run_setting(spec, name="other-backbone", label_set="eps=3", correction=Correction.FORWARD, num_rounds=2, eval_every=2)
    finally:
        shutil.move(weights.with_suffix(".good"), weights)
    assert result["failures"] == [
        "clean room 1: pre-flight check failed: clean room refused: backbone_mismatch: the clean room's backbone is not the platform's"
    ]
    assert result["participation"]["clean room 0"]["preflight"] == "passed"


def test_a_simulation_whose_clean_rooms_cannot_serve_exits_non_zero_naming_the_room(tmp_path, capsys):
    """The probe: `pcvr simulate --rows 3000 --rounds 2` (each clean room has ~950 rows, the floor is 1024)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "summary.json").write_text('{"stale": true}')
    code = main(["simulate", "--work-dir", str(work), "--rows", "3000", "--rounds", "2", "--eval-every", "1"])
    out, err = capsys.readouterr()
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.startswith("pcvr:")]
    assert line.startswith("pcvr: error: setting non_private: clean room ") and "too_few_rows" in line
    (row,) = [row for row in out.splitlines() if row.startswith("non_private ")]
    assert row.split()[1] == "FAILED" and "too_few_rows" in row
    summary = json.loads((work / "summary.json").read_text())
    assert "stale" not in summary and summary["failures"]


def test_private_evaluation_agrees_with_the_true_labels_of_the_same_rows_within_its_se(small_run):
    """What the platform learns without true labels, against what the true labels of those rows say."""
    spec, summary = small_run
    results = summary["results"]
    for name in ("eps=3,forward", "eps=3,none"):
        private, truth = results[name]["private"], results[name]["held_out_truth"]
        assert private["unavailable"] is None and private["rooms"] == spec.world.advertisers
        assert private["rows"] == truth["rows"] > 0.05 * spec.world.rows
        for metric in ("auc", "ne", "calibration"):
            estimate = private[metric]
            assert 0 < estimate["se"] and abs(estimate["value"] - truth[metric]) <= 3 * estimate["se"], (name, metric)
    assert results["eps=3,none"]["private"]["calibration"]["value"] > 2.0  # it sees the broken calibration too
    exact = results["non_private"]  # no noise: the estimate is the true-label metric, with no error
    for metric in ("auc", "ne", "calibration"):
        assert exact["private"][metric]["se"] == 0.0
        assert exact["private"][metric]["value"] == pytest.approx(exact["held_out_truth"][metric], rel=1e-5)


def test_the_run_result_and_ledgers_carry_the_private_evaluation(small_run):
    spec, _ = small_run
    run_dir = spec.layout.platform.run_dir("eps=3,forward")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["private"]["round"] == spec.num_rounds
    assert set(result["private"]["clean_rooms"].values()) == {"ok"}
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    assert ledger["private_evaluation"]["label_dp_epsilon_spent"] == 0.0
    for entry in ledger["clean_rooms"].values():
        assert entry["evaluation"]["releases"] == 1 and entry["evaluation"]["label_dp_epsilon_spent"] == 0.0
        assert entry["releases"]["in_run"] == spec.num_rounds  # evaluation is not a gradient release
