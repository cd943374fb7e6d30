"""The platform's Flower ServerApp: load the backbone, run the round loop, write results.

The platform holds no true labels of the clean rooms' clicks: the run's final figures
are the clean rooms' private evaluation (:func:`~pcvr.platform.federation.collect_private_evaluation`).
Only a simulation's platform directory holds an oracle holdout (the synthetic world's
true labels, :attr:`~pcvr.protocols.layout.PlatformDir.oracle_holdout`); when it is
there, the platform also evaluates on it every ``eval_every`` rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pcvr.data.encoding import FeatureEncoding
from pcvr.data.io import write_json_atomic
from pcvr.data.spec import DatasetSpec
from pcvr.models.cvr import CVRNet, backbone_digest, load_backbone, parameter_counts
from pcvr.platform.federation import CHECKPOINT_FILE, RUN_FAILED_PREFIX, Holdout, run_federated_training
from pcvr.platform.features import read_labelled
from pcvr.platform.training import AdapterTrainer, RunLog, format_private
from pcvr.protocols.layout import PRIVACY_LEDGER_FILE, RESULT_FILE, PlatformDir
from pcvr.protocols.run_config import RunConfig

__all__ = ["app", "make_server_app", "load_oracle_holdout", "final_figures", "write_privacy_ledger"]

log = logging.getLogger(__name__)


def load_oracle_holdout(platform: PlatformDir, backbone: CVRNet) -> Holdout | None:
    """The simulation's holdout with true labels, encoded for ``backbone``; None outside a simulation."""
    if not platform.oracle_spec.exists():
        return None
    features, labels, _ = read_labelled(DatasetSpec.load(platform.oracle_spec), FeatureEncoding.load(platform.backbone))
    return Holdout(features, labels)


def final_figures(run_log: RunLog) -> dict | None:
    """The run's final AUC, NE and calibration: the last true-label evaluation in a simulation,
    else the clean rooms' private evaluation (its values; the standard errors are in ``private``)."""
    if run_log.evaluations:
        return {**run_log.evaluations[-1], "evaluated_on": "oracle holdout"}
    private = run_log.private
    if private is None or private.metrics is None:
        return None
    entry = private.to_dict()
    return {
        "round": private.round,
        **{name: entry[name]["value"] for name in ("auc", "ne", "calibration")},
        "evaluated_on": "private evaluation",
    }


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
        platform = PlatformDir(config.platform_dir)
        backbone = load_backbone(platform.backbone)
        digest = backbone_digest(backbone)
        holdout = load_oracle_holdout(platform, backbone)
        trainer = AdapterTrainer(
            backbone, learning_rate=config.learning_rate, total_steps=config.num_rounds, seed=config.seed
        )
        torch.set_num_threads(1)
        resume = _resume_state(config, trainer)
        run_log = run_federated_training(
            grid, config, trainer, holdout, backbone=digest, on_round=on_round, resume=resume
        )
        run_id = config.resume_run or grid.run.run_id  # a resumed run is the run it resumes
        write_privacy_ledger(config.run_dir / PRIVACY_LEDGER_FILE, config, run_id=run_id, ledgers=run_log.ledgers)
        result = run_log.write(
            config.run_dir / RESULT_FILE,
            rounds=config.num_rounds,
            min_share=config.min_participation,
            run_id=run_id,
            config=config.to_run_config(),
            parameters=parameter_counts(trainer.model),
            final=final_figures(run_log),
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
