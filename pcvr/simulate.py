"""``pcvr simulate``: a whole multi-party run on one machine, end to end.

It is made of exactly the party steps of :mod:`pcvr.parties` (what ``pcvr platform
pretrain``, ``pcvr platform export``, ``pcvr advertiser hand-off``, ``pcvr clean-room
join`` and ``pcvr train`` run), on one producer of specs, the synthetic world:

1. the synthetic world (``pcvr.data.synth``) — platform logs, advertiser conversions,
   holdout, and one dataset spec per advertiser;
2. the platform pretrains and freezes the backbone on its own clicks, and exports
   each clean room's features under the pseudonymous join key;
3. each advertiser applies its consent policy and randomized response and hands
   the noisy labels into its clean room, which joins them with the features;
4. for each setting, Flower's simulation engine runs the platform's ServerApp and
   one ClientApp per clean room. Only here does the platform directory hold an oracle
   holdout with true labels, so the platform evaluates on it; each clean room evaluates
   privately on its held-out split (de-biased sums only), printed beside the
   true-label metrics of the same rows (:mod:`pcvr.oracle`).

Preparation is idempotent: what a work directory already holds is reused while the
inputs it was made from are unchanged (:mod:`pcvr.data.prepared`), so settings can be
re-run without regenerating data or pretraining again; a changed input is rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcvr import parties
from pcvr.advertiser.policy import ConsentPolicy
from pcvr.clean_room.holdout import HOLDOUT_FRACTION
from pcvr.clean_room.policy import RoomPolicy
from pcvr.data.encoding import FeatureEncoding
from pcvr.data.io import write_bytes_atomic, write_json_atomic
from pcvr.data.prepared import prepare_artifact, require_secret
from pcvr.data.spec import DatasetSpec
from pcvr.data.synth import TRUE_PROB, WorldConfig, advertiser_spec_path, holdout_spec_path, synthesize
from pcvr.models.cvr import ModelShape, attach_adapters, load_backbone, parameter_counts
from pcvr.oracle import HeldOutRows, held_out_truth
from pcvr.platform.evaluate import holdout_metrics, predict
from pcvr.platform.features import read_labelled
from pcvr.platform.federation import CHECKPOINT_FILE
from pcvr.platform.training import AdapterTrainer, format_private
from pcvr.protocols.codecs import Codec
from pcvr.protocols.keys import load_or_create_secret
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.layout import LABELS_FILE, SimulationDir
from pcvr.protocols.names import check_name
from pcvr.protocols.run_config import RunConfig

__all__ = ["SimulationSpec", "prepare", "run_setting", "simulate", "format_table"]

log = logging.getLogger(__name__)
NON_PRIVATE = "non_private"


@dataclass(frozen=True)
class SimulationSpec:
    """Everything one ``pcvr simulate`` invocation does."""

    work_dir: Path = Path("runs/demo")
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelShape = field(default_factory=ModelShape)
    policy: ConsentPolicy = field(default_factory=ConsentPolicy.default)
    epsilon: float = 3.0
    correction: Correction = Correction.FORWARD
    num_rounds: int = 100
    batch_size: int = 8192
    min_batch_size: int = 1024
    learning_rate: float = 0.02
    eval_every: int = 25
    seed: int = 0
    pretrain_epochs: int = parties.PretrainSettings.epochs
    codec: Codec = RunConfig.codec
    downstream_codec: Codec = RunConfig.downstream_codec
    dp_noise_multiplier: float = 0.0
    dp_target_epsilon: float = 0.0
    dp_clip_norm: float = 1.0
    local_steps: int = RunConfig.local_steps

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or math.isinf(self.epsilon):
            raise ValueError(f"--epsilon must be a finite number > 0; got {self.epsilon}")
        self.run_config(label_set=self.private_label_set, correction=self.correction, name=NON_PRIVATE)  # every run flag, now

    @property
    def layout(self) -> SimulationDir:
        return SimulationDir(self.work_dir)

    @property
    def private_label_set(self) -> str:
        return f"eps={self.epsilon:g}"

    def label_sets(self) -> dict[str, ConsentPolicy]:
        no_noise = ConsentPolicy(tuple((lvl, None if eps is None else math.inf) for lvl, eps in self.policy.epsilons))
        return {NON_PRIVATE: no_noise, self.private_label_set: self.policy.capped(epsilon=self.epsilon)}

    def run_config(self, *, label_set: str, correction: Correction, name: str, **overrides: object) -> RunConfig:
        """The run config of one setting; ``overrides`` replace any of its fields.

        ``name`` and ``label_set`` become folder names: each must be a plain name.
        """
        check_name(name, what="setting name")
        check_name(label_set, what="label set")
        config = RunConfig(
            platform_dir=self.layout.platform.root,
            label_set=label_set,
            run_dir=self.layout.platform.run_dir(name),
            num_rounds=self.num_rounds,
            clean_rooms=self.world.advertisers,
            batch_size=self.batch_size,
            min_batch_size=self.min_batch_size,
            correction=correction,
            learning_rate=self.learning_rate,
            eval_every=self.eval_every,
            seed=self.seed,
            codec=self.codec,
            downstream_codec=self.downstream_codec,
            dp_noise_multiplier=self.dp_noise_multiplier,
            dp_target_epsilon=self.dp_target_epsilon,
            dp_clip_norm=self.dp_clip_norm,
            local_steps=self.local_steps,
        )
        return dataclasses.replace(config, **overrides)


def _load_existing_world(world_dir: Path, config: WorldConfig) -> dict:
    path = world_dir / "world.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        stored = {k: (tuple(map(tuple, v)) if k == "consent_mix" else v) for k, v in summary["config"].items()}
        existing = WorldConfig(**stored)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a world summary written by pcvr ({type(exc).__name__}); use a new --work-dir") from None
    if existing != config:
        raise ValueError(f"{world_dir} holds a world generated with other settings; use a new --work-dir")
    return summary


def _load_secrets(work: SimulationDir, advertiser: int) -> tuple[bytes, bytes]:
    """Advertiser ``advertiser``'s join and RR secrets, created on first use only.

    A secret missing beside data made with it is an error: a new join secret would not
    match those join keys, and a new RR secret would randomize the same labels again.
    """
    secrets = work.secrets(advertiser)
    labelled = sorted(work.handoffs(advertiser).glob(f"*/{LABELS_FILE}"))
    require_secret(secrets.join, made_with_it=[work.export(advertiser).features, *labelled])
    require_secret(secrets.rr, made_with_it=labelled)
    join_secret = load_or_create_secret(secrets.join)  # agreed by the advertiser and the platform
    rr_secret = load_or_create_secret(secrets.rr)  # the advertiser's alone
    return join_secret, rr_secret


def prepare(spec: SimulationSpec) -> dict:
    """The party steps (:mod:`pcvr.parties`) on the synthetic world under ``spec.work_dir``, or what they made.

    synthesize → pretrain → per advertiser: export, one hand-off per label set, join.
    Each artifact is reused only if the inputs it records (:mod:`pcvr.data.prepared`:
    specs and data files, secrets, consent policy, model settings) are unchanged, and
    rebuilt otherwise; the world itself is never regenerated under other settings.
    """
    work = spec.layout
    secrets = [_load_secrets(work, k) for k in range(spec.world.advertisers)]
    world_dir = work.world
    if (world_dir / "world.json").exists():
        world = _load_existing_world(world_dir, spec.world)
    else:
        log.info("synthesizing %d clean-room rows into %s", spec.world.rows, world_dir)
        world = synthesize(world_dir, spec.world)

    platform = work.platform
    platform_spec = advertiser_spec_path(world_dir, 0)  # every advertiser's spec has the platform's [pretrain]
    settings = parties.PretrainSettings(epochs=spec.pretrain_epochs, seed=spec.seed)
    prepare_artifact(
        platform.backbone,
        {
            "spec": platform_spec,
            **_data_files("pretrain", DatasetSpec.load(platform_spec).require("pretrain").paths),
            "model": dataclasses.asdict(spec.model),
            "epochs": spec.pretrain_epochs,
            "seed": spec.seed,
        },
        lambda: parties.pretrain(platform_spec, platform, settings=settings, shape=spec.model, replace=True),
    )
    # What only a simulation knows, the holdout's true labels: the platform evaluates on them.
    world_holdout = DatasetSpec.load(holdout_spec_path(world_dir))
    (holdout,) = world_holdout.require("pretrain").paths

    def copy_holdout() -> None:  # the world's holdout spec, naming the platform's copy
        _copy(holdout, platform.oracle_holdout)
        copy = (platform.oracle_holdout,)
        dataclasses.replace(
            world_holdout,
            source=platform.oracle_spec,
            features=dataclasses.replace(world_holdout.require("features"), paths=copy),
            pretrain=dataclasses.replace(world_holdout.require("pretrain"), paths=copy),
        ).write()

    prepare_artifact(platform.oracle_holdout, {"holdout": holdout}, copy_holdout)
    ledgers: dict[str, list[dict]] = {}
    for k, (join_secret, rr_secret) in enumerate(secrets):
        room, export = work.clean_room(k), work.export(k)
        advertiser_spec = advertiser_spec_path(world_dir, k)
        data = DatasetSpec.load(advertiser_spec)
        prepare_artifact(
            export.features,
            {"spec": advertiser_spec, **_data_files("features", data.require("features").paths),
             "join_secret": join_secret, "backbone": platform.backbone},
            lambda: parties.export(advertiser_spec, platform, join_secret=join_secret, out=export),
        )
        holdout_key = parties.open_clean_room(room)
        # The advertiser's own rules for its clean room; here the spec speaks for every advertiser.
        write_bytes_atomic(room.policy, RoomPolicy(min_batch_size=spec.min_batch_size).to_toml().encode())
        conversions = _data_files("conversions", data.require("conversions").paths)
        for name, policy in spec.label_sets().items():
            handoff = work.handoff(k, name)
            prepare_artifact(
                handoff.labels,
                {"spec": advertiser_spec, **conversions, "consent_policy": policy.to_dict(),
                 "join_secret": join_secret, "rr_secret": rr_secret},
                lambda: parties.hand_off(
                    advertiser_spec, policy=policy, join_secret=join_secret, rr_secret=rr_secret, out=handoff, label_set=name
                ),
            )
            label_set = room.label_set(name)
            prepare_artifact(
                label_set.root,
                {"features": export.features, "backbone": export.backbone, "labels": handoff.labels,
                 "holdout_key": holdout_key, "eval_fraction": HOLDOUT_FRACTION},
                lambda: parties.join(export, handoff, room, replace_stale=True),
            )
            ledgers.setdefault(name, []).append(json.loads(label_set.ledger.read_text()))
    return {"world": world, "ledgers": ledgers}


def _data_files(name: str, paths) -> dict[str, Path]:
    """A spec section's data files as inputs of a prepared artifact, each recorded by its content."""
    return {f"{name}[{i}]": Path(path) for i, path in enumerate(paths)}


