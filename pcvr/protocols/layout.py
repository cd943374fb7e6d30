"""Every party's directory layout, in one place: who writes which file where.

Each party runs its own command on its own directory and writes nothing outside it
(DESIGN §4); every reader and writer of these directories takes its paths from here,
and nobody imports a Flower app module to learn one.

=================  ==========================================================================
``PlatformDir``    ``platform.json`` (what made it), ``backbone/`` (weights, ``config.json``,
                   ``encoding.json``), ``oracle/`` (simulation only: the synthetic world's
                   holdout with its true labels; absent for real users), ``runs/<name>/``
``ExportDir``      ``export.json``, ``features.arrow`` (encoded features under the join key,
                   no raw id), ``backbone/`` (the copy the clean room receives)
``HandoffDir``     ``handoff.json`` (label set, rows, spec digest), ``labels.arrow``,
                   ``ledger.json`` (what protected each record)
``CleanRoomDir``   ``clean_room.json``, ``policy.toml`` (the advertiser's own rules),
                   ``backbone/``, ``secrets/holdout.key`` (its own, never sent),
                   ``<label-set>/{train,eval}.arrow`` and ``ledger.json``, ``state/``
``SimulationDir``  ``pcvr simulate``'s work directory: the synthetic ``world/``, the
                   advertisers' ``secrets/``, and one directory per party composed of the above
=================  ==========================================================================

The first file of each party directory (its *manifest*, e.g. ``export.json``) says
whose directory it is: :func:`claim` refuses to write into a directory that holds
another party's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from pcvr.protocols.names import check_name, resolve_inside
from pcvr.protocols.refusals import Refusal, Refused

__all__ = [
    "BACKBONE_DIR",
    "ENCODING_FILE",
    "POLICY_FILE",
    "RELEASES_FILE",
    "LEDGER_FILE",
    "TRAIN_FILE",
    "EVAL_FILE",
    "LABELS_FILE",
    "FEATURES_FILE",
    "ACCOUNTANT_FILE",
    "RESULT_FILE",
    "PRIVACY_LEDGER_FILE",
    "PartyDir",
    "PlatformDir",
    "ExportDir",
    "HandoffDir",
    "CleanRoomDir",
    "LabelSetDir",
    "AdvertiserSecrets",
    "SimulationDir",
    "PARTY_DIRS",
    "party_of",
    "claim",
    "CLEAN_ROOM_DIRS_ENV",
    "clean_room_dirs_from_environment",
]

BACKBONE_DIR = "backbone"  # weights + config.json + encoding.json, wherever a copy lives
ENCODING_FILE = "encoding.json"  # inside every backbone directory
POLICY_FILE = "policy.toml"  # the clean room's own rules
RELEASES_FILE = "releases.json"  # the clean room's record of every gradient it released
ACCOUNTANT_FILE = "dp_accountant.json"  # the clean room's DP-SGD accountant, across runs
LEDGER_FILE = "ledger.json"  # the hand-off's privacy ledger (also copied beside each joined label set)
TRAIN_FILE = "train.arrow"  # a clean room's joined training rows (Arrow IPC, memory-mapped)
EVAL_FILE = "eval.arrow"  # its held-out split, scored only for private evaluation
LABELS_FILE = "labels.arrow"  # the advertiser's noisy labels under the join key
FEATURES_FILE = "features.arrow"  # the platform's encoded features under the join key
RESULT_FILE = "result.json"  # a training run's result
PRIVACY_LEDGER_FILE = "privacy_ledger.json"  # a training run's privacy ledger


@dataclass(frozen=True)
class PartyDir:
    """One party's directory: its root and the manifest that says whose it is (:func:`claim`).

    Each kind names its manifest file (``MANIFEST``) and what it is, in words (``WHAT``).
    """

    root: Path
    MANIFEST: ClassVar[str] = ""
    WHAT: ClassVar[str] = ""

    @property
    def manifest(self) -> Path:
        return Path(self.root) / self.MANIFEST


@dataclass(frozen=True)
class PlatformDir(PartyDir):
    """The platform's directory: its backbone, and its training runs."""

    MANIFEST = "platform.json"
    WHAT = "a platform directory"

    @property
    def backbone(self) -> Path:
        return Path(self.root) / BACKBONE_DIR

    @property
    def oracle(self) -> Path:
        """Simulation only: what the synthetic world knows and no real platform does."""
        return Path(self.root) / "oracle"

    @property
    def oracle_holdout(self) -> Path:
        """Held-out clicks with true labels (and true probabilities); the ServerApp evaluates on it when present."""
        return self.oracle / "holdout.parquet"

    @property
    def oracle_spec(self) -> Path:
        """The dataset spec that reads :attr:`oracle_holdout` (its [features] and labelled [pretrain] section)."""
        return self.oracle / "spec.toml"

    @property
    def runs(self) -> Path:
        return Path(self.root) / "runs"

    def run_dir(self, name: str) -> Path:
        """One training run's checkpoint, ``result.json`` and ``privacy_ledger.json``."""
        return self.runs / check_name(name, what="run name")


