"""Sample-level DP-SGD on the clean room's outgoing adapter gradient, via Opacus.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): every
example's gradient g_i is clipped to L2 norm at most C over the whole adapter
vector, the clipped gradients are summed and Gaussian noise is added,

    g̃ = Σ_i g_i · min(1, C / ‖g_i‖₂) + N(0, σ² C² I),

so adding or removing one example moves the sum by at most C and the release is a
subsampled Gaussian mechanism. With Poisson sampling at rate q (each row joins a
batch independently, :func:`poisson_batch`) the Rényi-DP accountant (Mironov,
"Rényi Differential Privacy", CSF 2017; Mironov et al. 2019 for the subsampled
Gaussian) bounds ε after T releases at a given δ. This is the neighbouring
relation Opacus' accountants assume: add/remove one example.

The mechanism and its accounting are Opacus': ``GradSampleModule`` computes the
per-sample gradients (with the closed-form grad sampler for
:class:`~pcvr.models.cvr.GatedLoRALinear` registered in :mod:`.dp_release`), ``DPOptimizer``
clips, sums (``loss_reduction="sum"``: no division by the batch size) and adds the
noise; ``RDPAccountant`` turns the history of (σ, q, steps) into ε. The
optimizer is never stepped: the platform owns the update rule. The release itself
(:func:`~pcvr.clean_room.dp_release.private_batch_gradient`) lives in :mod:`.dp_release`,
so that only a clean room that adds noise pays for importing Opacus.

What the guarantee covers: the noisy gradient sum. The ``num_examples`` and
``loss`` fields of the returned :class:`~pcvr.clean_room.task.BatchGradient` are
exact functions of the batch and are *not* protected; a batch skipped for being
below ``min_batch_size`` also reveals something about its size. Callers that send
them under DP-SGD must replace them (e.g. the expected batch size q·N) or account
for them separately.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pcvr.data.io import DataError, write_json_atomic

__all__ = [
    "DPSGDConfig",
    "noise_multiplier_for",
    "poisson_batch",
    "PrivacyAccountant",
    "epsilon_of",
]

ACCOUNTANT = "rdp"  # opacus.accountants.RDPAccountant.mechanism()
_FILE_VERSION = 1


@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD settings for one run.

    Attributes:
        noise_multiplier: σ, the noise std in units of ``clip_norm``; ``None`` derives
            it from ``target_epsilon`` (:func:`noise_multiplier_for`). 0 means no noise.
        target_epsilon: ε the run may spend at ``delta`` after its planned steps.
        clip_norm: C, the per-example L2 bound on the whole adapter gradient.
        delta: δ of the (ε, δ) guarantee; well below 1 / (number of rows).
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    clip_norm: float = 1.0
    delta: float = 1e-6

    def __post_init__(self) -> None:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("give noise_multiplier or target_epsilon, not both")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ValueError(f"noise_multiplier must be finite and >= 0; got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"target_epsilon must be finite and > 0; got {self.target_epsilon!r}")
        _check_clip_norm(self.clip_norm)
        _check_delta(self.delta)

    @property
    def enabled(self) -> bool:
        """Whether any noise is added (σ > 0, or σ still to be derived from a target ε)."""
        return self.target_epsilon is not None or (self.noise_multiplier or 0.0) > 0


def noise_multiplier_for(config: DPSGDConfig, *, sample_rate: float, steps: int) -> float:
    """σ for this run: the configured one, else the smallest (to Opacus' 0.01 tolerance in ε)
    that keeps the RDP ε after ``steps`` releases at rate ``sample_rate`` at or below the target.

    Returns 0.0 when the config asks for no noise.
    """
    _check_sample_rate(sample_rate)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    if config.target_epsilon is None:
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # Opacus warns when the best RDP order is at the end of its grid (typically while its search
        # tries a huge σ); the bound is then merely looser than it could be, never invalid.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=config.target_epsilon,
                target_delta=config.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=ACCOUNTANT,
            )
        )


def poisson_batch(num_rows: int, *, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Poisson-sampled batch: each row joins independently with probability ``sample_rate``.

    The same draw as Opacus' ``UniformWithReplacementSampler`` (``DPDataLoader``) and
    the sampling the RDP accountant assumes. The batch size is random (mean q·N)
    and may be 0.

    Returns:
        Sorted, distinct int64 row indices in [0, num_rows).
    """
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0; got {num_rows!r}")
    _check_sample_rate(sample_rate)
    mask = torch.rand(num_rows, generator=generator) < sample_rate
    return mask.nonzero().reshape(-1)


# --- accounting ---------------------------------------------------------------------------------

History = list[tuple[float, float, int]]  # [(noise_multiplier, sample_rate, steps), ...]


class PrivacyAccountant:
    """DP-SGD accounting for one clean room, persisted as JSON so it survives restarts.

    Holds, per run key, the history [(σ, q, steps), ...] in the form of
    ``opacus.accountants.RDPAccountant.history`` and asks that accountant for ε.
    The file is the source of truth: every :meth:`record_step` re-reads it, appends
    and replaces it atomically, so a restarted process continues where the last
    one stopped. File format::

        {"version": 1, "runs": {"<run key>": [[sigma, q, steps], ...], ...}}
    """

    def __init__(self, path: Path, *, run_key: str) -> None:
        if not isinstance(run_key, str) or not run_key:
            raise ValueError(f"run_key must be a non-empty string; got {run_key!r}")
        self.path = Path(path)
        self.run_key = run_key
        self._runs = _load_runs(self.path)

    @property
    def history(self) -> History:
        """This run's (σ, q, steps) entries, oldest first (a copy)."""
        return list(self._runs.get(self.run_key, []))

    @property
    def steps(self) -> int:
        """Releases recorded for this run."""
        return sum(steps for _, _, steps in self._runs.get(self.run_key, []))

    def record_step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` releases at (σ, q) and save; consecutive equal (σ, q) share one entry."""
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0; got {noise_multiplier!r}")
        _check_sample_rate(sample_rate)
        runs = _load_runs(self.path)
        runs[self.run_key] = _append_step(
            runs.get(self.run_key, []), noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate), steps=steps
        )
        _save_runs(self.path, runs)
        self._runs = runs

    def epsilon(self, *, delta: float) -> float:
        """ε of this run at ``delta`` (0.0 before any step; inf if a step had σ = 0)."""
        return epsilon_of(self._runs.get(self.run_key, []), delta=delta)

    def total_epsilon(self, *, delta: float) -> float:
        """ε of all runs in the file composed: every run used the same clean-room data."""
        return epsilon_of([entry for key in sorted(self._runs) for entry in self._runs[key]], delta=delta)

    def total_epsilon_after(self, *, noise_multiplier: float, sample_rate: float, delta: float, steps: int = 1) -> float:
        """ε of all runs composed if ``steps`` more releases at (σ, q) were recorded in this run."""
        runs = dict(self._runs)
        runs[self.run_key] = _append_step(
            runs.get(self.run_key, []), noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate), steps=steps
        )
        return epsilon_of([entry for key in sorted(runs) for entry in runs[key]], delta=delta)

    def summary(self, *, delta: float) -> dict:
        """The latest (σ, q), this run's steps and ε, and ε over all runs, at ``delta``."""
        history = self._runs.get(self.run_key, [])
        noise_multiplier, sample_rate, _ = history[-1] if history else (None, None, 0)
        return {
            "noise_multiplier": noise_multiplier,
            "sample_rate": sample_rate,
            "steps": self.steps,
            "epsilon": self.epsilon(delta=delta),
            "delta": delta,
            "total_epsilon": self.total_epsilon(delta=delta),
            "accountant": ACCOUNTANT,
        }


def epsilon_of(history: History, *, delta: float) -> float:
    """ε at ``delta`` of a (σ, q, steps) history, by ``opacus.accountants.RDPAccountant``."""
    _check_delta(delta)
    if not history:
        return 0.0
    if any(noise_multiplier == 0 for noise_multiplier, _, _ in history):
        return math.inf  # a release without noise has no (ε, δ) bound
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _append_step(history: History, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> History:
    """``history`` plus ``steps`` steps, merged into the last entry when (σ, q) repeat (as RDPAccountant.step)."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if history and history[-1][:2] == (noise_multiplier, sample_rate):
        return [*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + steps)]
    return [*history, (noise_multiplier, sample_rate, steps)]


def _load_runs(path: Path) -> dict[str, History]:
    """Histories per run key from ``path``; empty if the file does not exist yet."""
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable privacy-accountant JSON file ({error})") from None
    if not isinstance(document, dict) or document.get("version") != _FILE_VERSION:
        version = document.get("version") if isinstance(document, dict) else None
        raise DataError(f"{path}: privacy-accountant file must have version {_FILE_VERSION}; got {version!r}")
    runs = document.get("runs")
    if not isinstance(runs, dict):
        raise DataError(f"{path}: field 'runs' must be an object of run key → history")
    return {key: _parse_history(path, key, entries) for key, entries in runs.items()}


def _parse_history(path: Path, run_key: str, entries: object) -> History:
    if not isinstance(entries, list):
        raise DataError(f"{path}: run {run_key!r}: history must be a list of [sigma, q, steps]")
    history: History = []
    for position, entry in enumerate(entries):
        where = f"{path}: run {run_key!r}, entry {position}"
        if not (isinstance(entry, list) and len(entry) == 3):
            raise DataError(f"{where}: expected [sigma, q, steps]; got {entry!r}")
        sigma, rate, steps = entry
        if not _is_number(sigma) or not (math.isfinite(sigma) and sigma >= 0):
            raise DataError(f"{where}: sigma must be a finite number >= 0; got {sigma!r}")
        if not _is_number(rate) or not 0 < rate <= 1:
            raise DataError(f"{where}: q must be a number in (0, 1]; got {rate!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise DataError(f"{where}: steps must be an integer >= 1; got {steps!r}")
        history.append((float(sigma), float(rate), steps))
    return history


def _save_runs(path: Path, runs: dict[str, History]) -> None:
    document = {"version": _FILE_VERSION, "runs": {key: [list(entry) for entry in runs[key]] for key in sorted(runs)}}
    write_json_atomic(path, document)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_clip_norm(clip_norm: float) -> None:
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0; got {clip_norm!r}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")


def _check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
