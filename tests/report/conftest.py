"""One tiny report, built once per session, behind the report's end-to-end and browser tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_GRID = """
description = "a tiny grid for the tests: two configurations, two seeds, one audited"
seeds = 2

[world]
rows = 9000
users = 1000
pretrain_rows = 9000
holdout_rows = 3000
seed = 4

[model]
embedding_dim = 8
mlp_dims = [32, 16]

[run]
num_rounds = 4
batch_size = 256
min_batch_size = 128
learning_rate = 0.03
eval_every = 4
pretrain_epochs = 2
codec = "q8"

[audit]
canaries_per_room = 10
canaries_per_batch = 10
control_canaries = 10

[[sweep]]
epsilon = [3, "inf"]
correction = ["forward"]
audit_corrections = ["forward"]
"""


@pytest.fixture(scope="session")
def tiny_grid_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "tiny.toml"
    path.write_text(TINY_GRID, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_report(tiny_grid_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny grid run from nothing with two worker processes: (report folder, results.json)."""
    from pcvr.report.grid import load_grid
    from pcvr.report.report import make_report

    out = tmp_path_factory.mktemp("report") / "out"
    make_report(load_grid(tiny_grid_file), out=out, jobs=2, show_progress=False)
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))