@dataclass(frozen=True)
class ExportDir(PartyDir):
    """What the platform hands one clean room: encoded features under the join key, and the backbone."""

    MANIFEST = "export.json"
    WHAT = "a platform export"

    @property
    def features(self) -> Path:
        return Path(self.root) / FEATURES_FILE

    @property
    def backbone(self) -> Path:
        return Path(self.root) / BACKBONE_DIR


@dataclass(frozen=True)
class HandoffDir(PartyDir):
    """What the advertiser hands its clean room: one label set's noisy labels and its ledger."""

    MANIFEST = "handoff.json"
    WHAT = "an advertiser hand-off"

    @property
    def labels(self) -> Path:
        return Path(self.root) / LABELS_FILE

    @property
    def ledger(self) -> Path:
        return Path(self.root) / LEDGER_FILE


@dataclass(frozen=True)
class LabelSetDir:
    """One joined label set inside a clean room: every path is resolved inside the clean room's directory.

    Raises (on construction, and from each path):
        Refused: the name is not a plain name, or leads (through a symbolic link, of
            the folder or of the file) outside the clean room's directory.
    """

    room: Path
    name: str

    def __post_init__(self) -> None:
        self._inside()  # a name that is not plain, or leads outside, is refused at once

    def _inside(self, *parts: str) -> Path:
        try:
            return resolve_inside(self.room, self.name, *parts, what="label set")
        except ValueError as exc:
            raise Refused(Refusal.BAD_NAME, str(exc)) from None

    @property
    def root(self) -> Path:
        return self._inside()

    @property
    def train(self) -> Path:
        return self._inside(TRAIN_FILE)

    @property
    def eval(self) -> Path:
        return self._inside(EVAL_FILE)

    @property
    def ledger(self) -> Path:
        return self._inside(LEDGER_FILE)

    def batches(self, run_id: int) -> Path:
        """Where a clean room that records payloads keeps the rows of each batch (never sent)."""
        return self._inside("batches", f"run-{int(run_id)}")


@dataclass(frozen=True)
class CleanRoomDir(PartyDir):
    """A clean room's directory: its policy, its own secret, the backbone copy and its joined label sets.

    What the clean room writes while it trains — its release log and its DP-SGD
    accountant — goes to ``state_root`` when one is given (a deployment that mounts the
    directory read-only gives it a writable one), else into the directory itself.
    """

    state_root: Path | None = None
    MANIFEST = "clean_room.json"
    WHAT = "a clean-room directory"

    @property
    def state(self) -> Path:
        """Where the clean room's training state is written (:attr:`releases`, :attr:`accountant`)."""
        return Path(self.state_root if self.state_root is not None else self.root)

    @property
    def policy(self) -> Path:
        return Path(self.root) / POLICY_FILE

    @property
    def releases(self) -> Path:
        return self.state / RELEASES_FILE

    @property
    def accountant(self) -> Path:
        return self.state / ACCOUNTANT_FILE

    @property
    def backbone(self) -> Path:
        return Path(self.root) / BACKBONE_DIR

    @property
    def holdout_key(self) -> Path:
        """The clean room's own secret that draws its held-out split."""
        return Path(self.root) / "secrets" / "holdout.key"

    def label_set(self, name: str) -> LabelSetDir:
        """The label set a run config names, as a plain name resolved inside the clean room.

        Raises:
            Refused: ``name`` is not a plain name, or leads (through a symbolic link)
                outside the clean room's directory.
        """
        return LabelSetDir(Path(self.root), name)

    def label_sets(self) -> list[str]:
        """The label sets joined here (a folder with a training file), sorted."""
        root = Path(self.root)
        return sorted(p.parent.name for p in root.glob(f"*/{TRAIN_FILE}")) if root.is_dir() else []


