"""Helpers shared by test modules: a tiny model and clean-room data, and a sender that lies.

Importable from any test module (``pythonpath = ["tests"]`` in ``pyproject.toml``).
"""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, RecordDict

from pcvr.clean_room.dataset import CleanRoomData
from pcvr.models.cvr import (
    CVRNet,
    ModelConfig,
    attach_adapters,
    get_adapter_vector,
    parameter_counts,
    set_adapter_vector,
)
from pcvr.models.features import EncodedFeatures
from pcvr.platform.training import AdapterTrainer
from pcvr.protocols import messages
from pcvr.protocols.messages import SECTION

TINY = ModelConfig(buckets=(97, 31, 11, 5, 7, 3, 5, 3), embedding_dim=4, mlp_dims=(16, 8))


def make_backbone(config: ModelConfig = TINY, *, seed: int = 0) -> CVRNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CVRNet(config)


def make_trainer(*, seed: int = 0, learning_rate: float = 0.01, total_steps: int = 10) -> AdapterTrainer:
    return AdapterTrainer(make_backbone(), learning_rate=learning_rate, total_steps=total_steps, seed=seed)


def adapted_model(config: ModelConfig = TINY, *, seed: int = 0) -> torch.nn.Module:
    """Adapted tiny model with nonzero adapters, so every adapter parameter gets a gradient."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = attach_adapters(CVRNet(config), seed=seed)
    size = parameter_counts(model)["adapters"]
    shift = 0.2 * torch.randn(size, generator=torch.Generator().manual_seed(seed + 1))
    set_adapter_vector(model, get_adapter_vector(model) + shift)
    return model


def clean_room_data(n: int, *, seed: int, config: ModelConfig = TINY) -> CleanRoomData:
    """Random rows with consent levels mixed in one batch: no noise, ε=3 and ε=1."""
    generator = torch.Generator().manual_seed(seed)
    categorical = torch.stack([torch.randint(0, b, (n,), generator=generator) for b in config.buckets], dim=1)
    dense = torch.randn(n, config.num_dense, generator=generator)
    noisy_labels = (torch.rand(n, generator=generator) < 0.3).float()
    flip_probs = torch.tensor([0.0, 1 / (1 + math.exp(3.0)), 1 / (1 + math.exp(1.0))])[
        torch.randint(0, 3, (n,), generator=generator)
    ]
    return CleanRoomData(EncodedFeatures(categorical, dense), noisy_labels, flip_probs)


def fields_of(record: RecordDict) -> dict:
    """The fields of a pcvr message, as a plain dict."""
    return dict(record[SECTION].items())


def resealed(record: RecordDict, *, drop: tuple[str, ...] = (), **changes: object) -> RecordDict:
    """A sender that follows the framing but lies: change fields (``base_round`` → ``base-round``),
    drop some, and recompute the digest."""
    values = {k: v for k, v in fields_of(record).items() if k != "digest" and k not in drop}
    values.update({k.replace("_", "-"): v for k, v in changes.items()})
    values["digest"] = messages._digest(values)
    return RecordDict({SECTION: ConfigRecord(values)})  # type: ignore[arg-type]
