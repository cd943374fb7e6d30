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
from pcvr.data.io import write_json_atomic
from pcvr.models.features import EncodedFeatures
from pcvr.platform.evaluate import holdout_metrics, predict
from pcvr.protocols.private_eval import PrivateMetrics

__all__ = [
    "aggregate",
    "clip_room_gradient",
    "cosine_learning_rate",
    "AdapterTrainer",
    "Participation",
    "PrivateEvaluation",
    "format_private",
    "RunLog",
]


def aggregate(gradients: Sequence[np.ndarray], *, num_examples: Sequence[int]) -> np.ndarray:
    """Example-weighted mean gradient: Σ (batch-summed gradients) / Σ (batch sizes)."""
    if not gradients:
        raise ValueError("no valid replies to aggregate")
    if len(gradients) != len(num_examples):
        raise ValueError(f"{len(gradients)} gradients but {len(num_examples)} example counts")
    summed = np.sum([np.asarray(g, dtype=np.float64) for g in gradients], axis=0)
    return (summed / sum(num_examples)).astype(np.float32)


def clip_room_gradient(gradient: np.ndarray, *, num_examples: int, max_norm: float) -> tuple[np.ndarray, float]:
    """One clean room's batch-summed gradient with its per-example mean clipped to L2 norm ``max_norm``.

    ‖g / n‖₂ ≤ ``max_norm`` (so ‖g‖₂ ≤ ``max_norm``·n): with example weighting,
    one room's share of the aggregate then moves it by at most ``max_norm``·n / Σn,
    whatever the room sends. ``max_norm`` 0 disables clipping. Returns the gradient
    and the factor applied (1.0 when the bound did not bite).
    """
    if max_norm == 0:
        return gradient, 1.0
    norm = float(np.linalg.norm(np.asarray(gradient, dtype=np.float64)))
    limit = max_norm * num_examples
    if norm <= limit:
        return gradient, 1.0
    factor = limit / norm
    return (np.asarray(gradient, dtype=np.float64) * factor).astype(np.float32), factor


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

    def local_learning_rate(self, *, local_steps: int) -> float:
        """The step size of the clean rooms' local steps in the next round.

        The cosine schedule (:func:`cosine_learning_rate`) runs over every local step of
        the run: ``total_steps`` rounds of ``local_steps`` each, at the round's first step.
        """
        return cosine_learning_rate(
            self.steps * local_steps, peak=self.peak_learning_rate, total_steps=self.total_steps * local_steps
        )

    def apply_delta(self, mean_delta: np.ndarray) -> None:
        """Add the clean rooms' mean weight change (wire order) to the adapters: one round of federated averaging."""
        if mean_delta.dtype != np.float32 or mean_delta.shape != (self.num_adapter_params,):
            raise ValueError(
                f"aggregated delta is {mean_delta.dtype} {mean_delta.shape}; expected float32 ({self.num_adapter_params},)"
            )
        if not np.isfinite(mean_delta).all():
            raise ValueError("aggregated delta holds NaN or infinite values")
        set_adapter_vector(self.model, get_adapter_vector(self.model) + torch.from_numpy(mean_delta))
        self.steps += 1

    def evaluate(self, features: EncodedFeatures, labels: np.ndarray) -> dict[str, float]:
        return holdout_metrics(labels, predict(self.model, features))

    def checkpoint(self, path: Path, *, run_state: dict | None = None) -> None:
        """Adapter weights and optimizer state, and ``run_state`` (JSON-able: where the run is), written atomically."""
        path = Path(path)
        staging = path.with_suffix(".tmp")
        torch.save(
            {
                "steps": self.steps,
                "adapters": get_adapter_vector(self.model),
                "optimizer": self.optimizer.state_dict(),
                "run": json.dumps(run_state),
            },
            staging,
        )
        staging.replace(path)

    @staticmethod
    def saved_run_state(path: Path) -> dict | None:
        """The ``run_state`` a :meth:`checkpoint` holds.

        Raises:
            ValueError: ``path`` is missing or not a checkpoint written by pcvr (one line, naming it).
        """
        try:
            return json.loads(torch.load(path, weights_only=True)["run"])
        except FileNotFoundError:
            raise ValueError(f"{path}: no checkpoint to resume from") from None
        except Exception as exc:  # torch raises many types on a corrupt or foreign file
            raise ValueError(f"{path}: not a pcvr checkpoint ({type(exc).__name__})") from None

    @staticmethod
    def saved_adapters(path: Path) -> torch.Tensor:
        """The adapter weights a :meth:`checkpoint` holds, without building a trainer."""
        return torch.load(path, weights_only=True)["adapters"]

    def restore(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        set_adapter_vector(self.model, state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


@dataclass
class Participation:
    """What one clean room did in a run, as the platform saw it."""

    node: int
    clean_room_id: int | None = None  # reported at the pre-flight check
    preflight: str | None = None  # why the pre-flight check failed; None: it passed
    served: int = 0  # rounds with an accepted reply
    missed: int = 0  # rounds without any reply
    rejected: dict[str, int] = field(default_factory=dict)  # reason → rounds

    @property
    def name(self) -> str:
        return f"node {self.node}" if self.clean_room_id is None else f"clean room {self.clean_room_id}"

    def count(self, *, accepted: bool, reasons: list[str]) -> None:
        """One round: served, rejected (the first reason) or missed."""
        if accepted:
            self.served += 1
        elif reasons:
            self.rejected[reasons[0]] = self.rejected.get(reasons[0], 0) + 1
        else:
            self.missed += 1

    def failure(self, *, rounds: int, min_share: float) -> str | None:
        """One line saying why this clean room served too few rounds, or None."""
        if self.served >= math.ceil(min_share * rounds):
            return None
        worst = max(self.rejected, key=self.rejected.get) if self.rejected else None
        if worst is None or self.missed > self.rejected[worst]:  # a tie names the refusal: it says more
            why = f"missed {self.missed} rounds (offline, or no reply in time)"
        else:
            why = worst
        return f"{self.name}: served {self.served} of {rounds} rounds (min-participation {min_share:g}): {why}"

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "clean_room_id": self.clean_room_id,
            "preflight": self.preflight or "passed",
            "served": self.served,
            "missed": self.missed,
            "rejected": dict(self.rejected),
        }

    def carry_over(self, earlier: dict) -> None:
        """Add what this clean room did in the interrupted run (:meth:`to_dict` of it) to this run's counts."""
        self.served += int(earlier["served"])
        self.missed += int(earlier["missed"])
        for reason, count in earlier["rejected"].items():
            self.rejected[reason] = self.rejected.get(reason, 0) + int(count)


@dataclass(frozen=True)
class PrivateEvaluation:
    """The clean rooms' de-biased evaluation of the model after ``round`` (:mod:`pcvr.protocols.private_eval`).

    ``metrics`` is over every clean room's held-out split, or ``None`` when any room
    gave no valid answer (an estimate over some rooms would pass for the run's);
    ``rooms`` says, per clean room, ``"ok"`` or why not.
    """

    round: int
    metrics: PrivateMetrics | None
    rooms: dict[str, str]
    unavailable: str | None = None

    def to_dict(self) -> dict:
        return {
            "round": self.round,
            **(self.metrics.to_dict() if self.metrics is not None else {}),
            "clean_rooms": dict(self.rooms),
            "unavailable": self.unavailable,
        }


def format_private(entry: dict | None) -> str:
    """One line for a :meth:`PrivateEvaluation.to_dict` entry: each estimate ± its standard error."""
    if entry is None:
        return "private evaluation: not run"
    if entry.get("unavailable"):
        return f"private evaluation: unavailable: {entry['unavailable']}"
    return (
        f"private (de-biased, {entry['rooms']} clean rooms, {entry['rows']:,} held-out rows): "
        f"AUC {entry['auc']['value']:.4f} ± {entry['auc']['se']:.4f}, "
        f"NE {entry['ne']['value']:.4f} ± {entry['ne']['se']:.4f}, "
        f"calibration {entry['calibration']['value']:.3f} ± {entry['calibration']['se']:.3f}"
    )


@dataclass
class RunLog:
    """What the platform saw during a run: per-round loss and bytes, evaluations, rejections, ledgers, participation."""

    rounds: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    ledgers: dict[str, dict] = field(default_factory=dict)  # node id → the clean room's privacy ledger
    participation: dict[int, Participation] = field(default_factory=dict)  # node id → what it did
    steps: int = 0  # optimizer steps applied
    abandoned: str | None = None  # why the run stopped before its last round
    private: PrivateEvaluation | None = None  # the clean rooms' evaluation after the last round

    def resume_state(self, *, run: int, round_: int, train_s: float) -> dict:
        """What :meth:`resumed` needs to continue after ``round_`` of logical run ``run``: saved with each checkpoint.

        Participation is kept by clean-room id: a resumed run's nodes may have other ids.
        """
        return {
            "run": run,
            "round": round_,
            "train_s": train_s,
            "rounds": self.rounds,
            "evaluations": self.evaluations,
            "rejected": self.rejected,
            "participation": {str(p.clean_room_id): p.to_dict() for p in self.participation.values()},
        }

    @classmethod
    def resumed(cls, state: dict) -> "RunLog":
        """The log of an interrupted run, to go on with (participation is carried over after the pre-flight check)."""
        return cls(rounds=list(state["rounds"]), evaluations=list(state["evaluations"]), rejected=list(state["rejected"]))

    @property
    def bytes_up(self) -> int:
        return sum(r["bytes_up"] for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        return sum(r["bytes_down"] for r in self.rounds)

    def failures(self, *, rounds: int, min_share: float) -> list[str]:
        """One line per reason the run failed; empty when it succeeded.

        A failed pre-flight check stops the run before round 1, so then only those are the reasons.
        """
        rooms = [room for _, room in sorted(self.participation.items())]
        if any(room.preflight is not None for room in rooms):
            return [f"{room.name}: pre-flight check failed: {room.preflight}" for room in rooms if room.preflight is not None]
        lines = [room.failure(rounds=rounds, min_share=min_share) for room in rooms]
        lines = [line for line in lines if line is not None]
        if self.abandoned is not None:
            lines.append(self.abandoned)
        if self.steps == 0:
            lines.append("no update was applied: the adapters are still the backbone's")
        return lines

    def write(self, path: Path, *, rounds: int, min_share: float, **extra: object) -> dict:
        result = {
            **extra,
            "failures": self.failures(rounds=rounds, min_share=min_share),
            "rounds": len(self.rounds),
            "steps": self.steps,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_up_per_round": self.bytes_up / max(1, len(self.rounds)),
            "bytes_down_per_round": self.bytes_down / max(1, len(self.rounds)),
            "rejected": len(self.rejected),
            "rejections": self.rejected,
            "participation": {p.name: p.to_dict() for _, p in sorted(self.participation.items())},
            "evaluations": self.evaluations,
            "private": None if self.private is None else self.private.to_dict(),
            "history": self.rounds,
        }
        write_json_atomic(path, result)
        return result
