"""Faults survived on real processes (loopback, TLS + SuperNode auth): a clean room killed with -9
comes back into the same run; a platform killed with -9 resumes from its checkpoint.

Each test runs ``pcvr deploy local`` in this process and kills a process group it started, by
the pid it recorded, when the platform reports the round named; every wait is bounded.
The bit-for-bit claim of a resumed run (codec ``none``, no DP-SGD) is tested in-process in
``tests/platform/test_resume.py``; here the counts show nothing was lost or applied twice.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from pcvr.cli import main
from pcvr.clean_room.policy import ReleaseLog
from pcvr.deploy.local import LocalDeployment, deploy_local
from pcvr.deploy.processes import DeployError
from pcvr.platform.federation import CHECKPOINT_FILE
from pcvr.platform.training import AdapterTrainer
from support import free_port_block, process_alive

KILL_TIMEOUT_S = 600.0


class Killer:
    """Kills process group ``name`` of a deployment (by its pid file) once a line containing ``after`` is printed."""

    def __init__(self, run_dir, name: str, *, after: str) -> None:
        self.run_dir, self.name, self.after = run_dir, name, after
        self.lines: list[str] = []
        self.killed = threading.Event()
        self._seen = threading.Event()
        self._thread = threading.Thread(target=self._kill, daemon=True)
        self._thread.start()

    def out(self, line: str) -> None:
        self.lines.append(line)
        if self.after in line:
            self._seen.set()

    def _kill(self) -> None:
        if self._seen.wait(KILL_TIMEOUT_S):
            os.killpg(int((self.run_dir / "logs" / f"{self.name}.pid").read_text()), signal.SIGKILL)
            self.killed.set()


def _steps_match_rounds(result: dict) -> None:
    """One optimizer step per round with a valid reply: none lost, none applied twice."""
    assert result["steps"] == sum(1 for r in result["history"] if r["clean_rooms"] > 0)
    assert [r["round"] for r in result["history"]] == list(range(1, result["config"]["num-rounds"] + 1))


def test_a_clean_room_killed_with_minus_9_comes_back_into_the_same_run(work_dir, tmp_path):
    rounds = 8
    run_dir = tmp_path / "run"
    killer = Killer(run_dir, "supernode_1", after="pcvr round 1/")
    deployment = LocalDeployment(
        work_dir=work_dir, run_dir=run_dir, clean_rooms=3, port=free_port_block(3),
        run_config={"num-rounds": rounds, "eval-every": rounds, "batch-size": 2048, "min-participation": 0.5},
    )
    result = deploy_local(deployment, out=killer.out)
    assert killer.killed.is_set()
    nodes = json.loads(deployment.layout.nodes_file.read_text())
    printed = "\n".join(killer.lines)
    assert "supernode_1 exited with status -9; starting it again" in printed
    assert f"supernode_1 is back online (node {nodes['1']})" in printed  # the same node: its key says which

    room = result["participation"]["clean room 1"]
    assert room["rejected"] == {} and result["rejected"] == 0  # missed, never refused: it got full weights back
    assert 1 <= room["missed"] <= 4 and room["served"] == rounds - room["missed"]
    missed = [r["round"] for r in result["history"] if r["missed"] == ["clean room 1"]]
    assert len(missed) == room["missed"] and min(missed) == 2 and max(missed) < rounds
    assert result["history"][-1]["clean_rooms"] == 3  # it trains again after its return
    assert all(result["participation"][f"clean room {k}"]["served"] == rounds for k in (0, 2))
    _steps_match_rounds(result)
    assert result["failures"] == []
    pids = [int(p.read_text()) for p in deployment.layout.logs.glob("*.pid")]
    assert not any(process_alive(pid) for pid in pids)


def test_a_platform_killed_with_minus_9_resumes_from_its_checkpoint(work_dir, tmp_path, capsys):
    rounds = 5
    run_dir = tmp_path / "run"
    port = free_port_block(3)
    killer = Killer(run_dir, "superlink", after="pcvr round 2/")
    deployment = LocalDeployment(
        work_dir=work_dir, run_dir=run_dir, clean_rooms=3, port=port,
        run_config={"num-rounds": rounds, "eval-every": rounds, "batch-size": 2048, "codec": "none", "downstream-codec": "none"},
    )
    with pytest.raises(DeployError, match=r"the platform stopped during the run .*status -9.*`pcvr deploy local --resume --run-dir"):
        deploy_local(deployment, out=killer.out)
    state = AdapterTrainer.saved_run_state(deployment.layout.training_dir / CHECKPOINT_FILE)
    assert state["round"] == 2  # the last completed round, checkpointed before its line was printed
    first_run = state["run"]
    assert not any(process_alive(int(p.read_text())) for p in deployment.layout.logs.glob("*.pid"))

    # The operator's view: the same command with --resume; the run's settings come from the run itself.
    assert main(["deploy", "local", "--resume", "--rounds", "9", "--run-dir", str(run_dir), "--work-dir", str(work_dir)]) == 2
    assert "--resume continues the run with its own settings; drop --rounds" in capsys.readouterr().err
    argv = ["deploy", "local", "--resume", "--run-dir", str(run_dir), "--work-dir", str(work_dir), "--port", str(port)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"resuming run {first_run}" in printed
    assert [line.split()[2] for line in printed.splitlines() if line.startswith("pcvr round ")] == ["3/5:", "4/5:", "5/5:"]

    result = json.loads((deployment.layout.training_dir / "result.json").read_text())
    assert result["run_id"] == first_run  # the resumed run is the run it resumes
    _steps_match_rounds(result)
    assert result["steps"] == rounds and result["rejected"] == 0 and result["failures"] == []
    assert all(room["served"] == rounds for room in result["participation"].values())
    for k in range(3):  # each clean room's releases stayed on the one run's account, across both Flower runs
        releases = ReleaseLog(work_dir / f"clean_room_{k}", run_key=f"eps=3/run-{first_run}")
        assert rounds <= releases.in_run <= rounds + 1  # round 3 may have been served before the kill landed


def test_resume_without_an_interrupted_run_says_so_in_one_line(work_dir, tmp_path, capsys):
    assert main(["deploy", "local", "--resume", "--run-dir", str(tmp_path / "none"), "--work-dir", str(work_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no run to resume" in err[0]
    argv = ["deploy", "run", "--superlink", "127.0.0.1:9", "--insecure", "--run-dir", str(tmp_path / "remote"),
            "--platform-dir", str(work_dir / "platform"), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint to resume from" in err[0]
