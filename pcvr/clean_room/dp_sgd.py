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
:class:`~pcvr.models.cvr.GatedLoRALinear` registered below), ``DPOptimizer``
clips, sums (``loss_reduction="sum"``: no division by the batch size) and adds the
noise; ``RDPAccountant`` turns the history of (σ, q, steps) into ε. The
optimizer is never stepped: the platform owns the update rule.

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
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer

from pcvr.clean_room.dataset import CleanRoomData
from pcvr.clean_room.task import BatchGradient
from pcvr.data.io import DataError, write_json_atomic
from pcvr.models.cvr import GatedLoRALinear, adapter_grad_vector, adapter_parameters
from pcvr.protocols.label_dp import Correction, corrected_loss

__all__ = [
    "DPSGDConfig",
    "noise_multiplier_for",
    "poisson_batch",
    "private_batch_gradient",
    "PrivacyAccountant",
    "epsilon_of",
]

ACCOUNTANT = RDPAccountant.mechanism()  # "rdp"
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


def private_batch_gradient(
    model: torch.nn.Module,
    data: CleanRoomData,
    index: torch.Tensor,
    *,
    correction: Correction,
    min_batch_size: int,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> BatchGradient:
    """DP-SGD release of the batch's adapter gradient: Σ clip_C(g_i) + N(0, σ²C² I).

    g_i is row i's gradient of the corrected loss (``pcvr.protocols.label_dp``)
    with respect to the adapter parameters (wire order, as
    :func:`~pcvr.models.cvr.adapter_grad_vector`), clipped as a whole vector. The
    noise is drawn from ``generator``. Opacus is attached to ``model`` for the call
    and detached afterwards (no hooks or per-sample attributes stay); like
    :func:`~pcvr.clean_room.task.batch_gradient`, the adapters' ``.grad`` hold the
    released gradient afterwards and the weights are not changed.

    Args:
        clip_norm: C > 0, in gradient units (nats per parameter unit).
        noise_multiplier: σ >= 0; the noise std per coordinate is σ·C.

    Returns:
        The noisy sum (float32 [P]); ``num_examples`` and ``loss`` are exact and
        not DP (module docstring).

    Raises:
        ValueError: the batch has fewer than ``min_batch_size`` rows, or bad C or σ.
    """
    _check_clip_norm(clip_norm)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0; got {noise_multiplier!r}")
    if len(index) < min_batch_size:
        raise ValueError(f"batch of {len(index)} rows is below min_batch_size={min_batch_size}; not sent")
    params = adapter_parameters(model)
    if not params:
        raise ValueError("the model has no adapter parameters (requires_grad) to train")
    for parameter in params:
        parameter.grad = None
    model.train()
    grad_sample_module = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        optimizer = DPOptimizer(
            torch.optim.SGD(params, lr=0.0),  # never stepped: only clip + noise are used
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip_norm,
            expected_batch_size=len(index),
            loss_reduction="sum",
            generator=generator,
        )
        logits = grad_sample_module(data.features.take(index))
        losses = corrected_loss(logits, data.noisy_labels[index], data.flip_probs[index], correction=correction)
        with warnings.catch_warnings():
            # The first layer's input (frozen embeddings) needs no gradient; Opacus' full backward
            # hook then sees only the output gradient, which is all the grad sampler uses.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            losses.sum().backward()
        optimizer.pre_step()  # clip_and_accumulate → add_noise → scale_grad (a no-op for "sum")
        adapter_grad = adapter_grad_vector(model)
    finally:
        _detach_opacus(grad_sample_module, model)
    return BatchGradient(
        adapter_grad=adapter_grad.numpy(),
        num_examples=len(index),
        loss=float(losses.detach().mean()) if len(index) else 0.0,
    )


def _detach_opacus(grad_sample_module: GradSampleModule, model: torch.nn.Module) -> None:
    """Remove Opacus' hooks and every attribute it set on the caller's modules and parameters."""
    grad_sample_module.to_standard_module()  # hooks, grad_sample, _forward_counter, ...
    for parameter in model.parameters():
        if hasattr(parameter, "summed_grad"):  # set by DPOptimizer
            del parameter.summed_grad
    for module in model.modules():
        for attribute in ("activations", "max_batch_len"):  # set by the forward/backward hooks
            if attribute in module.__dict__:
                delattr(module, attribute)


@register_grad_sampler(GatedLoRALinear)
def _gated_lora_grad_sample(
    layer: GatedLoRALinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-example gradients of y = W x + b + g·s·B A x (+ β) given δ = ∂L/∂y per example.

    With h = A x and u = B h:  ∂/∂β = δ,  ∂/∂g = s ⟨δ, u⟩,  ∂/∂B = g s δ hᵀ,
    ∂/∂A = g s (Bᵀ δ) xᵀ. Only parameters with ``requires_grad`` get one (the frozen
    base never does), which is why this beats Opacus' functorch fallback: that one
    would also materialise [N, out, in] gradients of the frozen base weight.
    """
    x = activations[0].to(backprops.dtype)  # [N, ..., in]
    hidden = x @ layer.lora_a.T  # [N, ..., r]
    gain = layer.gate * layer.scale
    grads: dict[torch.nn.Parameter, torch.Tensor] = {}
    if layer.lora_a.requires_grad:
        back_hidden = backprops @ layer.lora_b  # [N, ..., r]
        grads[layer.lora_a] = gain * torch.einsum("n...r,n...i->nri", back_hidden, x)
    if layer.lora_b.requires_grad:
        grads[layer.lora_b] = gain * torch.einsum("n...o,n...r->nor", backprops, hidden)
    if layer.gate.requires_grad:
        update = hidden @ layer.lora_b.T  # [N, ..., out]
        grads[layer.gate] = layer.scale * torch.einsum("n...o,n...o->n", backprops, update)
    if layer.bias_offset is not None and layer.bias_offset.requires_grad:
        grads[layer.bias_offset] = torch.einsum("n...o->no", backprops)
    return {parameter: grad.detach() for parameter, grad in grads.items()}


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

    def record_step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one release at (σ, q) and save; consecutive equal (σ, q) share one entry."""
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0; got {noise_multiplier!r}")
        _check_sample_rate(sample_rate)
        runs = _load_runs(self.path)
        runs[self.run_key] = _append_step(
            runs.get(self.run_key, []), noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate)
        )
        _save_runs(self.path, runs)
        self._runs = runs

    def epsilon(self, *, delta: float) -> float:
        """ε of this run at ``delta`` (0.0 before any step; inf if a step had σ = 0)."""
        return epsilon_of(self._runs.get(self.run_key, []), delta=delta)

    def total_epsilon(self, *, delta: float) -> float:
        """ε of all runs in the file composed: every run used the same clean-room data."""
        return epsilon_of([entry for key in sorted(self._runs) for entry in self._runs[key]], delta=delta)

    def total_epsilon_after(self, *, noise_multiplier: float, sample_rate: float, delta: float) -> float:
        """ε of all runs composed if one more release at (σ, q) were recorded in this run."""
        runs = dict(self._runs)
        runs[self.run_key] = _append_step(
            runs.get(self.run_key, []), noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate)
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
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _append_step(history: History, *, noise_multiplier: float, sample_rate: float) -> History:
    """``history`` plus one step, merged into the last entry when (σ, q) repeat (as RDPAccountant.step)."""
    if history and history[-1][:2] == (noise_multiplier, sample_rate):
        return [*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + 1)]
    return [*history, (noise_multiplier, sample_rate, 1)]


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
