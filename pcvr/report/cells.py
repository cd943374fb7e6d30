"""One cell of the report: a real federated run (and its canary audit), cached by its configuration.

Layout of a report folder (this module owns it)::

    OUT/secrets/seed_S/advertiser_K/{join,rr,holdout}.key   fresh per seed, created on first use
    OUT/work/base/        the shared world and backbone (``pcvr prepare`` of the grid's world)
    OUT/work/cells/KEY/   a cell's own work dir while it runs (removed when it is done)
    OUT/cells/KEY.json    a finished cell's row; its presence is the cache
    OUT/cells/KEY/        the run's result.json, privacy_ledger.json, audit.json and log

A cell's work dir links the shared world and backbone and holds its seed's secrets, so
``pcvr.simulate.prepare`` reuses the backbone and makes only the cell's exports, hand-offs
and joins: cells never share a writable file, so they can run in parallel processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcvr.data.io import write_json_atomic
from pcvr.protocols.keys import load_or_create_secret
from pcvr.protocols.layout import PRIVACY_LEDGER_FILE, RESULT_FILE, SimulationDir
from pcvr.report.grid import Cell, CellKind, ReportGrid

__all__ = ["CellTask", "ReportLayout", "prepare_base", "seed_secrets", "cell_task", "run_cell", "execute", "read_row"]

SECRET_NAMES = ("join.key", "rr.key", "holdout.key")
ATTACK_NAMES = ("norm", "direction", "positive_count", "least_squares")  # pcvr.audit.harness.ATTACKS, pinned by a test


@dataclass(frozen=True)
class ReportLayout:
    """Where everything of a report folder lives."""

    out: Path

    @property
    def base(self) -> Path:
        return self.out / "work" / "base"

    def secrets(self, seed: int) -> Path:
        return self.out / "secrets" / f"seed_{seed}"

    def work(self, key: str) -> Path:
        return self.out / "work" / "cells" / key

    def row(self, key: str) -> Path:
        return self.out / "cells" / f"{key}.json"

    def artifacts(self, key: str) -> Path:
        return self.out / "cells" / key

    @property
    def reference(self) -> Path:
        return self.base / "reference.json"


@dataclass(frozen=True)
class CellTask:
    """What a worker process needs to run one cell."""

    grid: ReportGrid
    cell: Cell
    key: str
    out: Path


def seed_secrets(layout: ReportLayout, *, seed: int, advertisers: int) -> str:
    """Create seed ``seed``'s secrets (join, RR, held-out split) if absent; returns their digest."""
    digest = hashlib.sha256()
    for k in range(advertisers):
        for name in SECRET_NAMES:
            digest.update(load_or_create_secret(layout.secrets(seed) / f"advertiser_{k}" / name))
    return digest.hexdigest()


def prepare_base(grid: ReportGrid, layout: ReportLayout) -> dict:
    """The world and backbone every cell shares, and the reference figures: the frozen
    backbone's holdout metrics and the clean training rows' true conversion rate."""
    from pcvr.models.cvr import attach_adapters, load_backbone, parameter_counts
    from pcvr.platform.app import load_oracle_holdout
    from pcvr.platform.evaluate import holdout_metrics, predict
    from pcvr.simulate import NON_PRIVATE, prepare

    spec = grid.spec(work_dir=layout.base)
    prepare(spec)
    platform = SimulationDir(layout.base).platform
    backbone = load_backbone(platform.backbone)
    holdout = load_oracle_holdout(platform, backbone)
    clean = [_train_table(layout.base, k, NON_PRIVATE) for k in range(grid.world.advertisers)]
    positives = sum(float(np.sum(t.column("noisy_label").to_numpy())) for t in clean)  # no noise: the true labels
    rows = sum(t.num_rows for t in clean)
    reference = {
        "backbone": holdout_metrics(holdout.labels, predict(backbone, holdout.features)),
        "train_positive_rate": positives / rows,
        "train_rows": rows,
        "holdout_rows": int(len(holdout.labels)),
        "parameters": parameter_counts(attach_adapters(backbone)),
    }
    write_json_atomic(layout.reference, reference)
    return reference


