"""The grid ``pcvr report`` sweeps: one small TOML file, parsed once into frozen records.

A grid names the world the report runs on, the model, the settings every run shares,
the canary audit's size, how many seeds each cell gets, and one or more sweeps::

    seeds = 3

    [world]            # pcvr.data.synth.WorldConfig fields
    rows = 60000
    [model]            # pcvr.models.cvr.ModelShape fields (the data decides the buckets)
    mlp_dims = [64, 32]
    [run]              # SimulationSpec fields shared by every run, and the reference
    num_rounds = 30    # value of each sweep axis that a sweep leaves out
    codec = "q8"
    [audit]            # AuditPlan fields
    canaries_per_room = 30

    [[sweep]]          # the product of its axes; absent axes take [run]'s value
    epsilon = [1, 3, 8, "inf"]
    correction = ["none", "forward", "backward"]
    audit_corrections = ["forward"]   # these cells also get the canary audit

A cell is one point of a sweep at one seed; cells that several sweeps share are run
once. At ε = ∞ randomized response is off, so the correction is moot: such cells are
run once, uncorrected. Each seed has its own randomized-response secrets, so the
spread over seeds is the real run-to-run spread. Missing keys take the dataclasses'
own defaults (each default lives once); an unknown key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pcvr
from pcvr.advertiser.policy import ConsentPolicy
from pcvr.data.schema import ConsentLevel
from pcvr.data.synth import WorldConfig
from pcvr.models.cvr import ModelShape
from pcvr.protocols.codecs import Codec
from pcvr.protocols.label_dp import Correction
from pcvr.simulate import SimulationSpec

__all__ = ["AuditPlan", "Cell", "CellKind", "ReportGrid", "SHIPPED_GRIDS", "load_grid", "format_epsilon"]

SHIPPED_GRIDS = ("default", "full")
AXES = ("epsilon", "correction", "codec", "dp_noise_multiplier", "min_batch_size")
RUN_KEYS = ("num_rounds", "batch_size", "learning_rate", "eval_every", "pretrain_epochs", "downstream_codec", "dp_clip_norm", *AXES)
CELL_FORMAT = 1  # bump when what a cell records changes: every cached cell is then run again


def format_epsilon(epsilon: float) -> str:
    return "∞" if math.isinf(epsilon) else f"{epsilon:g}"


@dataclass(frozen=True)
class AuditPlan:
    """How big the canary audit of an audited cell is (``pcvr audit`` defaults are larger)."""

    canaries_per_room: int = 30
    canaries_per_batch: int = 10
    control_canaries: int = 30
    confidence: float = 0.95

    def __post_init__(self) -> None:
        for name in ("canaries_per_room", "canaries_per_batch", "control_canaries"):
            if getattr(self, name) < 1:
                raise ValueError(f"grid [audit] {name} must be >= 1; got {getattr(self, name)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"grid [audit] confidence must be in (0, 1); got {self.confidence}")

    def rows_per_room(self, *, batch_size: int) -> int:
        return batch_size * max(1, math.ceil(self.canaries_per_room / self.canaries_per_batch))


class CellKind(enum.Enum):
    """A training run (with or without its audit), or the audit's control."""

    TRAIN = "train"
    CONTROL = "control"


@dataclass(frozen=True)
class Cell:
    """One point of the grid at one seed."""

    epsilon: float  # label-DP ε of standard consent; math.inf: randomized response off
    correction: Correction
    codec: Codec
    dp_noise_multiplier: float
    min_batch_size: int
    seed: int
    audit: bool = False
    kind: CellKind = CellKind.TRAIN

    @property
    def config_name(self) -> str:
        """The cell's configuration without its seed: the group its seeds are spread over."""
        if self.kind is CellKind.CONTROL:
            return "audit control (RR off, batch 1)"
        return (
            f"ε={format_epsilon(self.epsilon)},{self.correction.value},{self.codec},"
            f"σ={self.dp_noise_multiplier:g},b={self.min_batch_size}"
        )

    @property
    def name(self) -> str:
        return f"{self.config_name},seed={self.seed}"

    def to_dict(self) -> dict[str, object]:
        return {
            "epsilon": "inf" if math.isinf(self.epsilon) else self.epsilon,
            "correction": self.correction.value,
            "codec": str(self.codec),
            "dp_noise_multiplier": self.dp_noise_multiplier,
            "min_batch_size": self.min_batch_size,
            "seed": self.seed,
            "audit": self.audit,
            "kind": self.kind.value,
        }


