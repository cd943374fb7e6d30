"""The DP-SGD release itself: Opacus' per-sample clipping and noise on the adapter gradient.

Apart from :mod:`pcvr.clean_room.dp_sgd` (configuration, Poisson sampling and the
accountant) because importing Opacus costs seconds, and in deployment every message
starts a fresh ClientApp process: a clean room without DP-SGD noise never imports it
(:mod:`pcvr.clean_room.app` imports this module only on a noisy round). The
mechanism and its guarantee are described in :mod:`pcvr.clean_room.dp_sgd`.
"""

from __future__ import annotations

import math
import warnings

import torch
from opacus import GradSampleModule
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer

from pcvr.clean_room.dataset import CleanRoomData
from pcvr.clean_room.dp_sgd import _check_clip_norm
from pcvr.clean_room.task import BatchGradient
from pcvr.models.cvr import GatedLoRALinear, adapter_grad_vector, adapter_parameters
from pcvr.protocols.label_dp import Correction, corrected_loss

__all__ = ["private_batch_gradient"]


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
