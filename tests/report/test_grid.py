"""Report grids: parsed once, every error naming its key; cells and their cache keys."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pcvr.cli import main
from pcvr.protocols.label_dp import Correction
from pcvr.report.grid import CellKind, parse_grid

BASE = """
seeds = 3
[world]
rows = 9000
[run]
num_rounds = 4
batch_size = 256
min_batch_size = 128
codec = "q8"
"""


def _grid(sweeps: str, base: str = BASE):
    return parse_grid(base + sweeps, source="grid.toml", name="test")


def test_sweeps_expand_to_cells_each_once_and_infinity_uncorrected() -> None:
    grid = _grid(
        """
[[sweep]]
epsilon = [1, "inf"]
correction = ["none", "forward"]
audit_corrections = ["forward"]
[[sweep]]
epsilon = [1]
correction = ["forward"]
codec = ["q8", "none"]
"""
    )
    cells = grid.cells()
    train = [c for c in cells if c.kind is CellKind.TRAIN]
    names = {c.config_name for c in train}
    assert names == {"ε=1,none,q8,σ=0,b=128", "ε=1,forward,q8,σ=0,b=128", "ε=∞,none,q8,σ=0,b=128", "ε=1,forward,none,σ=0,b=128"}
    assert len(train) == 4 * 3  # three seeds each; ε=∞ × two corrections is one cell, the shared point too
    audited = {c.config_name for c in train if c.audit}
    assert audited == {"ε=1,forward,q8,σ=0,b=128"}  # the second sweep's copy keeps the first's audit
    assert cells[-1].kind is CellKind.CONTROL and sum(c.kind is CellKind.CONTROL for c in cells) == 1
    assert all(c.correction is Correction.NONE for c in train if math.isinf(c.epsilon))


def test_cache_key_covers_what_changes_a_result_and_only_that() -> None:
    sweep = '\n[[sweep]]\nepsilon = [3]\ncorrection = ["forward"]\n'
    grid = _grid(sweep)
    cell = grid.cells()[0]
    key = grid.cell_key(cell, secrets_digest="a")
    assert grid.cell_key(cell, secrets_digest="b") != key  # other secrets: other noisy labels
    assert grid.cell_key(dataclasses.replace(cell, seed=1), secrets_digest="a") != key
    assert grid.cell_key(dataclasses.replace(cell, correction=Correction.BACKWARD), secrets_digest="a") != key
    for change in ("num_rounds = 5", "learning_rate = 0.5"):
        other = _grid(sweep, BASE.replace("[run]", f"[run]\n{change}").replace("num_rounds = 4\n", "" if "rounds" in change else "num_rounds = 4\n"))
        assert other.cell_key(other.cells()[0], secrets_digest="a") != key, change
    other_world = _grid(sweep, BASE.replace("rows = 9000", "rows = 9001"))
    assert other_world.cell_key(other_world.cells()[0], secrets_digest="a") != key
    # an extended grid keeps the keys of the cells it already had: they are reused
    extended = _grid(sweep + '\n[[sweep]]\nepsilon = [8]\ncorrection = ["forward"]\n')
    assert extended.cell_key(extended.cells()[0], secrets_digest="a") == key


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('\n[[sweep]]\nepsilon = [0]\n', "epsilon values must be numbers > 0"),
        ('\n[[sweep]]\nepsilon = [3]\ncorection = ["none"]\n', "unknown key 'corection'"),
        ('\n[[sweep]]\nepsilon = [3]\ncodec = ["q7"]\n', "[[sweep]] #1"),
        ('\n[[sweep]]\nepsilon = [3]\ncorrection = ["sideways"]\n', "correction must be one of"),
        ('\n[[sweep]]\nepsilon = 3\n', "epsilon must be a non-empty list"),
        ("", "at least one [[sweep]]"),
        ('\n[[sweep]]\nepsilon = [3]\nmin_batch_size = [512]\n', "grid.toml"),  # min batch above the batch size
    ],
)
def test_bad_grid_is_one_line_naming_the_key(text: str, needle: str) -> None:
    with pytest.raises(ValueError) as error:
        _grid(text)
    message = str(error.value)
    assert needle in message and message.startswith("grid.toml") and "\n" not in message


def test_unknown_table_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"\[world\] has unknown key 'rowz'"):
        _grid('\n[[sweep]]\nepsilon = [3]\n', BASE.replace("rows = 9000", "rowz = 9000"))


def test_report_command_refuses_a_bad_grid_in_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BASE + '\n[[sweep]]\nepsilon = ["lots"]\n', encoding="utf-8")
    assert main(["report", "--grid", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pcvr: error: {path}") and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written
    assert main(["report", "--grid", str(tmp_path / "none.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