@dataclass(frozen=True)
class ReportGrid:
    """A whole report's configuration; ``cells()`` lists what it runs."""

    name: str
    world: WorldConfig
    model: ModelShape
    run: dict[str, object]  # SimulationSpec keyword arguments (RUN_KEYS), parsed
    audit: AuditPlan
    seeds: int
    sweeps: tuple[dict[str, tuple], ...]  # axis → values, plus "audit_corrections"
    policy: ConsentPolicy = field(default_factory=ConsentPolicy.default)
    data_digest: str = ""  # a user's data (``--spec``, :mod:`pcvr.report.userdata`) by content; "" on the synthetic world

    def reference(self, axis: str) -> object:
        """The value of ``axis`` a sweep that leaves it out runs at."""
        if axis in self.run:
            return self.run[axis]
        return next(f.default for f in dataclasses.fields(SimulationSpec) if f.name == axis)

    def spec(self, *, work_dir: Path, cell: Cell | None = None) -> SimulationSpec:
        """The simulation spec of ``cell`` (None: the shared world and backbone) in ``work_dir``.

        The spec's seed is the world's: it seeds the backbone, shared by every cell; each
        cell's own seed goes to its run (:func:`pcvr.report.cells.run_cell`).
        """
        run = {k: v for k, v in self.run.items() if k not in AXES}
        standard = self.policy.epsilon_for(ConsentLevel.STANDARD)
        if cell is not None and not math.isinf(cell.epsilon):
            epsilon = cell.epsilon
        else:  # the private label set prepared beside the non-private one (unused by the cell)
            epsilon = standard if standard is not None and not math.isinf(standard) else 1.0
        return SimulationSpec(
            work_dir=work_dir,
            world=self.world,
            model=self.model,
            policy=self.policy,
            epsilon=epsilon,
            seed=self.world.seed,
            correction=Correction.NONE if cell is None else cell.correction,
            codec=self.reference("codec") if cell is None else cell.codec,
            dp_noise_multiplier=0.0 if cell is None else cell.dp_noise_multiplier,
            min_batch_size=self.reference("min_batch_size") if cell is None else cell.min_batch_size,
            **run,
        )

    def cells(self) -> list[Cell]:
        """Every cell of every sweep at every seed, each once, in sweep order; the control last."""
        cells: dict[tuple, Cell] = {}
        for sweep in self.sweeps:
            axes = [sweep.get(axis, (self.reference(axis),)) for axis in AXES]
            for values in itertools.product(*axes):
                point = dict(zip(AXES, values))
                if math.isinf(point["epsilon"]):
                    point["correction"] = Correction.NONE
                audited = not math.isinf(point["epsilon"]) and point["correction"] in sweep["audit_corrections"]
                for seed in range(self.seeds):
                    key = (*point.values(), seed)
                    known = cells.get(key)
                    cells[key] = Cell(**point, seed=seed, audit=audited or (known is not None and known.audit))
        listed = list(cells.values())
        if any(cell.audit for cell in listed):
            inf = math.inf
            listed.append(Cell(inf, Correction.NONE, Codec.parse("none"), 0.0, 1, 0, audit=True, kind=CellKind.CONTROL))
        return listed

    def cell_key(self, cell: Cell, *, secrets_digest: str) -> str:
        """A hash of everything that changes ``cell``'s result: its configuration, its whole
        simulation spec (world, model, policy, every run setting, defaults included), the
        audit's size when audited, the seed's secrets and pcvr's version."""
        spec = self.spec(work_dir=Path("."), cell=cell)
        document = {
            "format": CELL_FORMAT,
            "pcvr": pcvr.__version__,
            "cell": cell.to_dict(),
            "spec": {f.name: repr(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.name != "work_dir"},
            "audit": dataclasses.asdict(self.audit) if cell.audit else None,
            "secrets": secrets_digest,
            "data": self.data_digest,
        }
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:20]


# --- parsing -----------------------------------------------------------------------------------


