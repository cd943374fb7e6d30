"""Tests of pcvr.models.cvr: the backbone, its gated LoRA adapters and their wire vectors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pcvr.data.synth import WorldConfig, world_spec
from pcvr.models.cvr import (
    CVRNet,
    GatedLoRALinear,
    ModelConfig,
    ModelShape,
    adapter_grad_vector,
    adapter_parameters,
    attach_adapters,
    get_adapter_vector,
    load_backbone,
    parameter_counts,
    save_backbone,
    set_adapter_vector,
)
from pcvr.models.features import EncodedFeatures
from support import TINY, make_backbone

def random_features(n: int, *, seed: int, config: ModelConfig = TINY) -> EncodedFeatures:
    generator = torch.Generator().manual_seed(seed)
    categorical = torch.stack([torch.randint(0, b, (n,), generator=generator) for b in config.buckets], dim=1)
    dense = torch.randn(n, config.num_dense, generator=generator)
    return EncodedFeatures(categorical, dense)


def adapter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# --- attach_adapters -------------------------------------------------------------------------


def test_adapted_model_starts_bit_identical_to_backbone() -> None:
    backbone = make_backbone()
    adapted = attach_adapters(backbone, seed=3)
    features = random_features(64, seed=1)
    with torch.no_grad():
        expected = backbone(features)
        got = adapted(features)
    assert got.shape == (64,)
    assert torch.equal(got, expected)


def test_perturbed_lora_b_changes_logits_and_zero_gate_restores_backbone() -> None:
    backbone = make_backbone()
    adapted = attach_adapters(backbone, seed=3)
    features = random_features(64, seed=1)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in adapted.modules():
            if isinstance(module, GatedLoRALinear):
                module.lora_b.copy_(0.1 * torch.randn(module.lora_b.shape, generator=generator))
        changed = adapted(features)
        assert not torch.allclose(changed, backbone(features), atol=1e-4)
        for module in adapted.modules():
            if isinstance(module, GatedLoRALinear):
                module.gate.zero_()
        assert torch.allclose(adapted(features), backbone(features), rtol=0, atol=1e-6)


def test_every_linear_layer_gets_an_adapter_and_only_adapters_train() -> None:
    backbone = make_backbone()
    adapted = attach_adapters(backbone)
    wrapped = [m for m in adapted.modules() if isinstance(m, GatedLoRALinear)]
    assert len(wrapped) == TINY.cross_layers + len(TINY.mlp_dims) + 1
    bare = [
        m for m in adapted.modules()
        if isinstance(m, torch.nn.Linear) and not any(m is w.base for w in wrapped)
    ]
    assert bare == []
    trainable = set(adapter_names(adapted))
    for name, parameter in adapted.named_parameters():
        is_adapter = name.rsplit(".", 1)[-1] in {"lora_a", "lora_b", "gate", "bias_offset"}
        assert parameter.requires_grad is is_adapter, name
    assert trainable  # there is something to train
    # the caller's backbone is not modified in place
    assert all(p.requires_grad for p in backbone.parameters())
    assert not any(isinstance(m, GatedLoRALinear) for m in backbone.modules())


def test_wire_order_of_adapter_parameters_is_pinned() -> None:
    adapted = attach_adapters(make_backbone())
    expected = []
    for layer in ("cross.0.linear", "cross.1.linear", "mlp.0", "mlp.2"):
        expected += [f"{layer}.lora_a", f"{layer}.lora_b", f"{layer}.gate"]
    expected += ["head.lora_a", "head.lora_b", "head.gate", "head.bias_offset"]
    assert adapter_names(adapted) == expected
    named = dict(adapted.named_parameters())
    assert [id(p) for p in adapter_parameters(adapted)] == [id(named[n]) for n in expected]


def test_backbone_frozen_and_unchanged_after_an_adapter_training_step() -> None:
    backbone = make_backbone()
    adapted = attach_adapters(backbone, seed=1)
    frozen_before = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    original_before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    adapters_before = get_adapter_vector(adapted).clone()

    features = random_features(128, seed=2)
    labels = (torch.rand(128, generator=torch.Generator().manual_seed(3)) < 0.3).float()
    optimizer = torch.optim.SGD(adapter_parameters(adapted), lr=0.5)
    for _ in range(2):  # the second step has a nonzero gradient into lora_a too
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(adapted(features), labels)
        loss.backward()
        optimizer.step()

    assert not torch.equal(get_adapter_vector(adapted), adapters_before)
    for name, parameter in adapted.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
            assert torch.equal(parameter, frozen_before[name]), name
    assert len(frozen_before) == len(original_before)
    for name, parameter in backbone.named_parameters():
        assert torch.equal(parameter, original_before[name]), name


def test_attach_adapters_seeded_and_leaves_global_rng_alone() -> None:
    backbone = make_backbone()
    state = torch.get_rng_state()
    first = get_adapter_vector(attach_adapters(backbone, seed=5))
    assert torch.equal(torch.get_rng_state(), state)
    again = get_adapter_vector(attach_adapters(backbone, seed=5))
    other = get_adapter_vector(attach_adapters(backbone, seed=6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_default_config_adapters_are_at_most_3_percent_of_backbone() -> None:
    features = world_spec(Path("world"), WorldConfig(), advertiser=0).features  # the default synthetic world
    config = ModelConfig(buckets=tuple(c.buckets for c in features.categorical), num_dense=len(features.dense))
    backbone = make_backbone(config)
    counts = parameter_counts(attach_adapters(backbone))
    assert counts["backbone"] == sum(p.numel() for p in backbone.parameters())
    # (in + out) * rank + 1 gate per linear layer, plus the head's bias offset
    d = config.input_dim
    pairs = [(d, d)] * config.cross_layers + list(zip([d, *config.mlp_dims], [*config.mlp_dims, 1]))
    expected_adapters = sum((i + o) * config.lora_rank + 1 for i, o in pairs) + 1
    assert counts["adapters"] == expected_adapters
    assert counts["adapters"] / counts["backbone"] <= 0.03


def test_parameter_counts_of_a_loaded_backbone_has_no_adapters(tmp_path) -> None:
    backbone = make_backbone()
    save_backbone(backbone, tmp_path)
    counts = parameter_counts(load_backbone(tmp_path))
    assert counts == {"backbone": sum(p.numel() for p in backbone.parameters()), "adapters": 0}


# --- adapter vectors -------------------------------------------------------------------------


def test_adapter_vector_round_trip() -> None:
    adapted = attach_adapters(make_backbone(), seed=2)
    size = parameter_counts(adapted)["adapters"]
    vector = get_adapter_vector(adapted)
    assert vector.shape == (size,) and vector.dtype == torch.float32
    new = torch.randn(size, generator=torch.Generator().manual_seed(0))
    set_adapter_vector(adapted, new)
    assert torch.equal(get_adapter_vector(adapted), new)
    # the vector lands parameter by parameter in wire order
    offset = 0
    for parameter in adapter_parameters(adapted):
        assert torch.equal(parameter.detach().reshape(-1), new[offset : offset + parameter.numel()])
        offset += parameter.numel()
    # set copies: changing the source afterwards does not alias into the model
    new.zero_()
    assert not torch.equal(get_adapter_vector(adapted), new)


@pytest.mark.parametrize("shape", [(1,), (-1,), (2, -1)], ids=["too-long", "too-short", "2-d"])
def test_set_adapter_vector_wrong_shape_raises_and_changes_nothing(shape: tuple[int, ...]) -> None:
    adapted = attach_adapters(make_backbone(), seed=2)
    size = parameter_counts(adapted)["adapters"]
    before = get_adapter_vector(adapted).clone()
    if shape == (1,):
        bad = torch.ones(size + 1)
    elif shape == (-1,):
        bad = torch.ones(size - 1)
    else:
        bad = torch.ones(size * 2).reshape(2, size)
    with pytest.raises(ValueError, match="adapter vector"):
        set_adapter_vector(adapted, bad)
    assert torch.equal(get_adapter_vector(adapted), before)


def test_adapter_grad_vector_follows_adapter_parameters_order() -> None:
    adapted = attach_adapters(make_backbone())
    params = adapter_parameters(adapted)
    for k, parameter in enumerate(params):
        parameter.grad = torch.full_like(parameter, float(k + 1))
    params[2].grad = None  # absent grads read as zeros
    expected = torch.cat(
        [torch.full((p.numel(),), 0.0 if k == 2 else float(k + 1)) for k, p in enumerate(params)]
    )
    got = adapter_grad_vector(adapted)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_adapter_grad_vector_matches_autograd_in_wire_order() -> None:
    adapted = attach_adapters(make_backbone(), seed=4)
    set_adapter_vector(adapted, 0.1 * torch.randn(parameter_counts(adapted)["adapters"], generator=torch.Generator().manual_seed(1)))
    loss = adapted(random_features(16, seed=9)).sum()
    grads = torch.autograd.grad(loss, adapter_parameters(adapted))
    loss = adapted(random_features(16, seed=9)).sum()
    loss.backward()
    assert torch.allclose(adapter_grad_vector(adapted), torch.cat([g.reshape(-1) for g in grads]))


# --- save / load -----------------------------------------------------------------------------


def test_save_and_load_backbone_round_trip(tmp_path) -> None:
    backbone = make_backbone(seed=11)
    directory = tmp_path / "nested" / "backbone"
    save_backbone(backbone, directory)
    assert (directory / "config.json").is_file() and (directory / "backbone.pt").is_file()
    saved = json.loads((directory / "config.json").read_text())
    assert ModelConfig.from_dict(saved) == TINY
    assert saved == json.loads(json.dumps(dataclasses.asdict(TINY)))

    loaded = load_backbone(directory)
    assert loaded.config == TINY
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    original = backbone.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    features = random_features(32, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(features), backbone(features))
    # adapters on the loaded backbone start equal to it, too
    with torch.no_grad():
        assert torch.equal(attach_adapters(loaded)(features), backbone(features))


def test_config_for_an_encoding_takes_its_columns_and_the_shape() -> None:
    from pcvr.data.encoding import FeatureEncoding
    from pcvr.data.spec import CategoricalColumn, CategoricalMissing, DenseColumn

    encoding = FeatureEncoding(
        categorical=(CategoricalColumn("a", 10, CategoricalMissing.BUCKET), CategoricalColumn("b", 5, CategoricalMissing.ERROR)),
        dense=(DenseColumn("x"),),
        means=(0.0,),
        stds=(1.0,),
        spec_digest="d",
    )
    config = ModelConfig.for_encoding(encoding, ModelShape(embedding_dim=3))
    assert config.buckets == (11, 5)  # a missing-value bucket of its own for "a"
    assert config.num_dense == 1 and config.embedding_dim == 3 and config.shape == ModelShape(embedding_dim=3)


def test_model_config_takes_any_number_of_columns_and_validates() -> None:
    for buckets, num_dense in (((10, 10), 0), ((), 3), ((7,) * 20, 40)):
        model = CVRNet(ModelConfig(buckets=buckets, num_dense=num_dense, embedding_dim=4, mlp_dims=(8,)))
        features = EncodedFeatures(torch.zeros(5, len(buckets), dtype=torch.int64), torch.zeros(5, num_dense))
        assert model(features).shape == (5,)
    with pytest.raises(ValueError, match="at least one"):
        ModelConfig(buckets=(), num_dense=0)
    with pytest.raises(ValueError):
        ModelConfig(buckets=(0, 1, 1, 1, 1, 1, 1, 1), num_dense=18)
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, lora_rank=0)
