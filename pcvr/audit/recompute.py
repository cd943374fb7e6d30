"""What the attacker recomputes: per-example logits, their adapter gradients, and loss slopes.

The platform owns the features it exported and the weights it sent, so it can
recompute, for every example of a batch, the logit z_i, the gradient J_i = ∂z_i/∂θ
of that logit w.r.t. the adapters (in wire order), and c_i(ỹ) = ∂ℓ/∂z_i for either
label — everything :mod:`pcvr.audit.attacks` needs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from pcvr.models.cvr import CVRNet, adapter_parameters
from pcvr.models.features import EncodedFeatures
from pcvr.protocols.label_dp import Correction, corrected_loss

__all__ = ["bias_offset_index", "logit_jacobian", "loss_slopes"]


def bias_offset_index(model: CVRNet) -> int:
    """Position of the output logit's bias offset in the adapter vector (its gradient is Σ c_i)."""
    offset = 0
    for parameter in adapter_parameters(model):
        if parameter is model.head.bias_offset:
            return offset
        offset += parameter.numel()
    raise ValueError("the model has no output bias offset")


def logit_jacobian(model: CVRNet, features: EncodedFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Per-example logits [B] and their gradients w.r.t. the adapters [B, P] (wire order)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def logit(params: dict, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (EncodedFeatures(categorical[None], dense[None]),)).squeeze()

    model.eval()
    with torch.no_grad():
        logits = model(features)
    per_example = vmap(grad(logit), in_dims=(None, 0, 0))(params, features.categorical, features.dense)
    jacobian = torch.cat([per_example[name].reshape(len(features), -1) for name in names], dim=1)
    return logits.numpy().astype(np.float64), jacobian.numpy()


def loss_slopes(logits: np.ndarray, flip_probs: np.ndarray, *, correction: Correction) -> tuple[np.ndarray, np.ndarray]:
    """∂ℓ/∂z per example if its noisy label were 0, and if it were 1."""
    out = []
    for label in (0.0, 1.0):
        z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        losses = corrected_loss(z, torch.full_like(z, label), torch.tensor(flip_probs, dtype=torch.float64), correction=correction)
        (slope,) = torch.autograd.grad(losses.sum(), z)
        out.append(slope.numpy())
    return out[0], out[1]
