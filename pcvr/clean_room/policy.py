"""The clean room's own policy: the advertiser's rules, enforced whatever the platform asks.

Read only on the clean room's side, from ``policy.toml`` in its directory (no file:
:class:`RoomPolicy`'s defaults)::

    min_batch_size = 1024          # no gradient leaves over fewer rows
    codecs = ["q8", "q4"]          # gradient codecs it may send (omit: any)
    label_sets = ["eps=3"]         # label sets it may train on (omit: any it holds)
    max_releases_per_run = 1000    # gradient releases in one run (omit: no limit)
    max_releases_total = 100000    # over every run on its rows (omit: no limit)

    [dp_sgd]
    require = "noise"              # "none", "noise" (σ ≥ min_noise_multiplier) or "budget"
    min_noise_multiplier = 1.0
    max_total_epsilon = 8.0        # with "budget": DP-SGD ε of all runs composed, at the run's δ

An instruction outside the policy is refused with a fixed
:class:`~pcvr.protocols.refusals.Refusal`; the privacy ledger reports the policy
and the releases actually made (:class:`ReleaseLog`).
"""

from __future__ import annotations

import enum
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pcvr.data.io import DataError, write_json_atomic
from pcvr.protocols.codecs import Codec
from pcvr.protocols.layout import POLICY_FILE, RELEASES_FILE
from pcvr.protocols.names import check_name
from pcvr.protocols.refusals import Refusal, Refused

__all__ = ["POLICY_FILE", "RELEASES_FILE", "DPRequirement", "RoomPolicy", "ReleaseLog"]

_TOP_KEYS = {"min_batch_size", "codecs", "label_sets", "max_releases_per_run", "max_releases_total", "dp_sgd"}
_DP_KEYS = {"require", "min_noise_multiplier", "max_total_epsilon"}


class DPRequirement(enum.Enum):
    """What DP-SGD a clean room demands of every release."""

    NONE = "none"
    NOISE = "noise"  # σ ≥ min_noise_multiplier on every release
    BUDGET = "budget"  # DP-SGD ε of all runs composed stays ≤ max_total_epsilon

    @classmethod
    def parse(cls, text: object) -> "DPRequirement":
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"dp_sgd.require must be one of {', '.join(m.value for m in cls)}; got {text!r}") from None