def _copy(source: Path, target: Path) -> None:
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _held_out_truth(spec: SimulationSpec, backbone: torch.nn.Module, *, run_dir: Path, label_set: str) -> dict[str, float]:
    """True-label metrics of the setting's final model on the rows the clean rooms evaluated privately."""
    adapters = AdapterTrainer.saved_adapters(run_dir / CHECKPOINT_FILE)
    work = spec.layout
    rooms = [
        HeldOutRows(
            eval_path=work.clean_room(k).label_set(label_set).eval,
            conversions_spec=advertiser_spec_path(work.world, k),
            join_secret=_load_secrets(work, k)[0],
        )
        for k in range(spec.world.advertisers)
    ]
    return held_out_truth(backbone, adapters, rooms)


def run_setting(
    spec: SimulationSpec,
    *,
    name: str,
    label_set: str,
    correction: Correction,
    on_round: Callable[[str], None] | None = None,
    **overrides: object,
) -> dict:
    """One federated training run in Flower's simulation engine; returns the platform's result.

    ``overrides`` replace fields of the setting's :class:`RunConfig` (e.g. ``codec=``);
    ``on_round`` gets the platform's line for each round as it ends. Flower's and Ray's
    own output stays in the setting's ``engine/logs/``.
    """
    config = spec.run_config(label_set=label_set, correction=correction, name=name, **overrides)
    rooms = [spec.layout.clean_room(k) for k in range(spec.world.advertisers)]
    return parties.train(spec.layout.platform, rooms, config, on_round=on_round)


