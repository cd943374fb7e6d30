"""Each party's step, writing only that party's directory (:mod:`pcvr.protocols.layout`).

    pretrain   the platform: backbone + feature encoding, from its own labelled data
    export     the platform: one advertiser's clicks, encoded, under the join key, plus the backbone
    hand_off   the advertiser: consent, exclusion, randomized response once per record, ledger
    join       the clean room: export ⋈ hand-off, a held-out split drawn with its own key
    train      the platform and the clean rooms: Flower's simulation engine, one ClientApp per room

The ``pcvr`` party commands (:mod:`pcvr.cli_parties`) and ``pcvr simulate`` call exactly
these. Each step checks, before it writes, that its output directory is its own
(:func:`~pcvr.protocols.layout.claim`), and leaves a manifest saying what made it; a later
step checks the manifests of its inputs (a spec that does not match the backbone, a
hand-off joined with another platform's export) and refuses with one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pcvr.data.io import DataError, write_bytes_atomic, write_json_atomic
from pcvr.protocols.layout import CleanRoomDir, ExportDir, HandoffDir, PlatformDir, claim
from pcvr.protocols.names import check_name
from pcvr.protocols.run_config import RunConfig

__all__ = ["new_key", "read_key", "read_manifest", "PretrainSettings", "pretrain", "export", "hand_off", "open_clean_room", "join", "train"]

log = logging.getLogger(__name__)


def new_key(path: Path) -> None:
    """Write 32 fresh random bytes to ``path`` (mode 0600); never overwrites.

    Raises:
        FileExistsError: ``path`` exists (a key is replaced only by deleting it first).
    """
    from pcvr.protocols.keys import SECRET_BYTES

    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path}: exists; pcvr never overwrites a key (delete it first to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(SECRET_BYTES))


def read_key(path: Path, *, flag: str) -> bytes:
    """A key written by ``pcvr keys new``; one line naming ``flag`` and the file when it is not one."""
    from pcvr.protocols.keys import SECRET_BYTES

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such key file (make one with `pcvr keys new --out {path}`)")
    secret = path.read_bytes()
    if len(secret) < SECRET_BYTES // 2:
        raise ValueError(f"{flag} {path}: a key is at least {SECRET_BYTES // 2} bytes; this file has {len(secret)}")
    return secret


def read_manifest(directory: Path, kind: type, *, flag: str) -> dict:
    """The manifest of a ``kind`` directory given as ``flag``; one line when it is not one."""
    path = Path(directory) / kind.MANIFEST
    if not path.is_file():
        raise ValueError(f"{flag} {directory}: not {kind.WHAT} (no {kind.MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a manifest written by pcvr ({type(exc).__name__})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a manifest written by pcvr")
    return manifest


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _backbone_digest(directory: Path) -> str:
    from pcvr.models.cvr import backbone_digest, load_backbone

    return backbone_digest(load_backbone(directory)).hex()


def _copy_tree(source: Path, target: Path) -> None:
    """Copy a directory through a staging name, so ``target`` is either absent, the old one, or complete."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


# --- the platform ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainSettings:
    """How the platform pretrains its backbone (``pcvr platform pretrain``'s options)."""

    epochs: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1; got {self.epochs}")


