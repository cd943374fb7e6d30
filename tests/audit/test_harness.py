"""The audit end to end: plant canaries, run the protocol in Flower's simulation engine, attack the
recorded payloads, score. One small world backs every test (about a minute on 2 cores)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import torch

from pcvr.audit.harness import AuditSetting, control_setting, format_audit, run_audit
from pcvr.audit.recompute import logit_jacobian, loss_slopes
from pcvr.audit.metrics import label_dp_auc_bound
from pcvr.cli import main
from pcvr.data.synth import WorldConfig
from pcvr.models.cvr import CVRNet, ModelConfig, ModelShape, adapter_grad_vector, attach_adapters
from pcvr.models.features import EncodedFeatures
from pcvr.protocols.codecs import Codec
from pcvr.protocols.label_dp import Correction
from pcvr.simulate import SimulationSpec

MODEL = ModelShape(embedding_dim=8, mlp_dims=(32, 16))


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> SimulationSpec:
    work_dir = tmp_path_factory.mktemp("audit") / "work"
    for k in range(3):  # fixed secrets: the same noisy labels, hence the same figures, on every run
        for name in ("join", "rr"):
            path = work_dir / "secrets" / f"advertiser_{k}" / f"{name}.key"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(hashlib.sha256(f"audit-test {k} {name}".encode()).digest())
    return SimulationSpec(
        work_dir=work_dir,
        world=WorldConfig(rows=30_000, pretrain_rows=40_000, holdout_rows=10_000, seed=5),  # as the CLI can say it
        model=MODEL,
        epsilon=3.0,
        batch_size=256,
        min_batch_size=256,
        learning_rate=0.03,
        seed=5,
    )


@pytest.fixture(scope="module")
def report(spec: SimulationSpec) -> dict:
    setting = AuditSetting(
        name="eps3", epsilon=3.0, batch_size=256, canaries_per_room=60, rows_per_room=256 * 6, codec=Codec.parse("none")
    )
    compressed = dataclasses.replace(setting, name="eps3-topk", codec=Codec.parse("topk:0.05+q4"))
    return run_audit(spec, settings=[setting, compressed], control=control_setting(canaries_per_room=30), seed=1)


def test_control_sees_every_label_when_nothing_protects_it(report: dict) -> None:
    control = report["control"]
    assert control["passed"] and control["canaries_scored"] == 90 and control["payloads"] == 90
    assert control["attacks"]["norm"]["auc"]["value"] >= 0.9
    assert control["attacks"]["count_exact"]["value"] == 1.0
    assert control["attacks"]["least_squares"]["auc"]["value"] == 1.0
    assert "see the labels" in control["verdict"]


def test_attacks_stay_within_the_label_dp_bound(report: dict) -> None:
    dense, compressed = report["settings"]
    bound = label_dp_auc_bound(epsilon=3.0)
    assert dense["auc_bound"] == pytest.approx(bound)
    assert dense["canaries_scored"] == 180  # one epoch: every canary in exactly one batch
    for name in ("norm", "direction", "positive_count", "least_squares"):
        figures = dense["attacks"][name]
        assert figures["within_bound"] is (figures["auc_lower_limit"] <= bound and figures["epsilon_lower_bound"] <= 3.0)
        assert figures["auc_lower_limit"] <= figures["auc"]["value"], name
        assert figures["auc_lower_limit"] <= bound, name
        assert figures["epsilon_lower_bound"] <= 3.0, name
    assert dense["passed"] and compressed["passed"] and report["passed"]


def test_least_squares_recovers_the_noisy_labels_when_the_batch_is_smaller_than_the_adapters(report: dict) -> None:
    """Batch aggregation alone is weak: the inversion reads every noisy label, so it sits at the RR bound."""
    dense, compressed = report["settings"]
    ls = dense["attacks"]["least_squares"]["auc"]
    assert ls["value"] > 0.85 and ls["high"] >= 0.9
    # compression with top-k drops most of the gradient: the inversion falls towards chance
    assert compressed["attacks"]["least_squares"]["auc"]["value"] < ls["value"] - 0.15


def test_a_blind_audit_says_it_is_broken(spec: SimulationSpec) -> None:
    """Control: if the attacks cannot see labels even unprotected, the report must fail and say so."""
    # batch 1 as in the real control, but every gradient drowned in DP-SGD noise (σ = 50)
    blind = dataclasses.replace(control_setting(canaries_per_room=20), dp_noise_multiplier=50.0)
    report = run_audit(spec, settings=[], control=blind, seed=2)
    assert report["passed"] is False and report["control"]["passed"] is False
    assert report["control"]["verdict"].startswith("AUDIT BROKEN")
    assert "AUDIT BROKEN" in format_audit(report)


def test_report_is_one_json_line_from_the_cli(spec: SimulationSpec, report: dict, capsys) -> None:
    """The CLI path on the same work dir (its world and backbone are reused): a tiny audit."""
    status = main(
        [
            "audit", "--json", "--work-dir", str(spec.work_dir), "--rows", "30000", "--pretrain-rows", "40000",
            "--holdout-rows", "10000", "--seed", "5", "--min-batch-size", "256", "--batch-size", "256",
            "--canaries", "20", "--canaries-per-batch", "20", "--control-canaries", "10", "--codec", "none",
        ]
    )
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    parsed = json.loads(line)
    assert status == (0 if parsed["passed"] else 1)
    assert parsed["control"]["passed"] is True
    assert set(parsed["control"]["attacks"]) == {"norm", "direction", "positive_count", "least_squares", "count_exact"}
    assert json.loads((spec.work_dir / "audit.json").read_text()) == parsed


# --- what the attacker recomputes --------------------------------------------------------------------


def test_logit_jacobian_matches_per_example_autograd() -> None:
    torch.manual_seed(0)
    model = attach_adapters(CVRNet(ModelConfig(buckets=(50, 20, 10, 5, 7, 3, 5, 3), num_dense=18, embedding_dim=4, mlp_dims=(8, 4))), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # B ≠ 0 so every adapter parameter has a gradient
    features = EncodedFeatures(torch.randint(0, 3, (6, 8)), torch.randn(6, 18))
    logits, jacobian = logit_jacobian(model, features)
    for i in range(6):
        model.zero_grad()
        model(features.take(torch.tensor([i]))).sum().backward()
        np.testing.assert_allclose(jacobian[i], adapter_grad_vector(model).numpy(), rtol=1e-4, atol=1e-6)
    assert logits.shape == (6,)


def test_loss_slopes_pinned() -> None:
    logits = np.array([-3.0, 0.0, 2.0])
    slope_0, slope_1 = loss_slopes(logits, np.zeros(3), correction=Correction.NONE)
    sigma = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(slope_0, sigma, rtol=1e-12)
    np.testing.assert_allclose(slope_1, sigma - 1, rtol=1e-12)
    # forward correction with no noise is the plain loss
    np.testing.assert_allclose(loss_slopes(logits, np.zeros(3), correction=Correction.FORWARD)[1], sigma - 1, rtol=1e-9)
    # with noise the label moves the slope less (the loss trusts the label less)
    rho = np.full(3, 1 / (1 + math.e**1))
    f0, f1 = loss_slopes(logits, rho, correction=Correction.FORWARD)
    assert np.all(f0 - f1 < slope_0 - slope_1)