def _table(document: dict, key: str, *, source: str) -> dict:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{source}: [{key}] must be a table")
    return value


def _known(table: dict, allowed: tuple[str, ...] | set[str], *, source: str, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: {where} has unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _epsilon(value: object, *, source: str, where: str) -> float:
    if value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{source}: {where} epsilon values must be numbers > 0 or \"inf\"; got {value!r}")
    return float(value)


def _axis_value(axis: str, value: object, *, source: str, where: str) -> object:
    try:
        if axis == "epsilon":
            return _epsilon(value, source=source, where=where)
        if axis == "correction":
            return Correction.parse(str(value))
        if axis in ("codec", "downstream_codec"):
            return Codec.parse(str(value))
        if axis == "dp_noise_multiplier":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"dp_noise_multiplier must be a number >= 0; got {value!r}")
            return float(value)
        if axis == "min_batch_size":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"min_batch_size must be an integer >= 1; got {value!r}")
            return value
    except ValueError as error:
        raise ValueError(f"{source}: {where} {error}") from None
    return value


def _sweep(table: dict, *, source: str, number: int) -> dict[str, tuple]:
    where = f"[[sweep]] #{number}"
    _known(table, (*AXES, "name", "audit_corrections"), source=source, where=where)
    sweep: dict[str, tuple] = {}
    for axis in AXES:
        if axis in table:
            values = table[axis]
            if not isinstance(values, list) or not values:
                raise ValueError(f"{source}: {where} {axis} must be a non-empty list")
            sweep[axis] = tuple(dict.fromkeys(_axis_value(axis, v, source=source, where=where) for v in values))
    sweep["audit_corrections"] = tuple(
        _axis_value("correction", v, source=source, where=where) for v in table.get("audit_corrections", [])
    )
    return sweep


def parse_grid(text: str, *, source: str, name: str) -> ReportGrid:
    """A :class:`ReportGrid` from TOML ``text``; errors name ``source`` and the key."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: {error}") from None
    _known(document, ("seeds", "world", "model", "run", "audit", "sweep", "description"), source=source, where="the grid")
    tables = {key: _table(document, key, source=source) for key in ("world", "model", "run", "audit")}
    for key, cls in (("world", WorldConfig), ("model", ModelShape), ("audit", AuditPlan)):
        _known(tables[key], {f.name for f in dataclasses.fields(cls)}, source=source, where=f"[{key}]")
    _known(tables["run"], RUN_KEYS, source=source, where="[run]")
    seeds = document.get("seeds", 3)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"{source}: seeds must be an integer >= 1; got {seeds!r}")
    sweeps = document.get("sweep", [])
    if not isinstance(sweeps, list) or not sweeps:
        raise ValueError(f"{source}: the grid needs at least one [[sweep]]")
    world_table = dict(tables["world"])
    if "consent_mix" in world_table:
        world_table["consent_mix"] = tuple(tuple(pair) for pair in world_table["consent_mix"])
    model_table = {k: tuple(v) if isinstance(v, list) else v for k, v in tables["model"].items()}
    try:
        grid = ReportGrid(
            name=name,
            world=WorldConfig(**world_table),
            model=ModelShape(**model_table),
            run={k: _axis_value(k, v, source=source, where="[run]") for k, v in tables["run"].items()},
            audit=AuditPlan(**tables["audit"]),
            seeds=seeds,
            sweeps=tuple(_sweep(t, source=source, number=i + 1) for i, t in enumerate(sweeps)),
        )
        for cell in grid.cells():  # every run flag of every cell validated now, before anything runs
            if cell.kind is CellKind.TRAIN:
                grid.spec(work_dir=Path("."), cell=cell)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None
    return grid


def load_grid(grid: str | Path) -> ReportGrid:
    """A shipped grid by name (``default``, ``full``) or a TOML file by path."""
    if str(grid) in SHIPPED_GRIDS:
        text = resources.files("pcvr.report").joinpath("grids", f"{grid}.toml").read_text(encoding="utf-8")
        return parse_grid(text, source=f"grid {grid}", name=str(grid))
    path = Path(grid)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--grid {path}: no such file (or give one of: {', '.join(SHIPPED_GRIDS)})") from None
    return parse_grid(text, source=str(path), name=path.stem)