def pretrain(spec_path: Path, platform: PlatformDir, *, settings: PretrainSettings, shape=None, replace: bool = False) -> dict:
    """Fit the encoding and pretrain the backbone on the spec's [pretrain] rows into ``platform``.

    ``replace`` (the simulation rebuilding a changed input) replaces an existing backbone;
    otherwise a platform directory that already holds one is refused: exports and clean
    rooms were made with it.
    """
    import torch

    from pcvr.data.spec import DatasetSpec
    from pcvr.platform.pretrain import pretrain_from_spec

    claim(platform.root, PlatformDir, flag="--out")
    spec = DatasetSpec.load(Path(spec_path))
    spec.require("features")
    spec.require("pretrain")
    if platform.backbone.exists() and not replace:
        raise ValueError(
            f"--out {platform.root}: already holds a backbone; exports and clean rooms were made with it: "
            "pretrain into a new directory"
        )
    shutil.rmtree(platform.backbone, ignore_errors=True)
    encoding = pretrain_from_spec(
        spec, platform.backbone, **({} if shape is None else {"shape": shape}), epochs=settings.epochs,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    manifest = {
        "made_by": "pcvr platform pretrain",
        "spec": str(Path(spec_path).resolve()),
        "spec_digest": encoding.spec_digest,
        "backbone_digest": _backbone_digest(platform.backbone),
        "epochs": settings.epochs,
        "seed": settings.seed,
    }
    write_json_atomic(platform.manifest, manifest)
    return manifest


def export(spec_path: Path, platform: PlatformDir, *, join_secret: bytes, out: ExportDir) -> dict:
    """Encode one advertiser's clicks under the join key into ``out``, with a copy of the backbone."""
    from pcvr.data.spec import DatasetSpec
    from pcvr.platform.features import export_features

    claim(out.root, ExportDir)
    platform_manifest = read_manifest(platform.root, PlatformDir, flag="--platform-dir")
    spec = DatasetSpec.load(Path(spec_path))
    spec.require("features")
    rows = export_features(spec, backbone_dir=platform.backbone, join_secret=join_secret, out_path=out.features)
    _copy_tree(platform.backbone, out.backbone)
    manifest = {
        "made_by": "pcvr platform export",
        "rows": rows,
        "spec_digest": spec.features.digest(),
        "backbone_digest": platform_manifest["backbone_digest"],
        "join_key_digest": hashlib.sha256(b"pcvr/join-key-check|" + join_secret).hexdigest()[:16],
    }
    write_json_atomic(out.manifest, manifest)
    return manifest


# --- the advertiser -------------------------------------------------------------------------


def default_label_set(policy) -> str:
    """The name of the label set a policy makes: ``eps=<standard ε>``, or ``non_private`` without noise."""
    import math

    from pcvr.data.schema import ConsentLevel

    standard = policy.epsilon_for(ConsentLevel.STANDARD)
    return "non_private" if standard is None or math.isinf(standard) else f"eps={standard:g}"


def hand_off(
    spec_path: Path, *, policy, join_secret: bytes, rr_secret: bytes, out: HandoffDir, label_set: str | None = None
) -> dict:
    """Consent, exclusion and randomized response of the spec's [conversions] into ``out``."""
    from pcvr.advertiser.handoff import hand_off as randomize_and_write
    from pcvr.data.spec import DatasetSpec

    claim(out.root, HandoffDir)
    name = check_name(label_set or default_label_set(policy), what="--label-set")
    spec = DatasetSpec.load(Path(spec_path))
    spec.require("conversions")
    ledger = randomize_and_write(spec, policy=policy, join_secret=join_secret, rr_secret=rr_secret, out_dir=out.root)
    manifest = {
        "made_by": "pcvr advertiser hand-off",
        "label_set": name,
        "rows": _labelled_rows(ledger),
        "spec_digest": _file_digest(spec.source),
        "policy": policy.to_dict(),
        "join_key_digest": hashlib.sha256(b"pcvr/join-key-check|" + join_secret).hexdigest()[:16],
    }
    write_json_atomic(out.manifest, manifest)
    return manifest


def _labelled_rows(ledger) -> int:
    levels = ledger.to_dict()["levels"]
    return int(sum(entry["records"] for entry in levels.values() if not entry["excluded"]))


# --- the clean room -------------------------------------------------------------------------


def open_clean_room(room: CleanRoomDir, *, room_policy=None) -> bytes:
    """Make ``room`` a clean-room directory if it is not one yet; returns its own held-out key.

    Writes the clean room's policy (``room_policy``, or the defaults) when it has none and
    its held-out key when it has none. A key missing beside label sets split with it is
    refused (a new key would move rows between training and evaluation).
    """
    from pcvr.clean_room.policy import RoomPolicy
    from pcvr.data.prepared import require_secret
    from pcvr.protocols.keys import load_or_create_secret

    claim(room.root, CleanRoomDir)
    Path(room.root).mkdir(parents=True, exist_ok=True)
    if not room.manifest.exists():
        write_json_atomic(room.manifest, {"made_by": "pcvr clean-room join", "label_sets": {}})
    if not room.policy.exists():
        write_bytes_atomic(room.policy, (room_policy or RoomPolicy()).to_toml().encode())
    require_secret(room.holdout_key, made_with_it=[Path(room.root) / name for name in room.label_sets()])
    return load_or_create_secret(room.holdout_key)


def join(export_dir: ExportDir, handoff_dir: HandoffDir, room: CleanRoomDir, *, replace_stale: bool = False) -> dict:
    """Join an export with a hand-off into the clean room's label set (named by the hand-off).

    The clean room gets the export's backbone (:func:`open_clean_room` makes the rest). A
    clean room whose other label sets were joined with another backbone is refused — or,
    with ``replace_stale`` (the simulation rebuilding a changed input), those label sets
    are removed.
    """
    from pcvr.clean_room.dataset import join_inputs

    exported = read_manifest(export_dir.root, ExportDir, flag="--export")
    handed = read_manifest(handoff_dir.root, HandoffDir, flag="--handoff")
    if exported.get("join_key_digest") != handed.get("join_key_digest"):
        raise ValueError(
            f"--export {export_dir.root} and --handoff {handoff_dir.root} were made with different join secrets: "
            "no label would match a click"
        )
    name = check_name(handed["label_set"], what="label set")
    holdout_key = open_clean_room(room)
    manifest = read_manifest(room.root, CleanRoomDir, flag="--out")
    joined = manifest.setdefault("label_sets", {})
    stale = sorted(n for n, entry in joined.items() if entry["backbone_digest"] != exported["backbone_digest"] and n != name)
    if stale and not replace_stale:
        raise ValueError(
            f"--out {room.root}: label set(s) {', '.join(stale)} were joined with another backbone than --export "
            f"{export_dir.root}'s; join into a new clean-room directory"
        )
    for old in stale:
        shutil.rmtree(Path(room.root) / old, ignore_errors=True)
        del joined[old]
    if not room.backbone.exists() or _backbone_digest(room.backbone) != exported["backbone_digest"]:
        _copy_tree(export_dir.backbone, room.backbone)
    Path(room.root, name).mkdir(exist_ok=True)
    label_set = room.label_set(name)
    summary = join_inputs(
        export_dir.features, handoff_dir.labels, train_path=label_set.train, eval_path=label_set.eval, holdout_key=holdout_key
    )
    write_bytes_atomic(label_set.ledger, handoff_dir.ledger.read_bytes())
    joined[name] = {
        "rows": summary.rows,
        "eval_rows": summary.eval_rows,
        "features_without_label": summary.features_without_label,
        "labels_without_features": summary.labels_without_features,
        "backbone_digest": exported["backbone_digest"],
        "handoff_rows": handed["rows"],
    }
    write_json_atomic(room.manifest, manifest)
    return joined[name]


# --- training -------------------------------------------------------------------------------


def common_label_set(rooms: Sequence[CleanRoomDir]) -> str:
    """The one label set every clean room holds; an error naming the choice when there is none or several."""
    for room in rooms:
        read_manifest(room.root, CleanRoomDir, flag="--clean-rooms")
    sets = [set(room.label_sets()) for room in rooms]
    common = sorted(set.intersection(*sets)) if sets else []
    if len(common) != 1:
        raise ValueError(
            f"--label-set: the clean rooms have {'no label set in common' if not common else 'label sets ' + ', '.join(common)}; "
            "name the one to train on"
        )
    return common[0]


def check_training_inputs(platform: PlatformDir, rooms: Sequence[CleanRoomDir], *, label_set: str) -> None:
    """Everything ``train`` reads, checked before Flower starts: one line naming the directory."""
    read_manifest(platform.root, PlatformDir, flag="--platform-dir")
    if not rooms:
        raise ValueError("--clean-rooms: give at least one clean-room directory")
    if len({Path(room.root).resolve() for room in rooms}) != len(rooms):
        raise ValueError("--clean-rooms: a clean-room directory is given twice")
    for room in rooms:
        read_manifest(room.root, CleanRoomDir, flag="--clean-rooms")
        if not room.label_set(label_set).train.exists():
            raise ValueError(f"--clean-rooms {room.root}: has no label set {label_set!r} (it has: {', '.join(room.label_sets()) or 'none'})")


def train(
    platform: PlatformDir, rooms: Sequence[CleanRoomDir], config: RunConfig, *, on_round: Callable[[str], None] | None = None
) -> dict:
    """One federated run in Flower's simulation engine; returns the platform's ``result.json``.

    Clean room ``k`` is ``rooms[k]``: its directory reaches its ClientApp from this
    launcher (:mod:`pcvr.deploy.simulation`), never through the run config. ``on_round``
    gets the platform's line for each round; Flower's and Ray's own output stays in
    the run's ``engine/logs/``.
    """
    import dataclasses

    from pcvr.deploy.simulation import run_simulation_engine

    config = dataclasses.replace(config, platform_dir=Path(platform.root), clean_rooms=len(rooms))
    check_training_inputs(platform, rooms, label_set=config.label_set)
    if not config.resume_run:  # a resumed run goes on from the checkpoint in its run dir
        shutil.rmtree(config.run_dir, ignore_errors=True)
    directories = {k: Path(room.root).resolve() for k, room in enumerate(rooms)}
    return run_simulation_engine(
        config.to_run_config(), clean_room_dirs=directories, engine_dir=config.run_dir / "engine", out=on_round
    )
