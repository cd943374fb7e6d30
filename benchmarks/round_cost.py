"""What a Flower round costs: federated simulation vs plain centralized torch, same data, same target.

Both train the same adapters on the same clean-room rows (the ε=3, forward-corrected
label set), with the same batches (each step: one ``batch_size`` batch from every
clean room), the same Adam and learning-rate schedule. The centralized baseline is
one process looping over the joined data; the federated run is the platform's
ServerApp and one ClientApp per clean room in Flower's simulation engine.

The target AUC is 95% of the way from the frozen backbone's AUC to the best AUC the
centralized run reaches; each side's time to target counts training only (holdout
evaluation excluded), and the federated side also reports its engine start-up.

    python benchmarks/round_cost.py [--rows 300000] [--rounds 100] [--local-steps 1] [--work-dir runs/bench]

Prints one JSON line.
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

from pcvr.data.synth import WorldConfig
from pcvr.models.cvr import load_backbone
from pcvr.platform.app import load_oracle_holdout
from pcvr.platform.evaluate import holdout_metrics, predict
from pcvr.platform.training import AdapterTrainer
from pcvr.protocols.codecs import Codec
from pcvr.simulate import SimulationSpec, prepare, run_setting

from centralized import load_rooms, pooled_step  # benchmarks/centralized.py, beside this script


def centralized(spec: SimulationSpec, *, label_set: str, eval_every: int) -> list[dict]:
    """Plain torch on the pooled clean-room rows; returns evaluations with cumulative train seconds."""
    torch.set_num_threads(2)
    backbone = load_backbone(spec.layout.platform.backbone)
    holdout = load_oracle_holdout(spec.layout.platform, backbone)
    features, labels = holdout.features, holdout.labels
    rooms = load_rooms(spec, label_set=label_set)
    trainer = AdapterTrainer(backbone, learning_rate=spec.learning_rate, total_steps=spec.num_rounds, seed=spec.seed)
    model, optimizer = trainer.model, trainer.optimizer
    evaluations, train_s = [], 0.0
    for step in range(1, spec.num_rounds + 1):
        started = time.perf_counter()
        pooled_step(model, optimizer, rooms, spec, step=step, peak_learning_rate=spec.learning_rate)
        train_s += time.perf_counter() - started
        if step % eval_every == 0 or step == spec.num_rounds:
            evaluations.append({"round": step, "train_s": train_s, **holdout_metrics(labels, predict(model, features))})
    return evaluations


def clean_room_compute_s(spec: SimulationSpec, *, label_set: str) -> float:
    """Median seconds of one clean room's ClientApp answering a round-1 train instruction, in this process.

    The real ClientApp on the real clean-room directory, without Flower's engine around
    it: what the exchange time of a round spends inside a clean room.
    """
    import time as clock

    from flwr.app import Context, Message, RecordDict
    from flwr.common import Metadata

    from pcvr.clean_room.app import make_client_app
    from pcvr.models.cvr import attach_adapters, get_adapter_vector, parameter_counts
    from pcvr.protocols.codecs import encode
    from pcvr.protocols.messages import Binding, TrainIns

    none = Codec.parse("none")
    model = attach_adapters(load_backbone(spec.layout.platform.backbone), seed=spec.seed)
    weights = get_adapter_vector(model).numpy()
    config = spec.run_config(label_set=label_set, correction=spec.correction, name="round_cost", codec=none, downstream_codec=none)
    app = make_client_app(config.to_run_config(), clean_room_dirs={k: spec.layout.clean_room(k).root for k in range(spec.world.advertisers)})
    seconds = []
    for k in range(spec.world.advertisers):
        for repeat in range(3):
            run_id = 1000 + repeat
            ins = TrainIns(
                binding=Binding(run_id=run_id, round=1, node_id=7), base_round=0, codec=none,
                size=parameter_counts(model)["adapters"], weights=encode(weights, none, generator=np.random.default_rng(0)),
                batch_size=spec.batch_size, min_batch_size=spec.min_batch_size, correction=spec.correction,
                learning_rate=spec.learning_rate, local_steps=spec.local_steps,
            )
            metadata = Metadata(
                run_id=run_id, message_id="m" * 64, src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="1",
                created_at=clock.time(), ttl=600.0, message_type="train",
            )
            context = Context(run_id=run_id, node_id=7, node_config={"clean-room-id": k}, state=RecordDict(), run_config={})
            started = clock.perf_counter()
            reply = app(Message(metadata=metadata, content=ins.to_record()), context)
            seconds.append(clock.perf_counter() - started)
            if reply.has_error():
                raise SystemExit(f"round_cost: clean room {k} refused the probe: {reply.error.reason}")
    return float(np.median(seconds))


def first_reaching(evaluations: list[dict], target: float) -> dict | None:
    return next((e for e in evaluations if e["auc"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=1, help="Adam steps each clean room takes per federated round")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    spec = SimulationSpec(
        work_dir=args.work_dir, world=WorldConfig(rows=args.rows), num_rounds=args.rounds, eval_every=args.eval_every,
        local_steps=args.local_steps,
    )
    prepare(spec)
    label_set = spec.private_label_set
    backbone = load_backbone(spec.layout.platform.backbone)
    holdout = load_oracle_holdout(spec.layout.platform, backbone)
    features, labels = holdout.features, holdout.labels
    backbone_auc = holdout_metrics(labels, predict(backbone, features))["auc"]

    central = centralized(spec, label_set=label_set, eval_every=args.eval_every)
    started = time.perf_counter()
    none = Codec.parse("none")  # dense both ways: the federated update is then exactly the centralized one
    federated = run_setting(
        spec, name="round_cost", label_set=label_set, correction=spec.correction, codec=none, downstream_codec=none
    )
    simulation_wall_s = time.perf_counter() - started

    best = max(e["auc"] for e in central)
    target = backbone_auc + 0.95 * (best - backbone_auc)
    central_hit = first_reaching(central, target)
    federated_hit = first_reaching(federated["evaluations"], target)
    startup_s = simulation_wall_s - federated["wall_s"]
    round_s = [r["wall_s"] for r in federated["history"]]
    median = lambda key: round(float(np.median([r[key] for r in federated["history"]])), 4)  # noqa: E731
    room_s = clean_room_compute_s(spec, label_set=label_set)
    out = {
        "benchmark": "round_cost",
        "rows": args.rows,
        "clean_rooms": spec.world.advertisers,
        "batch_size": spec.batch_size,
        "local_steps": spec.local_steps,
        "backbone_auc": round(backbone_auc, 5),
        "target_auc": round(target, 5),
        "centralized": {
            "rounds_to_target": central_hit and central_hit["round"],
            "seconds_to_target": central_hit and round(central_hit["train_s"], 3),
            "seconds_per_step": round(central[-1]["train_s"] / args.rounds, 4),
            "final_auc": round(central[-1]["auc"], 5),
        },
        "federated": {
            "rounds_to_target": federated_hit and federated_hit["round"],
            "seconds_to_target": federated_hit and round(federated_hit["train_s"], 3),
            "seconds_per_round_median": round(float(np.median(round_s)), 4),
            "engine_startup_s": round(startup_s, 2),
            "final_auc": round(federated["final"]["auc"], 5),
            # the median round, on the platform's clock; the exchange holds the clean rooms' work
            # (each room's ClientApp, timed alone in this process: clean_room_compute_s) and the engine's
            "per_round_median_s": {
                "instructions": median("instructions_s"),
                "exchange": median("exchange_s"),
                "apply": median("apply_s"),
                "checkpoint": median("checkpoint_s"),
                "clean_room_compute": round(room_s, 4),
            },
            "evaluation_s_mean": round(float(np.mean([e["eval_s"] for e in federated["evaluations"]])), 4),
        },
    }
    if central_hit and federated_hit:
        out["ratio_seconds_to_target"] = round(federated_hit["train_s"] / central_hit["train_s"], 2)
        out["ratio_seconds_to_target_with_startup"] = round(
            (federated_hit["train_s"] + startup_s) / central_hit["train_s"], 2
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
