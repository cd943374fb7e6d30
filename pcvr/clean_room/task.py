"""One clean-room step: a batch-aggregated, de-biased adapter gradient. No Flower here.

The clean room samples a batch of its joined rows, computes the corrected loss
(``pcvr.protocols.label_dp``) against the noisy labels, back-propagates into the
adapters and *sums* the gradient over the batch. Only that sum and the batch
size leave; a batch smaller than ``min_batch_size`` is never computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pcvr.clean_room.dataset import CleanRoomData
from pcvr.models.cvr import adapter_grad_vector, adapter_parameters
from pcvr.protocols.label_dp import Correction, corrected_loss

__all__ = ["BatchGradient", "batch_indices", "batch_gradient"]


@dataclass(frozen=True)
class BatchGradient:
    adapter_grad: np.ndarray  # float32 [P], summed over the batch
    num_examples: int
    loss: float  # mean corrected loss over the batch


def batch_indices(num_rows: int, *, round_: int, batch_size: int, seed: int, clean_room_id: int) -> torch.Tensor:
    """Rows for ``round_`` (1-based): consecutive slices of a per-epoch random permutation.

    Each epoch is a fresh permutation, private to the clean room
    (seeded by its own seed and id), so the platform does not learn which rows a
    gradient came from. Batches are full: the ``num_rows % batch_size`` rows left
    over in an epoch are not used in it (they are in others, as the order changes).
    """
    if num_rows < 1:
        raise ValueError("the clean room has no training rows")
    batches_per_epoch = max(1, num_rows // batch_size)
    epoch, slot = divmod(round_ - 1, batches_per_epoch)
    state = np.random.SeedSequence([seed, clean_room_id, epoch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    order = torch.randperm(num_rows, generator=generator)
    return order[slot * batch_size : (slot + 1) * batch_size]


def batch_gradient(
    model: torch.nn.Module,
    data: CleanRoomData,
    index: torch.Tensor,
    *,
    correction: Correction,
    min_batch_size: int,
) -> BatchGradient:
    """Sum of per-row adapter gradients of the corrected loss over the rows ``index``.

    Raises:
        ValueError: the batch has fewer than ``min_batch_size`` rows.
    """
    if len(index) < min_batch_size:
        raise ValueError(f"batch of {len(index)} rows is below min_batch_size={min_batch_size}; not sent")
    for parameter in adapter_parameters(model):
        parameter.grad = None
    model.train()
    logits = model(data.features.take(index))
    losses = corrected_loss(logits, data.noisy_labels[index], data.flip_probs[index], correction=correction)
    losses.sum().backward()
    return BatchGradient(
        adapter_grad=adapter_grad_vector(model).numpy(),
        num_examples=len(index),
        loss=float(losses.detach().mean()),
    )