def simulate(spec: SimulationSpec, *, progress: Callable[[str, str], None] | None = None) -> dict:
    """Prepare, then run the backbone, non-private, corrected and uncorrected settings.

    ``progress`` gets (setting, the platform's line) at the end of every round.

    A setting that fails (a clean room failed its pre-flight check or served too few
    rounds, or no update was applied) stops the simulation: its row says FAILED and
    ``summary["failures"]`` names the room and the reason. ``summary.json`` of an
    earlier run is removed first, so it never stands beside new results.
    """
    started = time.monotonic()
    spec.layout.summary.unlink(missing_ok=True)
    prepared = prepare(spec)
    backbone = load_backbone(spec.layout.platform.backbone)
    platform = spec.layout.platform
    oracle = DatasetSpec.load(platform.oracle_spec)
    features, labels, true_prob = read_labelled(oracle, FeatureEncoding.load(platform.backbone), truth_column=TRUE_PROB)
    results: dict[str, dict] = {"backbone": holdout_metrics(labels, predict(backbone, features))}
    if true_prob is not None:
        results["oracle"] = holdout_metrics(labels, true_prob)
    eps = spec.private_label_set
    runs = {
        NON_PRIVATE: (NON_PRIVATE, Correction.NONE),
        f"{eps},{spec.correction.value}": (eps, spec.correction),
    }
    if spec.correction is not Correction.NONE:
        runs[f"{eps},none"] = (eps, Correction.NONE)
    bytes_up = bytes_down = 0
    failures: list[str] = []
    for name, (label_set, correction) in runs.items():
        on_round = None if progress is None else (lambda line, name=name: progress(name, line))
        result = run_setting(spec, name=name, label_set=label_set, correction=correction, on_round=on_round)
        served = {room: entry["served"] for room, entry in result["participation"].items()}
        if result["failures"]:
            results[name] = {"failed": result["failures"][0], "served": served}
            failures += [f"setting {name}: {line}" for line in result["failures"]]
            break
        results[name] = {
            **{key: result["final"][key] for key in ("auc", "ne", "calibration")},
            "bytes_up_per_round": result["bytes_up_per_round"],
            "bytes_down_per_round": result["bytes_down_per_round"],
            "rejected": result["rejected"],
            "served": served,
            "private": result["private"],
            "held_out_truth": _held_out_truth(
                spec, backbone, run_dir=spec.run_config(label_set=label_set, correction=correction, name=name).run_dir,
                label_set=label_set,
            ),
        }
        bytes_up += result["bytes_up"]
        bytes_down += result["bytes_down"]
    summary = {
        "results": results,
        "failures": failures,
        "rounds": spec.num_rounds,
        "clean_rooms": spec.world.advertisers,
        "wall_s": round(time.monotonic() - started, 1),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "parameters": parameter_counts(attach_adapters(backbone)),
        "epsilon": spec.epsilon,
        "correction": spec.correction.value,
        "codec": str(spec.codec),
        "downstream_codec": str(spec.downstream_codec),
        "ledger": prepared["ledgers"][eps],
    }
    write_json_atomic(spec.layout.summary, summary)
    return summary


