"""The run-wide settings both the platform and the clean rooms read, parsed once.

Flower hands them over as ``context.run_config`` (kebab-case keys, from
``[tool.flwr.app.config]`` in ``pyproject.toml`` plus ``--run-config``
overrides). :meth:`RunConfig.from_run_config` is the only place those keys are read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pcvr.protocols.label_dp import Correction

__all__ = ["RunConfig"]


@dataclass(frozen=True)
class RunConfig:
    """Settings of one federated training run.

    Attributes:
        data_dir: prepared run directory (``pcvr simulate`` or ``pcvr prepare`` writes it).
        label_set: which prepared clean-room label input to train on (e.g. ``eps=3``).
        run_dir: where the platform writes checkpoints and ``result.json``.
        num_rounds: federated rounds; one optimizer step per round.
        clean_rooms: how many clean rooms the platform waits for before round 1.
        batch_size: rows per clean-room batch gradient.
        min_batch_size: a clean room never sends a gradient over fewer rows.
        correction: label-noise correction the clean rooms apply.
        learning_rate: the platform's Adam step size on the adapters.
        eval_every: evaluate on the holdout every this many rounds (and at the end).
        seed: seeds the adapters' initialisation and the clean rooms' batch sampling.
    """

    data_dir: Path = Path("runs/demo")
    label_set: str = "eps=3"
    run_dir: Path = Path("runs/demo/flwr-run")
    num_rounds: int = 100
    clean_rooms: int = 3
    batch_size: int = 8192
    min_batch_size: int = 1024
    correction: Correction = Correction.FORWARD
    learning_rate: float = 0.02
    eval_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_rounds", "clean_rooms", "batch_size", "min_batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run config: {name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.batch_size < self.min_batch_size:
            raise ValueError(
                f"run config: batch-size ({self.batch_size}) is below min-batch-size ({self.min_batch_size})"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"run config: learning-rate must be > 0; got {self.learning_rate}")

    @classmethod
    def from_run_config(cls, values: Mapping[str, object]) -> "RunConfig":
        """Parse Flower's run config (kebab-case keys); unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, object] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(n.replace("_", "-") for n in fields))
                raise ValueError(f"run config: unknown key {key!r} (known: {known})")
            default = fields[name].default
            try:
                if isinstance(default, Path):
                    kwargs[name] = Path(str(value))
                elif isinstance(default, Correction):
                    kwargs[name] = Correction.parse(str(value))
                elif isinstance(value, bool):
                    raise ValueError(f"expected a {type(default).__name__}, got {value!r}")
                elif isinstance(default, int):
                    if isinstance(value, float) and not value.is_integer():
                        raise ValueError(f"expected an integer, got {value!r}")
                    kwargs[name] = int(value)
                else:
                    kwargs[name] = type(default)(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"run config: {key}: {exc}") from None
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, str | int | float]:
        """The inverse of :meth:`from_run_config`."""
        out: dict[str, str | int | float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = (
                str(value) if isinstance(value, Path) else value.value if isinstance(value, Correction) else value
            )
        return out