@dataclass(frozen=True)
class AdvertiserSecrets:
    """One advertiser's two secrets (``pcvr keys new``).

    ``join`` is agreed with the platform (made by one side, handed to the other out of
    band); ``rr`` keys the randomized-response draws and never leaves the advertiser.
    """

    root: Path

    @property
    def join(self) -> Path:
        return Path(self.root) / "join.key"

    @property
    def rr(self) -> Path:
        return Path(self.root) / "rr.key"


@dataclass(frozen=True)
class SimulationDir:
    """``pcvr simulate``/``pcvr prepare``'s work directory: every party's directory on one machine."""

    root: Path

    @property
    def world(self) -> Path:
        """The synthetic world (:func:`pcvr.data.synth.synthesize`) with its specs."""
        return Path(self.root) / "world"

    @property
    def summary(self) -> Path:
        return Path(self.root) / "summary.json"

    @property
    def certs(self) -> Path:
        return Path(self.root) / "certs"

    @property
    def deployments(self) -> Path:
        return Path(self.root) / "deployments"

    def secrets(self, advertiser: int) -> AdvertiserSecrets:
        return AdvertiserSecrets(Path(self.root) / "secrets" / f"advertiser_{int(advertiser)}")

    @property
    def platform(self) -> PlatformDir:
        return PlatformDir(Path(self.root) / "platform")

    def export(self, advertiser: int) -> ExportDir:
        return ExportDir(Path(self.root) / "exports" / f"advertiser_{int(advertiser)}")

    def handoffs(self, advertiser: int) -> Path:
        """Advertiser ``advertiser``'s hand-offs, one :class:`HandoffDir` per label set."""
        return Path(self.root) / "handoffs" / f"advertiser_{int(advertiser)}"

    def handoff(self, advertiser: int, label_set: str) -> HandoffDir:
        return HandoffDir(self.handoffs(advertiser) / check_name(label_set, what="label set"))

    def clean_room(self, clean_room_id: int) -> CleanRoomDir:
        return CleanRoomDir(Path(self.root) / f"clean_room_{int(clean_room_id)}")


PARTY_DIRS: tuple[type, ...] = (PlatformDir, ExportDir, HandoffDir, CleanRoomDir)


def party_of(directory: Path) -> type | None:
    """The party directory class whose manifest ``directory`` holds, or None."""
    for kind in PARTY_DIRS:
        if (Path(directory) / kind.MANIFEST).is_file():
            return kind
    return None


def claim(directory: Path, kind: type, *, flag: str = "--out") -> None:
    """Refuse to write a ``kind`` directory at ``directory`` when it is another party's, or some other folder.

    A missing or empty directory, or one that already is a ``kind`` directory, may be written.

    Raises:
        ValueError: ``directory`` is a file, holds another party's manifest, or holds
            files but no manifest (it is not a pcvr party directory).
    """
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{flag} {directory}: is not a directory")
    owner = party_of(directory)
    if owner is kind:
        return
    if owner is not None:
        raise ValueError(
            f"{flag} {directory}: holds {owner.WHAT} ({owner.MANIFEST}), not {kind.WHAT}; "
            "each party writes only its own directory: give another one"
        )
    if any(directory.iterdir()):
        raise ValueError(f"{flag} {directory}: exists and is not {kind.WHAT}; give a new or empty directory")


CLEAN_ROOM_DIRS_ENV = "PCVR_CLEAN_ROOM_DIRS"  # JSON {"<clean-room id>": "<directory>"}: the simulation launcher's


def clean_room_dirs_from_environment() -> dict[int, Path]:
    """The simulated clean rooms' directories, as the local simulation launcher set them (empty otherwise).

    In Flower's simulation engine a node has no node config of its own; the launcher on
    this machine (:mod:`pcvr.deploy.simulation`) names each clean room's directory in the
    environment of the processes it starts — never in the run config, which is the platform's.

    Raises:
        ValueError: the variable is set but is not a JSON object of clean-room id → directory.
    """
    import json
    import os

    text = os.environ.get(CLEAN_ROOM_DIRS_ENV)
    if not text:
        return {}
    try:
        return {int(room): Path(directory) for room, directory in json.loads(text).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{CLEAN_ROOM_DIRS_ENV}: not a JSON object of clean-room id → directory ({exc})") from None
