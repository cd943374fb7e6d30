"""Pretraining of the backbone on the platform's own labelled clicks (no clean room involved)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pcvr.models.cvr import CVRNet, ModelConfig
from pcvr.models.features import EncodedFeatures

__all__ = ["pretrain_backbone"]


def pretrain_backbone(
    features: EncodedFeatures,
    labels: np.ndarray,
    *,
    config: ModelConfig,
    epochs: int = 2,
    batch_size: int = 2048,
    learning_rate: float = 2e-3,
    generator: torch.Generator,
) -> CVRNet:
    """Train every parameter of a fresh :class:`CVRNet` with Adam on log loss; returns it frozen."""
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    with torch.random.fork_rng():  # initialise from ``generator`` without touching the global seed
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        model = CVRNet(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    targets = torch.as_tensor(labels, dtype=torch.float32)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(features.take(index)), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()
