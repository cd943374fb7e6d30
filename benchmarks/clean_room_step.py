"""What the clean room's gradient step costs against plain torch on the same model and batch.

The clean room's step (:func:`pcvr.clean_room.task.batch_gradient`, after
:func:`~pcvr.clean_room.task.batch_indices` draws the round's rows) gathers the
batch from its joined rows, computes the de-biased loss, back-propagates into the
adapters and flattens their summed gradient. The baseline is what a plain torch
training loop does with the same adapted model on the same rows: forward, binary
cross-entropy, backward — on a batch gathered beforehand, so every cost the clean
room adds (gather, correction, flattening, the minimum-batch check) counts
against it.

Both run in this process, interleaved repetition by repetition, on the same
threads; the figure is the ratio of their median rows/s (target ≥ 0.9).

    python benchmarks/clean_room_step.py [--rows 200000] [--batch-size 8192] [--repeats 30]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pcvr.clean_room.dataset import CleanRoomData
from pcvr.clean_room.task import batch_gradient, batch_indices
from pcvr.models.cvr import CVRNet, ModelConfig, adapter_parameters, attach_adapters
from pcvr.models.features import EncodedFeatures
from pcvr.protocols.label_dp import Correction, flip_prob

BUCKETS = (50_000, 5_000, 1_000, 16, 64, 8, 16, 8)  # the synthetic world's fields
NUM_DENSE = 18


def random_rooms_data(rows: int, *, generator: torch.Generator) -> CleanRoomData:
    """Joined rows of the synthetic world's shape: values are random, only their shapes matter here."""
    categorical = torch.stack([torch.randint(0, n, (rows,), generator=generator) for n in BUCKETS], dim=1)
    dense = torch.randn(rows, NUM_DENSE, generator=generator)
    noisy = (torch.rand(rows, generator=generator) < 0.1).float()
    flips = torch.full((rows,), flip_prob(epsilon=3.0))
    return CleanRoomData(features=EncodedFeatures(categorical, dense), noisy_labels=noisy, flip_probs=flips)


def plain_step(model: torch.nn.Module, features: EncodedFeatures, labels: torch.Tensor) -> None:
    for parameter in adapter_parameters(model):
        parameter.grad = None
    F.binary_cross_entropy_with_logits(model(features), labels, reduction="sum").backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    data = random_rooms_data(args.rows, generator=generator)
    model = attach_adapters(CVRNet(ModelConfig(buckets=BUCKETS, num_dense=NUM_DENSE)), seed=0)
    model.train()
    room_s, plain_s = [], []
    for repeat in range(args.repeats + 2):  # two warm-up repetitions, not counted
        started = time.perf_counter()
        index = batch_indices(args.rows, round_=repeat + 1, batch_size=args.batch_size, seed=0, clean_room_id=0)
        batch_gradient(model, data, index, correction=Correction.FORWARD, min_batch_size=args.batch_size)
        room = time.perf_counter() - started

        features, labels = data.features.take(index), data.noisy_labels[index]
        started = time.perf_counter()
        plain_step(model, features, labels)
        plain = time.perf_counter() - started
        if repeat >= 2:
            room_s.append(room)
            plain_s.append(plain)

    room_rate = args.batch_size / statistics.median(room_s)
    plain_rate = args.batch_size / statistics.median(plain_s)
    print(
        json.dumps(
            {
                "benchmark": "clean_room_step",
                "rows": args.rows,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "threads": args.threads,
                "clean_room_rows_per_s": round(room_rate),
                "plain_torch_rows_per_s": round(plain_rate),
                "ratio": round(room_rate / plain_rate, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
