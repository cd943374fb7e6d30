"""The platform's side of a round, without Flower: aggregate replies, step, evaluate, checkpoint."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pcvr.models.cvr import (
    CVRNet,
    adapter_parameters,
    attach_adapters,
    get_adapter_vector,
    parameter_counts,
    set_adapter_vector,
)
from pcvr.models.features import EncodedFeatures
from pcvr.platform.evaluate import holdout_metrics, predict

__all__ = ["aggregate", "cosine_learning_rate", "AdapterTrainer", "RunLog"]


def aggregate(gradients: Sequence[np.ndarray], *, num_examples: Sequence[int]) -> np.ndarray:
    """Example-weighted mean gradient: Σ (batch-summed gradients) / Σ (batch sizes)."""
    if not gradients:
        raise ValueError("no valid replies to aggregate")
    if len(gradients) != len(num_examples):
        raise ValueError(f"{len(gradients)} gradients but {len(num_examples)} example counts")
    summed = np.sum([np.asarray(g, dtype=np.float64) for g in gradients], axis=0)
    return (summed / sum(num_examples)).astype(np.float32)


def cosine_learning_rate(step: int, *, peak: float, total_steps: int, floor: float = 0.1) -> float:
    """Cosine decay from ``peak`` at step 0 to ``floor * peak`` at ``total_steps``."""
    progress = min(step, total_steps) / total_steps
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class AdapterTrainer:
    """Holds the adapted model and the Adam state; one :meth:`step` per aggregated gradient.

    The step size follows :func:`cosine_learning_rate` over ``total_steps``, so the
    last rounds average out batch noise instead of jittering the calibration.
    """

    def __init__(self, backbone: CVRNet, *, learning_rate: float, total_steps: int, seed: int) -> None:
        self.model = attach_adapters(backbone, seed=seed)
        self.optimizer = torch.optim.Adam(adapter_parameters(self.model), lr=learning_rate)
        self.peak_learning_rate = learning_rate
        self.total_steps = total_steps
        self.steps = 0

    @property
    def num_adapter_params(self) -> int:
        return parameter_counts(self.model)["adapters"]

    def adapter_weights(self) -> np.ndarray:
        return get_adapter_vector(self.model).numpy()

    def step(self, mean_grad: np.ndarray) -> None:
        """Apply one optimizer step with ``mean_grad`` (wire order) as the adapters' gradient."""
        if mean_grad.dtype != np.float32 or mean_grad.shape != (self.num_adapter_params,):
            raise ValueError(
                f"aggregated gradient is {mean_grad.dtype} {mean_grad.shape}; expected float32 ({self.num_adapter_params},)"
            )
        if not np.isfinite(mean_grad).all():
            raise ValueError("aggregated gradient holds NaN or infinite values")
        offset = 0
        grad = torch.from_numpy(mean_grad)
        for parameter in adapter_parameters(self.model):
            parameter.grad = grad[offset : offset + parameter.numel()].view_as(parameter).clone()
            offset += parameter.numel()
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_learning_rate(self.steps, peak=self.peak_learning_rate, total_steps=self.total_steps)
        self.optimizer.step()
        self.steps += 1

    def evaluate(self, features: EncodedFeatures, labels: np.ndarray) -> dict[str, float]:
        return holdout_metrics(labels, predict(self.model, features))

    def checkpoint(self, path: Path) -> None:
        """Adapter weights and optimizer state, written atomically."""
        path = Path(path)
        staging = path.with_suffix(".tmp")
        torch.save(
            {"steps": self.steps, "adapters": get_adapter_vector(self.model), "optimizer": self.optimizer.state_dict()},
            staging,
        )
        staging.replace(path)

    def restore(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        set_adapter_vector(self.model, state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


@dataclass
class RunLog:
    """What the platform saw during a run: per-round loss and bytes, evaluations, rejections, ledgers."""

    rounds: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    ledgers: dict[str, dict] = field(default_factory=dict)  # node id → the clean room's privacy ledger

    @property
    def bytes_up(self) -> int:
        return sum(r["bytes_up"] for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        return sum(r["bytes_down"] for r in self.rounds)

    def write(self, path: Path, **extra: object) -> dict:
        result = {
            **extra,
            "rounds": len(self.rounds),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_up_per_round": self.bytes_up / max(1, len(self.rounds)),
            "bytes_down_per_round": self.bytes_down / max(1, len(self.rounds)),
            "rejected": len(self.rejected),
            "rejections": self.rejected,
            "evaluations": self.evaluations,
            "history": self.rounds,
        }
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        return result