def format_table(summary: dict) -> str:
    """A fixed-width table of the settings, with AUC relative to ``non_private``; a failed setting says FAILED."""
    results = summary["results"]
    reference = results.get(NON_PRIVATE, {}).get("auc")
    lines = [
        f"{'setting':<22} {'AUC':>7} {'ΔAUC vs non_private':>20} {'NE':>7} {'calibration':>12}"
        f" {'bytes up/round':>15} {'bytes down/round':>17}  rounds served per clean room"
    ]
    for name, metrics in results.items():
        served = "/".join(str(n) for n in metrics["served"].values()) if "served" in metrics else ""
        if "failed" in metrics:
            lines.append(f"{name:<22} {'FAILED':>7}  {metrics['failed']}")
            continue
        delta = "" if reference is None else f"{100 * (metrics['auc'] / reference - 1):+.2f}%"
        wire = (
            f" {metrics['bytes_up_per_round']:>15,.0f} {metrics['bytes_down_per_round']:>17,.0f}  {served}"
            if "bytes_up_per_round" in metrics
            else ""
        )
        lines.append(
            f"{name:<22} {metrics['auc']:>7.4f} {delta:>20} {metrics['ne']:>7.4f} {metrics['calibration']:>12.3f}{wire}"
        )
        if "private" in metrics:
            truth = metrics["held_out_truth"]
            lines.append(
                f"{'':<22} {format_private(metrics['private'])}\n{'':<22} true labels of the same rows: "
                f"AUC {truth['auc']:.4f}, NE {truth['ne']:.4f}, calibration {truth['calibration']:.3f}"
            )
    params = summary["parameters"]
    lines.append(
        f"\n{summary['clean_rooms']} clean rooms, {summary['rounds']} rounds per setting, "
        f"codec {summary['codec']} up / {summary['downstream_codec']} down (bytes as Flower serializes them), "
        f"{summary['bytes_up'] / 1e6:.2f} MB up / {summary['bytes_down'] / 1e6:.2f} MB down in all, "
        f"{summary['wall_s']:.0f} s; adapters {params['adapters']:,} params = "
        f"{100 * params['adapters'] / params['backbone']:.2f}% of the backbone's {params['backbone']:,}"
    )
    return "\n".join(lines)
