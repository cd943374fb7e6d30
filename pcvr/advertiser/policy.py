"""Consent policy: which label-DP ε each consent level gets, or exclusion.

The policy is data (a TOML file, see ``default_policy.toml``)::

    [levels]
    standard = 3.0
    limited = 1.0
    opt_out = "exclude"

Every :class:`~pcvr.data.schema.ConsentLevel` must be listed; ``opt_out`` must be
``"exclude"``; ε is a positive number or ``"inf"`` (labels pass unperturbed —
only for a non-private reference run).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pcvr.data.schema import ConsentLevel

__all__ = ["ConsentPolicy", "EXCLUDE"]

EXCLUDE = "exclude"


@dataclass(frozen=True)
class ConsentPolicy:
    """ε per consent level; ``None`` means the level is excluded from training."""

    epsilons: tuple[tuple[ConsentLevel, float | None], ...]

    def __post_init__(self) -> None:
        levels = [level for level, _ in self.epsilons]
        missing = [level.value for level in ConsentLevel if level not in levels]
        if missing:
            raise ValueError(f"consent policy has no entry for level(s) {', '.join(missing)}")
        for level, epsilon in self.epsilons:
            if level is ConsentLevel.OPT_OUT and epsilon is not None:
                raise ValueError("consent policy: opt_out must be \"exclude\"; opted-out records are never used")
            if epsilon is not None and not epsilon > 0:
                raise ValueError(f"consent policy: epsilon for {level.value} must be > 0; got {epsilon}")

    def epsilon_for(self, level: ConsentLevel) -> float | None:
        return dict(self.epsilons)[level]

    @classmethod
    def from_mapping(cls, levels: dict, *, source: str = "consent policy") -> "ConsentPolicy":
        parsed = []
        for name, value in levels.items():
            try:
                level = ConsentLevel.parse(name)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
            if value == EXCLUDE:
                parsed.append((level, None))
            elif value == "inf":
                parsed.append((level, math.inf))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                parsed.append((level, float(value)))
            else:
                raise ValueError(f"{source}: level {name!r} must be a positive number, \"inf\" or \"exclude\"; got {value!r}")
        try:
            return cls(tuple(parsed))
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: Path) -> "ConsentPolicy":
        path = Path(path)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: cannot read consent policy: {exc}") from None
        if not isinstance(document.get("levels"), dict):
            raise ValueError(f"{path}: consent policy needs a [levels] table")
        return cls.from_mapping(document["levels"], source=str(path))

    @classmethod
    def default(cls) -> "ConsentPolicy":
        text = resources.files("pcvr.advertiser").joinpath("default_policy.toml").read_text()
        return cls.from_mapping(tomllib.loads(text)["levels"], source="default consent policy")

    def capped(self, *, epsilon: float) -> "ConsentPolicy":
        """The policy run at ε: ``standard`` gets exactly ε, every other level at most ε."""
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0; got {epsilon}")
        capped = []
        for level, level_epsilon in self.epsilons:
            if level_epsilon is None:
                capped.append((level, None))
            elif level is ConsentLevel.STANDARD:
                capped.append((level, epsilon))
            else:
                capped.append((level, min(level_epsilon, epsilon)))
        return ConsentPolicy(tuple(capped))

    def to_dict(self) -> dict[str, float | str]:
        return {level.value: (EXCLUDE if eps is None else ("inf" if math.isinf(eps) else eps)) for level, eps in self.epsilons}
