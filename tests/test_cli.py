"""Every error ends `pcvr` with one line naming the file or the flag, and exit status 2.

The probes are the ones a demanding user hits: a work dir that cannot be written,
secrets and models that are not what they should be, files that do not parse,
flags that disagree. One small prepared work dir (module-scoped) backs the probes
that need one; each probe that damages it works on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pcvr.cli import main
from pcvr.protocols.layout import SimulationDir

WORLD = ["--rows", "2000", "--pretrain-rows", "2000", "--holdout-rows", "500", "--batch-size", "128", "--min-batch-size", "64"]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pcvr:")]
    assert len(lines) == 1, err  # exactly one line of error, whatever was logged before it
    return code, lines[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cli") / "work"
    assert main(["prepare", "--work-dir", str(work), *WORLD]) == 0
    return work


@pytest.fixture
def copy(prepared, tmp_path) -> Path:
    shutil.copytree(prepared, tmp_path / "work")
    return tmp_path / "work"


def test_a_work_dir_under_a_file(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    code, line = run(capsys, "prepare", "--work-dir", str(tmp_path / "file" / "work"), *WORLD)
    assert code == 2 and str(tmp_path / "file") in line and "Not a directory" in line


def test_debug_shows_the_traceback_instead(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        main(["--debug", "prepare", "--work-dir", str(tmp_path / "file" / "work"), *WORLD])


def test_a_secret_that_is_a_directory(tmp_path, capsys) -> None:
    (tmp_path / "work" / "secrets" / "advertiser_0" / "rr.key").mkdir(parents=True)
    code, line = run(capsys, "prepare", "--work-dir", str(tmp_path / "work"), *WORLD)
    assert code == 2 and line.endswith("advertiser_0/rr.key: Is a directory")
    assert not (tmp_path / "work" / "world").exists()  # found before anything was prepared


def test_a_garbage_backbone(copy, capsys) -> None:
    (SimulationDir(copy).platform.backbone / "backbone.pt").write_bytes(b"\x80\x02garbage")
    code, line = run(capsys, "simulate", "--work-dir", str(copy), *WORLD, "--rounds", "1")
    assert code == 2 and "platform/backbone/backbone.pt: not a backbone saved by pcvr" in line
    assert "weights_only" not in line


def test_a_policy_file_that_is_not_utf8(tmp_path, capsys) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_bytes("[levels]\nstandard = 3.0 # ré\n".encode("latin-1"))
    code, line = run(capsys, "prepare", "--work-dir", str(tmp_path / "work"), "--policy", str(policy), *WORLD)
    assert code == 2 and str(policy) in line


def test_a_world_summary_that_is_not_json(tmp_path, capsys) -> None:
    (tmp_path / "work" / "world").mkdir(parents=True)
    (tmp_path / "work" / "world" / "world.json").write_text("{ not json")
    code, line = run(capsys, "prepare", "--work-dir", str(tmp_path / "work"), *WORLD)
    assert code == 2 and "world/world.json: not a world summary" in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rounds", "0"], "--rounds must be >= 1; got 0"),
        (["--batch-size", "32"], "--batch-size (32) is below --min-batch-size (64)"),
        (["--dp-noise-multiplier", "1", "--dp-target-epsilon", "2"], "set --dp-noise-multiplier or --dp-target-epsilon, not both"),
        (["--epsilon", "0"], "--epsilon must be a finite number > 0"),
        (["--rounds", "two"], "argument --rounds: invalid int value: 'two'"),
    ],
)
def test_run_flags_are_checked_before_anything_is_prepared(tmp_path, capsys, flags, message) -> None:
    code, line = run(capsys, "simulate", "--work-dir", str(tmp_path / "work"), *WORLD, *flags)
    assert code == 2 and message in line
    assert not (tmp_path / "work").exists()


def test_epsilon_and_a_policy_file_that_disagree(tmp_path, capsys) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[levels]\nstandard = 3.0\nlimited = 1.0\nopt_out = "exclude"\n')
    code, line = run(capsys, "prepare", "--work-dir", str(tmp_path / "work"), "--policy", str(policy), "--epsilon", "2", *WORLD)
    assert code == 2 and line == f"pcvr: error: --epsilon 2 disagrees with --policy {policy} (standard = 3.0); give one or make them agree"


def test_a_deleted_join_secret_is_not_regenerated_beside_data_made_with_it(copy, capsys) -> None:
    (copy / "secrets" / "advertiser_1" / "join.key").unlink()
    code, line = run(capsys, "prepare", "--work-dir", str(copy), *WORLD)
    assert code == 2 and "advertiser_1/join.key: secret is missing, but" in line and "advertiser_1" in line.split("but", 1)[1]
    assert not (copy / "secrets" / "advertiser_1" / "join.key").exists()


def test_a_changed_consent_policy_is_applied_not_ignored(copy, capsys) -> None:
    ledger = SimulationDir(copy).clean_room(0).label_set("eps=3").ledger
    assert json.loads(ledger.read_text())["levels"]["limited"]["epsilon"] == 1.0
    policy = copy.parent / "policy.toml"
    policy.write_text('[levels]\nstandard = 3.0\nlimited = 0.5\nopt_out = "exclude"\n')
    assert main(["prepare", "--work-dir", str(copy), "--policy", str(policy), *WORLD]) == 0
    assert json.loads(ledger.read_text())["levels"]["limited"]["epsilon"] == 0.5
    labels = SimulationDir(copy).handoff(0, "non_private").labels.stat().st_mtime_ns
    assert main(["prepare", "--work-dir", str(copy), "--policy", str(policy), *WORLD]) == 0  # nothing changed now
    assert SimulationDir(copy).handoff(0, "non_private").labels.stat().st_mtime_ns == labels


def test_a_work_dir_that_cannot_be_written(capsys) -> None:
    """/sys refuses new entries even to root (chmod would not stop a test run as root)."""
    code, line = run(capsys, "prepare", "--work-dir", "/sys/pcvr-probe/work", *WORLD)
    assert code == 2 and "/sys/pcvr-probe" in line and ("not permitted" in line or "Read-only" in line or "denied" in line)
