"""Bytes on the wire per round, and what compression costs in holdout AUC.

Settings, each trained on the same data (the ε=3 forward-corrected label set), with
the same seed, rounds and batches:

(i)   ``full_model_dense_fp32``: what full fine-tuning (or split learning's
      per-round exchange of the whole model's gradient) would send — the dense
      float32 gradient of every backbone and adapter parameter up, the dense
      weights down. Its bytes are measured by serializing real protocol messages
      of that size exactly as Flower does; its AUC comes from the same update
      computed in one process (full fine-tuning with Adam at ``--full-lr``, same
      batches and schedule): moving 3.9 MB per clean room per round through the
      simulation engine for 100 rounds would measure the engine, not the model.
(ii)  ``dense_adapter_fp32``: the federated run with codec ``none`` both ways.
(iii) one federated run per codec in ``--codecs`` (error feedback on; downstream
      deltas compressed with ``--downstream-codec``).

Bytes per round are the sums over clean rooms of every message's deflated object
tree (``pcvr.platform.federation.wire_bytes``), averaged over rounds.

    python benchmarks/communication.py [--rows 300000] [--rounds 100]

Prints one JSON line: per setting bytes up/down per round and final AUC, and for
each codec setting ``ratio_vs_full_model`` and ``ratio_vs_dense_adapter`` (upstream
bytes of the reference divided by the codec's) and ``auc_delta_vs_dense_adapter``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message
from flwr.common import Metadata

from pcvr.data.synth import WorldConfig
from pcvr.models.cvr import attach_adapters, load_backbone, parameter_counts
from pcvr.platform.app import load_oracle_holdout
from pcvr.platform.evaluate import holdout_metrics, predict
from pcvr.platform.federation import wire_bytes
from pcvr.protocols.codecs import Codec, encode
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.messages import Binding, TrainIns, TrainReply
from pcvr.simulate import SimulationSpec, prepare, run_setting

from centralized import load_rooms, pooled_step  # benchmarks/centralized.py, beside this script

DEFAULT_CODECS = "q8,q4,topk:0.05,topk:0.05+q8,topk:0.05+q4,topk:0.03+q4"
NONE = Codec.parse("none")


def _metadata(*, message_type: str, reply: bool) -> Metadata:
    """Metadata as a deployment run would carry (64-bit ids, a reply-to id on replies)."""
    return Metadata(
        run_id=2**63 + 12345,
        message_id="",
        src_node_id=2**63 + 777 if reply else 1,
        dst_node_id=1 if reply else 2**63 + 777,
        reply_to_message_id="f" * 64 if reply else "",
        group_id="1",
        created_at=time.time(),
        ttl=43200.0,
        message_type=message_type,
    )


def full_model_bytes(num_params: int, *, batch_size: int) -> tuple[int, int]:
    """Wire bytes of one dense fp32 reply (the whole model's gradient) and one dense instruction."""
    vector = np.random.default_rng(0).normal(size=num_params).astype(np.float32)
    frame = encode(vector, NONE, generator=np.random.default_rng(0))
    binding = Binding(run_id=2**63 + 12345, round=50, node_id=2**63 + 777)
    reply = TrainReply(binding=binding, codec=NONE, size=num_params, grad=frame, num_examples=batch_size, loss=0.1)
    ins = TrainIns(
        binding=binding, base_round=0, codec=NONE, size=num_params, weights=frame, batch_size=batch_size, min_batch_size=1024,
        correction=Correction.FORWARD,
    )
    up = wire_bytes(Message(metadata=_metadata(message_type="train", reply=True), content=reply.to_record()))
    down = wire_bytes(Message(metadata=_metadata(message_type="train", reply=False), content=ins.to_record()))
    return up, down


def full_finetune_auc(spec: SimulationSpec, *, label_set: str, learning_rate: float) -> float:
    """Full fine-tuning of every parameter, same batches and schedule as the federated runs."""
    torch.set_num_threads(2)
    model = load_backbone(spec.layout.platform.backbone)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    holdout = load_oracle_holdout(spec.layout.platform, model)
    features, labels = holdout.features, holdout.labels
    rooms = load_rooms(spec, label_set=label_set)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    for step in range(1, spec.num_rounds + 1):
        pooled_step(model, optimizer, rooms, spec, step=step, peak_learning_rate=learning_rate)
    return holdout_metrics(labels, predict(model, features))["auc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated codec settings")
    parser.add_argument("--downstream-codec", default="q8")
    parser.add_argument("--full-lr", type=float, default=1e-3, help="Adam step size for full fine-tuning (i)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    spec = SimulationSpec(
        work_dir=args.work_dir, world=WorldConfig(rows=args.rows), num_rounds=args.rounds, eval_every=args.rounds
    )
    prepare(spec)
    label_set = spec.private_label_set
    rooms = spec.world.advertisers
    backbone = load_backbone(spec.layout.platform.backbone)
    counts = parameter_counts(attach_adapters(backbone))
    up, down = full_model_bytes(counts["backbone"] + counts["adapters"], batch_size=spec.batch_size)
    settings: dict[str, dict] = {
        "full_model_dense_fp32": {
            "bytes_up_per_round": up * rooms,
            "bytes_down_per_round": down * rooms,
            "auc": full_finetune_auc(spec, label_set=label_set, learning_rate=args.full_lr),
            "auc_from": "in-process full fine-tuning, same batches",
        }
    }

    def federated(name: str, codec: Codec, downstream: Codec) -> dict:
        result = run_setting(
            spec, name=f"comm-{name}", label_set=label_set, correction=spec.correction, codec=codec, downstream_codec=downstream
        )
        return {
            "codec": str(codec),
            "downstream_codec": str(downstream),
            "bytes_up_per_round": result["bytes_up_per_round"],
            "bytes_down_per_round": result["bytes_down_per_round"],
            "auc": result["final"]["auc"],
            "calibration": result["final"]["calibration"],
            "rejected": result["rejected"],
        }

    settings["dense_adapter_fp32"] = federated("none", NONE, NONE)
    reference_up, reference_auc = settings["dense_adapter_fp32"]["bytes_up_per_round"], settings["dense_adapter_fp32"]["auc"]
    for text in args.codecs.split(","):
        codec = Codec.parse(text.strip())
        entry = federated(str(codec), codec, Codec.parse(args.downstream_codec))
        entry["ratio_vs_full_model"] = round(up * rooms / entry["bytes_up_per_round"], 1)
        entry["ratio_vs_dense_adapter"] = round(reference_up / entry["bytes_up_per_round"], 2)
        entry["auc_delta_vs_dense_adapter"] = round(entry["auc"] - reference_auc, 5)
        settings[str(codec)] = entry
    for entry in settings.values():
        entry["auc"] = round(entry["auc"], 5)
        if "calibration" in entry:
            entry["calibration"] = round(entry["calibration"], 4)
    print(
        json.dumps(
            {
                "benchmark": "communication",
                "rows": args.rows,
                "rounds": args.rounds,
                "clean_rooms": rooms,
                "batch_size": spec.batch_size,
                "parameters": counts,
                "settings": settings,
            }
        )
    )


if __name__ == "__main__":
    main()
