"""The platform's Flower ServerApp: load the backbone and holdout, run the round loop, write results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pcvr.data.io import write_json_atomic
from pcvr.models.cvr import backbone_digest, load_backbone, parameter_counts
from pcvr.platform.federation import CHECKPOINT_FILE, RUN_FAILED_PREFIX, Holdout, run_federated_training
from pcvr.platform.features import read_labelled
from pcvr.platform.training import AdapterTrainer, format_private
from pcvr.protocols.run_config import RunConfig

__all__ = ["app", "make_server_app", "backbone_dir", "holdout_path", "write_privacy_ledger"]

log = logging.getLogger(__name__)


def backbone_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "platform" / "backbone"


def holdout_path(data_dir: Path) -> Path:
    return Path(data_dir) / "world" / "holdout.parquet"


def write_privacy_ledger(path: Path, config: RunConfig, *, run_id: int, ledgers: dict[str, dict]) -> dict:
    """The run's privacy ledger: what the platform enforced, and what each clean room reported."""
    ledger = {
        "run_id": run_id,
        "rounds": config.num_rounds,
        "platform": {
            "min_batch_size": config.min_batch_size,
            "batch_size": config.batch_size,
            "codec": str(config.codec),
            "downstream_codec": str(config.downstream_codec),
            "correction": config.correction.value,
        },
        "clean_rooms": {node: ledgers[node] for node in sorted(ledgers)},
        "private_evaluation": {
            "label_dp_epsilon_spent": 0.0,
            "why": "each clean room releases only sums over its held-out split: post-processing of "
            "epsilon-label-DP noisy labels, on rows that never enter a gradient",
        },
    }
    write_json_atomic(path, ledger)
    return ledger


def make_server_app(defaults: Mapping[str, object] | None = None, *, on_round: Callable[[str], None] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``defaults`` overlaid by Flower's ``context.run_config``.

    ``on_round`` gets one line per round; the deployed app prints them, and Flower
    streams a ServerApp's output to ``flwr run --stream``.
    """
    defaults = dict(defaults or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        started = time.monotonic()
        config = RunConfig.from_run_config({**defaults, **context.run_config})
        backbone = load_backbone(backbone_dir(config.data_dir))
        digest = backbone_digest(backbone)
        features, labels, _ = read_labelled(holdout_path(config.data_dir), buckets=backbone.config.buckets)
        trainer = AdapterTrainer(
            backbone, learning_rate=config.learning_rate, total_steps=config.num_rounds, seed=config.seed
        )
        torch.set_num_threads(1)
        resume = _resume_state(config, trainer)
        run_log = run_federated_training(
            grid, config, trainer, Holdout(features, labels), backbone=digest, on_round=on_round, resume=resume
        )
        run_id = config.resume_run or grid.run.run_id  # a resumed run is the run it resumes
        write_privacy_ledger(config.run_dir / "privacy_ledger.json", config, run_id=run_id, ledgers=run_log.ledgers)
        result = run_log.write(
            config.run_dir / "result.json",
            rounds=config.num_rounds,
            min_share=config.min_participation,
            run_id=run_id,
            config=config.to_run_config(),
            parameters=parameter_counts(trainer.model),
            final=run_log.evaluations[-1] if run_log.evaluations else None,
            wall_s=time.monotonic() - started,
        )
        log.info("%s", format_private(result["private"]))
        for line in result["failures"]:
            log.error("run failed: %s", line)
            if on_round is not None:
                on_round(f"{RUN_FAILED_PREFIX}: {line}")

    return server_app


def _resume_state(config: RunConfig, trainer: AdapterTrainer) -> dict | None:
    """With ``resume-run``: restore ``trainer`` from the run dir's checkpoint and return where the run stood.

    Raises:
        ValueError: no checkpoint, or one of another run.
    """
    if not config.resume_run:
        return None
    path = config.run_dir / CHECKPOINT_FILE
    state = AdapterTrainer.saved_run_state(path)
    if state is None or state.get("run") != config.resume_run:
        found = None if state is None else state.get("run")
        raise ValueError(f"{path}: holds run {found}, not run {config.resume_run}; nothing to resume")
    trainer.restore(path)
    return state


def _print_line(line: str) -> None:
    print(line, flush=True)


app = make_server_app(on_round=_print_line)  # what a SuperLink runs: one line per round on its output
