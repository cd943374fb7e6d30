"""The federated update computed in one process, shared by the benchmarks that compare against it.

Each step takes the same batch from every clean room that the federated run would
(:func:`pcvr.clean_room.task.batch_indices`), the same corrected loss, and the
same cosine learning-rate schedule; the optimizer is the caller's.
"""

from __future__ import annotations

import torch

from pcvr.clean_room.dataset import CleanRoomData, load_training_data
from pcvr.clean_room.task import batch_indices
from pcvr.platform.training import cosine_learning_rate
from pcvr.protocols.label_dp import corrected_loss
from pcvr.simulate import SimulationSpec


def load_rooms(spec: SimulationSpec, *, label_set: str) -> list[CleanRoomData]:
    """Every clean room's joined training rows for ``label_set``."""
    return [
        load_training_data(
            spec.layout.clean_room(k).label_set(label_set).train)
        for k in range(spec.world.advertisers)
    ]


def pooled_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rooms: list[CleanRoomData],
    spec: SimulationSpec,
    *,
    step: int,
    peak_learning_rate: float,
) -> None:
    """One optimizer step (``step`` is 1-based) on the pooled batches of round ``step``."""
    batches = [
        (room, batch_indices(len(room), round_=step, batch_size=spec.batch_size, seed=spec.seed, clean_room_id=k))
        for k, room in enumerate(rooms)
    ]
    model.train()
    logits = torch.cat([model(room.features.take(index)) for room, index in batches])
    noisy = torch.cat([room.noisy_labels[index] for room, index in batches])
    flips = torch.cat([room.flip_probs[index] for room, index in batches])
    loss = corrected_loss(logits, noisy, flips, correction=spec.correction).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in optimizer.param_groups:
        group["lr"] = cosine_learning_rate(step - 1, peak=peak_learning_rate, total_steps=spec.num_rounds)
    optimizer.step()
