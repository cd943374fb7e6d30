"""The ``pcvr`` commands of the parties, each writing only its own ``--out`` directory.

    pcvr keys new --out FILE                     a 32-byte secret (0600), never overwritten
    pcvr platform pretrain --spec S --out PLATFORM_DIR
    pcvr platform export --spec S --platform-dir P --join-secret K --out EXPORT_DIR
    pcvr advertiser hand-off --spec S --policy POLICY --join-secret K --rr-secret R --out HANDOFF_DIR [--label-set NAME]
    pcvr clean-room join --export E --handoff H --out CLEAN_ROOM_DIR
    pcvr train --platform-dir P --clean-rooms DIR... [--label-set NAME] [training options]

The work is in :mod:`pcvr.parties`; this module parses flags and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pcvr.protocols.codecs import Codec
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.layout import RESULT_FILE, CleanRoomDir, ExportDir, HandoffDir, PlatformDir
from pcvr.protocols.run_config import RunConfig

__all__ = ["add_party_commands", "add_training_arguments", "training_config", "format_private_table"]

# flag → RunConfig field, for the training options every training command shares
_TRAINING_FLAGS = {
    "--rounds": "num_rounds",
    "--batch-size": "batch_size",
    "--min-batch-size": "min_batch_size",
    "--learning-rate": "learning_rate",
    "--eval-every": "eval_every",
    "--codec": "codec",
    "--downstream-codec": "downstream_codec",
    "--dp-noise-multiplier": "dp_noise_multiplier",
    "--dp-target-epsilon": "dp_target_epsilon",
    "--dp-clip-norm": "dp_clip_norm",
    "--local-steps": "local_steps",
}
_HELP = {
    "num_rounds": "federated rounds",
    "batch_size": "rows per clean-room gradient",
    "min_batch_size": "no gradient over fewer rows",
    "learning_rate": "platform Adam peak step",
    "eval_every": "evaluate every this many rounds (simulation only: needs true labels)",
    "codec": "gradient compression: none, q8, q4, topk:F[+q8|+q4]",
    "downstream_codec": "compression of weight deltas",
    "dp_noise_multiplier": "DP-SGD σ in the clean rooms (0: off)",
    "dp_target_epsilon": "or the DP-SGD ε to reach (0: off)",
    "dp_clip_norm": "DP-SGD per-example clip",
    "local_steps": "Adam steps each clean room takes per round, each on its own batch (1: send one batch's gradient)",
}


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options, their defaults read from :class:`RunConfig` (the one owner)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for flag, name in _TRAINING_FLAGS.items():
        default = fields[name].default
        kind = str if isinstance(default, Codec) else type(default)
        parser.add_argument(
            flag, dest=name, metavar=flag.lstrip("-").upper().replace("-", "_"), type=kind,
            default=str(default) if isinstance(default, Codec) else default,
            help=f"{_HELP[name]} (default: %(default)s)",
        )
    parser.add_argument(
        "--correction", default=RunConfig.correction.value, choices=[c.value for c in Correction], help="(default: %(default)s)"
    )


def training_config(args: argparse.Namespace, **fields: object) -> RunConfig:
    """The run config of the training options in ``args``, plus ``fields``; every value validated."""
    values = {name: getattr(args, name) for name in _TRAINING_FLAGS.values()}
    values["codec"], values["downstream_codec"] = Codec.parse(values["codec"]), Codec.parse(values["downstream_codec"])
    return RunConfig(**values, correction=Correction.parse(args.correction), **fields)


def _cmd_keys_new(args: argparse.Namespace) -> None:
    from pcvr.parties import new_key

    new_key(args.out)
    print(f"created {args.out} (32 random bytes, readable by you alone)")


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from pcvr.parties import PretrainSettings, pretrain

    manifest = pretrain(args.spec, PlatformDir(args.out), settings=PretrainSettings(epochs=args.epochs, seed=args.seed))
    print(f"pretrained the backbone into {PlatformDir(args.out).backbone} (spec digest {manifest['spec_digest'][:12]})")


def _cmd_export(args: argparse.Namespace) -> None:
    from pcvr.parties import export, read_key

    manifest = export(
        args.spec, PlatformDir(args.platform_dir), join_secret=read_key(args.join_secret, flag="--join-secret"),
        out=ExportDir(args.out),
    )
    print(f"exported {manifest['rows']:,} clicks (encoded, under the join key) into {args.out}")


def _cmd_hand_off(args: argparse.Namespace) -> None:
    from pcvr.advertiser.policy import ConsentPolicy
    from pcvr.parties import hand_off, read_key

    join_secret = read_key(args.join_secret, flag="--join-secret")
    rr_secret = read_key(args.rr_secret, flag="--rr-secret")
    if join_secret == rr_secret:
        raise ValueError("--rr-secret is the join secret: the RR secret is the advertiser's alone; make another with `pcvr keys new`")
    manifest = hand_off(
        args.spec, policy=ConsentPolicy.from_file(args.policy), join_secret=join_secret, rr_secret=rr_secret,
        out=HandoffDir(args.out), label_set=args.label_set,
    )
    print(f"handed off label set {manifest['label_set']}: {manifest['rows']:,} labelled records into {args.out}")


def _cmd_join(args: argparse.Namespace) -> None:
    from pcvr.parties import join

    entry = join(ExportDir(args.export), HandoffDir(args.handoff), CleanRoomDir(args.out))
    print(
        f"joined into {args.out}: {entry['rows']:,} training rows, {entry['eval_rows']:,} held out "
        f"({entry['features_without_label']:,} clicks without a label, {entry['labels_without_features']:,} labels without a click)"
    )


def format_private_table(private: dict | None) -> str:
    """The clean rooms' private evaluation as a table: each estimate ± its standard error, and the rows."""
    if private is None:
        return "private evaluation: not run"
    if private.get("unavailable"):
        return f"private evaluation: unavailable: {private['unavailable']}"
    lines = [
        f"private evaluation after round {private['round']} (de-biased for randomized response; no true label left a clean room)",
        f"  {'metric':<12} {'estimate':>9} {'± SE':>8}",
    ]
    for name, label, digits in (("auc", "AUC", 4), ("ne", "NE", 4), ("calibration", "calibration", 3)):
        lines.append(f"  {label:<12} {private[name]['value']:>9.{digits}f} {private[name]['se']:>8.{digits}f}")
    rooms = private["rooms"]
    lines.append(f"  rows: {private['rows']:,} held-out rows in {rooms} clean room{'' if rooms == 1 else 's'}")
    return "\n".join(lines)