@dataclass(frozen=True)
class RoomPolicy:
    """A clean room's limits on what it computes and releases.

    Attributes:
        min_batch_size: the fewest rows one released gradient may cover, whatever the
            platform's instruction says (the floor actually enforced is the larger of the two).
        codecs: gradient codecs the clean room may send; ``None``: any.
        label_sets: label sets it may train on; ``None``: any it holds.
        max_releases_per_run: gradient releases allowed in one run; ``None``: no limit.
        max_releases_total: releases allowed over all runs on its rows; ``None``: no limit.
        dp_sgd: the DP-SGD requirement.
        min_noise_multiplier: with :attr:`DPRequirement.NOISE`, the smallest σ accepted.
        max_total_epsilon: with :attr:`DPRequirement.BUDGET`, the DP-SGD ε all runs may spend.
    """

    min_batch_size: int = 1024
    codecs: tuple[Codec, ...] | None = None
    label_sets: tuple[str, ...] | None = None
    max_releases_per_run: int | None = None
    max_releases_total: int | None = None
    dp_sgd: DPRequirement = DPRequirement.NONE
    min_noise_multiplier: float = 0.0
    max_total_epsilon: float = math.inf

    def __post_init__(self) -> None:
        if isinstance(self.min_batch_size, bool) or not isinstance(self.min_batch_size, int) or self.min_batch_size < 1:
            raise ValueError(f"min_batch_size must be an integer >= 1; got {self.min_batch_size!r}")
        for name in ("max_releases_per_run", "max_releases_total"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        for name in self.label_sets or ():
            check_name(name, what="label_sets entry")
        if self.dp_sgd is DPRequirement.NOISE and not (
            math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier > 0
        ):
            raise ValueError(f"dp_sgd.min_noise_multiplier must be > 0 with require = \"noise\"; got {self.min_noise_multiplier!r}")
        if self.dp_sgd is DPRequirement.BUDGET and not (
            math.isfinite(self.max_total_epsilon) and self.max_total_epsilon > 0
        ):
            raise ValueError(f"dp_sgd.max_total_epsilon must be > 0 with require = \"budget\"; got {self.max_total_epsilon!r}")

    @classmethod
    def from_mapping(cls, document: dict) -> "RoomPolicy":
        unknown = sorted(set(document) - _TOP_KEYS)
        dp = document.get("dp_sgd", {})
        if not isinstance(dp, dict):
            raise ValueError("[dp_sgd] must be a table")
        unknown += [f"dp_sgd.{key}" for key in sorted(set(dp) - _DP_KEYS)]
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}")
        codecs = document.get("codecs")
        label_sets = document.get("label_sets")
        for name, value in (("codecs", codecs), ("label_sets", label_sets)):
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{name} must be a list of strings; got {value!r}")
        return cls(
            min_batch_size=document.get("min_batch_size", cls.min_batch_size),
            codecs=None if codecs is None else tuple(Codec.parse(text) for text in codecs),
            label_sets=None if label_sets is None else tuple(label_sets),
            max_releases_per_run=document.get("max_releases_per_run"),
            max_releases_total=document.get("max_releases_total"),
            dp_sgd=DPRequirement.parse(dp.get("require", DPRequirement.NONE.value)),
            min_noise_multiplier=float(dp.get("min_noise_multiplier", 0.0)),
            max_total_epsilon=float(dp.get("max_total_epsilon", math.inf)),
        )

    @classmethod
    def load(cls, directory: Path) -> "RoomPolicy":
        """The policy in ``directory``'s ``policy.toml``, or the defaults when there is none."""
        path = Path(directory) / POLICY_FILE
        if not path.exists():
            return cls()
        try:
            return cls.from_mapping(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
            raise DataError(f"{path}: not a valid clean-room policy: {exc}") from None

    def to_toml(self) -> str:
        """The policy as ``policy.toml`` text (:meth:`from_mapping` reads it back equal)."""
        lines = [f"min_batch_size = {self.min_batch_size}"]
        if self.codecs is not None:
            lines.append(f"codecs = {json.dumps([str(c) for c in self.codecs])}")
        if self.label_sets is not None:
            lines.append(f"label_sets = {json.dumps(list(self.label_sets))}")
        for name in ("max_releases_per_run", "max_releases_total"):
            if getattr(self, name) is not None:
                lines.append(f"{name} = {getattr(self, name)}")
        lines += ["", "[dp_sgd]", f"require = \"{self.dp_sgd.value}\""]
        if self.dp_sgd is DPRequirement.NOISE:
            lines.append(f"min_noise_multiplier = {self.min_noise_multiplier!r}")
        if self.dp_sgd is DPRequirement.BUDGET:
            lines.append(f"max_total_epsilon = {self.max_total_epsilon!r}")
        return "\n".join(lines) + "\n"

    def to_ledger(self) -> dict[str, object]:
        return {
            "min_batch_size": self.min_batch_size,
            "codecs": None if self.codecs is None else [str(c) for c in self.codecs],
            "label_sets": None if self.label_sets is None else list(self.label_sets),
            "max_releases_per_run": self.max_releases_per_run,
            "max_releases_total": self.max_releases_total,
            "dp_sgd": self.dp_sgd.value,
            "min_noise_multiplier": self.min_noise_multiplier if self.dp_sgd is DPRequirement.NOISE else None,
            "max_total_epsilon": self.max_total_epsilon if self.dp_sgd is DPRequirement.BUDGET else None,
        }

    # --- checks; each raises Refused --------------------------------------------------------------

    def check_run(self, *, label_set: str, codec: Codec, dp_enabled: bool) -> None:
        """What the run config asks, before anything is computed."""
        if self.label_sets is not None and label_set not in self.label_sets:
            raise Refused(Refusal.LABEL_SET_NOT_ALLOWED, f"label set {label_set!r} is not in {list(self.label_sets)}")
        if self.codecs is not None and codec not in self.codecs:
            raise Refused(Refusal.CODEC_NOT_ALLOWED, f"codec {codec} is not in {[str(c) for c in self.codecs]}")
        if self.dp_sgd is not DPRequirement.NONE and not dp_enabled:
            raise Refused(Refusal.DP_SGD_REQUIRED, f"policy requires DP-SGD ({self.dp_sgd.value}); the run has none")

    def batch_floor(self, asked: int) -> int:
        """The floor enforced for an instruction asking for ``asked``: never below the policy's."""
        return max(self.min_batch_size, asked)

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < self.min_batch_size:
            raise Refused(Refusal.BATCH_BELOW_FLOOR, f"batch size {batch_size} < policy min_batch_size {self.min_batch_size}")

    def check_rows(self, rows: int, *, floor: int) -> None:
        if rows < floor:
            raise Refused(Refusal.TOO_FEW_ROWS, f"{rows} rows; a batch needs at least {floor}")

    def check_releases(self, releases: "ReleaseLog") -> None:
        if self.max_releases_per_run is not None and releases.in_run >= self.max_releases_per_run:
            raise Refused(Refusal.RELEASES_PER_RUN_SPENT, f"{releases.in_run} releases in this run")
        if self.max_releases_total is not None and releases.total >= self.max_releases_total:
            raise Refused(Refusal.RELEASES_TOTAL_SPENT, f"{releases.total} releases in all")

    def check_noise(self, noise_multiplier: float, *, total_epsilon_after: float) -> None:
        """A DP-SGD release at σ that would bring the composed ε to ``total_epsilon_after``."""
        if self.dp_sgd is DPRequirement.NOISE and noise_multiplier < self.min_noise_multiplier:
            raise Refused(Refusal.DP_SGD_REQUIRED, f"σ {noise_multiplier} < policy {self.min_noise_multiplier}")
        if self.dp_sgd is DPRequirement.BUDGET and total_epsilon_after > self.max_total_epsilon:
            raise Refused(Refusal.DP_BUDGET_SPENT, f"ε would reach {total_epsilon_after:.3f} > {self.max_total_epsilon}")


class ReleaseLog:
    """Gradient releases a clean room has made, per run, persisted in its directory.

    File format: ``{"version": 1, "runs": {"<run key>": {"releases": n, "min_examples": k}}}``;
    every :meth:`record` re-reads the file and replaces it atomically, before the release leaves.
    """

    _VERSION = 1

    def __init__(self, directory: Path, *, run_key: str) -> None:
        self.path = Path(directory) / RELEASES_FILE
        self.run_key = run_key
        self._runs = self._load()

    def _load(self) -> dict[str, dict[str, int]]:
        if not self.path.exists():
            return {}
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            runs = document["runs"]
            if document.get("version") != self._VERSION or not isinstance(runs, dict):
                raise ValueError(f"expected version {self._VERSION} with a 'runs' object")
            return {str(k): {"releases": int(v["releases"]), "min_examples": int(v["min_examples"])} for k, v in runs.items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{self.path}: not a readable release log: {exc}") from None

    @property
    def in_run(self) -> int:
        return self._runs.get(self.run_key, {}).get("releases", 0)

    @property
    def total(self) -> int:
        return sum(entry["releases"] for entry in self._runs.values())

    def summary(self) -> dict[str, int | None]:
        entry = self._runs.get(self.run_key, {})
        return {"in_run": self.in_run, "total": self.total, "min_examples": entry.get("min_examples")}

    def record(self, *, num_examples: int) -> None:
        runs = self._load()
        entry = runs.get(self.run_key, {"releases": 0, "min_examples": num_examples})
        runs[self.run_key] = {
            "releases": entry["releases"] + 1,
            "min_examples": min(entry["min_examples"], num_examples),
        }
        write_json_atomic(self.path, {"version": self._VERSION, "runs": runs})
        self._runs = runs
