"""One clean-room round: a batch-aggregated, de-biased adapter gradient, or local steps. No Flower here.

The clean room samples a batch of its joined rows, computes the corrected loss
(``pcvr.protocols.label_dp``) against the noisy labels, back-propagates into the
adapters and *sums* the gradient over the batch. Only that sum and the batch
size leave; a batch smaller than ``min_batch_size`` is never computed.

With several local steps per round (:func:`local_update`) the clean room takes
those steps itself with the platform's update rule (Adam), each on a full batch,
and only the resulting change of the adapter weights leaves: a function of the
batch-summed gradients of those steps, never of fewer rows than a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pcvr.clean_room.dataset import CleanRoomData
from pcvr.models.cvr import adapter_grad_vector, adapter_parameters, get_adapter_vector
from pcvr.protocols.label_dp import Correction, corrected_loss

__all__ = ["BatchGradient", "batch_indices", "batch_gradient", "AdamMoments", "LocalUpdate", "local_update"]


@dataclass(frozen=True)
class BatchGradient:
    adapter_grad: np.ndarray  # float32 [P], summed over the batch
    num_examples: int
    loss: float | None  # mean corrected loss over the batch (None: withheld, as under DP-SGD)


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


@dataclass(frozen=True)
class AdamMoments:
    """The clean room's own Adam state over the adapters (wire order), kept between rounds; never sent."""

    exp_avg: np.ndarray  # float32 [P]
    exp_avg_sq: np.ndarray  # float32 [P]
    step: int


@dataclass(frozen=True)
class LocalUpdate:
    delta: np.ndarray  # float32 [P]: adapter weights after the local steps minus before
    num_examples: int  # rows over all local steps
    loss: float | None  # mean corrected loss over the steps' batches (None when a step withholds it)
    moments: AdamMoments


def local_update(
    model: torch.nn.Module,
    step_gradients: Sequence[Callable[[], BatchGradient]],
    *,
    learning_rate: float,
    moments: AdamMoments | None,
) -> LocalUpdate:
    """One Adam step (``torch.optim.Adam``, the platform's rule) per batch gradient, from ``model``'s weights.

    Each of ``step_gradients`` computes one batch's summed gradient at the model's
    current weights (:func:`batch_gradient`, or DP-SGD's noised sum); the step uses its
    mean over the batch, so ``learning_rate`` means what it means on the platform.
    ``moments`` continues the clean room's Adam state from its previous round
    (``None``: a fresh one). The model is left at the updated weights.

    Raises:
        ValueError: no step, or a learning rate that is not > 0.
    """
    if not step_gradients:
        raise ValueError("local_update needs at least one step")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}")
    parameters = adapter_parameters(model)
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    if moments is not None:
        _load_moments(optimizer, parameters, moments)
    start = get_adapter_vector(model).numpy().copy()
    rows, losses = [], []
    for step_gradient in step_gradients:
        grad = step_gradient()
        _set_gradients(parameters, torch.from_numpy(grad.adapter_grad / grad.num_examples))
        optimizer.step()
        rows.append(grad.num_examples)
        losses.append(grad.loss)
    return LocalUpdate(
        delta=get_adapter_vector(model).numpy() - start,
        num_examples=sum(rows),
        loss=None if None in losses else float(np.average(losses, weights=rows)),
        moments=_moments_of(optimizer, parameters),
    )


def _set_gradients(parameters: list[torch.nn.Parameter], mean_grad: torch.Tensor) -> None:
    offset = 0
    for parameter in parameters:
        parameter.grad = mean_grad[offset : offset + parameter.numel()].view_as(parameter).to(parameter.dtype).clone()
        offset += parameter.numel()


def _load_moments(optimizer: torch.optim.Adam, parameters: list[torch.nn.Parameter], moments: AdamMoments) -> None:
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        optimizer.state[parameter] = {
            "step": torch.tensor(float(moments.step)),
            "exp_avg": torch.from_numpy(moments.exp_avg[offset : offset + size].copy()).view_as(parameter),
            "exp_avg_sq": torch.from_numpy(moments.exp_avg_sq[offset : offset + size].copy()).view_as(parameter),
        }
        offset += size


def _moments_of(optimizer: torch.optim.Adam, parameters: list[torch.nn.Parameter]) -> AdamMoments:
    states = [optimizer.state[parameter] for parameter in parameters]
    return AdamMoments(
        exp_avg=torch.cat([state["exp_avg"].reshape(-1) for state in states]).numpy().astype(np.float32),
        exp_avg_sq=torch.cat([state["exp_avg_sq"].reshape(-1) for state in states]).numpy().astype(np.float32),
        step=int(states[0]["step"]),
    )
