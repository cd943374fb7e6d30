"""Tests of pcvr.clean_room.dp_sgd: DP-SGD release (clip + noise via Opacus) and its accountant."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy import stats

from pcvr.clean_room.dp_sgd import (
    DPSGDConfig,
    PrivacyAccountant,
    noise_multiplier_for,
    poisson_batch,
)
from pcvr.clean_room.dp_release import private_batch_gradient
from pcvr.clean_room.task import batch_gradient
from pcvr.data.io import DataError
from pcvr.models.cvr import adapter_parameters, get_adapter_vector, parameter_counts
from pcvr.models.features import EncodedFeatures
from pcvr.protocols.label_dp import Correction, corrected_loss
from support import TINY as SUPPORT_TINY
from support import adapted_model as tiny_adapted_model
from support import clean_room_data

# lora_alpha ≠ lora_rank so the adapters' scale α/r = 2 is exercised by the grad sampler
TINY = dataclasses.replace(SUPPORT_TINY, lora_alpha=8.0)


def adapted_model(*, seed: int) -> torch.nn.Module:
    return tiny_adapted_model(TINY, seed=seed)


def release(model, data, index, *, clip_norm, noise_multiplier, seed=0, correction=Correction.FORWARD):
    return private_batch_gradient(
        model,
        data,
        index,
        correction=correction,
        min_batch_size=1,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        generator=torch.Generator().manual_seed(seed),
    )


def per_example_gradients(model, data, index, correction) -> np.ndarray:
    """Slow reference: one float64 autograd pass per example; rows are examples, columns wire order."""
    reference = copy.deepcopy(model).double()
    params = adapter_parameters(reference)
    rows = []
    for row in index.tolist():
        one = torch.tensor([row])
        features = EncodedFeatures(data.features.categorical[one], data.features.dense[one].double())
        loss = corrected_loss(
            reference(features), data.noisy_labels[one].double(), data.flip_probs[one].double(), correction=correction
        ).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).numpy())
    return np.stack(rows)


# --- private_batch_gradient -----------------------------------------------------------------------


@pytest.mark.parametrize("correction", list(Correction), ids=lambda c: c.value)
def test_without_noise_and_clipping_equals_the_plain_sum(correction: Correction) -> None:
    model = adapted_model(seed=1)
    data = clean_room_data(300, seed=2)
    index = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:96]
    plain = batch_gradient(model, data, index, correction=correction, min_batch_size=1)
    private = release(model, data, index, clip_norm=1e9, noise_multiplier=0.0, correction=correction)

    assert private.adapter_grad.dtype == np.float32
    assert private.adapter_grad.shape == plain.adapter_grad.shape == (parameter_counts(model)["adapters"],)
    assert private.num_examples == 96
    assert private.loss == pytest.approx(plain.loss, rel=1e-6)
    scale = np.abs(plain.adapter_grad).max()
    assert scale > 0
    assert np.abs(private.adapter_grad - plain.adapter_grad).max() <= 1e-5 * scale


def test_each_example_is_clipped_over_the_whole_adapter_vector() -> None:
    model = adapted_model(seed=4)
    data = clean_room_data(200, seed=5)
    index = torch.arange(0, 200, 5)  # 40 examples
    per_example = per_example_gradients(model, data, index, Correction.BACKWARD)
    norms = np.linalg.norm(per_example, axis=1)
    clip_norm = 2.0
    assert (norms > clip_norm).mean() > 0.5  # clipping is active for most rows
    assert (norms < clip_norm).any()  # ... and some pass unclipped
    expected = (per_example * np.minimum(1.0, clip_norm / norms)[:, None]).sum(axis=0)

    clipped = release(model, data, index, clip_norm=clip_norm, noise_multiplier=0.0, correction=Correction.BACKWARD)
    scale = np.abs(expected).max()
    assert np.abs(clipped.adapter_grad - expected).max() <= 1e-4 * scale

    # controls: without clipping, or clipping each parameter tensor separately, the answer differs
    unclipped = release(model, data, index, clip_norm=1e9, noise_multiplier=0.0, correction=Correction.BACKWARD)
    assert np.abs(unclipped.adapter_grad - per_example.sum(axis=0)).max() <= 1e-4 * np.abs(per_example.sum(0)).max()
    assert np.abs(unclipped.adapter_grad - expected).max() > 0.1 * scale
    sizes = [p.numel() for p in adapter_parameters(model)]
    per_tensor = np.concatenate(
        [
            (block * np.minimum(1.0, clip_norm / np.linalg.norm(block, axis=1))[:, None]).sum(axis=0)
            for block in np.split(per_example, np.cumsum(sizes)[:-1], axis=1)
        ]
    )
    assert np.abs(per_tensor - expected).max() > 0.1 * scale


def test_noise_is_gaussian_with_std_sigma_times_clip_norm() -> None:
    model = adapted_model(seed=6)
    data = clean_room_data(100, seed=7)
    index = torch.arange(0, 100, 4)
    sigma, clip_norm, repeats = 1.3, 0.4, 100
    clipped = release(model, data, index, clip_norm=clip_norm, noise_multiplier=0.0).adapter_grad.astype(np.float64)
    noise = np.stack(
        [
            release(model, data, index, clip_norm=clip_norm, noise_multiplier=sigma, seed=seed).adapter_grad - clipped
            for seed in range(repeats)
        ]
    )  # [repeats, P]
    std = sigma * clip_norm
    count = noise.size

    # pooled over all coordinates: (n−1)s²/σ² ~ χ²(n−1), two-sided at 1e-6; the mean at 5 standard errors
    statistic = (count - 1) * noise.var(ddof=1) / std**2
    assert stats.chi2.ppf(1e-6, count - 1) < statistic < stats.chi2.isf(1e-6, count - 1)
    assert abs(noise.mean()) < 5 * std / math.sqrt(count)
    # per coordinate, Bonferroni over P coordinates at a 1e-6 family-wise level
    per_coordinate = (repeats - 1) * noise.var(axis=0, ddof=1) / std**2
    level = 1e-6 / noise.shape[1]
    assert (per_coordinate > stats.chi2.ppf(level, repeats - 1)).all()
    assert (per_coordinate < stats.chi2.isf(level, repeats - 1)).all()
    # a std of σ alone (not σ·C) would be caught by the pooled test
    assert not statistic * clip_norm**2 > stats.chi2.ppf(1e-6, count - 1)


def test_same_generator_seed_same_release_and_the_model_is_left_clean() -> None:
    model = adapted_model(seed=8)
    data = clean_room_data(80, seed=9)
    index = torch.arange(10, 70)
    weights = get_adapter_vector(model).clone()
    rng_state = torch.get_rng_state()

    first = release(model, data, index, clip_norm=0.3, noise_multiplier=1.0, seed=11)
    second = release(model, data, index, clip_norm=0.3, noise_multiplier=1.0, seed=11)
    other = release(model, data, index, clip_norm=0.3, noise_multiplier=1.0, seed=12)
    assert np.array_equal(first.adapter_grad, second.adapter_grad)
    assert not np.array_equal(first.adapter_grad, other.adapter_grad)

    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.equal(get_adapter_vector(model), weights)
    assert not hasattr(model, "autograd_grad_sample_hooks")
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._backward_hooks, name
        assert "activations" not in module.__dict__ and "max_batch_len" not in module.__dict__, name
    for name, parameter in model.named_parameters():
        for attribute in ("grad_sample", "_forward_counter", "summed_grad", "_current_grad_sample"):
            assert not hasattr(parameter, attribute), (name, attribute)
        if not parameter.requires_grad:
            assert parameter.grad is None, name
    # the plain path still works on the same model afterwards, untouched by Opacus
    plain = batch_gradient(model, data, index, correction=Correction.FORWARD, min_batch_size=1)
    again = release(model, data, index, clip_norm=1e9, noise_multiplier=0.0)
    assert np.abs(plain.adapter_grad - again.adapter_grad).max() <= 1e-5 * np.abs(plain.adapter_grad).max()


def test_below_min_batch_size_nothing_is_computed_and_bad_arguments_raise() -> None:
    model = adapted_model(seed=10)
    data = clean_room_data(50, seed=11)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(1))
    kwargs = dict(correction=Correction.FORWARD, clip_norm=1.0, noise_multiplier=1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="min_batch_size=10"):
        private_batch_gradient(model, data, torch.arange(9), min_batch_size=10, **kwargs)
    with pytest.raises(ValueError, match="clip_norm"):
        private_batch_gradient(model, data, torch.arange(20), min_batch_size=10, **{**kwargs, "clip_norm": 0.0})
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_batch_gradient(model, data, torch.arange(20), min_batch_size=10, **{**kwargs, "noise_multiplier": -1.0})
    assert calls == []
    assert private_batch_gradient(model, data, torch.arange(10), min_batch_size=10, **kwargs).num_examples == 10


def test_an_empty_poisson_batch_releases_pure_noise() -> None:
    model = adapted_model(seed=12)
    data = clean_room_data(20, seed=13)
    empty = private_batch_gradient(
        model, data, torch.arange(0), correction=Correction.FORWARD, min_batch_size=0,
        clip_norm=2.0, noise_multiplier=1.5, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert empty.num_examples == 0
    assert np.std(empty.adapter_grad) == pytest.approx(3.0, rel=0.15)  # ~1200 draws of N(0, 3²)


# --- noise calibration ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")  # from get_noise_multiplier's search
def test_noise_multiplier_for_a_target_epsilon_meets_it_and_matches_opacus() -> None:
    config = DPSGDConfig(target_epsilon=2.0, delta=1e-6)
    sigma = noise_multiplier_for(config, sample_rate=0.01, steps=500)
    accountant = RDPAccountant()
    accountant.history = [(sigma, 0.01, 500)]
    epsilon = accountant.get_epsilon(delta=1e-6)
    assert 2.0 - 0.01 <= epsilon <= 2.0  # Opacus' binary search stops within 0.01 below the target
    assert sigma == pytest.approx(0.99365234375, rel=1e-9)  # pinned, opacus 1.6.0 get_noise_multiplier
    assert sigma == get_noise_multiplier(target_epsilon=2.0, target_delta=1e-6, sample_rate=0.01, steps=500)
    # more steps at the same budget need more noise
    assert noise_multiplier_for(config, sample_rate=0.01, steps=2000) > sigma


def test_noise_multiplier_for_a_fixed_or_disabled_config() -> None:
    assert noise_multiplier_for(DPSGDConfig(noise_multiplier=0.7), sample_rate=0.5, steps=3) == 0.7
    assert noise_multiplier_for(DPSGDConfig(), sample_rate=0.5, steps=3) == 0.0
    assert not DPSGDConfig().enabled and not DPSGDConfig(noise_multiplier=0.0).enabled
    assert DPSGDConfig(noise_multiplier=0.1).enabled and DPSGDConfig(target_epsilon=8.0).enabled
    with pytest.raises(ValueError, match="sample_rate"):
        noise_multiplier_for(DPSGDConfig(noise_multiplier=1.0), sample_rate=0.0, steps=3)
    with pytest.raises(ValueError, match="steps"):
        noise_multiplier_for(DPSGDConfig(noise_multiplier=1.0), sample_rate=0.5, steps=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"noise_multiplier": 1.0, "target_epsilon": 1.0}, "not both"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": math.nan}, "target_epsilon"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 0.0}, "delta"),
    ],
)
def test_config_rejects_bad_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DPSGDConfig(**fields)


# --- PrivacyAccountant --------------------------------------------------------------------------------


def test_accountant_matches_opacus_stepped_the_same_way(tmp_path) -> None:
    steps = [(1.1, 0.02)] * 30 + [(0.9, 0.02)] * 5 + [(1.1, 0.02)] * 10
    ours = PrivacyAccountant(tmp_path / "ledger.json", run_key="run-a")
    reference = RDPAccountant()
    assert ours.epsilon(delta=1e-6) == 0.0 and ours.steps == 0
    for sigma, rate in steps:
        ours.record_step(noise_multiplier=sigma, sample_rate=rate)
        reference.step(noise_multiplier=sigma, sample_rate=rate)
    assert ours.history == reference.history == [(1.1, 0.02, 30), (0.9, 0.02, 5), (1.1, 0.02, 10)]
    assert ours.steps == 45
    assert ours.epsilon(delta=1e-6) == reference.get_epsilon(delta=1e-6)
    assert 0 < ours.epsilon(delta=1e-6) < ours.epsilon(delta=1e-9)
    assert ours.summary(delta=1e-6) == {
        "noise_multiplier": 1.1,
        "sample_rate": 0.02,
        "steps": 45,
        "epsilon": reference.get_epsilon(delta=1e-6),
        "delta": 1e-6,
        "total_epsilon": reference.get_epsilon(delta=1e-6),
        "accountant": "rdp",
    }


def test_accountant_pinned_against_the_closed_form_without_subsampling(tmp_path) -> None:
    # q = 1: each step is the Gaussian mechanism, RDP α/(2σ²) (Mironov 2017); converted to (ε, δ) by
    # Balle et al. 2020, Thm 21: ε = min_α RDP + log((α−1)/α) − (log δ + log α)/(α−1).
    ours = PrivacyAccountant(tmp_path / "ledger.json", run_key="q1")
    for _ in range(10):
        ours.record_step(noise_multiplier=4.0, sample_rate=1.0)
    closed_form = min(
        10 * a / (2 * 4.0**2) + math.log((a - 1) / a) - (math.log(1e-5) + math.log(a)) / (a - 1)
        for a in RDPAccountant.DEFAULT_ALPHAS
    )
    assert ours.epsilon(delta=1e-5) == pytest.approx(closed_form, rel=1e-12)
    assert ours.epsilon(delta=1e-5) == pytest.approx(3.6170997729833396, rel=1e-12)  # pinned
    # a release without noise has no bound
    ours.record_step(noise_multiplier=0.0, sample_rate=1.0)
    assert ours.epsilon(delta=1e-5) == math.inf


def test_accountant_continues_after_a_restart(tmp_path) -> None:
    path = tmp_path / "state" / "ledger.json"
    uninterrupted = PrivacyAccountant(tmp_path / "other.json", run_key="run")
    first = PrivacyAccountant(path, run_key="run")
    for _ in range(7):
        first.record_step(noise_multiplier=1.2, sample_rate=0.05)
        uninterrupted.record_step(noise_multiplier=1.2, sample_rate=0.05)
    restarted = PrivacyAccountant(path, run_key="run")
    assert restarted.steps == 7
    for _ in range(5):
        restarted.record_step(noise_multiplier=1.2, sample_rate=0.05)
        uninterrupted.record_step(noise_multiplier=1.2, sample_rate=0.05)
    assert restarted.steps == 12
    assert restarted.epsilon(delta=1e-6) == uninterrupted.epsilon(delta=1e-6)
    assert json.loads(path.read_text()) == {"version": 1, "runs": {"run": [[1.2, 0.05, 12]]}}
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]  # no staging file left


def test_total_epsilon_composes_every_run_on_the_same_data(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    run_a = PrivacyAccountant(path, run_key="a")
    for _ in range(20):
        run_a.record_step(noise_multiplier=1.0, sample_rate=0.05)
    run_b = PrivacyAccountant(path, run_key="b")
    for _ in range(40):
        run_b.record_step(noise_multiplier=1.5, sample_rate=0.02)
    run_a = PrivacyAccountant(path, run_key="a")
    both = RDPAccountant()
    both.history = [(1.0, 0.05, 20), (1.5, 0.02, 40)]
    assert run_a.total_epsilon(delta=1e-6) == run_b.total_epsilon(delta=1e-6) == both.get_epsilon(delta=1e-6)
    assert run_b.total_epsilon(delta=1e-6) > max(run_a.epsilon(delta=1e-6), run_b.epsilon(delta=1e-6))
    assert run_a.steps == 20 and run_b.steps == 40


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"version": 2, "runs": {}}',
        "[1, 2]",
        '{"version": 1, "runs": []}',
        '{"version": 1, "runs": {"r": [[1.0, 0.1]]}}',
        '{"version": 1, "runs": {"r": [[-1.0, 0.1, 3]]}}',
        '{"version": 1, "runs": {"r": [[1.0, 1.5, 3]]}}',
        '{"version": 1, "runs": {"r": [[1.0, 0.1, 2.5]]}}',
        '{"version": 1, "runs": {"r": [[NaN, 0.1, 3]]}}',
    ],
)
def test_corrupt_accountant_file_is_rejected_naming_the_file(tmp_path, content: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(DataError, match="ledger.json"):
        PrivacyAccountant(path, run_key="r")


def test_rejected_step_leaves_the_file_unchanged(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    accountant = PrivacyAccountant(path, run_key="r")
    accountant.record_step(noise_multiplier=1.0, sample_rate=0.1)
    before = path.read_bytes()
    for bad in ({"noise_multiplier": -1.0, "sample_rate": 0.1}, {"noise_multiplier": 1.0, "sample_rate": 0.0}):
        with pytest.raises(ValueError):
            accountant.record_step(**bad)
    assert path.read_bytes() == before and accountant.steps == 1
    with pytest.raises(ValueError, match="run_key"):
        PrivacyAccountant(path, run_key="")


# --- poisson_batch ----------------------------------------------------------------------------------------


def test_poisson_batch_size_and_membership() -> None:
    num_rows, rate, draws = 20_000, 0.05, 40
    generator = torch.Generator().manual_seed(0)
    batches = [poisson_batch(num_rows, sample_rate=rate, generator=generator) for _ in range(draws)]
    for batch in batches:
        assert batch.dtype == torch.int64
        assert torch.equal(batch, torch.unique(batch))  # sorted and distinct
        assert batch.min() >= 0 and batch.max() < num_rows
    sizes = np.array([len(b) for b in batches])
    # mean of `draws` Binomial(N, q) sizes: standard error sqrt(N q (1−q) / draws) ≈ 4.9; allow 5 of them
    assert abs(sizes.mean() - rate * num_rows) < 5 * math.sqrt(num_rows * rate * (1 - rate) / draws)
    assert sizes.std() > 10  # the size varies (Poisson sampling), unlike a fixed-size batch
    # every region of the data is sampled at the same rate
    counts = np.bincount(torch.cat(batches).numpy() // 5000, minlength=4)
    expected = draws * rate * 5000
    assert (np.abs(counts - expected) < 5 * math.sqrt(expected)).all()


def test_poisson_batch_is_deterministic_per_generator() -> None:
    first = poisson_batch(1000, sample_rate=0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, poisson_batch(1000, sample_rate=0.1, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, poisson_batch(1000, sample_rate=0.1, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(poisson_batch(50, sample_rate=1.0, generator=torch.Generator()), torch.arange(50))
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_batch(10, sample_rate=1.5, generator=torch.Generator())


def _modules_after_import(statement: str) -> set[str]:
    import subprocess
    import sys

    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_flower_apps_do_not_import_opacus_until_a_noisy_round():
    # Deployment starts a fresh ClientApp process per message; Opacus costs seconds to import.
    loaded = _modules_after_import("import pcvr.clean_room.app, pcvr.platform.app")
    assert "opacus" not in loaded
    # Control: the release module does import it, so the check above can see an import.
    assert "opacus" in _modules_after_import("import pcvr.clean_room.dp_release")
