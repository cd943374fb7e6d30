"""Pretraining of the backbone on the platform's own labelled clicks (no clean room involved)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pcvr.data.encoding import FeatureEncoding, fit_encoding
from pcvr.data.spec import DatasetSpec
from pcvr.models.cvr import CVRNet, ModelConfig, ModelShape, save_backbone
from pcvr.models.features import EncodedFeatures
from pcvr.platform.features import read_labelled

__all__ = ["pretrain_backbone", "pretrain_from_spec"]


def pretrain_from_spec(
    spec: DatasetSpec,
    out_backbone_dir: Path,
    *,
    shape: ModelShape = ModelShape(),
    epochs: int = 2,
    batch_size: int = 2048,
    learning_rate: float = 2e-3,
    generator: torch.Generator,
) -> FeatureEncoding:
    """Fit the encoding on [pretrain], pretrain a backbone of ``shape`` on it, save both into ``out_backbone_dir``.

    The directory gets the weights, ``config.json`` and ``encoding.json``; it is
    built beside its final place and renamed into it, so an error leaves nothing
    (and a previous backbone there is replaced only by a complete new one).

    Raises:
        ValueError: the spec lacks [features] or [pretrain].
        DataError: bad input (naming file, row, column).
    """
    encoding = fit_encoding(spec)
    features, labels, _ = read_labelled(spec, encoding)
    backbone = pretrain_backbone(
        features,
        labels,
        config=ModelConfig.for_encoding(encoding, shape),
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        generator=generator,
    )
    out = Path(out_backbone_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_backbone(backbone, staging)
        encoding.save(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return encoding


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