def _cmd_train(args: argparse.Namespace) -> int:
    from pcvr.parties import common_label_set, train
    from pcvr.platform.federation import interrupted_run

    platform = PlatformDir(args.platform_dir)
    rooms = [CleanRoomDir(path) for path in args.clean_rooms]
    label_set = args.label_set or common_label_set(rooms)
    name = args.run_name or f"{label_set},{args.correction}"
    run_dir = platform.run_dir(name)
    config = training_config(
        args, label_set=label_set, platform_dir=Path(platform.root), run_dir=run_dir,
        clean_rooms=len(rooms), seed=args.seed, resume_run=interrupted_run(run_dir) if args.resume else 0,
    )
    result = train(platform, rooms, config)
    print(format_private_table(result["private"]))
    served = ", ".join(f"{room}: {entry['served']}" for room, entry in sorted(result["participation"].items()))
    print(f"\n{result['rounds']} rounds, rounds served: {served}; results in {config.run_dir / RESULT_FILE}")
    if result["failures"]:
        print(f"pcvr: error: the run failed: {result['failures'][0]}", file=sys.stderr)
        return 1
    return 0


def add_party_commands(commands: argparse._SubParsersAction) -> None:
    """``keys``, ``platform``, ``advertiser``, ``clean-room`` and ``train``."""
    from pcvr.parties import PretrainSettings

    keys = commands.add_parser("keys", help="secrets").add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="a new 32-byte secret: the join secret or the advertiser's RR secret")
    new.add_argument("--out", type=Path, required=True, help="the key file to create (never overwritten)")
    new.set_defaults(func=_cmd_keys_new)

    platform = commands.add_parser("platform", help="the platform's steps").add_subparsers(dest="platform_command", required=True)
    pretrain = platform.add_parser("pretrain", help="backbone + feature encoding from the spec's [features] and [pretrain]")
    pretrain.add_argument("--spec", type=Path, required=True, help="dataset spec (TOML)")
    pretrain.add_argument("--out", type=Path, required=True, help="the platform's directory (new)")
    pretrain.add_argument("--epochs", type=int, default=PretrainSettings.epochs, help="(default: %(default)s)")
    pretrain.add_argument("--seed", type=int, default=PretrainSettings.seed, help="(default: %(default)s)")
    pretrain.set_defaults(func=_cmd_pretrain)
    export = platform.add_parser("export", help="one advertiser's clicks, encoded under the join key, for its clean room")
    export.add_argument("--spec", type=Path, required=True, help="dataset spec whose [features] reads the clicks")
    export.add_argument("--platform-dir", type=Path, required=True, help="the platform's directory (pretrained)")
    export.add_argument("--join-secret", type=Path, required=True, help="the key agreed with this advertiser")
    export.add_argument("--out", type=Path, required=True, help="the export's directory, handed to the clean room")
    export.set_defaults(func=_cmd_export)

    advertiser = commands.add_parser("advertiser", help="the advertiser's step").add_subparsers(dest="advertiser_command", required=True)
    hand_off = advertiser.add_parser("hand-off", help="consent, exclusion, randomized response, ledger")
    hand_off.add_argument("--spec", type=Path, required=True, help="dataset spec whose [conversions] reads the conversions")
    hand_off.add_argument("--policy", type=Path, required=True, help="consent policy TOML: ε per consent level")
    hand_off.add_argument("--join-secret", type=Path, required=True, help="the key agreed with the platform")
    hand_off.add_argument("--rr-secret", type=Path, required=True, help="the advertiser's own key: it never leaves")
    hand_off.add_argument("--out", type=Path, required=True, help="the hand-off's directory, handed to the clean room")
    hand_off.add_argument("--label-set", default=None, help="its name (default: eps=<the policy's standard ε>)")
    hand_off.set_defaults(func=_cmd_hand_off)

    clean_room = commands.add_parser("clean-room", help="the clean room's step").add_subparsers(dest="clean_room_command", required=True)
    join = clean_room.add_parser("join", help="export ⋈ hand-off, with a held-out split drawn inside the clean room")
    join.add_argument("--export", type=Path, required=True, help="the platform's export directory")
    join.add_argument("--handoff", type=Path, required=True, help="the advertiser's hand-off directory")
    join.add_argument("--out", type=Path, required=True, help="the clean room's directory (label sets accumulate)")
    join.set_defaults(func=_cmd_join)

    train = commands.add_parser("train", help="federated training: Flower's simulation engine, one ClientApp per clean room")
    train.add_argument("--platform-dir", type=Path, required=True, help="the platform's directory")
    train.add_argument("--clean-rooms", type=Path, nargs="+", required=True, help="each clean room's directory")
    train.add_argument("--label-set", default=None, help="label set to train on (default: the one every clean room has)")
    train.add_argument("--run-name", default=None, help="results go to PLATFORM_DIR/runs/NAME (default: LABEL_SET,CORRECTION)")
    train.add_argument("--seed", type=int, default=RunConfig.seed, help="adapters' initialisation and batch sampling (default: %(default)s)")
    train.add_argument(
        "--resume", action="store_true",
        help="continue the interrupted run in PLATFORM_DIR/runs/NAME from its last checkpoint (same options as it had)",
    )
    add_training_arguments(train)
    train.set_defaults(func=_cmd_train)
