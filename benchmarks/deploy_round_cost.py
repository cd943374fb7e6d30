"""What a deployment round costs: real processes over TLS with SuperNode auth vs centralized torch.

``pcvr deploy local`` on loopback — a SuperLink with TLS and SuperNode authentication, one
SuperNode per clean room (3), each message answered by a fresh ClientApp process — trains the
same adapters on the same clean-room rows as the centralized baseline of
``benchmarks/round_cost.py`` (plain torch on the pooled batches, same Adam and schedule). Each
deployment round carries ``--local-steps`` Adam steps per clean room; the platform adds the
rooms' example-weighted mean change.

The target AUC is 95% of the way from the frozen backbone's AUC to the best the centralized run
reaches. Each side's time to target counts training only (holdout evaluation excluded); the
deployment's start-up (SuperLink, key registration, SuperNodes coming online, pre-flight) is
reported apart, as is the per-round breakdown and what one ClientApp process pays to import pcvr
before it can answer.

    python benchmarks/deploy_round_cost.py [--rows 300000] [--rounds 12] [--local-steps 8]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pcvr.data.synth import WorldConfig
from pcvr.deploy.local import LocalDeployment, deploy_local
from pcvr.models.cvr import load_backbone
from pcvr.platform.app import load_oracle_holdout
from pcvr.platform.evaluate import holdout_metrics, predict
from pcvr.protocols.codecs import Codec
from pcvr.simulate import SimulationSpec, prepare

from round_cost import centralized, first_reaching  # benchmarks/round_cost.py, beside this script


def import_seconds(*, repeats: int = 3) -> float:
    """Median wall seconds of a fresh Python process importing the ClientApp: the floor of every message."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import pcvr.clean_room.app"], check=True, timeout=120)
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=12, help="deployment rounds (default: %(default)s)")
    parser.add_argument("--local-steps", type=int, default=8, help="Adam steps per clean room per round (default: %(default)s)")
    parser.add_argument("--central-steps", type=int, default=100, help="centralized steps (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=5, help="centralized evaluation interval (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8800, help="the SuperLink's port; the SuperNodes take the next 3")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    spec = SimulationSpec(
        work_dir=args.work_dir, world=WorldConfig(rows=args.rows), num_rounds=args.central_steps, eval_every=args.eval_every
    )
    prepare(spec)
    label_set = spec.private_label_set
    backbone = load_backbone(spec.layout.platform.backbone)
    holdout = load_oracle_holdout(spec.layout.platform, backbone)
    backbone_auc = holdout_metrics(holdout.labels, predict(backbone, holdout.features))["auc"]
    central = centralized(spec, label_set=label_set, eval_every=args.eval_every)
    best = max(e["auc"] for e in central)
    target = backbone_auc + 0.95 * (best - backbone_auc)
    central_hit = first_reaching(central, target)

    none = Codec.parse("none")  # dense both ways, as round_cost's federated run
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    deployment = LocalDeployment(
        work_dir=args.work_dir,
        run_dir=args.work_dir / "deployments" / f"round-cost-{stamp}",
        clean_rooms=spec.world.advertisers,
        port=args.port,
        run_config=dataclasses.replace(
            spec.run_config(label_set=label_set, correction=spec.correction, name="deploy_round_cost", codec=none, downstream_codec=none),
            num_rounds=args.rounds, eval_every=1, local_steps=args.local_steps,
        ).to_run_config(),  # the settings round_cost's federated run uses; deploy_local sets the directories
    )
    started = time.perf_counter()
    result = deploy_local(deployment, out=lambda line: print(line, file=sys.stderr, flush=True))
    deployment_wall_s = time.perf_counter() - started
    if result["failures"]:
        raise SystemExit(f"deploy_round_cost: the run failed: {result['failures'][0]}")
    hit = first_reaching(result["evaluations"], target)
    median = lambda key: round(float(np.median([r[key] for r in result["history"]])), 3)  # noqa: E731
    out = {
        "benchmark": "deploy_round_cost",
        "rows": args.rows,
        "clean_rooms": spec.world.advertisers,
        "batch_size": spec.batch_size,
        "local_steps": args.local_steps,
        "transport": "TLS + SuperNode auth, loopback",
        "backbone_auc": round(backbone_auc, 5),
        "target_auc": round(target, 5),
        "centralized": {
            "steps_to_target": central_hit and central_hit["round"],
            "seconds_to_target": central_hit and round(central_hit["train_s"], 3),
            "seconds_per_step": round(central[-1]["train_s"] / args.central_steps, 4),
            "final_auc": round(central[-1]["auc"], 5),
        },
        "deployment": {
            "rounds_to_target": hit and hit["round"],
            "seconds_to_target": hit and round(hit["train_s"], 2),
            "seconds_per_round_median": median("wall_s"),
            "startup_s": round(deployment_wall_s - result["wall_s"], 1),
            "final_auc": round(result["final"]["auc"], 5),
            # the median round on the platform's clock; the exchange holds each clean room's ClientApp process
            # (started per message: import_s of it is pcvr's own import) and the SuperNodes' polling
            "per_round_median_s": {
                "instructions": median("instructions_s"),
                "exchange": median("exchange_s"),
                "apply": median("apply_s"),
                "checkpoint": median("checkpoint_s"),
                "clientapp_import": round(import_seconds(), 3),
            },
            "evaluation_s_mean": round(float(np.mean([e["eval_s"] for e in result["evaluations"]])), 3),
            "auc_by_round": [round(e["auc"], 4) for e in result["evaluations"]],
        },
    }
    if central_hit and hit:
        out["ratio_seconds_to_target"] = round(hit["train_s"] / central_hit["train_s"], 2)
    elif central_hit:  # not reached: say how far one round alone is from the centralized run's whole time
        out["ratio_seconds_to_target"] = None
        out["ratio_one_round_to_centralized_time_to_target"] = round(
            float(np.median([r["wall_s"] for r in result["history"]])) / central_hit["train_s"], 2
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