def _train_table(work: Path, advertiser: int, label_set: str):
    """A clean room's joined training rows (Arrow IPC), only the columns the report reads."""
    import pyarrow as pa

    path = SimulationDir(work).clean_room(advertiser).label_set(label_set).train
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all().select(["noisy_label", "epsilon"])


def _link_tree(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True)


def _cell_work_dir(task: CellTask) -> Path:
    """A fresh work dir for the cell: the shared world and platform directory linked, the seed's secrets copied
    where each party keeps them (the advertisers' join and RR keys, each clean room's held-out key)."""
    layout = ReportLayout(task.out)
    base, work = SimulationDir(layout.base), SimulationDir(layout.work(task.key))
    shutil.rmtree(work.root, ignore_errors=True)
    _link_tree(base.world, work.world)
    platform = base.platform
    for entry in Path(platform.root).iterdir():
        if entry.name == Path(platform.runs).name:
            continue  # the base's own runs are not the cell's
        target = Path(work.platform.root) / entry.name
        if entry.is_dir():
            _link_tree(entry, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(entry, target)
    from pcvr.parties import open_clean_room

    seed_dir = layout.secrets(task.cell.seed)
    for k in range(task.grid.world.advertisers):
        secrets, room = work.secrets(k), work.clean_room(k)
        open_clean_room(room)  # an empty clean room (no label set yet), whose held-out key the seed's replaces
        for source, target in ((secrets.join, "join.key"), (secrets.rr, "rr.key"), (room.holdout_key, "holdout.key")):
            source.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(seed_dir / f"advertiser_{k}" / target, source)
    return Path(work.root)


def _rows_by_epsilon(work: Path, advertisers: int, label_set: str) -> str:
    """Training rows per label-DP ε, over every clean room: "3:45798;1:5808" (what the planner needs)."""
    counts: dict[float, int] = {}
    for k in range(advertisers):
        values, numbers = np.unique(_train_table(work, k, label_set).column("epsilon").to_numpy(), return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist()):
            counts[value] = counts.get(value, 0) + number
    return ";".join(f"{'inf' if math.isinf(e) else f'{e:g}'}:{n}" for e, n in sorted(counts.items(), reverse=True))


def _number(value: float | None) -> float | str | None:
    return "inf" if value is not None and math.isinf(value) else value


def _ledger_fields(ledger: dict) -> dict[str, object]:
    """Label-DP ε per consent level and DP-SGD (ε, δ) from the run's privacy ledger (worst clean room)."""
    rooms = list(ledger["clean_rooms"].values())
    fields: dict[str, object] = {}
    for level, entry in sorted(rooms[0]["label_dp"]["levels"].items()):
        fields[f"label_dp_epsilon_{level}"] = "excluded" if entry["excluded"] else _number(entry["epsilon"])
    dp = [room["dp_sgd"] for room in rooms if room["dp_sgd"]["enabled"]]
    fields["dp_sgd_epsilon"] = _number(max(entry["epsilon"] for entry in dp)) if dp else None
    fields["dp_sgd_delta"] = dp[0]["delta"] if dp else None
    return fields


def _private_fields(private: dict | None) -> dict[str, object]:
    fields: dict[str, object] = {}
    for metric in ("auc", "ne", "calibration", "positive_rate"):
        estimate = (private or {}).get(metric) or {}
        fields[f"private_{metric}"] = estimate.get("value")
        fields[f"private_{metric}_se"] = estimate.get("se")
    return fields


def _audit_fields(audit: dict | None) -> dict[str, object]:
    fields: dict[str, object] = {
        "audit_bound": None if audit is None else audit["auc_bound"],
        "audit_passed": None if audit is None else audit["passed"],
        "audit_canaries": None if audit is None else audit["canaries_scored"],
    }
    for name in ATTACK_NAMES:
        auc = {} if audit is None else (audit["attacks"][name].get("auc") or {})
        fields[f"attack_{name}_auc"] = auc.get("value")
        fields[f"attack_{name}_low"] = auc.get("low")
        fields[f"attack_{name}_high"] = auc.get("high")
    return fields


def _audit(task: CellTask, spec) -> dict:
    from pcvr.audit.harness import AuditSetting, audit_setting, control_setting

    cell, plan = task.cell, task.grid.audit
    if cell.kind is CellKind.CONTROL:
        setting = control_setting(canaries_per_room=plan.control_canaries)
    else:
        setting = AuditSetting(
            name="cell",
            epsilon=cell.epsilon,
            batch_size=cell.min_batch_size,  # the worst case the clean rooms admit
            canaries_per_room=plan.canaries_per_room,
            rows_per_room=plan.rows_per_room(batch_size=cell.min_batch_size),
            correction=cell.correction,
            codec=cell.codec,
            dp_noise_multiplier=cell.dp_noise_multiplier,
        )
    return audit_setting(spec, setting, seed=cell.seed, confidence=plan.confidence)


def run_cell(task: CellTask) -> dict:
    """Run ``task``'s cell: one federated run via :func:`pcvr.simulate.run_setting` (the
    ``pcvr simulate`` code path), then, when audited, the canary audit; returns its row."""
    from pcvr.simulate import NON_PRIVATE, prepare, run_setting

    started = time.monotonic()
    cell, layout = task.cell, ReportLayout(task.out)
    work = _cell_work_dir(task)
    spec = task.grid.spec(work_dir=work, cell=cell)
    prepare(spec)
    artifacts = layout.artifacts(task.key)
    artifacts.mkdir(parents=True, exist_ok=True)
    if cell.kind is CellKind.CONTROL:
        audit = _audit(task, spec)
        write_json_atomic(artifacts / "audit.json", audit)
        shutil.rmtree(work, ignore_errors=True)
        return {"cell": task.key, "name": cell.name, **cell.to_dict(), **_audit_fields(audit), "wall_s": time.monotonic() - started}
    label_set = NON_PRIVATE if math.isinf(cell.epsilon) else spec.private_label_set
    result = run_setting(spec, name="cell", label_set=label_set, correction=cell.correction, seed=cell.seed)
    run_dir = spec.run_config(label_set=label_set, correction=cell.correction, name="cell").run_dir
    for name in (RESULT_FILE, PRIVACY_LEDGER_FILE):
        shutil.copy2(run_dir / name, artifacts / name)
    if result["failures"]:
        raise RuntimeError(f"cell {cell.name}: the run failed: {result['failures'][0]}")
    ledger = json.loads((run_dir / PRIVACY_LEDGER_FILE).read_text(encoding="utf-8"))
    row = {
        "cell": task.key,
        "name": cell.config_name,
        **{k: v for k, v in cell.to_dict().items() if k != "kind"},
        **{metric: result["final"][metric] for metric in ("auc", "ne", "calibration")},
        **_private_fields(result["private"]),
        "bytes_up_per_round": result["bytes_up_per_round"],
        "bytes_down_per_round": result["bytes_down_per_round"],
        "rounds": result["rounds"],
        "rejected": result["rejected"],
        **_ledger_fields(ledger),
        "train_rows_by_epsilon": _rows_by_epsilon(work, task.grid.world.advertisers, label_set),
    }
    audit = _audit(task, spec) if cell.audit else None
    if audit is not None:
        write_json_atomic(artifacts / "audit.json", audit)
    row.update(_audit_fields(audit))
    row["wall_s"] = time.monotonic() - started
    shutil.rmtree(work, ignore_errors=True)
    return row


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors too: Ray and Flower write there) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def execute(task: CellTask) -> dict:
    """Run a cell in this (worker) process with its output in its log; write its row atomically.

    The row file is written last: a cell interrupted at any point has no row and runs again.
    """
    import logging

    layout = ReportLayout(task.out)
    with _output_to(layout.artifacts(task.key) / "log.txt"):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
        row = run_cell(task)
    write_json_atomic(layout.row(task.key), row)
    return row


def cell_task(grid: ReportGrid, cell: Cell, *, out: Path, secrets_digest: str) -> CellTask:
    return CellTask(grid=grid, cell=cell, key=grid.cell_key(cell, secrets_digest=secrets_digest), out=out)


def read_row(layout: ReportLayout, key: str) -> dict | None:
    """A finished cell's row, or None when it has not run (or its file is unreadable)."""
    try:
        return json.loads(layout.row(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

